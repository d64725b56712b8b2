"""Helpers shared by the reliability suite: stage CLIs in a temp project, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from components.config import Paths
from tests.conftest import ROOT


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


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


def run_stage_cli(stage: str, raw_params: dict, cwd: Path,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m components.<stage>` as DVC runs it: params.yaml in the working folder (the
    project root), which holds no `paths` (dvc.yaml fixes them): raw params built in code for
    `cwd` (`tiny_raw_params(cwd, ...)`: every output at its fixed location under `cwd`) lose
    their `paths`; any other `paths` entry is written as given (and refused by the stage)."""
    cwd.mkdir(parents=True, exist_ok=True)
    paths = raw_params.get("paths")
    if isinstance(paths, dict):
        fixed = Paths().model_dump()
        paths = {k: v for k, v in paths.items()
                 if not (isinstance(v, str) and k in fixed
                         and os.path.normpath(cwd / v) == os.path.normpath(cwd / fixed[k]))}
        raw_params = {k: v for k, v in raw_params.items() if k != "paths"}
        if paths:
            raw_params["paths"] = paths
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"components.{stage}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
