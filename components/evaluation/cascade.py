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

from components.config import Params
from components.evaluation.stats import Bootstrap, versus
from components.stage import StageError

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



# ----------------------------------------------------------------------------------- cascade

def run_cascade(params: Params, test_logits: dict[str, np.ndarray], labels: np.ndarray,
                val_logits: dict[str, np.ndarray], v_labels: np.ndarray,
                boot: Bootstrap) -> dict | None:
    """Student first, the teacher system of `evaluate.cascade` below the confidence threshold;
    the threshold is chosen on the validation split and reported once on test. Predictions
    only: the result is the same on every machine (costs are added by `cost_cascade`)."""
    cfg = params.evaluate.cascade
    if not cfg.enabled:
        return None
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name not in test_logits:
            raise StageError(f"evaluate.cascade.{role} {name!r} is not an evaluated system "
                             f"(evaluated: {', '.join(test_logits)})")
    v_logits = val_logits
    t_val_acc = float((v_logits[cfg.teacher].argmax(-1) == v_labels).mean())
    target = cfg.target_accuracy if cfg.target_accuracy is not None else t_val_acc - cfg.tolerance
    thresholds = np.linspace(0.0, 1.0, cfg.thresholds).tolist()
    val_points = curve(v_logits[cfg.student], v_logits[cfg.teacher], v_labels,
                               cfg.confidence, thresholds)
    test_points = curve(test_logits[cfg.student], test_logits[cfg.teacher], labels,
                                cfg.confidence, thresholds)
    for v, t in zip(val_points, test_points, strict=True):
        t["validation_accuracy"] = v["accuracy"]
        t["validation_deferred_fraction"] = v["deferred_fraction"]
    picked = choose(val_points, target)
    chosen = None
    if picked:
        chosen = dict(next(p for p in test_points if p["threshold"] == picked["threshold"]))
        preds = predictions(test_logits[cfg.student], test_logits[cfg.teacher],
                                    cfg.confidence, picked["threshold"])
        chosen.update(boot.scores(preds))
        chosen["vs_teacher"] = versus(boot, preds, test_logits[cfg.teacher].argmax(-1))
    return {"student": cfg.student, "teacher": cfg.teacher, "confidence": cfg.confidence,
            "chosen_on": "validation", "rule": "fewest deferrals reaching the target accuracy "
                                               "on validation",
            "validation_examples": len(v_labels),
            "teacher_validation_accuracy": t_val_acc, "target_accuracy": target,
            "chosen": chosen, "points": test_points, "validation_points": val_points}


def cost_cascade(casc: dict, results: dict[str, dict], reference: str, batch_size: int,
                 deployed: dict | None) -> dict:
    """`casc` with its costs: the cost model (end-to-end ms per example of the student on every
    input + the deferred fraction of the teacher's, at the deployment batch size) on every
    point, and for the chosen threshold the cascade as it runs (`deployed`, measured through
    the bundle's path) beside it."""
    s_ms = results[casc["student"]]["ms_per_example"]
    t_ms = results[casc["teacher"]]["ms_per_example"]
    out = {**casc, "points": costed(casc["points"], s_ms, t_ms),
           "validation_points": costed(casc["validation_points"], s_ms, t_ms),
           "cost": f"end-to-end ms per example at batch {batch_size} (measured per system): "
                   "student on every input + deferred fraction x teacher; `measured_*`: the "
                   "cascade run through the bundle's code on the test split"}
    if casc["chosen"]:
        chosen = costed([casc["chosen"]], s_ms, t_ms)[0]
        ref_ms = results[reference]["ms_per_example"]
        chosen["speedup_vs_best_teacher"] = ref_ms / chosen["expected_ms_per_example"]
        measured = (deployed or {}).get("cascade")
        if measured:
            chosen["measured_ms_per_example"] = measured["ms_per_example"]
            chosen["measured_throughput_per_s"] = measured["throughput_per_s"]
            chosen["measured_speedup_vs_best_teacher"] = ref_ms / measured["ms_per_example"]
        out["chosen"] = chosen
    return out


def add_cascade(metrics: dict, casc: dict) -> list[dict]:
    """Put the costed cascade (without its curves) into `metrics`, and its speedup among the
    ratios when a threshold was chosen. Returns the chosen cascade as a point beside the
    systems' (for the Pareto plot), or no point."""
    chosen = casc["chosen"]
    metrics["cascade"] = {k: v for k, v in casc.items()
                          if k not in ("points", "validation_points")}
    if not chosen:
        return []
    metrics["ratios"]["cascade_speedup_vs_best_teacher"] = chosen.get(
        "measured_speedup_vs_best_teacher", chosen["speedup_vs_best_teacher"])
    return [{"system": f"cascade@{chosen['threshold']:.2f}", "side": "cascade",
             "accuracy": chosen["accuracy"], "accuracy_ci": chosen["accuracy_ci"],
             "ms_per_example": chosen.get("measured_ms_per_example",
                                          chosen["expected_ms_per_example"])}]
