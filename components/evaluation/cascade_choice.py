"""The cascade as evaluate measures it: the threshold chosen on validation and scored once on test
(`run_cascade`), its costs from the systems' measured times (`cost_cascade`), and its place in
the metrics (`add_cascade`). The policy math itself (numpy only, shared with the bundle) is
`components.evaluation.cascade`."""

from __future__ import annotations

import numpy as np

from components.config import Params
from components.evaluation.cascade import choose, costed, curve, predictions
from components.evaluation.stats import Bootstrap, versus
from components.stage import StageError

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
