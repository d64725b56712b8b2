"""prepare: load a labeled text dataset, clean it, split it, write Parquet.

Produces in `paths.data`: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`,
`label` (int id), `label_name`), `label_map.json`, `report.json` (counts per split and class,
every dropped row counted by reason with a few example locations, every merged label spelling,
every file or folder of a folder source that was not read, text length statistics, length
outliers and cut texts) and the resolved `params.json`. Running twice with the same params gives
byte-identical files.

Length: a text longer than `prepare.max_chars` (default 1,000,000 characters) is cut at the
last whitespace at or before it (at `max_chars` itself when there is none) and kept; report.json
`truncated` counts the kept texts cut and names a few with their length as read. A text is "far
longer than the rest" when it is more than OUTLIER_RATIO (20) times the median length of the
kept texts and more than OUTLIER_MIN_CHARS (10,000) characters (the median, unlike a mean or a
standard deviation, does not move with the outliers themselves; the floor keeps a paragraph
among tweets from counting): report.json `length_outliers` and the console give their count and
the longest OUTLIERS_SHOWN with their rows and lengths as read.

Bad rows (malformed CSV/JSONL records, undecodable bytes, missing fields, empty texts, missing
labels, classes too small to split) are dropped and counted when `prepare.on_bad_rows` is `skip`
(the default), or stop the stage with a message naming them when it is `error`. Exact
duplicates (after whitespace and case normalisation) are dropped and counted unless
`prepare.deduplicate` is false; with it, every copy of a text found under two labels is dropped
too (`conflicting_labels`). Every row read is kept or counted as dropped: `rows_read ==
rows_kept + sum(dropped)`. A CSV record that cannot be parsed (an unterminated quote, say) costs
only its first line: the lines after it are read again as records. Nothing is written unless
the whole stage succeeds: the previous output folder stays as it was. A source that cannot be
read at all (missing, not what its name or `prepare.format` says, truncated, a server that does
not answer within `prepare.timeout_s`) stops the stage with one message naming it.

Labels: a label is the class name after Unicode NFC normalisation and stripping of surrounding
whitespace; with `prepare.labels_casefold` (default) it is also case-folded ("SPAM", "Spam "
-> "spam"), with `prepare.labels_numeric` (default) a number is written one way ("1", "1.0",
"01" and the number 1 -> "1"). Each merge is listed in report.json `label_merges`. A label is
missing (dropped as `missing_label`) only when it is null, NaN, empty, or the text "nan" or
"null"; a class called "None" or "N/A" is a class.

Sources (`prepare.source`): any fsspec URI or local path to a csv/tsv/jsonl/parquet file (gzip
and friends inferred from the suffix) or to a folder with one sub-folder per class and one text
file per example; `hf:NAME` for a Hugging Face dataset (needs the `[hf]` extra and a network);
`pkg:MODULE/sub/path` for data shipped in an installed package. A folder source is never left:
symlinks are followed only to targets inside it, hidden files and folders (`.name`) are never
read, class folders named `_name` are skipped, and each entry left out is counted by reason
in report.json `skipped`. The readers live in `components.data.rows`, shared with `still predict
--input`, so a bad row is named the same way in both.

Streaming: memory does not grow with the dataset's texts. The reader (`components.data.rows`) yields
one row at a time (CSV/TSV record by record, JSONL line by line, Parquet and Hugging Face
datasets `BATCH_ROWS` rows at a time, a folder file by file) and the stage makes two passes:
1. clean each row as it comes (the rules above) and spill the usable ones, `BATCH_ROWS` at a
   time, to a temporary Parquet file beside the output folder, keeping in memory only a few
   numbers per row: its class, its length and a 128-bit hash of its deduplication key;
2. decide from those arrays alone which rows are conflicting, duplicate or of a too-small class,
   the label ids and the seeded split (the same `stratified_split` over the kept rows in source
   order), then stream the spill once more and append each kept row to its split's file.
Counts, examples, split contents and order are what loading everything at once gave; a split
of at most `BATCH_ROWS` rows is even the same bytes (one row group; a bigger split gets one
row group per `BATCH_ROWS` rows). The spill is removed when the stage ends, however it ends.

Run: `python -m components.prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import Params, Prepare
from components.data.artifacts import BATCH_ROWS, SPLITS, SplitWriter, write_prepared
from components.data.cleaning import (
    BAD_ROW_REASONS,
    _label_spelling,
    _normalise_for_dedup,
    clean_row,
    cut_at_word,
)
from components.data.files import atomic_dir
from components.data.readers import READ_BUFFER, stream_source
from components.data.rows import EXAMPLES_PER_REASON, Reader, Row, Rows, describe_drops
from components.data.splits import stratified_split
from components.stage import StageError, stage_main

# A kept text is "far longer than the rest" above both (see the module docstring).
OUTLIER_RATIO = 20
OUTLIER_MIN_CHARS = 10_000
OUTLIERS_SHOWN = 5


_SPILL_SCHEMA = pa.schema([("text", pa.large_string()), ("origin", pa.large_string())])


@dataclass
class _Cleaned:
    """What pass 1 leaves in memory: a few numbers per usable row, in source order (the texts
    themselves are in the spill file, row for row)."""

    classes: list[str]  # class code -> name, in order of first appearance
    codes: np.ndarray  # int32 class code per row
    lengths: np.ndarray  # int64 characters per (stripped, cut) text
    hashes: np.ndarray | None  # V16 digest of the dedup key per row (None: no deduplication)
    cut: np.ndarray  # int64 rows cut at prepare.max_chars, ascending
    cut_from: np.ndarray  # int64 their lengths before the cut
    tally: Rows  # drops of pass 1: the reader's first, then the cleaning's (see below)
    rows_read: int

    @property
    def n(self) -> int:
        return len(self.codes)


def _dedup_key(text: str) -> bytes:
    """A 128-bit digest of the normalised text, standing in for it in memory (16 bytes a row,
    whatever the text's length): equal texts get equal keys; two different texts among n share
    one with a probability below n**2 / 2**129 (1e-21 for a billion rows)."""
    return hashlib.blake2b(_normalise_for_dedup(text).encode("utf-8"), digest_size=16).digest()


def _clean_and_spill(stream: Iterator[Row], read: Rows, cfg: Prepare, spill: Path) -> _Cleaned:
    """Pass 1: clean the rows as they are read, `BATCH_ROWS` at a time; usable rows go to the
    `spill` Parquet file (text, origin), their class, length and dedup key to small arrays.
    `read` is the reader's tally, complete once `stream` is exhausted."""
    tally = Rows()
    classes: dict[str, int] = {}
    spellings: dict[str, set[str]] = {}
    parts: dict[str, list[np.ndarray]] = {"codes": [], "lengths": [], "hashes": []}
    texts: list[str] = []
    origins: list[str] = []
    codes: list[int] = []
    keys: list[bytes] = []
    cut: list[tuple[int, int]] = []  # (row, length before the cut)
    n_read = n_usable = 0
    with pq.ParquetWriter(spill, _SPILL_SCHEMA, compression="none",
                          use_dictionary=False) as writer:

        def flush() -> None:
            writer.write_table(pa.table([texts, origins], schema=_SPILL_SCHEMA))
            parts["codes"].append(np.array(codes, dtype=np.int32))
            parts["lengths"].append(np.array([len(t) for t in texts], dtype=np.int64))
            if cfg.deduplicate:
                parts["hashes"].append(np.frombuffer(b"".join(keys), dtype="V16"))
            for batch in (texts, origins, codes, keys):
                batch.clear()

        for text, label, origin in stream:
            n_read += 1
            problem, text, name = clean_row(text, label, cfg)
            if problem:
                tally.drop(problem, origin)
                continue
            if len(text) > cfg.max_chars:
                cut.append((n_usable, len(text)))
                text = cut_at_word(text, cfg.max_chars)
            n_usable += 1
            spellings.setdefault(name, set()).add(_label_spelling(label))
            texts.append(text)
            origins.append(origin)
            codes.append(classes.setdefault(name, len(classes)))
            if cfg.deduplicate:
                keys.append(_dedup_key(text))
            if len(texts) == BATCH_ROWS:
                flush()
        if texts:
            flush()

    # The reader's drops come first, then the cleaning's, as when the reader ran to the end
    # before cleaning began (the order decides which examples of a reason are reported).
    merged = Rows(dropped=Counter(read.dropped),
                  examples={k: list(v) for k, v in read.examples.items()},
                  skipped=Counter(read.skipped),
                  skipped_examples={k: list(v) for k, v in read.skipped_examples.items()})
    for reason, n in tally.dropped.items():
        merged.dropped[reason] += n
        merged.examples[reason] = (merged.examples.get(reason, [])
                                   + tally.examples[reason])[:EXAMPLES_PER_REASON]
    merged.label_merges = {name: sorted(s for s in spelled if s != name)
                           for name, spelled in sorted(spellings.items())
                           if spelled != {name}}

    def joined(key: str, dtype: str) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.zeros(0, dtype=dtype)

    cut_rows = np.array(cut, dtype=np.int64).reshape(-1, 2)
    return _Cleaned(classes=list(classes), codes=joined("codes", "int32"),
                    lengths=joined("lengths", "int64"),
                    hashes=joined("hashes", "V16") if cfg.deduplicate else None,
                    cut=cut_rows[:, 0], cut_from=cut_rows[:, 1],
                    tally=merged, rows_read=n_read + sum(read.dropped.values()))


def _deduplicate(cleaned: _Cleaned, spill: Path) -> np.ndarray:
    """Which rows survive deduplication (a bool per row), counting the others in the tally:
    a text seen under two labels is ambiguous and every copy of it is dropped as
    `conflicting_labels`; of the other texts the first copy is kept, later ones are
    `duplicate`s."""
    n, tally = cleaned.n, cleaned.tally
    _, first, group = np.unique(cleaned.hashes, return_index=True, return_inverse=True)
    first_code = cleaned.codes[first]
    conflict = np.zeros(len(first), dtype=bool)
    conflict[group[cleaned.codes != first_code[group]]] = True
    conflicting = conflict[group]
    kept = ~conflicting & (first[group] == np.arange(n))
    where = np.flatnonzero(conflicting)
    if len(where):
        shown = _spilled_origins(spill, where[:EXAMPLES_PER_REASON])
        for origin in shown:
            tally.drop("conflicting_labels", origin)
        tally.dropped["conflicting_labels"] += len(where) - len(shown)
    tally.dropped["duplicate"] += int(n - len(where) - kept.sum())
    return kept


def _spilled(spill: Path, column: str) -> Iterator[pa.RecordBatch]:
    """One column of the spill, `BATCH_ROWS` rows at a time. Read without pre-buffering:
    pyarrow would otherwise keep every batch read so far until the iteration ends."""
    with pq.ParquetFile(spill, pre_buffer=False, buffer_size=READ_BUFFER) as table:
        yield from table.iter_batches(batch_size=BATCH_ROWS, columns=[column])


def _spilled_origins(spill: Path, rows: np.ndarray) -> list[str]:
    """The origins of the spilled rows at the (ascending) positions `rows`, reading the
    spill's origin column only as far as the last of them."""
    found: list[str] = []
    start = 0
    for batch in _spilled(spill, "origin"):
        end = start + batch.num_rows
        inside = rows[(rows >= start) & (rows < end)] - start
        found += batch.column(0).take(pa.array(inside)).to_pylist()
        if len(found) == len(rows):
            break
        start = end
    return found


def _write_splits(out: Path, spill: Path, split_of: np.ndarray, ids: np.ndarray,
                  label_names: list[str]) -> None:
    """Pass 2: stream the spill and append each kept row to its split's Parquet file (the
    artifacts contract's `<split>.parquet`: text, label, label_name), in source order, one row
    group per `BATCH_ROWS` rows. `split_of[i]` is row i's split (an index into SPLITS, -1 for
    a dropped row), `ids[i]` its label id."""
    writers = {s: SplitWriter(out, s, label_names) for s in SPLITS}
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}

    def flush(split: str, n: int) -> None:
        writers[split].write(texts[split][:n], labels[split][:n])
        del texts[split][:n], labels[split][:n]

    try:
        start = 0
        for batch in _spilled(spill, "text"):
            end = start + batch.num_rows
            where = split_of[start:end]
            for code, split in enumerate(SPLITS):
                rows = np.flatnonzero(where == code)
                if not len(rows):
                    continue
                texts[split] += batch.column(0).take(pa.array(rows)).to_pylist()
                labels[split] += ids[rows + start].tolist()
                while len(texts[split]) >= BATCH_ROWS:
                    flush(split, BATCH_ROWS)
            start = end
        for split in SPLITS:
            if texts[split] or not writers[split].rows:  # an empty split still gets its file
                flush(split, len(texts[split]))
    finally:
        for writer in writers.values():
            writer.close()


