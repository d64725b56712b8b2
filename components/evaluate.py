"""evaluate: every system on the same splits, quality and cost side by side, with intervals.

Systems: the teacher as a user would deploy it without distilling (`teacher` PyTorch eager,
`teacher_onnx` ONNX Runtime FP32, `teacher_onnx_int8` ONNX Runtime dynamic INT8,
`teacher_onnx_static_int8` static INT8) and every student artifact (`student` PyTorch,
`student_onnx`, `student_onnx_int8`, `student_onnx_static_int8`, TensorRT engines where they
run); an INT8 graph the export stage did not write is left out. For each, on validation and on
test: accuracy and macro-F1 with seeded bootstrap 95% intervals; on test, the paired bootstrap
interval of its accuracy difference from the best teacher runtime (and McNemar's exact test),
time, size, parameters, tokens and analytic GFLOPs per example.

How time is measured (`components/models/runtimes.py` holds the runners,
`components/text/encoding.py` the
encoder):
- threads are pinned for every pool: PyTorch and ONNX Runtime intra-op `evaluate.num_threads`,
  inter-op 1, ONNX Runtime's spinning off (its threads would otherwise keep the cores busy
  after each run), and the `tokenizers` pool sized to `evaluate.num_threads` before the first
  text is encoded; every encoder is built once, nothing is rebuilt inside a timed call;
- *tokenisation* (text to padded ids: the pre-cut, tokenizer, padding) is timed per encoder, in
  its own loop, never right after a model call, so systems sharing an encoder report the same
  figure; *model time* (padded tensors in, logits out) per system, batch after batch; *end to
  end* per system as it runs: each batch tokenised, then run, which is what a caller gets. It
  costs more than the sum of the two (`interplay_ms_per_example`): each evicts the other's
  working set from the caches (tokenising right after a 16 MB memory sweep costs what it costs
  right after a model call, about 1.4x its cost alone, on this project's 2-core Xeon);
- throughput: full passes over the test split in batches of `evaluate.throughput_batch_size`;
  latency: `evaluate.latency_examples` calls of `evaluate.latency_batch_size` (p50/p95 of the
  per-call sums);
- `evaluate.warmup` untimed calls first, then `evaluate.repeats` rounds; within a round every
  encoder, then every system, so machine noise hits all of them alike; medians over rounds
  are reported with their interquartile range (IQR);
- the deployed path is timed as it runs: the cascade student alone and the cascade (student on
  every text, the teacher on the deferred ones) through the bundle's own `Predictor` on the
  exported graphs, text in, label out, batched as `still predict` batches.

Decisions, on the validation split only (timings do not depend on the split): the *best
teacher runtime* is the fastest teacher system (end to end) whose validation accuracy lies
within the 95% interval of the most accurate teacher system's; the headline student is chosen
the same way among students; the cascade threshold is the fewest deferrals reaching the target
on validation. Test reports each choice once. Every headline ratio is against the best teacher
runtime, with PyTorch eager as a second column.

Produces two folders, because timings differ from machine to machine and run to run while
everything else is a function of the inputs:
- `paths.evaluate` (a DVC output, what a downstream stage may depend on): `quality.json`, every
  system's accuracy, macro-F1 and intervals on validation and test, size, parameters, tokens
  and GFLOPs per example, and the cascade policy (student, teacher, threshold chosen on
  validation, its test accuracy); `params.json`. Byte-identical on any machine that computes
  the same predictions.
- `paths.results` (git-tracked, declared as DVC metrics/plots but not as an output, so it is
  not in dvc.lock): `metrics.json` (all of the above plus the measured times, the best teacher
  runtime and headline student, ratios, cascade costs and measured speed, Pareto fronts,
  per-class F1), `plots/*.json`, `report.md` + `report.html`, PNGs, `environment.json`,
  `params.json`.
Both are logged to W&B after they are written; a W&B failure is a warning, not a lost run.

Run: `python -m components.evaluate` (or `dvc repro evaluate`).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from components.config import Params
from components.data.artifacts import (
    EXPORTED_GRAPHS,
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
from components.data.files import atomic_dir, file_size, read_json, write_json
from components.evaluation import cascade
from components.evaluation.flops import encoder_flops
from components.evaluation.stats import Bootstrap, timing_summary, versus
from components.exporting.trt import engines, graphs
from components.models import student as student_io
from components.models.runtimes import (
    Runner,
    TextEncoder,
    onnx_runner,
    ort_session,
    pin_torch_threads,
    torch_runner,
)
from components.models.teacher import load_saved
from components.reporting import plots as report
from components.reporting import tracking
from components.serving.bundle import Graph, Predictor
from components.stage import StageError, stage_main
from components.text.encoding import pin_tokenizer_threads

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

def _timed(fn: Callable, *args) -> tuple[object, float]:
    """`fn(*args)` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


