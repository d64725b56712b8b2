"""Deployments on real work pools, against Prefect's local server (prefect_test_harness):

- a process pool: `prefect worker start --type process` in a subprocess picks up the nightly
  deployment registered by `flows.deploy.deploy` on the tiny repo and runs it to Completed, one
  task per DVC stage, then `dvc push` and a git push that a fresh clone + `dvc pull` restores from;
- a Kubernetes pool made from infra/k8s/base-job-template.json: the Job a flow run would get,
  built by prefect-kubernetes' own worker code (`resolve_for_flow_run`, which calls
  `prepare_for_flow_run`), and the server refusing runs without the DVC endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.deploy import ENDPOINT_VARIABLE, MODULE_ENTRYPOINTS, DeployError, deploy
from flows.dvc_ops import RUN_BRANCH_PREFIX
from tests.conftest import ROOT, make_dvc_repo, sh

pytestmark = pytest.mark.slow
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
JOB_TEMPLATE = ROOT / "infra" / "k8s" / "base-job-template.json"
PREFECT = str(Path(sys.executable).parent / "prefect")
# The nightly cron would make the server schedule runs the worker could pick up next to ours;
# a yearly one stays out of the way of any test run.
QUIET_CRON = "0 0 1 1 *"
RUN_TIMEOUT = 900  # seconds; the tiny pipeline takes about two minutes on 2 cores


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def remotes(tmp_path_factory, dataset_csv, tiny_teacher):
    """The tiny repo with a bare git remote `origin` and a local-folder DVC remote (default),
    both committed, as a CI or a cluster would have them."""
    base = tmp_path_factory.mktemp("deploy")
    repo = make_dvc_repo(base / "repo", dataset_csv, tiny_teacher)
    origin = base / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], base)
    sh(["git", "remote", "add", "origin", str(origin)], repo)
    sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(base / "dvc-store")],
       repo)
    sh(["git", "add", ".dvc/config"], repo)
    sh(["git", "commit", "-qm", "remotes"], repo)
    sh(["git", "push", "-q", "origin", "main"], repo)
    return repo, origin


class Worker:
    """`prefect worker start` in its own process group, so stopping it also stops the flow run
    and DVC subprocesses it started."""

    def __init__(self, pool: str, api_url: str, home: Path):
        self.pool, self.log = pool, home / "worker.log"
        env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
               "PREFECT_WORKER_QUERY_SECONDS": "2", "WANDB_MODE": "offline"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_online(self, timeout: float = 90) -> None:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited:\n{self.tail()}"
            with get_client(sync_client=True) as client:
                if client.read_workers_for_work_pool(self.pool):
                    return
            time.sleep(1)
        raise AssertionError(f"worker did not register within {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM (the worker hands back its runs), then SIGKILL, to the worker's process group
        and to those of its descendants: the process worker starts each flow run in a session of
        its own, so a run cut short (a failed or timed-out test) would outlive a signal to the
        worker's group alone."""
        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        groups = {self.proc.pid}  # start_new_session: the worker leads its own group
        for child in family:
            with contextlib.suppress(ProcessLookupError):  # already gone
                groups.add(os.getpgid(child.pid))

        def alive() -> set[int]:
            self.proc.poll()  # reap the leader, or its group never empties
            out = set()
            for group in groups:
                with contextlib.suppress(ProcessLookupError):  # empty: nothing left in it
                    os.killpg(group, 0)
                    out.add(group)
            return out

        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            for group in alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + grace
            while alive() and time.monotonic() < deadline:
                time.sleep(0.5)
            if not alive():
                break
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def process_worker(prefect_server, tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    pool = "still-test-process"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template()))
    worker = Worker(pool, prefect_server, tmp_path_factory.mktemp("worker-home"))
    try:
        worker.wait_online()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def k8s_pool(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = "still-test-k8s"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type="kubernetes", base_job_template=json.loads(JOB_TEMPLATE.read_text())))
    return pool


def task_runs(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.type.value for r in runs}


def completed(tasks: dict[str, str], task_name: str) -> bool:
    """Whether a run of the task `task_name` completed (Prefect names its task runs
    `<task name>-<3 hex digits>` unless the task sets a run name, as the stages do)."""
    return any(state == "COMPLETED" and (name == task_name or (
        name.startswith(f"{task_name}-") and len(name) == len(task_name) + 4))
        for name, state in tasks.items())


