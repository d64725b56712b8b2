"""No params value makes DVC delete anything it did not make (issue 27), under real DVC in a
temporary git repo holding the tiny pipeline, run once.

DVC deletes a stage's declared outputs before it runs the stage's command. dvc.yaml therefore
names every output literally and params.yaml has no `paths:`; the `source` stage runs first on
every repro, validates the whole params.yaml (refusing any `paths` entry, and a local input
inside an output folder) and keeps its own output (`persist`). For every output location, a
destructive value is tried both ways a user or a sweep passes params: edited into params.yaml
followed by `dvc repro <its stage>`, and `dvc exp run -S` (`+paths.x=...` adds the key, as
Hydra's override grammar requires; plain `paths.x=...` DVC refuses itself, since params.yaml
has no such key). Each must fail with the one clear line, and every file of the repo (its
outputs, code, data, params, lock) must be there afterwards, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_repo, make_examples, sh
from tests.reliability.conftest import snapshot as folder_snapshot

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
PATHS_LINE = ("  - paths: output locations are fixed in dvc.yaml (data/source.json, data/prepared, "
              "artifacts/<stage>, results), so that no params value decides what DVC deletes "
              "before a stage runs; remove this section")
SOURCE_FAILED = "ERROR: failed to reproduce 'source': failed to run: python -m components.source"

# One destructive value per output location: code, control files, the project and beyond, git-
# tracked data, another stage's output and a folder holding others. The stage is the one whose
# outputs the value would have replaced (`dvc repro <stage>` reproduces it and what it needs).
CASES = {
    "source_version": ("params.yaml", "source"),
    "data": ("components", "prepare"),
    "tokenizer": ("data/prepared", "tokenizer"),
    "teacher": (".git", "teacher"),
    "teacher_outputs": (".dvc", "teacher_cache"),
    "student": ("tests", "distill"),
    "export": (".", "export"),
    "evaluate": ("dvc.yaml", "evaluate"),
    "results": ("..", "evaluate"),
    "bundle": ("raw", "ship"),
    "wandb": ("artifacts", "distill"),
}


def dvc_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "WANDB_MODE": "offline"}


def snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every file of the repo but git's and DVC's own bookkeeping (.git/, the DVC
    cache and temp folder), which a DVC command may touch."""
    return {name: digest for name, digest in folder_snapshot(repo).items()
            if not name.startswith((".git/", ".dvc/cache/", ".dvc/tmp/"))}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_teacher) -> Path:
    """The tiny pipeline with git-tracked data in `raw/` and a (git-tracked) tests/ folder,
    run once through `dvc repro` and committed. One epoch each: what the outputs hold does not
    matter here, only that each exists."""
    root = tmp_path_factory.mktemp("destructive")
    data = root / "raw" / "tiny.csv"
    data.parent.mkdir(parents=True)
    make_examples(per_class=40).to_csv(data, index=False)
    repo = make_dvc_repo(root, data, tiny_teacher)
    (repo / "tests").mkdir()
    (repo / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["source"] = "raw/tiny.csv"
    params["teacher"]["epochs"] = params["distill"]["epochs"] = 1
    params["tokenizer"]["curve_vocab_sizes"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh([*DVC, "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "run"], repo)
    return repo


@pytest.fixture
def pristine(repo):
    """The repo's snapshot before a case; after it, params.yaml back as committed (a failed
    `dvc exp run` leaves its -S edits in the workspace, as DVC does) and every file as before."""
    before = snapshot(repo)
    params = (repo / "params.yaml").read_bytes()
    yield before
    (repo / "params.yaml").write_bytes(params)
    after = snapshot(repo)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed, added or deleted: {changed[:20]}"
    shutil.rmtree(repo / ".dvc" / "tmp" / "exps", ignore_errors=True)


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DVC, *args], cwd=repo, env=dvc_env(), capture_output=True,
                          text=True, timeout=300)
    print(f"$ dvc {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def assert_refused(proc: subprocess.CompletedProcess, line: str) -> None:
    """Failed at the source stage, before any other stage ran, with `line` as the reason."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "source: error: params.yaml has 1 problem(s):\n" + line in out, out
    assert SOURCE_FAILED in out and "Traceback" not in out, out
    ran = [s for s in ("prepare", "tokenizer", "teacher", "teacher_cache", "distill", "export",
                       "evaluate", "ship") if f"Running stage '{s}'" in out]
    assert not ran, f"ran {ran}:\n{out}"


@pytest.mark.parametrize("key", list(CASES))
def test_params_file_naming_an_output_location_deletes_nothing(repo, pristine, key):
    value, stage = CASES[key]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "paths": {key: value}},
                                                     sort_keys=False))
    assert_refused(dvc(repo, "repro", stage), PATHS_LINE)


@pytest.mark.parametrize("key", list(CASES))
def test_exp_run_naming_an_output_location_deletes_nothing(repo, pristine, key):
    value, _ = CASES[key]
    committed = (repo / "params.yaml").read_bytes()
    assert_refused(dvc(repo, "exp", "run", "-S", f"+paths.{key}={value}"), PATHS_LINE)
    (repo / "params.yaml").write_bytes(committed)  # the failed run left its edit, as DVC does


def test_exp_run_without_plus_is_refused_by_dvc_itself(repo, pristine):
    """Without `+`, DVC refuses a key params.yaml does not hold, before running anything."""
    proc = dvc(repo, "exp", "run", "-S", "paths.data=components")
    assert proc.returncode != 0 and "Running stage" not in proc.stdout + proc.stderr
    assert "Could not override 'paths.data'" in proc.stderr, proc.stderr


INPUTS = {
    "prepare.source": ("data/prepared/train.parquet", "data/prepared, the output of stage "
                       "prepare, which DVC deletes before prepare runs"),
    "teacher.model": ("artifacts/teacher", "artifacts/teacher, the output of stage teacher, "
                      "which DVC deletes before teacher runs"),
}


@pytest.mark.parametrize("key", list(INPUTS))
def test_an_input_inside_an_output_deletes_nothing(repo, pristine, key):
    value, inside = INPUTS[key]
    line = f"  - {key}: is inside {inside}: it would be gone before it is read"
    section, field = key.split(".")
    committed = (repo / "params.yaml").read_bytes()
    params = yaml.safe_load(committed)
    params[section][field] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert_refused(dvc(repo, "repro"), line)
    (repo / "params.yaml").write_bytes(committed)
    assert_refused(dvc(repo, "exp", "run", "-S", f"{key}={value}"), line)


def test_the_pipeline_is_still_up_to_date(repo):
    """After every refused run: nothing but the always-changed stages would run."""
    status = dvc(repo, "status").stdout
    changed = [line.strip() for line in status.splitlines()
               if line.strip() and not line.startswith(("\t", " "))]
    assert changed == ["source:", "ship:"], status
