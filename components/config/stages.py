"""The params each stage declares in dvc.yaml, and the slice of them written beside its output."""

from __future__ import annotations

from typing import Any

from components.config.schema import Params

# The params each stage declares in dvc.yaml (tests/test_contract.py keeps the two equal). The
# params.json beside a stage's output holds exactly these, so a change to another stage's params
# never changes this output's hash (and never reruns the stages downstream of it).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "source": ("prepare.source",),
    "prepare": ("seed", "prepare"),
    "tokenizer": ("tokenizer", "teacher.model", "distill.max_length"),
    "teacher": ("seed", "trainer", "teacher"),
    # Not trainer.devices/strategy/num_nodes: the cache is the same on any number of processes
    # (components.training.teacher_outputs), so scaling the caching out does not invalidate it.
    "teacher_cache": ("trainer.num_threads", "trainer.precision", "teacher.max_length",
              "teacher.eval_batch_size", "distill.windows"),
    "distill": ("seed", "trainer", "distill"),
    "export": ("export", "distill.max_length", "teacher.max_length"),
    "evaluate": ("seed", "evaluate", "teacher.max_length", "distill.max_length"),
    "ship": ("ship", "evaluate.cascade", "evaluate.throughput_batch_size", "prepare.source",
             "teacher.model", "teacher.max_length", "distill"),
}


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The part of `params` that `stage` declares (STAGE_PARAMS), nested as in params.yaml."""
    full, out = params.to_dict(), {}
    for dotted in STAGE_PARAMS[stage]:
        src, dst, parts = full, out, dotted.split(".")
        for part in parts[:-1]:
            src, dst = src[part], dst.setdefault(part, {})
        dst[parts[-1]] = src[parts[-1]]
    return out
