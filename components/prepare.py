"""prepare: load a labeled text dataset, clean it, split it, write Parquet.

Produces in `paths.data`: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`,
`label` (int id), `label_name`), `label_map.json`, `report.json` (counts per split and class,
every dropped row counted by reason with a few example locations, text length statistics) and
the resolved `params.json`. Running twice with the same params gives byte-identical files.

Bad rows (malformed CSV/JSONL records, undecodable bytes, missing fields, empty texts, missing or
NaN labels, classes too small to split) are dropped and counted when `prepare.on_bad_rows` is
`skip` (the default), or stop the stage with a message naming them when it is `error`. Exact
duplicates are always dropped and counted. Nothing is written unless the whole stage succeeds:
the previous output folder stays as it was.

Sources (`prepare.source`): any fsspec URI or local path to a csv/tsv/jsonl/parquet file (gzip
and friends inferred from the suffix) or to a folder with one sub-folder per class and one text
file per example; `hf:NAME` for a Hugging Face dataset (needs the `[hf]` extra and a network);
`pkg:MODULE/sub/path` for data shipped in an installed package.

Run: `python -m components.prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from components.common import (
    StageError,
    atomic_dir,
    read_json,
    resolve_location,
    stage_main,
    write_json,
)
from components.config import Params, Prepare

SPLITS = ("train", "validation", "test")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}


# Drop reasons that mean the input itself is broken: with `on_bad_rows: error` any of them stops
# the stage. Exact duplicates are ordinary cleaning and never do.
BAD_ROW_REASONS = (
    "malformed",  # a CSV/TSV record with the wrong field count or quoting, a JSONL line that
    #               is not a JSON object
    "not_utf8",  # undecodable bytes (the text would carry U+FFFD replacement characters)
    "missing_field",  # a JSONL object without the text or label field
    "missing_label",  # empty, null or NaN label
    "invalid_label",  # a label that is a list/object rather than a name or number
    "missing_text",  # null or non-string text
    "empty_text",  # shorter than prepare.min_chars after stripping whitespace
    "conflicting_labels",  # the same text under two labels
    "rare_class",  # a class with fewer examples than there are splits
)
_EXAMPLES_PER_REASON = 3
# Strings that mean "no label" in exported spreadsheets; never a class of their own.
_NA_LABELS = {"nan", "null", "none", "n/a", "#n/a"}
_MAX_FIELD = 2**31 - 1  # Python's csv module caps fields at 128 KiB by default


@dataclass
class Rows:
    """Raw examples as loaded, plus a tally of the rows that could not even be read."""

    texts: list[object] = field(default_factory=list)
    labels: list[object] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line" for error messages
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first origins

    def drop(self, reason: str, origin: str, n: int = 1) -> None:
        self.dropped[reason] += n
        seen = self.examples.setdefault(reason, [])
        if len(seen) < _EXAMPLES_PER_REASON:
            seen.append(origin)


def detect_format(source: str, cfg: Prepare) -> str:
    if cfg.format != "auto":
        return cfg.format
    if source.startswith("hf:"):
        return "hf"
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path):
        return "folder"
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffixes[-1]]
    raise StageError(
        f"prepare.source={source!r}: cannot tell the format from the name; set prepare.format "
        "to one of csv, tsv, jsonl, parquet, folder, hf"
    )


def load_rows(source: str, fmt: str, cfg: Prepare) -> Rows:
    loader = {
        "csv": _load_delimited,
        "tsv": _load_delimited,
        "parquet": _load_table,
        "jsonl": _load_jsonl,
        "folder": _load_folder,
        "hf": _load_hf,
    }[fmt]
    rows = loader(source, fmt, cfg)
    if not rows.texts:
        raise StageError(f"prepare.source={source!r}: no readable rows"
                         + (f" ({_describe_drops(rows)})" if rows.dropped else ""))
    return rows


def _open(source: str):
    import fsspec

    return fsspec.open(source, "rb", compression="infer")


def _require_columns(columns: list[str], cfg: Prepare, source: str) -> None:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in columns]
    if missing:
        raise StageError(
            f"{source}: missing column(s) {missing}; it has {list(columns)}. Set "
            "prepare.text_column / prepare.label_column to the right names."
        )


def _load_delimited(source: str, fmt: str, cfg: Prepare) -> Rows:
    """CSV/TSV through the csv module, record by record, so every bad record is counted with
    its line number (pandas' readers silently swallow some, e.g. an unterminated quote or a
    field over the csv module's 128 KiB limit)."""
    rows = Rows()
    csv.field_size_limit(_MAX_FIELD)
    with _open(source) as fh:
        # Undecodable bytes become U+FFFD; clean() counts such rows as not_utf8.
        text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",", strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise StageError(f"{source}: the file is empty") from None
        except csv.Error as err:
            raise StageError(f"{source}: cannot read the header line ({err})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        _require_columns(header, cfg, source)
        ti, li = header.index(cfg.text_column), header.index(cfg.label_column)
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                rows.drop("malformed", f"{source}:{start} ({err})")
                continue
            if not record or record == [""]:
                continue  # blank line
            if len(record) != len(header):
                rows.drop("malformed", f"{source}:{start} ({len(record)} fields, header has "
                                       f"{len(header)})")
                continue
            rows.texts.append(record[ti])
            rows.labels.append(record[li] if record[li] != "" else None)
            rows.origins.append(f"{source}:{start}")
    return rows


def _load_table(source: str, fmt: str, cfg: Prepare) -> Rows:
    rows = Rows()
    with _open(source) as fh:
        df = pd.read_parquet(fh)
    _require_columns(list(df.columns), cfg, source)
    rows.texts = df[cfg.text_column].tolist()
    rows.labels = df[cfg.label_column].tolist()
    rows.origins = [f"{source}:row {i + 1}" for i in range(len(df))]
    return rows


def _load_jsonl(source: str, fmt: str, cfg: Prepare) -> Rows:
    rows = Rows()
    seen_columns: set[str] = set()
    with _open(source) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            origin = f"{source}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.drop("not_utf8", origin)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                rows.drop("malformed", f"{origin} ({err.msg})")
                continue
            if not isinstance(record, dict):
                rows.drop("malformed", f"{origin} (not a JSON object)")
                continue
            seen_columns.update(record)
            if cfg.text_column not in record or cfg.label_column not in record:
                rows.drop("missing_field", origin)
                continue
            rows.texts.append(record[cfg.text_column])
            rows.labels.append(record[cfg.label_column])
            rows.origins.append(origin)
    if not rows.texts and seen_columns:
        _require_columns(sorted(seen_columns), cfg, source)
    return rows


def _load_folder(source: str, fmt: str, cfg: Prepare) -> Rows:
    """One sub-folder per class (its name is the label), one UTF-8 text file per example."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    rows = Rows()
    class_dirs = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not class_dirs:
        raise StageError(f"{source}: folder has no class sub-folders")
    for class_dir in class_dirs:
        label = PurePosixPath(class_dir).name
        if label.startswith(("_", ".")):  # e.g. __pycache__ in a packaged dataset
            continue
        for path in sorted(fs.find(class_dir)):
            # Origins relative to the source as given, never the machine's absolute path.
            origin = f"{source.rstrip('/')}/{PurePosixPath(path).relative_to(root)}"
            try:
                text = fs.cat_file(path).decode("utf-8")
            except UnicodeDecodeError:
                rows.drop("not_utf8", origin)
                continue
            rows.texts.append(text)
            rows.labels.append(label)
            rows.origins.append(origin)
    return rows


def _load_hf(source: str, fmt: str, cfg: Prepare) -> Rows:
    try:
        import datasets
    except ImportError:
        raise StageError(
            "hf: sources need the Hugging Face `datasets` package: pip install 'still[hf]'"
        ) from None
    name = source.removeprefix("hf:")
    ds = datasets.load_dataset(name, split=cfg.hf_split)
    _require_columns(ds.column_names, cfg, source)
    names = getattr(ds.features[cfg.label_column], "names", None)
    labels = ds[cfg.label_column]
    rows = Rows(
        texts=list(ds[cfg.text_column]),
        labels=[names[i] for i in labels] if names else list(labels),
    )
    rows.origins = [f"{source}[{cfg.hf_split}]:{i}" for i in range(len(ds))]
    return rows


def _normalise_for_dedup(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label_name(label: object) -> str | None:
    """The label as a class name; None when it is missing, NaN or an NA marker."""
    if _is_missing(label):
        return None
    if isinstance(label, bool):
        return str(label).lower()
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # 1.0 from a float column is the same class as 1
    if hasattr(label, "item") and not isinstance(label, str):  # numpy scalars from Parquet
        return _label_name(label.item())
    name = str(label).strip()
    return None if name == "" or name.casefold() in _NA_LABELS else name


def _clean_unicode(text: str) -> bool:
    """False for text that held undecodable bytes (decoded as U+FFFD) or lone surrogates (a
    JSON `\\udc80` escape), which Parquet cannot store."""
    if "\ufffd" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean(rows: Rows, cfg: Prepare) -> tuple[pd.DataFrame, Rows]:
    """Drop unusable rows and duplicates; every drop is counted by reason (in the returned
    copy of `rows.dropped` / `rows.examples`)."""
    tally = Rows(dropped=Counter(rows.dropped),
                 examples={k: list(v) for k, v in rows.examples.items()})
    texts, labels, origins = [], [], []
    for text, label, origin in zip(rows.texts, rows.labels, rows.origins, strict=True):
        if isinstance(label, list | dict):
            tally.drop("invalid_label", origin)
            continue
        name = _label_name(label)
        if name is None:
            tally.drop("missing_label", origin)
            continue
        if _is_missing(text) or not isinstance(text, str):
            tally.drop("missing_text", origin)
            continue
        if not _clean_unicode(text) or not _clean_unicode(name):
            tally.drop("not_utf8", origin)
            continue
        text = text.strip()
        if len(text) < cfg.min_chars:
            tally.drop("empty_text", origin)
            continue
        texts.append(text)
        labels.append(name)
        origins.append(origin)
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


def _describe_drops(tally: Rows, reasons: tuple[str, ...] | None = None) -> str:
    parts = []
    for reason, n in sorted(tally.dropped.items()):
        if reasons is None or reason in reasons:
            where = ", ".join(tally.examples.get(reason, []))
            parts.append(f"{reason}: {n}" + (f" (e.g. {where})" if where else ""))
    return "; ".join(parts)


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
    source = resolve_location(cfg.source)
    fmt = detect_format(source, cfg)
    rows = load_rows(source, fmt, cfg)
    df, tally = clean(rows, cfg)
    # report.json is hashed by DVC and read downstream: locations in it name the source as
    # params.yaml does (`pkg:...`), not where this machine installed it.
    tally.examples = {reason: [as_written(o, source, cfg.source) for o in origins]
                      for reason, origins in tally.examples.items()}

    counts = df["label_name"].value_counts()
    # A class too small to appear in every split is usually a typo'd label ("sprot").
    too_small = {name: int(n) for name, n in sorted(counts[counts < len(SPLITS)].items())}
    if too_small and cfg.on_bad_rows == "skip":
        tally.drop("rare_class", f"classes {too_small}", sum(too_small.values()))
        df = df[~df["label_name"].isin(too_small)].reset_index(drop=True)
        counts = df["label_name"].value_counts()
    bad = {r: n for r, n in tally.dropped.items() if r in BAD_ROW_REASONS}
    if cfg.on_bad_rows == "error" and (bad or too_small):
        problems = _describe_drops(tally, BAD_ROW_REASONS)
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
            + (f" (dropped {_describe_drops(tally)})" if tally.dropped else "")
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
        "num_classes": len(label_names),
        "text_chars": {"min": int(lengths.min()), "median": float(lengths.median()),
                       "max": int(lengths.max())},
        "splits": {},
    }
    with atomic_dir(params.paths.data, params, "prepare") as out:
        for split, idx in split_idx.items():
            part = df.iloc[idx][["text", "label", "label_name"]].reset_index(drop=True)
            part.to_parquet(out / f"{split}.parquet", index=False)
            per_class = part["label_name"].value_counts().sort_index()
            report["splits"][split] = {
                "examples": len(part),
                "per_class": {name: int(n) for name, n in per_class.items()},
            }
        write_json(out / "label_map.json", {"labels": label_names})
        write_json(out / "report.json", report)
    sizes = {s: report["splits"][s]["examples"] for s in SPLITS}
    print(f"prepare: kept {len(df)} of {report['rows_read']} rows, dropped "
          f"{report['dropped']}, splits {sizes}")
    if too_small and cfg.on_bad_rows == "skip":
        print(f"prepare: dropped classes too small to split: {too_small}")
    return report


def load_split(params: Params, split: str) -> pd.DataFrame:
    """A prepared split, checked against `label_map.json`: a label id outside the map (or a
    name that disagrees with it) means the split and the map come from different runs, and
    every accuracy computed on it would be wrong."""
    path = Path(params.paths.data) / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    df = pd.read_parquet(path)
    names = load_label_names(params)
    ids = df["label"].to_numpy()
    unknown = sorted({int(i) for i in ids if not 0 <= i < len(names)})
    if unknown:
        raise StageError(
            f"{path}: label id(s) {unknown} are not in "
            f"{Path(params.paths.data) / 'label_map.json'} ({len(names)} labels: {names}); "
            "the split and the label map come from different "
            "prepare runs: rerun prepare (dvc repro prepare) and the stages after it")
    if "label_name" in df:
        mismatch = df["label_name"].to_numpy() != np.asarray(names, dtype=object)[ids]
        if mismatch.any():
            row = int(np.flatnonzero(mismatch)[0])
            raise StageError(
                f"{path}: row {row} has label {int(ids[row])} named "
                f"{df['label_name'].iloc[row]!r} but label_map.json calls it "
                f"{names[ids[row]]!r}; rerun prepare (dvc repro prepare)")
    return df


def load_label_names(params: Params) -> list[str]:
    return read_json(Path(params.paths.data) / "label_map.json")["labels"]


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