def read_deployment(deployment_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


# --------------------------------------------------------------------------- process pool


def test_process_worker_runs_the_nightly_deployment(process_worker, remotes, prefect_server,
                                                    tmp_path):
    from prefect.deployments import run_deployment

    repo, origin = remotes
    nightly_id, sweep_id, search_id = deploy(process_worker.pool, repo=str(repo),
                                             git_push=True, cron=QUIET_CRON)
    nightly = read_deployment(nightly_id)
    # No image and no pull steps: the worker imports the installed `flows` package.
    assert nightly.entrypoint == MODULE_ENTRYPOINTS["nightly"]
    assert read_deployment(sweep_id).entrypoint == MODULE_ENTRYPOINTS["sweep"]
    assert read_deployment(search_id).entrypoint == MODULE_ENTRYPOINTS["search"]
    assert not nightly.pull_steps and "image" not in (nightly.job_variables or {})
    assert nightly.parameters == {"repo": str(repo), "pull": True, "push": True,
                                  "git_push": True}

    run = run_deployment(nightly_id, timeout=RUN_TIMEOUT, poll_interval=2)
    assert run.state.is_completed(), (f"{run.name}: {run.state.type} {run.state.message}\n"
                                      f"worker log:\n{process_worker.tail()}")
    assert run.work_pool_name == process_worker.pool
    tasks = task_runs(run.id)
    assert {stage: tasks.get(stage) for stage in STAGES} == dict.fromkeys(STAGES, "COMPLETED"), \
        tasks
    for name in ("validate-params", "dvc-pull", "dvc-push", "git-push"):
        assert completed(tasks, name), tasks
    # The worker ran it: the flow run's subprocess wrote to the worker's output. The server
    # holds the Completed state before the subprocess logs it, so give the line a moment.
    finished = f"Flow run '{run.name}' - Finished in state Completed()"
    deadline = time.monotonic() + 60
    while finished not in process_worker.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert finished in process_worker.log.read_text(), process_worker.tail()

    # Prefect's CLI sees the same run history.
    listing = subprocess.run(
        [PREFECT, "flow-run", "ls", "--flow-name", "still-pipeline"],
        env={**os.environ, "PREFECT_API_URL": prefect_server, "COLUMNS": "200"},
        capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert run.name in listing.stdout and "COMPLETED" in listing.stdout
    print(listing.stdout)
    print("task runs:", json.dumps(tasks, indent=1))
    print("worker log:", *[ln for ln in process_worker.log.read_text().splitlines()
                           if run.name in ln or "Task run" in ln], sep="\n")

    # Results outlive the workspace: a fresh clone of the run's branch + `dvc pull` has the run's
    # dvc.lock and outputs.
    branch = f"{RUN_BRANCH_PREFIX}{run.name}-{str(run.id)[:8]}"
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", "--branch", branch, str(origin), str(clone)], tmp_path)
    assert (clone / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()
    sh([sys.executable, "-m", "dvc", "pull"], clone)
    from components.config import load_params

    results = clone / load_params(clone / "params.yaml").paths.results / "metrics.json"
    assert json.loads(results.read_text())["systems"], results


def test_git_push_of_an_experiment(prefect_server, remotes):
    """With an experiment, the git push is `dvc exp push`: the ref lands in the git remote."""
    from flows.pipeline import pipeline

    repo, origin = remotes
    state = pipeline(repo=str(repo), experiment_name="nightly-exp", push=True, git_push=True,
                     return_state=True)
    assert state.is_completed(), state.message
    assert completed(task_runs(state.state_details.flow_run_id), "git-push")
    refs = sh(["git", "ls-remote", str(origin), "refs/exps/*"], repo)
    assert refs.rstrip().endswith("/nightly-exp"), refs


def test_git_push_without_dvc_push_fails_before_any_stage(prefect_server, remotes):
    from flows.pipeline import pipeline

    repo, _ = remotes
    state = pipeline(repo=str(repo), git_push=True, return_state=True)
    assert state.is_failed()
    assert "git_push needs push=True" in str(state.result(raise_on_failure=False))
    assert not set(task_runs(state.state_details.flow_run_id)) & set(STAGES)


def test_deploy_refuses_what_a_process_pool_cannot_run(process_worker, remotes):
    repo, _ = remotes
    with pytest.raises(DeployError, match="takes no image"):
        deploy(process_worker.pool, image="still:cpu-abc", repo=str(repo))
    with pytest.raises(DeployError, match="absolute path"):
        deploy(process_worker.pool, repo="relative/checkout")
    with pytest.raises(DeployError, match="does not exist"):
        deploy("no-such-pool", repo=str(repo))


def test_module_entrypoints_load():
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import pipeline
    from flows.search import search
    from flows.sweep import sweep

    for key, flow in [("nightly", pipeline), ("sweep", sweep), ("search", search)]:
        assert load_flow_from_entrypoint(MODULE_ENTRYPOINTS[key]).name == flow.name


# --------------------------------------------------------------------------- kubernetes pool


def test_kubernetes_job_built_by_the_worker_code(k8s_pool):
    """deploy() on the Kubernetes pool, a flow run, and the Job manifest prefect-kubernetes'
    worker would submit for it (`resolve_for_flow_run` is what KubernetesWorker calls)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    image, endpoint = "registry.example.com/team/still:cuda-1a2b3c4", "http://minio.still.svc:9000"
    nightly_id, _, _ = deploy(k8s_pool, image=image, dvc_remote_endpoint=endpoint, cron=QUIET_CRON)
    nightly = read_deployment(nightly_id)
    assert nightly.job_variables == {"image": image, ENDPOINT_VARIABLE: endpoint}
    assert nightly.parameters == {"repo": "/app", "pull": True, "push": True, "git_push": True}

    async def job_manifest():
        async with get_client() as client:
            flow_run = await client.create_flow_run_from_deployment(nightly_id)
            pool = await client.read_work_pool(k8s_pool)
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="test-k8s-worker")
            return config.job_manifest, flow_run

    manifest, flow_run = asyncio.run(job_manifest())
    print(json.dumps(manifest, indent=1))
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "still"
    assert manifest["metadata"]["labels"]["prefect.io/flow-run-id"] == str(flow_run.id)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image and container["workingDir"] == "/app"
    # No `command`: the image's entrypoint (tini, DVC endpoint, git credentials) runs, then
    # Prefect's command as its arguments.
    assert "command" not in container
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DVC_REMOTE_ENDPOINT"]["value"] == endpoint
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)
    assert env["PREFECT_API_URL"]["value"].endswith("/api")
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "GIT_TOKEN"):
        assert "value" not in env[secret], f"{secret} must come from a secret"
        assert env[secret]["valueFrom"]["secretKeyRef"]["name"] == "still-credentials"
    secret_like = [n for n, e in env.items()
                   if any(w in n for w in ("SECRET", "PASSWORD", "TOKEN", "API_KEY", "AUTH"))
                   and "value" in e]
    assert not secret_like, f"literal secret values in the Job: {secret_like}"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_docker_pool_gets_the_endpoint_as_environment(prefect_server):
    """A pool without the `dvc_remote_endpoint` variable (the shape of Prefect's Docker pool:
    `image` and `env` variables) gets the endpoint as DVC_REMOTE_ENDPOINT, which the image's
    entrypoint reads."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = {"job_configuration": {"image": "{{ image }}", "env": "{{ env }}"},
                "variables": {"type": "object", "properties": {
                    "image": {"type": "string"},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}}}}}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="still-test-docker", type="docker",
                                               base_job_template=template))
    sweep_id = deploy("still-test-docker", image="still:cpu-1a2b3c4",
                      dvc_remote_endpoint="http://minio:9000", cron=QUIET_CRON)[1]
    assert read_deployment(sweep_id).job_variables == {
        "image": "still:cpu-1a2b3c4", "env": {"DVC_REMOTE_ENDPOINT": "http://minio:9000"}}


def test_kubernetes_pool_requires_the_dvc_endpoint(k8s_pool):
    """deploy() refuses, and so does the server for a deployment made without deploy()."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.pipeline import pipeline

    with pytest.raises(DeployError, match="--dvc-remote-endpoint"):
        deploy(k8s_pool, image="still:cuda-abc")
    with pytest.raises(DeployError, match="--image"):
        deploy(k8s_pool, dvc_remote_endpoint="http://minio:9000")

    bare = pipeline.to_deployment(name="no-endpoint").apply(
        work_pool_name=k8s_pool, image="still:cuda-abc")
    with get_client(sync_client=True) as client, \
            pytest.raises(PrefectHTTPStatusError, match="dvc_remote_endpoint"):
        client.create_flow_run_from_deployment(bare)
