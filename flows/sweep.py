"""The sweep flow: a grid (or list) of param overrides fanned out as DVC experiments.

Each point runs `dvc exp run -n NAME -S k=v ...` in its own workspace: a local clone of the
committed repo whose DVC cache is the main repo's. Why clones and not DVC's queue: DVC holds
one lock per workspace, and the queue needs Celery workers; separate clones give real
parallelism with nothing else to run, and the shared cache plus DVC's run-cache mean unchanged
upstream stages (prepare, tokenizer, teacher) are restored, not rerun. Finished experiments
are pushed back to the main repo (`dvc exp push origin NAME`), so `dvc exp show` there lists
them all. Sweeps run the committed HEAD: commit before sweeping.

Concurrency is bounded by `max_parallel` (a thread pool of that size).

    python -m flows.sweep --grid distill.layers=2,4 --grid distill.temperature=2,4 --max-parallel 2
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from components.reporting.markdown_tables import markdown_table
from flows import tasks

ARTIFACT_KEY = "still-sweep"


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values; no grid, no points (not one empty point)."""
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))]


@flow(name="still-sweep", log_prints=True)
def sweep(
    repo: str = ".",
    grid: dict[str, list[Any]] | None = None,
    configs: list[dict[str, Any]] | None = None,
    max_parallel: int = 2,
    name_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Run every config (the grid's product, plus `configs`) as a DVC experiment."""
    repo = str(Path(repo).resolve())
    points = expand_grid(grid or {}) + list(configs or [])
    if not points:
        raise ValueError("sweep needs a non-empty grid or configs")
    for point in points:  # every bad point is reported before anything runs
        tasks.validate_overrides(repo, point)
    prefix = name_prefix or flow_run.get_name() or "sweep"
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        futures = [runner.submit(tasks.run_experiment,
                                 {"repo": repo, "name": f"{prefix}-{i}", "overrides": point})
                   for i, point in enumerate(points)]
        rows = [f.result() for f in futures]
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=f"# still sweep: {prefix}\n\n{len(rows)} DVC experiments "
                 f"(`dvc exp show` in `{repo}`)\n\n{markdown_table(rows)}",
        description="Sweep: one row per DVC experiment",
    )
    create_table_artifact(table=rows, key=f"{ARTIFACT_KEY}-table")
    print(markdown_table(rows))
    return rows


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2,...` -> {key: [v1, v2, ...]} with YAML-typed values."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep:
            raise SystemExit(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--name", default=None, help="experiment name prefix")
    args = parser.parse_args(argv)
    sweep(repo=args.repo, grid=parse_grid(args.grid), max_parallel=args.max_parallel,
          name_prefix=args.name)


if __name__ == "__main__":
    main()