@dataclass
class _Clock:
    """One thing timed in every round: seconds per pass over the split (`one_pass`) and, with
    `one_call`, seconds per latency call. A pass shorter than `evaluate.min_pass_seconds`
    repeats `repeat` times within its turn (fixed from the warm-up, the same in every round): a
    tenth of a second is too short to time on a shared machine whose speed drifts from second
    to second."""

    one_pass: Callable[[], float]
    one_call: Callable[[object], float] | None = None
    call_inputs: list = field(default_factory=list)
    repeat: int = 1
    passes: list[float] = field(default_factory=list)
    calls: list[np.ndarray] = field(default_factory=list)

    def warm_up(self, min_seconds: float) -> None:
        self.repeat = max(1, math.ceil(min_seconds / max(self.one_pass(), 1e-6)))

    def tick(self) -> None:
        self.passes.append(sum(self.one_pass() for _ in range(self.repeat)) / self.repeat)
        if self.one_call is not None:
            self.calls.append(np.array([self.one_call(c) for c in self.call_inputs]))


def measure_time(systems: list[System], texts: list[str], params: Params,
                 deployed: dict[str, Callable[[list[list[str]]], object]] | None = None,
                 progress: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """Throughput and latency of every system (see the module docstring), round-robin over
    `evaluate.repeats` rounds. In each round: every encoder's tokenisation in its own loop;
    every system's model alone (its encoder's padded batches, one after another) and end to
    end as it runs (each batch tokenised, then run); every `deployed` path (text batches in,
    answers out) over the same batches. Returns the systems' timings and the deployed paths'
    (`throughput_per_s`, `ms_per_example`, IQR)."""
    cfg = params.evaluate
    deployed = deployed or {}
    n = len(texts)
    bs, lb = cfg.throughput_batch_size, cfg.latency_batch_size
    chunks = [texts[i : i + bs] for i in range(0, n, bs)]
    sample = texts[: cfg.latency_examples * lb]
    calls = [sample[i : i + lb] for i in range(0, len(sample), lb)]
    encoders = {id(s.encoder): s.encoder for s in systems}  # shared encoders once each
    padded = {key: ([enc(c) for c in chunks], [enc(c) for c in calls])
              for key, enc in encoders.items()}

    def seconds(fn: Callable, *args) -> float:
        return _timed(fn, *args)[1]

    def as_it_runs(system: System, batch: list[str]) -> float:
        return seconds(lambda: system.run(*system.encoder(batch)))

    tok = {key: _Clock(lambda e=enc: sum(seconds(e, c) for c in chunks),
                       lambda c, e=enc: seconds(e, c), calls)
           for key, enc in encoders.items()}
    model, e2e = {}, {}
    for s in systems:
        batches, singles = padded[id(s.encoder)]
        model[s.name] = _Clock(lambda s=s, b=batches: sum(seconds(s.run, *x) for x in b),
                               lambda x, s=s: seconds(s.run, *x), singles)
        e2e[s.name] = _Clock(lambda s=s: sum(as_it_runs(s, c) for c in chunks),
                             lambda c, s=s: as_it_runs(s, c), calls)
    paths = {name: _Clock(lambda p=path: seconds(p, chunks)) for name, path in deployed.items()}
    clocks = [*tok.values(), *(c for name in model for c in (model[name], e2e[name])),
              *paths.values()]
    for enc in encoders.values():  # warm-up: lazy allocations, caches, the thread pools
        for i in range(max(1, cfg.warmup)):
            enc(calls[i % len(calls)])
    for system in systems:  # and ORT's first-run graph work
        singles = padded[id(system.encoder)][1]
        for i in range(max(1, cfg.warmup)):
            system.run(*singles[i % len(singles)])
    for clock in clocks:
        clock.warm_up(cfg.min_pass_seconds)
    bar = tqdm(total=cfg.repeats * len(clocks), desc="evaluate: timing", unit="pass",
               disable=not progress)
    for _ in range(cfg.repeats):
        for clock in clocks:
            clock.tick()
            bar.update()
    bar.close()
    timings = {s.name: _summary(tok[id(s.encoder)], model[s.name], e2e[s.name], n,
                                cfg.repeats) for s in systems}
    measured = {}
    for name, clock in paths.items():
        summary = timing_summary([n / t for t in clock.passes])
        measured[name] = {"throughput_per_s": summary["median"],
                          "throughput_iqr": summary["iqr"],
                          "ms_per_example": 1000.0 / summary["median"], "batch_size": bs}
    return timings, measured


def _summary(tok: _Clock, model: _Clock, e2e: _Clock, n: int, rounds: int) -> dict:
    """One system's medians (and IQRs) over rounds. `interplay_ms_per_example` is what
    running the two in turn costs beyond their sum (each evicts the other's working set from
    the caches): end to end minus tokenisation alone minus the model alone."""
    def median(values) -> float:
        return timing_summary(values)["median"]

    def percentile(clock: _Clock, q: int) -> list[float]:
        return [1000 * np.percentile(c, q) for c in clock.calls]

    rate = timing_summary([n / t for t in e2e.passes])
    model_rate = timing_summary([n / t for t in model.passes])
    tok_ms = median([1000 * t / n for t in tok.passes])
    e2e_ms = 1000.0 / rate["median"]
    return {
        "throughput_per_s": rate["median"],  # end to end, as it runs: what a caller gets
        "throughput_iqr": rate["iqr"],
        "model_throughput_per_s": model_rate["median"],
        "model_throughput_iqr": model_rate["iqr"],
        "tokenize_ms_per_example": tok_ms,
        "ms_per_example": e2e_ms,
        "interplay_ms_per_example": e2e_ms - tok_ms - 1000.0 / model_rate["median"],
        "latency_p50_ms": median(percentile(e2e, 50)),
        "latency_p50_iqr_ms": timing_summary(percentile(e2e, 50))["iqr"],
        "latency_p95_ms": median(percentile(e2e, 95)),
        "model_latency_p50_ms": median(percentile(model, 50)),
        "model_latency_p95_ms": median(percentile(model, 95)),
        "tokenize_latency_p50_ms": median(percentile(tok, 50)),
        "timing_rounds": rounds,
    }


def predict_split(systems: list[System], texts: list[str], batch_size: int
                  ) -> dict[str, np.ndarray]:
    """Every system's logits on `texts` (untimed), each encoder's batches encoded once."""
    encoded = {id(s.encoder): [s.encoder(texts[i : i + batch_size])
                               for i in range(0, len(texts), batch_size)] for s in systems}
    return {s.name: np.concatenate([s.run(*b) for b in encoded[id(s.encoder)]])
            for s in systems}


def deployed_predictor(params: Params, casc: dict | None, labels: list[str]
                       ) -> tuple[Predictor | None, str]:
    """The bundle's own `Predictor` over the exported graphs of the cascade student (and, with
    a chosen threshold, the cascade), or None and why it cannot be timed."""
    cfg = params.evaluate.cascade
    export_dir = Path(params.paths.export)
    missing = [name for name in (cfg.student, cfg.teacher) if name not in EXPORTED_GRAPHS
               or not (export_dir / EXPORTED_GRAPHS[name][0]).is_file()]
    if cfg.student in missing:
        return None, (f"{cfg.student} is not an exported ONNX graph, which is what a bundle "
                      "ships")
    threads = params.evaluate.num_threads

    def graph(name: str) -> Graph:
        return Graph.from_files(*(export_dir / f for f in EXPORTED_GRAPHS[name]), threads)

    student = graph(cfg.student)
    chosen = (casc or {}).get("chosen")
    if not chosen or cfg.teacher in missing:
        why = ("no cascade threshold was chosen" if not chosen else
               f"{cfg.teacher} is not an exported ONNX graph")
        return Predictor(student, labels), f"student alone ({why})"
    return (Predictor(student, labels, (student, graph(cfg.teacher), cfg.confidence,
                                        chosen["threshold"])), "student and cascade")


def deployed_paths(predictor: Predictor, batch_size: int
                   ) -> dict[str, Callable[[list[list[str]]], object]]:
    """The deployed paths to time: the student alone and, when the predictor has one, the
    cascade, each as `still predict --input` runs them (`Predictor.stream`: batches in order,
    the cascade's deferred texts gathered into full teacher batches)."""
    paths = {"student": lambda chunks: list(predictor.stream(chunks))}
    if predictor.cascade:
        paths["cascade"] = lambda chunks: list(predictor.stream(chunks, True, batch_size))
    return paths


# ----------------------------------------------------------------------------------- quality

def scores(logits: np.ndarray, labels: np.ndarray, boot: Bootstrap) -> dict:
    """Accuracy and macro-F1 of one system on one split, with their 95% intervals."""
    preds = logits.argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro")),
            **boot.scores(preds)}


