"""Reports that decide: Pareto fronts, confusion matrix, the Markdown/HTML evaluation report, and
`still report`: one comparison table and plot across DVC experiments.

Pareto front (maximise accuracy, and throughput or minimise size/latency): a point is on the front
when no other point is at least as good on both axes and strictly better on one.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

PARETO_PNG = "pareto.png"
CONFUSION_PNG = "confusion.png"
CASCADE_PNG = "cascade.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[dict], x: str, maximize_x: bool, y: str = "accuracy") -> list[str]:
    """Names (`system`) of the non-dominated points, sorted along x."""
    sign = 1.0 if maximize_x else -1.0

    def dominates(a: dict, b: dict) -> bool:
        ax, bx = sign * a[x], sign * b[x]
        return ax >= bx and a[y] >= b[y] and (ax > bx or a[y] > b[y])

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return [p["system"] for p in sorted(front, key=lambda p: p[x])]


def ci_yerr(point: dict) -> list[list[float]] | None:
    """matplotlib's asymmetric `yerr` for a point's 95% accuracy interval (None without one)."""
    ci = point.get("accuracy_ci")
    return [[point["accuracy"] - ci[0]], [ci[1] - point["accuracy"]]] if ci else None


def place_labels(ax, points: list[dict], fontsize: float = 8) -> None:
    """Label each point (`x`, `y`, `text`, optional `ylo`/`yhi` error bar) where its label
    overlaps no other label, marker or error bar and stays inside the axes; a label pushed away
    from its point gets a thin leader line. Call once the axes' limits and layout are final
    (after `tight_layout`): placement is done in display pixels.

    Greedy: for each point, the first free spot among candidates at growing distance around it
    (right, left, above, below and the diagonals); when none is free, the least overlapping.
    """
    import math

    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    obstacles = []
    for p in points:
        cx, cy = to_px((p["x"], p["y"]))
        r = 4 * px_per_pt
        obstacles.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))
        if p.get("ylo") is not None and p.get("yhi") is not None:
            lo, hi = to_px((p["x"], p["ylo"]))[1], to_px((p["x"], p["yhi"]))[1]
            obstacles.append(Bbox.from_extents(cx - 4 * px_per_pt, lo, cx + 4 * px_per_pt, hi))

    def overlap(a: Bbox, b: Bbox) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    angles = (30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120)
    for p in points:
        cx, cy = to_px((p["x"], p["y"]))
        probe = ax.text(0, 0, p["text"], fontsize=fontsize)
        size = probe.get_window_extent(renderer)
        probe.remove()
        best = None
        for radius in (6, 12, 20, 30, 42, 56):
            for angle in angles:
                dx = radius * math.cos(math.radians(angle))
                dy = radius * math.sin(math.radians(angle))
                x0 = cx + dx * px_per_pt - (size.width if dx < -1e-9 else 0.0)
                y0 = cy + dy * px_per_pt - (size.height if dy < -1e-9 else 0.0)
                box = Bbox.from_bounds(x0, y0, size.width, size.height)
                cost = sum(overlap(box, o) for o in obstacles)
                inside = overlap(box, frame)
                cost += size.width * size.height - inside  # outside the axes
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, box, radius)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, dx, dy, box, radius = best
        ax.annotate(p["text"], (p["x"], p["y"]), xytext=(dx, dy), textcoords="offset points",
                    fontsize=fontsize, ha="right" if dx < -1e-9 else "left",
                    va="top" if dy < -1e-9 else "bottom", zorder=4,
                    arrowprops=(dict(arrowstyle="-", color="0.55", lw=0.6,
                                     shrinkA=0, shrinkB=3) if radius > 6 else None))
        obstacles.append(box)


def label_point(point: dict, x: str) -> dict:
    """`place_labels`' view of a system point: its name at (x, accuracy) with its interval."""
    ci = point.get("accuracy_ci") or (None, None)
    return {"x": point[x], "y": point["accuracy"], "text": point["system"],
            "ylo": ci[0], "yhi": ci[1]}


