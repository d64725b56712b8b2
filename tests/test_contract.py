"""params.yaml <-> config classes <-> dvc.yaml agree: every stage's params exist, every command
is a real module with run/main, every output location is the fixed one of `config.Paths` and
none of them can delete anything DVC did not make. The package rules of components/ hold: the
folder listing is the pipeline (stage drivers at the top, packages by role below), stage
drivers never import each other, serving/ and flows/ never import torch, evaluation/ and
serving/ never import reporting/, and dvc.yaml's code deps are what each stage imports."""

import importlib
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from components.config import PROTECTED_ENTRIES, Params, Paths, load_params
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} not in params.yaml"
        node = node[part]
    return node


def test_params_yaml_matches_config_classes_exactly():
    dumped = load_params(ROOT / "params.yaml").to_dict()
    assert set(dumped) == set(Params.model_fields)
    # Output locations are fixed in dvc.yaml, never a params.yaml value.
    assert "paths" not in PARAMS
    del dumped["paths"]

    def keys(tree, prefix=""):
        for k, v in tree.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    # Every key in params.yaml is spelled out, so nothing silently falls back to a default.
    assert set(keys(PARAMS)) == set(keys(dumped))


def test_stage_params_exist():
    for stage in DVC["stages"].values():
        for key in stage["params"]:
            _lookup(PARAMS, key)


def test_commands_are_runnable_modules():
    for name, stage in DVC["stages"].items():
        match = re.fullmatch(r"python -m (components(\.\w+)*)", stage["cmd"])
        assert match, f"stage {name}: cmd {stage['cmd']!r} is not `python -m components.X`"
        module = importlib.import_module(match.group(1))
        target = importlib.import_module("components.distill.train") if name == "distill" \
            else module
        assert callable(target.run) and callable(target.main), name
        assert match.group(1).split(".")[1] == name, f"stage {name} runs {match.group(1)}"


FIXED = Paths().model_dump()


def stage_outs() -> dict[str, str]:
    """Every stage output in dvc.yaml -> its stage."""
    return {(out if isinstance(out, str) else next(iter(out))): name
            for name, stage in DVC["stages"].items() for out in stage.get("outs", [])}


def plot_files() -> list[str]:
    files = []
    for plot in DVC["plots"]:
        if isinstance(plot, str):
            files.append(plot)
            continue
        (spec,) = plot.values()
        files += list(spec["y"]) if isinstance(spec.get("y"), dict) else []
    return files


def test_outputs_metrics_and_plots_are_the_fixed_paths():
    """dvc.yaml names every output literally (no `${...}`: no params value decides what DVC
    deletes before a stage runs), and at the locations `config.Paths` gives the code."""
    assert "${" not in (ROOT / "dvc.yaml").read_text()
    outs = stage_outs()
    key_of = {v: k for k, v in FIXED.items()}
    assert set(outs) <= set(key_of), f"outs not in config.Paths: {set(outs) - set(key_of)}"
    # `results` holds evaluate's timings: read as metrics/plots, kept out of dvc.lock on purpose;
    # `bundle` records its run's commit and timings: rebuilt on every repro, never hashed
    assert {key_of[o] for o in outs} == set(FIXED) - {"wandb", "results", "bundle"}
    ship = DVC["stages"]["ship"]
    assert ship.get("always_changed") and "outs" not in ship
    # The source stage's manifest survives a failing run (a refused params.yaml, say): DVC does
    # not delete a persisted output before running its stage.
    source_outs = DVC["stages"]["source"]["outs"]
    assert source_outs == [{FIXED["source_version"]: {"persist": True}}]
    assert all(isinstance(o, str) for n, s in DVC["stages"].items() if n != "source"
               for o in s.get("outs", [])), "only the source stage's output persists"
    for name, stage in DVC["stages"].items():
        for dep in stage["deps"]:
            if not dep.startswith(("components/", "flows/")):
                assert dep in outs, f"stage {name}: dep {dep} is no stage's output"
    inside = [f for f in DVC["metrics"] + plot_files()
              if not any(PurePosixPath(f).is_relative_to(v) for v in FIXED.values())]
    assert not inside, f"metrics/plots outside the output locations: {inside}"
    assert any(f.startswith(FIXED["results"] + "/") for f in DVC["metrics"])


def git_files() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.decode().split("\0") if f]


