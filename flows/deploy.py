"""Deployments: a nightly scheduled pipeline run, an on-demand sweep and an on-demand search.

    python -m flows.deploy serve [--cron "0 2 * * *"]   # local: a process serves all (no pool)
    python -m flows.deploy deploy --pool still-process --repo /path/to/checkout
                                                       # a process pool (compose's workers)
    python -m flows.deploy deploy --pool still-k8s --image REGISTRY/still:cuda-SHA \\
        --dvc-remote-endpoint http://minio.still.svc:9000   # a Docker or Kubernetes pool

`serve` needs only a Prefect server (`infra/prefect/start-server.sh`, SQLite) and runs flow
runs as subprocesses of this process, loading the flows from `ENTRYPOINTS` (file paths).

`deploy` registers the same deployments on a work pool, and what it registers depends on the
pool's kind, read from the pool itself:
- process pool (no `image` variable): no image; a worker imports the `flows` package installed
  next to it (`MODULE_ENTRYPOINTS`), and `repo` is the DVC checkout on the worker's machine.
- Docker/Kubernetes pool (an `image` variable): the image holds the code and the checkout at
  /app; the DVC endpoint as seen from inside the pool is required (the checkout's
  .dvc/config points at the developer's endpoint), and by default a run ends with `dvc push`
  plus a git push of dvc.lock or the experiment (`git_push`), since the container's /app is
  discarded with it.
"""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day, in TIMEZONE
TIMEZONE = "UTC"
DEFAULT_GRID: dict[str, list[Any]] = {
    "distill.layers": [2, 4],
    "distill.temperature": [2.0, 4.0],
}
# `serve` loads flows by file path, relative to the folder it is started in.
ENTRYPOINTS = {
    "nightly": "flows/pipeline.py:pipeline",
    "sweep": "flows/sweep.py:sweep",
    "search": "flows/search.py:search",
}
# Workers import flows by module path: it resolves wherever the project is installed (a process
# worker's venv, /app in the images), whatever the worker's working directory.
MODULE_ENTRYPOINTS = {
    "nightly": "flows.pipeline.pipeline",
    "sweep": "flows.sweep.sweep",
    "search": "flows.search.search",
}
# The base job template variable (infra/k8s/base-job-template.json) and, for pools without it
# (Prefect's Docker pool), the environment variable the image's entrypoint reads.
ENDPOINT_VARIABLE = "dvc_remote_endpoint"
ENDPOINT_ENV = "DVC_REMOTE_ENDPOINT"


class DeployError(ValueError):
    """A deployment cannot work on this pool as asked; the message says what to change."""


