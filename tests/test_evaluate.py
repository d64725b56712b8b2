import json
from pathlib import Path

SYSTEMS = {"teacher", "student", "student_onnx", "student_onnx_int8"}
KEYS = {"accuracy", "macro_f1", "latency_p50_ms", "latency_p95_ms", "throughput_per_s",
        "size_mb", "parameters", "tokens_per_example"}


def test_metrics_cover_every_system(trained_pipeline):
    params, results = trained_pipeline
    out = Path(params.paths.evaluate)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["systems"]) == SYSTEMS
    for name, m in metrics["systems"].items():
        assert set(m) >= KEYS, name
        assert 0 <= m["accuracy"] <= 1 and m["throughput_per_s"] > 0
        assert m["latency_p95_ms"] >= m["latency_p50_ms"] > 0
    # ONNX FP32 is the same network as the PyTorch student: same predictions.
    s, o = metrics["systems"]["student"], metrics["systems"]["student_onnx"]
    assert s["accuracy"] == o["accuracy"]
    assert metrics["systems"]["teacher"]["parameters"] > s["parameters"]
    assert metrics["ratios"]["student_size_vs_teacher"] < 1
    points = json.loads((out / "plots/systems.json").read_text())
    assert {p["system"] for p in points} == SYSTEMS
    png = (out / "accuracy_vs_throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and env["onnxruntime"] and env["threads"] == 1
    assert (out / "params.json").is_file()


def test_wandb_offline_runs_hold_config_and_table(trained_pipeline):
    params, _ = trained_pipeline
    runs = sorted(Path(params.paths.wandb).glob("wandb/offline-run-*"))
    assert len(runs) >= 3  # teacher, distill, evaluate
    evaluate_runs = [r for r in runs if any(r.glob("files/media/table/systems*.table.json"))]
    assert evaluate_runs, "the evaluate run did not log its systems table"
    # Offline runs keep config and history in the run's .wandb record file.
    record = next(evaluate_runs[-1].glob("run-*.wandb")).read_bytes()
    assert b"temperature" in record and b"student_onnx_int8" in record
    tables = {p.name.split("_")[0] for p in evaluate_runs[-1].glob("files/media/table/*.json")}
    assert {"systems", "cascade", "per"} <= tables, tables
    # Artifacts: the model files and the report, each with the inputs' digests for lineage.
    for name in (b"pytorch/model.safetensors", b"onnx/model.onnx", b"onnx/model.int8.onnx",
                 b"report.html", b"inputs_sha256"):
        assert name in record, name


def test_cascade_ends_are_the_student_and_the_teacher(trained_pipeline):
    params, results = trained_pipeline
    m = results["evaluate"]
    out = Path(params.paths.evaluate)
    points = json.loads((out / "plots/cascade.json").read_text())
    systems = m["systems"]
    student = systems[params.evaluate.cascade.student]
    first, last = points[0], points[-1]
    assert first["threshold"] == 0.0 and first["deferred_fraction"] == 0.0
    assert first["accuracy"] == student["accuracy"]
    assert first["expected_latency_ms"] == student["latency_p50_ms"]
    assert last["threshold"] == 1.0 and last["deferred_fraction"] == 1.0
    assert last["accuracy"] == systems["teacher"]["accuracy"]
    assert len(points) == params.evaluate.cascade.thresholds
    fractions = [p["deferred_fraction"] for p in points]
    assert fractions == sorted(fractions)  # a higher threshold never defers less
    chosen = m["cascade"]["chosen"]
    if chosen is not None:
        assert chosen["accuracy"] >= m["cascade"]["target_accuracy"]
        cheaper = [p for p in points if p["expected_latency_ms"] < chosen["expected_latency_ms"]]
        assert all(p["accuracy"] < m["cascade"]["target_accuracy"] for p in cheaper)


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
    out = Path(params.paths.evaluate)
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_vs_throughput.png", "cascade.png", "pareto.png",
                                      "confusion.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png.name
    md = (out / "report.md").read_text()
    assert "| student_onnx |" in md and "Cascade" in md and "Pareto" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    confusion = json.loads((out / "plots/confusion.json").read_text())
    assert len(confusion) == results["evaluate"]["test_examples"]
    names = set(json.loads((Path(params.paths.data) / "label_map.json").read_text())["labels"])
    assert {c["actual"] for c in confusion} <= names
    best = results["evaluate"]["best_student"]
    assert set(best["per_class"]) == names