def test_no_output_location_holds_anything_dvc_did_not_make():
    """Each DVC output is deleted by DVC before its stage runs and replaced whole by the stage:
    it must hold no git-tracked file, neither be nor hold another stage's output, hold none of
    the project's code and control entries, and stay inside the project (no `..`, no symlink
    on the way)."""
    outs = stage_outs()
    tracked = git_files()
    problems = []
    for out, stage in outs.items():
        path = PurePosixPath(out)
        if path.is_absolute() or ".." in path.parts or out != path.as_posix():
            problems.append(f"{out} ({stage}): not a plain relative path")
            continue
        for i in range(1, len(path.parts) + 1):
            if (ROOT / Path(*path.parts[:i])).is_symlink():
                problems.append(f"{out} ({stage}): {Path(*path.parts[:i])} is a symlink")
        held = [f for f in tracked if PurePosixPath(f).is_relative_to(path)]
        if held:
            problems.append(f"{out} ({stage}): holds git-tracked files {held[:3]}")
        for other, other_stage in outs.items():
            if other != out and PurePosixPath(other).is_relative_to(path):
                problems.append(f"{out} ({stage}): holds {other} ({other_stage})")
        for entry in PROTECTED_ENTRIES:
            if PurePosixPath(entry).is_relative_to(path) or path.is_relative_to(entry):
                problems.append(f"{out} ({stage}): is or holds {entry}")
    assert not problems, "\n".join(problems)
    # every top-level code folder is protected
    code = {PurePosixPath(f).parts[0] for f in tracked if f.endswith(".py") and "/" in f}
    assert code <= set(PROTECTED_ENTRIES), code - set(PROTECTED_ENTRIES)


def test_every_stage_section_is_tracked_by_a_stage():
    tracked = {p.split(".")[0] for s in DVC["stages"].values() for p in s["params"]}
    # search: read by `still search` (flows/search.py), which runs the stages, never by one
    assert tracked >= set(PARAMS) - {"paths", "tracking", "search"}


def _imported_project_files(module: str, external: set[str] | None = None) -> set[str]:
    """Files of the project that `python -m <module>` can import, transitively (static: every
    `import`/`from ... import` anywhere in a module, function-level imports included). With
    `external`, also collects there the top-level names of the other packages imported."""
    import ast

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        path = ROOT.joinpath(*parts)
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not file.is_file():
            continue
        rel = file.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        if name == module and path.is_dir():  # `python -m package` runs package/__main__.py
            todo.append(f"{name}.__main__")
        for parent in range(1, len(parts)):  # importing a.b runs a/__init__.py
            todo.append(".".join(parts[:parent]))
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks never run: leave them out
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if external is not None:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module])
                external |= {n.split(".")[0] for n in names
                             if n.split(".")[0] not in ("components", "flows")}
    return {f for f in seen if f.split("/")[0] in ("components", "flows")}


