"""Text cleaning shared by prepare, the tokenizer and `still predict`: what counts as a usable text
(`text_problem`), valid Unicode (`clean_unicode`), and a cut at a word boundary (`cut_at_word`)."""

from __future__ import annotations


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
