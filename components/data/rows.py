"""What a source reader is asked for and what it reports, shared by prepare and `still predict
--input` so that a bad row gets the same words in both: `Reader` (what to read, and how the
user spells the settings in messages: `prepare.format` for the stage, `--format` for the
command line), `Rows` (the rows collected, when they are collected, and the tally of rows that
could not even be read and of folder entries not read, by reason with a few origins each), and
the wording of that tally (`describe_drops`, `describe_skips`). The readers themselves are in
`components.data.readers`; what counts as a usable text in `components.data.cleaning`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from components.data.artifacts import BATCH_ROWS
from components.data.locations import SKIP_REASONS


@dataclass(frozen=True)
class Reader:
    """What to read and how the user spelled the settings.

    Args:
        setting: the name of the source setting in messages (`prepare.source`, `--input`).
        format: auto|csv|tsv|jsonl|parquet|folder|hf.
        text_column: the text field.
        label_column: the label field; None reads texts only (a folder source still names
            its class folders, which the caller may ignore).
        timeout_s: connect/read timeout of a remote source.
        hf_split: the split of an `hf:` dataset.
        option: how other settings are named in hints: `prepare.{}` or `--{}`.
        batch_rows: how many rows of a table format (Parquet, a Hugging Face dataset) are
            decoded at a time: what a reader holds in memory besides the current row.
        who: the stage or command reading, in the lines that say what a wait for a remote
            source waits for (`locations.RemoteWaits`).
    """

    setting: str
    format: str = "auto"
    text_column: str = "text"
    label_column: str | None = "label"
    timeout_s: float = 60.0
    hf_split: str = "train"
    option: str = "prepare.{}"
    batch_rows: int = BATCH_ROWS
    who: str = "prepare"

    def name(self, key: str) -> str:
        """The user's name of a setting (`prepare.text_column`, `--text-column`)."""
        return self.option.format(key if "." in self.option else key.replace("_", "-"))

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.text_column,) + ((self.label_column,) if self.label_column else ())


# Entries of a folder source that are not read (never rows): locations.SKIP_REASONS plus these.
FOLDER_SKIP_REASONS = {
    **SKIP_REASONS,
    "private_folder": "a top-level folder named '_name' (e.g. __pycache__), not a class",
    "not_in_a_class_folder": "a file directly in the source folder, outside any class folder",
}
EXAMPLES_PER_REASON = 3
# One raw row as read: (text, label, origin); the label is None when no label column is read.
Row = tuple[object, object, str]


@dataclass
class Rows:
    """Raw examples as loaded, plus a tally of the rows that could not even be read and of the
    entries of a folder source that were not read. When the rows are streamed
    (`stream_source`), the lists stay empty and only the tally is filled."""

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
    if len(seen) < EXAMPLES_PER_REASON:
        seen.append(origin)


def _describe(counts: Counter, examples: dict[str, list[str]],
              reasons: tuple[str, ...] | None = None) -> str:
    parts = []
    for reason, n in sorted(counts.items()):
        if reasons is None or reason in reasons:
            where = ", ".join(examples.get(reason, []))
            parts.append(f"{reason}: {n}" + (f" (e.g. {where})" if where else ""))
    return "; ".join(parts)


def describe_drops(tally: Rows, reasons: tuple[str, ...] | None = None) -> str:
    return _describe(tally.dropped, tally.examples, reasons)


def describe_skips(tally: Rows) -> str:
    return _describe(tally.skipped, tally.skipped_examples)
