"""Teacher/student cascade: the student answers the inputs it is sure of, the teacher the rest.

Given the student's and the teacher's logits on one split and their measured costs:

- **confidence** of the student per example, in [0, 1], by `evaluate.cascade.confidence`:
  `max_prob` (largest softmax probability), `margin` (top-1 minus top-2 probability) or
  `entropy` (1 - H(p) / log C: 1 for a one-hot distribution, 0 for a uniform one);
- an example is **deferred** to the teacher when its confidence is below the threshold `t`;
  `t = 0` never defers (the student alone), `t >= 1` defers everything (the teacher alone, since
  the student has already run: its cost is paid first, as in a real cascade);
- **expected cost** per example = student cost + deferred fraction * teacher cost, where each
  cost is the measured end-to-end time per example (tokenisation included) at the deployment
  batch size, so the curve is in milliseconds, not guesses;
- the **chosen threshold** is the one deferring the fewest inputs whose accuracy reaches the
  target on the *validation* split (evaluate then reports that threshold once on test, where it
  was not chosen); when no threshold reaches it, none is chosen and the report says so. Since
  the cost grows with the deferred fraction, that is also the cheapest threshold, on any machine:
  the choice depends on predictions only, never on this machine's timings.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

CONFIDENCES = ("max_prob", "margin", "entropy")


def confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    """Per-example confidence in [0, 1] (see the module docstring)."""
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {kind!r}")
    p = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    if kind == "max_prob":
        return p.max(-1)
    if kind == "margin":
        top2 = np.sort(p, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    c = p.shape[-1]
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    return 1.0 - h / np.log(c) if c > 1 else np.ones(len(p))


def deferred(student_logits: np.ndarray, kind: str, threshold: float) -> np.ndarray:
    """Which examples go to the teacher at `threshold` (all of them at >= 1)."""
    conf = confidence(student_logits, kind)
    return np.ones_like(conf, dtype=bool) if threshold >= 1 else conf < threshold


def predictions(student_logits: np.ndarray, teacher_logits: np.ndarray, kind: str,
                threshold: float) -> np.ndarray:
    """The cascade's predicted classes at one threshold."""
    defer = deferred(student_logits, kind, threshold)
    return np.where(defer, teacher_logits.argmax(-1), student_logits.argmax(-1))


def curve(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray,
          kind: str, thresholds: list[float]) -> list[dict]:
    """One point per threshold: accuracy and the fraction deferred to the teacher."""
    points = []
    for t in sorted(set(float(x) for x in thresholds)):
        defer = deferred(student_logits, kind, t)
        pred = predictions(student_logits, teacher_logits, kind, t)
        points.append({"threshold": t, "accuracy": float((pred == labels).mean()),
                       "deferred_fraction": float(defer.mean())})
    return points


def costed(points: list[dict], student_ms: float, teacher_ms: float) -> list[dict]:
    """`points` with the expected cost per example and the speedup over the teacher alone."""
    out = []
    for p in points:
        cost = student_ms + p["deferred_fraction"] * teacher_ms
        out.append({**p, "expected_ms_per_example": cost, "speedup_vs_teacher": teacher_ms / cost})
    return out


def choose(points: list[dict], target_accuracy: float) -> dict | None:
    """The point deferring least that reaches `target_accuracy` (ties: the more accurate, then
    the lower threshold), or None."""
    ok = [p for p in points if p["accuracy"] >= target_accuracy - 1e-12]
    if not ok:
        return None
    return min(ok, key=lambda p: (p["deferred_fraction"], -p["accuracy"], p["threshold"]))
