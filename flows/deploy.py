"""Deployments: a nightly scheduled pipeline run and an on-demand sweep.

    python -m flows.deploy serve [--cron "0 2 * * *"]  # local: a process serves both (no pool)
    python -m flows.deploy deploy --pool still-docker --image still:SHA
                                                      # a Docker or Kubernetes work pool

`serve` needs only a Prefect server (`infra/prefect/start-server.sh`, SQLite) and runs flow
runs as subprocesses of this process. `deploy` registers the same deployments on a work pool
whose workers run them in the image built from infra/docker (code at /app, so the entrypoints
resolve there). Both use the entrypoints in `ENTRYPOINTS`, which a test loads.
"""

from __future__ import annotations

import argparse
from typing import Any

NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day, in TIMEZONE
TIMEZONE = "UTC"
DEFAULT_GRID: dict[str, list[Any]] = {
    "distill.layers": [2, 4],
    "distill.temperature": [2.0, 4.0],
}
ENTRYPOINTS = {
    "nightly": "flows/pipeline.py:pipeline",
    "sweep": "flows/sweep.py:sweep",
}


def deployments(repo: str = ".", cron: str = NIGHTLY_CRON) -> list:
    """RunnerDeployments for `serve` (process, local)."""
    from prefect.schedules import Cron

    from flows.pipeline import pipeline
    from flows.sweep import sweep

    nightly = pipeline.to_deployment(
        name="nightly",
        schedules=[Cron(cron, timezone=TIMEZONE)],
        parameters={"repo": repo, "pull": True, "push": True},
        concurrency_limit=1,  # one workspace: never two pipeline runs on it at once
        tags=["still", "nightly"],
        description="Nightly `dvc repro` of the whole pipeline (pull before, push after).",
    )
    on_demand = sweep.to_deployment(
        name="sweep",
        parameters={"repo": repo, "grid": DEFAULT_GRID, "max_parallel": 2},
        tags=["still", "sweep"],
        description="On-demand grid of DVC experiments, each in its own workspace.",
    )
    return [nightly, on_demand]


def serve(repo: str = ".", cron: str = NIGHTLY_CRON) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(repo, cron))


def deploy(pool: str, image: str, repo: str = "/app") -> None:
    """Register both deployments on a Docker/Kubernetes work pool; the image holds the code."""
    from prefect.schedules import Cron

    from flows.pipeline import pipeline
    from flows.sweep import sweep

    pipeline.deploy(
        name="nightly", work_pool_name=pool, image=image, build=False, push=False,
        schedules=[Cron(NIGHTLY_CRON, timezone=TIMEZONE)], concurrency_limit=1,
        parameters={"repo": repo, "pull": True, "push": True}, tags=["still", "nightly"],
    )
    sweep.deploy(
        name="sweep", work_pool_name=pool, image=image, build=False, push=False,
        parameters={"repo": repo, "grid": DEFAULT_GRID, "max_parallel": 2},
        tags=["still", "sweep"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve both deployments from this process")
    s.add_argument("--repo", default=".")
    s.add_argument("--cron", default=NIGHTLY_CRON, help="schedule of the pipeline deployment")
    d = sub.add_parser("deploy", help="register both deployments on a work pool")
    d.add_argument("--pool", required=True)
    d.add_argument("--image", required=True)
    d.add_argument("--repo", default="/app")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.repo, args.cron)
    else:
        deploy(args.pool, args.image, args.repo)


if __name__ == "__main__":
    main()
