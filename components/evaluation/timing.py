"""How evaluate times the systems: threads pinned, tokenisation per encoder, model time and end to
end per system, round-robin rounds so machine noise hits every system alike; medians with their
IQR."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from components.config import Params
from components.evaluation.stats import timing_summary
from components.evaluation.systems import System

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
