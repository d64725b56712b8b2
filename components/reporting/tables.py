"""The evaluation report in Markdown: systems with intervals, speed ratios against the best teacher
runtime, the validation-chosen cascade, fronts and noise (`markdown`)."""

from __future__ import annotations

from components.reporting.markdown_tables import table

REPORT_MD = "report.md"


def _ci(v: list[float] | None, spec: str = ".4f") -> str:
    return "-" if not v else f"[{format(v[0], spec)}, {format(v[1], spec)}]"


def _pt(v: float) -> str:
    return f"{100 * v:+.2f}"


def _pt_ci(ci: list[float]) -> str:
    """An accuracy-difference interval in points: `[-4.73, -0.32]`."""
    return f"[{_pt(ci[0])}, {_pt(ci[1])}]"


def _system_rows(metrics: dict) -> list[dict]:
    rows = []
    for name, r in metrics["systems"].items():
        d = r.get("vs_best_teacher")
        v = r.get("validation") or {}
        rows.append({
            "system": name, "runtime": r["runtime"],
            "validation": (f"{v['accuracy']:.4f} {_ci(v.get('accuracy_ci'))}" if v else None),
            "accuracy": f"{r['accuracy']:.4f} {_ci(r.get('accuracy_ci'))}",
            "diff": ("reference" if d is None else
                     f"{_pt(d['accuracy_diff'])} {_pt_ci(d['accuracy_diff_ci'])}"
                     + (" (noise)" if d["within_noise"] else "")),
            "macro_f1": f"{r['macro_f1']:.4f} {_ci(r.get('macro_f1_ci'))}",
            **{k: r.get(k) for k in ("model_throughput_per_s", "throughput_per_s",
                                     "tokenize_ms_per_example", "interplay_ms_per_example",
                                     "latency_p50_ms",
                                     "latency_p95_ms", "model_latency_p50_ms", "size_mb",
                                     "tokens_per_example", "gflops_per_example")},
        })
    return rows


SYSTEM_COLUMNS = [
    ("system", "system", ""), ("runtime", "runtime", ""),
    ("validation", "validation acc [95% CI]", ""),
    ("accuracy", "test acc [95% CI]", ""), ("diff", "Δ test acc vs best teacher, pt [95% CI]", ""),
    ("macro_f1", "macro-F1 [95% CI]", ""),
    ("model_throughput_per_s", "model ex/s", ".1f"), ("throughput_per_s", "end-to-end ex/s", ".1f"),
    ("tokenize_ms_per_example", "tokenize ms/ex", ".3f"),
    ("interplay_ms_per_example", "interplay ms/ex", ".3f"),
    ("latency_p50_ms", "p50 ms (e2e)", ".2f"), ("latency_p95_ms", "p95 ms (e2e)", ".2f"),
    ("model_latency_p50_ms", "p50 ms (model)", ".2f"), ("size_mb", "MB", ".1f"),
    ("tokens_per_example", "tokens/ex", ".1f"), ("gflops_per_example", "GFLOPs/ex", ".3f"),
]


def _speed_rows(metrics: dict) -> list[dict]:
    systems, ratios = metrics["systems"], metrics["ratios"]
    return [{"system": name,
             "vs_best": ratios[f"{name}_throughput_vs_best_teacher"],
             "model_vs_best": ratios[f"{name}_model_throughput_vs_best_teacher"],
             "vs_eager": ratios[f"{name}_throughput_vs_teacher_pytorch"]}
            for name, r in systems.items() if r["side"] == "student"]


def markdown(metrics: dict) -> str:
    """The evaluation report (also the Prefect artifact): systems with intervals, speed ratios
    against the best teacher runtime, the validation-chosen cascade, fronts, noise."""
    lines = (_headline_lines(metrics) + table(_system_rows(metrics), SYSTEM_COLUMNS) + [""]
             + _ratio_lines(metrics) + _noise_and_front_lines(metrics)
             + _deployed_lines(metrics) + _cascade_lines(metrics) + _per_class_lines(metrics))
    if metrics.get("tensorrt") not in (None, "evaluated"):
        lines += ["", f"TensorRT: {metrics['tensorrt']}"]
    return "\n".join(lines) + "\n"


