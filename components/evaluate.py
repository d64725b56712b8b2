"""evaluate: every system on the same test split, quality and cost side by side, with intervals.

Systems: the teacher as a user would deploy it without distilling (`teacher` PyTorch eager,
`teacher_onnx` ONNX Runtime FP32, `teacher_onnx_int8` ONNX Runtime dynamic INT8,
`teacher_onnx_static_int8` static INT8) and every student artifact (`student` PyTorch,
`student_onnx`, `student_onnx_int8`, `student_onnx_static_int8`, TensorRT engines where they
run); an INT8 graph the export stage did not write is left out. For each: accuracy and
macro-F1 with seeded bootstrap 95% intervals, the paired bootstrap interval of its accuracy
difference from the best teacher runtime (and McNemar's exact test for students), time, size,
parameters, tokens and analytic GFLOPs per example.

How time is measured (`components/runtimes.py` holds the runners):
- threads are pinned for both runtimes (intra-op `evaluate.num_threads`, inter-op 1), and every
  tokenizer is configured once when its system is built: nothing is rebuilt inside a timed call;
- each call is timed in two parts, tokenisation + padding and the model (padded tensors in,
  logits out); *model time* is the second, *end-to-end time* (text in, logits out) their sum,
  and tokenisation cost is reported on its own;
- throughput: full passes over the test split in batches of `evaluate.throughput_batch_size`;
  latency: `evaluate.latency_examples` calls of `evaluate.latency_batch_size` (p50/p95);
- `evaluate.warmup` untimed calls first, then `evaluate.repeats` rounds, the systems
  round-robin within each round so machine noise hits all of them alike; medians over rounds
  are reported with their interquartile range (IQR).

Decisions: the *best teacher runtime* is the fastest teacher system (end-to-end throughput)
whose accuracy lies within the 95% interval of the most accurate teacher system; the headline
student is chosen the same way among students. Every headline ratio is against the best teacher
runtime, with PyTorch eager as a second column. The cascade (student first, the teacher system
named in `evaluate.cascade` for the inputs it is unsure of) picks its threshold on the
*validation* split and is reported once on test, costed at the measured end-to-end time per
example at the deployment batch size (`evaluate.throughput_batch_size`).

Produces two folders, because timings differ from machine to machine and run to run while
everything else is a function of the inputs:
- `paths.evaluate` (a DVC output, what a downstream stage may depend on): `quality.json`, every
  system's accuracy, macro-F1, intervals, size, parameters, tokens and GFLOPs per example, and
  the cascade policy (student, teacher, threshold chosen on validation, its test accuracy);
  `params.json`. Byte-identical on any machine that computes the same predictions.
- `paths.results` (git-tracked, declared as DVC metrics/plots but not as an output, so it is
  not in dvc.lock): `metrics.json` (all of the above plus the measured times, the best teacher
  runtime and headline student, ratios, cascade costs, Pareto fronts, per-class F1),
  `plots/*.json`, `report.md` + `report.html`, PNGs, `environment.json`, `params.json`.
Both are logged to W&B after they are written; a W&B failure is a warning, not a lost run.

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
from components.artifacts import (
    QUALITY_FILE,
    RESULTS_FILE,
    STUDENT_FP32,
    STUDENT_INT8,
    STUDENT_STATIC_INT8,
    STUDENT_TOKENIZER,
    TEACHER_FP32,
    TEACHER_INT8,
    TEACHER_STATIC_INT8,
    TEACHER_TOKENIZER,
    load_label_names,
    load_split,
)
from components.common import StageError, atomic_dir, file_size, read_json, stage_main, write_json
from components.config import Params
from components.flops import encoder_flops
from components.models import student as student_io
from components.models.teacher import load_saved
from components.runtimes import (
    Runner,
    TextEncoder,
    onnx_runner,
    ort_session,
    pin_torch_threads,
    torch_runner,
)
from components.stats import Bootstrap, timing_summary, versus
from components.trt import engines, graphs

PLOT_FILE = "plots/systems.json"
CASCADE_FILE = "plots/cascade.json"
CONFUSION_FILE = "plots/confusion.json"
PNG_FILE = "accuracy_vs_throughput.png"


@dataclass
class System:
    name: str
    runtime: str
    side: str  # "teacher" | "student"
    run: Runner  # padded ids, mask -> logits
    encoder: TextEncoder  # tokenizer configured once
    size_bytes: int
    parameters: int
    flops: Callable[[float], float]  # real tokens per example -> FLOPs per example

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.run(*self.encoder(texts))


def evaluate_runners(params: Params, export_dir: str | Path) -> tuple[list, str | None]:
    """`(name, runner, size_bytes)` for each engine the export stage built
    (`student_trt_<precision>`; a runner takes torch CPU tensors like every other runner), or
    `([], reason)` when there are none to run here."""
    export_dir = Path(export_dir)
    try:
        entry = read_json(export_dir / "metrics.json").get("tensorrt")
    except StageError as err:
        return [], str(err)
    if entry is None:
        return [], ("export metrics have no 'tensorrt' entry (made before TensorRT support): "
                    "rerun dvc repro -f export")
    status = entry.get("status", "unknown")
    if status != "built":
        return [], status
    ok, reason = engines.availability()
    if not ok:
        return [], f"skipped (engines exist but cannot run here: {reason})"
    runners = []
    for precision in graphs.PRECISIONS:
        if entry.get(precision, {}).get("status") != "built":
            continue
        path = export_dir / graphs.ENGINE_DIR / f"{precision}.engine"
        try:
            engine = engines.TensorRTRunner(path)
        except StageError as err:
            return [], f"skipped ({err})"
        runners.append((f"student_trt_{precision}", _torch_inputs(engine), file_size(path)))
    return runners, None if runners else "no TensorRT engine marked built in export metrics"


def _torch_inputs(runner: engines.TensorRTRunner) -> Runner:
    def run(input_ids, mask) -> np.ndarray:  # torch CPU tensors, as from TextEncoder
        return runner(input_ids.numpy(), mask.numpy())

    return run


def build_systems(params: Params) -> tuple[list[System], str | None]:
    """Every system to measure, and why TensorRT engines are not among them (None if they are)."""
    from tokenizers import Tokenizer

    teacher, teacher_tok = load_saved(params.paths.teacher)
    teacher_dir = Path(params.paths.teacher)
    student_dir, export_dir = Path(params.paths.student), Path(params.paths.export)
    student = student_io.load(student_dir)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    threads = params.evaluate.num_threads
    tc, sc = teacher.hf.config, student.cfg

    def teacher_flops(n: float) -> float:
        return encoder_flops(n, tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size,
                             tc.num_labels)

    def student_flops(n: float) -> float:
        merge = {layer: sc.merge_r for layer in sc.merging_layers()}
        return encoder_flops(n, sc.layers, sc.hidden, sc.intermediate, sc.num_labels, merge)

    t_enc = TextEncoder(teacher_tok.backend_tokenizer, params.teacher.max_length)
    s_enc = TextEncoder(Tokenizer.from_file(str(student_dir / STUDENT_TOKENIZER)),
                        params.distill.max_length, sc.min_tokens())
    if (export_dir / TEACHER_TOKENIZER).is_file():
        exported = Tokenizer.from_file(str(export_dir / TEACHER_TOKENIZER))
        if exported.to_str() != teacher_tok.backend_tokenizer.to_str():
            raise StageError(f"{export_dir / TEACHER_TOKENIZER} is not the tokenizer of the "
                             f"teacher in {teacher_dir}: rerun dvc repro export")
    sides = {"teacher": (t_enc, n_teacher, teacher_flops),
             "student": (s_enc, n_student, student_flops)}

    def onnx_systems(side: str, files: tuple[tuple[str, str], ...]) -> list[System]:
        enc, n, flops = sides[side]
        return [System(name, "onnxruntime", side,
                       onnx_runner(ort_session(export_dir / file, threads)), enc,
                       file_size(export_dir / file), n, flops)
                for name, file in files if (export_dir / file).is_file()]

    systems = [
        System("teacher", "pytorch", "teacher", torch_runner(teacher), t_enc,
               file_size(teacher_dir / "model.safetensors"), n_teacher, teacher_flops),
        *onnx_systems("teacher", (("teacher_onnx", TEACHER_FP32),
                                  ("teacher_onnx_int8", TEACHER_INT8),
                                  ("teacher_onnx_static_int8", TEACHER_STATIC_INT8))),
        System("student", "pytorch", "student", torch_runner(student), s_enc,
               file_size(student_dir / student_io.WEIGHTS_FILE), n_student, student_flops),
        *onnx_systems("student", (("student_onnx", STUDENT_FP32),
                                  ("student_onnx_int8", STUDENT_INT8),
                                  ("student_onnx_static_int8", STUDENT_STATIC_INT8))),
    ]
    runners, trt_skip = evaluate_runners(params, export_dir)
    for name, runner, size in runners:
        systems.append(System(name, "tensorrt", "student", runner, s_enc, size, n_student,
                              student_flops))
    return systems, trt_skip


# ------------------------------------------------------------------------------------ timing

def _timed_call(system: System, texts: list[str]) -> tuple[np.ndarray, float, float]:
    """Logits, tokenisation (+ padding) seconds, model seconds for one call."""
    t0 = time.perf_counter()
    batch = system.encoder(texts)
    t1 = time.perf_counter()
    logits = system.run(*batch)
    t2 = time.perf_counter()
    return logits, t1 - t0, t2 - t1


def measure_time(systems: list[System], texts: list[str], params: Params,
                 progress: bool = True) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Throughput and latency of every system, model and end to end, round-robin over
    `evaluate.repeats` rounds (see the module docstring). Returns timings and test logits."""
    cfg = params.evaluate
    n = len(texts)
    bs, lb = cfg.throughput_batch_size, cfg.latency_batch_size
    chunks = [texts[i : i + bs] for i in range(0, n, bs)]
    sample = texts[: cfg.latency_examples * lb]
    calls = [sample[i : i + lb] for i in range(0, len(sample), lb)]
    for system in systems:  # warm-up: lazy allocations, ORT's first-run graph work, caches
        for i in range(max(1, cfg.warmup)):
            system.logits(calls[i % len(calls)])
        system.logits(chunks[0])
    rounds = {s.name: {"model": [], "e2e": [], "tok": [], "p50": [], "p95": [], "model_p50": [],
                       "model_p95": [], "tok_p50": []} for s in systems}
    logits: dict[str, np.ndarray] = {}
    bar = tqdm(total=cfg.repeats * len(systems), desc="evaluate: timing", unit="pass",
               disable=not progress)
    for _ in range(cfg.repeats):
        for system in systems:
            r = rounds[system.name]
            outs, tok_s, model_s = [], 0.0, 0.0
            for chunk in chunks:
                out, t, m = _timed_call(system, chunk)
                outs.append(out)
                tok_s += t
                model_s += m
            logits[system.name] = np.concatenate(outs)
            r["model"].append(n / model_s)
            r["e2e"].append(n / (model_s + tok_s))
            r["tok"].append(1000 * tok_s / n)
            lat = np.array([_timed_call(system, c)[1:] for c in calls]) * 1000  # [calls, 2]
            e2e, model = lat.sum(1), lat[:, 1]
            r["p50"].append(np.percentile(e2e, 50))
            r["p95"].append(np.percentile(e2e, 95))
            r["model_p50"].append(np.percentile(model, 50))
            r["model_p95"].append(np.percentile(model, 95))
            r["tok_p50"].append(np.percentile(lat[:, 0], 50))
            bar.update()
    bar.close()
    out = {}
    for name, r in rounds.items():
        s = {k: timing_summary(v) for k, v in r.items()}
        out[name] = {
            "throughput_per_s": s["e2e"]["median"],  # end to end: what a caller gets
            "throughput_iqr": s["e2e"]["iqr"],
            "model_throughput_per_s": s["model"]["median"],
            "model_throughput_iqr": s["model"]["iqr"],
            "tokenize_ms_per_example": s["tok"]["median"],
            "ms_per_example": 1000.0 / s["e2e"]["median"],
            "latency_p50_ms": s["p50"]["median"],
            "latency_p50_iqr_ms": s["p50"]["iqr"],
            "latency_p95_ms": s["p95"]["median"],
            "model_latency_p50_ms": s["model_p50"]["median"],
            "model_latency_p95_ms": s["model_p95"]["median"],
            "tokenize_latency_p50_ms": s["tok_p50"]["median"],
            "timing_rounds": cfg.repeats,
        }
    return out, logits


