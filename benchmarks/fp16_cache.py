"""Does a float16 teacher cache cost feature distillation anything? (issue 16)

The teacher_cache stage stores the teacher's mean-pooled hidden states as float16 (half the bytes of
the cache). Those states are only read by feature distillation (`distill.feature`), so this
trains the same student twice with feature terms on, once against the pipeline's float16 cache
and once against a float32 cache of the same teacher on the same texts, with the same seed,
and compares what the students keep: validation accuracy and loss from the distill stage,
test accuracy in PyTorch (with a seeded 95% bootstrap interval), agreement between the two
students, and the largest difference between the two caches' states.

Needs the default pipeline's prepare, tokenizer, teacher and teacher_cache stages (`dvc repro
teacher_cache`). Writes under `--out` (default artifacts/benchmarks/fp16_cache): the float32 cache
(the teacher_cache stage run again, with float32 states) and both students.

    python benchmarks/fp16_cache.py [--pooled-weight 1.0] [--hidden-weight 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from components import teacher_cache
from components.config import apply_overrides, load_params, validate
from components.data.artifacts import load_label_names, load_split, load_teacher_outputs
from components.distill import train as distill
from components.evaluation.stats import Bootstrap
from components.models.student import load
from components.text.batches import chunks, encode
from components.text.encoding import pad_id
from components.text.tensors import batches


def test_predictions(student: Path, params) -> np.ndarray:
    from tokenizers import Tokenizer

    model = load(student).eval()
    tok = Tokenizer.from_file(str(student / "tokenizer.json"))
    test = load_split(params.paths, "test")
    ids = encode(tok, test["text"], params.distill.max_length)
    with torch.no_grad():
        logits = torch.cat([model(i, m) for i, m in batches(ids, 64, pad_id(tok),
                                                             model.cfg.min_tokens())])
    return logits.argmax(-1).numpy()


def max_state_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key in (k for k in a if k.endswith("_layers")):
        for x, y in zip(chunks(a[key], 4096), chunks(b[key], 4096), strict=True):
            worst = max(worst, float(np.abs(x.astype(np.float32) - y).max(initial=0)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="artifacts/benchmarks/fp16_cache")
    ap.add_argument("--pooled-weight", type=float, default=1.0)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--teacher-layer", type=int, default=3,
                    help="teacher hidden state matched by the student's first block")
    args = ap.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    params = load_params(args.params)
    fp32_cache = out / "teacher_outputs_fp32"
    fp32 = validate(apply_overrides(params.to_dict(), {"paths.teacher_outputs": str(fp32_cache)}))
    if not (fp32_cache / "outputs.json").is_file():
        print("fp16_cache: labelling again with float32 states ...", flush=True)
        teacher_cache.run(fp32, layers_dtype=np.float32)
    caches = {"float16": params, "float32": fp32}
    gap = max_state_difference(load_teacher_outputs(params.paths),
                               load_teacher_outputs(fp32.paths))

    feature = {"distill.feature.pooled_weight": args.pooled_weight,
               "distill.feature.hidden_weight": args.hidden_weight,
               "distill.feature.layer_map": {0: args.teacher_layer}}
    results, preds = {}, {}
    labels = load_split(params.paths, "test")["label"].to_numpy()
    boot = Bootstrap(labels, len(load_label_names(params.paths)), params.evaluate.bootstrap,
                     params.seed)
    for name, p in caches.items():
        student = out / f"student_{name}"
        run = validate(apply_overrides(p.to_dict(), {**feature, "paths.student": str(student)}))
        print(f"fp16_cache: distilling against the {name} cache ...", flush=True)
        metrics = distill.run(run)
        preds[name] = test_predictions(student, run)
        results[name] = {"val_accuracy": metrics["val_accuracy"],
                         "val_loss": metrics["val_loss"],
                         "test_accuracy": float((preds[name] == labels).mean()),
                         "test_ci95": boot.scores(preds[name])["accuracy_ci"]}
    agreement = float((preds["float16"] == preds["float32"]).mean())
    print(f"\nfeature distillation (pooled {args.pooled_weight}, hidden {args.hidden_weight}, "
          f"student block 0 -> teacher state {args.teacher_layer}), one student per cache, "
          f"seed {params.seed}")
    print(f"largest |float16 - float32| over every cached state: {gap:.2e}")
    print(f"{'cache':8} {'val acc':>8} {'val loss':>9} {'test acc':>9}  95% CI")
    for name, r in results.items():
        print(f"{name:8} {r['val_accuracy']:8.4f} {r['val_loss']:9.4f} "
              f"{r['test_accuracy']:9.4f}  [{r['test_ci95'][0]:.4f}, {r['test_ci95'][1]:.4f}]")
    diff = boot.difference(preds["float16"], preds["float32"])
    print(f"the two students agree on {agreement:.4f} of test examples; float16 - float32 "
          f"test accuracy {100 * diff['accuracy_diff']:+.2f} pt, 95% CI "
          f"[{100 * diff['accuracy_diff_ci'][0]:+.2f}, {100 * diff['accuracy_diff_ci'][1]:+.2f}]")
    print(f"benchmark wall time {(time.perf_counter() - start) / 60:.1f} min")
    (out / "results.json").write_text(json.dumps(
        {"max_state_difference": gap, "students": results, "test_agreement": agreement,
         "test_accuracy_difference": diff},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
