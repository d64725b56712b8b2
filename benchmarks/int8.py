"""FP32, dynamic INT8 and static INT8 of the student and the teacher, side by side in one run.

Exports both models with the export stage's own `run` into a temporary folder (FP32 with the
parity check, dynamic INT8, static INT8 as `export.static_int8` says), then times every graph
and scores it on the test split:
- model time: padded test batches of `evaluate.throughput_batch_size` in, logits out, ONNX
  Runtime on `evaluate.num_threads` threads; every round runs each batch through every graph of
  a side in turn, so machine noise hits all graphs alike; the median over `--rounds` rounds;
- test accuracy, and its paired bootstrap 95% interval of the difference to FP32; argmax
  agreement with FP32 and the largest logit difference; file size.

`--variants` also quantises each FP32 graph with alternative static settings (one
`export.static_int8` change each: per-tensor weights, every op type quantised, entropy and
percentile calibration, symmetric activations), to choose the defaults from numbers.

    python benchmarks/int8.py [--rounds 7] [--variants] [--set export.static_int8.method=entropy]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from tokenizers import Tokenizer

from components import export
from components.config import apply_overrides, parse_override, validate
from components.data.artifacts import (
    STUDENT_FP32,
    STUDENT_INT8,
    STUDENT_STATIC_INT8,
    STUDENT_TOKENIZER,
    TEACHER_FP32,
    TEACHER_INT8,
    TEACHER_STATIC_INT8,
    TEACHER_TOKENIZER,
    load_split,
)
from components.evaluation.stats import Bootstrap
from components.exporting.quantization import quantize_static_int8, static_calibration
from components.models import student as student_io
from components.models.runtimes import TextEncoder, ort_session
from components.text.encoding import INPUTS

# One change to export.static_int8 each.
VARIANTS = {
    "per-tensor": {"per_channel": False},
    "all-ops": {"float_ops": []},
    "entropy": {"method": "entropy"},
    "percentile": {"method": "percentile"},
    "symmetric": {"activation_symmetric": True},
}


def feeds(encoder: TextEncoder, texts: list[str], batch_size: int) -> list[dict]:
    ids = encoder.ids(texts)
    return [dict(zip(INPUTS, (t.numpy() for t in encoder.batch(ids[i : i + batch_size])),
                     strict=True))
            for i in range(0, len(ids), batch_size)]


def measure(graphs: dict[str, Path], batches: list[dict], rounds: int,
            threads: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Test logits and median examples/s (model time) of each graph."""
    sessions = {name: ort_session(path, threads) for name, path in graphs.items()}
    logits = {name: np.concatenate([s.run(None, b)[0] for b in batches])
              for name, s in sessions.items()}  # also the warm-up
    seconds = {name: [] for name in sessions}
    n = sum(len(b[INPUTS[0]]) for b in batches)
    for _ in range(rounds):
        spent = dict.fromkeys(sessions, 0.0)
        for batch in batches:
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, batch)
                spent[name] += time.perf_counter() - start
        for name, s in spent.items():
            seconds[name].append(s)
    return logits, {name: n / float(np.median(s)) for name, s in seconds.items()}


def report(side: str, graphs: dict[str, Path], logits: dict, rates: dict, labels: np.ndarray,
           boot: Bootstrap) -> list[str]:
    ref = logits["fp32"].argmax(-1)
    lines = []
    for name in graphs:
        preds = logits[name].argmax(-1)
        diff = boot.difference(preds, ref)
        lo, hi = diff["accuracy_diff_ci"]
        lines.append(
            f"| {side} | {name} | {rates[name]:.1f} | {rates[name] / rates['fp32']:.2f}x | "
            f"{rates[name] / rates.get('dynamic', np.nan):.2f}x | "
            f"{(preds == labels).mean():.4f} | {100 * diff['accuracy_diff']:+.2f} "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {(preds == ref).mean():.3f} | "
            f"{np.abs(logits[name] - logits['fp32']).max():.3f} | "
            f"{graphs[name].stat().st_size / 1e6:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", action="store_true",
                        help="also time alternative export.static_int8 settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="params overrides, e.g. export.static_int8.per_channel=false")
    args = parser.parse_args()

    raw = yaml.safe_load(Path(args.params).read_text())
    overrides = dict(parse_override(o) for o in args.set)
    student = student_io.load(validate(apply_overrides(raw, overrides)).paths.student).cfg
    with tempfile.TemporaryDirectory(prefix="still-int8-") as tmp:
        out = Path(tmp) / "export"
        # The student's own length, should params.yaml have moved on since it was trained.
        params = validate(apply_overrides(raw, {
            **overrides, "distill.max_length": student.max_length, "paths.export": str(out),
            "export.int8": True, "export.static_int8.enabled": True, "export.teacher": True,
            "export.tensorrt.enabled": False}), args.params)
        started = time.perf_counter()
        metrics = export.run(params)
        print(f"export: {time.perf_counter() - started:.0f} s")
        test = load_split(params.paths, "test")
        texts, labels = test["text"].tolist(), test["label"].to_numpy()
        boot = Bootstrap(labels, int(labels.max()) + 1, 1000, params.seed)
        bs, threads = params.evaluate.throughput_batch_size, params.evaluate.num_threads
        cfg = params.export.static_int8
        sides = {
            "student": (TextEncoder(Tokenizer.from_file(str(out / STUDENT_TOKENIZER)),
                                    student.max_length, student.min_tokens()),
                        (STUDENT_FP32, STUDENT_INT8, STUDENT_STATIC_INT8)),
            "teacher": (TextEncoder(Tokenizer.from_file(str(out / TEACHER_TOKENIZER)),
                                    params.teacher.max_length),
                        (TEACHER_FP32, TEACHER_INT8, TEACHER_STATIC_INT8)),
        }
        rows = []
        for side, (encoder, (fp32, dynamic, static)) in sides.items():
            graphs = {"fp32": out / fp32, "dynamic": out / dynamic, "static": out / static}
            if args.variants:
                calibration = static_calibration(params, encoder)
                for name, change in VARIANTS.items():
                    graphs[f"static {name}"] = out / f"{side}.{name}.onnx"
                    info = quantize_static_int8(graphs["fp32"], graphs[f"static {name}"],
                                                       calibration, cfg.model_copy(update=change))
                    print(f"{side} static {name}: {info['quantized_ops']}")
            print(f"timing {side}: {len(graphs)} graphs x {args.rounds} rounds", flush=True)
            logits, rates = measure(graphs, feeds(encoder, texts, bs), args.rounds, threads)
            rows += report(side, graphs, logits, rates, labels, boot)
    print(f"\n{len(texts)} test examples, batch {bs}, {threads} threads, model time, median of "
          f"{args.rounds} rounds; max length: student {student.max_length}, teacher "
          f"{params.teacher.max_length}; static INT8: {cfg.method}, per_channel {cfg.per_channel}, "
          f"float_ops {cfg.float_ops}")
    print("static INT8 agreement with FP32 on the parity batches: student "
          f"{metrics['static_int8']['argmax_agreement']:.3f}, teacher "
          f"{metrics['teacher']['static_int8']['argmax_agreement']:.3f}\n")
    print("| side | graph | ex/s | vs FP32 | vs dynamic | test acc | vs FP32 pt [95% CI] | "
          "agree | max logit diff | MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