def quality(system: System, test: np.ndarray, validation: np.ndarray, texts: list[str],
            labels: np.ndarray, val_labels: np.ndarray, boot: Bootstrap,
            val_boot: Bootstrap) -> dict:
    """A system's quality on test (top level) and validation (`validation`), and its cost in
    tokens, GFLOPs, bytes and parameters."""
    ids = system.encoder.ids(texts)
    return {
        "runtime": system.runtime,
        "side": system.side,
        **scores(test, labels, boot),
        "validation": scores(validation, val_labels, val_boot),
        "size_mb": system.size_bytes / 1e6,
        "parameters": system.parameters,
        "tokens_per_example": float(np.mean([len(x) for x in ids])),
        "gflops_per_example": float(np.mean([system.flops(len(x)) for x in ids])) / 1e9,
    }


def best_of(results: dict[str, dict], side: str) -> str | None:
    """The fastest system of `side` (end-to-end throughput) whose *validation* accuracy is
    within the 95% interval of that side's most accurate system on validation: a faster
    runtime that is not measurably worse is the one a user deploys. Test never decides."""
    names = [n for n, r in results.items() if r["side"] == side]
    if not names:
        return None

    def val(name: str) -> dict:
        return results[name]["validation"]

    top = max(names, key=lambda n: (val(n)["accuracy"], results[n]["throughput_per_s"]))
    low = val(top)["accuracy_ci"][0]
    ok = [n for n in names if val(n)["accuracy"] >= low]
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

