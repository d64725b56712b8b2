"""Rerunning prepare and tokenizer with the same params gives byte-identical output folders
(every file hashed, none excluded: no timestamps, hostnames or random names inside)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import prepare, tokenizer
from components.config import validate
from tests.conftest import tiny_raw_params
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


@pytest.mark.xfail(strict=False, reason=(
    "Hugging Face `tokenizers` trainers break ties through Rust HashMap iteration order, so "
    "the learned vocab (ids and a few merges) can differ between two runs on the same text"))
def test_tokenizer_rerun_is_byte_identical(tmp_path, dataset_csv, tiny_teacher):
    params = validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher))
    tok = Path(params.paths.tokenizer)
    prepare.run(params)
    tokenizer.run(params)
    first = snapshot(tok)
    assert set(first) == {"tokenizer.json", "metrics.json", "params.json"}
    tokenizer.run(params)
    again = snapshot(tok)
    assert again["params.json"] == first["params.json"]  # holds even today
    assert again == first
