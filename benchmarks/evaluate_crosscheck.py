"""Cross-check of the evaluate stage's timing: the same exported ONNX files, timed by a separate,
minimal loop, side by side in one run, with the figures evaluate wrote printed beside them.

The loop shares no timing code with evaluate: it reads the test split with pandas, builds its
own ONNX Runtime sessions (intra-op threads = `evaluate.num_threads`, inter-op 1, sequential,
spinning off as everywhere in still) and times, at `evaluate.throughput_batch_size`,
round-robin over `--rounds` rounds (median kept):
- *model time*: padded arrays in, logits out;
- *end to end*: text in, logits out, each batch tokenised (`encoding.Encoder`, the one encoder
  every part of still uses, pre-cut included) and run in turn, as a caller does. evaluate
  instead times tokenisation per encoder in its own loop and adds the model time: if that sum
  hides an interaction between tokenising and running (a thread pool still spinning), the two
  end-to-end figures part;
- *the shipped bundle*: `load_bundle(...).predict` in this process and `still predict --input`
  as a user runs it (a CSV of the test texts; its own texts/s line), beside evaluate's end-to-end
  figure and its deployed-path figure for the same graph.

It prints each figure beside evaluate's and, for each student/teacher pair, the ratio here and
in `paths.results/metrics.json`, model time and end to end; they should agree within
`--tolerance` (15%). Exit status 1 when one does not.

`--ort-optimize` also times copies of the FP32 graphs passed through ONNX Runtime's
transformer optimizer (BERT fusions), to decide `export.ort_optimize` on this machine.

Needs a finished pipeline (`dvc repro`).

    python benchmarks/evaluate_crosscheck.py [--rounds 5] [--ort-optimize] [--no-bundle]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from tokenizers import Tokenizer

from components.config import load_params
from components.text.encoding import Encoder, pin_tokenizer_threads

FILES = {  # system name -> (ONNX file, tokenizer file, side) inside paths.export
    "teacher_onnx": ("teacher.onnx", "teacher.tokenizer.json", "teacher"),
    "teacher_onnx_int8": ("teacher.int8.onnx", "teacher.tokenizer.json", "teacher"),
    "teacher_onnx_static_int8": ("teacher.static_int8.onnx", "teacher.tokenizer.json",
                                 "teacher"),
    "student_onnx": ("model.onnx", "tokenizer.json", "student"),
    "student_onnx_int8": ("model.int8.onnx", "tokenizer.json", "student"),
    "student_onnx_static_int8": ("model.static_int8.onnx", "tokenizer.json", "student"),
}


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def feeds(encoder: Encoder, chunks: list[list[str]]) -> list[dict[str, np.ndarray]]:
    return [dict(zip(("input_ids", "attention_mask"), encoder.arrays(c), strict=True))
            for c in chunks]


def still_predict(bundle: Path, texts: list[str], threads: int, copies: int = 20) -> float:
    """texts/s that `still predict --input` reports for a CSV of `copies` copies of `texts` (its
    own timer: from the first read to the last line written; with 317 texts alone, reading the
    file and the sessions' first runs would be a third of the time)."""
    texts = texts * copies
    with tempfile.TemporaryDirectory(prefix="still-crosscheck-") as tmp:
        src, out = Path(tmp) / "texts.csv", Path(tmp) / "preds.jsonl"
        pd.DataFrame({"text": texts}).to_csv(src, index=False)
        still = Path(sys.executable).with_name("still")
        proc = subprocess.run([str(still), "predict", "--bundle", str(bundle), "--input",
                               str(src), "--output", str(out), "--threads", str(threads)],
                              capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            raise SystemExit(f"still predict failed: {proc.stderr.strip()[-800:]}")
        found = re.search(r"\(([\d.]+) texts/s\)", proc.stderr)
        if not found:
            raise SystemExit(f"still predict printed no texts/s line: {proc.stderr[-800:]}")
        return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--ort-optimize", action="store_true")
    parser.add_argument("--no-bundle", action="store_true",
                        help="skip the shipped bundle's predict (no ship stage run yet)")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.evaluate
    pin_tokenizer_threads(cfg.num_threads)
    export = Path(params.paths.export)
    metrics = json.loads((Path(params.paths.results) / "metrics.json").read_text())
    evaluated = metrics["systems"]
    texts = pd.read_parquet(Path(params.paths.data) / "test.parquet")["text"].tolist()
    bs = cfg.throughput_batch_size
    chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
    min_tokens = json.loads((export / "metrics.json").read_text()).get("min_tokens", 1)
    lengths = {"teacher": params.teacher.max_length, "student": params.distill.max_length}
    t_cfg = json.loads((Path(params.paths.teacher) / "config.json").read_text())
    s_cfg = json.loads((Path(params.paths.student) / "config.json").read_text())
    shapes = {"teacher": (t_cfg["num_attention_heads"], t_cfg["hidden_size"]),
              "student": (s_cfg["heads"], s_cfg["hidden"])}
    encoders = {side: Encoder(Tokenizer.from_file(str(export / tok)), lengths[side],
                              min_tokens if side == "student" else 1)
                for side, tok in (("teacher", "teacher.tokenizer.json"),
                                  ("student", "tokenizer.json"))}

    models = {}
    scratch = tempfile.TemporaryDirectory(prefix="still-crosscheck-")
    for name, (onnx_file, _, side) in FILES.items():
        if not (export / onnx_file).is_file():
            print(f"{name}: {export / onnx_file} missing, left out")
            continue
        padded = feeds(encoders[side], chunks)
        models[name] = (session(export / onnx_file, cfg.num_threads), padded, side)
        if args.ort_optimize and not onnx_file.endswith("int8.onnx"):
            opt = optimized_copy(export / onnx_file, Path(scratch.name) / f"opt-{onnx_file}",
                                 *shapes[side])
            models[f"{name}_ortopt"] = (session(opt, cfg.num_threads), padded, side)

    for sess, padded, side in models.values():  # warm-up
        for feed, chunk in zip(padded[:2], chunks[:2], strict=False):
            sess.run(None, feed)
            encoders[side].arrays(chunk)
    model_rates: dict[str, list[float]] = {name: [] for name in models}
    e2e_rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (sess, padded, side) in models.items():
            start = time.perf_counter()
            for feed in padded:
                sess.run(None, feed)
            model_rates[name].append(len(texts) / (time.perf_counter() - start))
            enc = encoders[side]
            start = time.perf_counter()
            for chunk in chunks:  # text in, logits out, batch after batch
                ids, mask = enc.arrays(chunk)
                sess.run(None, {"input_ids": ids, "attention_mask": mask})
            e2e_rates[name].append(len(texts) / (time.perf_counter() - start))
    here = {name: float(np.median(r)) for name, r in model_rates.items()}
    here_e2e = {name: float(np.median(r)) for name, r in e2e_rates.items()}

    print(f"\n{len(texts)} test examples, batch {bs}, {cfg.num_threads} threads, "
          f"{args.rounds} rounds round-robin (median)")
    print(f"{'system':<28}{'model here':>11}{'evaluate':>10}{'here/ev':>9}"
          f"{'e2e here':>11}{'evaluate':>10}{'here/ev':>9}")
    ok = True
    for name in here:
        ev = evaluated.get(name, {})
        cells = []
        for key, value in (("model_throughput_per_s", here[name]),
                           ("throughput_per_s", here_e2e[name])):
            cells.append(f"{value:>11.1f}")
            cells.append(f"{ev[key]:>10.1f}{value / ev[key]:>9.2f}" if ev.get(key)
                         else f"{'-':>10}{'-':>9}")
        print(f"{name:<28}" + "".join(cells))

    for label, measured, key in (("model time", here, "model_throughput_per_s"),
                                 ("end to end", here_e2e, "throughput_per_s")):
        print(f"\n{'ratio (' + label + ')':<52}{'here':>8}{'evaluate':>10}{'agree':>8}")
        students = [n for n in measured if models[n][2] == "student"]
        teachers = [n for n in measured if models[n][2] == "teacher"]
        for s in students:
            for t in teachers:
                ratio = measured[s] / measured[t]
                ev_s, ev_t = evaluated.get(s, {}), evaluated.get(t, {})
                if key in ev_s and key in ev_t:
                    ev = ev_s[key] / ev_t[key]
                    agree = abs(ratio / ev - 1) <= args.tolerance
                    ok &= agree
                    print(f"{s + ' / ' + t:<52}{ratio:>8.2f}{ev:>10.2f}"
                          f"{'yes' if agree else 'NO':>8}")
                else:
                    print(f"{s + ' / ' + t:<52}{ratio:>8.2f}{'-':>10}{'-':>8}")
    for name in here:
        if name.endswith("_ortopt"):
            base = name.removesuffix("_ortopt")
            print(f"ORT transformer optimizer, {base}: {here[name] / here[base]:.2f}x "
                  "(optimized / plain)")
    scratch.cleanup()

    if not args.no_bundle:
        from components.serving.bundle import load_bundle

        bundle_dir = Path(params.paths.bundle)
        bundle = load_bundle(bundle_dir, threads=cfg.num_threads)
        shipped = bundle.model_name
        bundle.predict(texts[:bs])  # warm-up
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            bundle.predict(texts)
            rates.append(len(texts) / (time.perf_counter() - start))
        in_process = float(np.median(rates))
        cli = still_predict(bundle_dir, texts, cfg.num_threads)
        ev = evaluated[shipped]["throughput_per_s"]
        deployed = (metrics.get("deployed") or {}).get("student") or {}
        print(f"\nthe shipped bundle ({shipped}), texts/s        here  vs evaluate e2e "
              f"{ev:.1f}  agree")
        for label, rate in (("load_bundle(...).predict", in_process),
                            ("still predict --input (CSV, own timer)", cli)):
            agree = abs(rate / ev - 1) <= args.tolerance
            ok &= agree
            print(f"{label:<44}{rate:>8.1f}{rate / ev:>16.2f}{'yes' if agree else 'NO':>7}")
        if deployed:
            print(f"{'evaluate deployed path (bundle Predictor)':<44}"
                  f"{deployed['throughput_per_s']:>8.1f}"
                  f"{deployed['throughput_per_s'] / ev:>16.2f}")
    print("\nagreement within "
          f"{100 * args.tolerance:.0f}%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
