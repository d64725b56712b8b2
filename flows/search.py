"""The search flow (`still search`): the student for the user's data, chosen on validation.

An Optuna study over params.yaml's `search.space` (layers, width, heads, length, windows,
initialisation, token merging, vocabulary size). Each trial is a DVC experiment
(`dvc exp run -n <study>-t<N> -S ... distill`) in its own workspace, a clone of the committed
repo sharing the main DVC cache, so prepare, tokenizer, teacher and label are restored from the
run-cache, never rerun; the experiment is pushed back to the main repo (`dvc exp show` lists
it). A trial's objectives are the distill stage's validation figures: accuracy (with its
bootstrap interval) and GFLOPs per example, costs parallel trials cannot distort; the study
keeps their Pareto front (NSGA-II or TPE, `search.sampler`, seeded).

When the trials are done, the front's trials within `search.max_drop` points of the teacher on
validation are exported and timed side by side with the best teacher runtime in one quiet run
(`python -m components.search.timing`, nothing else running); the fastest end to end wins and is
scored on test, once. With `--apply`, `dvc exp apply` writes the winner into the workspace
(params.yaml, dvc.lock, its student) and `dvc repro` builds export, evaluate and the bundle.

The study lives in `search.storage`: a journal file by default (outside every DVC output), or
any SQLAlchemy URL (e.g. the compose Postgres) so several workers share one study. A search
that stopped (a crash, Ctrl-C) resumes where it stopped: finished trials are never run again.

    still search [--n-trials 12] [--max-parallel 1] [--storage URL] [--study NAME] [--apply]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from components.config.redaction import redact
from components.data.files import atomic_write_bytes, read_json, write_json
from components.search import STUDENT_DIR, TRIAL_FILE, choice, space
from components.stage import StageError
from flows import dvc_ops as dvc

ARTIFACT_KEY = "still-search"
TRIALS_DIR = "artifacts/search"  # <study>/<experiment>/{trial.json, student/}: not a DVC output
RESULTS_DIR = "results/search"  # git-tracked: trials.json, trials.md, pareto.png
TARGET = "distill"  # what a trial runs (and what it needs upstream, restored from the cache)


class SearchError(RuntimeError):
    """A search that cannot start or found no student to choose: one line, nothing applied."""


def _storage(url: str, repo: Path):
    """Optuna storage: a SQLAlchemy URL as is (checked reachable), else a journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # SQLAlchemy/driver errors: say which URL, keep one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SearchError(f"search.storage: cannot open {redact(url)}: "
                              f"{first}") from None
    path = Path(url) if Path(url).is_absolute() else repo / url
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(cfg, repo: Path, storage: str, name: str):
    import optuna

    sampler = (optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.population)
               if cfg.sampler == "nsga2" else optuna.samplers.TPESampler(seed=cfg.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=_storage(storage, repo),
                               sampler=sampler, directions=["maximize", "minimize"],
                               load_if_exists=True)


