"""Markdown and HTML for the run report (stages/report.py) and the experiment table
(experiment/table.py): tables from DataFrames, images, self-contained HTML pages, and
matplotlib figures as PNG bytes.

No project imports and nothing heavy (pandas only for type hints): both callers build their
documents from these pieces, so a table or page looks the same wherever it is written.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

PIXELATED = "image-rendering:pixelated"  # small images scaled up stay sharp


def format_cell(value, digits: int | None = None) -> str:
    """A table cell: as str(); with `digits`, floats to that many decimals and a missing value
    (None, NaN) as "-"."""
    if digits is None:
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_cell(text: str) -> str:
    """`text` safe inside a markdown table row: a "|" (a fairness group such as
    "age_50-80|tone_light") escaped, so it does not start a new column."""
    return str(text).replace("|", "\\|")


def markdown_row_cells(row: str) -> list[str]:
    """The cells of a markdown table row `| a | b\\|c |` -> ["a", "b|c"]: split at the pipes
    that `markdown_cell` did not escape."""
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def markdown_table(df: pd.DataFrame, digits: int | None = None, empty: str = "(none)") -> str:
    """A GitHub-style markdown table of `df` (cells by `format_cell`, pipes escaped), or `empty`
    on a line of its own when it has no rows."""
    if df.empty:
        return f"{empty}\n"
    head = ("| " + " | ".join(map(markdown_cell, df.columns)) + " |\n|"
            + "---|" * len(df.columns) + "\n")
    return head + "".join(
        "| " + " | ".join(markdown_cell(format_cell(v, digits)) for v in row) + " |\n"
        for row in df.itertuples(index=False))


def markdown_image(title: str, src: str) -> str:
    return f"![{title}]({src})"


def html_table(df: pd.DataFrame, empty: str = "(none)") -> str:
    """`df` as an HTML table (escaped, "-" for missing values), or `empty` as a paragraph."""
    if df.empty:
        return f"<p>{empty}</p>"
    return df.to_html(index=False, border=1, na_rep="-", escape=True)


def html_rows_table(rows: Iterable[Iterable[str]]) -> str:
    """A plain HTML table of text cells (escaped), one <tr> per row."""
    cells = ["<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
             for row in rows]
    return "<table border=1 cellpadding=4>" + "".join(cells) + "</table>"


def html_heading(level: int, text: str) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def html_paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def html_linked_image(src: str) -> str:
    """An image by its (relative) file name."""
    return f'<img src="{html.escape(src)}" style="{PIXELATED}">'


def html_inline_png(title: str, png: bytes, pixelated: bool = True) -> str:
    """A PNG embedded in the page (base64), so the page is one self-contained file;
    `pixelated` for small images shown scaled up (image grids), not for plots, which a narrow
    window scales down."""
    data = base64.b64encode(png).decode()
    style = f" style='{PIXELATED}'" if pixelated else ""
    return f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'{style}>"


def html_page(title: str, body: Iterable[str], style: str = "") -> str:
    """A complete HTML document around `body` (HTML fragments, joined as they are)."""
    head = f"<title>{html.escape(title)}</title>" + (f"<style>{style}</style>" if style else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'>{head}</head>"
            f"<body>{''.join(body)}</body></html>")


def markdown_to_html(markdown_text: str, title: str,
                     images: Mapping[str, bytes] | None = None) -> str:
    """A page from the markdown this project writes (headings, paragraphs, `| tables |`,
    `![alt](file)` images; bold markers dropped), not general markdown. An image whose file is
    a key of `images` (its PNG bytes) is embedded (base64); any other is linked by name."""
    images = images or {}
    body: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if table:
            body.append(html_rows_table(markdown_row_cells(r) for r in table
                                        if not set(r) <= set("|-")))
            table.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            body.append(html_heading(len(line) - len(line.lstrip("#")), line.lstrip("# ")))
        elif line.startswith("!["):
            src = line[line.index("(") + 1:line.rindex(")")]
            body.append(html_inline_png(line[2:line.index("]")], images[src]) if src in images
                        else html_linked_image(src))
        elif line.strip():
            body.append(html_paragraph(line.replace("**", "")))
    flush()
    return html_page(title, body)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is heavy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout); the figure is closed."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def page_images(page: str) -> list[tuple[str, str]]:
    """(alt, src) of every <img> in an HTML page, in order: how a check reads back what
    `html_inline_png` and `html_linked_image` wrote."""
    from html.parser import HTMLParser

    found: list[tuple[str, str]] = []

    class Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                a = dict(attrs)
                found.append((a.get("alt") or "", a.get("src") or ""))

    Images().feed(page)
    return found
