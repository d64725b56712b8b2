"""infra/: the compose file, Kubernetes files, Dockerfiles and build script are well formed and
agree with each other and with the code (no Docker engine or cluster needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
DOCKER = INFRA / "docker"
K8S = INFRA / "k8s"
JOB_TEMPLATE = K8S / "base-job-template.json"
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "DVC_ACCESS_KEY_ID",
           "DVC_SECRET_ACCESS_KEY")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def docker_compose_works() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return probe.returncode == 0


# --------------------------------------------------------------------------- compose


def test_compose_services_and_volumes():
    spec = compose()
    services = spec["services"]
    assert {"postgres", "prefect-server", "worker", "minio", "minio-init"} <= set(services)
    assert {"postgres-data", "minio-data"} <= set(spec["volumes"])
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert named <= set(spec["volumes"]), "every named volume is declared"
    for name in ("postgres", "prefect-server", "minio"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"


def test_compose_start_order():
    services = compose()["services"]
    deps = {name: s.get("depends_on", {}) for name, s in services.items()}
    assert deps["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["minio"]["condition"] == "service_healthy"
    for worker in ("worker", "worker-gpu"):
        assert deps[worker]["prefect-server"]["condition"] == "service_healthy"
        assert deps[worker]["minio-init"]["condition"] == "service_completed_successfully"
    for name, targets in deps.items():
        assert set(targets) <= set(services), f"{name} depends on an unknown service"


def test_minio_init_creates_the_dvc_bucket_once():
    init = compose()["services"]["minio-init"]
    script = "\n".join(init["command"])
    assert init["restart"] == "no" and "minio/mc" in init["image"]
    assert "mc mb --ignore-existing" in script and "$$DVC_BUCKET" in script
    assert init["environment"]["DVC_BUCKET"] == "${DVC_BUCKET:-still-dvc}"
    assert "still-dvc" in (INFRA / "README.md").read_text()


def test_compose_secrets_only_from_the_environment():
    text = COMPOSE.read_text()
    required = set(REQUIRED.findall(text))
    assert set(SECRETS) <= required
    for service in compose()["services"].values():
        env = service.get("environment", {})
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY", "API_KEY")):
                assert str(value).startswith("${"), f"{key} must come from the environment"
    assert compose()["services"]["worker"]["environment"]["AWS_ACCESS_KEY_ID"].startswith(
        "${DVC_ACCESS_KEY_ID:?")


@pytest.mark.skipif(not docker_compose_works(), reason="`docker compose` is not available here")
def test_docker_compose_config_accepts_the_file():
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", **{k: "x" * 12 for k in SECRETS}}
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    missing = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          env=missing, capture_output=True, text=True)
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr


# --------------------------------------------------------------------------- kubernetes


def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def test_k8s_files_parse():
    files = sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert JOB_TEMPLATE in files and K8S / "worker.yaml" in files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    kinds = [d["kind"] for d in yaml.safe_load_all((K8S / "worker.yaml").read_text())]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Deployment"]


def test_job_template_requests_a_gpu_in_the_cuda_image():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = job_template()
    assert set(template) == {"job_configuration", "variables"}
    props = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(props), f"placeholders without a variable: {used - set(props)}"

    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    config = apply_values(template["job_configuration"], defaults)
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].startswith("still:cuda-") and container["workingDir"] == "/app"
    assert "still:cuda-<git short sha>" in props["image"]["description"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_k8s_note_deploys_with_the_existing_cli():
    from flows.deploy import main

    note = (K8S / "README.md").read_text() + (INFRA / "README.md").read_text()
    assert "prefect work-pool create still-k8s --type kubernetes" in note
    assert "--base-job-template infra/k8s/base-job-template.json" in note
    assert "python -m flows.deploy deploy --pool still-k8s" in note
    with pytest.raises(SystemExit) as exit_:  # the documented flags exist
        main(["deploy", "--help"])
    assert exit_.value.code == 0


# --------------------------------------------------------------------------- docker


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfiles_install_the_lock_then_the_project(variant):
    text = (DOCKER / f"Dockerfile.{variant}").read_text()
    lock = text.index("-r requirements.lock")
    assert text.index("COPY requirements.lock") < lock < text.index("COPY . .")
    assert "pip install --no-deps -e ." in text and "WORKDIR /app" in text
    assert "--extra-index-url" in text
    if variant == "cpu":
        assert "FROM python:3.11-slim" in text and "download.pytorch.org/whl/cpu" in text
    else:
        assert "nvidia/cuda:" in text and "python3.11" in text and "trt" in text


def test_dockerignore_keeps_the_checkout_and_drops_secrets():
    ignore = (DOCKER / "dockerignore").read_text().split("\n")
    patterns = {line.strip() for line in ignore if line.strip() and not line.startswith("#")}
    assert {".venv/", ".dvc/cache/", ".dvc/config.local", ".env", "artifacts/"} <= patterns
    assert not patterns & {".git", ".git/", "requirements.lock", "pyproject.toml", ".dvc/"}
    for variant in ("cpu", "cuda"):
        link = DOCKER / f"Dockerfile.{variant}.dockerignore"
        assert link.resolve() == (DOCKER / "dockerignore").resolve()


def test_build_script_is_valid_bash_and_tags_with_the_git_sha(tmp_path):
    script = DOCKER / "build.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "docker"  # records the calls instead of building
    fake.write_text('#!/bin/sh\necho "docker $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), "cpu"], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode and "not a git repository" in proc.stderr + proc.stdout:
        pytest.skip("not inside a git checkout")
    assert proc.returncode == 0, proc.stderr
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    (call,) = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert f"--tag=still:cpu-{sha}" in call and "--tag=still:latest" in call
    assert f"--file {DOCKER / 'Dockerfile.cpu'}" in call and call.endswith(str(ROOT))
