import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

SYSTEMS = {"teacher", "teacher_onnx", "teacher_onnx_int8", "teacher_onnx_static_int8", "student",
           "student_onnx", "student_onnx_int8", "student_onnx_static_int8"}
KEYS = {"accuracy", "accuracy_ci", "macro_f1", "macro_f1_ci", "latency_p50_ms", "latency_p95_ms",
        "throughput_per_s", "model_throughput_per_s", "tokenize_ms_per_example",
        "model_latency_p50_ms", "throughput_iqr", "size_mb", "parameters", "tokens_per_example"}


def test_metrics_cover_every_system(trained_pipeline):
    params, results = trained_pipeline
    out = Path(params.paths.results)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["systems"]) == SYSTEMS
    for name, m in metrics["systems"].items():
        assert set(m) >= KEYS, name
        assert 0 <= m["accuracy"] <= 1 and m["throughput_per_s"] > 0
        assert m["latency_p95_ms"] >= m["latency_p50_ms"] > 0
        for split in (m, m["validation"]):
            lo, hi = split["accuracy_ci"]
            assert lo <= split["accuracy"] <= hi and split["macro_f1_ci"][0] <= split["macro_f1"]
        assert m["tokenize_ms_per_example"] > 0 and m["timing_rounds"] >= 5
    # ONNX FP32 is the same network as PyTorch: same predictions, for both sides and splits.
    s, o = metrics["systems"]["student"], metrics["systems"]["student_onnx"]
    assert s["accuracy"] == o["accuracy"]
    assert s["validation"]["accuracy"] == o["validation"]["accuracy"]
    t = metrics["systems"]["teacher"]
    assert t["accuracy"] == metrics["systems"]["teacher_onnx"]["accuracy"]
    assert metrics["chosen_on"] == "validation"
    for prefix in ("", "teacher_"):  # both INT8 forms against FP32, per side
        for form in ("int8", "static_int8"):
            assert metrics["ratios"][f"{prefix}{form}_model_throughput_vs_fp32"] > 0
    teachers = {n: r for n, r in metrics["systems"].items() if r["side"] == "teacher"}
    assert "vs_best_teacher" not in teachers[metrics["best_teacher"]]
    for name, m in metrics["systems"].items():
        if name != metrics["best_teacher"]:
            d = m["vs_best_teacher"]
            assert d["accuracy_diff_ci"][0] <= d["accuracy_diff"] <= d["accuracy_diff_ci"][1]
            assert d["within_noise"] == (d["accuracy_diff_ci"][0] <= 0 <= d["accuracy_diff_ci"][1])
            assert 0 <= d["mcnemar_p"] <= 1
    assert metrics["systems"]["teacher"]["parameters"] > s["parameters"]
    assert metrics["ratios"]["student_size_vs_teacher"] < 1
    points = json.loads((out / "plots/systems.json").read_text())
    assert {p["system"] for p in points} == SYSTEMS
    png = (out / "accuracy_vs_throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and env["onnxruntime"] and env["threads"] == 1
    assert (out / "params.json").is_file()


def test_systems_sharing_an_encoder_report_the_same_tokenisation_time(trained_pipeline):
    """Tokenisation is timed per encoder in its own loop, so it cannot depend on which model
    ran before it (ORT's spinning threads made it 1.3-1.5x slower after an ORT call)."""
    _, results = trained_pipeline
    for side in ("teacher", "student"):
        times = {n: r["tokenize_ms_per_example"] for n, r in results["evaluate"]["systems"].items()
                 if r["side"] == side}
        assert len(times) >= 3 and len(set(times.values())) == 1, times


def _results(**systems) -> dict:
    """Evaluated systems with (validation accuracy, its interval's low end, test accuracy,
    end-to-end throughput)."""
    return {name: {"side": "student", "throughput_per_s": speed, "accuracy": test,
                   "validation": {"accuracy": val, "accuracy_ci": [low, min(1.0, val + 0.02)]}}
            for name, (val, low, test, speed) in systems.items()}


def test_the_choice_follows_validation_not_test():
    from components.evaluation.selection import best_of

    # fast is within noise of the best on validation but poor on test: validation decides.
    results = _results(slow=(0.95, 0.92, 0.90, 100.0), fast=(0.93, 0.90, 0.70, 900.0))
    assert best_of(results, "student") == "fast"
    # On validation fast is below the best one's interval: the slow, accurate one wins, however
    # well fast does on test.
    results = _results(slow=(0.95, 0.94, 0.80, 100.0), fast=(0.90, 0.88, 0.99, 900.0))
    assert best_of(results, "student") == "slow"
    assert best_of(results, "teacher") is None


def test_a_system_slowed_on_purpose_loses_the_headline(trained_pipeline):
    """Time two real ONNX Runtime students that predict the same (FP32 and the same graph
    again), one of them made slower by a sleep inside each model call: the timing must see it,
    and the choice must go to the other; then the other way round."""
    from components.config import apply_overrides, validate
    from components.data.artifacts import load_split
    from components.evaluation.selection import best_of
    from components.evaluation.systems import build_systems, predict_split
    from components.evaluation.timing import measure_time

    params, _ = trained_pipeline
    params = validate(apply_overrides(params.to_dict(), {"evaluate.repeats": 5,
                                                         "evaluate.latency_examples": 3}))
    systems = {s.name: s for s in build_systems(params)[0]}
    base = systems["student_onnx"]
    texts = load_split(params.paths, "test")["text"].tolist()[:48]

    def slowed(system, seconds):
        def run(ids, mask):
            time.sleep(seconds)
            return system.run(ids, mask)
        return dataclasses.replace(system, run=run)

    for slow in ("a", "b"):
        twins = [dataclasses.replace(base, name=name, run=base.run) if name != slow
                 else dataclasses.replace(slowed(base, 0.01), name=name) for name in "ab"]
        logits = predict_split(twins, texts, params.evaluate.throughput_batch_size)
        assert np.array_equal(logits["a"], logits["b"])
        timings, _ = measure_time(twins, texts, params, progress=False)
        assert timings[slow]["model_throughput_per_s"] < 0.7 * timings[
            "b" if slow == "a" else "a"]["model_throughput_per_s"]
        results = {name: {"side": "student", **timings[name],
                          "validation": {"accuracy": 0.9, "accuracy_ci": [0.85, 0.95]}}
                   for name in "ab"}
        assert best_of(results, "student") == ("b" if slow == "a" else "a")


def test_the_deployed_path_is_timed_and_predicts_what_evaluate_scored(trained_pipeline):
    """The cascade run through the bundle's Predictor defers exactly the test texts the cost
    model counted (same graphs, same threshold, the bundle's own preprocessing), and its
    measured time sits beside the cost model."""
    params, results = trained_pipeline
    m = results["evaluate"]
    d = m["deployed"]
    assert d["system"] == params.evaluate.cascade.student
    assert d["student"]["throughput_per_s"] > 0 and d["student"]["vs_evaluate_end_to_end"] > 0
    chosen = m["cascade"]["chosen"]
    if chosen is not None:
        assert d["cascade"]["deferred_fraction"] == pytest.approx(chosen["deferred_fraction"])
        assert chosen["measured_ms_per_example"] > 0
        assert chosen["expected_ms_per_example"] > 0


def test_the_dvc_output_holds_no_timing(trained_pipeline):
    """paths.evaluate (in dvc.lock) keeps what predictions decide; the times go to paths.results.
    """
    params, results = trained_pipeline
    out = Path(params.paths.evaluate)
    assert {p.name for p in out.iterdir()} == {"quality.json", "params.json"}
    record = json.loads((out / "quality.json").read_text())
    metrics = results["evaluate"]
    assert set(record["systems"]) == SYSTEMS
    timing_words = ("ms", "throughput", "latency", "tokenize", "timing", "speed", "per_s")
    flat = json.dumps(record)
    assert not [w for w in timing_words if f'_{w}' in flat or f'"{w}' in flat], flat[:500]
    assert set(record["systems"]["student"]) >= {"accuracy", "accuracy_ci", "validation",
                                                  "gflops_per_example", "size_mb"}
    policy = record["cascade"]
    assert policy["teacher"] == params.evaluate.cascade.teacher
    assert policy["chosen"] is None or (
        policy["chosen"]["threshold"] == metrics["cascade"]["chosen"]["threshold"])


def test_wandb_offline_runs_hold_config_and_table(trained_pipeline):
    params, _ = trained_pipeline
    runs = sorted(Path(params.paths.wandb).glob("wandb/offline-run-*"))
    assert len(runs) >= 4  # teacher, distill, evaluate, ship
    evaluate_runs = [r for r in runs if any(r.glob("files/media/table/systems*.table.json"))]
    assert evaluate_runs, "the evaluate run did not log its systems table"
    # Offline runs keep config and history in the run's .wandb record file.
    record = next(evaluate_runs[-1].glob("run-*.wandb")).read_bytes()
    assert b"temperature" in record and b"student_onnx_int8" in record
    tables = {p.name.split("_")[0] for p in evaluate_runs[-1].glob("files/media/table/*.json")}
    assert {"systems", "cascade", "per"} <= tables, tables
    # The report artifact with the inputs' digests for lineage (the model is the ship stage's
    # bundle: tests/test_ship.py).
    for name in (b"report.html", b"inputs_sha256", b"accuracy_ci_low"):
        assert name in record, name


def test_cascade_is_chosen_on_validation_and_reported_on_test(trained_pipeline):
    params, results = trained_pipeline
    m = results["evaluate"]
    out = Path(params.paths.results)
    points = json.loads((out / "plots/cascade.json").read_text())
    systems = m["systems"]
    c = m["cascade"]
    student, teacher = systems[c["student"]], systems[c["teacher"]]
    assert c["teacher"] == params.evaluate.cascade.teacher and c["chosen_on"] == "validation"
    first, last = points[0], points[-1]
    assert first["threshold"] == 0.0 and first["deferred_fraction"] == 0.0
    assert first["accuracy"] == student["accuracy"]
    assert last["threshold"] == 1.0 and last["deferred_fraction"] == 1.0
    assert last["accuracy"] == teacher["accuracy"]
    assert len(points) == params.evaluate.cascade.thresholds
    fractions = [p["deferred_fraction"] for p in points]
    assert fractions == sorted(fractions)  # a higher threshold never defers less
    costs = [p["expected_ms_per_example"] for p in points]
    assert costs == sorted(costs)  # deferring more never costs less
    chosen = c["chosen"]
    if chosen is not None:
        # The choice is made on validation numbers only: the threshold deferring least (so the
        # cheapest) that reaches the target there, whatever test says.
        assert chosen["validation_accuracy"] >= c["target_accuracy"]
        cheaper = [p for p in points
                   if p["expected_ms_per_example"] < chosen["expected_ms_per_example"]]
        assert all(p["validation_accuracy"] < c["target_accuracy"] for p in cheaper)
        lo, hi = chosen["accuracy_ci"]
        assert lo <= chosen["accuracy"] <= hi
        assert "vs_teacher" in chosen


def test_bootstrap_intervals_and_mcnemar():
    from components.evaluation.stats import Bootstrap, mcnemar_exact

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    good = np.where(rng.random(400) < 0.9, labels, (labels + 1) % 3)
    bad = np.where(rng.random(400) < 0.6, labels, (labels + 1) % 3)
    boot = Bootstrap(labels, 3, 1000, seed=1)
    s = boot.scores(good)
    assert s["accuracy_ci"][0] < (good == labels).mean() < s["accuracy_ci"][1]
    assert s["accuracy_ci"][1] - s["accuracy_ci"][0] < 0.08
    # Same seed, same intervals; identical systems differ by exactly nothing.
    assert Bootstrap(labels, 3, 1000, seed=1).scores(good) == s
    same = boot.difference(good, good)
    assert same["accuracy_diff_ci"] == [0.0, 0.0] and same["within_noise"]
    d = boot.difference(bad, good)
    assert d["accuracy_diff_ci"][1] < 0 and not d["within_noise"]
    assert mcnemar_exact(bad, good, labels)["p_value"] < 1e-6
    assert mcnemar_exact(good, good, labels)["p_value"] == 1.0
    from sklearn.metrics import f1_score

    from components.evaluation.stats import macro_f1_from_counts

    counts = np.zeros((3, 3), dtype=int)
    np.add.at(counts, (labels, bad), 1)
    assert macro_f1_from_counts(counts) == pytest.approx(f1_score(labels, bad, average="macro"))


def test_pareto_fronts_hold_no_dominated_system(trained_pipeline):
    params, results = trained_pipeline
    m = results["evaluate"]
    points = [{"system": n, **r} for n, r in m["systems"].items()]
    for axis, maximize in (("throughput_per_s", True), ("size_mb", False)):
        front = m["pareto"][axis]
        assert front, axis
        for name in front:
            p = next(q for q in points if q["system"] == name)
            better = [q for q in points if q is not p
                      and q["accuracy"] >= p["accuracy"]
                      and (q[axis] >= p[axis] if maximize else q[axis] <= p[axis])
                      and (q["accuracy"] > p["accuracy"] or q[axis] != p[axis])]
            assert not better, (axis, name, better)


def test_every_plot_is_a_png_and_the_reports_are_written(trained_pipeline):
    params, results = trained_pipeline
    out = Path(params.paths.results)
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_vs_throughput.png", "cascade.png", "pareto.png",
                                      "confusion.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png.name
    md = (out / "report.md").read_text()
    assert "| student_onnx |" in md and "Cascade" in md and "Pareto" in md
    assert "| teacher_onnx_int8 |" in md and "95% CI" in md and "within noise" in md.lower()
    assert "chosen on the validation split" in md or "on the validation split" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    confusion = json.loads((out / "plots/confusion.json").read_text())
    assert len(confusion) == results["evaluate"]["test_examples"]
    names = set(json.loads((Path(params.paths.data) / "label_map.json").read_text())["labels"])
    assert {c["actual"] for c in confusion} <= names
    best = results["evaluate"]["best_student"]
    assert set(best["per_class"]) == names


def test_a_tracking_failure_is_a_warning_after_the_outputs_are_written(trained_pipeline,
                                                                        tmp_path, monkeypatch,
                                                                        capsys):
    """Fault injection: W&B breaks while logging. The stage still succeeds, its two folders
    are complete, and the user is told where the results are."""
    from components import evaluate
    from components.config import apply_overrides, validate

    params, _ = trained_pipeline
    params = validate(apply_overrides(params.to_dict(), {
        "paths.evaluate": str(tmp_path / "evaluate"), "paths.results": str(tmp_path / "results"),
        "evaluate.bootstrap": 1000, "evaluate.cascade.enabled": False}))

    def broken(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(evaluate, "log_to_wandb", broken)
    metrics = evaluate.run(params)
    assert "W&B logging failed (ConnectionError: api.wandb.ai unreachable)" in (
        capsys.readouterr().out)
    assert json.loads((tmp_path / "results/metrics.json").read_text()) == json.loads(
        json.dumps(metrics))
    assert (tmp_path / "evaluate/quality.json").is_file()


def test_static_int8_off_leaves_it_out_and_evaluate_and_ship_still_work(trained_pipeline,
                                                                         tmp_path):
    """export.static_int8.enabled: false writes no static graphs; evaluate measures the other
    systems and ship bundles the student without one."""
    from components import evaluate, export, ship
    from components.config import apply_overrides, validate
    from components.serving.bundle import load_bundle

    params, _ = trained_pipeline
    params = validate(apply_overrides(params.to_dict(), {
        **{f"paths.{k}": str(tmp_path / k) for k in ("export", "evaluate", "results", "bundle")},
        "export.static_int8.enabled": False, "tracking.mode": "disabled"}))
    metrics = export.run(params)
    assert "static_int8" not in metrics and "static_int8" not in metrics["teacher"]
    assert not list((tmp_path / "export").glob("*static*"))
    systems = evaluate.run(params)["systems"]
    assert set(systems) == SYSTEMS - {"student_onnx_static_int8", "teacher_onnx_static_int8"}
    manifest = ship.run(params)
    assert not [f for f in manifest["files"] if "static" in f]
    assert load_bundle(tmp_path / "bundle").predict(["goal for the team"])[0]["label"]
