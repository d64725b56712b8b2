"""Thin Prefect tasks over DVC. Retries live in the task options, and only where a retry can
help: talking to a remote (pull/push, in their decorators) and the stages in STAGE_RETRIES
(`stage_task`): source and prepare read the source data, which may be on s3/gs/http. A failing
training run or parity check is deterministic, so it is not retried.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from flows import dvc_ops as dvc

# Stages whose failures can be transient (network reads), with their retry count.
STAGE_RETRIES = {"source": 2, "prepare": 2}
REMOTE_RETRIES = 3
BACKOFF = exponential_backoff(backoff_factor=10)


@task(name="validate-params", cache_policy=NO_CACHE)
def validate_overrides(repo: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fail before any stage runs if params.yaml + overrides is invalid (every problem listed)."""
    from components.config import load_params

    return load_params(Path(repo) / "params.yaml", overrides).to_dict()


@task(name="apply-params", cache_policy=NO_CACHE)
def apply_overrides(repo: str, overrides: dict[str, Any]) -> None:
    """Write overrides into params.yaml the way `dvc exp run -S` does: in the workspace,
    keeping comments and key order (ruamel round trip)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    path = Path(repo) / "params.yaml"
    data = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as fh:
        yaml.dump(data, fh)
    tmp.replace(path)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(repo: str, stage: str, group: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: DVC skips it when nothing it depends on changed."""
    start = time.perf_counter()
    extra = {"STILL_RUN_GROUP": group} if group else None
    output = dvc.run(["repro", "--single-item", stage], repo, extra, what=f"stage {stage!r}")
    ran = dvc.stage_ran(output, stage)
    seconds = time.perf_counter() - start
    get_run_logger().info("stage %s %s in %.1f s", stage, "ran" if ran else "was up to date",
                          seconds)
    return {"stage": stage, "ran": ran, "seconds": round(seconds, 2)}


def stage_task(stage: str):
    """`run_stage` with the retries STAGE_RETRIES gives `stage` (none for the others): a
    transient failure (a source server that timed out) gets another try after a backoff."""
    retries = STAGE_RETRIES.get(stage, 0)
    if not retries:
        return run_stage
    return run_stage.with_options(retries=retries, retry_delay_seconds=BACKOFF)


@task(name="dvc-pull", retries=REMOTE_RETRIES, retry_delay_seconds=BACKOFF, cache_policy=NO_CACHE)
def pull(repo: str) -> None:
    dvc.run(["pull", "--allow-missing"], repo)


@task(name="dvc-push", retries=REMOTE_RETRIES, retry_delay_seconds=BACKOFF, cache_policy=NO_CACHE)
def push(repo: str) -> None:
    dvc.run(["push"], repo)


@task(name="git-push", retries=REMOTE_RETRIES, retry_delay_seconds=BACKOFF, cache_policy=NO_CACHE)
def git_push(repo: str, experiment: str | None = None) -> str:
    """After `dvc push`: the experiment (`dvc exp push`) or dvc.lock and the git-tracked results
    (results/), committed, to the git remote on branch `still-runs/<flow run name>-<id>`,
    so a run whose workspace is thrown away (a Kubernetes Job) still leaves its results where a
    clone + `dvc pull` finds them."""
    from prefect.runtime import flow_run

    from components.config import load_params

    # The measured results are git-tracked (not DVC outputs): they go with the lock.
    results = Path(repo, load_params(Path(repo) / "params.yaml").paths.results).resolve()
    paths = [str(results.relative_to(Path(repo).resolve()))] \
        if results.is_relative_to(Path(repo).resolve()) else []
    run_id = f"{flow_run.get_name()}-{str(flow_run.get_id())[:8]}"
    pushed = dvc.push_run(repo, run_id, experiment, paths)
    get_run_logger().info("pushed %s to git remote %s", pushed, dvc.GIT_REMOTE)
    return pushed


@task(name="dvc-exp-save", cache_policy=NO_CACHE)
def save_experiment(repo: str, name: str) -> str:
    """Record the workspace as a DVC experiment (`dvc exp run` == `repro` + `exp save`)."""
    dvc.run(["exp", "save", "--force", "-n", name], repo)
    return name


@task(name="dvc-experiment", task_run_name="{name}", cache_policy=NO_CACHE)
def run_experiment(repo: str, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One sweep point in its own workspace: a local clone of the committed repo that shares the
    main DVC cache, so unchanged upstream stages are restored from DVC's run-cache instead of
    rerunning, and concurrent experiments never fight over one workspace's lock. The finished
    experiment is pushed back to the main repo as a DVC experiment ref."""
    repo_path = Path(repo).resolve()
    cache = Path(dvc.run(["cache", "dir"], repo_path).strip()).resolve()
    workspace = Path(tempfile.mkdtemp(prefix=f"still-{name}-"))
    try:
        dvc.git(["clone", "-q", str(repo_path), str(workspace / "repo")], repo_path)
        ws = workspace / "repo"
        dvc.run(["cache", "dir", "--local", str(cache)], ws)
        args = ["exp", "run", "-n", name]
        for key, value in overrides.items():
            args += ["-S", f"{key}={json.dumps(value)}"]
        dvc.run(args, ws, {"STILL_RUN_GROUP": name}, what=f"experiment {name!r}")
        metrics = read_metrics(str(ws))
        dvc.run(["exp", "push", "--no-cache", "--force", "origin", name], ws)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return {"experiment": name, **overrides, **summarize(metrics)}


def read_metrics(repo: str) -> dict[str, Any]:
    from components.config import load_params

    params = load_params(Path(repo) / "params.yaml")
    path = Path(repo) / params.paths.results / "metrics.json"
    return json.loads(path.read_text())


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The handful of numbers a sweep table compares, flat."""
    systems, ratios = metrics["systems"], metrics["ratios"]
    headline = metrics.get("headline") or {}
    def val(name: str) -> float | None:
        return (systems[name].get("validation") or {}).get("accuracy")

    row = {
        "teacher_val_accuracy": val("teacher"),
        "teacher_accuracy": systems["teacher"]["accuracy"],
        "student_val_accuracy": val("student"),
        "student_accuracy": systems["student"]["accuracy"],
        "student_macro_f1": systems["student"]["macro_f1"],
        "student_onnx_per_s": systems["student_onnx"]["throughput_per_s"],
    }
    if headline:
        best = metrics["best_teacher"]
        row["best_teacher_val_accuracy"] = val(best)
        row["best_teacher_accuracy"] = systems[best]["accuracy"]
        row["headline_val_accuracy"] = val(headline["student"])
        row["best_teacher_per_s"] = systems[best]["throughput_per_s"]
        row["headline_accuracy_diff"] = headline["accuracy_diff"]
        row["headline_speedup_vs_best_teacher"] = headline["throughput_vs_best_teacher"]
    row["student_size_mb"] = systems["student"]["size_mb"]
    if "student_onnx_int8" in systems:
        row["int8_accuracy"] = systems["student_onnx_int8"]["accuracy"]
        row["int8_speedup_vs_fp32"] = ratios["int8_throughput_vs_fp32"]
    if (metrics.get("cascade") or {}).get("chosen"):
        row["cascade_accuracy"] = metrics["cascade"]["chosen"]["accuracy"]
        chosen = metrics["cascade"]["chosen"]
        row["cascade_speedup_vs_best_teacher"] = chosen.get(
            "measured_speedup_vs_best_teacher", chosen["speedup_vs_best_teacher"])
    return {k: round(float(v), 4) for k, v in row.items() if v is not None}
