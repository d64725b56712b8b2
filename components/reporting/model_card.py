"""The bundle's model card (README.md): metadata front matter, model details, data, every system's
quality and speed, the cascade, how to use it, limits, provenance. Everything in it comes from
the run's outputs; each section is one function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import Params
from components.reporting.markdown_tables import markdown_table
from components.serving.bundle import LABELS, MANIFEST, MODEL_FILES, PARETO_PNG, SHIPPED_STUDENTS

# ---------------------------------------------------------------------------- model card

def _ci(v: list[float] | None) -> str:
    return f"[{v[0]:.4f}, {v[1]:.4f}]" if v else "-"


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _front_matter(params: Params, quality: dict, name: str) -> str:
    import yaml

    q = quality["systems"][params.ship.model]
    source = params.prepare.source
    meta: dict[str, Any] = {
        "library_name": "onnx",
        "pipeline_tag": "text-classification",
        "tags": ["still", "knowledge-distillation", "onnx", "text-classification"]
                + (["int8"] if params.ship.model.endswith("int8") else []),
    }
    hub_model = params.teacher.model
    if "/" in hub_model and not hub_model.startswith(("pkg:", "/", ".")) \
            and not Path(hub_model).exists():
        meta["base_model"] = hub_model
    if source.startswith("hf:"):
        meta["datasets"] = [source.removeprefix("hf:")]
    meta["model-index"] = [{"name": name, "results": [{
        "task": {"type": "text-classification", "name": "Text Classification"},
        "dataset": {"name": source, "type": source.removeprefix("hf:"),
                    "split": "test"},
        "metrics": [{"type": "accuracy", "value": round(q["accuracy"], 4),
                     "name": "test accuracy"},
                    {"type": "f1", "value": round(q["macro_f1"], 4), "name": "macro F1"}],
    }]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def student_architecture(d) -> str:
    """The student in words, from the distill params it was trained with."""
    if d.init == "teacher":
        which = (f"layers {d.teacher_layers}" if d.teacher_layers
                 else f"{d.layers} layers spread over its depth")
        return (f"a {d.layers}-layer transformer encoder initialised from the teacher ({which}; "
                "its width, embeddings and vocabulary)")
    return (f"a {d.layers}-layer transformer encoder, hidden {d.hidden}, {d.heads} heads, "
            f"feed-forward {d.intermediate}")


def model_card(params: Params, quality: dict, results: dict | None, speed_note: str | None,
               policy: dict | None, cascade_note: str | None, labels: list[str],
               data_report: dict, source: dict | None, git: dict) -> str:
    """The bundle's README.md: metadata, data, every system's quality and speed, the cascade,
    how to use it, limits, provenance. Everything in it comes from the run's outputs."""
    name = "still-student"
    return "\n".join([
        _front_matter(params, quality, name),
        *_title(params, quality, results, labels, name),
        *_details(params, quality),
        *_data(params, data_report, source, labels),
        *_evaluation(params, quality, results, speed_note),
        *_cascade(policy, cascade_note, results),
        *_usage(policy),
        *_limits(params, quality, labels),
        *_provenance(git)])


