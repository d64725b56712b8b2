"""Files every stage writes and reads: atomic outputs (`atomic_dir`, `atomic_write_bytes`), the
resolved params beside each artifact, JSON, sizes, and safe reading: `reading` turns a damaged
file into one StageError naming it and the fix."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Params, stage_params
from components.config.redaction import redact
from components.stage import StageError

PARAMS_FILE = "params.json"
# An existing folder holding any of these at its top level is a project, a package or a
# repository, never a stage's earlier output: atomic_dir refuses to replace it (a second line of
# defence: output locations are fixed in dvc.yaml, and config.path_problems checks the ones
# code sets).
NOT_AN_OUTPUT = (".git", ".dvc", "dvc.yaml", "params.yaml", "__init__.py")


def _umask_mode(mode: int) -> int:
    """mkstemp/mkdtemp create private (0600/0700) paths; artifacts get the usual umask."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write a file atomically: a temp file in the same folder, then one rename (a reader never
    sees half a file, a crash never leaves one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, numpy values converted)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    """A stage output's JSON file; a missing, undecodable or malformed file is a StageError
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the stage that produces it first (dvc repro)")
    with reading(path, "it as JSON", "it is damaged or was edited by hand: rerun the stage "
                                      "that produces it (dvc repro)"):
        return json.loads(path.read_text(encoding="utf-8"))


def describe(err: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line (a multi-line message folded, a long one cut)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return type(err).__name__ + (f": {text}" if text else "")


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str) -> Iterator[None]:
    """Turn any failure while reading `path` into one StageError that names the file, what was
    being read and how to fix it: `<path>: cannot read <what> (<Type>: <message>); <fix>`.

    Libraries report a damaged file with their own exception types (ArrowInvalid, BadGzipFile,
    EOFError, JSONDecodeError, SafetensorError, a tokenizers Exception, RecursionError...),
    none of which names the file; this is the one place that adds it. A StageError passes
    through unchanged (it already says what to do).
    """
    try:
        yield
    except StageError:
        raise
    except Exception as err:
        raise StageError(f"{path}: cannot read {what} ({describe(err)}); {fix}") from err


@contextlib.contextmanager
def atomic_dir(final: str | Path, params: Params | None = None,
               stage: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    On any error the temporary folder is removed and `final` (the previous good output) is left
    as it was. The resolved params (secrets redacted) are written into the folder so every
    artifact says how it was made: with `stage`, only the params that stage declares in
    dvc.yaml (`config.STAGE_PARAMS`), so the output's hash does not follow other stages'
    params. An existing `final` that is a file, or a folder holding any of NOT_AN_OUTPUT at its
    top level (source code, a repository), is refused with a StageError before anything is
    written.
    """
    final = Path(final)
    refuse_to_replace(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        if params is not None:
            values = params.to_dict() if stage is None else stage_params(params, stage)
            write_json(tmp / PARAMS_FILE, redact(values))
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_to_replace(final: Path) -> None:
    """Raise StageError when `final` exists and is not something a stage could have written."""
    if final.is_symlink() or not final.exists():
        return  # a link is replaced, not its target
    if not final.is_dir():
        raise StageError(f"{final} is an existing file, not an output folder; refusing to "
                         "replace it: move it away (this stage writes its output there)")
    found = [name for name in NOT_AN_OUTPUT if (final / name).exists()]
    if found:
        raise StageError(f"{final} holds {', '.join(found)}: it is source code or a project, "
                         "not a stage output; refusing to replace it: move it away (this stage "
                         "writes its output there)")


def file_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in chunks (a large file never sits in memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