@task(name="search-trial", task_run_name="{name}", cache_policy=NO_CACHE)
def run_trial(repo: str, name: str, overrides: dict[str, Any], group: str,
              keep: str) -> dict[str, Any]:
    """One trial: `dvc exp run -n NAME -S ... distill` in a fresh clone that shares the main
    DVC cache; the distill metrics and the student (a few MB) are kept under `keep/NAME` for
    the table and the timing, the experiment is pushed back to the main repo."""
    repo_path = Path(repo)
    cache = Path(dvc.run(["cache", "dir"], repo_path).strip()).resolve()
    workspace = Path(tempfile.mkdtemp(prefix=f"still-{name}-"))
    try:
        ws = workspace / "repo"
        dvc.git(["clone", "-q", str(repo_path), str(ws)], repo_path)
        dvc.run(["cache", "dir", "--local", str(cache)], ws)
        # Links, not copies, of the teacher and its outputs: every stage replaces its output
        # folder whole (never edits a file in place), so a linked cache file is never written.
        dvc.run(["config", "--local", "cache.type", "reflink,hardlink,copy"], ws)
        commit = dvc.git(["rev-parse", "HEAD"], ws).strip()
        args = ["exp", "run", "-n", name]
        for key, value in overrides.items():
            args += ["-S", f"{key}={json.dumps(value)}"]
        env = {"STILL_RUN_GROUP": group, "STILL_EXPERIMENT": name, "STILL_GIT_COMMIT": commit}
        dvc.run([*args, TARGET], ws, env, what=f"trial {name!r}")
        student = ws / "artifacts" / "student"
        metrics = read_json(student / "metrics.json")
        out = Path(keep) / name
        tmp = out.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(student, tmp / STUDENT_DIR)
        write_json(tmp / TRIAL_FILE, {"experiment": name, "overrides": overrides,
                                            "git_commit": commit, "metrics": metrics})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        _keep_wandb_runs(ws, repo_path)
        dvc.run(["exp", "push", "--no-cache", "--force", "origin", name], ws)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return metrics


def _keep_wandb_runs(ws: Path, repo: Path) -> None:
    """The trial's W&B runs (offline: folders under artifacts/wandb) move to the main repo's,
    so `wandb sync` uploads them with the rest; online runs are already on the server."""
    from components.config import Paths

    runs = ws / Paths().wandb / "wandb"
    if not runs.is_dir():
        return
    target = repo / Paths().wandb / "wandb"
    target.mkdir(parents=True, exist_ok=True)
    for run in runs.glob("offline-run-*"):
        if not (target / run.name).exists():
            shutil.copytree(run, target / run.name)


def _validator(repo: Path):
    from components.config import ParamsError, load_params

    def problem(overrides: dict) -> str | None:
        try:
            load_params(repo / "params.yaml", overrides)
        except ParamsError as err:
            return " ".join(str(err).split())
        return None

    return problem