@contextlib.contextmanager
def _spill_file(final: Path) -> Iterator[Path]:
    """A temporary file for pass 1's rows, beside the output folder (on the disk the output
    goes to, not in /tmp, which may be memory); removed when the stage ends, however it ends,
    with the folders made to hold it if the stage wrote nothing into them."""
    made = [folder for folder in (final.parent, *final.parent.parents) if not folder.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=final.parent,
                                         prefix=f".{final.name}.spill-") as tmp:
            yield Path(tmp) / "rows.parquet"
    finally:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _rows_with_lengths(spill: Path, rows: np.ndarray, lengths: np.ndarray, source: str,
                       written: str) -> list[dict]:
    """`{"origin", "chars"}` of each spilled row in `rows` (any order), in that order."""
    order = np.argsort(rows, kind="stable")
    found = _spilled_origins(spill, rows[order])
    origins = [""] * len(rows)
    for i, origin in zip(order, found, strict=True):
        origins[i] = as_written(origin, source, written)
    return [{"origin": o, "chars": int(n)} for o, n in zip(origins, lengths, strict=True)]


def long_texts(cleaned: _Cleaned, kept_rows: np.ndarray, spill: Path, cfg: Prepare,
               source: str) -> tuple[dict, dict]:
    """report.json's `length_outliers` (kept texts far longer than the rest, measured as read:
    see the module docstring) and `truncated` (kept texts cut at prepare.max_chars)."""
    as_read = cleaned.lengths.copy()
    as_read[cleaned.cut] = cleaned.cut_from
    lengths = as_read[kept_rows]
    median = float(np.median(lengths))
    threshold = float(max(OUTLIER_RATIO * median, OUTLIER_MIN_CHARS))
    far = np.flatnonzero(lengths > threshold)
    longest = far[np.argsort(-lengths[far], kind="stable")][:OUTLIERS_SHOWN]
    outliers = {
        "rule": f"longer than {OUTLIER_RATIO} x the median ({median:g} characters) and than "
                f"{OUTLIER_MIN_CHARS} characters, as read",
        "threshold_chars": threshold,
        "count": len(far),
        "longest": _rows_with_lengths(spill, kept_rows[longest], lengths[longest], source,
                                      cfg.source),
    }
    cut = cleaned.cut[np.isin(cleaned.cut, kept_rows)]
    shown = cut[:EXAMPLES_PER_REASON]
    truncated = {
        "max_chars": cfg.max_chars,
        "count": len(cut),
        "examples": _rows_with_lengths(spill, shown, as_read[shown], source, cfg.source),
    }
    return outliers, truncated


