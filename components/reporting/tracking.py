"""Weights & Biases, offline by default.

The mode comes from the `WANDB_MODE` environment variable when set, else `tracking.mode` in
params.yaml (default `offline`: runs are written under `artifacts/wandb` and can be uploaded later
with `wandb sync`). Every run gets the resolved params as its config, with secrets redacted
(`components.common.redact`: secret-looking keys at any depth, passwords and tokens inside
URLs). The W&B API key is left to W&B itself (`WANDB_API_KEY` / `wandb login`): this module
never reads it, so it cannot end up in a config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.config import Params
from components.config.secrets import redact


def wandb_mode(params: Params) -> str:
    return os.environ.get("WANDB_MODE") or params.tracking.mode


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
        "config": redact(params.to_dict()),
        "reinit": "finish_previous",
    }


def start_run(params: Params, stage: str):
    """Start a W&B run for a stage that does not train through Lightning (e.g. evaluate)."""
    import wandb

    return wandb.init(name=stage, **init_kwargs(params, stage))


def lightning_logger(params: Params, stage: str):
    from pytorch_lightning.loggers import WandbLogger

    kwargs = init_kwargs(params, stage)
    kwargs["save_dir"] = kwargs.pop("dir")  # WandbLogger's name for wandb.init's `dir`
    return WandbLogger(name=stage, **kwargs)


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