def _close_stale(study, log) -> None:
    """Trials a stopped search left RUNNING (their workspace is gone) are marked failed, so
    the resumed search counts only finished trials and asks for new ones."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        log.info("trial %d was left running by a stopped search: marked failed", t.number)


def _rows(study) -> list[dict]:
    from optuna.trial import TrialState

    return [t.user_attrs["row"] for t in study.get_trials(states=(TrialState.COMPLETE,))
            if "row" in t.user_attrs]


def run_trials(study, repo: Path, cfg, group: str, keep: Path, problem) -> None:
    """Ask, run and tell until the study holds `n_trials` finished trials (a trial whose point
    is not valid params is pruned, with the reason; a failed trial is marked failed)."""
    from optuna.trial import TrialState

    log = get_run_logger()
    attempts = 0
    levers = cfg.space_dict()
    target = min(cfg.n_trials, space.count_points(levers))
    if target < cfg.n_trials:
        print(f"search: the space has {target} distinct points: {target} trials, not "
              f"{cfg.n_trials}")
    tried = {json.dumps(r["params"], sort_keys=True): r["trial"] for r in _rows(study)}
    with ThreadPoolTaskRunner(max_workers=cfg.max_parallel) as runner:
        while len(_rows(study)) < target:
            if attempts >= 20 * cfg.n_trials:
                raise SearchError(f"search: {attempts} trials asked, only "
                                  f"{len(_rows(study))} finished: see the failed trials above")
            wave = []
            for _ in range(min(cfg.max_parallel, target - len(_rows(study)))):
                attempts += 1
                trial = study.ask()
                chosen = space.suggest(trial, levers)
                overrides = space.overrides_for(chosen)
                key = json.dumps(overrides, sort_keys=True)
                why = (f"the same point as trial {tried[key]}" if key in tried
                       else problem(overrides))
                if why:
                    trial.set_user_attr("pruned_because", why)
                    study.tell(trial, state=TrialState.PRUNED)
                    log.info("trial %d pruned: %s", trial.number, why)
                    continue
                name = f"{group}-t{trial.number}"
                trial.set_user_attr("experiment", name)
                tried[key] = trial.number
                wave.append((trial, name, chosen, overrides, runner.submit(
                    run_trial, {"repo": str(repo), "name": name, "overrides": overrides,
                                "group": group, "keep": str(keep)})))
            for trial, name, chosen, overrides, future in wave:
                try:
                    metrics = future.result()
                except Exception as err:
                    log.warning("trial %d (%s) failed: %s", trial.number, name, err)
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                row = choice.trial_row(trial.number, name, choice.searched(chosen, levers),
                                      overrides, metrics)
                trial.set_user_attr("row", row)
                study.tell(trial, [row["val_accuracy"], row["gflops"]])
                print(f"search: trial {trial.number} {name} {row['levers']}: validation "
                      f"{row['val_accuracy']:.4f} ({0.0 - row['drop_pt']:+.2f} pt vs the "
                      f"teacher), {row['gflops']:.4g} GFLOPs/ex")


def time_finalists(repo: Path, keep: Path, names: list[str]) -> dict:
    """`python -m components.search.timing` in the main repo: the finalists' students exported
    and timed with the best teacher runtime, alone on the machine (no trial runs now)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timed.json"
        cmd = [sys.executable, "-m", "components.search.timing", "--trials", str(keep),
               "--names", *names, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=repo, env=dvc.env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SearchError("search: timing the finalists failed:\n"
                              + (proc.stderr.strip() or proc.stdout.strip())[-2000:])
        return read_json(out)


def _markdown(rows: list[dict], timed: dict | None, winner: str | None) -> str:
    head = ("| trial | experiment | params | val acc [95% CI] | Δ val pt vs teacher | GFLOPs/ex "
            "| parameters (M) | e2e ex/s | vs teacher e2e | test acc [95% CI] |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    t = (timed or {}).get("timed", {})
    for r in sorted(rows, key=lambda r: r["trial"]):
        name = r["experiment"]
        speed = t.get(name)
        test = (timed or {}).get("winner_test") if name == winner else None
        params = ", ".join(f"{k}={v}" for k, v in r["levers"].items())
        lo, hi = r["val_accuracy_ci"]
        e2e = f"{speed['throughput_per_s']:.0f}" if speed else ""
        ratio = f"{speed['speedup_vs_best_teacher']:.2f}x" if speed else ""
        tested = ""
        if test:
            t_lo, t_hi = test["accuracy_ci"]
            tested = f"{test['accuracy']:.4f} [{t_lo:.4f}, {t_hi:.4f}]"
        shown = f"**{name}**" if name == winner else name
        lines.append(
            f"| {r['trial']} | {shown} | {params} | {r['val_accuracy']:.4f} [{lo:.4f}, {hi:.4f}] "
            f"| {0.0 - r['drop_pt']:+.2f} | {r['gflops']:.4g} | {r['parameters'] / 1e6:.3g} "
            f"| {e2e} | {ratio} | {tested} |")
    return head + "\n".join(lines) + "\n"


def _short(levers: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in levers.items())


def _plot(rows: list[dict], timed: dict | None, winner: str | None, path: Path) -> None:
    """Validation accuracy against measured end-to-end speed: the timed candidates and the
    teacher they were timed with (Optuna's own plot shows every trial against GFLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(8, 4.8))
    by_name = {r["experiment"]: r for r in rows}
    notes = []
    for name, speed in (timed or {}).get("timed", {}).items():
        row = by_name.get(name)
        acc = row["val_accuracy"] if row else rows[0]["teacher_val_accuracy"]
        color = "tab:red" if row is None else "tab:green" if name == winner else "tab:blue"
        ax.scatter(speed["throughput_per_s"], acc, c=color, s=60, zorder=3)
        tag = name if row is None else f"t{row['trial']}"
        ax.annotate(tag, (speed["throughput_per_s"], acc), fontsize=8, xytext=(5, 4),
                    textcoords="offset points")
        if row is not None:
            notes.append(f"t{row['trial']}: {_short(row['levers'])}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.15)
    ax.set(xlabel="measured end-to-end examples/s (log)", ylabel="validation accuracy",
           title="Candidates timed side by side (green: chosen, red: teacher)")
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=7,
                va="bottom", ha="left", color="dimgray")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def optuna_plots(study, out: Path) -> list[str]:
    """Optuna's own views of the study: its Pareto front (validation accuracy against GFLOPs)
    and, with enough finished trials, which levers mattered for validation accuracy
    (fANOVA importances). Best effort: a plot Optuna cannot draw is left out, not an error."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    made = []
    drawings = {
        "optuna_pareto.png": lambda: views.plot_pareto_front(
            study, target_names=["validation accuracy", "GFLOPs per example"]),
        "optuna_importances.png": lambda: views.plot_param_importances(
            study, target=lambda t: t.values[0], target_name="validation accuracy"),
    }
    for name, draw in drawings.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            tmp = out / f".{name}.tmp.png"
            fig.savefig(tmp, dpi=100)
            plt.close(fig)
            tmp.replace(out / name)
            made.append(name)
        except Exception as err:  # e.g. importances need two finished trials that differ
            print(f"search: {name} not drawn ({err})")
    return made


def write_results(repo: Path, study_name: str, rows: list[dict], timed: dict | None,
                  winner: str | None, note: str, study=None) -> Path:
    out = repo / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots = optuna_plots(study, out) if study is not None else []
    write_json(out / "trials.json", {"study": study_name, "trials": rows, "timed": timed,
                                     "winner": winner, "note": note})
    md = (f"# Search {study_name}\n\n{note}\n\n" + _markdown(rows, timed, winner)
          + "\n![Pareto](pareto.png)\n" + "".join(f"\n![{p}]({p})\n" for p in plots))
    atomic_write_bytes(out / "trials.md", md.encode())
    _plot(rows, timed, winner, out / "pareto.png")
    return out


def _log_wandb(repo: Path, group: str, rows: list[dict], timed: dict | None,
               winner: str | None, results: Path) -> None:
    """One W&B run for the search, in the trials' group: the table, the plot, the winner."""
    from components.config import load_params
    from components.reporting.tracking import best_effort, init_kwargs

    params = load_params(repo / "params.yaml")
    with best_effort("search", f"{results}"):
        import wandb

        kwargs = init_kwargs(params, "search")
        kwargs["group"] = group
        kwargs["dir"] = str(repo / params.paths.wandb)
        run = wandb.init(name=f"{group}-search", tags=[f"winner:{winner}"] if winner else [],
                         **kwargs)
        table = wandb.Table(columns=["trial", "experiment", "val_accuracy", "drop_pt", "gflops",
                                     "parameters", "e2e_per_s", "winner"])
        t = (timed or {}).get("timed", {})
        for r in rows:
            table.add_data(r["trial"], r["experiment"], r["val_accuracy"], r["drop_pt"],
                           r["gflops"], r["parameters"],
                           t.get(r["experiment"], {}).get("throughput_per_s"),
                           r["experiment"] == winner)
        run.log({"trials": table, "pareto": wandb.Image(str(results / "pareto.png"))})
        run.summary["winner"] = winner
        run.finish()


def apply_winner(repo: Path, name: str) -> None:
    """`dvc exp apply NAME` (params.yaml, dvc.lock and the student of the winner), then
    `dvc repro` builds export, evaluate and the bundle from it."""
    dvc.run(["exp", "apply", name], repo, what=f"dvc exp apply {name}")
    dvc.run(["repro"], repo, what="dvc repro after applying the winner")


@flow(name="still-search", log_prints=True)
def search(repo: str = ".", n_trials: int | None = None, max_parallel: int | None = None,
           storage: str | None = None, study: str | None = None,
           apply: bool = False) -> dict[str, Any]:
    """Run (or resume) the study, time the candidates, choose, report, optionally apply."""
    from components.config import ParamsError, load_params

    start = time.perf_counter()
    root = Path(repo).resolve()
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as err:
        raise SearchError(str(err)) from None
    cfg = params.search.model_copy(update={k: v for k, v in {
        "n_trials": n_trials, "max_parallel": max_parallel, "storage": storage,
        "study": study}.items() if v is not None})
    problem = _validator(root)
    problems = space.space_problems(cfg.space_dict(), problem)
    if problems:
        raise SearchError("; ".join(problems))
    group = cfg.study
    keep = root / TRIALS_DIR / group
    opt = open_study(cfg, root, cfg.storage, group)
    _close_stale(opt, get_run_logger())
    before = len(_rows(opt))
    if before:
        print(f"search: resuming study {group!r}: {before} finished trial(s) kept")
    run_trials(opt, root, cfg, group, keep, problem)
    rows = _rows(opt)
    finalists, closest = choice.candidates(rows, cfg.max_drop, cfg.finalists)
    if not finalists:
        note = (f"No trial within {cfg.max_drop} pt of the teacher on validation; nothing "
                f"applied. Closest: {closest.get('experiment')} at "
                f"{0.0 - closest.get('drop_pt', 0):+.2f} pt.")
        write_results(root, group, rows, None, None, note, opt)
        raise SearchError("search: " + note)
    timed = time_finalists(root, keep, [r["experiment"] for r in finalists])
    winner = timed["winner"]
    w = timed["timed"][winner]
    note = (f"{len(rows)} trials, chosen on validation: the fastest end to end of "
            f"{len(finalists)} candidate(s) on the Pareto front within {cfg.max_drop} pt of "
            f"the teacher; timed side by side with {timed['teacher']} "
            f"({timed['timed_on']}, {timed['rounds']} rounds). Winner **{winner}**: "
            f"{w['speedup_vs_best_teacher']:.2f}x the teacher end to end, test accuracy "
            f"{timed['winner_test']['accuracy']:.4f} (reported once, after the choice).")
    results = write_results(root, group, rows, timed, winner, note, opt)
    md = (root / RESULTS_DIR / "trials.md").read_text()
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=md,
                             description=f"Search {group}: trials, candidates, winner")
    create_table_artifact(key=f"{ARTIFACT_KEY}-table", table=[
        {**{k: v for k, v in r.items() if k not in ("params", "levers")}, **r["levers"],
         "e2e_per_s": timed["timed"].get(r["experiment"], {}).get("throughput_per_s")}
        for r in rows])
    _log_wandb(root, group, rows, timed, winner, results)
    print(f"search: {note.replace('**', '')}")
    if apply:
        apply_winner(root, winner)
        print(f"search: applied {winner} (dvc exp apply) and rebuilt the bundle (dvc repro)")
    minutes = (time.perf_counter() - start) / 60
    print(f"search: done in {minutes:.1f} min")
    return {"winner": winner, "rows": rows, "timed": timed, "minutes": minutes,
            "applied": apply}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--max-parallel", type=int)
    parser.add_argument("--storage", help="journal file or SQLAlchemy URL (search.storage)")
    parser.add_argument("--study", help="study name (search.study)")
    parser.add_argument("--apply", action="store_true",
                        help="dvc exp apply the winner and dvc repro the bundle")
    args = parser.parse_args(argv)
    try:
        search(repo=args.repo, n_trials=args.n_trials, max_parallel=args.max_parallel,
               storage=args.storage, study=args.study, apply=args.apply)
    except (SearchError, StageError) as err:
        print(f"search: error: {str(err).removeprefix('search: ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
