"""`still`: the command line.

    still validate [--set key=value ...]   check params.yaml (+ overrides), list every problem
    still repro [--set key=value ...]      plain DVC: `dvc repro`, or `dvc exp run -S ...`
    still run [--set key=value ...] [--name N] [--pull] [--push]
                                           the Prefect pipeline flow (a task per DVC stage)
    still sweep --grid key=v1,v2 [--grid ...] [--max-parallel 2]
                                           the Prefect sweep flow (DVC experiments)
    still search [--n-trials 12] [--max-parallel 1] [--apply]
                                           the Prefect search flow: the student for this data,
                                           chosen on validation (DVC experiments, Optuna)
    still serve [--repo .]                 serve the nightly, sweep and search deployments
    still report [--repo .] [--out reports] [--system student_onnx]
                                           one table + plot across DVC experiments
    still predict --bundle DIR "text" ["text" ...] [--cascade]
    still predict --bundle DIR --input FILE --output preds.jsonl [--cascade]
                                           label + probability per text, from a shipped bundle
    still triton --bundle DIR --out REPO   a Triton model repository for the bundle's student

The pipeline order lives only in dvc.yaml: this CLI runs DVC (directly or through the Prefect
flows), never the stage functions.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from components.config import (
    DEFAULT_PARAMS,
    Params,
    ParamsError,
    layer_map_problem,
    load_params,
    parse_override,
    teacher_layer_count,
)
from components.data.locations import resolve_location
from components.stage import StageError


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


def predict(args: argparse.Namespace) -> int:
    import json

    from components.serving.bundle import load_bundle

    if bool(args.texts) == bool(args.input):
        raise StageError("give texts to classify, or --input FILE --output FILE (not both)")
    if args.input and not args.output:
        raise StageError("--input needs --output FILE (JSON lines, one per usable row)")
    if args.batch_size is not None and args.batch_size < 1:
        raise StageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    bundle = load_bundle(args.bundle, threads=args.threads)
    if args.texts:
        for answer in bundle.predict(args.texts, cascade=args.cascade,
                                     batch_size=args.batch_size):
            print(json.dumps(answer))
        return 0
    from components.serving.predict import predict_file

    summary = predict_file(bundle, args.input, args.output, cascade=args.cascade,
                           text_column=args.text_column, fmt=args.format,
                           on_bad_rows=args.on_bad_rows, batch_size=args.batch_size)
    line = (f"still predict: {summary['predicted']} texts -> {summary['output']} in "
            f"{summary['seconds']:.1f} s ({summary['texts_per_s'] or 0:.1f} texts/s)")
    if args.cascade:
        line += f", {100 * summary['deferred_fraction']:.1f}% answered by the teacher"
    print(line, file=sys.stderr)
    if summary["left_out"]:
        print(f"still predict: rows left out: {summary['left_out_described']}", file=sys.stderr)
    return 0


def triton(args: argparse.Namespace) -> int:
    from components.serving.bundle import load_bundle
    from components.serving.triton_repo import write_triton

    folder = write_triton(load_bundle(args.bundle), args.out, args.name, args.model,
                          args.max_batch_size)
    print(f"still triton: {folder} (config.pbtxt, 1/model.onnx, labels.txt); serve with "
          f"`tritonserver --model-repository {Path(args.out)}`")
    return 0


FLOW_COMMANDS = {"run": "flows.pipeline", "sweep": "flows.sweep", "search": "flows.search",
                 "serve": "flows.deploy"}


def build_parser() -> argparse.ArgumentParser:
    """`still`'s commands and their options."""
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
    pred = sub.add_parser("predict", help="classify texts with a bundle (dvc repro ships one)")
    pred.add_argument("texts", nargs="*", help="texts to classify (or --input FILE)")
    pred.add_argument("--bundle", default="artifacts/bundle",
                      help="bundle folder (default: artifacts/bundle, where the ship stage "
                           "writes it)")
    pred.add_argument("--input", help="csv/tsv/jsonl/parquet file or fsspec URI of texts")
    pred.add_argument("--output", help="JSON lines out, one per usable input row (with --input)")
    pred.add_argument("--cascade", action="store_true",
                      help="student first, the teacher below the validation-chosen threshold")
    pred.add_argument("--text-column", default="text")
    pred.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl",
                                                           "parquet"])
    pred.add_argument("--on-bad-rows", default="skip", choices=["skip", "error"],
                      help="skip (count and name them, default) or error (stop)")
    pred.add_argument("--batch-size", type=int, default=None,
                      help="default: the batch size evaluate measured (bundle.json)")
    pred.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    tri = sub.add_parser("triton", help="write a Triton model repository for a bundle")
    tri.add_argument("--bundle", default="artifacts/bundle")
    tri.add_argument("--out", required=True, help="model repository folder")
    tri.add_argument("--name", default="still_student")
    tri.add_argument("--model", default=None,
                     help="student_onnx, student_onnx_int8 or student_onnx_static_int8 "
                          "(default: the bundle's)")
    tri.add_argument("--max-batch-size", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FLOW_COMMANDS:
        # The flow modules own their options; `serve` is `flows.deploy serve`.
        import importlib

        module = importlib.import_module(FLOW_COMMANDS[argv[0]])
        return module.main(argv if argv[0] == "serve" else argv[1:]) or 0

    args = build_parser().parse_args(argv)

    if args.command in ("predict", "triton"):
        try:
            return (predict(args) if args.command == "predict" else triton(args))
        except StageError as err:
            print(f"still {args.command}: {err}", file=sys.stderr)
            return 2
    if args.command == "report":
        from components.reporting.experiments import write_experiments_report

        try:
            path = write_experiments_report(args.repo, args.out, args.system, args.all_commits)
        except RuntimeError as err:
            print(f"still report: {err}", file=sys.stderr)
            return 2
        print(path.read_text(), end="")
        print(f"written: {path} (+ experiments.json, experiments.png)")
        return 0
    return params_command(args)


def params_command(args: argparse.Namespace) -> int:
    """`still validate` and `still repro`: params.yaml and overrides checked, then the DVC
    pipeline run (an experiment with --set)."""
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
