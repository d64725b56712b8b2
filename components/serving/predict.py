"""`still predict --input`: a bundle's predictions for a file.

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
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.data.cleaning import text_problem
from components.data.readers import stream_source
from components.data.rows import Reader, Rows, describe_drops
from components.serving.bundle import Bundle
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
