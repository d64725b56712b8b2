"""`still`: the command line.

    still validate [--set key=value ...]   check params.yaml (+ overrides), list every problem
    still repro [--set key=value ...]      plain DVC: `dvc repro`, or `dvc exp run -S ...`
    still run [--set key=value ...] [--name N] [--pull] [--push]
                                           the Prefect pipeline flow (a task per DVC stage)
    still sweep --grid key=v1,v2 [--grid ...] [--max-parallel 2]
                                           the Prefect sweep flow (DVC experiments)
    still serve [--repo .]                 serve the nightly + sweep deployments locally
    still report [--repo .] [--out reports] [--system student_onnx]
                                           one table + plot across DVC experiments

The pipeline order lives only in dvc.yaml: this CLI runs DVC (directly or through the Prefect
flows), never the stage functions.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from components.common import StageError, resolve_location
from components.config import (
    DEFAULT_PARAMS,
    Params,
    ParamsError,
    layer_map_problem,
    load_params,
    parse_override,
    teacher_layer_count,
)


def _overrides(items: list[str]) -> dict:
    return dict(parse_override(item) for item in items)


def dvc_command(sets: list[str], extra: list[str] | None = None) -> list[str]:
    """`dvc repro`, or `dvc exp run -S k=v ...` when there are overrides (so DVC records them as
    an experiment instead of editing params.yaml behind the user's back)."""
    if not sets:
        return ["dvc", "repro", *(extra or [])]
    cmd = ["dvc", "exp", "run"]
    for item in sets:
        cmd += ["-S", item]
    return cmd + (extra or [])


def teacher_problems(params: Params, root: Path) -> list[str]:
    """Best effort, never a download: check what params validation cannot know alone against
    the teacher on disk (the teacher stage's output, else a local or `pkg:` teacher.model).
    Today that is `distill.feature.layer_map` against the teacher's depth."""
    if not params.distill.feature.layer_map:
        return []
    candidates = [root / params.paths.teacher]
    try:
        model = resolve_location(params.teacher.model)  # pkg: via find_spec, no import
        candidates.append(root / model)  # an absolute path stays as it is
    except StageError:
        pass  # not installed: the teacher stage says so
    for folder in candidates:
        layers = teacher_layer_count(folder)
        if layers is not None:
            problem = layer_map_problem(params.distill.feature.layer_map, layers, str(folder))
            return [problem] if problem else []
    return []


FLOW_COMMANDS = {"run": "flows.pipeline", "sweep": "flows.sweep", "serve": "flows.deploy"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FLOW_COMMANDS:
        # The flow modules own their options; `serve` is `flows.deploy serve`.
        import importlib

        module = importlib.import_module(FLOW_COMMANDS[argv[0]])
        module.main(argv if argv[0] == "serve" else argv[1:])
        return 0

    parser = argparse.ArgumentParser(prog="still", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in FLOW_COMMANDS:
        sub.add_parser(name, help=f"Prefect: see `still {name} --help`")
    for name, text in [("validate", "validate params.yaml and overrides"),
                       ("repro", "run the DVC pipeline (an experiment when --set is given)")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, e.g. --set distill.layers=2 (repeatable)")
        p.add_argument("--params", default=str(DEFAULT_PARAMS))
    rep = sub.add_parser("report", help="compare DVC experiments: a table and a plot")
    rep.add_argument("--repo", default=".", help="DVC repo (default: here)")
    rep.add_argument("--out", default="reports", help="folder for experiments.md/.json/.png")
    rep.add_argument("--system", default="student_onnx",
                     help="evaluated system to compare (default: student_onnx)")
    rep.add_argument("--all-commits", action="store_true",
                     help="every commit and its experiments, not only HEAD's (dvc exp show -A)")
    args = parser.parse_args(argv)

    if args.command == "report":
        from components.report import write_experiments_report

        try:
            path = write_experiments_report(args.repo, args.out, args.system, args.all_commits)
        except RuntimeError as err:
            print(f"still report: {err}", file=sys.stderr)
            return 2
        print(path.read_text(), end="")
        print(f"written: {path} (+ experiments.json, experiments.png)")
        return 0
    try:
        params = load_params(args.params, _overrides(args.sets))
    except ParamsError as err:
        print(f"still: {err}", file=sys.stderr)
        return 2
    problems = teacher_problems(params, Path(args.params).resolve().parent)
    if problems:
        print(f"still: {args.params} has {len(problems)} problem(s):\n"
              + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.params}: ok ({len(params.to_dict())} sections)")
        return 0
    cmd = dvc_command(args.sets)
    print("+", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
