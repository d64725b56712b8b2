"""Waits for a remote source are bounded and said (issue 27): `prepare.timeout_s` bounds the
whole wait for a server that accepts and never answers (fsspec's HEAD-then-GET included), for
both the `source` stage (which asks for object versions) and `prepare` (which reads), a read
that stalls halfway fails the same way, a wait of more than a few seconds prints what it waits
for, and a download that is slow but keeps coming is never cut. Real HTTP servers on
localhost threads."""

from __future__ import annotations

import http.server
import re
import threading
import time

import pytest

from components import prepare, source
from components.config import validate
from components.data import locations
from components.stage import StageError
from tests.conftest import make_examples, tiny_raw_params

GOOD = make_examples(per_class=8, seed=3).drop_duplicates("text").reset_index(drop=True)
BODY = GOOD.to_csv(index=False).encode()
TIMEOUT_S = 2.0


def params_for(tmp_path, url: str, timeout_s: float = TIMEOUT_S):
    return validate(tiny_raw_params(tmp_path / "work", url, tmp_path / "unused-teacher",
                                    **{"prepare.timeout_s": timeout_s}))


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Answers HEAD at once (size, no ETag); sends a GET's body `piece` bytes at a time with
    `pause` seconds between pieces, and after `stall_after` bytes (if set) stops sending."""

    piece, pause, stall_after = 64, 0.0, None

    def log_message(self, *args) -> None:
        pass

    def _headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        self._headers()
        try:
            for start in range(0, len(BODY), self.piece):
                if self.stall_after is not None and start >= self.stall_after:
                    time.sleep(60)  # a stall: the client gives up first
                    return
                self.wfile.write(BODY[start:start + self.piece])
                self.wfile.flush()
                time.sleep(self.pause)
        except (BrokenPipeError, ConnectionResetError):
            pass


def serve(handler: type) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def trickle():
    """A server per handler class given: its base URL; all shut down after the test."""
    servers = []

    def start(**attrs) -> str:
        server, url = serve(type("Handler", (_Trickle,), attrs))
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def timed_failure(run) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        run()
    return str(err.value), time.perf_counter() - start


# 1. A server that never answers: the whole wait is timeout_s ---------------------------------

@pytest.mark.parametrize("name", ["data.csv", "data.csv.gz", "data.parquet", "data"])
def test_prepare_waits_timeout_s_in_all_for_a_silent_server(tmp_path, silent_server, name):
    """fsspec asks for the size with HEAD, then GET, each for the client's read timeout: the
    stage used to wait twice timeout_s (122 s for 60 s) before failing."""
    url = f"{silent_server}/{name}"
    msg, seconds = timed_failure(lambda: prepare.run(params_for(tmp_path, url)))
    assert msg.startswith(f"prepare.source={url!r}: no answer within prepare.timeout_s=2 s ("), \
        msg
    assert msg.endswith("check the URL and the network, or raise prepare.timeout_s"), msg
    assert TIMEOUT_S - 0.5 < seconds < 2 * TIMEOUT_S, seconds
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("name", ["data.csv", "folder/"])
def test_source_waits_timeout_s_in_all_for_a_silent_server(tmp_path, silent_server, name):
    url = f"{silent_server}/{name}"
    msg, seconds = timed_failure(lambda: source.run(params_for(tmp_path, url)))
    assert msg.startswith(f"prepare.source: {url}: no answer within prepare.timeout_s=2 s ("), \
        msg
    assert TIMEOUT_S - 0.5 < seconds < 2 * TIMEOUT_S, seconds


# 2. Later stalls, and downloads that keep coming ----------------------------------------------

def test_a_read_that_stalls_halfway_fails_within_timeout_s(tmp_path, trickle):
    url = trickle(stall_after=len(BODY) // 2) + "/data.csv"
    msg, seconds = timed_failure(lambda: prepare.run(params_for(tmp_path, url)))
    assert msg.startswith(f"prepare.source={url!r}: no answer within prepare.timeout_s=2 s ("), \
        msg
    assert seconds < 2 * TIMEOUT_S, seconds


def test_a_slow_steady_download_is_never_cut(tmp_path, trickle, capsys):
    """The body takes 3 x timeout_s (1 s here) to arrive, a piece every 0.1 s or so: prepare
    reads it all, and the source stage (no ETag: it hashes the content) too, without a
    notice."""
    pause = 3.0 / (len(BODY) / 64)
    url = trickle(piece=64, pause=pause) + "/data.csv"
    params = params_for(tmp_path, url, timeout_s=1)
    start = time.perf_counter()
    report = prepare.run(params)
    assert time.perf_counter() - start > 2.5  # it really was slow
    assert report["rows_kept"] == len(GOOD)
    record = source.run(params)
    assert record["files"] == 1 and record["hashed"].startswith("; content of 1 object")
    assert "waiting for" not in capsys.readouterr().err


# 3. What a long wait says ---------------------------------------------------------------------

def test_a_long_wait_says_what_it_waits_for(tmp_path, silent_server, capsys, monkeypatch):
    """After NOTICE_AFTER_S (5 s; 0.5 s here), and again every NOTICE_EVERY_S (10 s; 1 s)."""
    monkeypatch.setattr(locations, "NOTICE_AFTER_S", 0.5)
    monkeypatch.setattr(locations, "NOTICE_EVERY_S", 1.0)
    url = f"{silent_server}/data.csv?token=secret"
    timed_failure(lambda: prepare.run(params_for(tmp_path, url, timeout_s=3)))
    err = capsys.readouterr().err.splitlines()
    shown = re.escape(f"{silent_server}/data.csv?token=***")  # secrets redacted
    waited = [int(re.fullmatch(rf"prepare: waiting for {shown} \((\d+) s of 3 s\)", line)[1])
              for line in err]
    assert len(waited) >= 2 and waited == sorted(waited) and waited[-1] <= 3, err
    timed_failure(lambda: source.run(params_for(tmp_path, url, timeout_s=1)))
    assert re.match(rf"source: waiting for {shown} \(", capsys.readouterr().err)