def run_cascade(params: Params, test_logits: dict[str, np.ndarray], labels: np.ndarray,
                val_logits: dict[str, np.ndarray], v_labels: np.ndarray,
                boot: Bootstrap) -> dict | None:
    """Student first, the teacher system of `evaluate.cascade` below the confidence threshold;
    the threshold is chosen on the validation split and reported once on test. Predictions
    only: the result is the same on every machine (costs are added by `cost_cascade`)."""
    cfg = params.evaluate.cascade
    if not cfg.enabled:
        return None
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name not in test_logits:
            raise StageError(f"evaluate.cascade.{role} {name!r} is not an evaluated system "
                             f"(evaluated: {', '.join(test_logits)})")
    v_logits = val_logits
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
            "validation_examples": len(v_labels),
            "teacher_validation_accuracy": t_val_acc, "target_accuracy": target,
            "chosen": chosen, "points": test_points, "validation_points": val_points}


def cost_cascade(casc: dict, results: dict[str, dict], reference: str, batch_size: int,
                 deployed: dict | None) -> dict:
    """`casc` with its costs: the cost model (end-to-end ms per example of the student on every
    input + the deferred fraction of the teacher's, at the deployment batch size) on every
    point, and for the chosen threshold the cascade as it runs (`deployed`, measured through
    the bundle's path) beside it."""
    s_ms = results[casc["student"]]["ms_per_example"]
    t_ms = results[casc["teacher"]]["ms_per_example"]
    out = {**casc, "points": cascade.costed(casc["points"], s_ms, t_ms),
           "validation_points": cascade.costed(casc["validation_points"], s_ms, t_ms),
           "cost": f"end-to-end ms per example at batch {batch_size} (measured per system): "
                   "student on every input + deferred fraction x teacher; `measured_*`: the "
                   "cascade run through the bundle's code on the test split"}
    if casc["chosen"]:
        chosen = cascade.costed([casc["chosen"]], s_ms, t_ms)[0]
        ref_ms = results[reference]["ms_per_example"]
        chosen["speedup_vs_best_teacher"] = ref_ms / chosen["expected_ms_per_example"]
        measured = (deployed or {}).get("cascade")
        if measured:
            chosen["measured_ms_per_example"] = measured["ms_per_example"]
            chosen["measured_throughput_per_s"] = measured["throughput_per_s"]
            chosen["measured_speedup_vs_best_teacher"] = ref_ms / measured["ms_per_example"]
        out["chosen"] = chosen
    return out


