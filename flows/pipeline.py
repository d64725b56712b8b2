"""The pipeline flow: the DVC DAG as one Prefect flow run, one task per DVC stage.

Each task runs `dvc repro --single-item <stage>` in DVC's own order (read from dvc.yaml's
graph), so the Prefect UI shows every stage's state, duration and logs while DVC still decides
what is up to date, updates dvc.lock and fills its cache. With overrides, the flow does what
`dvc exp run -S ...` does (DVC documents it as `repro` + `exp save`): validate, write the
overrides into params.yaml, reproduce, and save the workspace as a named DVC experiment.

Optional `dvc pull` before and `dvc push` after (with retries) when a DVC remote is configured.
Publishes a Markdown artifact (metrics table, plot paths, the shipped bundle and its model card)
and a table artifact per run.

    python -m flows.pipeline --set distill.layers=2     (or: still run --set ...)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from components.reporting.markdown_tables import markdown_table
from flows import dvc_ops as dvc
from flows import tasks

ARTIFACT_KEY = "still-pipeline"


@flow(name="still-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    overrides: dict[str, Any] | None = None,
    experiment_name: str | None = None,
    pull: bool = False,
    push: bool = False,
    git_push: bool = False,
) -> dict[str, Any]:
    """Reproduce the DVC pipeline in `repo` with optional param overrides."""
    logger = get_run_logger()
    repo = str(Path(repo).resolve())
    overrides = overrides or {}
    tasks.validate_overrides(repo, overrides)
    remote = (pull or push) and dvc.has_remote(repo)
    if (pull or push) and not remote:
        logger.warning("no DVC remote configured: skipping pull/push")
    if git_push and not (push and remote):  # fail before hours of stages, not after
        raise ValueError("git_push needs push=True and a DVC remote: the pushed dvc.lock would "
                         "point at data that only this workspace holds")
    if pull and remote:
        tasks.pull(repo)
    if overrides:
        tasks.apply_overrides(repo, overrides)

    group = flow_run.get_name()
    stages = [tasks.stage_task(stage)(repo, stage, group) for stage in dvc.stage_order(repo)]

    name = experiment_name or (f"{group}" if overrides else None)
    if name:
        tasks.save_experiment(repo, name)
    if push and remote:
        tasks.push(repo)
    if git_push:
        tasks.git_push(repo, name)

    metrics = tasks.read_metrics(repo)
    publish(repo, stages, metrics, overrides)
    return {"stages": stages, "metrics": tasks.summarize(metrics), "experiment": name}


def publish(repo: str, stages: list[dict], metrics: dict, overrides: dict) -> None:
    """Markdown + table artifacts under stable keys, so the UI keeps a browsable history."""
    from components.config import load_params

    params = load_params(Path(repo) / "params.yaml")
    evaluate_dir = Path(repo) / params.paths.results
    systems = [{"system": name, **{k: v for k, v in m.items()
                                   if k != "runtime" and isinstance(v, str | int | float)}}
               for name, m in metrics["systems"].items()]
    ran = ", ".join(s["stage"] for s in stages if s["ran"]) or "none (all up to date)"
    # The evaluate stage's own report (systems, ratios, Pareto fronts, cascade, per-class F1),
    # one heading level down; older outputs without it get the plain tables.
    report = evaluate_dir / "report.md"
    body = (["\n".join("#" + line if line.startswith("#") else line
                        for line in report.read_text().splitlines())]
            if report.is_file() else
            ["## Systems on the test split", markdown_table(systems),
             "## Ratios", markdown_table([metrics["ratios"]])])
    bundle = Path(repo) / params.paths.bundle
    shipped = (
        [f"## Bundle\n\n`{bundle}`: model card [`README.md`]({(bundle / 'README.md').as_uri()}) "
         f"([page]({(bundle / 'card.html').as_uri()})), manifest `bundle.json`. Predict with "
         f"`still predict --bundle {bundle} \"some text\"`"]
        if (bundle / "bundle.json").is_file() else [])
    markdown = "\n\n".join([
        f"# still pipeline: {flow_run.get_name()}",
        f"**Overrides:** `{overrides or 'none'}`  \n**Stages run:** {ran}",
        *body,
        *shipped,
        "## Stages", markdown_table(stages),
        f"Plots: `{evaluate_dir}` (accuracy_vs_throughput, cascade, pareto, confusion PNGs; "
        f"report.html), `dvc plots show` in `{repo}`; metrics: "
        f"`{evaluate_dir / 'metrics.json'}`",
    ])
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY,
                             description="Pipeline run: metrics of every system")
    create_table_artifact(table=systems, key=f"{ARTIFACT_KEY}-systems",
                          description="Per-system test metrics")


def main(argv: list[str] | None = None) -> None:
    from components.config import parse_override

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="DVC experiment name")
    parser.add_argument("--pull", action="store_true")
    parser.add_argument("--push", action="store_true")
    args = parser.parse_args(argv)
    pipeline(repo=args.repo, overrides=dict(parse_override(s) for s in args.sets),
             experiment_name=args.name, pull=args.pull, push=args.push)


if __name__ == "__main__":
    main()
