"""Helpers shared by the reliability suite: stage CLIs in a temp project, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temp/old folders an interrupted atomic write would leave beside `folder`."""
    if not folder.parent.is_dir():
        return []
    return sorted(p.name for p in folder.parent.iterdir()
                  if p.name.startswith((f".{folder.name}.tmp-", f".{folder.name}.old-")))


def run_stage_cli(stage: str, raw_params: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m components.<stage>` as DVC runs it: params.yaml in the working folder."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", f"components.{stage}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
