"""Cross-check of the evaluate stage's timing: the same exported ONNX files, timed by a separate,
minimal loop, side by side in one run, with the ratios evaluate wrote printed beside them.

The loop shares no timing code with evaluate: it reads the test split with pandas, tokenises
with `tokenizers` directly (truncation at the stage's max_length, no padding), pads with numpy,
builds its own ONNX Runtime sessions (intra-op threads = `evaluate.num_threads`, inter-op 1,
sequential) and times model calls only (padded arrays in, logits out) at
`evaluate.throughput_batch_size`, round-robin over `--rounds` rounds so machine noise hits every
model alike; the median round is kept. For each student/teacher pair it prints the throughput
ratio measured here and the one in `paths.results/metrics.json`; they should agree within
`--tolerance` (15%). Exit status 1 when one does not.

`--ort-optimize` also times copies of the FP32 graphs passed through ONNX Runtime's
transformer optimizer (BERT fusions), to decide `export.ort_optimize` on this machine.

Needs a finished pipeline (`dvc repro`).

    python benchmarks/evaluate_crosscheck.py [--rounds 5] [--ort-optimize]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from tokenizers import Tokenizer

from components.config import load_params

FILES = {  # system name -> (ONNX file, tokenizer file, side) inside paths.export
    "teacher_onnx": ("teacher.onnx", "teacher.tokenizer.json", "teacher"),
    "teacher_onnx_int8": ("teacher.int8.onnx", "teacher.tokenizer.json", "teacher"),
    "student_onnx": ("model.onnx", "tokenizer.json", "student"),
    "student_onnx_int8": ("model.int8.onnx", "tokenizer.json", "student"),
}


def batches(tokenizer_file: Path, texts: list[str], max_length: int, batch_size: int,
            min_length: int) -> list[dict[str, np.ndarray]]:
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_length)
    pad = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None),
               0)
    ids = [e.ids for e in tok.encode_batch(texts)]
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        width = max(min_length, max(len(x) for x in chunk))
        arr = np.full((len(chunk), width), pad, dtype=np.int64)
        mask = np.zeros_like(arr)
        for j, x in enumerate(chunk):
            arr[j, : len(x)], mask[j, : len(x)] = x, 1
        out.append({"input_ids": arr, "attention_mask": mask})
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimized_copy(src: Path, dst: Path, heads: int, hidden: int) -> Path:
    """`src` through ORT's transformer optimizer with the same settings as export.ort_optimize."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                           opt_level=1)
    model.save_model_to_file(str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--ort-optimize", action="store_true")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.evaluate
    export = Path(params.paths.export)
    evaluated = json.loads((Path(params.paths.results) / "metrics.json").read_text())["systems"]
    texts = pd.read_parquet(Path(params.paths.data) / "test.parquet")["text"].tolist()
    min_tokens = json.loads((export / "metrics.json").read_text()).get("min_tokens", 1)
    lengths = {"teacher": params.teacher.max_length, "student": params.distill.max_length}
    t_cfg = json.loads((Path(params.paths.teacher) / "config.json").read_text())
    s_cfg = json.loads((Path(params.paths.student) / "config.json").read_text())
    shapes = {"teacher": (t_cfg["num_attention_heads"], t_cfg["hidden_size"]),
              "student": (s_cfg["heads"], s_cfg["hidden"])}

    models = {}
    scratch = tempfile.TemporaryDirectory(prefix="still-crosscheck-")
    for name, (onnx_file, tok_file, side) in FILES.items():
        if not (export / onnx_file).is_file():
            print(f"{name}: {export / onnx_file} missing, left out")
            continue
        feeds = batches(export / tok_file, texts, lengths[side], cfg.throughput_batch_size,
                        min_tokens if side == "student" else 1)
        models[name] = (session(export / onnx_file, cfg.num_threads), feeds, side)
        if args.ort_optimize and not onnx_file.endswith("int8.onnx"):
            opt = optimized_copy(export / onnx_file, Path(scratch.name) / f"opt-{onnx_file}",
                                 *shapes[side])
            models[f"{name}_ortopt"] = (session(opt, cfg.num_threads), feeds, side)

    for sess, feeds, _ in models.values():  # warm-up
        for feed in feeds[:2]:
            sess.run(None, feed)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (sess, feeds, _) in models.items():
            start = time.perf_counter()
            for feed in feeds:
                sess.run(None, feed)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    here = {name: float(np.median(r)) for name, r in rates.items()}

    print(f"\n{len(texts)} test examples, batch {cfg.throughput_batch_size}, "
          f"{cfg.num_threads} threads, {args.rounds} rounds round-robin (median), model time")
    print(f"{'system':<26}{'here ex/s':>12}{'evaluate ex/s':>15}{'here/evaluate':>15}")
    for name, rate in here.items():
        ev = evaluated.get(name, {}).get("model_throughput_per_s")
        print(f"{name:<26}{rate:>12.1f}" + (f"{ev:>15.1f}{rate / ev:>15.2f}" if ev else
                                            f"{'-':>15}{'-':>15}"))
    print(f"\n{'ratio (model time)':<44}{'here':>8}{'evaluate':>10}{'agree':>8}")
    ok = True
    students = [n for n in here if models[n][2] == "student"]
    teachers = [n for n in here if models[n][2] == "teacher"]
    for s in students:
        for t in teachers:
            ratio = here[s] / here[t]
            ev_s, ev_t = evaluated.get(s, {}), evaluated.get(t, {})
            if "model_throughput_per_s" in ev_s and "model_throughput_per_s" in ev_t:
                ev = ev_s["model_throughput_per_s"] / ev_t["model_throughput_per_s"]
                agree = abs(ratio / ev - 1) <= args.tolerance
                ok &= agree
                print(f"{s + ' / ' + t:<44}{ratio:>8.2f}{ev:>10.2f}"
                      f"{'yes' if agree else 'NO':>8}")
            else:
                print(f"{s + ' / ' + t:<44}{ratio:>8.2f}{'-':>10}{'-':>8}")
    for name in here:
        if name.endswith("_ortopt"):
            base = name.removesuffix("_ortopt")
            print(f"ORT transformer optimizer, {base}: {here[name] / here[base]:.2f}x "
                  "(optimized / plain)")
    scratch.cleanup()
    print("\nagreement within "
          f"{100 * args.tolerance:.0f}%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