def _described(rows: list[dict]) -> str:
    return ", ".join(f"{r['origin']} ({r['chars']:,} characters)" for r in rows)


def as_written(origin: str, resolved: str, written: str) -> str:
    """`origin` with the resolved source location (an install path for `pkg:` sources)
    replaced by the location as written in params."""
    return written + origin[len(resolved):] if origin.startswith(resolved) else origin


def run(params: Params) -> dict:
    cfg = params.prepare
    reader = Reader("prepare.source", cfg.format, cfg.text_column, cfg.label_column,
                    cfg.timeout_s, cfg.hf_split, batch_rows=BATCH_ROWS)
    source, fmt, read, stream = stream_source(cfg.source, reader)
    with _spill_file(Path(params.paths.data)) as spill:
        return _prepare(params, source, fmt, read, stream, spill)


def _prepare(params: Params, source: str, fmt: str, read: Rows, stream: Iterator[Row],
             spill: Path) -> dict:
    cfg = params.prepare
    cleaned = _clean_and_spill(stream, read, cfg, spill)
    tally = cleaned.tally
    kept = (_deduplicate(cleaned, spill) if cfg.deduplicate and cleaned.n
            else np.ones(cleaned.n, dtype=bool))
    # report.json is hashed by DVC and read downstream: locations in it name the source as
    # params.yaml does (`pkg:...`), not where this machine installed it.
    for examples in (tally.examples, tally.skipped_examples):
        for reason, origins in examples.items():
            examples[reason] = [as_written(o, source, cfg.source) for o in origins]
    counts, too_small = _drop_rare_classes(cleaned, kept, cfg)
    _refuse_what_cannot_be_split(tally, counts, too_small, cfg)
    label_names = sorted(counts)
    label_to_id = {name: i for i, name in enumerate(label_names)}
    id_of_code = np.array([label_to_id.get(name, -1) for name in cleaned.classes],
                          dtype=np.int64)
    ids = id_of_code[cleaned.codes]  # label id per row (-1: a dropped rare class)
    kept_rows = np.flatnonzero(kept)
    split_idx = stratified_split(ids[kept_rows], cfg, params.seed)
    split_of = np.full(cleaned.n, -1, dtype=np.int8)
    for code, split in enumerate(SPLITS):
        split_of[kept_rows[split_idx[split]]] = code
    report = _report(cleaned, kept_rows, split_idx, ids, label_names, too_small, spill, cfg,
                     source, fmt)
    with atomic_dir(params.paths.data, params, "prepare") as out:
        _write_splits(out, spill, split_of, ids, label_names)
        write_prepared(out, {}, label_names, report)  # the splits are written: the rest
    _print_summary(report, too_small, cfg)
    return report


