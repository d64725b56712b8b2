"""Bad params: wrong types, unknown keys and impossible combinations all come back in ONE
ParamsError (and one `name: error:` line block with exit status 2 from a stage CLI) that names
every offending key."""

from __future__ import annotations

import pytest
import yaml

from components.config import ParamsError, validate
from tests.conftest import ROOT, tiny_raw_params
from tests.reliability.conftest import run_stage_cli


def production() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems(raw: dict) -> str:
    with pytest.raises(ParamsError) as err:
        validate(raw)
    return str(err.value)


def test_wrong_types_are_each_named_with_the_value(tmp_path):
    raw = production()
    raw["teacher"]["epochs"] = "many"
    raw["distill"]["lr"] = [0.1]
    raw["prepare"]["deduplicate"] = "sometimes"
    msg = problems(raw)
    assert msg.startswith("params has 3 problem(s):")
    assert "teacher.epochs: Input should be a valid integer" in msg and "'many'" in msg
    assert "distill.lr: Input should be a valid number" in msg
    assert "prepare.deduplicate: Input should be a valid boolean" in msg


def test_unknown_keys_are_each_named(tmp_path):
    raw = production()
    raw["tokenizer"]["vocab_sise"] = 100
    raw["distill"]["merge"]["ratio"] = 0.5
    raw["evaluation"] = {"warmup": 1}
    msg = problems(raw)
    for key in ("tokenizer.vocab_sise", "distill.merge.ratio", "evaluation"):
        assert f"{key}: unknown key (typo?" in msg


def test_heads_not_dividing_hidden():
    raw = production()
    raw["distill"].update(hidden=256, heads=3)
    assert "distill.heads: hidden (256) must be divisible by heads (3)" in problems(raw)


def test_merge_r_too_large_for_the_sequence():
    raw = production()
    raw["distill"].update(layers=4, max_length=128)
    raw["distill"]["merge"].update(method="tome", r=40)
    msg = problems(raw)
    assert ("distill.merge.r: r=40 over 4 layer(s) needs sequences of 202 tokens, more than "
            "distill.max_length=128") in msg


def test_vocab_smaller_than_the_special_tokens():
    raw = production()
    raw["tokenizer"]["vocab_size"] = 4
    msg = problems(raw)
    assert "tokenizer.vocab_size: must be larger than the 5 special tokens" in msg
    assert "[PAD]" in msg


def test_every_problem_at_once_through_a_stage_cli(tmp_path):
    raw = tiny_raw_params(tmp_path, tmp_path / "d.csv", tmp_path / "t")
    raw["teacher"]["epochs"] = "many"                      # wrong type
    raw["tokenizer"]["vocab_sise"] = 100                   # unknown key
    raw["tokenizer"]["vocab_size"] = 3                     # below the special tokens
    raw["distill"]["heads"] = 3                            # 32 % 3 != 0
    raw["distill"]["merge"].update(method="tome", r=20)    # 20 * 2 + 2 > max_length 32
    proc = run_stage_cli("prepare", raw, tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert err.startswith("prepare: error: params.yaml has 4 problem(s):")
    assert "Traceback" not in err
    for key in ("teacher.epochs", "tokenizer.vocab_sise: unknown key", "tokenizer.vocab_size",
                "distill: 2 inconsistent values", "distill.heads", "distill.merge.r"):
        assert key in err, key
    assert not (tmp_path / "data").exists()  # nothing ran