# ----------------------------------------------------------------------------------- quality

def quality(system: System, logits: np.ndarray, texts: list[str], labels: np.ndarray,
            boot: Bootstrap) -> dict:
    preds = logits.argmax(-1)
    ids = system.encoder.ids(texts)
    return {
        "runtime": system.runtime,
        "side": system.side,
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro")),
        **boot.scores(preds),
        "size_mb": system.size_bytes / 1e6,
        "parameters": system.parameters,
        "tokens_per_example": float(np.mean([len(x) for x in ids])),
        "gflops_per_example": float(np.mean([system.flops(len(x)) for x in ids])) / 1e9,
    }


def best_of(results: dict[str, dict], side: str) -> str | None:
    """The fastest system of `side` (end-to-end throughput) whose accuracy is within the 95%
    interval of that side's most accurate system: a faster runtime that is not measurably
    worse is the one a user deploys."""
    names = [n for n, r in results.items() if r["side"] == side]
    if not names:
        return None
    top = max(names, key=lambda n: (results[n]["accuracy"], results[n]["throughput_per_s"]))
    low = results[top]["accuracy_ci"][0]
    ok = [n for n in names if results[n]["accuracy"] >= low]
    return max(ok, key=lambda n: results[n]["throughput_per_s"])


def ratios(results: dict[str, dict], reference: str) -> dict[str, float]:
    """Speed ratios of every student against the best teacher runtime and PyTorch eager, and
    size/tokens/FLOPs ratios of the student network against the teacher network."""
    ref, eager = results[reference], results["teacher"]
    out: dict[str, float] = {}
    for name, r in results.items():
        if r["side"] != "student":
            continue
        out[f"{name}_throughput_vs_best_teacher"] = r["throughput_per_s"] / ref["throughput_per_s"]
        out[f"{name}_model_throughput_vs_best_teacher"] = (
            r["model_throughput_per_s"] / ref["model_throughput_per_s"])
        out[f"{name}_throughput_vs_teacher_pytorch"] = (
            r["throughput_per_s"] / eager["throughput_per_s"])
    s = results["student"]
    out["student_size_vs_teacher"] = s["size_mb"] / eager["size_mb"]
    out["student_tokens_vs_teacher"] = s["tokens_per_example"] / eager["tokens_per_example"]
    out["student_flops_vs_teacher"] = s["gflops_per_example"] / eager["gflops_per_example"]
    for side in ("student", "teacher"):
        prefix = "" if side == "student" else "teacher_"
        for form in ("int8", "static_int8"):
            fp32, int8 = f"{side}_onnx", f"{side}_onnx_{form}"
            if fp32 in results and int8 in results:
                q, f = results[int8], results[fp32]
                out[f"{prefix}{form}_throughput_vs_fp32"] = (
                    q["throughput_per_s"] / f["throughput_per_s"])
                out[f"{prefix}{form}_model_throughput_vs_fp32"] = (
                    q["model_throughput_per_s"] / f["model_throughput_per_s"])
                out[f"{prefix}{form}_accuracy_minus_fp32"] = q["accuracy"] - f["accuracy"]
    return out