def _drop_rare_classes(cleaned: _Cleaned, kept: np.ndarray, cfg: Prepare
                       ) -> tuple[dict[str, int], dict[str, int]]:
    """Examples per class among the `kept` rows, and the classes too small to appear in every
    split (usually a typo'd label, "sprot"); with `on_bad_rows: skip` those are dropped from
    `kept` (in place) and counted."""
    def class_counts() -> dict[str, int]:
        counts = np.bincount(cleaned.codes[kept], minlength=len(cleaned.classes))
        return {name: int(n) for name, n in zip(cleaned.classes, counts, strict=True) if n}

    counts = class_counts()
    too_small = {name: n for name, n in sorted(counts.items()) if n < len(SPLITS)}
    if too_small and cfg.on_bad_rows == "skip":
        cleaned.tally.drop("rare_class", f"classes {too_small}", sum(too_small.values()))
        rare = [code for code, name in enumerate(cleaned.classes) if name in too_small]
        kept &= ~np.isin(cleaned.codes, rare)
        counts = class_counts()
    return counts, too_small


def _refuse_what_cannot_be_split(tally: Rows, counts: dict[str, int],
                                 too_small: dict[str, int], cfg: Prepare) -> None:
    """Bad rows or too small classes with `on_bad_rows: error`, or fewer than 2 classes left:
    one StageError that says what and how to fix it."""
    bad = {r: n for r, n in tally.dropped.items() if r in BAD_ROW_REASONS}
    if cfg.on_bad_rows == "error" and (bad or too_small):
        problems = describe_drops(tally, BAD_ROW_REASONS)
        if too_small:
            problems += ("; " if problems else "") + (
                f"classes with fewer than {len(SPLITS)} examples cannot be split into "
                f"train/validation/test: {too_small}")
        raise StageError(
            f"{cfg.source}: bad rows with prepare.on_bad_rows=error: {problems}. Fix the "
            "data, or set prepare.on_bad_rows: skip to drop them and count them in report.json"
        )
    if len(counts) < 2:
        found = sorted(counts, key=lambda name: -counts[name])  # most examples first
        raise StageError(
            f"{cfg.source}: needs at least 2 classes after cleaning, found {found}"
            + (f" (dropped {describe_drops(tally)})" if tally.dropped else "")
        )


