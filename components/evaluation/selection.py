"""Choosing among systems and the numbers the choices rest on: each system's quality with
intervals (`quality`), the best teacher runtime and the headline student chosen on validation
(`best_of`), every system against the best teacher runtime on test (`compare_to_reference`),
speed and size ratios (`ratios`), Pareto fronts, and the summary evaluate writes as metrics.

Pareto front (maximise accuracy, and throughput or minimise size/latency): a point is on the
front when no other point is at least as good on both axes and strictly better on one."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from components.config import Params
from components.evaluation.stats import Bootstrap, versus
from components.evaluation.systems import System


def pareto_front(points: list[dict], x: str, maximize_x: bool, y: str = "accuracy") -> list[str]:
    """Names (`system`) of the non-dominated points, sorted along x."""
    sign = 1.0 if maximize_x else -1.0

    def dominates(a: dict, b: dict) -> bool:
        ax, bx = sign * a[x], sign * b[x]
        return ax >= bx and a[y] >= b[y] and (ax > bx or a[y] > b[y])

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return [p["system"] for p in sorted(front, key=lambda p: p[x])]

# ----------------------------------------------------------------------------------- quality

def scores(logits: np.ndarray, labels: np.ndarray, boot: Bootstrap) -> dict:
    """Accuracy and macro-F1 of one system on one split, with their 95% intervals."""
    preds = logits.argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro")),
            **boot.scores(preds)}


def quality(system: System, test: np.ndarray, validation: np.ndarray, texts: list[str],
            labels: np.ndarray, val_labels: np.ndarray, boot: Bootstrap,
            val_boot: Bootstrap) -> dict:
    """A system's quality on test (top level) and validation (`validation`), and its cost in
    tokens, GFLOPs, bytes and parameters."""
    ids = system.encoder.ids(texts)
    return {
        "runtime": system.runtime,
        "side": system.side,
        **scores(test, labels, boot),
        "validation": scores(validation, val_labels, val_boot),
        "size_mb": system.size_bytes / 1e6,
        "parameters": system.parameters,
        "tokens_per_example": float(np.mean([len(x) for x in ids])),
        "gflops_per_example": float(np.mean([system.flops(len(x)) for x in ids])) / 1e9,
    }


def best_of(results: dict[str, dict], side: str) -> str | None:
    """The fastest system of `side` (end-to-end throughput) whose *validation* accuracy is
    within the 95% interval of that side's most accurate system on validation: a faster
    runtime that is not measurably worse is the one a user deploys. Test never decides."""
    names = [n for n, r in results.items() if r["side"] == side]
    if not names:
        return None

    def val(name: str) -> dict:
        return results[name]["validation"]

    top = max(names, key=lambda n: (val(n)["accuracy"], results[n]["throughput_per_s"]))
    low = val(top)["accuracy_ci"][0]
    ok = [n for n in names if val(n)["accuracy"] >= low]
    return max(ok, key=lambda n: results[n]["throughput_per_s"])


def ratios(results: dict[str, dict], reference: str) -> dict[str, float]:
    """Speed ratios of every student against the best teacher runtime and PyTorch eager, and
    size/tokens/FLOPs ratios of the student network against the teacher network."""
    ref, eager = results[reference], results["teacher"]
    out: dict[str, float] = {}
    for name, r in results.items():
        if r["side"] != "student":
            continue
        out[f"{name}_throughput_vs_best_teacher"] = r["throughput_per_s"] / ref["throughput_per_s"]
        out[f"{name}_model_throughput_vs_best_teacher"] = (
            r["model_throughput_per_s"] / ref["model_throughput_per_s"])
        out[f"{name}_throughput_vs_teacher_pytorch"] = (
            r["throughput_per_s"] / eager["throughput_per_s"])
    s = results["student"]
    out["student_size_vs_teacher"] = s["size_mb"] / eager["size_mb"]
    out["student_tokens_vs_teacher"] = s["tokens_per_example"] / eager["tokens_per_example"]
    out["student_flops_vs_teacher"] = s["gflops_per_example"] / eager["gflops_per_example"]
    for side in ("student", "teacher"):
        prefix = "" if side == "student" else "teacher_"
        for form in ("int8", "static_int8"):
            fp32, int8 = f"{side}_onnx", f"{side}_onnx_{form}"
            if fp32 in results and int8 in results:
                q, f = results[int8], results[fp32]
                out[f"{prefix}{form}_throughput_vs_fp32"] = (
                    q["throughput_per_s"] / f["throughput_per_s"])
                out[f"{prefix}{form}_model_throughput_vs_fp32"] = (
                    q["model_throughput_per_s"] / f["model_throughput_per_s"])
                out[f"{prefix}{form}_accuracy_minus_fp32"] = q["accuracy"] - f["accuracy"]
    return out


def deployed_summary(params: Params, deployed: dict | None, note: str,
                     results: dict[str, dict]) -> dict:
    """What the deployed path measured, beside the figure the system table gives for the same
    graph (they time the same work two ways: their ratio should stay near 1)."""
    name = params.evaluate.cascade.student
    out = {"system": name, "timed": note, "path": "components.bundle.Predictor (text in, "
           "label out), the path `still predict` and `load_bundle(...).predict` run"}
    if deployed:
        out.update(deployed)
        if name in results:
            out["student"]["vs_evaluate_end_to_end"] = (
                deployed["student"]["throughput_per_s"] / results[name]["throughput_per_s"])
    return out


def compare_to_reference(results: dict[str, dict], logits: dict[str, np.ndarray],
                         reference: str, boot: Bootstrap) -> None:
    """Add to every other system its paired test accuracy difference from `reference` (the
    best teacher runtime), with interval and McNemar's exact test (`vs_best_teacher`)."""
    ref_preds = logits[reference].argmax(-1)
    for name, r in results.items():
        if name != reference:
            r["vs_best_teacher"] = versus(boot, logits[name].argmax(-1), ref_preds)


def headline_of(results: dict[str, dict], headline: str, reference: str,
                speed: dict[str, float]) -> dict:
    """The headline student against the best teacher runtime: accuracy, speed, difference."""
    return {"student": headline, "best_teacher": reference,
            "validation_accuracy": results[headline]["validation"]["accuracy"],
            "accuracy": results[headline]["accuracy"],
            **{k: speed[f"{headline}_{k}"] for k in (
                "throughput_vs_best_teacher", "model_throughput_vs_best_teacher",
                "throughput_vs_teacher_pytorch")},
            **results[headline]["vs_best_teacher"]}


def summarize(results: dict[str, dict], reference: str, headline: str, counts: dict,
              tensorrt: str | None, uncertainty: dict, deployed: dict) -> dict:
    """Everything evaluate measured and decided, as `metrics.json` holds it."""
    speed = ratios(results, reference)
    return {**counts, "systems": results, "best_teacher": reference,
            "headline_student": headline, "chosen_on": "validation",
            "ratios": speed, "tensorrt": tensorrt or "evaluated", "uncertainty": uncertainty,
            "headline": headline_of(results, headline, reference, speed),
            "deployed": deployed}


def system_points(results: dict[str, dict]) -> list[dict]:
    """One flat point per system (its scalars and accuracy interval): plots and W&B tables."""
    return [{"system": name, **{k: v for k, v in r.items()
                                if isinstance(v, str | int | float) or k == "accuracy_ci"}}
            for name, r in results.items()]
