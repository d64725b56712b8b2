"""params.yaml <-> config classes <-> dvc.yaml agree: every stage's params exist, every command
is a real module with run/main, every output path is a `paths:` key."""

import importlib
import re

import yaml

from components.config import Params, load_params
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


def test_outputs_and_metrics_use_paths_keys():
    used = set()
    for stage in DVC["stages"].values():
        for out in stage.get("outs", []):
            out = out if isinstance(out, str) else next(iter(out))
            m = re.fullmatch(r"\$\{paths\.(\w+)\}", out)
            assert m, f"out {out!r} is not a ${{paths.x}} reference"
            used.add(m.group(1))
    metrics = set()
    for metric in DVC["metrics"]:
        m = re.match(r"\$\{paths\.(\w+)\}/", metric)
        assert m, metric
        metrics.add(m.group(1))
    # `results` holds evaluate's timings: read as metrics/plots, kept out of dvc.lock on purpose
    assert "results" in metrics and "results" not in used
    # `bundle` records its run's commit and timings: rebuilt on every repro, never hashed
    ship = DVC["stages"]["ship"]
    assert ship.get("always_changed") and "outs" not in ship
    assert used == set(PARAMS["paths"]) - {"wandb", "results", "bundle"}


def test_every_stage_section_is_tracked_by_a_stage():
    tracked = {p.split(".")[0] for s in DVC["stages"].values() for p in s["params"]}
    assert tracked >= set(PARAMS) - {"paths", "tracking"}


def _imported_project_files(module: str) -> set[str]:
    """Files of the project that `python -m <module>` can import, transitively (static: every
    `import`/`from ... import` anywhere in a module, function-level imports included)."""
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
    return {f for f in seen if f.split("/")[0] in ("components", "flows")}


def test_code_deps_cover_every_imported_project_file():
    """dvc.yaml's code deps are derived from imports: a stage whose code imports a project file
    it does not depend on would stay 'up to date' after that file changed."""
    for name, stage in DVC["stages"].items():
        module = stage["cmd"].removeprefix("python -m ")
        deps = [d for d in stage["deps"] if not d.startswith("${")]
        missing = sorted(f for f in _imported_project_files(module)
                         if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"stage {name}: add to dvc.yaml deps: {missing}"


def _stage_files(name: str) -> set[str]:
    """The files that belong to stage `name` itself: its module, or its package folder."""
    module = DVC["stages"][name]["cmd"].removeprefix("python -m ")
    path = ROOT.joinpath(*module.split("."))
    if path.is_dir():
        return {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")}
    return {path.with_suffix(".py").relative_to(ROOT).as_posix()}


def test_no_stage_imports_another_stage():
    """Stages meet through components.artifacts (files and readers), components.models and the
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
        declared = [d for d in DVC["stages"][name]["deps"] if not d.startswith("${")]
        recorded = {d["path"]: d for d in stage["deps"]}
        for dep in declared:
            entry = recorded.get(dep)
            if entry is None:
                stale.append(f"{name}: {dep} not in dvc.lock")
            elif (ROOT / dep).is_file() and entry["md5"] != _md5(ROOT / dep):
                stale.append(f"{name}: {dep} changed since dvc.lock was written")
    assert not stale, "rerun the stages (dvc repro) and commit dvc.lock:\n" + "\n".join(stale)
