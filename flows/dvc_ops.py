"""Running DVC from flows: the CLI in a subprocess (same interpreter, so the stage commands'
`python` is this environment's) and the stage order read from DVC's own graph.

Nothing here knows the stage names or their order: dvc.yaml is the only pipeline definition.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
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


# --------------------------------------------------------------------------- results to git
# A run in a container (Kubernetes Job, Docker pool) loses its workspace when it ends: `dvc push`
# saves the data, and these save what points at it (dvc.lock, or the experiment ref) in the git
# remote, on a branch per run, so nobody's branch is rewritten by a scheduled job.
RUN_BRANCH_PREFIX = "still-runs/"
GIT_REMOTE = "origin"
# What a run changes in git besides the caller's paths (e.g. params' git-tracked results): the
# lock, and the .gitignore files DVC keeps next to outputs.
RUN_PATHS = ["dvc.lock", ":(glob)**/.gitignore"]


def git_remote_url(repo: str | Path, remote: str = GIT_REMOTE) -> str:
    try:
        return git(["remote", "get-url", remote], repo).strip()
    except DvcError:
        raise DvcError(f"no git remote {remote!r} in {repo}: the run's dvc.lock and experiments "
                       "would stay in this workspace") from None


def commit_run(repo: str | Path, message: str, paths: Sequence[str] = ()) -> bool:
    """Commit what the run changed in RUN_PATHS and `paths`; False when nothing changed."""
    status = git(["status", "--porcelain=v1", "-z", "--untracked-files=all", "--",
                  *RUN_PATHS, *paths], repo)
    # Entries are "XY <path>"; the run only adds, modifies or deletes (no renames).
    changed = [entry[3:] for entry in status.split("\0") if entry]
    if not changed:
        return False
    git(["add", "-A", "--", *changed], repo)
    # A pod or a fresh worker has no git identity; name the committer rather than fail.
    identity = [] if _git_config(repo, "user.email") else \
        ["-c", "user.name=still", "-c", "user.email=still@localhost"]
    git([*identity, "commit", "-q", "-m", message], repo)
    return True


def push_run(repo: str | Path, run_id: str, experiment: str | None = None,
             paths: Sequence[str] = (), remote: str = GIT_REMOTE) -> str:
    """Push the run's results to the git remote; return what was pushed. With an experiment,
    `dvc exp push` (its data went with `dvc push` already); otherwise HEAD, with dvc.lock and
    `paths` committed, to the new branch `still-runs/<run_id>`. Safe to retry: the commit
    happens once and pushing the same commit again is a no-op (no --force: a branch is never
    rewritten)."""
    git_remote_url(repo, remote)
    if experiment:
        run(["exp", "push", "--no-cache", "--force", remote, experiment], repo,
            what=f"dvc exp push {remote} {experiment}")
        return f"experiment {experiment}"
    commit_run(repo, f"still run {run_id}: dvc.lock and results", paths)
    branch = f"{RUN_BRANCH_PREFIX}{run_id}"
    git(["push", "--quiet", remote, f"HEAD:refs/heads/{branch}"], repo)
    return f"branch {branch}"


def _git_config(repo: str | Path, key: str) -> str:
    proc = subprocess.run(["git", "config", key], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip()
