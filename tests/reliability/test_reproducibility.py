"""Rerunning prepare and tokenizer with the same params gives byte-identical output folders
(every file hashed, none excluded: no timestamps, hostnames or random names inside)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from components import prepare
from components.config import validate
from tests.conftest import ROOT, tiny_raw_params
from tests.reliability.conftest import snapshot


def test_prepare_rerun_is_byte_identical(tmp_path, dataset_csv):
    params = validate(tiny_raw_params(tmp_path, dataset_csv, tmp_path / "unused"))
    data = Path(params.paths.data)
    prepare.run(params)
    first = snapshot(data)
    assert set(first) == {"train.parquet", "validation.parquet", "test.parquet",
                          "label_map.json", "report.json", "params.json"}
    prepare.run(params)
    assert snapshot(data) == first


NONDETERMINISTIC = pytest.mark.xfail(strict=False, reason=(
    "Hugging Face `tokenizers`' WordPiece and Unigram trainers break ties in a per-process "
    "order (three runs on the same text gave three vocabularies, even single-threaded); BPE, "
    "the default, is deterministic"))


@pytest.mark.parametrize("kind", ["bpe", pytest.param("wordpiece", marks=NONDETERMINISTIC),
                                  pytest.param("unigram", marks=NONDETERMINISTIC)])
def test_tokenizer_rerun_is_byte_identical(tmp_path, dataset_csv, tiny_teacher, kind):
    """Each training runs in a fresh interpreter: the nondeterminism is per process."""
    import subprocess
    import sys

    sizes = {"tokenizer.type": kind, "tokenizer.vocab_size": 300}
    params = validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher, **sizes))
    tok = Path(params.paths.tokenizer)
    prepare.run(params)
    script = ("import sys; from components import tokenizer; "
              "from components.config import load_params; "
              "tokenizer.run(load_params(sys.argv[1]))")
    params_file = tmp_path / "params.yaml"
    import yaml

    # As DVC runs it: params.yaml in the project folder, outputs at their fixed locations.
    params_file.write_text(yaml.safe_dump(tiny_raw_params(None, dataset_csv, tiny_teacher,
                                                          **sizes)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    snapshots = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script, str(params_file)], check=True,
                       cwd=tmp_path, env=env, capture_output=True)
        snapshots.append(snapshot(tok))
    first, again = snapshots
    assert set(first) == {"tokenizer.json", "metrics.json", "params.json", "curve.json"}
    assert again["params.json"] == first["params.json"]
    assert again == first
