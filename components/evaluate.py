"""evaluate: every system on the same test split, quality and cost side by side.

Systems: `teacher` (PyTorch), `student` (PyTorch), `student_onnx` (ONNX Runtime FP32),
`student_onnx_int8` (ONNX Runtime dynamic INT8). For each: accuracy, macro-F1, latency p50/p95
at `evaluate.latency_batch_size` (one example at a time by default), throughput at
`evaluate.throughput_batch_size`, file size, parameter count, tokens per example, and analytic
GFLOPs per example (`components/flops.py` says what is counted; token merging included).

How time is measured: end to end from text to logits (tokenise, pad, run), on
`evaluate.num_threads` threads, after `evaluate.warmup` untimed calls; latency is the median
and 95th percentile over `evaluate.latency_examples` single calls; throughput is test examples
divided by the wall time of one full pass in batches. Machine and library versions are written
to `environment.json` beside the numbers.

Produces in `paths.evaluate`: `metrics.json` (DVC metrics), `plots/systems.json` (DVC plot:
accuracy vs throughput), `accuracy_vs_throughput.png`, `environment.json`, `params.json`;
logs the same table and numbers to W&B.

Run: `python -m components.evaluate` (or `dvc repro evaluate`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from components import cascade, report, tracking
from components import tensorrt as trt_engines
from components.common import StageError, atomic_dir, file_size, stage_main, write_json
from components.config import Params
from components.distill import student as student_io
from components.export import FP32_FILE, INT8_FILE, session
from components.flops import encoder_flops
from components.prepare import load_label_names, load_split
from components.textdata import encode, pad_batch, pad_id
from components.tokenizer import TOKENIZER_FILE

PLOT_FILE = "plots/systems.json"
CASCADE_FILE = "plots/cascade.json"
CONFUSION_FILE = "plots/confusion.json"
PNG_FILE = "accuracy_vs_throughput.png"


@dataclass
class System:
    name: str
    runtime: str
    run: Callable[[torch.Tensor, torch.Tensor], np.ndarray]  # padded ids, mask -> logits
    tokenizer: object  # tokenizers.Tokenizer
    max_length: int
    size_bytes: int
    parameters: int
    flops: Callable[[float], float]  # real tokens per example -> FLOPs per example
    min_length: int = 1  # a token-merging student needs at least this many positions

    def logits(self, texts: list[str]) -> np.ndarray:
        ids = encode(self.tokenizer, texts, self.max_length)
        return self.run(*pad_batch(ids, pad_id(self.tokenizer), self.min_length))


def _torch_runner(model: torch.nn.Module):
    model.eval()

    def run(input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids, mask).float().numpy()

    return run


def _onnx_runner(sess):
    def run(input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": input_ids.numpy(),
                                     "attention_mask": mask.numpy()})[0]

    return run


def build_systems(params: Params) -> tuple[list[System], str | None]:
    """Every system to measure, and why TensorRT engines are not among them (None if they are)."""
    from tokenizers import Tokenizer

    from components.teacher import load_trained

    teacher, teacher_tok = load_trained(params)
    teacher_dir = Path(params.paths.teacher)
    student_dir, export_dir = Path(params.paths.student), Path(params.paths.export)
    student = student_io.load(student_dir)
    student_tok = Tokenizer.from_file(str(student_dir / TOKENIZER_FILE))
    n_student = sum(p.numel() for p in student.parameters())
    s_len = params.distill.max_length
    threads = params.evaluate.num_threads
    tc, sc = teacher.hf.config, student.cfg

    def teacher_flops(n: float) -> float:
        return encoder_flops(n, tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size,
                             tc.num_labels)

    def student_flops(n: float) -> float:
        merge = {layer: sc.merge_r for layer in sc.merging_layers()}
        return encoder_flops(n, sc.layers, sc.hidden, sc.intermediate, sc.num_labels, merge)

    student_args = (student_tok, s_len)
    systems = [
        System("teacher", "pytorch", _torch_runner(teacher), teacher_tok.backend_tokenizer,
               params.teacher.max_length, file_size(teacher_dir / "model.safetensors"),
               sum(p.numel() for p in teacher.parameters()), teacher_flops),
        System("student", "pytorch", _torch_runner(student), *student_args,
               file_size(student_dir / student_io.WEIGHTS_FILE), n_student, student_flops,
               sc.min_tokens()),
        System("student_onnx", "onnxruntime",
               _onnx_runner(session(export_dir / FP32_FILE, threads)), *student_args,
               file_size(export_dir / FP32_FILE), n_student, student_flops, sc.min_tokens()),
    ]
    if (export_dir / INT8_FILE).is_file():
        systems.append(System(
            "student_onnx_int8", "onnxruntime",
            _onnx_runner(session(export_dir / INT8_FILE, threads)), *student_args,
            file_size(export_dir / INT8_FILE), n_student, student_flops, sc.min_tokens()))
    trt_systems, trt_skip = trt_engines.evaluate_systems(
        params, export_dir, student_tok, s_len, n_student, flops=student_flops,
        min_length=sc.min_tokens())
    return systems + trt_systems, trt_skip


def measure(system: System, texts: list[str], labels: np.ndarray, params: Params) -> dict:
    cfg = params.evaluate
    bs = cfg.throughput_batch_size
    chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
    for chunk in chunks[: max(1, cfg.warmup // 4)]:
        system.logits(chunk)
    passes = []
    for _ in range(cfg.repeats):  # several full passes; the median is reported
        start = time.perf_counter()
        logits = np.concatenate([system.logits(c) for c in chunks])
        passes.append(time.perf_counter() - start)
    elapsed = float(np.median(passes))
    preds = logits.argmax(-1)

    lb = cfg.latency_batch_size
    sample = texts[: cfg.latency_examples * lb]
    for i in range(cfg.warmup):
        system.logits(sample[(i * lb) % len(sample) :][:lb])
    times = []
    for i in range(0, len(sample), lb):
        t0 = time.perf_counter()
        system.logits(sample[i : i + lb])
        times.append((time.perf_counter() - t0) * 1000)

    ids = encode(system.tokenizer, texts, system.max_length)
    tokens = float(np.mean([len(x) for x in ids]))
    return {
        "runtime": system.runtime,
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro")),
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p95_ms": float(np.percentile(times, 95)),
        "throughput_per_s": len(texts) / elapsed,
        "size_mb": system.size_bytes / 1e6,
        "parameters": system.parameters,
        "tokens_per_example": tokens,
        "gflops_per_example": float(np.mean([system.flops(len(x)) for x in ids])) / 1e9,
        "logits": logits,
    }


def environment(params: Params) -> dict:
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": params.evaluate.num_threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }


def ratios(systems: dict[str, dict]) -> dict[str, float]:
    t, s = systems["teacher"], systems["student"]
    out = {
        "student_accuracy_minus_teacher": s["accuracy"] - t["accuracy"],
        "student_throughput_vs_teacher": s["throughput_per_s"] / t["throughput_per_s"],
        "student_onnx_throughput_vs_teacher":
            systems["student_onnx"]["throughput_per_s"] / t["throughput_per_s"],
        "student_size_vs_teacher": s["size_mb"] / t["size_mb"],
        "student_tokens_vs_teacher": s["tokens_per_example"] / t["tokens_per_example"],
        "student_flops_vs_teacher": s["gflops_per_example"] / t["gflops_per_example"],
    }
    if "student_onnx_int8" in systems:
        q, f = systems["student_onnx_int8"], systems["student_onnx"]
        out["int8_throughput_vs_fp32"] = q["throughput_per_s"] / f["throughput_per_s"]
        out["int8_accuracy_minus_fp32"] = q["accuracy"] - f["accuracy"]
    for name, r in systems.items():
        if r["runtime"] == "tensorrt":
            out[f"{name}_throughput_vs_onnx_fp32"] = (
                r["throughput_per_s"] / systems["student_onnx"]["throughput_per_s"])
    return out


def plot(points: list[dict], path: Path) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        ax.scatter(p["throughput_per_s"], p["accuracy"], s=40 + 4 * p["size_mb"])
        ax.annotate(p["system"], (p["throughput_per_s"], p["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("throughput (examples/s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs throughput (marker area ~ model size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cascade(params: Params, results: dict[str, dict], labels: np.ndarray) -> dict | None:
    """The student-then-teacher cascade over thresholds (see components/cascade.py)."""
    cfg = params.evaluate.cascade
    if not cfg.enabled:
        return None
    if cfg.student not in results:
        raise StageError(f"evaluate.cascade.student {cfg.student!r} is not an evaluated system "
                         f"(evaluated: {', '.join(results)})")
    s, t = results[cfg.student], results["teacher"]
    target = (cfg.target_accuracy if cfg.target_accuracy is not None
              else t["accuracy"] - cfg.tolerance)
    points = cascade.curve(s["logits"], t["logits"], labels, s["latency_p50_ms"],
                           t["latency_p50_ms"], cfg.confidence,
                           np.linspace(0.0, 1.0, cfg.thresholds).tolist())
    return {"student": cfg.student, "confidence": cfg.confidence, "target_accuracy": target,
            "chosen": cascade.choose(points, target), "points": points}


def best_student(results: dict[str, dict]) -> str:
    students = [n for n in results if n != "teacher"]
    return max(students, key=lambda n: (results[n]["accuracy"], results[n]["throughput_per_s"]))


def run(params: Params) -> dict:
    torch.set_num_threads(params.evaluate.num_threads)
    test = load_split(params, "test")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    names = load_label_names(params)
    results = {}
    systems, trt_skip = build_systems(params)
    if trt_skip:
        print(f"evaluate: TensorRT engines not evaluated: {trt_skip}")
    for system in tqdm(systems, desc="evaluate", unit="system"):
        results[system.name] = measure(system, texts, labels, params)
        r = results[system.name]
        tqdm.write(f"evaluate: {system.name:<18} acc {r['accuracy']:.4f} f1 {r['macro_f1']:.4f} "
                   f"p50 {r['latency_p50_ms']:.2f} ms  {r['throughput_per_s']:.1f} ex/s  "
                   f"{r['size_mb']:.1f} MB")
    casc = run_cascade(params, results, labels)
    best = best_student(results)
    best_preds = results[best]["logits"].argmax(-1)
    for r in results.values():
        r.pop("logits")  # arrays: used above, not metrics
    metrics = {"test_examples": len(texts), "systems": results, "ratios": ratios(results),
               "tensorrt": trt_skip or "evaluated"}
    points = [{"system": name, **{k: v for k, v in r.items() if k != "runtime"}}
              for name, r in results.items()]
    extra = []
    if casc:
        chosen = casc["chosen"]
        metrics["cascade"] = {k: v for k, v in casc.items() if k != "points"}
        if chosen:
            metrics["ratios"]["cascade_speedup_vs_teacher"] = chosen["speedup_vs_teacher"]
            extra.append({"system": f"cascade@{chosen['threshold']:.2f}",
                          "accuracy": chosen["accuracy"],
                          "latency_p50_ms": chosen["expected_latency_ms"]})
        print(f"evaluate: cascade ({casc['student']} -> teacher, {casc['confidence']}) "
              + (f"threshold {chosen['threshold']:.2f}: acc {chosen['accuracy']:.4f}, "
                 f"{100 * chosen['deferred_fraction']:.1f}% deferred, "
                 f"{chosen['speedup_vs_teacher']:.2f}x faster than the teacher"
                 if chosen else f"reaches no threshold for target {casc['target_accuracy']:.4f}"))

    with atomic_dir(params.paths.evaluate, params) as out:
        (out / "plots").mkdir()
        write_json(out / PLOT_FILE, points)
        plot(points, out / PNG_FILE)
        metrics["pareto"] = report.plot_pareto(points, out / report.PARETO_PNG, extra)
        cm = report.confusion(labels, best_preds, names, f"{best} on the test split",
                              out / report.CONFUSION_PNG)
        metrics["best_student"] = {"system": best, "per_class": cm["per_class"]}
        write_json(out / CONFUSION_FILE, [{"actual": names[a], "predicted": names[b]}
                                          for a, b in zip(labels, best_preds, strict=True)])
        images = [out / PNG_FILE, out / report.PARETO_PNG, out / report.CONFUSION_PNG]
        if casc:
            write_json(out / CASCADE_FILE, casc["points"])
            cascade.plot(casc["points"], casc["chosen"], casc["target_accuracy"],
                         results[casc["student"]]["latency_p50_ms"],
                         results["teacher"]["latency_p50_ms"], results["teacher"]["accuracy"],
                         out / report.CASCADE_PNG)
            images.insert(1, out / report.CASCADE_PNG)
        write_json(out / "metrics.json", metrics)
        md = report.markdown(metrics)
        (out / report.REPORT_MD).write_text(md)
        report.html_report(md, images, out / report.REPORT_HTML)
        write_json(out / "environment.json", environment(params))
        log_to_wandb(params, metrics, points, casc, out, images)
    return metrics


def log_to_wandb(params: Params, metrics: dict, points: list[dict], casc: dict | None,
                 out: Path, images: list[Path]) -> None:
    """Tables, charts, summary numbers, the report files and the model files (as artifacts)."""
    import wandb

    run = tracking.start_run(params, "evaluate")
    columns = list(points[0])
    logged = {
        "systems": wandb.Table(columns=columns, data=[[p.get(c) for c in columns]
                                                      for p in points]),
        **{image.stem: wandb.Image(str(image)) for image in images},
    }
    per_class = metrics["best_student"]["per_class"]
    logged["per_class_f1"] = wandb.Table(
        columns=["class", "precision", "recall", "f1", "support"],
        data=[[k, v["precision"], v["recall"], v["f1"], v["support"]]
              for k, v in per_class.items()])
    if casc:
        cols = list(casc["points"][0])
        table = wandb.Table(columns=cols, data=[[p[c] for c in cols] for p in casc["points"]])
        logged["cascade"] = table
        logged["cascade_accuracy_vs_cost"] = wandb.plot.line(
            table, "expected_latency_ms", "accuracy", title="Cascade: accuracy vs expected ms")
    run.log(logged)
    run.summary.update({f"{name}/{k}": v for name, r in metrics["systems"].items()
                        for k, v in r.items() if isinstance(v, int | float)})
    run.summary.update({f"ratios/{k}": v for k, v in metrics["ratios"].items()})
    if metrics.get("cascade", {}).get("chosen"):
        run.summary.update({f"cascade/{k}": v for k, v in metrics["cascade"]["chosen"].items()})
    _log_artifacts(run, params, out, metrics)
    run.finish()


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _log_artifacts(run, params: Params, out: Path, metrics: dict) -> None:
    """Model files and report files as W&B artifacts, with lineage to the data and tokenizer.

    Online, the data and tokenizer folders are `use_artifact` inputs of this run (W&B draws the
    graph). W&B refuses `use_artifact` offline, so there the inputs' content digests go into
    the output artifacts' metadata instead (the same folders give the same digests)."""
    import wandb

    inputs = {}
    for name, kind, folder in (("dataset", "dataset", params.paths.data),
                               ("tokenizer", "tokenizer", params.paths.tokenizer)):
        inputs[name] = _digest(Path(folder))
        if tracking.wandb_mode(params) == "online":
            art = wandb.Artifact(name, type=kind, metadata={"sha256": inputs[name]})
            art.add_dir(str(folder))
            run.use_artifact(art)
    best = metrics["best_student"]["system"]
    model = wandb.Artifact("student", type="model", metadata={
        "inputs_sha256": inputs, "best_system": best,
        "accuracy": {n: r["accuracy"] for n, r in metrics["systems"].items()}})
    student_dir, export_dir = Path(params.paths.student), Path(params.paths.export)
    for f in (student_io.WEIGHTS_FILE, "config.json", TOKENIZER_FILE):
        if (student_dir / f).is_file():
            model.add_file(str(student_dir / f), name=f"pytorch/{f}")
    for f in sorted(export_dir.glob("*.onnx")):
        model.add_file(str(f), name=f"onnx/{f.name}")
    run.log_artifact(model, aliases=["latest", best])
    evaluation = wandb.Artifact("evaluation", type="report",
                                metadata={"inputs_sha256": inputs,
                                          "tensorrt": metrics.get("tensorrt")})
    evaluation.add_dir(str(out))
    run.log_artifact(evaluation)


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
