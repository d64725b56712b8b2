"""Weights & Biases, offline by default.

The mode comes from the `WANDB_MODE` environment variable when set, else `tracking.mode` in
params.yaml (default `offline`: runs are written under `artifacts/wandb` and can be uploaded later
with `wandb sync`). Every run gets the resolved params as its config, with secrets redacted
(`components.config.redaction.redact`: secret-looking keys at any depth, passwords and tokens inside
URLs). The W&B API key is left to W&B itself (`WANDB_API_KEY` / `wandb login`): this module
never reads it, so it cannot end up in a config.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.config import Params
from components.config.redaction import redact


def wandb_mode(params: Params) -> str:
    return os.environ.get("WANDB_MODE") or params.tracking.mode


def experiment() -> dict[str, str]:
    """The DVC experiment and git commit a run belongs to, when a flow says so (the search
    trials): W&B's run table and parallel-coordinates view then compare trials by name, and
    each leads back to `dvc exp show`."""
    return {key: os.environ[env] for key, env in (("dvc_experiment", "STILL_EXPERIMENT"),
                                                  ("git_commit", "STILL_GIT_COMMIT"))
            if os.environ.get(env)}


def init_kwargs(params: Params, stage: str) -> dict[str, Any]:
    """Arguments shared by `wandb.init` and Lightning's `WandbLogger`."""
    wandb_dir = Path(params.paths.wandb)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return {
        "project": params.tracking.project,
        "entity": params.tracking.entity,
        "mode": wandb_mode(params),
        "dir": str(wandb_dir),
        "job_type": stage,
        "group": os.environ.get("STILL_RUN_GROUP"),
        "config": {**redact(params.to_dict()), **experiment()},
        "reinit": "finish_previous",
    }


def start_run(params: Params, stage: str):
    """Start a W&B run for a stage that does not train through Lightning (e.g. evaluate)."""
    import wandb

    return wandb.init(name=stage, **init_kwargs(params, stage))


@contextlib.contextmanager
def best_effort(stage: str, kept: str) -> Iterator[None]:
    """Log to W&B after a stage's outputs are written: a tracking failure (no network, a full
    disk, a W&B bug) ends the run as failed and becomes one warning saying where the outputs
    are (`kept`), never a failed stage that loses them."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - tracking is best effort by design
        with contextlib.suppress(Exception):
            import wandb

            wandb.finish(exit_code=1)
        print(f"{stage}: warning: W&B logging failed ({type(err).__name__}: {err}); {kept}")


def _flat(prefix: str, d: dict) -> dict:
    """Numbers (and [low, high] intervals as _low/_high) of a nested dict, with `/` keys."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, int | float):
            out[key] = v
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
            out[f"{key}_low"], out[f"{key}_high"] = v
        elif isinstance(v, dict):
            out.update(_flat(key, v))
    return out


def log_to_wandb(params: Params, metrics: dict, points: list[dict], casc: dict | None,
                 out: Path, images: list[Path]) -> None:
    """Tables, charts, summary numbers and the report files (as an artifact)."""
    import wandb

    run = start_run(params, "evaluate")
    columns = [c for c in dict.fromkeys(k for p in points for k in p) if c != "accuracy_ci"]
    columns += ["accuracy_ci_low", "accuracy_ci_high"]
    rows = [[p.get(c) for c in columns[:-2]] + list(p["accuracy_ci"]) for p in points]
    logged = {
        "systems": wandb.Table(columns=columns, data=rows),
        **{image.stem: wandb.Image(str(image)) for image in images},
    }
    per_class = metrics["best_student"]["per_class"]
    logged["per_class_f1"] = wandb.Table(
        columns=["class", "precision", "recall", "f1", "support"],
        data=[[k, v["precision"], v["recall"], v["f1"], v["support"]]
              for k, v in per_class.items()])
    if casc:
        cols = list(casc["points"][0])
        table = wandb.Table(columns=cols, data=[[p[c] for c in cols] for p in casc["points"]])
        logged["cascade"] = table
        logged["cascade_accuracy_vs_cost"] = wandb.plot.line(
            table, "expected_ms_per_example", "accuracy",
            title="Cascade on test: accuracy vs expected ms/example")
    run.log(logged)
    summary = {}
    for name, r in metrics["systems"].items():
        summary.update(_flat(name, r))
    summary.update(_flat("ratios", metrics["ratios"]))
    summary.update(_flat("headline", metrics["headline"]))
    if metrics.get("cascade", {}).get("chosen"):
        summary.update(_flat("cascade", metrics["cascade"]["chosen"]))
    run.summary.update(summary)
    _log_artifacts(run, params, out, metrics)
    run.finish()


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _log_artifacts(run, params: Params, out: Path, metrics: dict) -> None:
    """The report files as a W&B artifact, with lineage to the data and tokenizer.

    Online, the data and tokenizer folders are `use_artifact` inputs of this run (W&B draws the
    graph). W&B refuses `use_artifact` offline, so there the inputs' content digests go into
    the output artifacts' metadata instead (the same folders give the same digests)."""
    import wandb

    inputs = {}
    for name, kind, folder in (("dataset", "dataset", params.paths.data),
                               ("tokenizer", "tokenizer", params.paths.tokenizer)):
        inputs[name] = _digest(Path(folder))
        if wandb_mode(params) == "online":
            art = wandb.Artifact(name, type=kind, metadata={"sha256": inputs[name]})
            art.add_dir(str(folder))
            run.use_artifact(art)
    # The model itself is the ship stage's bundle, logged there as the `student` artifact.
    evaluation = wandb.Artifact("evaluation", type="report",
                                metadata={"inputs_sha256": inputs,
                                          "tensorrt": metrics.get("tensorrt")})
    evaluation.add_dir(str(out))
    run.log_artifact(evaluation)
