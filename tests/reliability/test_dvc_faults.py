"""Faults under real DVC in a temporary git repo: a stage that dies mid-write leaves dvc.lock
and the cached previous outputs intact (no half-written folder anywhere), and two `dvc repro`
runs at once never corrupt the workspace: DVC's repo lock makes one wait or fail cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_repo, sh
from tests.reliability.conftest import leftovers, snapshot

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
# DVC's repo lock (.dvc/tmp/lock) and its per-output lock (.dvc/tmp/rwlock).
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, dataset_csv, tiny_teacher) -> Path:
    repo = make_dvc_repo(tmp_path_factory.mktemp("faults"), dataset_csv, tiny_teacher)
    sh([*DVC, "repro", "tokenizer"], repo)  # prepare -> tokenizer, committed to the cache
    return repo


def dvc_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "WANDB_MODE": "disabled"}


def assert_up_to_date(status: str) -> None:
    """`dvc status` says nothing changed but `source`, which re-pins the data on every run."""
    changed = [line for line in status.splitlines()
               if line.strip() not in ("", "source:", "always changed")]
    assert not changed or "up to date" in status, status


def test_stage_dying_mid_write_leaves_lock_and_previous_outputs(repo):
    data = repo / "data/prepared"
    lock, before = (repo / "dvc.lock").read_bytes(), snapshot(data)
    stage = repo / "components/data/artifacts.py"  # prepare writes its files through it
    original = stage.read_text()
    write = '        self._writer.write_table(table)\n'
    assert write in original
    # Fault injection in this temp copy only: the process dies after train.parquet is written.
    stage.write_text(original.replace(write, write + '        if self.split == "validation":'
                                      '\n            raise MemoryError("injected fault")\n'))
    try:
        proc = subprocess.run([*DVC, "repro", "prepare"], cwd=repo, env=dvc_env(),
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "injected fault" in proc.stderr
        assert "failed to reproduce 'prepare'" in proc.stderr
        assert (repo / "dvc.lock").read_bytes() == lock  # DVC records only finished stages
        assert leftovers(data) == []  # atomic_dir removed its half-written temp folder
        # DVC itself deletes a stage's (cached) outputs before running it, so what remains is
        # either nothing or the complete old folder, never a mix: check it out from the cache.
        assert not data.exists() or snapshot(data) == before
    finally:
        stage.write_text(original)
    sh([*DVC, "checkout", "data/prepared"], repo)
    assert snapshot(data) == before
    assert_up_to_date(sh([*DVC, "status", "--with-deps", "tokenizer"], repo))


def test_two_concurrent_repros_do_not_corrupt_the_workspace(repo):
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())
    procs = [subprocess.Popen([*DVC, "repro", "-f", "prepare", "tokenizer"], cwd=repo,
                              env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = [code for code, _, _ in results]
    assert 0 in codes, results  # at least one run finished
    for code, out, err in results:
        # The other one either waited for DVC's repo lock and ran after, or stopped at once
        # with DVC's own lock message naming the lock file (before touching any output).
        assert code == 0 or any(m in err for m in LOCK_MESSAGES), (code, out[-2000:],
                                                                   err[-2000:])
    assert not list((repo / ".dvc/tmp").glob("*.lock.tmp*"))
    # outputs match dvc.lock: nothing half-written
    assert_up_to_date(sh([*DVC, "status", "--with-deps", "tokenizer"], repo))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())  # whole, parseable
    assert set(lock["stages"]) == {"source", "prepare", "tokenizer"}
    # prepare is deterministic: same params, same output hashes as before the two runs.
    assert lock["stages"]["prepare"] == lock_before["stages"]["prepare"]
    for folder in ("data/prepared", "artifacts/tokenizer"):
        assert leftovers(repo / folder) == []
