"""Small helpers every stage uses: atomic outputs, resolved params beside artifacts, seeding,
`pkg:` locations for data and weights that ship inside installed packages, and safe reading:
`reading` (a damaged file becomes one StageError naming it and the fix), `remote_options` and
`RemoteWaits` (timeouts for remote sources, bounding each whole wait and saying what it waits
for) and `walk_local` (the files under a source folder,
never leaving it, never hidden ones)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from components.config import Params, ParamsError, load_params, stage_params

PARAMS_FILE = "params.json"
# An existing folder holding any of these at its top level is a project, a package or a
# repository, never a stage's earlier output: atomic_dir refuses to replace it (a second line of
# defence: output locations are fixed in dvc.yaml, and config.path_problems checks the ones
# code sets).
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


def remote_options(location: str, timeout_s: float) -> dict[str, Any]:
    """fsspec storage options that bound how long a remote server may stay silent: a connect
    and a per-read timeout of `timeout_s` seconds (no cap on a whole download, which may be
    long). Empty for local paths and for protocols without such a setting. `RemoteWaits` adds
    the bound on a whole call (its retries and re-requests included)."""
    protocol = location.split("://", 1)[0].lower() if "://" in location else "file"
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s}}
    if protocol in ("gs", "gcs"):
        return {"timeout": timeout_s}
    return {}


# A wait for a remote server longer than this gets a line saying what it waits for, and another
# every NOTICE_EVERY_S while it lasts.
NOTICE_AFTER_S = 5.0
NOTICE_EVERY_S = 10.0


class RemoteWaits:
    """Every wait of a stage for one remote location: bounded by `timeout_s`, and said.

    fsspec's HTTP filesystem asks a silent server twice for one file's size (HEAD, then GET),
    each time for the client's whole read timeout, and other filesystems retry too, so the
    per-request timeouts of `remote_options` alone let a stage sit silent for a multiple of
    `timeout_s`. Here:
    - `call` runs a metadata call (info, exists, isdir, ls: a few small requests) with its whole
      wait, retries included, bounded by `timeout_s` (fsspec cancels it and raises its
      FSTimeoutError, a TimeoutError);
    - `open` opens a file for reading after such a bounded `info` (a missing file or a silent
      server fails there), and reads it through a wrapper that says when a read waits; a read
      that gets no data for `timeout_s` is ended by the client's per-read timeout. A download
      that keeps receiving data is never cut: HTTP files read sequentially (csv, tsv, jsonl,
      compressed or not) are streamed, so a read returns as soon as data arrives;
    - while any of these waits longer than NOTICE_AFTER_S, a line on stderr says what for:
      `prepare: waiting for https://host/data.csv (5 s of 60 s)` (again every NOTICE_EVERY_S).

    Args:
        location: the location as the user wrote it (shown in notices, secrets redacted).
        timeout_s: the longest wait for an answer, in seconds.
        who: the stage or command waiting (`prepare`, `source`, `predict`).
    """

    def __init__(self, location: str, timeout_s: float, who: str):
        self.location = redact(location)
        self.timeout_s = timeout_s
        self.who = who
        self._since: float | None = None
        self._notices = 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Say what this block waits for while it runs longer than NOTICE_AFTER_S."""
        self._since, self._notices = time.monotonic(), 0
        _NOTICES.watch(self)
        try:
            yield
        finally:
            _NOTICES.forget(self)
            self._since = None

    def _tick(self, now: float) -> None:
        """Print the next notice when it is due (called by the notice thread)."""
        since = self._since
        if since is None:
            return
        waited = now - since
        if waited >= NOTICE_AFTER_S + self._notices * NOTICE_EVERY_S:
            self._notices += 1
            print(f"{self.who}: waiting for {self.location} ({waited:.0f} s of "
                  f"{self.timeout_s:g} s)", file=sys.stderr, flush=True)

    def call(self, fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """`fs.<method>(*args, **kwargs)`, its whole wait bounded by `timeout_s` on an async
        (remote) filesystem: only for calls that make a few small requests, never for a
        download or a long listing, which may take longer while data keeps coming."""
        from fsspec.asyn import AsyncFileSystem, sync

        with self.waiting():
            coroutine = getattr(fs, f"_{method}", None)
            if isinstance(fs, AsyncFileSystem) and not fs.asynchronous and coroutine:
                return sync(fs.loop, coroutine, *args, timeout=self.timeout_s, **kwargs)
            return getattr(fs, method)(*args, **kwargs)

    def watched(self, fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """`fs.<method>(*args, **kwargs)` announced while it waits, bounded only by the client's
        per-request timeouts (a listing or download that keeps receiving data is not cut)."""
        with self.waiting():
            return getattr(fs, method)(*args, **kwargs)

    def open(self, fs: Any, path: str, sequential: bool) -> io.BufferedReader:
        """`path` on `fs` opened for reading (binary, buffered), every read announced while it
        waits. `sequential`: the caller reads it from start to end (an HTTP file is then
        streamed); otherwise it may seek (Parquet)."""
        from fsspec.implementations.http import HTTPFileSystem

        size = self.call(fs, "info", path).get("size")
        with self.waiting():
            if isinstance(fs, HTTPFileSystem):
                # The size just read spares fsspec a second HEAD, which would not be bounded
                # (without one, it asks again: the server answered a moment ago).
                raw = fs.open(path, "rb", block_size=0 if sequential else None, size=size)
            else:
                raw = fs.open(path, "rb")
        return io.BufferedReader(_WaitedReads(raw, self), buffer_size=1 << 20)


class _WaitedReads(io.RawIOBase):
    """A remote file whose every read is `RemoteWaits.waiting`."""

    def __init__(self, raw: Any, waits: RemoteWaits):
        super().__init__()
        self._raw, self._waits = raw, waits

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def readinto(self, buffer: Any) -> int:
        with self._waits.waiting():
            data = self._raw.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Notices:
    """One daemon thread that lets every `RemoteWaits` currently waiting print its notices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[RemoteWaits] = set()
        self._thread: threading.Thread | None = None

    def watch(self, waits: RemoteWaits) -> None:
        with self._lock:
            self._waiting.add(waits)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="still-notices",
                                                daemon=True)
                self._thread.start()

    def forget(self, waits: RemoteWaits) -> None:
        with self._lock:
            self._waiting.discard(waits)

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                waiting = list(self._waiting)
            for waits in waiting:
                waits._tick(time.monotonic())


_NOTICES = _Notices()


def remote_problem(where: str, err: BaseException, timeout_s: float,
                   remote: bool = True) -> str | None:
    """The message for a source that did not answer in time or could not be reached (`where`
    names it), or None when `err` is something else. fsspec's HTTP filesystem reports a timeout
    or a refused connection as FileNotFoundError with the real error as its cause: the whole
    cause chain is looked at."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    timeout = next((e for e in chain if isinstance(e, TimeoutError)), None)
    if timeout is not None:
        return (f"{where}: no answer within prepare.timeout_s={timeout_s:g} s "
                f"({describe(timeout)}); check the URL and the network, or raise "
                "prepare.timeout_s")
    unreachable = next((e for e in chain if _is_connection_error(e)), None)
    if remote and unreachable is not None:
        return (f"{where}: cannot fetch it ({describe(unreachable)}); check the URL and that "
                "the server is up (a flaky network is retried by the pipeline flow)")
    return None


def _is_connection_error(err: BaseException) -> bool:
    """A refused or dropped connection, or an HTTP error status other than 404."""
    if isinstance(err, ConnectionError):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    if isinstance(err, aiohttp.ClientResponseError):
        return err.status != 404
    return isinstance(err, aiohttp.ClientError)


# Why a file or folder under a source folder is not read (`walk_local`).
SKIP_REASONS = {
    "hidden": "its name starts with '.', or it links to such an entry (dotfiles may hold "
              "secrets or tool state)",
    "outside_source": "a symlink whose target is outside the source folder",
    "broken_link": "a symlink whose target does not exist",
    "link_loop": "a folder symlink back to a folder it is inside",
    "not_a_file": "not a regular file (a FIFO, socket or device would block or never end)",
}


@dataclass
class Listing:
    """The files under a folder that may be read, and what was left out, by reason."""

    files: list[tuple[str, Path]] = field(default_factory=list)  # (relative posix path, path)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, relative path)


def walk_local(root: str | Path) -> Listing:
    """Every regular file under `root` that stays inside it, in sorted order.

    Never leaves the root: a symlink (file or folder) is followed only when its resolved
    target is inside `root`; hidden entries (names starting with `.`, or links to one) are
    never read and their folders never entered; FIFOs, sockets and devices are never opened.
    Each entry left out is listed once with its reason (a key of SKIP_REASONS); nothing under
    it is visited.
    """
    root = Path(root)
    real_root = root.resolve()
    listing = Listing()

    def visit(folder: Path, rel: PurePosixPath, inside: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path, name = Path(entry.path), (rel / entry.name).as_posix()
            if entry.name.startswith("."):
                listing.skipped.append(("hidden", name))
                continue
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):  # missing target, or a loop of links
                    listing.skipped.append(("broken_link", name))
                    continue
                if not target.is_relative_to(real_root):
                    listing.skipped.append(("outside_source", name))
                    continue
                if any(part.startswith(".") for part in target.relative_to(real_root).parts):
                    listing.skipped.append(("hidden", name))  # a link to `.secrets/key`
                    continue
            if path.is_dir():
                real = path.resolve()
                if real in inside:
                    listing.skipped.append(("link_loop", name))
                    continue
                visit(path, rel / entry.name, inside | {real})
            elif path.is_file():
                listing.files.append((name, path))
            else:
                listing.skipped.append(("not_a_file", name))

    visit(root, PurePosixPath(), frozenset({real_root}))
    return listing


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


def cut_at_word(text: str, max_chars: int) -> str:
    """`text` when it is at most `max_chars` long, else its start cut at the last whitespace at
    or before `max_chars` (no word is split; trailing whitespace dropped), or at `max_chars`
    itself when there is none (a text without spaces: a blob, CJK)."""
    if len(text) <= max_chars:
        return text
    end = max_chars  # text[max_chars] exists: the text is longer
    while end > 0 and not text[end].isspace():
        end -= 1
    return text[:end].rstrip() if end > 0 and text[:end].strip() else text[:max_chars]


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
