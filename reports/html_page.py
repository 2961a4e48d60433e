"""The HTML report's page machinery: escaping, plain tables, figures as divs, and the one
self-contained document they go into.

- plotly.js is inlined once in the head; no external script, font, stylesheet or image.
- A Content-Security-Policy admits exactly the page's own scripts (by SHA-256 hash) and no
  network at all, so even a string that escaped escaping could not run or fetch anything.
- Every user string goes through :func:`esc`; tables are plain HTML, readable without
  JavaScript, capped at :data:`MAX_TABLE_ROWS` rows.

Used by the run report (:mod:`reports.html`), the comparison (:mod:`reports.compare`) and the
sweep report (:mod:`reports.sweep_report`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import re
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from probe import fmt
from probe.store.outdir import GENERATOR_META

from .figure_base import HEIGHT
from .text import cap

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

PLOTLY_CONFIG = {"displaylogo": False, "showSendToCloud": False, "responsive": True}
MAX_TABLE_ROWS = 300

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 1.5rem 3rem;color:#222;line-height:1.4}
h1{font-size:1.6rem;margin:1.2rem 0 .3rem}h2{font-size:1.2rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0 1rem;max-width:100%}
.tw{max-width:100%;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:right;vertical-align:top}
th{background:#f4f6f8}td.t,th.t{text-align:left}caption{text-align:left;color:#555;padding:.2rem 0}
pre{background:#f6f8fa;padding:.6rem;white-space:pre-wrap;word-break:break-word;font-size:.85rem}
.note{color:#666;font-size:.85rem}.warn{background:#fff4e5;border:1px solid #f0b46b;padding:.5rem .7rem;color:#7a4100}h1,caption{overflow-wrap:anywhere}td.w{overflow-wrap:anywhere;min-width:16rem}.fig{min-height:420px}nav a{margin-right:1rem}
#phases-table{font-size:1rem}#phases-table td,#phases-table th{padding:.3rem .8rem;min-width:6.5rem}
#phases-table th.part{background:#e8f0fe}#phases-table .gen{font-weight:600}p.seq{margin:.6rem 0 0}
"""


def esc(value: object) -> str:
    """``value`` as HTML text (quotes escaped too, so it is also safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def format_cell(column: str, value: object) -> str:
    """A table cell's text: units from the column name, NA as an empty cell (:func:`probe.fmt.cell`,
    the formats the terminal, the dashboard and Jupyter use too); a long user string capped
    (:mod:`reports.text`)."""
    return str(cap(fmt.cell(column, value)))


def table_html(df: pd.DataFrame, *, caption: str | None = None, max_rows: int = MAX_TABLE_ROWS,
               table_id: str | None = None) -> str:
    """``df`` as a plain, escaped HTML table (at most ``max_rows`` rows, with a note of the rest)."""
    text_cols = {c for c in df.columns if not (pd.api.types.is_numeric_dtype(df[c]) and not
                                               pd.api.types.is_bool_dtype(df[c]))}
    ident = f' id="{esc(table_id)}"' if table_id else ""
    parts = [f'<div class="tw"><table{ident}>']
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    # a long column name may break after each underscore, so a wide table fits the page
    parts.append("<thead><tr>" + "".join(
        f'<th{" class=t" if c in text_cols else ""}>{esc(c).replace("_", "_<wbr>")}</th>' for c in df.columns)
        + "</tr></thead><tbody>")
    shown = df.head(max_rows)
    cols = list(df.columns)
    for row in shown.itertuples(index=False, name=None):
        cells = []
        for c, v in zip(cols, row):
            text = format_cell(str(c), v)
            # a long unbroken string (a capped name) may wrap anywhere rather than widen the page
            cls = (' class="t w"' if len(text) > 60 else " class=t") if c in text_cols else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    if len(df) > max_rows:
        parts.append(f'<p class="note">{len(df) - max_rows:,} more rows are in the CSV export.</p>')
    return "".join(parts)


def figure_html(fig: "go.Figure", div_id: str) -> str:
    """The figure as a ``<div>`` + inline script (no plotly.js), with the fixed id ``div_id``."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOTLY_CONFIG,
                       default_height=f"{HEIGHT}px")


_SCRIPT = re.compile(r"<script(?:\s[^>]*)?>(.*?)</script>", re.S)


@functools.lru_cache(maxsize=1)
def _plotly_js() -> tuple[str, str]:
    """plotly.js and its CSP hash source, read and hashed once per process (4.6 MB)."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    return js, _sha256_source(js)


def _sha256_source(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode('utf-8')).digest()).decode()}'"


def page(title: str, body: Iterable[str], scripts: Iterable[str] = ()) -> str:
    """A complete HTML document: ``body`` fragments after one inlined plotly.js.

    Args:
        title: the document title (escaped here).
        body: HTML fragments, already escaped by the caller.
        scripts: the exact text of each inline script in ``body`` that the caller generated
            (the figures'). The Content-Security-Policy admits plotly.js and these by SHA-256
            and nothing else, and no network source of any kind; a ``<script>`` that slipped
            into ``body`` any other way does not run.
    """
    js, js_hash = _plotly_js()
    hashes = " ".join([js_hash, *(_sha256_source(s) for s in dict.fromkeys(scripts) if s != js)])
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
           "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")
    body_html = "\n".join(body)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'{GENERATOR_META}\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n"
        f"<script>{js}</script>\n</head>\n<body>\n{body_html}\n</body>\n</html>\n"
    )


class Page:
    """Builds a report page: escaped fragments plus figures whose scripts the page trusts."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.scripts: list[str] = []

    def add(self, fragment: str) -> None:
        """Append an HTML fragment (the caller has escaped every user string in it)."""
        self.parts.append(fragment)

    def figure(self, fig: "go.Figure", div_id: str, title: str | None) -> None:
        """Append a section heading (none if ``title`` is None) and ``fig`` as a div with the
        fixed id ``div_id``."""
        frag = figure_html(fig, div_id)
        # plotly escapes "<" inside its JSON, so these scripts hold no user-made tags
        self.scripts.extend(_SCRIPT.findall(frag))
        head = "" if title is None else f'<h2 id="{esc(div_id)}-title">{esc(title)}</h2>'
        self.parts.append(f'{head}<div class="fig">{frag}</div>')

    def render(self, title: str) -> str:
        """The complete document."""
        return page(title, self.parts, self.scripts)