def test_code_deps_cover_every_imported_project_file():
    """dvc.yaml's code deps are derived from imports: a stage whose code imports a project file
    it does not depend on would stay 'up to date' after that file changed; one that lists a
    file it does not import reruns for nothing (a plot's style must not rerun export)."""
    for name, stage in DVC["stages"].items():
        module = stage["cmd"].removeprefix("python -m ")
        deps = [d for d in stage["deps"] if d.startswith(("components/", "flows/"))]
        imported = _imported_project_files(module)
        missing = sorted(f for f in imported
                         if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"stage {name}: add to dvc.yaml deps: {missing}"
        own = _stage_files(name)
        unused = sorted(d for d in deps if d not in imported and not (
            own & {f for f in imported if f.startswith(d.rstrip("/") + "/")}))
        assert not unused, f"stage {name}: dvc.yaml deps it never imports: {unused}"


def _stage_files(name: str) -> set[str]:
    """The files that belong to stage `name` itself: its module, or its package folder."""
    module = DVC["stages"][name]["cmd"].removeprefix("python -m ")
    path = ROOT.joinpath(*module.split("."))
    if path.is_dir():
        return {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")}
    return {path.with_suffix(".py").relative_to(ROOT).as_posix()}


def test_no_stage_imports_another_stage():
    """Stages meet through components.data.artifacts (files and readers), components.models and the
    shared modules, never by importing each other (directly or through a shared module)."""
    own = {name: _stage_files(name) for name in DVC["stages"]}
    crossing = []
    for name, stage in DVC["stages"].items():
        imported = _imported_project_files(stage["cmd"].removeprefix("python -m "))
        for other, files in own.items():
            if other != name and imported & files:
                crossing.append(f"{name} imports {sorted(imported & files)} of stage {other}")
    assert not crossing, "\n".join(crossing)


def test_stage_params_match_dvc_yaml():
    """params.json beside each output holds exactly the params its stage declares."""
    from components.config import STAGE_PARAMS, stage_params

    assert {n: list(s["params"]) for n, s in DVC["stages"].items()} == {
        n: list(keys) for n, keys in STAGE_PARAMS.items()}
    params = load_params(ROOT / "params.yaml")
    assert stage_params(params, "tokenizer") == {
        "tokenizer": PARAMS["tokenizer"], "teacher": {"model": PARAMS["teacher"]["model"]},
        "distill": {"max_length": PARAMS["distill"]["max_length"]}}


def _md5(path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_committed_lock_matches_the_code():
    """Every code dependency recorded in dvc.lock has the md5 of the file as it is now: a stage
    edited without rerunning it (and committing the lock) fails here, not on a user's machine."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(DVC["stages"]), "dvc.lock misses a stage: run dvc repro, commit"
    stale = []
    for name, stage in lock.items():
        declared = [d for d in DVC["stages"][name]["deps"]
                    if d.startswith(("components/", "flows/"))]
        recorded = {d["path"]: d for d in stage["deps"]}
        for dep in declared:
            entry = recorded.get(dep)
            if entry is None:
                stale.append(f"{name}: {dep} not in dvc.lock")
            elif (ROOT / dep).is_file() and entry["md5"] != _md5(ROOT / dep):
                stale.append(f"{name}: {dep} changed since dvc.lock was written")
    assert not stale, "rerun the stages (dvc repro) and commit dvc.lock:\n" + "\n".join(stale)


# ------------------------------------------------------------------------------ package rules

COMPONENTS = ROOT / "components"
# What components/ holds besides the stage drivers: the packages by role, the command line and
# the harness every driver shares.
PACKAGES = {"config", "data", "text", "models", "training", "exporting", "evaluation",
            "reporting", "serving", "search"}
NOT_STAGES = {"__init__.py", "cli.py", "stage.py"}


def _package_modules(package: str) -> list[str]:
    """The dotted names of every module in `components/<package>/`."""
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (COMPONENTS / package).rglob("*.py"))


def test_the_folder_listing_is_the_pipeline():
    """components/ holds the stage drivers (one per dvc.yaml stage, `distill/` a package of
    its own), the packages by role, cli.py and stage.py; nothing else."""
    stages = {stage["cmd"].removeprefix("python -m components.") for stage in
              DVC["stages"].values()}
    files = {p.name for p in COMPONENTS.glob("*.py")}
    folders = {p.name for p in COMPONENTS.iterdir()
               if p.is_dir() and (p / "__init__.py").is_file()}
    assert files - NOT_STAGES == {s + ".py" for s in stages} - {"distill.py"}, files
    assert folders == PACKAGES | {"distill"}, folders


def test_nothing_but_a_stage_driver_imports_a_stage_driver():
    """Packages are what the drivers are made of: no package module (and no flow) imports a
    driver, so a driver's edit reruns its stage alone."""
    drivers = {f for name in DVC["stages"] for f in _stage_files(name)}
    modules = [m for package in PACKAGES for m in _package_modules(package)]
    modules += ["components.cli", "components.stage"]
    modules += [".".join(p.relative_to(ROOT).with_suffix("").parts)
                for p in (ROOT / "flows").glob("*.py")]
    crossing = {m: sorted(_imported_project_files(m) & drivers) for m in modules}
    crossing = {m: files for m, files in crossing.items() if files}
    assert not crossing, f"modules importing a stage driver: {crossing}"


@pytest.mark.parametrize("package", ["serving", "flows"])
def test_serving_and_flows_never_import_torch(package):
    """Serving is what a deployment installs and flows orchestrate: neither may pull torch or
    Lightning, directly or through anything they import (function-level imports included)."""
    modules = (_package_modules(package) if package != "flows" else
               [f"flows.{p.stem}" for p in (ROOT / "flows").glob("*.py")])
    heavy = {"torch", "pytorch_lightning", "lightning"}
    for module in modules:
        external: set[str] = set()
        _imported_project_files(module, external)
        assert not external & heavy, f"{module} imports {sorted(external & heavy)}"


@pytest.mark.parametrize("package", ["evaluation", "serving"])
def test_evaluation_and_serving_never_import_reporting(package):
    """Reporting draws and writes what evaluation computes: a plot's style must not rerun
    export (which depends on serving/ and evaluation's cascade) or change what evaluate
    decides."""
    for module in _package_modules(package):
        reporting = sorted(f for f in _imported_project_files(module)
                           if f.startswith("components/reporting/"))
        assert not reporting, f"{module} imports {reporting}"


def test_no_module_is_named_after_a_package(tmp_path):
    """A module named like an installed or optional package (`secrets`, `datasets`,
    `tensorrt`) would shadow it for code run with its folder on sys.path. Looked up in a fresh
    interpreter outside the project (whose own folders would be found there)."""
    import sys
    import tomllib

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    extras = {re.split(r"[<>=\[ ]", dep)[0].replace("-", "_")
              for deps in optional.values() for dep in deps}
    names = {p.stem for p in COMPONENTS.rglob("*.py")} | {
        p.name for p in COMPONENTS.rglob("*") if p.is_dir()}
    names -= {"__init__", "__main__", "__pycache__"}
    probe = ("import importlib.util, sys; "
             "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))")
    found = subprocess.run([sys.executable, "-c", probe, *sorted(names)], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()
    clashes = sorted(set(found) | (names & extras))
    assert not clashes, f"modules named after a package: {clashes}"
