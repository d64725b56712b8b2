"""Writes evaluate's measured results (`paths.results`: git-tracked, DVC metrics and plots, outside
dvc.lock): metrics.json, the plots' JSON and PNGs, report.md and report.html, environment.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from components.config import Params
from components.data.artifacts import RESULTS_FILE, SEARCH_RESULTS
from components.data.files import atomic_dir, write_json
from components.reporting.pages import REPORT_HTML, html_report
from components.reporting.plots import (
    CASCADE_PNG,
    CONFUSION_PNG,
    PARETO_PNG,
    confusion,
    plot_cascade,
    plot_pareto,
    plot_systems,
)
from components.reporting.tables import REPORT_MD, markdown

PLOT_FILE = "plots/systems.json"
CASCADE_FILE = "plots/cascade.json"
CONFUSION_FILE = "plots/confusion.json"
PNG_FILE = "accuracy_vs_throughput.png"


def write_results(params: Params, metrics: dict, points: list[dict], extra: list[dict],
                  casc: dict | None, labels: np.ndarray, best_preds: np.ndarray,
                  names: list[str], environment: dict) -> list[Path]:
    """Write `paths.results` whole; add the Pareto fronts and the headline student's per-class
    scores (`best_preds`: its test predictions) to `metrics` on the way. Returns the images
    written, in the report's order."""
    headline = metrics["headline_student"]
    results = metrics["systems"]
    with atomic_dir(params.paths.results, params, "evaluate") as out:
        searched = Path(params.paths.results) / SEARCH_RESULTS
        if searched.is_dir():  # `still search` writes there; evaluate's rewrite keeps it
            shutil.copytree(searched, out / SEARCH_RESULTS)
        (out / "plots").mkdir()
        write_json(out / PLOT_FILE, points)
        plot_systems(points, out / PNG_FILE)
        metrics["pareto"] = plot_pareto(points, out / PARETO_PNG, extra)
        cm = confusion(labels, best_preds, names, f"{headline} on the test split",
                       out / CONFUSION_PNG)
        metrics["best_student"] = {"system": headline, "per_class": cm["per_class"]}
        write_json(out / CONFUSION_FILE, [{"actual": names[a], "predicted": names[b]}
                                          for a, b in zip(labels, best_preds, strict=True)])
        images = [out / PNG_FILE, out / PARETO_PNG, out / CONFUSION_PNG]
        if casc:
            write_json(out / CASCADE_FILE, casc["points"])
            teacher = casc["teacher"]
            plot_cascade(casc["validation_points"], casc["points"], casc["chosen"],
                         casc["target_accuracy"], results[casc["student"]]["ms_per_example"],
                         results[teacher]["ms_per_example"], results[teacher]["accuracy"],
                         teacher, out / CASCADE_PNG)
            images.insert(1, out / CASCADE_PNG)
        write_json(out / RESULTS_FILE, metrics)
        md = markdown(metrics)
        (out / REPORT_MD).write_text(md)
        html_report(md, images, out / REPORT_HTML)
        write_json(out / "environment.json", environment)
    return [Path(params.paths.results) / image.name for image in images]
