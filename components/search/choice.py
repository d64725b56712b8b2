"""The choice on validation: a trial's row from the distill stage's metrics (validation
accuracy with its interval, the drop below the teacher, GFLOPs and parameters), the Pareto front
of the two objectives, and the candidates within `search.max_drop`, cheapest first."""

from __future__ import annotations

from typing import Any


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both objectives (higher validation accuracy, fewer
    GFLOPs per example): the study's Pareto front, computed from the trials' own metrics."""
    def dominated(r: dict) -> bool:
        return any(o["val_accuracy"] >= r["val_accuracy"] and o["gflops"] <= r["gflops"]
                   and (o["val_accuracy"] > r["val_accuracy"] or o["gflops"] < r["gflops"])
                   for o in rows)

    return [r for r in rows if not dominated(r)]


def candidates(rows: list[dict], max_drop: float, finalists: int) -> tuple[list[dict], dict]:
    """The front's trials within `max_drop` points of the teacher on validation, the cheapest
    `finalists` of them (GFLOPs); and the closest trial (the smallest drop), for the message
    when there is none."""
    within = [r for r in pareto_front(rows) if r["drop_pt"] <= max_drop + 1e-9]
    within.sort(key=lambda r: (r["gflops"], -r["val_accuracy"]))
    closest = min(rows, key=lambda r: (r["drop_pt"], r["gflops"])) if rows else {}
    return within[:finalists], closest


def searched(chosen: dict[str, Any], space: dict[str, list[Any]]) -> dict[str, Any]:
    """The levers of a point that the space varies (the table's columns)."""
    return {k: v for k, v in chosen.items() if len(space.get(k) or []) > 1}


def trial_row(number: int, name: str, chosen: dict[str, Any], overrides: dict[str, Any],
              metrics: dict) -> dict:
    """One trial as the table shows it, from the distill stage's metrics."""
    val = metrics["validation"]
    return {"trial": number, "experiment": name, "levers": chosen, "params": overrides,
            "val_accuracy": val["accuracy"], "val_accuracy_ci": val["accuracy_ci"],
            "teacher_val_accuracy": val["teacher_accuracy"], "drop_pt": val["drop_pt"],
            "gflops": metrics["gflops_per_example"], "parameters": metrics["parameters"],
            "tokens_per_example": metrics["tokens_per_example"]}
