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
