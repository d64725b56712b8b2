"""End to end through real DVC in temporary git repos: the whole graph runs; a clean clone at
another absolute path, with its own DVC cache, reproduces the committed dvc.lock to the hash;
a second repro does nothing but re-pin the data; a byte changed in the data reruns prepare and
nothing more when the prepared data comes out the same; and a distill param change reruns
exactly distill -> export -> evaluate."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_repo, make_examples, sh

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
STAGES = ["source", "prepare", "tokenizer", "teacher", "teacher_cache", "distill", "export",
          "evaluate", "ship"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_teacher) -> Path:
    """The data lives in the repo (git-tracked, read through a relative path) with an `id`
    column prepare does not read; BPE, the tokenizer HF trains deterministically."""
    root = tmp_path_factory.mktemp("first")
    data = root / "raw" / "tiny.csv"
    data.parent.mkdir(parents=True)
    frame = make_examples(per_class=100)
    frame.insert(0, "id", range(len(frame)))
    frame.to_csv(data, index=False)
    repo = make_dvc_repo(root, data, tiny_teacher)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["source"] = "raw/tiny.csv"
    params["tokenizer"].update(type="bpe", vocab_size=300)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "in-repo data, bpe"], repo)
    return repo


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in stage.get("outs", [])}
            for name, stage in lock.items()}


def test_repro_reproduces_in_a_clean_clone_and_reruns_only_what_changed(repo, tmp_path_factory):
    first = sh([*DVC, "repro"], repo)
    assert stages_run(first) == STAGES
    metrics = json.loads((repo / "results/metrics.json").read_text())
    assert set(metrics["systems"]) == {
        "teacher", "teacher_onnx", "teacher_onnx_int8", "teacher_onnx_static_int8", "student",
        "student_onnx", "student_onnx_int8", "student_onnx_static_int8"}
    assert set(lock_outs(repo)) == set(STAGES)
    manifest = json.loads((repo / "data/source.json").read_text())
    assert manifest["source"] == "raw/tiny.csv" and manifest["kind"] == "local"
    assert manifest["files"] == 1 and str(repo) not in json.dumps(manifest)
    shown = sh([*DVC, "metrics", "show", "--json"], repo)
    assert "student_onnx_int8" in shown and "quality.json" in shown
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "run"], repo)

    # A clean clone elsewhere (its own DVC cache, nothing pulled) reruns everything and
    # writes the same dvc.lock: no absolute path, time or host inside any hashed output.
    clone = tmp_path_factory.mktemp("second") / "deeper" / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], clone.parent.parent)
    assert stages_run(sh([*DVC, "repro"], clone)) == STAGES
    diff = subprocess.run(["git", "diff", "--exit-code", "--", "dvc.lock"], cwd=clone,
                          capture_output=True, text=True)
    assert diff.returncode == 0, f"dvc.lock differs in a clean clone:\n{diff.stdout[-3000:]}"
    # ... while its measured timings are its own (kept out of dvc.lock on purpose), and so is
    # its bundle (the run's commit and timings: not a DVC output either).
    assert (clone / "results/metrics.json").is_file()
    assert (clone / "artifacts/bundle/bundle.json").is_file()

    # Nothing changed: the data is re-pinned and the bundle rebuilt (both always), nothing else.
    assert stages_run(sh([*DVC, "repro"], repo)) == ["source", "ship"]

    # One byte of the data file changes, in a column prepare does not read: prepare reruns,
    # its output is the same, so nothing downstream does.
    data = repo / "raw/tiny.csv"
    text = data.read_text()
    data.write_text(text.replace("\n7,", "\n8,", 1))
    before = lock_outs(repo)
    assert stages_run(sh([*DVC, "repro"], repo)) == ["source", "prepare", "ship"]
    after = lock_outs(repo)
    assert after["source"] != before["source"] and after["prepare"] == before["prepare"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["temperature"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(sh([*DVC, "repro"], repo)) == ["source", "distill", "export", "evaluate",
                                                     "ship"]
