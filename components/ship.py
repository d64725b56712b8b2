"""ship: the bundle a user deploys, with its model card.

Produces `paths.bundle` (artifacts/bundle by default; layout in `components.serving.bundle`): the
student's ONNX graphs (FP32, dynamic INT8 and, when exported, static INT8), its tokenizer and
preprocessing, the label names, the cascade policy chosen on validation and the teacher graph
it defers to (`ship.cascade`), the model card (`README.md`, Hugging Face layout, and
`card.html`) and `bundle.json`, the manifest with the sha256 of every file, the run's params,
git commit and data version.

The card is generated from evaluate's outputs: accuracy and intervals from `quality.json` (a DVC
output), speed from `paths.results/metrics.json` (this machine's measurements, git-tracked). The
bundle is a release of one run, with that run's commit and timings, so it is not a DVC output
(dvc.lock would then follow the machine and the commit); the stage is `always_changed` and
rebuilds it from the DVC-tracked artifacts in about a second. A W&B run logs the bundle folder as
the `student` model artifact.

    python -m components.ship          (or: dvc repro ship)
    still predict --bundle artifacts/bundle "some text"
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from components.config import Params
from components.config.secrets import redact
from components.data.artifacts import (
    STUDENT_FP32,
    STUDENT_INT8,
    STUDENT_PREPROCESSING,
    STUDENT_STATIC_INT8,
    STUDENT_TOKENIZER,
    TEACHER_FP32,
    TEACHER_INT8,
    TEACHER_PREPROCESSING,
    TEACHER_STATIC_INT8,
    TEACHER_TOKENIZER,
    load_label_names,
    load_prepare_report,
    load_quality,
    load_results,
    load_source_manifest,
)
from components.data.files import atomic_dir, write_json
from components.reporting import tracking
from components.reporting.pages import html_page
from components.reporting.plots import PARETO_PNG as RESULTS_PARETO_PNG
from components.reporting.tables import markdown_table
from components.serving.bundle import (
    CARD,
    CARD_HTML,
    CASCADE,
    FORMAT,
    LABELS,
    MANIFEST,
    MODEL_FILES,
    PARETO_PNG,
    PREPROCESSING,
    TOKENIZER,
    file_entries,
    side,
)
from components.stage import StageError, stage_main

# Export file of each shippable system, and the export files beside each side's graphs.
EXPORTED = {"student_onnx": STUDENT_FP32, "student_onnx_int8": STUDENT_INT8,
            "student_onnx_static_int8": STUDENT_STATIC_INT8,
            "teacher_onnx": TEACHER_FP32, "teacher_onnx_int8": TEACHER_INT8,
            "teacher_onnx_static_int8": TEACHER_STATIC_INT8}
# The student graphs a bundle carries whenever evaluate measured them, as the card names them.
SHIPPED_STUDENTS = {"student_onnx": "FP32", "student_onnx_int8": "ONNX Runtime dynamic INT8",
                    "student_onnx_static_int8": "ONNX Runtime static INT8, calibrated on "
                                                "validation"}
SIDE_FILES = {"student": {TOKENIZER: STUDENT_TOKENIZER, PREPROCESSING: STUDENT_PREPROCESSING},
              "teacher": {TOKENIZER: TEACHER_TOKENIZER, PREPROCESSING: TEACHER_PREPROCESSING}}


def git_state(cwd: str | Path = ".") -> dict[str, Any]:
    """The commit the code came from and whether tracked files differ from it (None outside a
    git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def cascade_policy(quality: dict) -> tuple[dict | None, str | None]:
    """`cascade.json` from evaluate's timing-free cascade record, or (None, why not)."""
    casc = quality.get("cascade")
    if not casc:
        return None, "evaluate ran without a cascade (evaluate.cascade.enabled: false)"
    chosen = casc.get("chosen")
    if not chosen:
        return None, (f"no confidence threshold reached the target accuracy "
                      f"{casc['target_accuracy']:.4f} on validation")
    for role in ("student", "teacher"):
        if casc[role] not in MODEL_FILES:
            return None, (f"the cascade {role} {casc[role]!r} is not an ONNX graph a bundle "
                          "can ship")
    return {
        "student": casc["student"], "teacher": casc["teacher"],
        "student_file": MODEL_FILES[casc["student"]],
        "teacher_file": MODEL_FILES[casc["teacher"]],
        "confidence": casc["confidence"], "threshold": chosen["threshold"],
        "rule": "the student answers when its confidence >= threshold; the teacher otherwise",
        "chosen_on": casc["chosen_on"], "choice": casc["rule"],
        "target_accuracy": casc["target_accuracy"],
        "validation": {"accuracy": chosen["validation_accuracy"],
                       "deferred_fraction": chosen["validation_deferred_fraction"],
                       "examples": casc["validation_examples"]},
        "test": {"accuracy": chosen["accuracy"], "accuracy_ci": chosen["accuracy_ci"],
                 "deferred_fraction": chosen["deferred_fraction"],
                 "vs_teacher": chosen.get("vs_teacher")},
    }, None


def measured(quality: dict, results: dict | None) -> tuple[dict | None, str | None]:
    """evaluate's measured results when they come from the same evaluation as quality.json
    (same systems, same accuracies), else (None, why not)."""
    if results is None:
        return None, "no measured results (results/metrics.json) here: run evaluate"
    systems = results.get("systems", {})
    for name, q in quality["systems"].items():
        if name not in systems or systems[name].get("accuracy") != q["accuracy"]:
            return None, ("results/metrics.json comes from another evaluation than "
                          "quality.json (rerun dvc repro -f evaluate)")
    return results, None


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
    model, d = params.ship.model, params.distill
    q = quality["systems"]
    lines = [_front_matter(params, quality, name), f"# {name}: {len(labels)}-class text "
             f"classifier distilled from `{params.teacher.model}`", ""]
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
    lines += [headline + ".", ""]

    lines += ["## Model details", "",
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

    splits = data_report.get("splits", {})
    version = ""
    if source:
        version = (f" (version: {source.get('kind')} "
                   + (f"{source['package']}=={source['version']}, "
                      if source.get("package") else "")
                   + f"sha256 {str(source.get('sha256', source.get('revision', '?')))[:16]}...)")
    lines += ["## Data", "",
              f"- Source: `{params.prepare.source}`{version}.",
              f"- {data_report.get('rows_kept', '?')} examples kept of "
              f"{data_report.get('rows_read', '?')} read (dropped: "
              + (", ".join(f"{k} {v}" for k, v in data_report.get("dropped", {}).items())
                 or "none")
              + f"); split with seed {params.seed}: "
              + ", ".join(f"{s} {v['examples']}" for s, v in splits.items()) + ".",
              f"- Classes ({len(labels)}): " + ", ".join(f"`{n}`" for n in labels) + ".", ""]

    lines += ["## Evaluation", "",
              f"All systems on the same {quality['test_examples']} test examples; 95% "
              f"intervals from a paired percentile bootstrap "
              f"({quality['uncertainty']['resamples']} resamples). Every choice (the best "
              "teacher runtime, the headline student, the cascade threshold) was made on the "
              "validation split; test reports it once.", ""]
    rows = []
    timed = (results or {}).get("systems", {})
    reference = timed.get((results or {}).get("best_teacher"), {}).get("throughput_per_s")
    for sys_name, s in q.items():
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
    if results:
        lines += [f"Speed: end to end (text in, logits out) at batch "
                  f"{params.evaluate.throughput_batch_size}, median of "
                  f"{params.evaluate.repeats} rounds, {params.evaluate.num_threads} thread(s) "
                  f"on the machine that ran evaluate; the best "
                  f"teacher runtime is **{results['best_teacher']}** (the fastest teacher "
                  "whose validation accuracy lies within the interval of the most accurate). "
                  "Speed "
                  "depends on the machine: rerun `dvc repro -f evaluate` on yours.", ""]
    else:
        lines += [f"Speed: not included ({speed_note}).", ""]
    lines += [f"![accuracy vs cost of every system]({PARETO_PNG})", ""] if results else []

    lines += ["## Cascade", ""]
    if policy:
        t = policy["test"]
        lines += [f"`still predict --cascade` runs **{policy['student']}** first and defers "
                  f"to **{policy['teacher']}** when the student's {policy['confidence']} "
                  f"confidence is below **{policy['threshold']:.2f}**. The threshold was "
                  f"chosen on the validation split ({policy['validation']['examples']} "
                  f"examples: {policy['choice']}, target {policy['target_accuracy']:.4f}, "
                  f"reached {policy['validation']['accuracy']:.4f} with "
                  f"{100 * policy['validation']['deferred_fraction']:.1f}% deferred) and "
                  f"scored once on test: accuracy **{t['accuracy']:.4f}** "
                  f"{_ci(t['accuracy_ci'])} with {100 * t['deferred_fraction']:.1f}% of "
                  "inputs deferred."]
        chosen = ((results or {}).get("cascade") or {}).get("chosen") or {}
        if chosen.get("measured_ms_per_example"):
            lines[-1] += (f" Measured as it runs (this bundle's code, test split): "
                          f"{chosen['measured_ms_per_example']:.2f} ms per example, "
                          f"{chosen['measured_speedup_vs_best_teacher']:.2f}x faster than "
                          "the best teacher runtime alone.")
        lines += [""]
    else:
        lines += [f"Not shipped: {cascade_note}.", ""]

    lines += ["## How to use", "", "```bash",
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

    lines += ["## Intended use and limits", "",
              f"- Classifies texts into the {len(labels)} classes above; any other input is "
              "still assigned one of them. Low confidence (the cascade's measure) is the "
              "signal to defer, not an out-of-distribution detector.",
              f"- Only the first {d.max_length} tokens of a text are read; "
              f"longer texts are truncated.",
              f"- Quality was measured on a held-out split of the same source "
              f"({quality['test_examples']} examples); data from another source, period or "
              "style can score lower. The intervals above say how much the figures can move "
              "on a sample of that size.",
              "- The student inherits the teacher's and the data's biases; nothing here "
              "measures fairness across groups.", ""]

    commit = git.get("commit")
    lines += ["## Provenance", "",
              f"- Code: {'commit `' + commit + '`' if commit else 'not a git checkout'}"
              + (" with uncommitted changes" if git.get("dirty") else "") + ".",
              f"- Params: in `{MANIFEST}` (`params`); every file's sha256 in `{MANIFEST}` "
              "(`files`), checked on every load.",
              "- Built by the still pipeline (`dvc repro`: prepare, tokenizer, teacher, "
              "distill, export, evaluate, ship).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ run

def run(params: Params) -> dict:
    quality = load_quality(params.paths)
    labels = load_label_names(params.paths)
    export_dir = Path(params.paths.export)
    model = params.ship.model
    if model not in quality["systems"]:
        raise StageError(f"ship.model {model!r} was not evaluated (evaluated: "
                         f"{', '.join(quality['systems'])}); rerun dvc repro evaluate")
    results, speed_note = measured(quality, load_results(params.paths))
    policy, cascade_note = (cascade_policy(quality) if params.ship.cascade
                            else (None, "ship.cascade is false"))
    if params.ship.cascade and policy is None:
        print(f"ship: warning: the bundle has no cascade: {cascade_note}")
    systems = set(SHIPPED_STUDENTS) & set(quality["systems"])
    if policy:
        systems |= {policy["student"], policy["teacher"]}
    missing = [EXPORTED[s] for s in sorted(systems) if not (export_dir / EXPORTED[s]).is_file()]
    if missing:
        raise StageError(f"{export_dir}: {', '.join(missing)} not found: run the export stage "
                         "(dvc repro export)")
    git, data_version = git_state(), load_source_manifest(params.paths)
    card = model_card(params, quality, results, speed_note, policy, cascade_note, labels,
                      load_prepare_report(params.paths), data_version, git)

    with atomic_dir(params.paths.bundle) as out:
        for system in sorted(systems):
            dst = out / MODEL_FILES[system]
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(export_dir / EXPORTED[system], dst)
        for part in sorted({side(s) for s in systems}):
            for name, exported in SIDE_FILES[part].items():
                shutil.copyfile(export_dir / exported, out / part / name)
        write_json(out / LABELS, {"labels": labels})
        if policy:
            write_json(out / CASCADE, policy)
        pareto = Path(params.paths.results) / RESULTS_PARETO_PNG
        if results and pareto.is_file():
            shutil.copyfile(pareto, out / PARETO_PNG)
        (out / CARD).write_text(card)
        html_page(card, out / CARD_HTML, "still-student model card")
        files = file_entries(out)
        manifest = {
            "format": FORMAT, "name": "still-student", "model": model,
            "models": {s: MODEL_FILES[s] for s in sorted(systems)},
            "labels": len(labels), "batch_size": params.evaluate.throughput_batch_size,
            "cascade": policy is not None, "git": git, "data": data_version,
            "params": redact(params.to_dict()), "files": files}
        write_json(out / MANIFEST, manifest)
    size = sum(f["bytes"] for f in files.values()) / 1e6
    print(f"ship: {params.paths.bundle}: {len(files)} files, {size:.1f} MB, model {model}"
          + (f", cascade {policy['student']} -> {policy['teacher']} below "
             f"{policy['threshold']:.2f}" if policy else ", no cascade"))
    with tracking.best_effort("ship", f"the bundle is in {params.paths.bundle}"):
        log_to_wandb(params, Path(params.paths.bundle), manifest, quality)
    return manifest


def log_to_wandb(params: Params, bundle: Path, manifest: dict, quality: dict) -> None:
    """The bundle folder as the W&B `student` model artifact (aliases: latest + the model)."""
    import wandb

    run = tracking.start_run(params, "ship")
    art = wandb.Artifact("student", type="model", description="still bundle: ONNX student, "
                         "tokenizer, labels, cascade policy, model card", metadata={
                             "format": manifest["format"], "model": manifest["model"],
                             "cascade": manifest["cascade"], "git": manifest["git"],
                             "accuracy": {n: s["accuracy"]
                                          for n, s in quality["systems"].items()},
                             "accuracy_ci": {n: s["accuracy_ci"]
                                             for n, s in quality["systems"].items()},
                             "sha256": {k: v["sha256"] for k, v in manifest["files"].items()}})
    art.add_dir(str(bundle))
    run.log_artifact(art, aliases=["latest", manifest["model"]])
    run.finish()


def main() -> None:
    stage_main("ship", run)


if __name__ == "__main__":
    main()
