"""Running DVC from flows: the CLI in a subprocess (same interpreter, so the stage commands'
`python` is this environment's) and the stage order read from DVC's own graph.

Nothing here knows the stage names or their order: dvc.yaml is the only pipeline definition.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import networkx as nx


class DvcError(RuntimeError):
    """A DVC command failed; the message carries the command and the tail of its output,
    which holds the stage's own error line (e.g. `export: error: ... diverges ...`)."""


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    out = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out.setdefault("WANDB_MODE", "offline")
    out.update(extra or {})
    return out


def run(args: list[str], cwd: str | Path, extra_env: dict[str, str] | None = None,
        what: str | None = None) -> str:
    """Run `dvc <args>` in `cwd`; return its output or raise DvcError with the useful part."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise DvcError(f"{what or 'dvc ' + ' '.join(args)} failed (exit {proc.returncode}):\n"
                       + _useful_tail(output))
    return output


def git(args: list[str], cwd: str | Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _useful_tail(output: str, lines: int = 25) -> str:
    """The stage's own `error:` lines first (they name the problem), then the last lines."""
    all_lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in all_lines if ": error:" in ln or ln.startswith("ERROR")]
    tail = all_lines[-lines:]
    return "\n".join(dict.fromkeys(errors + tail))


def stage_order(repo: str | Path) -> list[str]:
    """Stage names in an execution order DVC's graph allows; among the valid orders, the one
    closest to dvc.yaml's listing, so the Prefect UI reads like the file."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        position = {stage: i for i, stage in enumerate(dvc_repo.index.stages)}
        # DVC's edges point dependent -> dependency; reverse them to get run order.
        graph = dvc_repo.index.graph.reverse(copy=True)
        order = nx.lexicographical_topological_sort(graph, key=position.__getitem__)
        return [stage.name for stage in order]


def has_remote(repo: str | Path) -> bool:
    return bool(run(["remote", "list"], repo).strip())


def stage_ran(output: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in output
