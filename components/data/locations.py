"""Where data and weights come from: `pkg:` locations inside installed packages
(`resolve_location`), `remote_options` and `RemoteWaits` (timeouts for remote sources, bounding
each whole wait and saying what it waits for) and `walk_local` (the files under a source folder,
never leaving it, never hidden ones)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from components.config.redaction import redact
from components.data.files import describe
from components.stage import StageError


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
