"""End to end through real DVC in a temporary git repo: the whole graph runs, a second repro
does nothing, and a distill param change reruns exactly distill -> export -> evaluate."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_repo, sh

pytestmark = pytest.mark.slow


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, dataset_csv, tiny_teacher) -> Path:
    return make_dvc_repo(tmp_path_factory.mktemp("repo"), dataset_csv, tiny_teacher)


def test_repro_runs_every_stage_then_nothing_then_only_what_changed(repo):
    dvc = [sys.executable, "-m", "dvc"]
    first = sh([*dvc, "repro"], repo)
    assert stages_run(first) == ["prepare", "tokenizer", "teacher", "distill", "export", "evaluate"]
    metrics = json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    assert set(metrics["systems"]) == {"teacher", "teacher_onnx", "teacher_onnx_int8", "student",
                                       "student_onnx", "student_onnx_int8"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {
        "prepare",
        "tokenizer",
        "teacher",
        "distill",
        "export",
        "evaluate",
    }
    shown = sh([*dvc, "metrics", "show", "--json"], repo)
    assert "student_onnx_int8" in shown

    second = sh([*dvc, "repro"], repo)
    assert stages_run(second) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["temperature"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh([*dvc, "repro"], repo)
    assert stages_run(third) == ["distill", "export", "evaluate"]
