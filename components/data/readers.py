"""The source readers of prepare and `still predict --input`, one per format (CSV/TSV, JSON Lines,
Parquet, a folder of class folders, a Hugging Face dataset), local or remote. Every loader is a
generator: it yields one raw row (text, label, "file:line" origin) at a time and counts in a
`Rows` tally the rows that could not even be parsed and the folder entries not read, so a reader
never holds more of the source than one record, one Parquet batch or one file of a folder.
`stream_source` hands the rows on one by one; `read_source` / `load_rows` collect them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from components.data.files import describe
from components.data.locations import (
    Listing,
    RemoteWaits,
    remote_options,
    remote_problem,
    resolve_location,
    walk_local,
)
from components.data.rows import Reader, Row, Rows, describe_drops, describe_skips
from components.stage import StageError

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
_MAX_FIELD = 2**31 - 1  # Python's csv module caps fields at 128 KiB by default
# Parquet is read page by page through a buffer this big, without pre-buffering: pyarrow
# would otherwise hold every column chunk read so far until the file is done.
READ_BUFFER = 1 << 20


def _filesystem(source: str, cfg: Reader):
    import fsspec

    return fsspec.core.url_to_fs(source, **remote_options(source, cfg.timeout_s))


def _waits(source: str, cfg: Reader) -> RemoteWaits:
    """How this read waits for `source`: every wait bounded by `cfg.timeout_s`, and said."""
    return RemoteWaits(source, cfg.timeout_s, cfg.who)


def detect_format(source: str, cfg: Reader) -> str:
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
    waits = _waits(source, cfg)
    if waits.call(fs, "isdir", path):
        return "folder"
    if not waits.call(fs, "exists", path):
        raise FileNotFoundError(path)
    raise StageError(
        f"{cfg.setting}={source!r}: cannot tell the format from the name; set "
        f"{cfg.name('format')} to one of csv, tsv, jsonl, parquet, folder, hf"
    )


def read_source(written: str, cfg: Reader,
                formats: tuple[str, ...] | None = None) -> tuple[str, str, Rows]:
    """Resolve the source as the user wrote it (`pkg:` included), detect its format and load
    its rows; any failure is one StageError naming the source (`reading_source`). Returns the
    resolved location, the format and the rows. `formats`: the formats the caller accepts."""
    resolved, fmt, rows, stream = stream_source(written, cfg, formats)
    _collect(stream, rows)
    return resolved, fmt, rows


def stream_source(written: str, cfg: Reader, formats: tuple[str, ...] | None = None
                  ) -> tuple[str, str, Rows, Iterator[Row]]:
    """`read_source` without holding the rows: returns the resolved location, the format, the
    tally and an iterator of the rows. The format is detected now; the source is opened when
    the first row is asked for. The tally (drops, skips) fills as the rows are read and is
    complete once the iterator is exhausted; any failure to read, then or later, is the same
    StageError naming the source as `read_source` raises."""
    resolved = resolve_location(written)
    with reading_source(written, resolved, cfg.format, cfg):
        fmt = detect_format(resolved, cfg)
    if formats and fmt not in formats:
        raise StageError(f"{cfg.setting}={written!r} is a {fmt} source; this reads a "
                         f"{', '.join(formats)} file")
    tally = Rows()
    return resolved, fmt, tally, _guarded(iter_rows(resolved, fmt, cfg, tally), written,
                                          resolved, fmt, cfg)


def _guarded(rows: Iterator[Row], written: str, resolved: str, fmt: str,
             cfg: Reader) -> Iterator[Row]:
    """`rows` with every failure inside the reader turned into `reading_source`'s StageError
    (an error raised by whoever consumes the rows is not the reader's and passes unchanged)."""
    with reading_source(written, resolved, fmt, cfg):
        yield from rows


def load_rows(source: str, fmt: str, cfg: Reader) -> Rows:
    """Every row of `source` (a resolved location in format `fmt`) in `Rows` lists."""
    rows = Rows()
    _collect(iter_rows(source, fmt, cfg, rows), rows)
    return rows


def _collect(stream: Iterable[Row], rows: Rows) -> None:
    for text, label, origin in stream:
        rows.texts.append(text)
        rows.labels.append(label)
        rows.origins.append(origin)


def iter_rows(source: str, fmt: str, cfg: Reader, tally: Rows) -> Iterator[Row]:
    """The rows of `source` one at a time, each row that cannot be read counted in `tally`.
    A source that yields no row at all is a StageError (after the last record is read, so the
    message can say what was dropped or skipped instead)."""
    loader = {
        "csv": _load_delimited,
        "tsv": _load_delimited,
        "parquet": _load_table,
        "jsonl": _load_jsonl,
        "folder": _load_folder,
        "hf": _load_hf,
    }[fmt]
    n = 0
    for row in loader(source, fmt, cfg, tally):
        n += 1
        yield row
    if not n:
        problems = "; ".join(filter(None, [describe_drops(tally), describe_skips(tally)]))
        raise StageError(f"{cfg.setting}={source!r}: no readable rows"
                         + (f" ({problems})" if problems else ""))


@contextlib.contextmanager
def reading_source(written: str, resolved: str, fmt: str, cfg: Reader) -> Iterator[None]:
    """Any failure to read the source becomes one StageError that names it, says what went
    wrong in words and what to change (the one reader-level error path of this stage)."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:
        raise StageError(_source_problem(written, resolved, fmt, cfg, err)) from err


def _source_problem(written: str, resolved: str, fmt: str, cfg: Reader,
                    err: Exception) -> str:
    where = f"{cfg.setting}={written!r}" + (f" ({resolved})" if resolved != written else "")
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
        fmt_name = cfg.name("format")
        return (f"{where} is a folder, but {fmt_name} is {fmt!r}; set {fmt_name}: "
                "folder (one sub-folder per class) or auto")
    if isinstance(err, NotADirectoryError) and fmt == "folder":
        fmt_name = cfg.name("format")
        return (f"{where} is a file, but {fmt_name} is 'folder'; set {fmt_name} to the "
                "file's format (csv, tsv, jsonl, parquet) or auto")
    compression = next((_COMPRESSION_SUFFIXES[s.lower()] for s in
                        PurePosixPath(resolved).suffixes[::-1]
                        if s.lower() in _COMPRESSION_SUFFIXES), "")
    kind = f"{compression}-compressed {fmt}" if compression else fmt
    return (f"{where}: cannot read it as {kind} ({why}); the file is damaged, truncated or not "
            f"what its name says: fix it, or set {cfg.name('format')} to its real format")


@contextlib.contextmanager
def _open(source: str, cfg: Reader, sequential: bool = True) -> Iterator[BinaryIO]:
    """`source` open for binary reading, decompressed as its suffix says. A remote one goes
    through `locations.RemoteWaits` (each wait bounded by `cfg.timeout_s` and said; streamed over
    HTTP when `sequential`, i.e. read from start to end, never seeked)."""
    import fsspec
    from fsspec.compression import compr
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.utils import infer_compression

    fs, path = _filesystem(source, cfg)
    if isinstance(fs, LocalFileSystem):
        with fsspec.open(source, "rb", compression="infer") as fh:
            yield fh
        return
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(_waits(source, cfg).open(fs, path, sequential))
        compression = infer_compression(path)
        if compression:
            fh = stack.enter_context(compr[compression](fh, mode="rb"))
        yield fh


def _require_columns(columns: list[str], cfg: Reader, source: str) -> None:
    missing = [c for c in cfg.columns if c not in columns]
    if missing:
        settings = " / ".join(cfg.name(k) for k in ("text_column", "label_column")
                              if getattr(cfg, k))
        raise StageError(
            f"{source}: missing column(s) {missing}; it has {list(columns)}. Set "
            f"{settings} to the right names."
        )
    for key, name in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if name is None:
            continue
        where = [i + 1 for i, c in enumerate(columns) if c == name]
        if len(where) > 1:
            raise StageError(
                f"{source}: {len(where)} columns are named {name!r} (columns "
                f"{', '.join(map(str, where))} of {list(columns)}), so {cfg.name(key)} is "
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


def _load_delimited(source: str, fmt: str, cfg: Reader, rows: Rows) -> Iterator[Row]:
    """CSV/TSV through the csv module, record by record, so every bad record is counted with
    its line number (pandas' readers silently swallow some, e.g. an unterminated quote or a
    field over the csv module's 128 KiB limit).

    A record that does not parse (a quote never closed swallows every line after it; a stray
    quote makes the parser take a good line into a bad record) is dropped as `malformed` at its
    first line, and the lines after that are parsed again, so each physical line ends up in a
    kept record or a counted one. A record that parses into the wrong number of fields is
    dropped whole, with its line span."""
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
        ti = header.index(cfg.text_column)
        li = header.index(cfg.label_column) if cfg.label_column else None
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
            yield record[ti], (record[li] if li is not None else None), origin


def _load_table(source: str, fmt: str, cfg: Reader, rows: Rows) -> Iterator[Row]:
    """Parquet through pyarrow, `cfg.batch_rows` rows at a time, page by page (`READ_BUFFER`)
    and only the text and label columns, values as Python objects: an integer label column
    with nulls stays integers and None (pandas would turn it into floats and NaN)."""
    import pyarrow.parquet as pq

    with _open(source, cfg, sequential=False) as fh:
        table = pq.ParquetFile(fh, pre_buffer=False, buffer_size=READ_BUFFER)
        _require_columns(table.schema_arrow.names, cfg, source)
        n = 0
        for batch in table.iter_batches(batch_size=cfg.batch_rows, columns=list(cfg.columns)):
            texts = batch.column(cfg.text_column).to_pylist()
            labels = (batch.column(cfg.label_column).to_pylist() if cfg.label_column
                      else [None] * len(texts))
            for text, label in zip(texts, labels, strict=True):
                n += 1
                yield text, label, f"{source}:row {n}"


def _json_object(line: str, cfg: Reader) -> dict | str:
    """The JSON object on `line`, or why it is malformed."""
    keys = cfg.columns
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


def _load_jsonl(source: str, fmt: str, cfg: Reader, rows: Rows) -> Iterator[Row]:
    """One JSON object per line, read line by line."""
    seen_columns: set[str] = set()
    n = 0
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
            if any(c not in record for c in cfg.columns):
                rows.drop("missing_field", origin)
                continue
            n += 1
            yield (record[cfg.text_column],
                   record[cfg.label_column] if cfg.label_column else None, origin)
    if not n and seen_columns:
        _require_columns(sorted(seen_columns), cfg, source)


def _walk_remote(fs, root: str, waits: RemoteWaits) -> Listing:
    """Files under a remote folder (object stores have no links): hidden entries left out."""
    listing, hidden = Listing(), set()
    base = PurePosixPath(root)
    for path in sorted(waits.watched(fs, "find", root)):
        parts = PurePosixPath(path).relative_to(base).parts
        dot = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if dot is not None:
            hidden.add("/".join(parts[: dot + 1]))
        else:
            listing.files.append(("/".join(parts), path))
    listing.skipped = [("hidden", name) for name in sorted(hidden)]
    return listing


def _load_folder(source: str, fmt: str, cfg: Reader, rows: Rows) -> Iterator[Row]:
    """One sub-folder per class (its name is the label), one UTF-8 text file per example, read
    file by file.

    The walk never leaves the source folder and never reads hidden entries
    (`locations.walk_local`); folders named `_name` at the top (e.g. `__pycache__` in a packaged
    dataset) and files outside any class folder are not classes. Every entry left out is
    counted by reason (FOLDER_SKIP_REASONS) in report.json `skipped`."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = _filesystem(source, cfg)
    local = isinstance(fs, LocalFileSystem)
    waits = _waits(source, cfg)
    listing = walk_local(root) if local else _walk_remote(fs, root, waits)
    read: Callable[[object], bytes] = (
        (lambda path: Path(path).read_bytes()) if local
        else (lambda path: waits.watched(fs, "cat_file", path)))
    base = source.rstrip("/")
    private = {name for name in (PurePosixPath(entry).name for entry in
                                 waits.call(fs, "ls", root, detail=False)
                                 if waits.call(fs, "isdir", entry))
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
        yield text, top, origin
    for name in sorted(private):
        rows.skip("private_folder", f"{base}/{name}")
    if not n_files:
        skipped = describe_skips(rows)
        raise StageError(f"{source}: no files in class sub-folders (one sub-folder per class, "
                         "one text file per example)" + (f"; skipped {skipped}" if skipped
                                                         else ""))


def _load_hf(source: str, fmt: str, cfg: Reader, rows: Rows) -> Iterator[Row]:
    """A Hugging Face dataset split (memory-mapped Arrow on disk), `cfg.batch_rows` rows at a
    time; a ClassLabel column gives its class names."""
    try:
        import datasets
    except ImportError:
        raise StageError(
            "hf: sources need the Hugging Face `datasets` package: pip install 'still[hf]'"
        ) from None
    name = source.removeprefix("hf:")
    ds = datasets.load_dataset(name, split=cfg.hf_split)
    _require_columns(ds.column_names, cfg, source)
    names = (getattr(ds.features[cfg.label_column], "names", None) if cfg.label_column
             else None)
    for start in range(0, len(ds), cfg.batch_rows):
        batch = ds[start : start + cfg.batch_rows]
        texts = list(batch[cfg.text_column])
        if cfg.label_column:
            labels = batch[cfg.label_column]
            labels = [names[i] for i in labels] if names else list(labels)
        else:
            labels = [None] * len(texts)
        for i, (text, label) in enumerate(zip(texts, labels, strict=True), start=start):
            yield text, label, f"{source}[{cfg.hf_split}]:{i}"
