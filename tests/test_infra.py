"""infra/: what the compose file, Kubernetes files, Dockerfiles and scripts do, checked without a
Docker engine or a cluster: the compose environment as Prefect reads it, the job template and
worker manifest against Prefect's own schema code and prefect-kubernetes' settings, the scripts
run for real (build.sh with a recording `docker`, install.sh dry-run, the image entrypoint in a
temp DVC repo), the runtime lock regenerated. The Job a flow run gets, built by
prefect-kubernetes' worker code, and the process-worker run are in tests/test_deploy.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
DOCKER = INFRA / "docker"
K8S = INFRA / "k8s"
JOB_TEMPLATE = K8S / "base-job-template.json"
WORKER = K8S / "worker.yaml"
LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "DVC_ACCESS_KEY_ID", "DVC_SECRET_ACCESS_KEY")
DEV_TOOLS = ("pytest", "ruff", "moto", "flask", "cfn-lint", "prefect-kubernetes")
BIN = str(Path(sys.executable).parent)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def docker_compose_works() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return probe.returncode == 0


# Compose's interpolation for the forms compose.yaml uses: $$, ${VAR}, ${VAR:-default},
# ${VAR:?error} (`docker compose config` is not available here; its own test runs where it is).
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


class MissingVariable(KeyError):
    pass


def interpolate(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise MissingVariable(arg)
        return arg if op == ":-" else ""

    return INTERPOLATION.sub(value, node)


def service(name: str, env: dict[str, str]) -> dict:
    return interpolate(compose()["services"][name], env)


SECRET_VALUES = {
    "POSTGRES_PASSWORD": "p@ss:w/rd%#?&",  # every character that breaks a hand-built URL
    "PREFECT_AUTH_STRING": "admin:s3cret",
    "MINIO_ROOT_USER": "still-admin",
    "MINIO_ROOT_PASSWORD": "minio-secret",
    "DVC_ACCESS_KEY_ID": "still-dvc",
    "DVC_SECRET_ACCESS_KEY": "dvc-secret",
}


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


def test_compose_start_order_and_restarts():
    services = compose()["services"]
    deps = {name: s.get("depends_on", {}) for name, s in services.items()}
    assert deps["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["minio"]["condition"] == "service_healthy"
    for worker in ("worker", "worker-gpu"):
        assert deps[worker]["prefect-server"]["condition"] == "service_healthy"
        assert deps[worker]["minio-init"]["condition"] == "service_completed_successfully"
    for name, targets in deps.items():
        assert set(targets) <= set(services), f"{name} depends on an unknown service"
    # Long-running services come back after a crash or a host reboot; the one-shot job must
    # not (the workers wait for it to *complete*).
    restarts = {name: s.get("restart") for name, s in services.items()}
    assert restarts.pop("minio-init") == "no"
    assert set(restarts.values()) == {"unless-stopped"}, restarts


def test_compose_refuses_to_start_without_each_secret():
    text = COMPOSE.read_text()
    assert set(SECRETS) <= set(REQUIRED.findall(text))
    for missing in SECRETS:
        env = {k: v for k, v in SECRET_VALUES.items() if k != missing}
        with pytest.raises(MissingVariable, match=missing):
            interpolate(compose(), env)
    interpolate(compose(), SECRET_VALUES)  # all set: nothing missing


def test_compose_secrets_only_from_the_environment():
    for name, spec in compose()["services"].items():
        for key, value in spec.get("environment", {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY", "API_KEY",
                                            "AUTH", "TOKEN")):
                assert str(value).startswith("${"), f"{name}: {key} must come from the env"
    # minio-init's script leaves the values to its own shell ($$): they never show up in the
    # interpolated file.
    script = service("minio-init", SECRET_VALUES)["command"][0]
    assert "$MINIO_ROOT_PASSWORD" in script and "minio-secret" not in script


def test_prefect_server_reads_an_escaped_database_url_auth_and_ui_url(monkeypatch):
    """The server's environment as Prefect's settings read it: the password, full of URL
    delimiters, comes back intact from the URL Prefect builds; the API requires the auth string;
    the UI calls the API at the host's address, not 0.0.0.0."""
    from prefect.settings import Settings
    from sqlalchemy.engine import make_url

    server = service("prefect-server", SECRET_VALUES)
    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    for key, value in server["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    url = make_url(settings.server.database.connection_url.get_secret_value())
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg", "postgres", 5432, "prefect")
    assert url.username == "prefect" and url.password == SECRET_VALUES["POSTGRES_PASSWORD"]
    assert settings.server.api.auth_string.get_secret_value() == "admin:s3cret"
    assert settings.server.ui.api_url == "http://localhost:4200/api"
    assert settings.server.analytics_enabled is False
    # the workers authenticate with the same string
    for worker in ("worker", "worker-gpu"):
        env = service(worker, SECRET_VALUES)["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == "admin:s3cret"


def test_compose_ports_listen_on_this_host_only():
    for name, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to every host"


def test_postgres_is_healthy_only_when_it_accepts_tcp():
    test = compose()["services"]["postgres"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    args = shlex.split(test[1])
    assert args[0] == "pg_isready" and args[args.index("-h") + 1] == "127.0.0.1"


def test_workers_exec_through_the_image_entrypoint():
    """An exec-form command and no `entrypoint:`: the image's tini + still-entrypoint run and
    exec the worker, so `docker compose stop` reaches it (a `sh -c` without exec swallows it),
    and the entrypoint points DVC at MinIO inside the network."""
    for name in ("worker", "worker-gpu"):
        spec = service(name, SECRET_VALUES)
        assert "entrypoint" not in spec
        command = spec["command"]
        assert isinstance(command, list) and command[:3] == ["prefect", "worker", "start"]
        pool = command[command.index("--pool") + 1]
        assert command[command.index("--type") + 1] == "process" and pool.startswith("still-")
        env = spec["environment"]
        assert env["DVC_REMOTE_ENDPOINT"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == "still-dvc"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_images_are_pinned_and_minio_comes_from_quay():
    """Docker Hub no longer serves minio/minio and minio/mc: the defaults pull pinned releases
    from quay.io, by tag and digest; no third-party image floats on `latest`."""
    for name, spec in compose()["services"].items():
        image = interpolate(spec["image"], {})
        if image.startswith("still:"):
            continue  # built here by infra/docker/build.sh
        assert ":" in image.split("/")[-1] and not image.endswith(":latest"), (name, image)
    for name in ("minio", "minio-init"):
        image = interpolate(compose()["services"][name]["image"], {})
        assert image.startswith("quay.io/minio/") and "@sha256:" in image
        assert re.search(r":RELEASE\.\d{4}-\d\d-\d\dT", image), image


def test_minio_init_creates_the_dvc_bucket_once():
    init = compose()["services"]["minio-init"]
    script = "\n".join(init["command"])
    assert init["restart"] == "no" and "minio/mc" in init["image"]
    assert "mc mb --ignore-existing" in script and "$$DVC_BUCKET" in script
    assert init["environment"]["DVC_BUCKET"] == "${DVC_BUCKET:-still-dvc}"
    assert "still-dvc" in (INFRA / "README.md").read_text()


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


def worker_manifest() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(WORKER.read_text()) if d}


def test_k8s_files_parse():
    files = sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert JOB_TEMPLATE in files and WORKER in files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    kinds = [d["kind"] for d in yaml.safe_load_all(WORKER.read_text())]
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
    assert "still:cuda-<git sha>" in template["variables"]["description"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The image's entrypoint must run (it applies DVC_REMOTE_ENDPOINT): no `command` override;
    # Prefect's command goes to `args` (dropped here while unset: the worker fills it in).
    (raw,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"]
    assert "command" not in raw and raw["args"] == "{{ command }}"
    # The image's user (uid 10001, infra/docker); runAsNonRoot needs the numeric uid.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert f"USER {pod['securityContext']['runAsUser']}:" in (DOCKER / dockerfile).read_text()


def test_dvc_endpoint_is_required_by_prefects_schema_validation():
    """The server validates a flow run's job variables with this function and the pool's
    schema (required keys included): no endpoint, or an empty one, is refused, not defaulted."""
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = job_template()["variables"]
    assert "default" not in schema["properties"]["dvc_remote_endpoint"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}

    def check(values: dict) -> None:
        validate({**defaults, **values}, schema, raise_on_error=True, preprocess=True,
                 ignore_required=False, allow_none_with_default=True)

    with pytest.raises(ValidationError, match="dvc_remote_endpoint"):
        check({})
    with pytest.raises(ValidationError):
        check({"dvc_remote_endpoint": ""})
    check({"dvc_remote_endpoint": "http://minio.still.svc:9000"})


def test_worker_manifest_keeps_the_image_entrypoint_and_pins_the_worker():
    from importlib.metadata import version

    from prefect_kubernetes.settings import KubernetesSettings

    (container,) = worker_manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "command" not in container, "`command` replaces the entrypoint that installs " \
        "EXTRA_PIP_PACKAGES"
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--type") + 1] == "kubernetes"
    assert args[args.index("--pool") + 1] == "still-k8s"
    assert container["image"] == f"prefecthq/prefect:{version('prefect')}-python3.11"
    env = {e["name"]: e for e in container["env"]}
    pinned = env["EXTRA_PIP_PACKAGES"]["value"]
    assert pinned == f"prefect-kubernetes=={version('prefect-kubernetes')}"
    assert pinned in LOCK.read_text().splitlines()

    # The observer watches the worker's own namespace, the reach of its namespaced Role;
    # prefect-kubernetes reads the variable under this name.
    observer = env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]
    assert observer["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    os.environ["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] = "still"
    try:
        assert KubernetesSettings().observer.namespaces == {"still"}
    finally:
        del os.environ["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]
    kinds = worker_manifest()
    assert kinds["RoleBinding"]["roleRef"]["kind"] == "Role"
    rules = {(g, r): set(rule["verbs"]) for rule in kinds["Role"]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "delete", "watch"} <= rules[("batch", "jobs")]
    assert {"list", "watch"} <= rules[("", "pods")] and "get" in rules[("", "pods/log")]

    # Jobs get the Prefect auth string from the worker's secret, not as a literal value.
    auth = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"] == \
        auth["name"]
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"] == \
        auth["key"]


def documented(command: str) -> list[list[str]]:
    """Every `python -m flows.deploy ...` command in the infra notes, as argv (continuations
    joined, shell substitutions kept as words)."""
    text = (K8S / "README.md").read_text() + (INFRA / "README.md").read_text()
    text = re.sub(r"\$\([^)]*\)", "SHA", text.replace("\\\n", " "))
    return [shlex.split(line[line.index(command) + len(command):].split("#")[0])
            for line in text.splitlines() if command in line and "`" not in line]


def test_documented_deploy_commands_parse():
    from flows.deploy import cli

    commands = documented("python -m flows.deploy")
    assert commands, "the infra notes show how to deploy"
    for argv in commands:
        args = cli().parse_args(argv)
        if args.command == "deploy" and args.image:  # an image pool: the endpoint is required
            assert args.dvc_remote_endpoint, argv
    note = (K8S / "README.md").read_text() + (INFRA / "README.md").read_text()
    assert "prefect work-pool create still-k8s --type kubernetes" in note
    assert "--base-job-template infra/k8s/base-job-template.json" in note


# --------------------------------------------------------------------------- docker


def test_dockerfiles_install_the_runtime_lock_then_the_project_as_a_user():
    for variant in ("cpu", "cuda"):
        text = "\n".join(line for line in (DOCKER / f"Dockerfile.{variant}").read_text()
                         .splitlines() if not line.startswith("#"))  # instructions only
        deps = text.index(f"install.sh deps {variant}")
        checkout = text.index("COPY --chown=10001:10001 . .")
        assert text.index("COPY requirements-runtime.lock infra/docker/install.sh") < deps
        assert deps < checkout < text.index(f"install.sh project {variant}")
        # the full lock (with the dev tools) is never installed
        assert "-r requirements.lock" not in text and "COPY requirements.lock" not in text
        assert "USER 10001:10001" in text and "useradd --uid 10001" in text
        assert 'ENTRYPOINT ["tini", "--", "still-entrypoint"]' in text
        assert "[trt]" not in text and "s3,trt" not in text


def test_cuda_image_tensorrt_version_satisfies_the_trt_extra():
    import tomllib

    from packaging.requirements import Requirement

    text = (DOCKER / "Dockerfile.cuda").read_text()
    version = re.search(r"^ARG TENSORRT_VERSION=(\S+)$", text, re.M).group(1)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["trt"]
    (spec,) = [Requirement(r) for r in extra if Requirement(r).name == "tensorrt"]
    assert spec.specifier.contains(version), (version, spec)


def install_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "install.sh"), *args], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env})


@pytest.mark.parametrize("major, index", [("12", "cu128"), ("13", "cu130")])
def test_install_script_matches_torch_and_tensorrt_to_the_cuda_major(major, index):
    proc = install_sh("deps", "cuda", CUDA_MAJOR=major, CUDA_VERSION=f"{major}.0.1",
                      TENSORRT_VERSION="10.16.1.11")
    assert proc.returncode == 0, proc.stderr
    pip_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ pip install")]
    assert f"https://download.pytorch.org/whl/{index} -r requirements-runtime.lock" in \
        pip_lines[0]
    assert pip_lines[1] == f"+ pip install tensorrt-cu{major}==10.16.1.11"


def test_install_script_refuses_mixed_cuda_versions():
    proc = install_sh("deps", "cuda", CUDA_MAJOR="12", CUDA_VERSION="13.0.1",
                      TENSORRT_VERSION="10.16.1.11")
    assert proc.returncode == 2 and "base image is CUDA 13.0.1, but CUDA_MAJOR=12" in proc.stderr
    proc = install_sh("deps", "cuda", CUDA_MAJOR="11", CUDA_VERSION="11.8.0",
                      TENSORRT_VERSION="10.16.1.11")
    assert proc.returncode == 2 and "not supported" in proc.stderr
    cpu = install_sh("deps", "cpu")
    assert cpu.returncode == 0 and "whl/cpu -r requirements-runtime.lock" in cpu.stdout
    assert "tensorrt" not in cpu.stdout
    project = install_sh("project", "cpu")
    assert "+ pip install --no-deps -e ." in project.stdout
    assert "+ python infra/docker/check_image.py cpu" in project.stdout


def test_image_check_finds_the_dev_tools_of_this_environment():
    """check_image.py ends every image build; run here (a dev environment) it must name the dev
    tools it finds, which the images must not have."""
    proc = subprocess.run([sys.executable, str(DOCKER / "check_image.py"), "cpu"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    found = re.search(r"dev-only packages installed: (.*)", proc.stderr).group(1).split(", ")
    assert {"pytest", "ruff", "moto"} <= set(found), proc.stderr
    assert "is not installed" not in proc.stderr, "this venv must match the runtime lock"


def test_image_check_spots_wheels_of_another_cuda_major():
    sys.path.insert(0, str(DOCKER))
    try:
        from check_image import foreign_cuda
    finally:
        sys.path.remove(str(DOCKER))
    names = ["tensorrt-cu13", "tensorrt-cu13-libs", "nvidia-cublas-cu12", "torch", "cuda-bindings",
             "tensorrt-cu12-bindings"]
    assert foreign_cuda(names, 12) == ["tensorrt-cu13", "tensorrt-cu13-libs"]
    assert foreign_cuda(names, 13) == ["nvidia-cublas-cu12", "tensorrt-cu12-bindings"]


def lock_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_runtime_lock_is_the_lock_minus_dev_tools():
    from packaging.utils import canonicalize_name

    runtime = lock_lines(RUNTIME_LOCK)
    assert set(runtime) <= set(lock_lines(LOCK)), "same pins as requirements.lock"
    names = {canonicalize_name(ln.split("==")[0]) for ln in runtime}
    assert not names & set(DEV_TOOLS), names & set(DEV_TOOLS)
    assert {"prefect", "dvc", "dvc-s3", "s3fs", "torch", "onnxruntime"} <= names
    # Regenerated from the installed packages' metadata, it is the committed file.
    proc = subprocess.run([sys.executable, str(DOCKER / "runtime_lock.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dockerignore_keeps_the_checkout_and_drops_secrets():
    ignore = (DOCKER / "dockerignore").read_text().split("\n")
    patterns = {line.strip() for line in ignore if line.strip() and not line.startswith("#")}
    assert {".venv/", ".dvc/cache/", ".dvc/config.local", ".env", "artifacts/"} <= patterns
    assert not patterns & {".git", ".git/", "requirements-runtime.lock", "pyproject.toml",
                           ".dvc/", "infra/"}
    for variant in ("cpu", "cuda"):
        link = DOCKER / f"Dockerfile.{variant}.dockerignore"
        assert link.resolve() == (DOCKER / "dockerignore").resolve()


# ---------------------------------------------------------------- build.sh and the entrypoint


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repo holding infra/docker, committed, with origin at an HTTPS URL that carries a
    token, an uncommitted edit and an untracked secret."""
    repo = tmp_path / "checkout"
    shutil.copytree(DOCKER, repo / "infra" / "docker", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "app.py").write_text("committed = True\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "init", cwd=repo)
    git("remote", "add", "origin", "https://ci-bot:ghp_TOKEN@git.example.com/team/still.git",
        cwd=repo)
    (repo / "app.py").write_text("committed = False  # uncommitted edit\n")
    (repo / ".env").write_text("SECRET=1\n")
    (repo / "notes.txt").write_text("untracked\n")
    return repo


def build(checkout: Path, tmp_path: Path, *args: str, **env: str):
    """Run the checkout's build.sh with a `docker` that records its arguments and what the
    build context holds (the context is deleted when build.sh exits)."""
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\necho "docker $*"\nfor last; do :; done\n'
                    '[ "$1" = build ] || exit 0\n'
                    'echo "context-files: $(cd "$last" && find . -path ./.git -prune -o -type f '
                    '-print | sort | tr "\\n" " ")"\n'
                    'echo "context-origin: $(git -C "$last" remote get-url origin)"\n'
                    'echo "context-app: $(cat "$last/app.py")"\n')
    fake.chmod(0o755)
    run_env = {"PATH": f"{fake.parent}:/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path),
               **env}
    return subprocess.run(["bash", str(checkout / "infra/docker/build.sh"), *args], env=run_env,
                          cwd=checkout, capture_output=True, text=True)


def test_build_script_builds_exactly_the_commit(checkout, tmp_path):
    assert subprocess.run(["bash", "-n", str(DOCKER / "build.sh")]).returncode == 0
    proc = build(checkout, tmp_path, "cpu")
    assert proc.returncode == 0, proc.stderr
    sha = git("rev-parse", "--short", "HEAD", cwd=checkout)
    (call,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("docker build")]
    assert f"--tag=still:cpu-{sha}" in call and "--tag=still:latest" in call
    assert "--file " in call and call.split("--file ")[1].split()[0].endswith(
        "/infra/docker/Dockerfile.cpu")
    files = next(ln for ln in proc.stdout.splitlines() if ln.startswith("context-files:"))
    assert "./app.py" in files and "./.env" not in files and "./notes.txt" not in files
    assert "context-app: committed = True" in proc.stdout  # the commit, not the edit
    # pushes from the image go to the real remote, without the token that was in the URL
    assert "context-origin: https://git.example.com/team/still.git" in proc.stdout
    assert "ghp_TOKEN" not in proc.stdout
    assert "NOT in the image" in proc.stderr  # the dirty worktree is reported


def test_build_script_passes_the_cuda_major(checkout, tmp_path):
    sha = git("rev-parse", "--short", "HEAD", cwd=checkout)
    proc = build(checkout, tmp_path, "cuda", CUDA_MAJOR="12")
    assert proc.returncode == 0, proc.stderr
    (call,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("docker build")]
    assert "--build-arg CUDA_MAJOR=12" in call
    assert "--build-arg CUDA_IMAGE=nvidia/cuda:12." in call
    assert f"--tag=still:cuda12-{sha}" in call
    default = build(checkout, tmp_path, "cuda")
    (call,) = [ln for ln in default.stdout.splitlines() if ln.startswith("docker build")]
    assert "--build-arg CUDA_MAJOR=13" in call and "CUDA_IMAGE=nvidia/cuda:13." in call
    assert f"--tag=still:cuda-{sha}" in call
    bad = build(checkout, tmp_path, "cuda", CUDA_MAJOR="11")
    assert bad.returncode == 2 and "not supported" in bad.stderr
    # the CUDA base image build.sh picks is the one the Dockerfile defaults to for CUDA 13
    dockerfile = (DOCKER / "Dockerfile.cuda").read_text()
    assert "ARG CUDA_MAJOR=13" in dockerfile
    assert re.search(r"CUDA_IMAGE=(nvidia/cuda:13\S+)", call).group(1) in dockerfile


def entrypoint(cwd: Path, home: Path, *command: str, **env: str):
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *command], cwd=cwd,
                          capture_output=True, text=True,
                          env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                               "HOME": str(home), **env})


@pytest.fixture
def dvc_checkout(tmp_path) -> Path:
    repo = tmp_path / "app"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "remote", "add", "-d", "minio", "s3://still-dvc"], cwd=repo, check=True)
    subprocess.run([*dvc, "remote", "modify", "minio", "endpointurl", "http://localhost:9000"],
                   cwd=repo, check=True)
    return repo


def test_entrypoint_points_dvc_at_the_endpoint(dvc_checkout, tmp_path):
    proc = entrypoint(dvc_checkout, tmp_path, "echo", "ran",
                      DVC_REMOTE_ENDPOINT="http://minio:9000")
    assert proc.returncode == 0 and proc.stdout == "ran\n", proc.stderr
    local = (dvc_checkout / ".dvc" / "config.local").read_text()
    assert "endpointurl = http://minio:9000" in local
    assert "localhost:9000" in (dvc_checkout / ".dvc" / "config").read_text()  # untouched


def test_entrypoint_execs_the_command_in_its_own_process(dvc_checkout, tmp_path):
    child = subprocess.Popen(["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", "echo $$"],
                             cwd=dvc_checkout, stdout=subprocess.PIPE, text=True,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    out, _ = child.communicate(timeout=30)
    assert out.strip() == str(child.pid), "the command must replace the entrypoint (exec)"


def test_entrypoint_refuses_an_endpoint_without_a_remote(tmp_path):
    repo = tmp_path / "bare"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    proc = entrypoint(repo, tmp_path, "true", DVC_REMOTE_ENDPOINT="http://minio:9000")
    assert proc.returncode == 2 and "no default DVC remote" in proc.stderr


def test_entrypoint_lets_git_read_the_token_from_the_environment(dvc_checkout, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = entrypoint(dvc_checkout, home, "true", GIT_TOKEN="ghp_secret")
    assert proc.returncode == 0, proc.stderr
    assert "ghp_secret" not in (home / ".gitconfig").read_text(), "the token stays in the env"
    fill = subprocess.run(["git", "credential", "fill"], cwd=dvc_checkout, text=True,
                          capture_output=True, input="protocol=https\nhost=git.example.com\n\n",
                          env={"PATH": os.environ["PATH"], "HOME": str(home),
                               "GIT_TOKEN": "ghp_secret", "GIT_TERMINAL_PROMPT": "0"})
    assert "username=x-access-token" in fill.stdout and "password=ghp_secret" in fill.stdout
