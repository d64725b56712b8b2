"""Reports that decide: Pareto fronts, confusion matrix, the Markdown/HTML evaluation report, and
`still report`: one comparison table and plot across DVC experiments.

Pareto front (maximise accuracy, and throughput or minimise size/latency): a point is on the front
when no other point is at least as good on both axes and strictly better on one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from components.evaluation.selection import pareto_front

PARETO_PNG = "pareto.png"
CONFUSION_PNG = "confusion.png"
CASCADE_PNG = "cascade.png"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_systems(points: list[dict], path: Path) -> None:
    """Test accuracy (95% interval) vs end-to-end throughput of every system."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        ax.errorbar(p["throughput_per_s"], p["accuracy"], yerr=ci_yerr(p), fmt="o",
                    capsize=3,
                    color="tab:red" if p.get("side") == "teacher" else "tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end throughput (examples/s, log scale)")
    ax.set_ylabel("test accuracy (95% bootstrap interval)")
    ax.set_title("Accuracy vs throughput (red: teacher runtimes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, [label_point(p, "throughput_per_s") for p in points], 9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cascade(val_points: list[dict], points: list[dict], chosen: dict | None, target: float,
         student_ms: float, teacher_ms: float, teacher_acc: float, teacher_name: str,
         path) -> None:
    """Left: accuracy vs deferral on validation (where the threshold is chosen) and test.
    Right: test accuracy vs expected cost, the student and the teacher alone, the target."""

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pts, label, style in ((val_points, "validation (threshold chosen here)", "--"),
                              (points, "test (reported)", "-")):
        left.plot([p["deferred_fraction"] for p in pts], [p["accuracy"] for p in pts],
                  marker="o", ms=3, ls=style, label=label)
    left.axhline(target, color="grey", ls=":", lw=1, label=f"validation target {target:.3f}")
    left.set_xlabel("fraction deferred to the teacher")
    left.set_ylabel("accuracy")
    left.set_title("Cascade: accuracy vs deferral")
    left.legend(fontsize=8, loc="lower right")
    cost = [p["expected_ms_per_example"] for p in points]
    right.plot(cost, [p["accuracy"] for p in points], marker="o", ms=3,
               label="cascade thresholds (test)")
    right.scatter([student_ms], [points[0]["accuracy"]], marker="s", color="tab:green",
                  label="student alone", zorder=3)
    right.scatter([teacher_ms], [teacher_acc], marker="^", color="tab:red",
                  label=f"{teacher_name} alone", zorder=3)
    if chosen:
        left.scatter([chosen["validation_deferred_fraction"], chosen["deferred_fraction"]],
                     [chosen["validation_accuracy"], chosen["accuracy"]], s=120,
                     facecolors="none", edgecolors="black", zorder=4)
        right.scatter([chosen["expected_ms_per_example"]], [chosen["accuracy"]], s=120,
                      facecolors="none", edgecolors="black", zorder=4)
        right.annotate(f"t={chosen['threshold']:.2f}",
                       (chosen["expected_ms_per_example"], chosen["accuracy"]),
                       textcoords="offset points", xytext=(6, -12), fontsize=9)
    right.set_xlabel("expected ms per example (end to end, measured)")
    right.set_ylabel("test accuracy")
    right.set_title("Cascade on test: accuracy vs cost")
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