def _title(params: Params, quality: dict, results: dict | None, labels: list[str],
           name: str) -> list[str]:
    model = params.ship.model
    q = quality["systems"]
    lines = [f"# {name}: {len(labels)}-class text classifier distilled from "
             f"`{params.teacher.model}`", ""]
    headline = (f"The shipped model is **{model}** (`{MODEL_FILES[model]}`): test accuracy "
                f"**{q[model]['accuracy']:.4f}** {_ci(q[model]['accuracy_ci'])}")
    if results:
        best = results["best_teacher"]
        ratio = results["ratios"].get(f"{model}_throughput_vs_best_teacher")
        diff = results["systems"][model].get("vs_best_teacher")
        if ratio and diff:
            lo, hi = diff["accuracy_diff_ci"]
            headline += (f", **{ratio:.2f}x** the end-to-end throughput of the best teacher "
                         f"runtime ({best}) at {100 * diff['accuracy_diff']:+.2f} pt "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")
    return lines + [headline + ".", ""]


def _details(params: Params, quality: dict) -> list[str]:
    model, d = params.ship.model, params.distill
    q = quality["systems"]
    return ["## Model details", "",
            f"- Student: {student_architecture(d)}, {d.pooling} pooling, "
            f"{q[model]['parameters']:,} parameters, trained with PyTorch Lightning by "
            f"knowledge distillation (temperature {d.temperature}, soft-label weight "
            f"{d.alpha})" + (f" on the training texts and up to {d.windows.max_per_text} "
                             f"windows of {d.windows.words} words from each, labelled by "
                             "the teacher" if d.windows.enabled else "")
            + (f", token merging {d.merge.method} r={d.merge.r}"
               if d.merge.method != "none" else "") + ".",
            ("- Tokenizer: the teacher's own" if d.init == "teacher" else
             f"- Tokenizer: the pipeline's domain tokenizer ({params.tokenizer.type.upper()}, "
             f"{params.tokenizer.vocab_size} tokens)") + f", max {d.max_length} tokens per text.",
            f"- Teacher: `{params.teacher.model}`, fine-tuned on the same training split, "
            f"max {params.teacher.max_length} tokens.",
            "- Files: " + ", ".join(f"`{MODEL_FILES[s]}` ({form}, {q[s]['size_mb']:.1f} MB)"
                                    for s, form in SHIPPED_STUDENTS.items() if s in q)
            + f"; opset {params.export.opset}; inputs `input_ids`, `attention_mask` (int64, "
            "dynamic batch and sequence), output `logits`.", ""]


def _data(params: Params, data_report: dict, source: dict | None,
          labels: list[str]) -> list[str]:
    splits = data_report.get("splits", {})
    version = ""
    if source:
        version = (f" (version: {source.get('kind')} "
                   + (f"{source['package']}=={source['version']}, "
                      if source.get("package") else "")
                   + f"sha256 {str(source.get('sha256', source.get('revision', '?')))[:16]}...)")
    return ["## Data", "",
            f"- Source: `{params.prepare.source}`{version}.",
            f"- {data_report.get('rows_kept', '?')} examples kept of "
            f"{data_report.get('rows_read', '?')} read (dropped: "
            + (", ".join(f"{k} {v}" for k, v in data_report.get("dropped", {}).items())
               or "none")
            + f"); split with seed {params.seed}: "
            + ", ".join(f"{s} {v['examples']}" for s, v in splits.items()) + ".",
            f"- Classes ({len(labels)}): " + ", ".join(f"`{n}`" for n in labels) + ".", ""]


def _evaluation(params: Params, quality: dict, results: dict | None,
                speed_note: str | None) -> list[str]:
    model = params.ship.model
    lines = ["## Evaluation", "",
             f"All systems on the same {quality['test_examples']} test examples; 95% "
             f"intervals from a paired percentile bootstrap "
             f"({quality['uncertainty']['resamples']} resamples). Every choice (the best "
             "teacher runtime, the headline student, the cascade threshold) was made on the "
             "validation split; test reports it once.", ""]
    rows = []
    timed = (results or {}).get("systems", {})
    reference = timed.get((results or {}).get("best_teacher"), {}).get("throughput_per_s")
    for sys_name, s in quality["systems"].items():
        r = timed.get(sys_name, {})
        ratio = (r["throughput_per_s"] / reference
                 if reference and r.get("throughput_per_s") else None)
        v = s.get("validation") or {}
        rows.append({
            "system": sys_name + (" (shipped)" if sys_name == model else ""),
            "validation accuracy": _num(v.get("accuracy"), ".4f"),
            "test accuracy [95% CI]": f"{s['accuracy']:.4f} {_ci(s['accuracy_ci'])}",
            "macro-F1 [95% CI]": f"{s['macro_f1']:.4f} {_ci(s['macro_f1_ci'])}",
            "size MB": f"{s['size_mb']:.1f}",
            "GFLOPs/example": f"{s['gflops_per_example']:.2f}",
            "end-to-end ex/s": _num(r.get("throughput_per_s"), ".1f"),
            "vs best teacher": _num(ratio, ".2f") + ("x" if ratio else ""),
            "p50 latency ms": _num(r.get("latency_p50_ms"), ".2f"),
        })
    lines += [markdown_table(rows), ""]
    if not results:
        return lines + [f"Speed: not included ({speed_note}).", ""]
    return lines + [f"Speed: end to end (text in, logits out) at batch "
                    f"{params.evaluate.throughput_batch_size}, median of "
                    f"{params.evaluate.repeats} rounds, {params.evaluate.num_threads} "
                    f"thread(s) on the machine that ran evaluate; the best "
                    f"teacher runtime is **{results['best_teacher']}** (the fastest teacher "
                    "whose validation accuracy lies within the interval of the most "
                    "accurate). Speed "
                    "depends on the machine: rerun `dvc repro -f evaluate` on yours.", "",
                    f"![accuracy vs cost of every system]({PARETO_PNG})", ""]


def _cascade(policy: dict | None, cascade_note: str | None,
             results: dict | None) -> list[str]:
    if not policy:
        return ["## Cascade", "", f"Not shipped: {cascade_note}.", ""]
    t = policy["test"]
    text = (f"`still predict --cascade` runs **{policy['student']}** first and defers "
            f"to **{policy['teacher']}** when the student's {policy['confidence']} "
            f"confidence is below **{policy['threshold']:.2f}**. The threshold was "
            f"chosen on the validation split ({policy['validation']['examples']} "
            f"examples: {policy['choice']}, target {policy['target_accuracy']:.4f}, "
            f"reached {policy['validation']['accuracy']:.4f} with "
            f"{100 * policy['validation']['deferred_fraction']:.1f}% deferred) and "
            f"scored once on test: accuracy **{t['accuracy']:.4f}** "
            f"{_ci(t['accuracy_ci'])} with {100 * t['deferred_fraction']:.1f}% of "
            "inputs deferred.")
    chosen = ((results or {}).get("cascade") or {}).get("chosen") or {}
    if chosen.get("measured_ms_per_example"):
        text += (f" Measured as it runs (this bundle's code, test split): "
                 f"{chosen['measured_ms_per_example']:.2f} ms per example, "
                 f"{chosen['measured_speedup_vs_best_teacher']:.2f}x faster than "
                 "the best teacher runtime alone.")
    return ["## Cascade", "", text, ""]


def _usage(policy: dict | None) -> list[str]:
    return ["## How to use", "", "```bash",
            'still predict --bundle BUNDLE "A text to classify"',
            "still predict --bundle BUNDLE --input texts.csv --output preds.jsonl"
            + (" --cascade" if policy else ""),
            "still triton --bundle BUNDLE --out model_repository   # Triton layout",
            "```", "", "```python", "from components.serving.bundle import load_bundle",
            "", 'bundle = load_bundle("BUNDLE")   # checks every file against bundle.json',
            'bundle.predict(["A text to classify"])   # [{"label": ..., "probability": ...}]',
            "```", "",
            "Without still: tokenize with `student/tokenizer.json` (Hugging Face "
            "`tokenizers`), truncate and pad as `student/preprocessing.json` says, run the "
            "graph in ONNX Runtime and take the softmax of `logits`; class names are in "
            f"`{LABELS}` in logit order.", ""]


def _limits(params: Params, quality: dict, labels: list[str]) -> list[str]:
    return ["## Intended use and limits", "",
            f"- Classifies texts into the {len(labels)} classes above; any other input is "
            "still assigned one of them. Low confidence (the cascade's measure) is the "
            "signal to defer, not an out-of-distribution detector.",
            f"- Only the first {params.distill.max_length} tokens of a text are read; "
            f"longer texts are truncated.",
            f"- Quality was measured on a held-out split of the same source "
            f"({quality['test_examples']} examples); data from another source, period or "
            "style can score lower. The intervals above say how much the figures can move "
            "on a sample of that size.",
            "- The student inherits the teacher's and the data's biases; nothing here "
            "measures fairness across groups.", ""]


def _provenance(git: dict) -> list[str]:
    commit = git.get("commit")
    return ["## Provenance", "",
            f"- Code: {'commit `' + commit + '`' if commit else 'not a git checkout'}"
            + (" with uncommitted changes" if git.get("dirty") else "") + ".",
            f"- Params: in `{MANIFEST}` (`params`); every file's sha256 in `{MANIFEST}` "
            "(`files`), checked on every load.",
            "- Built by the still pipeline (`dvc repro`: prepare, tokenizer, teacher, "
            "distill, export, evaluate, ship).", ""]