# ---------------------------------------------------------------------------------------- run

def run(params: Params) -> dict:
    """Measure every system; write the machine-independent results (`paths.evaluate`, a DVC
    output) and the measured ones (`paths.results`, git-tracked, outside dvc.lock)."""
    cfg = params.evaluate
    pin_tokenizer_threads(cfg.num_threads)  # before the first text is encoded
    pin_torch_threads(cfg.num_threads)
    test, val = load_split(params.paths, "test"), load_split(params.paths, "validation")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    v_texts, v_labels = val["text"].tolist(), val["label"].to_numpy()
    names = load_label_names(params.paths)
    systems, trt_skip = build_systems(params)
    if trt_skip:
        print(f"evaluate: TensorRT engines not evaluated: {trt_skip}")
    logits = predict_split(systems, texts, cfg.throughput_batch_size)
    val_logits = predict_split(systems, v_texts, cfg.throughput_batch_size)
    boot = Bootstrap(labels, len(names), cfg.bootstrap, params.seed)
    val_boot = Bootstrap(v_labels, len(names), cfg.bootstrap, params.seed)
    qual = {s.name: quality(s, logits[s.name], val_logits[s.name], texts, labels, v_labels,
                            boot, val_boot) for s in systems}
    uncertainty = {"method": "percentile bootstrap, paired across systems",
                   "resamples": cfg.bootstrap, "level": 0.95, "seed": params.seed}
    casc = run_cascade(params, logits, labels, val_logits, v_labels, boot)
    # Timing-free, so identical on every machine: what downstream stages may depend on.
    record = {"test_examples": len(texts), "validation_examples": len(v_texts),
              "systems": qual, "uncertainty": uncertainty,
              "cascade": ({k: v for k, v in casc.items() if k != "validation_points"}
                          if casc else None)}

    # The deployed path needs the threshold chosen above; it is timed with the systems, round
    # by round, so the two figures for the same graph meet the same machine.
    predictor, deployed_note = deployed_predictor(params, casc, names)
    timings, deployed = measure_time(
        systems, texts, params,
        deployed_paths(predictor, cfg.throughput_batch_size) if predictor else None)
    if "cascade" in deployed:  # what the deployed cascade did on test, beside its time
        bs = cfg.throughput_batch_size
        answers = [a for batch in predictor.stream(
            [texts[i : i + bs] for i in range(0, len(texts), bs)], True, bs) for a in batch]
        deployed["cascade"]["deferred_fraction"] = float(np.mean(
            [a["answered_by"] == "teacher" for a in answers]))
    results = {name: {**qual[name], **timings[name]} for name in qual}
    reference = best_of(results, "teacher")
    headline = best_of(results, "student")
    ref_preds = logits[reference].argmax(-1)
    for name, r in results.items():
        if name != reference:
            r["vs_best_teacher"] = versus(boot, logits[name].argmax(-1), ref_preds)
        v = r["validation"]
        tqdm.write(f"evaluate: {name:<24} val {v['accuracy']:.4f} test {r['accuracy']:.4f} "
                   f"[{r['accuracy_ci'][0]:.4f}, {r['accuracy_ci'][1]:.4f}]  model "
                   f"{r['model_throughput_per_s']:.1f} ex/s  e2e {r['throughput_per_s']:.1f} "
                   f"ex/s  tokenize {r['tokenize_ms_per_example']:.3f} ms/ex  "
                   f"{r['size_mb']:.1f} MB")
    speed = ratios(results, reference)
    metrics = {"test_examples": len(texts), "validation_examples": len(v_texts),
               "systems": results, "best_teacher": reference, "headline_student": headline,
               "chosen_on": "validation",
               "ratios": speed, "tensorrt": trt_skip or "evaluated",
               "uncertainty": uncertainty,
               "headline": {"student": headline, "best_teacher": reference,
                            "validation_accuracy": results[headline]["validation"]["accuracy"],
                            "accuracy": results[headline]["accuracy"],
                            **{k: speed[f"{headline}_{k}"] for k in (
                                "throughput_vs_best_teacher",
                                "model_throughput_vs_best_teacher",
                                "throughput_vs_teacher_pytorch")},
                            **results[headline]["vs_best_teacher"]},
               "deployed": deployed_summary(params, deployed, deployed_note, results)}
    points = [{"system": name, **{k: v for k, v in r.items()
                                  if isinstance(v, str | int | float) or k == "accuracy_ci"}}
              for name, r in results.items()]
    extra = []
    if casc:
        casc = cost_cascade(casc, results, reference, cfg.throughput_batch_size, deployed)
        chosen = casc["chosen"]
        metrics["cascade"] = {k: v for k, v in casc.items()
                              if k not in ("points", "validation_points")}
        if chosen:
            metrics["ratios"]["cascade_speedup_vs_best_teacher"] = chosen.get(
                "measured_speedup_vs_best_teacher", chosen["speedup_vs_best_teacher"])
            extra.append({"system": f"cascade@{chosen['threshold']:.2f}", "side": "cascade",
                          "accuracy": chosen["accuracy"], "accuracy_ci": chosen["accuracy_ci"],
                          "ms_per_example": chosen.get("measured_ms_per_example",
                                                       chosen["expected_ms_per_example"])})
        print_cascade(casc, reference)
    best_preds = logits[headline].argmax(-1)
    h = metrics["headline"]
    print(f"evaluate: {headline} (chosen on validation, {h['validation_accuracy']:.4f}) runs "
          f"{h['throughput_vs_best_teacher']:.2f}x the best teacher runtime ({reference}) end "
          f"to end, {h['model_throughput_vs_best_teacher']:.2f}x in model time; test accuracy "
          f"{h['accuracy']:.4f}, {100 * h['accuracy_diff']:+.2f} pt "
          f"[{100 * h['accuracy_diff_ci'][0]:+.2f}, {100 * h['accuracy_diff_ci'][1]:+.2f}]")

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


