"""The finalists timed side by side: each candidate's student exported to ONNX Runtime INT8
(parity-checked as the export stage does), timed with the best teacher runtime in one
round-robin run with evaluate's clock (`evaluation.timing.measure_time`: model time and end to
end, threads pinned), on the validation texts (timings do not depend on the split). The fastest
end to end wins, and only the winner is scored on test, once, after the choice.

    python -m components.search.timing --trials artifacts/search/<study> --names t0 t3 --out F
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path

from components.data.files import write_json
from components.search import STUDENT_DIR
from components.stage import StageError, stage_main


def _student_system(params, name: str, folder: Path, out: Path, threads: int):
    """A trial's student as ONNX Runtime INT8 (exported here with the parity check, as the
    export stage does), ready to time beside the teacher."""
    from tokenizers import Tokenizer

    from components.data.artifacts import STUDENT_FP32, STUDENT_INT8, STUDENT_TOKENIZER
    from components.evaluation.flops import encoder_flops
    from components.evaluation.systems import System
    from components.exporting.onnx_export import export_model
    from components.exporting.parity import parity_batches
    from components.models import student as student_io
    from components.models.runtimes import TextEncoder, onnx_runner, ort_session

    model = student_io.load(folder)
    cfg = model.cfg
    encoder = TextEncoder(Tokenizer.from_file(str(folder / STUDENT_TOKENIZER)),
                          cfg.max_length, cfg.min_tokens())
    out.mkdir(parents=True, exist_ok=True)
    export_model(model, parity_batches(params, encoder), out, STUDENT_FP32, STUDENT_INT8,
                 params.export, cfg.heads, cfg.hidden)
    merge = {layer: cfg.merge_r for layer in cfg.merging_layers()}

    def flops(n: float) -> float:
        return encoder_flops(n, cfg.layers, cfg.hidden, cfg.intermediate, cfg.num_labels, merge)

    return System(name, "onnxruntime", "student",
                  onnx_runner(ort_session(out / STUDENT_INT8, threads)), encoder,
                  (out / STUDENT_INT8).stat().st_size,
                  sum(p.numel() for p in model.parameters()), flops)


def best_teacher(params) -> str:
    """The best teacher runtime evaluate chose on validation (results/metrics.json), when it
    is an exported ONNX graph; else the teacher's ONNX Runtime INT8 graph."""
    from components.data.artifacts import EXPORTED_GRAPHS, load_results

    results = load_results(params.paths) or {}
    chosen = results.get("best_teacher")
    return chosen if chosen in EXPORTED_GRAPHS else "teacher_onnx_int8"


def _teacher_system(params, name: str, threads: int):
    from tokenizers import Tokenizer

    from components.data.artifacts import EXPORTED_GRAPHS
    from components.evaluation.systems import System
    from components.models.runtimes import TextEncoder, onnx_runner, ort_session

    graph, tokenizer, _ = EXPORTED_GRAPHS[name]
    folder = Path(params.paths.export)
    if not (folder / graph).is_file():
        raise StageError(f"{folder / graph} not found: the search times its candidates "
                         "against the teacher's exported graph; run dvc repro export first")
    encoder = TextEncoder(Tokenizer.from_file(str(folder / tokenizer)), params.teacher.max_length)
    return System(name, "onnxruntime", "teacher",
                  onnx_runner(ort_session(folder / graph, threads)), encoder,
                  (folder / graph).stat().st_size, 0, lambda n: 0.0)


def time_candidates(params, trials_dir: Path, names: Iterable[str]) -> dict:
    """Export the named trials' students, time them with the best teacher runtime in one
    round-robin run (on the validation texts: timings do not depend on the split), pick the
    fastest end to end, and score that one on test."""
    from components.data.artifacts import load_label_names, load_split
    from components.evaluation.stats import Bootstrap
    from components.evaluation.systems import predict_split
    from components.evaluation.timing import measure_time
    from components.models.runtimes import pin_torch_threads
    from components.text.encoding import pin_tokenizer_threads

    threads = params.evaluate.num_threads
    pin_tokenizer_threads(threads)
    pin_torch_threads(threads)
    names = list(names)
    if not names:
        raise StageError("no candidate to time")
    teacher = best_teacher(params)
    with tempfile.TemporaryDirectory(prefix="still-search-") as tmp:
        systems = [_teacher_system(params, teacher, threads)]
        for name in names:
            folder = trials_dir / name / STUDENT_DIR
            if not folder.is_dir():
                raise StageError(f"{folder} not found: the trial's student was not kept")
            systems.append(_student_system(params, name, folder, Path(tmp) / name, threads))
        texts = load_split(params.paths, "validation")["text"].tolist()
        timings, _ = measure_time(systems, texts, params)
        winner = max(names, key=lambda n: timings[n]["throughput_per_s"])
        test = load_split(params.paths, "test")
        labels = test["label"].to_numpy()
        bs = params.evaluate.throughput_batch_size
        chosen = [s for s in systems if s.name == winner]
        preds = predict_split(chosen, test["text"].tolist(), bs)[winner].argmax(-1)
        boot = Bootstrap(labels, len(load_label_names(params.paths)),
                         params.evaluate.bootstrap, params.seed)
    keep = ("throughput_per_s", "throughput_iqr", "model_throughput_per_s",
            "tokenize_ms_per_example", "ms_per_example", "latency_p50_ms")
    ref = timings[teacher]["throughput_per_s"]
    return {
        "teacher": teacher,
        "timed": {n: {**{k: timings[n][k] for k in keep},
                      "speedup_vs_best_teacher": timings[n]["throughput_per_s"] / ref,
                      "model_speedup_vs_best_teacher": timings[n]["model_throughput_per_s"]
                      / timings[teacher]["model_throughput_per_s"]}
                  for n in [teacher, *names]},
        "winner": winner,
        "winner_test": {"accuracy": float((preds == labels).mean()),
                        "accuracy_ci": boot.scores(preds)["accuracy_ci"],
                        "examples": len(labels)},
        "rounds": params.evaluate.repeats,
        "timed_on": f"validation texts ({len(texts)}), batch {bs}, {threads} threads",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m components.search.timing",
                                 description="time the named trials' students with the teacher")
    ap.add_argument("--trials", required=True, help="folder holding one folder per trial")
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)

    def run(params) -> dict:
        result = time_candidates(params, Path(args.trials), args.names)
        write_json(Path(args.out), result)
        return result

    stage_main("search", run)


if __name__ == "__main__":
    main()
