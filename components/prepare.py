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
in report.json `skipped`.

Run: `python -m components.prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from components.artifacts import SPLITS, write_prepared
from components.common import (
    SKIP_REASONS,
    Listing,
    StageError,
    atomic_dir,
    describe,
    remote_options,
    remote_problem,
    resolve_location,
    stage_main,
    walk_local,
)
from components.config import Params, Prepare

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd",
                         ".zip": "zip"}


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
# Entries of a folder source that are not read (never rows): common.SKIP_REASONS plus these.
FOLDER_SKIP_REASONS = {
    **SKIP_REASONS,
    "private_folder": "a top-level folder named '_name' (e.g. __pycache__), not a class",
    "not_in_a_class_folder": "a file directly in the source folder, outside any class folder",
}
_EXAMPLES_PER_REASON = 3
# How a text format without a null (CSV, TSV, file names) spells a missing value; compared
# after stripping and case-folding. Anything else, "None" and "N/A" included, is a class name.
_MISSING_LABELS = {"nan", "null"}
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_MAX_FIELD = 2**31 - 1  # Python's csv module caps fields at 128 KiB by default


@dataclass
class Rows:
    """Raw examples as loaded, plus a tally of the rows that could not even be read and of the
    entries of a folder source that were not read."""

    texts: list[object] = field(default_factory=list)
    labels: list[object] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line" for error messages
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first origins
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    label_merges: dict[str, list[str]] = field(default_factory=dict)  # name -> other spellings

    def drop(self, reason: str, origin: str, n: int = 1) -> None:
        self.dropped[reason] += n
        _remember(self.examples, reason, origin)

    def skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] += 1
        _remember(self.skipped_examples, reason, origin)


def _remember(examples: dict[str, list[str]], reason: str, origin: str) -> None:
    seen = examples.setdefault(reason, [])
    if len(seen) < _EXAMPLES_PER_REASON:
        seen.append(origin)


def _filesystem(source: str, cfg: Prepare):
    import fsspec

    return fsspec.core.url_to_fs(source, **remote_options(source, cfg.timeout_s))


def detect_format(source: str, cfg: Prepare) -> str:
    if cfg.format != "auto":
        return cfg.format
    if source.startswith("hf:"):
        return "hf"
    fs, path = _filesystem(source, cfg)
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffixes[-1]]
    if fs.isdir(path):
        return "folder"
    if not fs.exists(path):
        raise FileNotFoundError(path)
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
        problems = "; ".join(filter(None, [_describe_drops(rows), _describe_skips(rows)]))
        raise StageError(f"prepare.source={source!r}: no readable rows"
                         + (f" ({problems})" if problems else ""))
    return rows


@contextlib.contextmanager
def _reading_source(written: str, resolved: str, fmt: str, cfg: Prepare) -> Iterator[None]:
    """Any failure to read the source becomes one StageError that names it, says what went
    wrong in words and what to change (the one reader-level error path of this stage)."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:
        raise StageError(_source_problem(written, resolved, fmt, cfg, err)) from err


def _source_problem(written: str, resolved: str, fmt: str, cfg: Prepare,
                    err: Exception) -> str:
    where = f"prepare.source={written!r}" + (f" ({resolved})" if resolved != written else "")
    why = describe(err)
    remote = "://" in resolved and not resolved.startswith("file://")
    network = remote_problem(where, err, cfg.timeout_s, remote)
    if network:
        return network
    if isinstance(err, FileNotFoundError):
        hint = ("check the URL (the server answered: not found)" if remote else
                "check the spelling; a relative path is read from the project folder")
        return f"{where} does not exist; {hint}"
    if isinstance(err, IsADirectoryError):
        return (f"{where} is a folder, but prepare.format is {fmt!r}; set prepare.format: "
                "folder (one sub-folder per class) or auto")
    if isinstance(err, NotADirectoryError) and fmt == "folder":
        return (f"{where} is a file, but prepare.format is 'folder'; set prepare.format to "
                "the file's format (csv, tsv, jsonl, parquet) or auto")
    compression = next((_COMPRESSION_SUFFIXES[s.lower()] for s in
                        PurePosixPath(resolved).suffixes[::-1]
                        if s.lower() in _COMPRESSION_SUFFIXES), "")
    kind = f"{compression}-compressed {fmt}" if compression else fmt
    return (f"{where}: cannot read it as {kind} ({why}); the file is damaged, truncated or not "
            "what its name says: fix it, or set prepare.format to its real format")


def _open(source: str, cfg: Prepare):
    import fsspec

    return fsspec.open(source, "rb", compression="infer",
                       **remote_options(source, cfg.timeout_s))


def _require_columns(columns: list[str], cfg: Prepare, source: str) -> None:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in columns]
    if missing:
        raise StageError(
            f"{source}: missing column(s) {missing}; it has {list(columns)}. Set "
            "prepare.text_column / prepare.label_column to the right names."
        )
    for key, name in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        where = [i + 1 for i, c in enumerate(columns) if c == name]
        if len(where) > 1:
            raise StageError(
                f"{source}: {len(where)} columns are named {name!r} (columns "
                f"{', '.join(map(str, where))} of {list(columns)}), so prepare.{key} is "
                "ambiguous; rename all but one of them in the header")


class _Lines:
    """The physical lines of a text stream, numbered from 1, for `csv.reader`. The lines a
    record took can be put back, so that after a record that does not parse the lines behind
    its first one are read again instead of vanishing inside it."""

    def __init__(self, stream: Iterator[str]):
        self._stream = stream
        self._count = 0
        self._back: list[tuple[int, str]] = []  # a stack: the next line is last
        self.taken: list[tuple[int, str]] = []  # (line number, line) since `new_record`

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._back:
            item = self._back.pop()
        else:
            line = next(self._stream)
            self._count += 1
            item = (self._count, line)
        self.taken.append(item)
        return item[1]

    def new_record(self) -> None:
        self.taken = []

    def read_again(self, taken: list[tuple[int, str]]) -> None:
        self._back.extend(reversed(taken))


def _load_delimited(source: str, fmt: str, cfg: Prepare) -> Rows:
    """CSV/TSV through the csv module, record by record, so every bad record is counted with
    its line number (pandas' readers silently swallow some, e.g. an unterminated quote or a
    field over the csv module's 128 KiB limit).

    A record that does not parse (a quote never closed swallows every line after it; a stray
    quote makes the parser take a good line into a bad record) is dropped as `malformed` at its
    first line, and the lines after that are parsed again, so each physical line ends up in a
    kept record or a counted one. A record that parses into the wrong number of fields is
    dropped whole, with its line span."""
    rows = Rows()
    csv.field_size_limit(_MAX_FIELD)
    with _open(source, cfg) as fh:
        # Undecodable bytes become lone surrogates (U+DC80..U+DCFF), which clean() counts as
        # not_utf8; a U+FFFD that the file itself holds stays text.
        text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
        lines = _Lines(text)
        reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",", strict=True)
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
            lines.new_record()
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                (first, _), *after = lines.taken
                note = (f"; the {len(after)} line(s) it took were read again" if after else "")
                rows.drop("malformed", f"{source}:{first} ({err}{note})")
                lines.read_again(after)
                continue
            first, last = lines.taken[0][0], lines.taken[-1][0]
            origin = f"{source}:{first}" + (f"-{last}" if last != first else "")
            if not record:
                continue  # blank line
            if len(record) != len(header):
                rows.drop("malformed", f"{origin} ({len(record)} fields, header has "
                                       f"{len(header)})")
                continue
            rows.texts.append(record[ti])
            rows.labels.append(record[li])
            rows.origins.append(origin)
    return rows


def _load_table(source: str, fmt: str, cfg: Prepare) -> Rows:
    """Parquet through pyarrow, values as Python objects: an integer label column with nulls
    stays integers and None (pandas would turn it into floats and NaN)."""
    import pyarrow.parquet as pq

    rows = Rows()
    with _open(source, cfg) as fh:
        table = pq.read_table(fh)
    _require_columns(table.column_names, cfg, source)
    rows.texts = table.column(cfg.text_column).to_pylist()
    rows.labels = table.column(cfg.label_column).to_pylist()
    rows.origins = [f"{source}:row {i + 1}" for i in range(table.num_rows)]
    return rows


def _json_object(line: str, cfg: Prepare) -> dict | str:
    """The JSON object on `line`, or why it is malformed."""
    keys = (cfg.text_column, cfg.label_column)
    # A repeated key silently keeps its last value in json.loads; check for it only on lines
    # where one of our keys occurs twice (the hook costs time on every object).
    repeated = any(line.count(json.dumps(k)) > 1 for k in keys)

    def no_repeats(pairs: list[tuple[str, object]]) -> dict:
        names = [k for k, _ in pairs]
        for key in keys:
            if names.count(key) > 1:
                raise _RepeatedKey(key)
        return dict(pairs)

    try:
        record = json.loads(line, object_pairs_hook=no_repeats if repeated else None)
    except json.JSONDecodeError as err:
        return err.msg
    except _RepeatedKey as err:
        return f"key {err.args[0]!r} appears twice"
    except RecursionError:
        return "nested too deeply"
    return record if isinstance(record, dict) else "not a JSON object"


class _RepeatedKey(ValueError):
    pass


def _load_jsonl(source: str, fmt: str, cfg: Prepare) -> Rows:
    rows = Rows()
    seen_columns: set[str] = set()
    with _open(source, cfg) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            origin = f"{source}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.drop("not_utf8", origin)
                continue
            record = _json_object(line, cfg)
            if isinstance(record, str):
                rows.drop("malformed", f"{origin} ({record})")
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


def _walk_remote(fs, root: str) -> Listing:
    """Files under a remote folder (object stores have no links): hidden entries left out."""
    listing, hidden = Listing(), set()
    base = PurePosixPath(root)
    for path in sorted(fs.find(root)):
        parts = PurePosixPath(path).relative_to(base).parts
        dot = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if dot is not None:
            hidden.add("/".join(parts[: dot + 1]))
        else:
            listing.files.append(("/".join(parts), path))
    listing.skipped = [("hidden", name) for name in sorted(hidden)]
    return listing


def _load_folder(source: str, fmt: str, cfg: Prepare) -> Rows:
    """One sub-folder per class (its name is the label), one UTF-8 text file per example.

    The walk never leaves the source folder and never reads hidden entries
    (`common.walk_local`); folders named `_name` at the top (e.g. `__pycache__` in a packaged
    dataset) and files outside any class folder are not classes. Every entry left out is
    counted by reason (FOLDER_SKIP_REASONS) in report.json `skipped`."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = _filesystem(source, cfg)
    local = isinstance(fs, LocalFileSystem)
    listing = walk_local(root) if local else _walk_remote(fs, root)
    read: Callable[[object], bytes] = (
        (lambda path: Path(path).read_bytes()) if local else fs.cat_file)
    base = source.rstrip("/")
    rows = Rows()
    private = {name for name in (PurePosixPath(entry).name for entry in
                                 fs.ls(root, detail=False) if fs.isdir(entry))
               if name.startswith("_")}
    for reason, rel in listing.skipped:
        top, _, below = rel.partition("/")
        if top.startswith("_") and below:
            private.add(top)  # inside a skipped folder: that folder is what gets counted
        else:
            rows.skip(reason, f"{base}/{rel}")
    n_files = 0
    for rel, path in listing.files:
        top, _, below = rel.partition("/")
        if not below:
            rows.skip("not_in_a_class_folder", f"{base}/{rel}")
            continue
        if top.startswith("_"):
            private.add(top)
            continue
        n_files += 1
        # Origins relative to the source as given, never the machine's absolute path.
        origin = f"{base}/{rel}"
        try:
            text = read(path).decode("utf-8")
        except UnicodeDecodeError:
            rows.drop("not_utf8", origin)
            continue
        rows.texts.append(text)
        rows.labels.append(top)
        rows.origins.append(origin)
    for name in sorted(private):
        rows.skip("private_folder", f"{base}/{name}")
    if not n_files:
        skipped = _describe_skips(rows)
        raise StageError(f"{source}: no files in class sub-folders (one sub-folder per class, "
                         "one text file per example)" + (f"; skipped {skipped}" if skipped
                                                         else ""))
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


def _clean_unicode(text: str) -> bool:
    """False for text holding lone surrogates: undecodable bytes (read with surrogateescape) or
    a JSON `\\udc80` escape. Parquet cannot store them. U+FFFD is an ordinary character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _describe(counts: Counter, examples: dict[str, list[str]],
              reasons: tuple[str, ...] | None = None) -> str:
    parts = []
    for reason, n in sorted(counts.items()):
        if reasons is None or reason in reasons:
            where = ", ".join(examples.get(reason, []))
            parts.append(f"{reason}: {n}" + (f" (e.g. {where})" if where else ""))
    return "; ".join(parts)


def _describe_drops(tally: Rows, reasons: tuple[str, ...] | None = None) -> str:
    return _describe(tally.dropped, tally.examples, reasons)


def _describe_skips(tally: Rows) -> str:
    return _describe(tally.skipped, tally.skipped_examples)


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
    fmt = cfg.format
    with _reading_source(cfg.source, source, fmt, cfg):
        fmt = detect_format(source, cfg)
    with _reading_source(cfg.source, source, fmt, cfg):
        rows = load_rows(source, fmt, cfg)
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
