"""prepare: load a labeled text dataset, clean it, split it, write Parquet.

Produces in `paths.data`: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`,
`label` (int id), `label_name`), `label_map.json`, `report.json` (counts per split and class,
every dropped row counted by reason with a few example locations, every merged label spelling,
every file or folder of a folder source that was not read, text length statistics) and the
resolved `params.json`. Running twice with the same params gives byte-identical files.

Bad rows (malformed CSV/JSONL records, undecodable bytes, missing fields, empty texts, missing
labels, classes too small to split) are dropped and counted when `prepare.on_bad_rows` is `skip`
(the default), or stop the stage with a message naming them when it is `error`. Exact
duplicates are always dropped and counted. Every row read is kept or counted as dropped:
`rows_read == rows_kept + sum(dropped)`. A CSV record that cannot be parsed (an unterminated
quote, say) costs only its first line: the lines after it are read again as records. Nothing is
written unless the whole stage succeeds: the previous output folder stays as it was. A source
that cannot be read at all (missing, not what its name or `prepare.format` says, truncated, a
server that does not answer within `prepare.timeout_s`) stops the stage with one message naming
it.

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
in report.json `skipped`. The readers live in `components.rows`, shared with `still predict
--input`, so a bad row is named the same way in both.

Run: `python -m components.prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from decimal import Decimal

import numpy as np
import pandas as pd

from components.artifacts import SPLITS, write_prepared
from components.common import StageError, atomic_dir, stage_main
from components.config import Params, Prepare
from components.rows import (
    FOLDER_SKIP_REASONS,
    Reader,
    Rows,
    clean_unicode,
    describe_drops,
    read_source,
    text_problem,
)

__all__ = ["BAD_ROW_REASONS", "FOLDER_SKIP_REASONS", "clean", "label_name", "run"]

# Drop reasons that mean the input itself is broken: with `on_bad_rows: error` any of them stops
# the stage. Exact duplicates are ordinary cleaning and never do.
BAD_ROW_REASONS = (
    "malformed",  # a CSV/TSV record with the wrong field count or quoting (e.g. a quote never
    #               closed), a JSONL line that is not a JSON object, is nested too deeply or
    #               repeats the text/label key
    "not_utf8",  # undecodable bytes (a U+FFFD the source itself holds is text, not this)
    "missing_field",  # a JSONL object without the text or label field
    "missing_label",  # null, NaN, empty, or the text "nan"/"null"
    "invalid_label",  # a label that is a list/object rather than a name or number
    "missing_text",  # null or non-string text
    "empty_text",  # shorter than prepare.min_chars after stripping whitespace
    "conflicting_labels",  # the same text under two labels
    "rare_class",  # a class with fewer examples than there are splits
)
# How a text format without a null (CSV, TSV, file names) spells a missing value; compared
# after stripping and case-folding. Anything else, "None" and "N/A" included, is a class name.
_MISSING_LABELS = {"nan", "null"}
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _normalise_for_dedup(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label_spelling(label: object) -> str | None:
    """The label as text, as the source spells it; None for null and NaN."""
    if hasattr(label, "item") and not isinstance(label, str | bytes):
        label = label.item()  # numpy scalars
    if _is_missing(label):
        return None
    if isinstance(label, bool):
        return "true" if label else "false"
    if isinstance(label, float):
        return repr(label)  # 1.0 -> "1.0": the same text a CSV holds for it
    return str(label)


def _canonical_number(text: str) -> str | None:
    """One spelling per decimal number ("1.0", "01", "+1", "1e0" -> "1"); None if `text` is
    not a plain decimal number."""
    if not _NUMBER.fullmatch(text):
        return None
    value = Decimal(text)
    if value == 0:
        return "0"
    value = value.normalize()
    return format(value, "f") if -30 <= value.adjusted() <= 30 else str(value)


def label_name(label: object, cfg: Prepare) -> str | None:
    """The class name of a raw label (see the module docstring); None when it is missing."""
    spelling = _label_spelling(label)
    if spelling is None:
        return None
    name = unicodedata.normalize("NFC", spelling).strip()
    if not name or name.casefold() in _MISSING_LABELS:
        return None
    if cfg.labels_numeric:
        name = _canonical_number(name) or name
    if cfg.labels_casefold:
        name = name.casefold()
    return name



def clean(rows: Rows, cfg: Prepare) -> tuple[pd.DataFrame, Rows]:
    """Drop unusable rows and duplicates; every drop is counted by reason (in the returned
    copy of `rows.dropped` / `rows.examples`), every label spelling merged into another class
    name is listed in its `label_merges`."""
    tally = Rows(dropped=Counter(rows.dropped),
                 examples={k: list(v) for k, v in rows.examples.items()},
                 skipped=Counter(rows.skipped),
                 skipped_examples={k: list(v) for k, v in rows.skipped_examples.items()})
    texts, labels, origins = [], [], []
    spellings: dict[str, set[str]] = {}
    for text, label, origin in zip(rows.texts, rows.labels, rows.origins, strict=True):
        if isinstance(label, list | dict):
            tally.drop("invalid_label", origin)
            continue
        name = label_name(label, cfg)
        if name is None:
            tally.drop("missing_label", origin)
            continue
        problem = text_problem(text, cfg.min_chars)
        if problem != "missing_text" and not clean_unicode(name):
            problem = "not_utf8"  # a label holding undecodable bytes
        if problem:
            tally.drop(problem, origin)
            continue
        text = text.strip()
        spellings.setdefault(name, set()).add(_label_spelling(label))
        texts.append(text)
        labels.append(name)
        origins.append(origin)
    tally.label_merges = {name: sorted(s for s in spelled if s != name)
                          for name, spelled in sorted(spellings.items())
                          if spelled != {name}}
    df = pd.DataFrame({"text": texts, "label_name": labels, "origin": origins})
    if cfg.deduplicate and len(df):
        key = df["text"].map(_normalise_for_dedup)
        # A text seen with two different labels is ambiguous: drop every copy of it.
        n_labels = df.groupby(key)["label_name"].transform("nunique")
        conflicting = n_labels > 1
        for origin in df.loc[conflicting, "origin"]:
            tally.drop("conflicting_labels", origin)
        df, key = df[~conflicting], key[~conflicting]
        dup = key.duplicated(keep="first")
        tally.dropped["duplicate"] += int(dup.sum())
        df = df[~dup]
    return df.drop(columns="origin").reset_index(drop=True), tally


def as_written(origin: str, resolved: str, written: str) -> str:
    """`origin` with the resolved source location (an install path for `pkg:` sources)
    replaced by the location as written in params."""
    return written + origin[len(resolved):] if origin.startswith(resolved) else origin



def stratified_split(
    labels: np.ndarray, cfg: Prepare, seed: int
) -> dict[str, np.ndarray]:
    """Seeded per-class shuffle; each class contributes round(n * fraction) to validation/test
    (at least one each) so every split sees every class."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_val = max(1, round(n * cfg.validation_fraction))
        n_test = max(1, round(n * cfg.test_fraction))
        parts["validation"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def run(params: Params) -> dict:
    cfg = params.prepare
    reader = Reader("prepare.source", cfg.format, cfg.text_column, cfg.label_column,
                    cfg.timeout_s, cfg.hf_split)
    source, fmt, rows = read_source(cfg.source, reader)
    df, tally = clean(rows, cfg)
    # report.json is hashed by DVC and read downstream: locations in it name the source as
    # params.yaml does (`pkg:...`), not where this machine installed it.
    for examples in (tally.examples, tally.skipped_examples):
        for reason, origins in examples.items():
            examples[reason] = [as_written(o, source, cfg.source) for o in origins]

    counts = df["label_name"].value_counts()
    # A class too small to appear in every split is usually a typo'd label ("sprot").
    too_small = {name: int(n) for name, n in sorted(counts[counts < len(SPLITS)].items())}
    if too_small and cfg.on_bad_rows == "skip":
        tally.drop("rare_class", f"classes {too_small}", sum(too_small.values()))
        df = df[~df["label_name"].isin(too_small)].reset_index(drop=True)
        counts = df["label_name"].value_counts()
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
        raise StageError(
            f"{cfg.source}: needs at least 2 classes after cleaning, found {list(counts.index)}"
            + (f" (dropped {describe_drops(tally)})" if tally.dropped else "")
        )

    label_names = sorted(counts.index)
    label_to_id = {name: i for i, name in enumerate(label_names)}
    df["label"] = df["label_name"].map(label_to_id).astype("int64")
    split_idx = stratified_split(df["label"].to_numpy(), cfg, params.seed)

    lengths = df["text"].str.len()
    report = {
        "source": cfg.source,
        "format": fmt,
        "rows_read": len(rows.texts) + sum(rows.dropped.values()),
        "rows_kept": len(df),
        "dropped": dict(sorted(tally.dropped.items())),
        "dropped_examples": dict(sorted(tally.examples.items())),
        "dropped_classes": too_small if cfg.on_bad_rows == "skip" else {},
        # Entries of a folder source that were not read (hidden, links out of the source...).
        "skipped": dict(sorted(tally.skipped.items())),
        "skipped_examples": dict(sorted(tally.skipped_examples.items())),
        # Class name -> the other spellings merged into it (prepare.labels_* params).
        "label_merges": tally.label_merges,
        "num_classes": len(label_names),
        "text_chars": {"min": int(lengths.min()), "median": float(lengths.median()),
                       "max": int(lengths.max())},
        "splits": {},
    }
    parts = {split: df.iloc[idx][["text", "label", "label_name"]].reset_index(drop=True)
             for split, idx in split_idx.items()}
    for split, part in parts.items():
        per_class = part["label_name"].value_counts().sort_index()
        report["splits"][split] = {
            "examples": len(part),
            "per_class": {name: int(n) for name, n in per_class.items()},
        }
    with atomic_dir(params.paths.data, params, "prepare") as out:
        write_prepared(out, parts, label_names, report)
    sizes = {s: report["splits"][s]["examples"] for s in SPLITS}
    print(f"prepare: kept {len(df)} of {report['rows_read']} rows, dropped "
          f"{report['dropped']}, splits {sizes}")
    if too_small and cfg.on_bad_rows == "skip":
        print(f"prepare: dropped classes too small to split: {too_small}")
    if tally.skipped:
        print(f"prepare: not read from the source folder: {report['skipped']}")
    if tally.label_merges:
        print(f"prepare: label spellings merged: {tally.label_merges}")
    return report


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