def deployments(repo: str = ".", cron: str = NIGHTLY_CRON, *, module_entrypoints: bool = False,
                git_push: bool = False, job_variables: dict[str, Any] | None = None) -> list:
    """The nightly, sweep and search RunnerDeployments, for `serve` (file entrypoints) or a
    work pool (`module_entrypoints=True`, optional job variables)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import pipeline
    from flows.search import search
    from flows.sweep import sweep

    entrypoint_type = EntrypointType.MODULE_PATH if module_entrypoints else \
        EntrypointType.FILE_PATH

    def pool_options() -> dict[str, Any]:
        # A copy per deployment: Prefect adds `image` into the dict it is given.
        return {"entrypoint_type": entrypoint_type, "job_variables": dict(job_variables or {})}

    nightly_parameters: dict[str, Any] = {"repo": repo, "pull": True, "push": True}
    if git_push:
        nightly_parameters["git_push"] = True
    nightly = pipeline.to_deployment(
        name="nightly",
        schedules=[Cron(cron, timezone=TIMEZONE)],
        parameters=nightly_parameters,
        concurrency_limit=1,  # one workspace: never two pipeline runs on it at once
        tags=["still", "nightly"],
        description="Nightly `dvc repro` of the whole pipeline (pull before, push after).",
        **pool_options(),
    )
    on_demand = sweep.to_deployment(
        name="sweep",
        parameters={"repo": repo, "grid": DEFAULT_GRID, "max_parallel": 2},
        tags=["still", "sweep"],
        description="On-demand grid of DVC experiments, each in its own workspace.",
        **pool_options(),
    )
    searcher = search.to_deployment(
        name="search",
        parameters={"repo": repo},
        tags=["still", "search"],
        description="On demand: the student for this data, chosen on validation (an Optuna "
                    "study over DVC experiments). Runs on several workers share one study when "
                    "search.storage is a database URL.",
        **pool_options(),
    )
    return [nightly, on_demand, searcher]


def serve(repo: str = ".", cron: str = NIGHTLY_CRON) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(repo, cron))


def pool_takes_image(base_job_template: dict[str, Any]) -> bool:
    """Docker and Kubernetes pools have an `image` variable; process pools do not (Prefect's
    own `deploy` tells them apart the same way)."""
    return "image" in base_job_template.get("variables", {}).get("properties", {})


def deploy(pool: str, image: str | None = None, repo: str | None = None, *,
           dvc_remote_endpoint: str | None = None, git_push: bool | None = None,
           cron: str = NIGHTLY_CRON) -> list[UUID]:
    """Register the nightly, sweep and search deployments on the work pool `pool`.

    Args:
        pool: an existing work pool (`prefect work-pool create ...`, or the compose worker's).
        image: the still image, for Docker/Kubernetes pools only (a process pool runs the
            installed code).
        repo: the DVC checkout the runs work in, as the worker sees it: required (absolute) on a
            process pool, /app (the image's checkout) by default on image pools.
        dvc_remote_endpoint: the S3 endpoint as seen from the pool's containers; required on
            image pools.
        git_push: end each nightly run with a git push of dvc.lock (or the experiment) after
            `dvc push`; default on for image pools (their workspace dies with the container),
            off for process pools (the worker's checkout persists).
        cron: schedule of the nightly deployment.

    Returns:
        The deployment ids (nightly, sweep, search).

    Raises:
        DeployError: the pool is missing, or the arguments do not fit its kind.
    """
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(
                f"work pool {pool!r} does not exist: create it first (`prefect work-pool create "
                f"{pool} --type process`, or `--type kubernetes --base-job-template "
                f"infra/k8s/base-job-template.json`)") from None

    template = work_pool.base_job_template or {}
    job_variables: dict[str, Any] = {}
    if pool_takes_image(template):
        if not image:
            raise DeployError(f"work pool {pool!r} ({work_pool.type}) runs flows in an image: "
                              "pass --image REGISTRY/still:<variant>-<git sha>")
        if not dvc_remote_endpoint:
            raise DeployError(
                f"work pool {pool!r} ({work_pool.type}) needs --dvc-remote-endpoint: the image's "
                ".dvc/config names the endpoint seen from a developer machine (e.g. "
                "http://localhost:9000), which a container cannot reach")
        if not dvc_remote_endpoint.startswith(("http://", "https://")):
            raise DeployError(f"--dvc-remote-endpoint must be an http(s) URL, got "
                              f"{dvc_remote_endpoint!r}")
        properties = template["variables"]["properties"]
        if ENDPOINT_VARIABLE in properties:
            job_variables[ENDPOINT_VARIABLE] = dvc_remote_endpoint
        else:  # e.g. Prefect's Docker pool: the image's entrypoint reads the variable
            job_variables["env"] = {ENDPOINT_ENV: dvc_remote_endpoint}
        repo = repo or "/app"
        git_push = True if git_push is None else git_push
    else:
        if image:
            raise DeployError(
                f"work pool {pool!r} is a {work_pool.type} pool: its worker runs the `flows` "
                "package installed next to it, so it takes no image (drop --image, or use a "
                "Docker/Kubernetes pool)")
        if dvc_remote_endpoint:
            raise DeployError(
                f"work pool {pool!r} is a {work_pool.type} pool: set the DVC endpoint in the "
                "worker's checkout (`dvc remote modify --local <remote> endpointurl URL`)")
        if not repo or not PurePosixPath(repo).is_absolute():
            raise DeployError(
                f"work pool {pool!r} is a {work_pool.type} pool: --repo must be the absolute path "
                f"of the DVC checkout on the worker's machine (got {repo!r}); a relative path "
                "would resolve in the worker's temporary working directory")
        git_push = bool(git_push)

    return prefect_deploy(
        *deployments(repo, cron, module_entrypoints=True, git_push=git_push,
                     job_variables=job_variables),
        work_pool_name=pool,
        image=image,
        build=False,  # build.sh builds and tags images from a clean checkout
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,  # Prefect suggests `serve` for process pools; the pool is deliberate
    )


def cli() -> argparse.ArgumentParser:
    """The `python -m flows.deploy` parser (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the deployments from this process")
    s.add_argument("--repo", default=".")
    s.add_argument("--cron", default=NIGHTLY_CRON, help="schedule of the pipeline deployment")
    d = sub.add_parser("deploy", help="register the deployments on a work pool")
    d.add_argument("--pool", required=True)
    d.add_argument("--image", default=None, help="Docker/Kubernetes pools only")
    d.add_argument("--repo", default=None,
                   help="DVC checkout as the worker sees it (default /app on image pools)")
    d.add_argument("--dvc-remote-endpoint", default=None,
                   help="S3 endpoint seen from the pool's containers (image pools)")
    d.add_argument("--git-push", action=argparse.BooleanOptionalAction, default=None,
                   help="git push dvc.lock/the experiment after dvc push (default: on for "
                        "image pools)")
    d.add_argument("--cron", default=NIGHTLY_CRON, help="schedule of the pipeline deployment")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = cli()
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.repo, args.cron)
    else:
        try:
            deploy(args.pool, args.image, args.repo, dvc_remote_endpoint=args.dvc_remote_endpoint,
                   git_push=args.git_push, cron=args.cron)
        except DeployError as exc:
            parser.exit(2, f"deploy: error: {exc}\n")


if __name__ == "__main__":
    main()
