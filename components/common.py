"""Small helpers every stage uses: atomic outputs, resolved params beside artifacts, seeding,
and `pkg:` locations for data and weights that ship inside installed packages."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Params, ParamsError, load_params, stage_params

PARAMS_FILE = "params.json"
# An existing folder holding any of these at its top level is a project, a package or a
# repository, never a stage's earlier output: atomic_dir refuses to replace it (a second line of
# defence behind config.path_problems, which refuses such paths.* values up front).
NOT_AN_OUTPUT = (".git", ".dvc", "dvc.yaml", "params.yaml", "__init__.py")
DEBUG_ENV = "STILL_DEBUG"
REDACTED = "***"
# Name segments (split on _ - . and camelCase) that mark a secret: `api_key`, `accessToken`,
# `WANDB_API_KEY`, but not plain words that merely contain one, like `tokenizer`.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd",
                 "credential", "credentials", "auth", "signature", "sig", "sas"}
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):"
                           r"(?P<secret>[^@/\s]+)@")
_QUERY_PARAM = re.compile(r"(?P<name>[?&;][^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _umask_mode(mode: int) -> int:
    """mkstemp/mkdtemp create private (0600/0700) paths; artifacts get the usual umask."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


class StageError(RuntimeError):
    """A stage cannot go on; the message says what was wrong and how to fix it."""


def resolve_location(location: str) -> str:
    """Turn `pkg:module/sub/path` into a local path inside the installed package; pass anything
    else (local path, fsspec URI, hub id) through unchanged.

    The package is located with `importlib.util.find_spec`, which does not execute its code.
    """
    if not location.startswith("pkg:"):
        return location
    module, _, sub = location[len("pkg:") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"{location}: package {module!r} is not installed (pip install it, or point the "
            "param at a local path / URI instead)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise StageError(f"{location}: {path} does not exist inside package {module!r}")
    return str(path)


def is_secret_name(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", words))


def redact(value: Any) -> Any:
    """A copy of `value` safe to log or write beside artifacts: values under secret-looking keys
    (at any depth) become "***", and so do passwords inside URLs (`s3://user:pw@host`) and
    secret-looking query parameters (`...?token=...`, `X-Amz-Signature=...`)."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and v not in (None, "") else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        value = _URL_USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", value)
        return _QUERY_PARAM.sub(
            lambda m: f"{m['name']}={REDACTED}" if is_secret_name(m["name"][1:]) else m[0],
            value)
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # prepare/tokenizer don't need torch
        return
    torch.manual_seed(seed)


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
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the stage that produces it first (dvc repro)")
    return json.loads(path.read_text())


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
                         "replace it: point the paths.* entry at a folder of its own")
    found = [name for name in NOT_AN_OUTPUT if (final / name).exists()]
    if found:
        raise StageError(f"{final} holds {', '.join(found)}: it is source code or a project, "
                         "not a stage output; refusing to replace it: point the paths.* entry "
                         "at a folder of its own")


def file_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def stage_main(name: str, run: Callable[[Params], Any]) -> None:
    """Entry point of `python -m components.<stage>`: read params.yaml, run, report the time.

    Any failure prints one `<stage>: error: ...` line on stderr and exits with status 2:
    ParamsError/StageError with their message (they already say what to fix), anything else
    (a library's error on unreadable input, say) as `<Type>: <first line>` plus a hint.
    With STILL_DEBUG=1 the exception propagates with its full traceback. KeyboardInterrupt
    and SystemExit are not caught.
    """
    start = time.perf_counter()
    try:
        run(load_params())
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(err, ParamsError | StageError):
            print(f"{name}: error: {err}", file=sys.stderr)
        else:
            first = next(iter(str(err).strip().splitlines()), "")
            print(f"{name}: error: {type(err).__name__}" + (f": {first}" if first else ""),
                  file=sys.stderr)
            print(f"{name}: rerun with {DEBUG_ENV}=1 to see the traceback", file=sys.stderr)
        sys.exit(2)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s")
