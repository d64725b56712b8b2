"""The Prefect flows against Prefect's real local server (prefect_test_harness starts one on a
temporary SQLite database) and real DVC in temporary git repos."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import dvc_ops as dvc
from flows.deploy import ENTRYPOINTS, NIGHTLY_CRON, deployments
from flows.pipeline import ARTIFACT_KEY, pipeline
from flows.sweep import expand_grid, parse_grid, sweep
from flows.tasks import STAGE_RETRIES
from tests.conftest import ROOT, make_dvc_repo, sh

pytestmark = pytest.mark.slow
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory, dataset_csv, tiny_teacher):
    return make_dvc_repo(tmp_path_factory.mktemp("flowrepo"), dataset_csv, tiny_teacher)


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r}"
    return found[-1]


def test_stage_order_comes_from_dvc(repo):
    assert dvc.stage_order(repo) == STAGES
    assert set(STAGE_RETRIES) <= set(STAGES)


def test_pipeline_flow_one_task_per_stage_then_cache_hit(prefect_server, repo):
    state = pipeline(repo=str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [s["stage"] for s in result["stages"]] == STAGES
    assert all(s["ran"] for s in result["stages"])
    runs = task_runs(state.state_details.flow_run_id)
    by_name = {r.name: r.state.type.value for r in runs}
    for stage in STAGES:
        assert by_name.get(stage) == "COMPLETED", by_name
    # STAGE_RETRIES reaches the task runs (prepare may read a flaky server; others are not
    # retried).
    retries = {r.name: r.empirical_policy.retries for r in runs}
    assert {s: retries[s] or 0 for s in STAGES} == {s: STAGE_RETRIES.get(s, 0) for s in STAGES}
    md = artifact(ARTIFACT_KEY).data
    assert "student_onnx_int8" in md and "accuracy_vs_throughput" in md
    assert "## Cascade" in md and "Pareto fronts" in md and "Per-class F1" in md
    assert "## Bundle" in md and "card.html" in md and "still predict --bundle" in md
    assert artifact(f"{ARTIFACT_KEY}-systems").type == "table"

    again = pipeline(repo=str(repo))
    # Only `source` (it re-pins the data version) and `ship` (the bundle records the run's
    # commit and timings) run again: both are always_changed.
    assert [s["ran"] for s in again["stages"]] == [s in ("source", "ship") for s in STAGES]
    assert "dvc.lock" in sh(["git", "status", "--short"], repo)
    sh(["git", "add", "dvc.lock"], repo)
    sh(["git", "commit", "-qm", "lock"], repo)


def test_sweep_two_configs_gives_two_experiments(prefect_server, repo):
    configs = [{"distill.hidden": 16}, {"distill.hidden": 32, "distill.temperature": 4.0}]
    rows = sweep(repo=str(repo), configs=configs, max_parallel=2, name_prefix="t")
    assert [r["experiment"] for r in rows] == ["t-0", "t-1"]
    assert rows[0]["student_size_mb"] < rows[1]["student_size_mb"]
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo))
    names = {exp.get("name") for entry in shown for exp in
             [e for e in (entry.get("experiments") or [])]}
    assert {"t-0", "t-1"} <= names, shown
    assert "| t-1 |" in artifact("still-sweep").data
    # The sweep never touched the main workspace.
    assert sh(["git", "status", "--short", "params.yaml"], repo) == ""
    # `still report` compares the experiments from `dvc exp show`: one row each, the params
    # that differ as columns, and a plot.
    from components.cli import main as still

    out = repo.parent / "reports"
    assert still(["report", "--repo", str(repo), "--out", str(out)]) == 0
    table = (out / "experiments.md").read_text()
    assert "| t-0 |" in table and "| t-1 |" in table and "distill.hidden" in table
    rows = {r["experiment"]: r for r in json.loads((out / "experiments.json").read_text())}
    assert rows["t-0"]["distill.hidden"] == 16 and rows["t-1"]["distill.temperature"] == 4.0
    assert (out / "experiments.png").read_bytes()[:4] == b"\x89PNG"


TINY_SPACE = {"layers": [1, 2], "hidden": [8, 16, 32], "heads": [2], "max_length": [32],
              "windows": [True], "init": ["scratch"], "teacher_layers": [], "merge": ["none"],
              "merge_r": [8], "vocab_size": []}


def _exp_lock(repo: Path, name: str) -> dict:
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
    ref = next(r for r in refs if r.endswith(f"/{name}"))
    return yaml.safe_load(sh(["git", "show", f"{ref}:dvc.lock"], repo))


def _outs(lock: dict, stage: str) -> list:
    return [(o["path"], o["md5"]) for o in lock["stages"][stage]["outs"]]


def test_search_resumes_after_a_kill_chooses_on_validation_and_applies(prefect_server, repo):
    """A real search: Optuna study in a journal file, each trial a DVC experiment, killed in
    the middle of a trial and rerun: finished trials are kept, not run again; the winner is
    the fastest (timed side by side) of the Pareto front within max_drop on validation; --apply
    leaves params.yaml + dvc.lock that reproduce the winner's experiment."""
    import os
    import signal
    import time

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState
    from prefect.settings import PREFECT_API_URL

    from flows.search import search

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["search"].update(n_trials=3, max_drop=100.0, finalists=3, study="s", space=TINY_SPACE)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n/artifacts/wandb/\n/artifacts/search/\n")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "search space"], repo)
    journal = repo / raw["search"]["storage"]

    def trials():
        if not journal.exists():
            return []
        storage = JournalStorage(JournalFileBackend(str(journal)))
        return optuna.load_study(study_name="s", storage=storage).get_trials(deepcopy=False)

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.search", "--repo", str(repo)],
                            cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        states = [t.state for t in trials()]
        if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING:
            time.sleep(2)  # inside the second trial's dvc exp run
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.datetime_start for t in trials() if t.state == TrialState.COMPLETE}
    assert len(before) == 1

    result = search(repo=str(repo), apply=True)
    after = trials()
    done = {t.number: t for t in after if t.state == TrialState.COMPLETE}
    assert len(done) == 3
    for number, started in before.items():  # kept, not run again
        assert done[number].datetime_start == started
    assert [t.state for t in after].count(TrialState.FAIL) == 1  # the killed one
    names = {r["experiment"] for r in result["rows"]}
    shown = sh([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).split()
    assert names <= set(shown), shown

    # The choice: the front within max_drop on validation, then the fastest end to end.
    rows = result["rows"]
    front = [r for r in rows if not any(
        o["val_accuracy"] >= r["val_accuracy"] and o["gflops"] <= r["gflops"] and o is not r
        and (o["val_accuracy"] > r["val_accuracy"] or o["gflops"] < r["gflops"]) for o in rows)]
    timed = result["timed"]["timed"]
    assert {r["experiment"] for r in front} == set(timed) - {result["timed"]["teacher"]}
    fastest = max((r["experiment"] for r in front), key=lambda n: timed[n]["throughput_per_s"])
    assert result["winner"] == fastest
    assert "accuracy" in result["timed"]["winner_test"]  # test: the winner only
    table = (repo / "results" / "search" / "trials.md").read_text()
    assert f"| **{fastest}** |" in table
    assert sum(line.startswith("| ") and "s-t" in line for line in table.splitlines()) == 3
    assert (repo / "results" / "search" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert f"**{fastest}**" in artifact("still-search").data

    # --apply: params.yaml holds the winner; dvc repro reproduced its experiment's distill.
    winner = next(r for r in rows if r["experiment"] == fastest)
    applied = yaml.safe_load((repo / "params.yaml").read_text())
    assert applied["distill"]["hidden"] == winner["params"]["distill.hidden"]
    assert applied["distill"]["layers"] == winner["params"]["distill.layers"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert _outs(lock, "distill") == _outs(_exp_lock(repo, fastest), "distill")
    assert "changed" not in sh([sys.executable, "-m", "dvc", "status", "distill"], repo)
    sh(["git", "checkout", "-q", "--", "."], repo)  # leave the module's repo as it was
    sh([sys.executable, "-m", "dvc", "checkout", "-q", "--force"], repo)


def test_failing_stage_fails_the_flow_with_its_message(prefect_server, repo, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    cache = dvc.run(["cache", "dir"], repo).strip()
    dvc.run(["cache", "dir", "--local", cache], clone)
    state = pipeline(repo=str(clone), overrides={"export.atol": 1e-12, "export.rtol": 0.0},
                     return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage 'export' failed" in message and "diverges" in message
    runs = {r.name: r.state.type.value for r in task_runs(state.state_details.flow_run_id)}
    assert runs["export"] == "FAILED" and runs["distill"] == "COMPLETED"
    assert "evaluate" not in runs


def test_bad_override_fails_before_any_stage(prefect_server, repo):
    state = pipeline(repo=str(repo), overrides={"distill.heads": 3}, return_state=True)
    assert state.is_failed()
    assert "divisible by heads" in str(state.result(raise_on_failure=False))
    runs = {r.name for r in task_runs(state.state_details.flow_run_id)}
    assert not runs & set(STAGES)


def test_deployments_have_schedules_and_loadable_entrypoints(prefect_server):
    from prefect.flows import load_flow_from_entrypoint

    nightly, on_demand, searcher = deployments(".")
    assert nightly.schedules[0].schedule.cron == NIGHTLY_CRON
    assert on_demand.schedules == [] and searcher.schedules == []
    for deployment, key in [(nightly, "nightly"), (on_demand, "sweep"), (searcher, "search")]:
        assert deployment.entrypoint == ENTRYPOINTS[key]
        path, func = ENTRYPOINTS[key].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert flow.name == deployment.flow_name


def test_grid_expansion():
    grid = parse_grid(["distill.layers=2,4", "distill.temperature=2.0,4.0"])
    assert grid == {"distill.layers": [2, 4], "distill.temperature": [2.0, 4.0]}
    assert len(expand_grid(grid)) == 4
    assert expand_grid({}) == []


def test_flows_never_import_torch():
    code = ("import sys, flows.pipeline, flows.sweep, flows.search, flows.deploy, flows.tasks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(ROOT))


def test_flow_modules_do_not_shadow_installed_packages(tmp_path):
    """A served deployment loads `flows/pipeline.py` by path, which puts flows/ first on
    sys.path: a module there named like a package (flows/dvc.py once did) would replace it.
    Checked in a fresh interpreter (this one may already have flows/ on its path)."""
    flows_dir = Path(__file__).resolve().parents[1] / "flows"
    names = sorted(m.stem for m in flows_dir.glob("*.py") if m.stem != "__init__")
    probe = ("import importlib.util, sys; "
             "print([n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", probe, *names], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert "dvc_ops" in names and out == "[]", f"flows/ modules shadowing packages: {out}"


def test_prefect_scheduler_gets_a_sqlalchemy_it_works_with():
    """Prefect 3.8.8's scheduler cannot insert scheduled runs with SQLAlchemy 2.1 ("Can't
    evaluate bulk DML statement"): a served cron deployment would never run."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("sqlalchemy").split(".")[:2])
    assert (major, minor) < (2, 1), version("sqlalchemy")
