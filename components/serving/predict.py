"""Using a bundle from the command line: predictions for a file, and a Triton model repository.

`predict_file` reads a csv/tsv/jsonl/parquet file (any fsspec URI) with the same readers and
the same row checks as prepare (`components.data.rows`): a malformed record, undecodable bytes, a
missing or empty text is counted by reason with its location and left out (or stops the run
with `on_bad_rows="error"`); every other row gets one JSON line in `output`, with its origin
("file:line"), in input order. It streams: rows are read, predicted (the bundle's `Predictor`,
the one prediction path) and written one batch at a time, so memory does not grow with the
file; with the cascade, the texts the student defers are gathered over a few batches into full
teacher batches (`Predictor.stream`). The
output appears only when complete: it is written to a temporary file beside it, renamed at
the end, and removed on any failure. With `on_bad_rows="error"` the run stops at the first bad
row, before any output appears. The progress bar counts rows and rows/s without a total (the
number of rows of a csv or jsonl file is only known once it is read).

`write_triton` lays out a Triton Inference Server model repository for the bundle's student:
`<out>/<name>/config.pbtxt` (ONNX Runtime backend, dynamic batch and sequence axes, dynamic
batching, the label file for Triton's classification extension) and `<out>/<name>/1/model.onnx`.
Tokenisation stays with the client (`student/tokenizer.json` + `preprocessing.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.data.cleaning import text_problem
from components.data.files import atomic_dir
from components.data.readers import stream_source
from components.data.rows import Reader, Rows, describe_drops
from components.serving.bundle import LABELS, MODEL_FILES, Bundle, BundleError
from components.stage import StageError

# The row problems prepare also counts (components.data.rows); any of them with on_bad_rows=error
# stops the run.
BAD_ROWS = ("malformed", "not_utf8", "missing_field", "missing_text", "empty_text")


def _refuse_bad_rows(source: str, tally: Rows) -> None:
    if any(tally.dropped.get(reason) for reason in BAD_ROWS):
        raise StageError(f"--input={source!r}: bad rows with --on-bad-rows error: "
                         f"{describe_drops(tally)}. Fix the file, or use --on-bad-rows skip "
                         "to leave them out (they are counted and named)")


def predict_file(bundle: Bundle, source: str, output: str | Path, cascade: bool = False,
                 text_column: str = "text", fmt: str = "auto", on_bad_rows: str = "skip",
                 batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Predict every usable row of `source` into `output` (JSON lines), batch by batch;
    returns a summary (`seconds` and `texts_per_s` cover reading, predicting and writing)."""
    from tqdm.auto import tqdm

    reader = Reader("--input", fmt, text_column, None, 60.0, option="--{}", who="predict")
    _, _, tally, stream = stream_source(source, reader, ("csv", "tsv", "jsonl", "parquet"))
    strict = on_bad_rows == "error"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    bs = batch_size or bundle.batch_size
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.tmp-")
    predicted = deferred = 0
    start = time.perf_counter()
    predictor = bundle.predictor(cascade)
    origins: deque[list[str]] = deque()  # the origins of the batches handed to the predictor

    def batches() -> Iterator[list[str]]:
        texts: list[str] = []
        for text, _, origin in stream:
            problem = text_problem(text, 1)
            if problem:
                tally.drop(problem, origin)
            if strict:  # the reader counts the rows it cannot parse in the same tally
                _refuse_bad_rows(source, tally)
            if problem:
                continue
            texts.append(text)
            if len(texts) == 1:  # a new batch
                origins.append([])
            origins[-1].append(origin)
            if len(texts) == bs:
                yield texts
                texts = []
        if strict:  # a bad row after the last good one
            _refuse_bad_rows(source, tally)
        if texts:
            yield texts

    try:
        with os.fdopen(fd, "w") as fh, tqdm(unit="text", desc="predict",
                                            disable=not progress) as bar:
            # The predictor may hold a few batches back (the cascade gathers the texts it
            # defers into full teacher batches); answers come back in input order.
            for answers in predictor.stream(batches(), cascade, bs):
                for origin, answer in zip(origins.popleft(), answers, strict=True):
                    fh.write(json.dumps({"origin": origin, **answer}) + "\n")
                    deferred += answer.get("answered_by") == "teacher"
                predicted += len(answers)
                bar.update(len(answers))
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    summary = {"predicted": predicted, "left_out": dict(sorted(tally.dropped.items())),
               "left_out_examples": dict(sorted(tally.examples.items())),
               "left_out_described": describe_drops(tally),
               "seconds": seconds, "texts_per_s": predicted / seconds if seconds else None,
               "output": str(output)}
    if cascade:
        summary["deferred_fraction"] = deferred / predicted if predicted else 0.0
    return summary


# ------------------------------------------------------------------------------ Triton

def triton_config(name: str, labels: int, max_batch_size: int,
                  label_file: str = "labels.txt") -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for a still ONNX student."""
    preferred = sorted({b for b in (max(1, max_batch_size // 4), max_batch_size) if b >= 1})
    inputs = "\n".join(
        f'  {{\n    name: "{n}"\n    data_type: TYPE_INT64\n    dims: [ -1 ]\n  }}'
        + ("," if i == 0 else "") for i, n in enumerate(("input_ids", "attention_mask")))
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\n"
            f'output [\n  {{\n    name: "logits"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {labels} ]\n    label_filename: "{label_file}"\n  }}\n]\n'
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]"
            f"\n  max_queue_delay_microseconds: 2000\n}}\n"
            "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n")


def write_triton(bundle: Bundle, out: str | Path, name: str = "still_student",
                 model: str | None = None, max_batch_size: int | None = None) -> Path:
    """A Triton model repository for one student graph of `bundle`; returns the model folder.
    An existing model folder of that name is replaced whole, only once the new one is
    complete."""
    model = model or bundle.model_name
    if model not in MODEL_FILES or not model.startswith("student"):
        raise BundleError(f"--model {model!r}: pick one of the bundle's student graphs "
                          f"({', '.join(m for m in bundle.manifest['models'] if 'student' in m)})")
    src = bundle.folder / MODEL_FILES[model]
    if not src.is_file():
        raise BundleError(f"{src}: not in this bundle")
    out = Path(out)
    final = out / name
    if final.exists() and not (final / "config.pbtxt").is_file():
        raise BundleError(f"{final} exists and is not a Triton model folder (no config.pbtxt); "
                          "refusing to replace it: pick another --out or --name")
    with atomic_dir(final) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / "model.onnx")
        (tmp / "labels.txt").write_text("\n".join(bundle.labels) + "\n")
        (tmp / "config.pbtxt").write_text(triton_config(
            name, len(bundle.labels), max_batch_size or bundle.batch_size))
        for side in ("tokenizer.json", "preprocessing.json"):  # what the client needs
            shutil.copyfile(bundle.folder / "student" / side, tmp / side)
        shutil.copyfile(bundle.folder / LABELS, tmp / LABELS)
    return final
