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
from components.config.redaction import redact
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
from components.reporting.model_card import model_card
from components.reporting.pages import html_page
from components.reporting.plots import PARETO_PNG as RESULTS_PARETO_PNG
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
    SHIPPED_STUDENTS,
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
