"""Markdown tables from rows of dicts: `markdown_table` (every key a column; the tokenizer's cost
curve, the flows' artifacts, the model card) and `table` (chosen columns with their formats)."""

from __future__ import annotations


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "auto":  # numbers to 4 significant digits, anything else as it is
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return format(value, spec) if spec else str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown table lines; columns are (key, header, format spec or "auto")."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in columns)
                   + " |")
    return out


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of `rows` with every key as a column (the flows' artifacts)."""
    if not rows:
        return "_no rows_"
    keys = dict.fromkeys(k for r in rows for k in r)
    return "\n".join(table(rows, [(k, k, "auto") for k in keys]))
