"""The report's HTML: one self-contained page (inline CSS, images by relative path), every value escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["image_html", "render_page", "table_html"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .35em .8em; text-align: left; }
th { background: #f2f4f7; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
p.caption { color: #555; font-size: .92em; }
"""


def table_html(rows: Sequence[Mapping[str, object]]) -> str:
    """An HTML table: one row per mapping, columns the keys in order of first appearance; floats to 2 decimals."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def render_page(title: str, notes: Sequence[str], sections: Sequence[tuple[str, str]]) -> str:
    """The page: ``title``, ``notes`` as paragraphs, then each ``(heading, html body)`` section."""
    paragraphs = "\n".join(f"<p>{html.escape(note)}</p>" for note in notes)
    body = "\n".join(f"<section>\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>" for heading, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{paragraphs}\n{body}\n</body>\n</html>\n"
    )


def image_html(file_name: str, alt: str, caption: str) -> str:
    """An image (relative path) with its caption."""
    return f'<img src="{html.escape(file_name)}" alt="{html.escape(alt)}">\n<p class="caption">{html.escape(caption)}</p>'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)
