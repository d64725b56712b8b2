"""The row rules of prepare and `still predict`: what counts as a usable text (`text_problem`),
valid Unicode (`clean_unicode`), a cut at a word boundary (`cut_at_word`), a raw label's class
name (`label_name`: spellings, numbers, case; see components/prepare.py) and one raw row
cleaned or given its drop reason (`clean_row`, `BAD_ROW_REASONS`)."""

from __future__ import annotations

import math
import re
import unicodedata
from decimal import Decimal

from components.config import Prepare


def cut_at_word(text: str, max_chars: int) -> str:
    """`text` when it is at most `max_chars` long, else its start cut at the last whitespace at
    or before `max_chars` (no word is split; trailing whitespace dropped), or at `max_chars`
    itself when there is none (a text without spaces: a blob, CJK)."""
    if len(text) <= max_chars:
        return text
    end = max_chars  # text[max_chars] exists: the text is longer
    while end > 0 and not text[end].isspace():
        end -= 1
    return text[:end].rstrip() if end > 0 and text[:end].strip() else text[:max_chars]


def clean_unicode(text: str) -> bool:
    """False for text holding lone surrogates: undecodable bytes (read with surrogateescape) or
    a JSON `\\udc80` escape. Parquet cannot store them. U+FFFD is an ordinary character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_problem(text: object, min_chars: int) -> str | None:
    """Why `text` cannot be used (a drop reason), or None. A usable text is a string of valid
    Unicode at least `min_chars` long after stripping surrounding whitespace."""
    if text is None or not isinstance(text, str):
        return "missing_text"
    if not clean_unicode(text):
        return "not_utf8"
    if len(text.strip()) < min_chars:
        return "empty_text"
    return None


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


def clean_row(text: object, label: object, cfg: Prepare) -> tuple[str | None, str, str]:
    """One raw row as (drop reason, text, class name): the reason is None for a usable row,
    whose text is then stripped of surrounding whitespace; otherwise text and name are ""."""
    if isinstance(label, list | dict):
        return "invalid_label", "", ""
    name = label_name(label, cfg)
    if name is None:
        return "missing_label", "", ""
    problem = text_problem(text, cfg.min_chars)
    if problem != "missing_text" and not clean_unicode(name):
        problem = "not_utf8"  # a label holding undecodable bytes
    if problem:
        return problem, "", ""
    return None, text.strip(), name
