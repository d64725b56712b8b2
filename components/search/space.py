"""The search space: params.yaml's `search.space` (a list of values per lever) turned into
the overrides of a trial, asked of an Optuna trial one lever at a time, and checked up front
(a space with nothing to choose, or with no point that is valid params, is refused)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

# search.space key -> the params key it sets. `hidden` also sets `distill.intermediate` (4x);
# `merge_r` applies only when `merge` is not none, `teacher_layers` only with `init: teacher`
# (whose width comes from the teacher: `hidden` and `heads` do not apply).
LEVERS: dict[str, str] = {
    "layers": "distill.layers",
    "hidden": "distill.hidden",
    "heads": "distill.heads",
    "max_length": "distill.max_length",
    "windows": "distill.windows.enabled",
    "init": "distill.init",
    "teacher_layers": "distill.teacher_layers",
    "merge": "distill.merge.method",
    "merge_r": "distill.merge.r",
    "vocab_size": "tokenizer.vocab_size",
}
TRIAL_FILE = "trial.json"  # what a trial left: its overrides and the distill metrics
STUDENT_DIR = "student"  # the trial's student folder, kept for the finalists' timing


def _label(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a list (teacher_layers) goes in as text."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _applies(lever: str, chosen: dict[str, Any]) -> bool:
    if lever == "merge_r":
        return chosen.get("merge", "none") != "none"
    if lever == "teacher_layers":
        return chosen.get("init") == "teacher"
    if lever in ("hidden", "heads"):
        return chosen.get("init") != "teacher"
    return True


def overrides_for(chosen: dict[str, Any]) -> dict[str, Any]:
    """The params overrides (dotted keys) a point of the space sets."""
    out = {}
    for lever, value in chosen.items():
        if not _applies(lever, chosen):
            continue
        out[LEVERS[lever]] = value
        if lever == "hidden":
            out["distill.intermediate"] = 4 * value
    if chosen.get("merge") == "none":
        out["distill.merge.r"] = 0
    return out


def suggest(trial, space: dict[str, list[Any]]) -> dict[str, Any]:
    """One point of the space, asked of an Optuna trial (levers with one value are fixed; a
    lever that does not apply to the point, e.g. `merge_r` without merging, is not asked)."""
    chosen: dict[str, Any] = {}
    for lever in _ordered(space):
        values = space[lever]
        if not _applies(lever, chosen):
            continue
        if len(values) == 1:
            chosen[lever] = values[0]
            continue
        labels = [_label(v) for v in values]
        picked = trial.suggest_categorical(lever, labels)
        chosen[lever] = values[labels.index(picked)]
    return chosen


def _ordered(space: dict[str, list[Any]]) -> list[str]:
    """Levers in asking order: those others depend on (init, merge) first."""
    first = [lever for lever in ("init", "merge") if space.get(lever)]
    return first + [lever for lever in LEVERS if space.get(lever) and lever not in first]


def count_points(space: dict[str, list[Any]], limit: int = 4096) -> int:
    return sum(1 for _ in points(space, limit))


def points(space: dict[str, list[Any]], limit: int = 512) -> Iterator[dict[str, Any]]:
    """Points of the space (at most `limit`, in product order), for the up-front check."""
    levers = _ordered(space)
    seen = set()
    for values in itertools.islice(itertools.product(*(space[k] for k in levers)), limit):
        chosen = dict(zip(levers, values, strict=True))
        chosen = {k: v for k, v in chosen.items() if _applies(k, chosen)}
        key = json.dumps(chosen, sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield chosen


def space_problems(space: dict[str, list[Any]], validate) -> list[str]:
    """Why the space cannot be searched: empty, or no point of it is valid params
    (`validate(overrides)` returns the problem of one point, or None)."""
    if not any(len(v) > 1 for v in space.values()):
        return ["search.space: no lever has two or more values to choose from: nothing to "
                "search (list at least two values for one lever)"]
    first = None
    for chosen in points(space):
        problem = validate(overrides_for(chosen))
        if problem is None:
            return []
        first = first or (chosen, problem)
    chosen, problem = first
    return [f"search.space: contradictory: no point of the space is valid params; e.g. "
            f"{chosen}: {problem}"]
