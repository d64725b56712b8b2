"""benchmarks/scale.py at a few hundred rows: its synthetic data, and the harness end to end
(stages and `still predict` as processes, counts, peak RSS, net rates, verdicts,
results.json)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def read_rows(path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [tuple(r) for r in csv.reader(f)][1:]


def test_synthetic_data_is_seeded_prefix_stable_and_shaped(tmp_path):
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    scale.write_csv(small, 1500)
    scale.write_csv(large, 2500)
    a, b = read_rows(small), read_rows(large)
    assert len(a) == 1500 and len(b) == 2500
    assert b[:1500] == a  # a smaller N is a prefix of a larger one
    words = [len(text.split()) for text, _ in b]
    assert min(words) >= scale.MIN_WORDS and max(words) <= scale.MAX_WORDS
    assert {label for _, label in b} == set(scale.label_names())
    copies = len(b) - len(set(b))
    assert 0.003 * len(b) <= copies <= 0.02 * len(b)
    # a copy never changes the label: prepare would drop the text as conflicting
    assert len({t for t, _ in b}) == len(set(b))


def run_harness(out, *args: str) -> dict:
    # This checkout's code, whatever the installed copy points at (the stages it starts too).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"),
                           "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_harness_measures_light_stages(tmp_path):
    result = run_harness(tmp_path, "--sizes", "240", "160", "--baseline", "80",
                         "--stages", "prepare", "tokenizer")
    rows = result["rows"]
    assert [(r["stage"], r["n"], r["role"]) for r in rows] == [
        ("prepare", 80, "baseline"), ("tokenizer", 80, "baseline"),
        ("prepare", 160, "size"), ("tokenizer", 160, "size"),
        ("prepare", 240, "size"), ("tokenizer", 240, "size")]
    for r in rows:
        assert r["examples_from"] == "stage" and r["wall_s"] > 0
        # the stage's own peak, not the harness's (which holds torch after the teacher build)
        assert 20 < r["peak_rss_mib"] < 400
    assert [r["examples"] for r in rows if r["stage"] == "prepare"] == [80, 160, 240]
    assert set(result["verdicts"]) == {"prepare", "tokenizer"}
    assert not (tmp_path / "160").exists()  # removed without --keep
    assert (tmp_path / "teacher" / "config.json").is_file()


@pytest.mark.slow
def test_harness_measures_predict_with_a_given_bundle(tmp_path, trained_pipeline):
    params, _ = trained_pipeline
    result = run_harness(tmp_path, "--sizes", "240", "160", "--baseline", "80", "--stages",
                         "predict", "--bundle", params.paths.bundle, "--repeats", "1")
    rows = result["rows"]
    assert [(r["stage"], r["n"], r["role"]) for r in rows] == [
        ("predict", 80, "baseline"), ("predict", 160, "size"), ("predict", 240, "size")]
    for r in rows:  # every synthetic row has a text: one prediction each
        assert r["examples"] == r["n"] and r["examples_from"] == "stage"
        assert 20 < r["peak_rss_mib"] < 600
    assert set(result["verdicts"]) == {"predict"}
    assert not (tmp_path / "bundle").exists()  # the given bundle, none built


@pytest.mark.slow
def test_harness_runs_every_stage(tmp_path):
    # Every pipeline stage; predict is measured on a given bundle above (the bundle the
    # harness ships for it takes the tiny pipeline a minute more on 2 cores).
    result = run_harness(tmp_path, "--sizes", "200", "--baseline", "0", "--keep", "--stages",
                         *scale.STAGES)
    by_stage = {r["stage"]: r for r in result["rows"]}
    assert list(by_stage) == list(scale.STAGES)
    assert all(r["examples_from"] == "stage" for r in by_stage.values())
    train = by_stage["tokenizer"]["examples"]
    # one window per training text: teacher_cache runs every split + the windows, distill
    # trains on both
    assert by_stage["distill"]["examples"] == 2 * train
    assert by_stage["teacher_cache"]["examples"] > by_stage["distill"]["examples"]
    assert (tmp_path / "200" / "params.yaml").is_file()