def _report(cleaned: _Cleaned, kept_rows: np.ndarray, split_idx: dict[str, np.ndarray],
            ids: np.ndarray, label_names: list[str], too_small: dict[str, int], spill: Path,
            cfg: Prepare, source: str, fmt: str) -> dict:
    """report.json: what was read, kept and dropped, the classes, text lengths, outliers and
    the splits."""
    tally = cleaned.tally
    lengths = cleaned.lengths[kept_rows]
    outliers, truncated = long_texts(cleaned, kept_rows, spill, cfg, source)
    report = {
        "source": cfg.source,
        "format": fmt,
        "rows_read": cleaned.rows_read,
        "rows_kept": len(kept_rows),
        "dropped": dict(sorted(tally.dropped.items())),
        "dropped_examples": dict(sorted(tally.examples.items())),
        "dropped_classes": too_small if cfg.on_bad_rows == "skip" else {},
        # Entries of a folder source that were not read (hidden, links out of the source...).
        "skipped": dict(sorted(tally.skipped.items())),
        "skipped_examples": dict(sorted(tally.skipped_examples.items())),
        # Class name -> the other spellings merged into it (prepare.labels_* params).
        "label_merges": tally.label_merges,
        "num_classes": len(label_names),
        "text_chars": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                       "max": int(lengths.max())},
        # Kept texts far longer than the rest, and those cut at prepare.max_chars.
        "length_outliers": outliers,
        "truncated": truncated,
        "splits": {},
    }
    for split, idx in split_idx.items():
        per_class = np.bincount(ids[kept_rows[idx]], minlength=len(label_names))
        report["splits"][split] = {
            "examples": len(idx),
            "per_class": {name: int(n) for name, n in zip(label_names, per_class, strict=True)
                          if n},
        }
    return report


def _print_summary(report: dict, too_small: dict[str, int], cfg: Prepare) -> None:
    sizes = {s: report["splits"][s]["examples"] for s in SPLITS}
    print(f"prepare: kept {report['rows_kept']} of {report['rows_read']} rows, dropped "
          f"{report['dropped']}, splits {sizes}")
    if too_small and cfg.on_bad_rows == "skip":
        print(f"prepare: dropped classes too small to split: {too_small}")
    if report["skipped"]:
        print(f"prepare: not read from the source folder: {report['skipped']}")
    if report["label_merges"]:
        print(f"prepare: label spellings merged: {report['label_merges']}")
    outliers, truncated = report["length_outliers"], report["truncated"]
    if outliers["count"]:
        print(f"prepare: {outliers['count']} text(s) far longer than the rest ({outliers['rule']}"
              f"), the longest: {_described(outliers['longest'])}")
    if truncated["count"]:
        print(f"prepare: cut {truncated['count']} text(s) longer than prepare.max_chars="
              f"{cfg.max_chars:,} characters at a word boundary, e.g. "
              f"{_described(truncated['examples'])}")


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
