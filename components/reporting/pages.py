"""HTML pages from Markdown: the evaluation report and the model card page, images inlined."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

REPORT_HTML = "report.html"


_PAGE_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:2em auto;
  padding:0 1em;color:#1f2328;line-height:1.5}
h1,h2{border-bottom:1px solid #d8dee4;padding-bottom:.25em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:.35em .7em;text-align:left;white-space:nowrap}
th{background:#f6f8fa;white-space:normal}tr:nth-child(even) td{background:#fbfcfd}
code{background:#f3f4f6;padding:.1em .3em;border-radius:4px;font-size:.9em}
pre{background:#f6f8fa;padding:.8em 1em;border-radius:6px;overflow-x:auto}
pre code{background:none;padding:0}
img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#57606a;font-size:.9em}
"""


def strip_front_matter(md: str) -> str:
    """Markdown without a leading YAML front-matter block (a model card's metadata)."""
    if md.startswith("---\n"):
        end = md.find("\n---\n", 4)
        if end != -1:
            return md[end + 5:].lstrip("\n")
    return md


def render_markdown(md: str) -> str:
    """HTML of CommonMark + GitHub tables (markdown-it-py), raw HTML in the text escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(
        strip_front_matter(md))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_page(md: str, path: Path, title: str, images: list[Path] = ()) -> None:
    """A self-contained HTML page of Markdown `md`: real tables and headings, every PNG the
    text links next to `path` inlined, then `images` as captioned figures."""
    body = render_markdown(md)

    def inline(match: re.Match) -> str:
        target = path.parent / html.unescape(match.group(1))
        return f'src="{_data_uri(target)}"' if target.is_file() else match.group(0)

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    figures = [f"<figure><img src='{_data_uri(image)}' alt='{html.escape(image.stem)}'>"
               f"<figcaption>{html.escape(image.name)}</figcaption></figure>"
               for image in images]
    page = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
            body, *figures, "</body></html>"]
    path.write_text("\n".join(page) + "\n")


def html_report(md: str, images: list[Path], path: Path) -> None:
    """evaluate's report page: the Markdown report rendered, the plots inlined."""
    html_page(md, path, "still evaluation", images)
