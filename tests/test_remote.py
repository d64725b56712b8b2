"""The project's DVC remote (`minio` in .dvc/config) against a real S3 API: moto's server mode
stands in for MinIO. Real DVC pushes the pipeline's outputs and pulls them back into a fresh
clone; credentials come only from the environment, the endpoint from `.dvc/config.local`."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, sh

BUCKET = "still-dvc"


@pytest.fixture
def s3_endpoint(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=BUCKET)
    return moto_s3


def test_committed_remote_is_default_and_holds_no_secrets():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert cfg["core"]["remote"] == "minio"
    remote = cfg["'remote \"minio\"'"]  # DVC's section name, quotes included
    assert remote["url"] == f"s3://{BUCKET}"
    assert not {"access_key_id", "secret_access_key", "credentialpath"} & set(remote)
    ignored = (ROOT / ".dvc" / ".gitignore").read_text().split()
    assert "/config.local" in ignored


def test_push_then_pull_into_a_fresh_clone(tmp_path, s3_endpoint):
    dvc = [sys.executable, "-m", "dvc"]
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh([*dvc, "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the committed remote
    data = repo / "data" / "prepared"
    data.mkdir(parents=True)
    (data / "train.parquet").write_bytes(os.urandom(4096))
    (data / "report.json").write_text('{"train": 3}\n')
    sh([*dvc, "add", "-q", "data/prepared"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "data"], repo)
    # The endpoint for this machine goes to config.local (git-ignored), like the compose workers.
    sh([*dvc, "remote", "modify", "--local", "minio", "endpointurl", s3_endpoint], repo)
    sh([*dvc, "push"], repo)

    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert len(keys) == 3  # two files + the directory manifest

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "prepared").exists()
    sh([*dvc, "remote", "modify", "--local", "minio", "endpointurl", s3_endpoint], clone)
    sh([*dvc, "pull"], clone)
    for name in ("train.parquet", "report.json"):
        assert (clone / "data/prepared" / name).read_bytes() == (data / name).read_bytes()
    assert "still-test" not in (clone / ".dvc" / "config").read_text()


def test_push_to_a_missing_bucket_fails_clearly(tmp_path, s3_endpoint):
    """A remote whose bucket was never created (minio-init did not run) fails the push with a
    non-zero exit and DVC's message that the bucket does not exist."""
    dvc = [sys.executable, "-m", "dvc"]
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh([*dvc, "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "blob.bin").write_bytes(os.urandom(64))
    sh([*dvc, "add", "-q", "blob.bin"], repo)
    sh([*dvc, "remote", "modify", "--local", "minio", "endpointurl", s3_endpoint], repo)
    sh([*dvc, "remote", "modify", "--local", "minio", "url", "s3://no-such-bucket"], repo)
    failed = subprocess.run([*dvc, "push"], cwd=repo, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "bucket does not exist" in failed.stderr, failed.stderr[-2000:]
