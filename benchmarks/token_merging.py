"""Token merging: accuracy, FLOPs and ONNX Runtime throughput of the default student with
merging off and at several merge settings, trained and measured side by side in one run.

Every configuration is the default `distill` stage (same data, tokenizer, cached teacher
outputs, seed, epochs) with only `distill.merge.*` changed, then the default `export` stage
(ONNX FP32 with the parity check). Accuracy is on the test split; GFLOPs per example are the
analytic count of `components/evaluation/flops.py` over the test split's real token counts;
throughput is ONNX Runtime FP32 on pre-tokenised test batches (tokenisation is the same for every
model and left out), timed round-robin over `--rounds` rounds so that machine noise hits all
configurations alike, best round kept.

Needs the default pipeline's prepare, tokenizer and teacher outputs (`dvc repro teacher`).
Students and ONNX files go to `--out` (default `artifacts/benchmarks/token_merging/`,
git-ignored); a student already there with exactly the same resolved params is reused
(`--retrain` to redo).

    python benchmarks/token_merging.py [--configs off tome:16 tome:24 pitome:24] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from components import export
from components.config import apply_overrides, load_params, stage_params, validate
from components.config.redaction import redact
from components.data.artifacts import STUDENT_FP32, TOKENIZER_FILE, load_split
from components.data.files import PARAMS_FILE, read_json
from components.distill import train as distill
from components.evaluation.flops import encoder_flops
from components.models import student as student_io
from components.models.runtimes import ort_session
from components.stage import StageError
from components.text.batches import encode
from components.text.encoding import pad_id
from components.text.tensors import pad_batch


def parse_config(text: str) -> tuple[str, dict]:
    if text == "off":
        return text, {"distill.merge.method": "none", "distill.merge.r": 0}
    method, _, r = text.partition(":")
    if method not in ("tome", "pitome") or not r.isdigit():
        raise SystemExit(f"config {text!r}: expected off, tome:R or pitome:R")
    return text, {"distill.merge.method": method, "distill.merge.r": int(r)}


def _already_trained(p) -> dict | None:
    """The metrics of a student this script trained before with exactly these params."""
    folder = Path(p.paths.student)
    try:
        if read_json(folder / PARAMS_FILE) == json.loads(json.dumps(redact(
                stage_params(p, "distill")))):
            return read_json(folder / "metrics.json")
    except StageError:
        pass
    return None


def train_and_export(params, name: str, overrides: dict, out: Path, retrain: bool):
    folder = out / name.replace(":", "_r")
    raw = apply_overrides(params.to_dict(), {
        **overrides,
        "paths.student": str(folder / "student"),
        "paths.export": str(folder / "export"),
        "tracking.mode": "disabled",
    })
    p = validate(raw, f"config {name}")
    d = None if retrain else _already_trained(p)
    if d is not None:
        print(f"{name}: reusing the student in {p.paths.student} (same params; --retrain to redo)")
        train_s = float("nan")
    else:
        start = time.perf_counter()
        d = distill.run(p)
        train_s = time.perf_counter() - start
    e = export.run(p)
    return p, d, e, train_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["off", "tome:16", "tome:24",
                                                          "pitome:24"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/benchmarks/token_merging")
    parser.add_argument("--retrain", action="store_true",
                        help="train every student again even if --out holds one with the same "
                             "params")
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.configs]
    if configs[0][0] != "off":
        configs.insert(0, parse_config("off"))  # the reference every ratio is taken against

    params = load_params(args.params)
    out = Path(args.out)
    test = load_split(params.paths, "test")
    labels = test["label"].to_numpy()
    rows = []
    for name, overrides in configs:
        print(f"=== {name}: distill + export", flush=True)
        p, d, e, train_s = train_and_export(params, name, overrides, out, args.retrain)
        model = student_io.load(p.paths.student)
        cfg = model.cfg
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(p.paths.student) / TOKENIZER_FILE))
        ids = encode(tok, test["text"].tolist(), cfg.max_length)
        batches = [pad_batch(ids[i : i + args.batch_size], pad_id(tok), cfg.min_tokens())
                   for i in range(0, len(ids), args.batch_size)]
        feeds = [{"input_ids": x.numpy(), "attention_mask": m.numpy()} for x, m in batches]
        sess = ort_session(Path(p.paths.export) / STUDENT_FP32, params.evaluate.num_threads)
        logits = np.concatenate([sess.run(["logits"], f)[0] for f in feeds])
        merge = {layer: cfg.merge_r for layer in cfg.merging_layers()}
        flops = np.mean([encoder_flops(len(x), cfg.layers, cfg.hidden, cfg.intermediate,
                                       cfg.num_labels, merge) for x in ids])
        rows.append({"config": name, "accuracy": float((logits.argmax(-1) == labels).mean()),
                     "val_accuracy": d["val_accuracy"], "gflops": float(flops) / 1e9,
                     "min_tokens": cfg.min_tokens(), "train_s": train_s,
                     "parity_max_abs_error": e["fp32"]["max_abs_error"],
                     "session": sess, "feeds": feeds, "best_s": float("inf")})

    n = len(labels)
    for _ in range(args.rounds):  # round-robin: every config sees the same machine state
        for row in rows:
            row["session"].run(["logits"], row["feeds"][0])  # warm-up
            start = time.perf_counter()
            for feed in row["feeds"]:
                row["session"].run(["logits"], feed)
            row["best_s"] = min(row["best_s"], time.perf_counter() - start)

    ref = rows[0]
    print(f"\n{n} test examples, ONNX Runtime FP32, batch {args.batch_size}, "
          f"{params.evaluate.num_threads} threads, best of {args.rounds} round-robin rounds")
    header = (f"{'config':<11}{'test acc':>9}{'Δacc pt':>9}{'GFLOPs':>8}{'FLOPs vs off':>13}"
              f"{'ex/s':>8}{'thru vs off':>12}{'parity':>10}")
    print(header)
    report = []
    for row in rows:
        rate = n / row["best_s"]
        cells = {k: v for k, v in row.items() if k not in ("session", "feeds", "best_s")}
        cells.update(throughput_per_s=rate, flops_vs_off=row["gflops"] / ref["gflops"],
                     throughput_vs_off=rate / (n / ref["best_s"]),
                     accuracy_delta_points=100 * (row["accuracy"] - ref["accuracy"]))
        report.append(cells)
        print(f"{row['config']:<11}{row['accuracy']:>9.4f}{cells['accuracy_delta_points']:>+9.2f}"
              f"{row['gflops']:>8.3f}{cells['flops_vs_off']:>12.2f}x{rate:>8.1f}"
              f"{cells['throughput_vs_off']:>11.2f}x{row['parity_max_abs_error']:>10.1e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out / 'results.json'}")


if __name__ == "__main__":
    main()
