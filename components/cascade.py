"""Teacher/student cascade: the student answers the inputs it is sure of, the teacher the rest.

For one test split, given the student's and the teacher's logits and their measured latencies:

- **confidence** of the student per example, in [0, 1], by `evaluate.cascade.confidence`:
  `max_prob` (largest softmax probability), `margin` (top-1 minus top-2 probability) or
  `entropy` (1 - H(p) / log C: 1 for a one-hot distribution, 0 for a uniform one);
- an example is **deferred** to the teacher when its confidence is below the threshold `t`;
  `t = 0` never defers (the student alone), `t >= 1` defers everything (the teacher alone, since
  the student has already run: its cost is paid first, as in a real cascade);
- **expected cost** per example = student latency + deferred fraction * teacher latency (both
  measured p50 at `evaluate.latency_batch_size`), so the curve is in milliseconds, not guesses;
- the **chosen threshold** is the cheapest one whose accuracy reaches
  `evaluate.cascade.target_accuracy` (or, when that is None, the teacher's own accuracy minus
  `evaluate.cascade.tolerance`); when no threshold reaches it, none is chosen and the report
  says so.
"""

from __future__ import annotations

import numpy as np

CONFIDENCES = ("max_prob", "margin", "entropy")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    """Per-example confidence in [0, 1] (see the module docstring)."""
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {kind!r}")
    p = softmax(np.asarray(logits, dtype=np.float64))
    if kind == "max_prob":
        return p.max(-1)
    if kind == "margin":
        top2 = np.sort(p, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    c = p.shape[-1]
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    return 1.0 - h / np.log(c) if c > 1 else np.ones(len(p))


def curve(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray,
          student_ms: float, teacher_ms: float, kind: str,
          thresholds: list[float]) -> list[dict]:
    """One point per threshold: accuracy, fraction deferred, expected latency per example."""
    conf = confidence(student_logits, kind)
    s_pred, t_pred = student_logits.argmax(-1), teacher_logits.argmax(-1)
    points = []
    for t in sorted(set(float(x) for x in thresholds)):
        defer = np.ones_like(conf, dtype=bool) if t >= 1 else conf < t
        pred = np.where(defer, t_pred, s_pred)
        frac = float(defer.mean())
        points.append({
            "threshold": t,
            "accuracy": float((pred == labels).mean()),
            "deferred_fraction": frac,
            "expected_latency_ms": student_ms + frac * teacher_ms,
            "speedup_vs_teacher": teacher_ms / (student_ms + frac * teacher_ms),
        })
    return points


def choose(points: list[dict], target_accuracy: float) -> dict | None:
    """The cheapest point reaching `target_accuracy` (ties: the more accurate), or None."""
    ok = [p for p in points if p["accuracy"] >= target_accuracy - 1e-12]
    if not ok:
        return None
    return min(ok, key=lambda p: (p["expected_latency_ms"], -p["accuracy"]))


def plot(points: list[dict], chosen: dict | None, target: float, student_ms: float,
         teacher_ms: float, teacher_acc: float, path) -> None:
    from components.report import pyplot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fr = [p["deferred_fraction"] for p in points]
    acc = [p["accuracy"] for p in points]
    cost = [p["expected_latency_ms"] for p in points]
    left.plot(fr, acc, marker="o", ms=3)
    left.set_xlabel("fraction deferred to the teacher")
    left.set_ylabel("test accuracy")
    left.set_title("Cascade: accuracy vs deferral")
    right.plot(cost, acc, marker="o", ms=3, label="cascade thresholds")
    right.scatter([student_ms], [points[0]["accuracy"]], marker="s", color="tab:green",
                  label="student alone", zorder=3)
    right.scatter([teacher_ms], [teacher_acc], marker="^", color="tab:red",
                  label="teacher alone", zorder=3)
    right.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    if chosen:
        for ax, x in ((left, chosen["deferred_fraction"]), (right, chosen["expected_latency_ms"])):
            ax.scatter([x], [chosen["accuracy"]], s=120, facecolors="none", edgecolors="black",
                       zorder=4)
        right.annotate(f"t={chosen['threshold']:.2f}",
                       (chosen["expected_latency_ms"], chosen["accuracy"]),
                       textcoords="offset points", xytext=(6, -12), fontsize=9)
    right.set_xlabel("expected latency per example (ms, measured)")
    right.set_title("Cascade: accuracy vs cost")
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
