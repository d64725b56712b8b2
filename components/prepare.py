"""prepare: load a labeled text dataset, clean it, split it, write Parquet.

Produces in `paths.data`: `train.parquet`, `validation.parquet`, `test.parquet` (columns `text`,
`label` (int id), `label_name`), `label_map.json`, `report.json` (counts per split and class and
every dropped row counted by reason) and the resolved `params.json`.

Sources (`prepare.source`): any fsspec URI or local path to a csv/tsv/jsonl/parquet file (gzip
and friends inferred from the suffix) or to a folder with one sub-folder per class and one text
file per example; `hf:NAME` for a Hugging Face dataset (needs the `[hf]` extra and a network);
`pkg:MODULE/sub/path` for data shipped in an installed package.

Run: `python -m components.prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

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


@dataclass
class Rows:
    """Raw examples as loaded, plus a tally of the rows that could not even be read."""

    texts: list[object] = field(default_factory=list)
    labels: list[object] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line" for error messages
    dropped: Counter = field(default_factory=Counter)


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
        "csv": _load_table,
        "tsv": _load_table,
        "parquet": _load_table,
        "jsonl": _load_jsonl,
        "folder": _load_folder,
        "hf": _load_hf,
    }[fmt]
    rows = loader(source, fmt, cfg)
    if not rows.texts:
        raise StageError(f"prepare.source={source!r}: no readable rows")
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


def _load_table(source: str, fmt: str, cfg: Prepare) -> Rows:
    rows = Rows()
    with _open(source) as fh:
        if fmt == "parquet":
            df = pd.read_parquet(fh)
        else:
            bad: list[list[str]] = []
            df = pd.read_csv(
                fh,
                sep="\t" if fmt == "tsv" else ",",
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                engine="python",
                on_bad_lines=lambda line: bad.append(line) and None,
                encoding_errors="replace",
            )
            rows.dropped["malformed"] += len(bad)
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
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rows.dropped["malformed"] += 1
                continue
            if not isinstance(record, dict):
                rows.dropped["malformed"] += 1
                continue
            seen_columns.update(record)
            if cfg.text_column not in record or cfg.label_column not in record:
                rows.dropped["missing_field"] += 1
                continue
            rows.texts.append(record[cfg.text_column])
            rows.labels.append(record[cfg.label_column])
            rows.origins.append(f"{source}:{lineno}")
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
            try:
                text = fs.cat_file(path).decode("utf-8")
            except UnicodeDecodeError:
                rows.dropped["not_utf8"] += 1
                continue
            rows.texts.append(text)
            rows.labels.append(label)
            rows.origins.append(path)
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


def clean(rows: Rows, cfg: Prepare) -> tuple[pd.DataFrame, Counter]:
    """Drop unusable rows and duplicates; every drop is counted by reason."""
    dropped = Counter(rows.dropped)
    texts, labels = [], []
    for text, label in zip(rows.texts, rows.labels, strict=True):
        if _is_missing(label) or str(label).strip() == "":
            dropped["missing_label"] += 1
            continue
        if _is_missing(text) or not isinstance(text, str):
            dropped["missing_text"] += 1
            continue
        text = text.strip()
        if len(text) < cfg.min_chars:
            dropped["empty_text"] += 1
            continue
        texts.append(text)
        labels.append(str(label).strip())
    df = pd.DataFrame({"text": texts, "label_name": labels})
    if cfg.deduplicate and len(df):
        key = df["text"].map(_normalise_for_dedup)
        # A text seen with two different labels is ambiguous: drop every copy of it.
        n_labels = df.groupby(key)["label_name"].transform("nunique")
        conflicting = n_labels > 1
        dropped["conflicting_labels"] += int(conflicting.sum())
        df, key = df[~conflicting], key[~conflicting]
        dup = key.duplicated(keep="first")
        dropped["duplicate"] += int(dup.sum())
        df = df[~dup]
    return df.reset_index(drop=True), dropped


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
    df, dropped = clean(rows, cfg)

    counts = df["label_name"].value_counts()
    if len(counts) < 2:
        raise StageError(
            f"{cfg.source}: needs at least 2 classes after cleaning, found {list(counts.index)}"
        )
    too_small = counts[counts < len(SPLITS)]
    if len(too_small):
        raise StageError(
            f"{cfg.source}: classes with fewer than {len(SPLITS)} examples cannot be split into "
            f"train/validation/test: {too_small.to_dict()}. Add data or drop those rows."
        )

    label_names = sorted(counts.index)
    label_to_id = {name: i for i, name in enumerate(label_names)}
    df["label"] = df["label_name"].map(label_to_id).astype("int64")
    split_idx = stratified_split(df["label"].to_numpy(), cfg, params.seed)

    report = {
        "source": cfg.source,
        "format": fmt,
        "rows_read": len(rows.texts) + sum(rows.dropped.values()),
        "rows_kept": len(df),
        "dropped": dict(sorted(dropped.items())),
        "num_classes": len(label_names),
        "splits": {},
    }
    with atomic_dir(params.paths.data, params) as out:
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
    print(f"prepare: kept {len(df)} of {report['rows_read']} rows, dropped {dict(dropped)}, "
          f"splits {sizes}")
    return report


def load_split(params: Params, split: str) -> pd.DataFrame:
    path = Path(params.paths.data) / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return pd.read_parquet(path)


def load_label_names(params: Params) -> list[str]:
    return read_json(Path(params.paths.data) / "label_map.json")["labels"]


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