def plot_pareto(points: list[dict], path: Path, extra: list[dict] | None = None) -> dict:
    """Accuracy vs throughput, vs size and vs end-to-end ms per example (with cascade points in
    `extra`), each point with its 95% accuracy interval, the front drawn in each panel. Returns
    the fronts by axis. A front is drawn on point estimates: the report says which of its
    differences are within noise."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    cost_points = points + (extra or [])
    panels = [
        ("throughput_per_s", True, "end-to-end throughput (examples/s, log)", points),
        ("size_mb", False, "size (MB, log)", points),
        ("ms_per_example", False, "end-to-end ms per example at the batch size (log)",
         cost_points),
    ]
    fronts = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, maximize, label, pts) in zip(axes, panels, strict=True):
        front = pareto_front(pts, key, maximize)
        fronts[key] = front
        for p in pts:
            on = p["system"] in front
            ax.errorbar(p[key], p["accuracy"], yerr=ci_yerr(p), capsize=3, ms=7 if on else 5,
                        fmt="D" if p["system"].startswith("cascade") else "o",
                        color="tab:red" if on else "tab:blue", zorder=3)
        line = sorted((p for p in pts if p["system"] in front), key=lambda p: p[key])
        ax.plot([p[key] for p in line], [p["accuracy"] for p in line], color="tab:red",
                lw=1, ls="--", label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded minor tick labels
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (95% interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs cost; red: not dominated by any other system (point estimates)")
    fig.tight_layout()
    for ax, (key, _, _, pts) in zip(axes, panels, strict=True):
        place_labels(ax, [label_point(p, key) for p in pts])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fronts


def confusion(labels: np.ndarray, preds: np.ndarray, names: list[str], title: str,
              path: Path) -> dict:
    """Confusion matrix PNG and per-class precision/recall/F1 for one system."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    plt = pyplot()
    ids = list(range(len(names)))
    cm = confusion_matrix(labels, preds, labels=ids)
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=ids,
                                                       zero_division=0)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.0 * len(names) + 2.5))
    ax.imshow(cm, cmap="Blues")
    for i in ids:
        for j in ids:
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(ids, names, rotation=45, ha="right")
    ax.set_yticks(ids, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {
        "matrix": cm.tolist(),
        "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(support[i])} for i, n in enumerate(names)},
    }


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "auto":  # numbers to 4 significant digits, anything else as it is
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return format(value, spec) if spec else str(value)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown table lines; columns are (key, header, format spec or "auto")."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in columns)
                   + " |")
    return out


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of `rows` with every key as a column (the flows' artifacts)."""
    if not rows:
        return "_no rows_"
    keys = dict.fromkeys(k for r in rows for k in r)
    return "\n".join(_table(rows, [(k, k, "auto") for k in keys]))


def _ci(v: list[float] | None, spec: str = ".4f") -> str:
    return "-" if not v else f"[{format(v[0], spec)}, {format(v[1], spec)}]"


def _pt(v: float) -> str:
    return f"{100 * v:+.2f}"


def _pt_ci(ci: list[float]) -> str:
    """An accuracy-difference interval in points: `[-4.73, -0.32]`."""
    return f"[{_pt(ci[0])}, {_pt(ci[1])}]"


def _system_rows(metrics: dict) -> list[dict]:
    rows = []
    for name, r in metrics["systems"].items():
        d = r.get("vs_best_teacher")
        v = r.get("validation") or {}
        rows.append({
            "system": name, "runtime": r["runtime"],
            "validation": (f"{v['accuracy']:.4f} {_ci(v.get('accuracy_ci'))}" if v else None),
            "accuracy": f"{r['accuracy']:.4f} {_ci(r.get('accuracy_ci'))}",
            "diff": ("reference" if d is None else
                     f"{_pt(d['accuracy_diff'])} {_pt_ci(d['accuracy_diff_ci'])}"
                     + (" (noise)" if d["within_noise"] else "")),
            "macro_f1": f"{r['macro_f1']:.4f} {_ci(r.get('macro_f1_ci'))}",
            **{k: r.get(k) for k in ("model_throughput_per_s", "throughput_per_s",
                                     "tokenize_ms_per_example", "interplay_ms_per_example",
                                     "latency_p50_ms",
                                     "latency_p95_ms", "model_latency_p50_ms", "size_mb",
                                     "tokens_per_example", "gflops_per_example")},
        })
    return rows


SYSTEM_COLUMNS = [
    ("system", "system", ""), ("runtime", "runtime", ""),
    ("validation", "validation acc [95% CI]", ""),
    ("accuracy", "test acc [95% CI]", ""), ("diff", "Δ test acc vs best teacher, pt [95% CI]", ""),
    ("macro_f1", "macro-F1 [95% CI]", ""),
    ("model_throughput_per_s", "model ex/s", ".1f"), ("throughput_per_s", "end-to-end ex/s", ".1f"),
    ("tokenize_ms_per_example", "tokenize ms/ex", ".3f"),
    ("interplay_ms_per_example", "interplay ms/ex", ".3f"),
    ("latency_p50_ms", "p50 ms (e2e)", ".2f"), ("latency_p95_ms", "p95 ms (e2e)", ".2f"),
    ("model_latency_p50_ms", "p50 ms (model)", ".2f"), ("size_mb", "MB", ".1f"),
    ("tokens_per_example", "tokens/ex", ".1f"), ("gflops_per_example", "GFLOPs/ex", ".3f"),
]


def _speed_rows(metrics: dict) -> list[dict]:
    systems, ratios = metrics["systems"], metrics["ratios"]
    return [{"system": name,
             "vs_best": ratios[f"{name}_throughput_vs_best_teacher"],
             "model_vs_best": ratios[f"{name}_model_throughput_vs_best_teacher"],
             "vs_eager": ratios[f"{name}_throughput_vs_teacher_pytorch"]}
            for name, r in systems.items() if r["side"] == "student"]


def markdown(metrics: dict) -> str:
    """The evaluation report (also the Prefect artifact): systems with intervals, speed ratios
    against the best teacher runtime, the validation-chosen cascade, fronts, noise."""
    best = metrics["best_teacher"]
    h = metrics["headline"]
    u = metrics["uncertainty"]
    lines = [f"# Evaluation: {metrics['test_examples']} test examples", "",
             f"**{h['student']}** runs **{h['throughput_vs_best_teacher']:.2f}x** the best teacher "
             f"runtime (**{best}**) end to end ({h['model_throughput_vs_best_teacher']:.2f}x in "
             f"model time; {h['throughput_vs_teacher_pytorch']:.2f}x PyTorch eager) at "
             f"{_pt(h['accuracy_diff'])} pt test accuracy (95% CI "
             f"{_pt_ci(h['accuracy_diff_ci'])}; McNemar exact p = {h['mcnemar_p']:.3g}"
             + ("; within noise" if h["within_noise"] else "") + ").", "",
             "**Chosen on validation, reported on test.** The best teacher runtime is the "
             "fastest teacher system (end to end) whose validation accuracy lies within the 95% "
             "interval of the most accurate teacher system's on validation; the headline "
             "student is chosen the same way among students"
             + (f" ({metrics.get('validation_examples')} validation examples)"
                if metrics.get("validation_examples") else "")
             + ". Test numbers never decide anything. Intervals: "
             f"{u['method']}, {u['resamples']} resamples, seed {u['seed']}.", "",
             "**How each column is timed** (threads pinned for every pool: PyTorch and ONNX "
             "Runtime intra-op at `evaluate.num_threads`, inter-op 1, ONNX Runtime spinning off, "
             "the tokenizers pool sized once; medians over round-robin rounds):",
             "- *tokenize ms/ex*: text to padded ids (the pre-cut, the tokenizer, padding), "
             "timed per encoder in its own loop, never right after a model call, so systems "
             "sharing a tokenizer show the same figure;",
             "- *model ex/s*, *p50 ms (model)*: padded tensors in, logits out, batch after batch;",
             "- *end-to-end ex/s*, *p50/p95 ms (e2e)*: text in, logits out, as it runs (each "
             "batch tokenised, then run); *interplay ms/ex* is what that costs beyond "
             "tokenisation alone plus the model alone (each evicts the other's working set "
             "from the caches);",
             "- *deployed path*: the bundle's own code (`still predict`), text in, label out, "
             "timed as it runs.", ""]
    lines += _table(_system_rows(metrics), SYSTEM_COLUMNS) + [""]
    lines += ["## Speed of each student against the teacher", ""]
    lines += _table(_speed_rows(metrics), [
        ("system", "student system", ""),
        ("vs_best", f"end-to-end vs {best}", ".2f"),
        ("model_vs_best", f"model time vs {best}", ".2f"),
        ("vs_eager", "end-to-end vs teacher (PyTorch eager)", ".2f")]) + [""]
    lines += ["## Other ratios", ""] + [
        f"- {k}: {v:.3f}" for k, v in metrics["ratios"].items()
        if not k.endswith(("_vs_best_teacher", "_vs_teacher_pytorch"))]
    noise = [n for n, r in metrics["systems"].items()
             if r.get("vs_best_teacher", {}).get("within_noise")]
    lines += ["", "## Within noise", "",
              (f"The accuracy difference from {best} is within noise (its 95% interval contains "
               f"0) for: {', '.join(noise)}. Rank these on cost, not on accuracy."
               if noise else f"Every system's accuracy differs from {best} beyond noise.")]
    fronts = metrics.get("pareto", {})
    if fronts:
        lines += ["", "## Pareto fronts (not dominated on accuracy and cost, point estimates)",
                  ""]
        lines += [f"- accuracy vs {axis}: {', '.join(names)}" for axis, names in fronts.items()]
    lines += _deployed_lines(metrics)
    c = metrics.get("cascade")
    if c:
        lines += ["", f"## Cascade: {c['student']} first, {c['teacher']} when {c['confidence']} "
                  f"confidence < threshold", ""]
        chosen = c.get("chosen")
        if chosen:
            d = chosen["vs_teacher"]
            measured = (f" Measured as it runs (the bundle's code on the test split): "
                        f"**{chosen['measured_ms_per_example']:.3f} ms** per example, "
                        f"**{chosen['measured_speedup_vs_best_teacher']:.2f}x** the best "
                        f"teacher runtime." if "measured_ms_per_example" in chosen else "")
            lines.append(
                f"Threshold **{chosen['threshold']:.2f}**, chosen on the validation split "
                f"({c['validation_examples']} examples: fewest deferrals reaching "
                f"{c['target_accuracy']:.4f}, where it scored "
                f"{chosen['validation_accuracy']:.4f}). On test: accuracy "
                f"{chosen['accuracy']:.4f} {_ci(chosen['accuracy_ci'])} "
                f"({_pt(d['accuracy_diff'])} pt vs {c['teacher']}, "
                f"{_pt_ci(d['accuracy_diff_ci'])}), "
                f"{100 * chosen['deferred_fraction']:.1f}% deferred. Cost model: "
                f"{chosen['expected_ms_per_example']:.3f} ms per example "
                f"({chosen['speedup_vs_teacher']:.2f}x faster than {c['teacher']} alone, "
                f"{chosen['speedup_vs_best_teacher']:.2f}x the best teacher runtime "
                f"{metrics['best_teacher']}).{measured} Cost: {c['cost']}.")
        else:
            lines.append(f"No threshold reaches the target accuracy {c['target_accuracy']:.4f} "
                         "on the validation split.")
    best_student = metrics.get("best_student")
    if best_student:
        lines += ["", f"## Per-class F1: {best_student['system']}", ""]
        lines += _table([{"class": k, **v} for k, v in best_student["per_class"].items()],
                        [("class", "class", ""), ("precision", "precision", ".3f"),
                         ("recall", "recall", ".3f"), ("f1", "F1", ".3f"),
                         ("support", "support", "")])
    if metrics.get("tensorrt") not in (None, "evaluated"):
        lines += ["", f"TensorRT: {metrics['tensorrt']}"]
    return "\n".join(lines) + "\n"


def _deployed_lines(metrics: dict) -> list[str]:
    """The deployed path (the bundle's `Predictor`) beside the system table's figure."""
    d = metrics.get("deployed")
    if not d:
        return []
    lines = ["", "## Deployed path (`still predict`, `load_bundle(...).predict`)", ""]
    student = d.get("student")
    if not student:
        return lines + [f"Not timed: {d['timed']}."]
    name = d["system"]
    row = metrics["systems"].get(name, {})
    lines.append(f"{name} through the bundle's code, text in, label out, batches of "
                 f"{student['batch_size']}: **{student['throughput_per_s']:.1f} texts/s** "
                 f"({student['ms_per_example']:.3f} ms each)"
                 + (f", {student['vs_evaluate_end_to_end']:.2f}x the end-to-end figure of the "
                    f"table above ({row['throughput_per_s']:.1f} ex/s)"
                    if "vs_evaluate_end_to_end" in student else "") + ".")
    casc = d.get("cascade")
    if casc:
        lines.append(f"The cascade the same way: {casc['throughput_per_s']:.1f} texts/s "
                     f"({casc['ms_per_example']:.3f} ms each, "
                     f"{100 * casc['deferred_fraction']:.1f}% answered by the teacher).")
    return lines


_PAGE_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:2em auto;
  padding:0 1em;color:#1f2328;line-height:1.5}
h1,h2{border-bottom:1px solid #d8dee4;padding-bottom:.25em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:.35em .7em;text-align:left;white-space:nowrap}
th{background:#f6f8fa;white-space:normal}tr:nth-child(even) td{background:#fbfcfd}
code{background:#f3f4f6;padding:.1em .3em;border-radius:4px;font-size:.9em}
pre{background:#f6f8fa;padding:.8em 1em;border-radius:6px;overflow-x:auto}
pre code{background:none;padding:0}
img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#57606a;font-size:.9em}
"""


def strip_front_matter(md: str) -> str:
    """Markdown without a leading YAML front-matter block (a model card's metadata)."""
    if md.startswith("---\n"):
        end = md.find("\n---\n", 4)
        if end != -1:
            return md[end + 5:].lstrip("\n")
    return md


def render_markdown(md: str) -> str:
    """HTML of CommonMark + GitHub tables (markdown-it-py), raw HTML in the text escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(
        strip_front_matter(md))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_page(md: str, path: Path, title: str, images: list[Path] = ()) -> None:
    """A self-contained HTML page of Markdown `md`: real tables and headings, every PNG the
    text links next to `path` inlined, then `images` as captioned figures."""
    body = render_markdown(md)

    def inline(match: re.Match) -> str:
        target = path.parent / html.unescape(match.group(1))
        return f'src="{_data_uri(target)}"' if target.is_file() else match.group(0)

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    figures = [f"<figure><img src='{_data_uri(image)}' alt='{html.escape(image.stem)}'>"
               f"<figcaption>{html.escape(image.name)}</figcaption></figure>"
               for image in images]
    page = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
            body, *figures, "</body></html>"]
    path.write_text("\n".join(page) + "\n")


def html_report(md: str, images: list[Path], path: Path) -> None:
    """evaluate's report page: the Markdown report rendered, the plots inlined."""
    html_page(md, path, "still evaluation", images)


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
    table = []
    for r in rows:
        s = r["metrics"]["systems"].get(system) or {}
        t = r["metrics"]["systems"].get("teacher") or {}
        table.append({
            "experiment": r["experiment"],
            "validation_accuracy": (s.get("validation") or {}).get("accuracy"),
            "accuracy": s.get("accuracy"),
            "teacher_validation_accuracy": (t.get("validation") or {}).get("accuracy"),
            "teacher_accuracy": t.get("accuracy"), "throughput_per_s": s.get("throughput_per_s"),
            "gflops_per_example": s.get("gflops_per_example"), "size_mb": s.get("size_mb"),
            **{k: r["params"].get(k) for k in differing},
        })
    return table, differing


def write_experiments_report(repo: str | Path, out_dir: str | Path,
                             system: str = "student_onnx", all_commits: bool = False) -> Path:
    """`still report`: experiments.md (table), experiments.json and experiments.png."""
    wanted = metrics_file(repo)
    rows = experiments(repo, all_commits=all_commits, wanted=wanted)
    if not rows:
        raise RuntimeError(f"no experiment in {repo} has {wanted} yet: run "
                           "`dvc repro` or `still sweep` first")
    table, differing = compare(rows, system)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [("experiment", "experiment", ""),
               ("validation_accuracy", f"{system} val acc", ".4f"),
               ("accuracy", f"{system} test acc", ".4f"),
               ("teacher_validation_accuracy", "teacher val acc", ".4f"),
               ("teacher_accuracy", "teacher test acc", ".4f"),
               ("throughput_per_s", "ex/s", ".1f"), ("gflops_per_example", "GFLOPs/ex", ".3f"),
               ("size_mb", "MB", ".1f")] + [(k, k, "") for k in differing]
    md = [f"# {len(table)} experiments ({system})", "",
          "Choose on the validation columns; the test columns are for reporting the choice "
          "once.", ""] + _table(table, columns)
    (out / "experiments.md").write_text("\n".join(md) + "\n")
    (out / "experiments.json").write_text(json.dumps(table, indent=2) + "\n")

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in table if r["validation_accuracy"] is not None and r["throughput_per_s"]]
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