def _headline_lines(metrics: dict) -> list[str]:
    """The headline, how choices were made, and how each column is timed."""
    best = metrics["best_teacher"]
    h = metrics["headline"]
    u = metrics["uncertainty"]
    return [f"# Evaluation: {metrics['test_examples']} test examples", "",
            f"**{h['student']}** runs **{h['throughput_vs_best_teacher']:.2f}x** the best teacher "
            f"runtime (**{best}**) end to end ({h['model_throughput_vs_best_teacher']:.2f}x in "
            f"model time; {h['throughput_vs_teacher_pytorch']:.2f}x PyTorch eager) at "
            f"{_pt(h['accuracy_diff'])} pt test accuracy (95% CI "
            f"{_pt_ci(h['accuracy_diff_ci'])}; McNemar exact p = {h['mcnemar_p']:.3g}"
            + ("; within noise" if h["within_noise"] else "") + ").", "",
            "**Chosen on validation, reported on test.** The best teacher runtime is the "
            "fastest teacher system (end to end) whose validation accuracy lies within the 95% "
            "interval of the most accurate teacher system's on validation; the headline "
            "student is chosen the same way among students"
            + (f" ({metrics.get('validation_examples')} validation examples)"
               if metrics.get("validation_examples") else "")
            + ". Test numbers never decide anything. Intervals: "
            f"{u['method']}, {u['resamples']} resamples, seed {u['seed']}.", "",
            "**How each column is timed** (threads pinned for every pool: PyTorch and ONNX "
            "Runtime intra-op at `evaluate.num_threads`, inter-op 1, ONNX Runtime spinning off, "
            "the tokenizers pool sized once; medians over round-robin rounds):",
            "- *tokenize ms/ex*: text to padded ids (the pre-cut, the tokenizer, padding), "
            "timed per encoder in its own loop, never right after a model call, so systems "
            "sharing a tokenizer show the same figure;",
            "- *model ex/s*, *p50 ms (model)*: padded tensors in, logits out, batch after batch;",
            "- *end-to-end ex/s*, *p50/p95 ms (e2e)*: text in, logits out, as it runs (each "
            "batch tokenised, then run); *interplay ms/ex* is what that costs beyond "
            "tokenisation alone plus the model alone (each evicts the other's working set "
            "from the caches);",
            "- *deployed path*: the bundle's own code (`still predict`), text in, label out, "
            "timed as it runs.", ""]


def _ratio_lines(metrics: dict) -> list[str]:
    best = metrics["best_teacher"]
    lines = ["## Speed of each student against the teacher", ""]
    lines += table(_speed_rows(metrics), [
        ("system", "student system", ""),
        ("vs_best", f"end-to-end vs {best}", ".2f"),
        ("model_vs_best", f"model time vs {best}", ".2f"),
        ("vs_eager", "end-to-end vs teacher (PyTorch eager)", ".2f")]) + [""]
    return lines + ["## Other ratios", ""] + [
        f"- {k}: {v:.3f}" for k, v in metrics["ratios"].items()
        if not k.endswith(("_vs_best_teacher", "_vs_teacher_pytorch"))]


def _noise_and_front_lines(metrics: dict) -> list[str]:
    best = metrics["best_teacher"]
    noise = [n for n, r in metrics["systems"].items()
             if r.get("vs_best_teacher", {}).get("within_noise")]
    lines = ["", "## Within noise", "",
             (f"The accuracy difference from {best} is within noise (its 95% interval contains "
              f"0) for: {', '.join(noise)}. Rank these on cost, not on accuracy."
              if noise else f"Every system's accuracy differs from {best} beyond noise.")]
    fronts = metrics.get("pareto", {})
    if fronts:
        lines += ["", "## Pareto fronts (not dominated on accuracy and cost, point estimates)",
                  ""]
        lines += [f"- accuracy vs {axis}: {', '.join(names)}" for axis, names in fronts.items()]
    return lines