def deployed_summary(params: Params, deployed: dict | None, note: str,
                     results: dict[str, dict]) -> dict:
    """What the deployed path measured, beside the figure the system table gives for the same
    graph (they time the same work two ways: their ratio should stay near 1)."""
    name = params.evaluate.cascade.student
    out = {"system": name, "timed": note, "path": "components.bundle.Predictor (text in, "
           "label out), the path `still predict` and `load_bundle(...).predict` run"}
    if deployed:
        out.update(deployed)
        if name in results:
            out["student"]["vs_evaluate_end_to_end"] = (
                deployed["student"]["throughput_per_s"] / results[name]["throughput_per_s"])
    return out


def print_cascade(casc: dict, reference: str) -> None:
    chosen = casc["chosen"]
    head = (f"evaluate: cascade ({casc['student']} -> {casc['teacher']}, "
            f"{casc['confidence']}) ")
    if not chosen:
        print(head + f"reaches no threshold for target {casc['target_accuracy']:.4f} on "
                     "validation")
        return
    measured = (f", measured {chosen['measured_ms_per_example']:.3f} ms/ex "
                f"({chosen['measured_speedup_vs_best_teacher']:.2f}x {reference})"
                if "measured_ms_per_example" in chosen else "")
    print(head + f"threshold {chosen['threshold']:.2f} (chosen on validation): test acc "
                 f"{chosen['accuracy']:.4f}, {100 * chosen['deferred_fraction']:.1f}% deferred, "
                 f"cost model {chosen['expected_ms_per_example']:.3f} ms/ex "
                 f"({chosen['speedup_vs_best_teacher']:.2f}x {reference}){measured}")


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