def environment(params: Params) -> dict:
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": params.evaluate.num_threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }


def plot(points: list[dict], path: Path) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        ax.errorbar(p["throughput_per_s"], p["accuracy"], yerr=report.ci_yerr(p), fmt="o",
                    capsize=3,
                    color="tab:red" if p.get("side") == "teacher" else "tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end throughput (examples/s, log scale)")
    ax.set_ylabel("test accuracy (95% bootstrap interval)")
    ax.set_title("Accuracy vs throughput (red: teacher runtimes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    report.place_labels(ax, [report.label_point(p, "throughput_per_s") for p in points], 9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- cascade

def run_cascade(params: Params, systems: dict[str, System], test_logits: dict[str, np.ndarray],
                labels: np.ndarray, boot: Bootstrap) -> dict | None:
    """Student first, the teacher system of `evaluate.cascade` below the confidence threshold;
    the threshold is chosen on the validation split and reported once on test. Predictions
    only: the result is the same on every machine (costs are added by `cost_cascade`)."""
    cfg = params.evaluate.cascade
    if not cfg.enabled:
        return None
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name not in systems:
            raise StageError(f"evaluate.cascade.{role} {name!r} is not an evaluated system "
                             f"(evaluated: {', '.join(systems)})")
    val = load_split(params.paths, "validation")
    v_texts, v_labels = val["text"].tolist(), val["label"].to_numpy()
    bs = params.evaluate.throughput_batch_size
    v_logits = {name: np.concatenate([systems[name].logits(v_texts[i : i + bs])
                                      for i in range(0, len(v_texts), bs)])
                for name in (cfg.student, cfg.teacher)}
    t_val_acc = float((v_logits[cfg.teacher].argmax(-1) == v_labels).mean())
    target = cfg.target_accuracy if cfg.target_accuracy is not None else t_val_acc - cfg.tolerance
    thresholds = np.linspace(0.0, 1.0, cfg.thresholds).tolist()
    val_points = cascade.curve(v_logits[cfg.student], v_logits[cfg.teacher], v_labels,
                               cfg.confidence, thresholds)
    test_points = cascade.curve(test_logits[cfg.student], test_logits[cfg.teacher], labels,
                                cfg.confidence, thresholds)
    for v, t in zip(val_points, test_points, strict=True):
        t["validation_accuracy"] = v["accuracy"]
        t["validation_deferred_fraction"] = v["deferred_fraction"]
    picked = cascade.choose(val_points, target)
    chosen = None
    if picked:
        chosen = dict(next(p for p in test_points if p["threshold"] == picked["threshold"]))
        preds = cascade.predictions(test_logits[cfg.student], test_logits[cfg.teacher],
                                    cfg.confidence, picked["threshold"])
        chosen.update(boot.scores(preds))
        chosen["vs_teacher"] = versus(boot, preds, test_logits[cfg.teacher].argmax(-1))
    return {"student": cfg.student, "teacher": cfg.teacher, "confidence": cfg.confidence,
            "chosen_on": "validation", "rule": "fewest deferrals reaching the target accuracy "
                                               "on validation",
            "validation_examples": len(v_texts),
            "teacher_validation_accuracy": t_val_acc, "target_accuracy": target,
            "chosen": chosen, "points": test_points, "validation_points": val_points}


def cost_cascade(casc: dict, results: dict[str, dict], reference: str, batch_size: int) -> dict:
    """`casc` with measured costs: end-to-end ms per example at the deployment batch size."""
    s_ms = results[casc["student"]]["ms_per_example"]
    t_ms = results[casc["teacher"]]["ms_per_example"]
    out = {**casc, "points": cascade.costed(casc["points"], s_ms, t_ms),
           "validation_points": cascade.costed(casc["validation_points"], s_ms, t_ms),
           "cost": f"end-to-end ms per example at batch {batch_size} (measured): student on "
                   "every input + deferred fraction x teacher"}
    if casc["chosen"]:
        chosen = cascade.costed([casc["chosen"]], s_ms, t_ms)[0]
        chosen["speedup_vs_best_teacher"] = (results[reference]["ms_per_example"]
                                             / chosen["expected_ms_per_example"])
        out["chosen"] = chosen
    return out


# ---------------------------------------------------------------------------------------- run

def run(params: Params) -> dict:
    """Measure every system; write the machine-independent results (`paths.evaluate`, a DVC
    output) and the measured ones (`paths.results`, git-tracked, outside dvc.lock)."""
    cfg = params.evaluate
    pin_torch_threads(cfg.num_threads)
    test = load_split(params.paths, "test")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    names = load_label_names(params.paths)
    systems, trt_skip = build_systems(params)
    if trt_skip:
        print(f"evaluate: TensorRT engines not evaluated: {trt_skip}")
    timings, logits = measure_time(systems, texts, params)
    boot = Bootstrap(labels, len(names), cfg.bootstrap, params.seed)
    by_name = {s.name: s for s in systems}
    qual = {s.name: quality(s, logits[s.name], texts, labels, boot) for s in systems}
    uncertainty = {"method": "percentile bootstrap, paired across systems",
                   "resamples": cfg.bootstrap, "level": 0.95, "seed": params.seed}
    casc = run_cascade(params, by_name, logits, labels, boot)
    # Timing-free, so identical on every machine: what downstream stages may depend on.
    record = {"test_examples": len(texts), "systems": qual, "uncertainty": uncertainty,
              "cascade": ({k: v for k, v in casc.items() if k != "validation_points"}
                          if casc else None)}

    results = {name: {**qual[name], **timings[name]} for name in qual}
    reference = best_of(results, "teacher")
    headline = best_of(results, "student")
    ref_preds = logits[reference].argmax(-1)
    for name, r in results.items():
        if name != reference:
            r["vs_best_teacher"] = versus(boot, logits[name].argmax(-1), ref_preds)
        tqdm.write(f"evaluate: {name:<24} acc {r['accuracy']:.4f} "
                   f"[{r['accuracy_ci'][0]:.4f}, {r['accuracy_ci'][1]:.4f}]  model "
                   f"{r['model_throughput_per_s']:.1f} ex/s  e2e {r['throughput_per_s']:.1f} "
                   f"ex/s  p50 {r['latency_p50_ms']:.2f} ms  {r['size_mb']:.1f} MB")
    speed = ratios(results, reference)
    metrics = {"test_examples": len(texts), "systems": results,
               "best_teacher": reference, "headline_student": headline,
               "ratios": speed, "tensorrt": trt_skip or "evaluated",
               "uncertainty": uncertainty,
               "headline": {"student": headline, "best_teacher": reference,
                            **{k: speed[f"{headline}_{k}"] for k in (
                                "throughput_vs_best_teacher",
                                "model_throughput_vs_best_teacher",
                                "throughput_vs_teacher_pytorch")},
                            **results[headline]["vs_best_teacher"]}}
    points = [{"system": name, **{k: v for k, v in r.items()
                                  if isinstance(v, str | int | float) or k == "accuracy_ci"}}
              for name, r in results.items()]
    extra = []
    if casc:
        casc = cost_cascade(casc, results, reference, cfg.throughput_batch_size)
        chosen = casc["chosen"]
        metrics["cascade"] = {k: v for k, v in casc.items()
                              if k not in ("points", "validation_points")}
        if chosen:
            metrics["ratios"]["cascade_speedup_vs_best_teacher"] = chosen[
                "speedup_vs_best_teacher"]
            extra.append({"system": f"cascade@{chosen['threshold']:.2f}", "side": "cascade",
                          "accuracy": chosen["accuracy"], "accuracy_ci": chosen["accuracy_ci"],
                          "ms_per_example": chosen["expected_ms_per_example"]})
        print(f"evaluate: cascade ({casc['student']} -> {casc['teacher']}, "
              f"{casc['confidence']}) "
              + (f"threshold {chosen['threshold']:.2f} (chosen on validation): test acc "
                 f"{chosen['accuracy']:.4f}, {100 * chosen['deferred_fraction']:.1f}% deferred, "
                 f"{chosen['speedup_vs_best_teacher']:.2f}x faster than {reference}"
                 if chosen else
                 f"reaches no threshold for target {casc['target_accuracy']:.4f} on validation"))
    best_preds = logits[headline].argmax(-1)
    print(f"evaluate: {headline} runs {metrics['headline']['throughput_vs_best_teacher']:.2f}x "
          f"the best teacher runtime ({reference}) end to end, accuracy "
          f"{100 * metrics['headline']['accuracy_diff']:+.2f} pt "
          f"[{100 * metrics['headline']['accuracy_diff_ci'][0]:+.2f}, "
          f"{100 * metrics['headline']['accuracy_diff_ci'][1]:+.2f}]")

    with atomic_dir(params.paths.evaluate, params, "evaluate") as out:
        write_json(out / QUALITY_FILE, record)
    with atomic_dir(params.paths.results, params, "evaluate") as out:
        (out / "plots").mkdir()
        write_json(out / PLOT_FILE, points)
        plot(points, out / PNG_FILE)
        metrics["pareto"] = report.plot_pareto(points, out / report.PARETO_PNG, extra)
        cm = report.confusion(labels, best_preds, names, f"{headline} on the test split",
                              out / report.CONFUSION_PNG)
        metrics["best_student"] = {"system": headline, "per_class": cm["per_class"]}
        write_json(out / CONFUSION_FILE, [{"actual": names[a], "predicted": names[b]}
                                          for a, b in zip(labels, best_preds, strict=True)])
        images = [out / PNG_FILE, out / report.PARETO_PNG, out / report.CONFUSION_PNG]
        if casc:
            write_json(out / CASCADE_FILE, casc["points"])
            teacher = casc["teacher"]
            cascade.plot(casc["validation_points"], casc["points"], casc["chosen"],
                         casc["target_accuracy"], results[casc["student"]]["ms_per_example"],
                         results[teacher]["ms_per_example"], results[teacher]["accuracy"],
                         teacher, out / report.CASCADE_PNG)
            images.insert(1, out / report.CASCADE_PNG)
        write_json(out / RESULTS_FILE, metrics)
        md = report.markdown(metrics)
        (out / report.REPORT_MD).write_text(md)
        report.html_report(md, images, out / report.REPORT_HTML)
        write_json(out / "environment.json", environment(params))
    results_dir = Path(params.paths.results)
    with tracking.best_effort("evaluate", f"the results are in {results_dir} (`dvc repro -f "
                                          "evaluate` logs them again)"):
        log_to_wandb(params, metrics, points, casc, results_dir,
                     [results_dir / image.name for image in images])
    return metrics


def _flat(prefix: str, d: dict) -> dict:
    """Numbers (and [low, high] intervals as _low/_high) of a nested dict, with `/` keys."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, int | float):
            out[key] = v
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
            out[f"{key}_low"], out[f"{key}_high"] = v
        elif isinstance(v, dict):
            out.update(_flat(key, v))
    return out


def log_to_wandb(params: Params, metrics: dict, points: list[dict], casc: dict | None,
                 out: Path, images: list[Path]) -> None:
    """Tables, charts, summary numbers and the report files (as an artifact)."""
    import wandb

    run = tracking.start_run(params, "evaluate")
    columns = [c for c in dict.fromkeys(k for p in points for k in p) if c != "accuracy_ci"]
    columns += ["accuracy_ci_low", "accuracy_ci_high"]
    rows = [[p.get(c) for c in columns[:-2]] + list(p["accuracy_ci"]) for p in points]
    logged = {
        "systems": wandb.Table(columns=columns, data=rows),
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
            table, "expected_ms_per_example", "accuracy",
            title="Cascade on test: accuracy vs expected ms/example")
    run.log(logged)
    summary = {}
    for name, r in metrics["systems"].items():
        summary.update(_flat(name, r))
    summary.update(_flat("ratios", metrics["ratios"]))
    summary.update(_flat("headline", metrics["headline"]))
    if metrics.get("cascade", {}).get("chosen"):
        summary.update(_flat("cascade", metrics["cascade"]["chosen"]))
    run.summary.update(summary)
    _log_artifacts(run, params, out, metrics)
    run.finish()


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _log_artifacts(run, params: Params, out: Path, metrics: dict) -> None:
    """The report files as a W&B artifact, with lineage to the data and tokenizer.

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
    # The model itself is the ship stage's bundle, logged there as the `student` artifact.
    evaluation = wandb.Artifact("evaluation", type="report",
                                metadata={"inputs_sha256": inputs,
                                          "tensorrt": metrics.get("tensorrt")})
    evaluation.add_dir(str(out))
    run.log_artifact(evaluation)


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
