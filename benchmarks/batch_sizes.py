"""Throughput of every evaluated system across batch sizes, measured side by side in one run.

Uses the artifacts of a finished pipeline (`dvc repro`) and the same systems and timing code as
the evaluate stage, and prints examples/s and the ratio to the teacher for each batch size.

    python benchmarks/batch_sizes.py [--batch-sizes 1 8 32 64] [--examples 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from components.config import load_params
from components.data.artifacts import load_split
from components.evaluation.systems import build_systems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    torch.set_num_threads(params.evaluate.num_threads)
    texts = load_split(params.paths, "test")["text"].tolist()[: args.examples]
    systems, trt_skip = build_systems(params)
    if trt_skip:
        print(f"TensorRT engines left out: {trt_skip}")
    print(f"{len(texts)} test examples, {params.evaluate.num_threads} threads; "
          "examples/s (ratio to teacher)")
    print(f"{'batch':>6} " + " ".join(f"{s.name:>24}" for s in systems))
    for bs in args.batch_sizes:
        chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
        rates = []
        for system in systems:
            system.logits(chunks[0])  # warm-up
            start = time.perf_counter()
            for chunk in chunks:
                system.logits(chunk)
            rates.append(len(texts) / (time.perf_counter() - start))
        cells = [f"{r:>14.1f} ({r / rates[0]:>5.2f}x)" for r in rates]
        print(f"{bs:>6} " + " ".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