def _cascade_lines(metrics: dict) -> list[str]:
    c = metrics.get("cascade")
    if not c:
        return []
    lines = ["", f"## Cascade: {c['student']} first, {c['teacher']} when {c['confidence']} "
             f"confidence < threshold", ""]
    chosen = c.get("chosen")
    if not chosen:
        return lines + [f"No threshold reaches the target accuracy {c['target_accuracy']:.4f} "
                        "on the validation split."]
    d = chosen["vs_teacher"]
    measured = (f" Measured as it runs (the bundle's code on the test split): "
                f"**{chosen['measured_ms_per_example']:.3f} ms** per example, "
                f"**{chosen['measured_speedup_vs_best_teacher']:.2f}x** the best "
                f"teacher runtime." if "measured_ms_per_example" in chosen else "")
    return lines + [
        f"Threshold **{chosen['threshold']:.2f}**, chosen on the validation split "
        f"({c['validation_examples']} examples: fewest deferrals reaching "
        f"{c['target_accuracy']:.4f}, where it scored "
        f"{chosen['validation_accuracy']:.4f}). On test: accuracy "
        f"{chosen['accuracy']:.4f} {_ci(chosen['accuracy_ci'])} "
        f"({_pt(d['accuracy_diff'])} pt vs {c['teacher']}, "
        f"{_pt_ci(d['accuracy_diff_ci'])}), "
        f"{100 * chosen['deferred_fraction']:.1f}% deferred. Cost model: "
        f"{chosen['expected_ms_per_example']:.3f} ms per example "
        f"({chosen['speedup_vs_teacher']:.2f}x faster than {c['teacher']} alone, "
        f"{chosen['speedup_vs_best_teacher']:.2f}x the best teacher runtime "
        f"{metrics['best_teacher']}).{measured} Cost: {c['cost']}."]


def _per_class_lines(metrics: dict) -> list[str]:
    best_student = metrics.get("best_student")
    if not best_student:
        return []
    return ["", f"## Per-class F1: {best_student['system']}", ""] + table(
        [{"class": k, **v} for k, v in best_student["per_class"].items()],
        [("class", "class", ""), ("precision", "precision", ".3f"),
         ("recall", "recall", ".3f"), ("f1", "F1", ".3f"), ("support", "support", "")])


def _deployed_lines(metrics: dict) -> list[str]:
    """The deployed path (the bundle's `Predictor`) beside the system table's figure."""
    d = metrics.get("deployed")
    if not d:
        return []
    lines = ["", "## Deployed path (`still predict`, `load_bundle(...).predict`)", ""]
    student = d.get("student")
    if not student:
        return lines + [f"Not timed: {d['timed']}."]
    name = d["system"]
    row = metrics["systems"].get(name, {})
    lines.append(f"{name} through the bundle's code, text in, label out, batches of "
                 f"{student['batch_size']}: **{student['throughput_per_s']:.1f} texts/s** "
                 f"({student['ms_per_example']:.3f} ms each)"
                 + (f", {student['vs_evaluate_end_to_end']:.2f}x the end-to-end figure of the "
                    f"table above ({row['throughput_per_s']:.1f} ex/s)"
                    if "vs_evaluate_end_to_end" in student else "") + ".")
    casc = d.get("cascade")
    if casc:
        lines.append(f"The cascade the same way: {casc['throughput_per_s']:.1f} texts/s "
                     f"({casc['ms_per_example']:.3f} ms each, "
                     f"{100 * casc['deferred_fraction']:.1f}% answered by the teacher).")
    return lines
