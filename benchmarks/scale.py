"""How the data stages and `still predict` scale with the number of rows: wall time, examples/s
and peak memory of prepare, tokenizer, teacher_cache (the teacher's cached outputs) and one distill
epoch at N = 20k, 100k and 200k synthetic labelled rows (issue 16), and of `still predict --input`
on N = 10k, 100k and 1M rows (issue 27). The targets: every stage's peak RSS at the largest N within
1.5x of the smallest N's, and its net examples/s within 20% across N.

Data: N rows of `CLASSES` classes, texts of 40-80 words (uniform) drawn from a seeded generator:
Zipf-distributed words shared by all classes, a quarter of the words from a class's own words
(so the task is learnable), about 1% exact copies of an earlier row (prepare drops them). Rows
come in blocks of 1000 generated from (seed, block), so a smaller N is a prefix of a larger one
and every N has the same text length distribution. Written as CSV, the format prepare streams.

Models: the tests' tiny teacher (`tests/conftest.py make_tiny_teacher`: 2 layers of 32, its own
small WordPiece tokenizer) given a seeded, untrained classification head for the synthetic
labels, built once into `--out/teacher` and copied into every project (the teacher stage, the
fine-tuning, is not measured: teacher_cache only runs the teacher). The params are the production
params.yaml shrunk as the tests shrink it (`tiny_raw_params`: the 1-layer, 32-wide student
reading 32 tokens, teacher at 32 tokens), then `SCALE_OVERRIDES`: a 2000-token BPE tokenizer
without the cost curve, one distill epoch at batch 32, windows on with one 24-word window per
training text (so teacher_cache and distill see about twice the training texts), tracking disabled,
2 threads.

predict: `python -m components.cli predict --input <N rows>.csv --output predictions.jsonl`
with a bundle the same tiny pipeline ships (prepare, tokenizer, teacher_cache, distill, export,
evaluate, ship run once as processes on `BUNDLE_ROWS` rows into `--out/bundle/`, reused when
present; or `--bundle DIR`): the texts of the same synthetic CSV, the student's ONNX INT8 graph at
the bundle's batch size (32), ONNX Runtime on all cores. Its examples are the lines it wrote.

Each N gets a scratch project `--out/<N>/` (params.yaml, the CSV, the stages' outputs) and every
stage runs there as its own process, `python -m components.<stage>`, as DVC runs it, so the
harness only depends on the stages' entry points and on the counts they write. Measured per
stage and N:
- wall s: time.perf_counter around the stage process (in the launcher below), interpreter
  start and imports included; a run under `REPEAT_UNDER_S` is repeated (`--repeats`, the stage
  replaces its output) and the median kept, since a few seconds move by tenths from run to run;
- examples: prepare = rows read, tokenizer = training rows, teacher_cache = examples the teacher ran
  over (every split + the training windows), distill = training examples of the epoch (the
  wall time also holds its validation pass and the save);
- ex/s = examples / wall s; net ex/s = (examples(N) - examples(N0)) / (wall(N) - wall(N0)) with
  N0 = `--baseline` rows run the same way, which takes out the fixed cost of a process
  (imports, model load) that makes a small N look slow. The throughput target uses net ex/s;
- peak RSS: ru_maxrss of the stage process, from os.wait4 in a small launcher process that
  starts it (`LAUNCHER`: Linux carries a parent's peak into a child, so the stage is not started
  from this harness; the launcher's own ~10 MiB is the floor). A process the stage started and
  waited for counts by its own peak (the larger of the two), never added; none is started here
  (one process: no DDP, no DataLoader workers).
The table's last columns are ratios to the smallest N; one PASS/MISS line per stage follows, and
everything is written to `--out/results.json` (stage logs in `--out/logs/<N>/`). Without
`--keep`, each N's project is removed once measured (a failed one is kept).

    python benchmarks/scale.py [--sizes 20000 100000 200000] [--baseline 1000]
        [--stages prepare tokenizer teacher_cache distill] [--out artifacts/benchmarks/scale]
        [--keep] [--repeats 3]
    python benchmarks/scale.py --stages predict --sizes 10000 100000 1000000 [--bundle DIR]

`--code DIR` runs the measured processes from another checkout of the project (the harness,
data and bundle stay this one's): a before/after comparison on the same data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from components.config import load_params
from components.data.artifacts import REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "tokenizer", "teacher_cache", "distill")  # the dvc.yaml order, teacher aside
COMMANDS = ("predict",)  # measured on a shipped bundle, after the stages asked for
MEASURED = STAGES + COMMANDS
BUNDLE_STAGES = ("prepare", "tokenizer", "teacher_cache", "distill", "export", "evaluate", "ship")
BUNDLE_ROWS = 2000  # synthetic rows the bundle's tiny pipeline trains on
PREDICTIONS = "predictions.jsonl"
RSS_TARGET = 1.5  # peak RSS at the largest N over the smallest N's, at most
RATE_TOLERANCE = 0.2  # net ex/s at every N within this fraction of the smallest N's
REPEAT_UNDER_S = 20.0  # measured stages that ran shorter than this are run `--repeats` times
SEED = 0

# Synthetic data.
CLASSES = 4
SHARED_WORDS = 4000  # words of every class, Zipf-distributed
CLASS_WORDS = 100  # words of one class only
TOPIC_RATE = 0.25  # fraction of a text's words drawn from its class's own words
MIN_WORDS, MAX_WORDS = 40, 80
DUPLICATE_RATE = 0.01
BLOCK = 1000  # rows per seeded block: a smaller N is a prefix of a larger one

# On top of the tests' tiny params (tests/conftest.py tiny_raw_params).
SCALE_OVERRIDES = {
    "trainer.accelerator": "cpu",
    "trainer.num_threads": 2,
    "tracking.mode": "disabled",
    "tokenizer.type": "bpe",
    "tokenizer.vocab_size": 2000,
    "tokenizer.min_frequency": 2,
    "tokenizer.curve_vocab_sizes": [],
    "teacher.eval_batch_size": 64,
    "distill.epochs": 1,
    "distill.batch_size": 32,
    # Windows start at word `stride` and need `words / 2` words: a 40-80 word text has exactly
    # one, so teacher_cache and distill see about twice the training texts.
    "distill.windows.enabled": True,
    "distill.windows.words": 24,
    "distill.windows.stride": 24,
    "distill.windows.max_per_text": 1,
}
# And for the bundle predict runs: the production deployment batch size (what predict uses).
BUNDLE_OVERRIDES = {"evaluate.throughput_batch_size": 32}


def _conftest():
    """tests/conftest.py, for the tests' tiny teacher and params (the tests are no package
    installed with `still`, so the project root goes on sys.path)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import conftest

    return conftest


