"""`still report`: one comparison table and plot across DVC experiments (`dvc exp show`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from components.reporting.markdown_tables import table
from components.reporting.plots import place_labels, pyplot

# ------------------------------------------------------------------ across DVC experiments

def metrics_file(repo: str | Path) -> str:
    """evaluate's metrics.json, relative to `repo`, as its params.yaml places it."""
    from components.config import load_params

    return f"{load_params(Path(repo) / 'params.yaml').paths.results}/metrics.json"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def experiments(repo: str | Path = ".", all_commits: bool = False,
                wanted: str | None = None) -> list[dict]:
    """Workspace, HEAD (every commit with `all_commits`) and their DVC experiments, each with
    its evaluate metrics (`wanted`, default `metrics_file(repo)`) and params, from
    `dvc exp show --json` (what `dvc exp show` shows)."""
    wanted = wanted or metrics_file(repo)
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show failed in {repo}: {proc.stderr.strip()[-1000:]}")
    rows = []

    def visit(entry: dict, parent: str | None):
        data = entry.get("data") or {}
        metrics = ((data.get("metrics") or {}).get(wanted) or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        if metrics:
            rev = entry.get("rev") or "?"
            name = entry.get("name") or (rev[:7] if len(rev) == 40 else rev)
            rows.append({"experiment": name, "rev": data.get("rev") or entry.get("rev"),
                         "baseline": parent, "metrics": metrics, "params": _flatten(params)})
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                visit(rev, entry.get("name") or entry.get("rev"))

    for entry in json.loads(proc.stdout or "[]"):
        visit(entry, None)
    return rows


def compare(rows: list[dict], system: str = "student_onnx") -> tuple[list[dict], list[str]]:
    """One flat row per experiment: the chosen system's numbers + the params that differ."""
    keys = sorted({k for r in rows for k in r["params"]})
    differing = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in rows}) > 1
                 and not k.startswith("paths.")]
    compared = []
    for r in rows:
        s = r["metrics"]["systems"].get(system) or {}
        t = r["metrics"]["systems"].get("teacher") or {}
        compared.append({
            "experiment": r["experiment"],
            "validation_accuracy": (s.get("validation") or {}).get("accuracy"),
            "accuracy": s.get("accuracy"),
            "teacher_validation_accuracy": (t.get("validation") or {}).get("accuracy"),
            "teacher_accuracy": t.get("accuracy"), "throughput_per_s": s.get("throughput_per_s"),
            "gflops_per_example": s.get("gflops_per_example"), "size_mb": s.get("size_mb"),
            **{k: r["params"].get(k) for k in differing},
        })
    return compared, differing


def write_experiments_report(repo: str | Path, out_dir: str | Path,
                             system: str = "student_onnx", all_commits: bool = False) -> Path:
    """`still report`: experiments.md (table), experiments.json and experiments.png."""
    wanted = metrics_file(repo)
    rows = experiments(repo, all_commits=all_commits, wanted=wanted)
    if not rows:
        raise RuntimeError(f"no experiment in {repo} has {wanted} yet: run "
                           "`dvc repro` or `still sweep` first")
    compared, differing = compare(rows, system)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [("experiment", "experiment", ""),
               ("validation_accuracy", f"{system} val acc", ".4f"),
               ("accuracy", f"{system} test acc", ".4f"),
               ("teacher_validation_accuracy", "teacher val acc", ".4f"),
               ("teacher_accuracy", "teacher test acc", ".4f"),
               ("throughput_per_s", "ex/s", ".1f"), ("gflops_per_example", "GFLOPs/ex", ".3f"),
               ("size_mb", "MB", ".1f")] + [(k, k, "") for k in differing]
    md = [f"# {len(compared)} experiments ({system})", "",
          "Choose on the validation columns; the test columns are for reporting the choice "
          "once.", ""] + table(compared, columns)
    (out / "experiments.md").write_text("\n".join(md) + "\n")
    (out / "experiments.json").write_text(json.dumps(compared, indent=2) + "\n")

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in compared if r["validation_accuracy"] is not None and r["throughput_per_s"]]
    for r in pts:
        ax.scatter(r["throughput_per_s"], r["validation_accuracy"], s=40)
    ax.set_xlabel(f"{system} throughput (examples/s)")
    ax.set_ylabel(f"{system} validation accuracy")
    ax.set_title("DVC experiments")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, [{"x": r["throughput_per_s"], "y": r["validation_accuracy"],
                       "text": r["experiment"]} for r in pts])
    fig.savefig(out / "experiments.png", dpi=110)
    plt.close(fig)
    return out / "experiments.md"