def vocabulary(seed: int) -> np.ndarray:
    """SHARED_WORDS + CLASSES * CLASS_WORDS distinct pseudo-words (2-3 consonant-vowel
    syllables), the same for every N: shared words first, then each class's own."""
    rng = np.random.default_rng([seed, 1 << 20])
    syllables = np.array([c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"])
    words: dict[str, None] = {}  # insertion-ordered: a set's order changes run to run
    while len(words) < SHARED_WORDS + CLASSES * CLASS_WORDS:
        words["".join(rng.choice(syllables, rng.integers(2, 4)))] = None
    return np.array(list(words), dtype=object)


def block_rows(vocab: np.ndarray, seed: int, block: int) -> list[tuple[str, str]]:
    """BLOCK (text, label) rows from the generator seeded with (seed, block)."""
    rng = np.random.default_rng([seed, block])
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, BLOCK)
    labels = rng.integers(0, CLASSES, BLOCK)
    total = int(lengths.sum())
    zipf = 1.0 / np.arange(1, SHARED_WORDS + 1)
    shared = rng.choice(SHARED_WORDS, total, p=zipf / zipf.sum())
    topical = rng.random(total) < TOPIC_RATE
    own = rng.integers(0, CLASS_WORDS, total)
    copy = rng.random(BLOCK) < DUPLICATE_RATE
    rows: list[tuple[str, str]] = []
    start = 0
    for i, n in enumerate(lengths):
        end = start + int(n)
        if copy[i] and rows:
            rows.append(rows[int(rng.integers(0, len(rows)))])
        else:
            class_ids = SHARED_WORDS + labels[i] * CLASS_WORDS + own[start:end]
            ids = np.where(topical[start:end], class_ids, shared[start:end])
            rows.append((" ".join(vocab[ids]), f"class_{labels[i]}"))
        start = end
    return rows


def write_csv(path: Path, n: int, seed: int = SEED) -> None:
    vocab = vocabulary(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for block in range(-(-n // BLOCK)):
            writer.writerows(block_rows(vocab, seed, block)[:n - block * BLOCK])


def label_names() -> list[str]:
    """The class names prepare will find, in its (sorted) order."""
    return sorted(f"class_{c}" for c in range(CLASSES))


def build_teacher(folder: Path, seed: int = SEED) -> Path:
    """The tests' tiny teacher with a seeded, untrained head for the synthetic labels, saved as
    the teacher stage saves one (Hugging Face folder + fast tokenizer); reused when present."""
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("num_labels") == CLASSES:
        return folder
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from components.models.teacher import with_head

    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        bare = _conftest().make_tiny_teacher(Path(tmp) / "bare")
        torch.manual_seed(seed)
        model = with_head(str(bare), label_names())
        staged = Path(tmp) / "teacher"
        model.hf.save_pretrained(staged, safe_serialization=True)
        AutoTokenizer.from_pretrained(bare).save_pretrained(staged)
        os.replace(staged, folder)
    return folder


def make_project(project: Path, n: int, teacher: Path, **overrides):
    """A scratch project for N rows: the CSV, params.yaml and the teacher in `paths.teacher`."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    source = project / "source.csv"
    started = time.perf_counter()
    write_csv(source, n)
    print(f"N={n}: {source} written in {time.perf_counter() - started:.1f} s "
          f"({source.stat().st_size / 1e6:.1f} MB)", flush=True)
    raw = _conftest().tiny_raw_params(None, source.resolve(), teacher.resolve(),
                                      **SCALE_OVERRIDES, **overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")  # a bad key stops here, named
    shutil.copytree(teacher, project / params.paths.teacher)
    return params


class StageFailed(Exception):
    pass


# Starts the stage and reports its wall time and rusage. Linux keeps a process's peak RSS across
# exec, and the peak a child inherits is its parent's (vfork) or its parent's memory at fork: a
# stage started from this harness (numpy, pandas, torch after the teacher build) would report at
# least the harness's peak. Started from this small interpreter (no site, nothing imported
# beyond the standard library's few modules), a stage's ru_maxrss is its own plus ~10 MiB.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "wall_s": wall,
               "maxrss_kib": usage.ru_maxrss}, f)
"""


def build_bundle(folder: Path, teacher: Path, code: Path = ROOT) -> Path:
    """A bundle shipped by the tiny pipeline on BUNDLE_ROWS synthetic rows (every stage a
    process, as DVC runs them), in `folder`; reused when present."""
    if (folder / "bundle.json").is_file():
        return folder
    project = folder.parent / "bundle-project"
    params = make_project(project, BUNDLE_ROWS, teacher, **BUNDLE_OVERRIDES)
    started = time.perf_counter()
    for stage in BUNDLE_STAGES:
        run_stage(stage, project, project / "logs", code)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(project / params.paths.bundle, folder)
    shutil.rmtree(project)
    print(f"bundle: {folder} shipped in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def run_stage(stage: str, project: Path, logs: Path, code: Path = ROOT) -> tuple[float, float]:
    """Run `python -m components.<stage>` in `project` (through LAUNCHER); its wall seconds and
    peak RSS in MiB."""
    return run_process(stage, ["-m", f"components.{stage}"], project, logs, code)


def run_predict(project: Path, bundle: Path, logs: Path, code: Path = ROOT) -> tuple[float, float]:
    """`still predict` on the project's CSV with `bundle` (through LAUNCHER)."""
    return run_process("predict", ["-m", "components.cli", "predict", "--bundle", str(bundle),
                                   "--input", "source.csv", "--output", PREDICTIONS],
                       project, logs, code)


def run_process(name: str, args: list[str], project: Path, logs: Path,
                code: Path = ROOT) -> tuple[float, float]:
    """Run `python <args>` in `project` with the project code of `code` first on the path
    (through LAUNCHER); its wall seconds and peak RSS in MiB."""
    logs.mkdir(parents=True, exist_ok=True)
    pythonpath = [str(code), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "WANDB_MODE": "disabled",
           "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    out, err, usage = (logs / f"{name}.{x}" for x in ("out", "err", "rusage.json"))
    usage.unlink(missing_ok=True)
    cmd = [sys.executable, "-S", "-c", LAUNCHER, str(usage), sys.executable, *args]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        # Its own session, so that an interrupted run stops the stage too.
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)
        try:
            proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    result = json.loads(usage.read_text()) if usage.is_file() else {"exit": proc.returncode}
    if result["exit"] or proc.returncode:
        tail = err.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-25:]
        raise StageFailed(f"{name} exited with status {result['exit']} in {project}; the end "
                          f"of its stderr ({err}):\n    " + "\n    ".join(tail))
    return result["wall_s"], result["maxrss_kib"] / 1024  # KiB on Linux


def count_examples(stage: str, project: Path, params) -> int | None:
    """The examples `stage` went through, from the counts the stages write (None when the
    count is not where it used to be)."""
    def read(folder: str, name: str) -> dict:
        return json.loads((project / folder / name).read_text())

    try:
        if stage == "predict":  # one JSON line per text predicted
            return count_lines(project / PREDICTIONS)
        return _count(stage, read, params)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _count(stage: str, read, params) -> int:
    splits = read(params.paths.data, REPORT_FILE)["splits"]
    if stage == "prepare":
        return read(params.paths.data, REPORT_FILE)["rows_read"]
    if stage == "tokenizer":
        return splits["train"]["examples"]
    if stage == "teacher_cache":
        windows = read(params.paths.teacher_outputs, "metrics.json").get("windows", 0)
        return sum(s["examples"] for s in splits.values()) + windows
    return read(params.paths.student, "metrics.json")["train_examples"]


def measure(n: int, args, teacher: Path, bundle: Path | None, role: str) -> list[dict]:
    """Every stage up to the last one asked for, then predict if asked for, at N rows; one row
    per stage or command asked for."""
    project = args.out / str(n)
    params = make_project(project, n, teacher)
    last = max((STAGES.index(s) for s in args.stages if s in STAGES), default=-1)
    logs = args.out / "logs" / str(n)
    runs = [(stage, lambda stage=stage: run_stage(stage, project, logs, args.code))
            for stage in STAGES[:last + 1]]
    if "predict" in args.stages:
        runs.append(("predict", lambda: run_predict(project, bundle, logs, args.code)))
    rows = []
    for stage, run in runs:
        wall, rss = run()
        if stage in args.stages and wall < REPEAT_UNDER_S and args.repeats > 1:
            # A run of a few seconds moves by tenths of a second from one start to the next
            # (scheduling, disk cache): rerun it (the stage replaces its output) and keep the
            # median wall time and the largest peak.
            again = [(wall, rss)] + [run() for _ in range(args.repeats - 1)]
            wall = float(np.median([w for w, _ in again]))
            rss = max(r for _, r in again)
        examples = count_examples(stage, project, params)
        if examples is None:
            print(f"N={n}: {stage} wrote no count of its examples where expected; using N")
        examples_from = "N" if examples is None else "stage"
        examples = n if examples is None else examples
        if stage not in args.stages:
            print(f"N={n:<7} {stage:<9} (not measured) {wall:.1f} s", flush=True)
            continue
        rows.append({"stage": stage, "n": n, "role": role, "examples": examples,
                     "examples_from": examples_from, "wall_s": wall,
                     "ex_per_s": examples / wall, "peak_rss_mib": rss})
        print(f"N={n:<7} {stage:<9} {examples:>8} examples in {wall:7.1f} s = "
              f"{examples / wall:9.0f} ex/s, peak RSS {rss:7.1f} MiB", flush=True)
    if not args.keep:
        shutil.rmtree(project)
    return rows


def add_ratios(rows: list[dict], sizes: list[int]) -> None:
    """Net ex/s against the baseline row of the same stage, and the ratios to the smallest N."""
    for stage in MEASURED:
        base = next((r for r in rows if r["stage"] == stage and r["role"] == "baseline"), None)
        measured = [r for r in rows if r["stage"] == stage and r["role"] == "size"]
        for r in measured:
            dt = r["wall_s"] - base["wall_s"] if base else 0.0
            r["net_ex_per_s"] = (r["examples"] - base["examples"]) / dt if dt > 0 else None
        first = next((r for r in measured if r["n"] == min(sizes)), None)
        for r in measured:
            r["rss_vs_first"] = r["peak_rss_mib"] / first["peak_rss_mib"] if first else None
            key = "net_ex_per_s" if base else "ex_per_s"
            r["rate_vs_first"] = (r[key] / first[key] if first and r[key] and first[key]
                                  else None)


def verdicts(rows: list[dict], has_baseline: bool) -> dict[str, dict]:
    out = {}
    for stage in MEASURED:
        measured = sorted((r for r in rows if r["stage"] == stage and r["role"] == "size"),
                          key=lambda r: r["n"])
        if len(measured) < 2:
            continue
        rss = measured[-1]["rss_vs_first"]
        rates = [r["rate_vs_first"] for r in measured]
        # None: some N ran no longer than the baseline, so its net rate means nothing
        rate_ok = (None if None in rates
                   else all(abs(x - 1) <= RATE_TOLERANCE for x in rates))
        out[stage] = {"rss_ratio": rss, "rss_pass": rss <= RSS_TARGET,
                      "rate_ratios": rates, "rate_pass": rate_ok,
                      "rate_basis": "net" if has_baseline else "raw",
                      "sizes": [r["n"] for r in measured]}
    return out


def _f(x, spec: str, width: int, unit: str = "") -> str:
    return f"{'-':>{width + len(unit)}}" if x is None else f"{x:>{width}{spec}}{unit}"


def _verdict(ok: bool | None) -> str:
    return "n/a (an N ran no longer than the baseline)" if ok is None else (
        "PASS" if ok else "MISS")


def report(rows: list[dict], checks: dict[str, dict], args) -> None:
    basis = "net ex/s" if args.baseline else "ex/s (no baseline: raw)"
    print(f"\nwall s: the stage process from start to exit (imports included); ex/s = examples"
          f" / wall s;\nnet ex/s = (examples - baseline's) / (wall s - baseline's), the baseline"
          f" being N0={args.baseline} rows (marked b): the fixed cost of a process taken out;\n"
          f"peak RSS: ru_maxrss of the stage process (os.wait4 in a small launcher; a child the "
          f"stage waited for would count by its own peak, not added; none is started here);\n"
          f"'vs N1': ratio to the smallest N (rate: {basis})")
    print(f"{'stage':<10}{'N':>9}{'examples':>10}{'wall s':>9}{'ex/s':>10}{'net ex/s':>10}"
          f"{'RSS MiB':>9}{'RSS vs N1':>11}{'rate vs N1':>12}")
    for r in rows:
        mark = "b" if r["role"] == "baseline" else " "
        print(f"{r['stage']:<10}{r['n']:>8}{mark}{r['examples']:>10}{r['wall_s']:>9.1f}"
              f"{r['ex_per_s']:>10.0f}{_f(r.get('net_ex_per_s'), '.0f', 10)}"
              f"{r['peak_rss_mib']:>9.1f}{_f(r.get('rss_vs_first'), '.2f', 10, 'x')}"
              f"{_f(r.get('rate_vs_first'), '.2f', 11, 'x')}")
    print()
    for stage, c in checks.items():
        rates = ", ".join("-" if x is None else f"{x:.2f}" for x in c["rate_ratios"])
        print(f"{stage:<10} peak RSS N={c['sizes'][-1]} / N={c['sizes'][0]}: "
              f"{c['rss_ratio']:.2f}x (target <= {RSS_TARGET}): "
              f"{_verdict(c['rss_pass'])}; {c['rate_basis']} ex/s vs "
              f"N={c['sizes'][0]}: {rates} (target {1 - RATE_TOLERANCE:.1f}-"
              f"{1 + RATE_TOLERANCE:.1f}): {_verdict(c['rate_pass'])}")


def save(rows: list[dict], checks: dict, args, complete: bool) -> Path:
    path = args.out / "results.json"
    path.write_text(json.dumps({
        "complete": complete, "sizes": args.sizes, "baseline": args.baseline,
        "stages": args.stages, "rows": rows, "verdicts": checks,
        "targets": {"rss_ratio_max": RSS_TARGET, "rate_tolerance": RATE_TOLERANCE},
        "overrides": SCALE_OVERRIDES, "seed": SEED, "cpus": os.cpu_count(),
        "code": str(args.code), "bundle": str(args.bundle or args.out / "bundle"),
        "python": platform.python_version(), "machine": platform.machine(),
    }, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 200000])
    parser.add_argument("--baseline", type=int, default=1000,
                        help="rows of the fixed-cost run behind net ex/s (0: none)")
    parser.add_argument("--stages", nargs="+", choices=MEASURED, default=list(STAGES),
                        help="stages to measure (earlier ones still run, unmeasured); predict "
                             "needs none of them")
    parser.add_argument("--bundle", type=Path,
                        help="the bundle predict uses (default: one the tiny pipeline ships "
                             "into --out/bundle, built once)")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="run the measured processes from this checkout (before/after)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "benchmarks" / "scale")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"runs of a measured stage that took under {REPEAT_UNDER_S} s "
                             "(median wall time, largest peak RSS); longer runs run once")
    parser.add_argument("--keep", action="store_true",
                        help="keep each N's project (data, outputs) after measuring it")
    args = parser.parse_args()
    args.sizes = sorted(set(args.sizes))
    if args.baseline and args.baseline >= args.sizes[0]:
        parser.error(f"--baseline {args.baseline} must be below the smallest size "
                     f"{args.sizes[0]} (or 0)")
    if min(args.sizes) < 20 * CLASSES or 0 < args.baseline < 20 * CLASSES:
        parser.error(f"use at least {20 * CLASSES} rows, so every class splits three ways")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher = build_teacher(args.out / "teacher")
    bundle = None
    if "predict" in args.stages:
        bundle = (args.bundle.resolve() if args.bundle
                  else build_bundle(args.out / "bundle", teacher))
    rows: list[dict] = []
    runs = ([(args.baseline, "baseline")] if args.baseline else []) + [
        (n, "size") for n in args.sizes]
    try:
        for n, role in runs:
            rows += measure(n, args, teacher, bundle, role)
    except StageFailed as err:
        add_ratios(rows, args.sizes)
        if rows:
            report(rows, {}, args)
        path = save(rows, {}, args, complete=False)
        sys.exit(f"\nscale: stopped: {err}\nthe measurements so far: {path}")
    add_ratios(rows, args.sizes)
    checks = verdicts(rows, bool(args.baseline))
    report(rows, checks, args)
    print(f"\nbenchmark wall time {(time.perf_counter() - started) / 60:.1f} min; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"written: {save(rows, checks, args, complete=True)}")


if __name__ == "__main__":
    main()
