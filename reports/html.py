"""One self-contained, offline HTML report of a run.

The page opens with the answer: prefill | decode | setup and outside | generate side by side
(:meth:`probe.Run.headline`, formatted as the terminal's ``print(run)``), then what was
generated and the prompt exactly as it was run; the details follow.

- plotly.js is inlined once in the head; no external script, font, stylesheet or image.
- A Content-Security-Policy admits exactly the page's own scripts (by SHA-256 hash) and no
  network at all, so even a string that escaped escaping could not run or fetch anything.
- Element ids are fixed names (``fig-phase-blocks`` ...) and nothing depends on the clock or
  on randomness: two builds from the same run are byte-identical.
- Every string that came from the user or the model (prompt, model id, paths, module names)
  goes through :func:`html.escape`; tables are plain HTML, readable without JavaScript. Those
  strings are capped (:mod:`reports.text`: 300 characters, the prompt and the generated text 4,000), so a huge name
  cannot make a huge page.
- Only aggregates are embedded (figures bin long runs; tables are per block, capped), so the
  size is bounded whatever the number of call rows.
- The "Roofline and bounds" section uses the roofs stored with the run (or a GPU's datasheet
  entry), never a measurement on the machine building the report (:mod:`reports.cost_view`).
- A run merged from several ranks (tensor parallel) shows a headline row per rank, the
  per-block bars per phase and rank, a per-rank table and the shape walkthrough per rank.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from probe import fmt
from probe.analysis.headline import TOKENS_NOTE, TOTAL, headline_cells, sequences
from probe.store import write_text
from probe.store.outdir import GENERATOR_META

from . import figures, tree_figures
from .tables import per_rank_summary
from .text import MAX_LONG_TEXT, cap, run_prompt

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from probe.analysis.run import Run

    from .cost_view import CostView

PLOTLY_CONFIG = {"displaylogo": False, "showSendToCloud": False, "responsive": True}
MAX_TABLE_ROWS = 300
MAX_PROMPT_CHARS = MAX_LONG_TEXT

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


# --------------------------------------------------------------------------- building blocks
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
                       default_height=f"{figures.HEIGHT}px")


_SCRIPT = re.compile(r"<script(?:\s[^>]*)?>(.*?)</script>", re.S)


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


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
    js = _plotly_js()
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode('utf-8')).digest()).decode()}'"
                      for s in dict.fromkeys([js, *scripts]))
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


def _facts(run: "Run") -> pd.DataFrame:
    """Key/value facts of the run for the top table."""
    rows: list[tuple[str, object]] = []
    gen = run.runs[run.runs["kind"] == "generate"] if not run.runs.empty else run.runs
    r = gen.iloc[0] if len(gen) else (run.runs.iloc[0] if len(run.runs) else None)
    if r is not None:
        for col in ("model_id", "model_class", "parameters", "weights_source", "dtype", "device", "attn_implementation", "depth",
                    "gpu_name", "torch_version", "transformers_version", "probe_version", "started_at"):
            rows.append((col, r[col]))
        if len(gen) > 1:
            rows.append(("generate calls", len(gen)))
    rank_list = figures.ranks(run)
    if len(rank_list) > 1:
        rows.append(("ranks", ", ".join(str(r) for r in rank_list)))
    for key in ("command", "chat_template", "decode_stride", "dropped_steps"):
        if key in run.meta:
            rows.append((key, run.meta[key]))
    if run.path is not None:
        rows.append(("run directory", str(run.path)))
    rows.append(("recorded", f"{len(run.calls):,} calls, {len(run.steps):,} steps, {len(run.runs):,} runs"))
    return pd.DataFrame({"fact": [k for k, _ in rows], "value": [format_cell(k, v) for k, v in rows]},
                        dtype="string")


def headline_html(run: "Run") -> str:
    """The first panel: prefill | decode | setup and outside | generate side by side
    (:meth:`probe.Run.headline` as :func:`probe.headline.headline_cells` formats it)."""
    table = run.headline()
    cells = headline_cells(table)
    if cells.empty:
        return ('<h2 id="phases">Prefill vs decode</h2><p class="note" id="phases-note">No generate() call in '
                "this run: nothing to split into prefill and decode.</p>")
    n = int(table["generates"].iloc[0])
    head = "".join(f'<th scope="col" class="{"gen" if p == TOTAL else "part"}">{esc(p)}</th>' for p in cells.columns)
    rows = "".join(
        f'<tr><th scope="row" class=t>{esc(label)}</th>'
        + "".join(f'<td{" class=gen" if p == TOTAL else ""}>{esc(v)}</td>' for p, v in zip(cells.columns, row))
        + "</tr>" for label, row in zip(cells.index, cells.itertuples(index=False)))
    notes = [TOKENS_NOTE[:1].upper() + TOKENS_NOTE[1:] + ".",
             f"Shares are of the wall time of {'the' if n == 1 else f'all {n}'} generate call{'s' if n != 1 else ''}: "
             "the parts add up to 100%. Setup and outside: generate's own time before the first forward and after "
             "the last step."]
    if "peak memory" not in cells.index:
        notes.append("Peak memory is the CUDA allocator's: not measured on the CPU.")
    return ('<h2 id="phases">Prefill vs decode</h2><div class="tw"><table id="phases-table">'
            f'<thead><tr><th class=t></th>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
            f'<p class="note">{esc(" ".join(notes))}</p>')


def generated_html(run: "Run") -> str:
    """What the generate calls produced (text, or shortened token ids where the run kept no text),
    then the prompt, exactly as it was run where the run kept it; both escaped and capped."""
    parts = []
    seqs = sequences(run.generated())
    if seqs:
        parts.append('<h2 id="generated">Generated</h2>')
        if not any(is_text for _, _, is_text in seqs):
            parts.append('<p class="note">The run kept no text (<code>--no-text</code>, or no tokenizer): '
                         "the generated token ids.</p>")
        for i, (label, content, _) in enumerate(seqs):
            if label:
                parts.append(f'<p class="note seq">{esc(label)}</p>')
            parts.append(f'<pre id="generated-text-{i}">{esc(cap(content, MAX_PROMPT_CHARS))}</pre>')
    prompt = run_prompt(run.meta)
    if prompt is not None:
        how, text = prompt
        parts.append(f'<h2 id="prompt">Prompt</h2><p class="note">{esc(how.capitalize())}.</p>'
                     f'<pre id="prompt-text">{esc(cap(text, MAX_PROMPT_CHARS))}</pre>')
    return "".join(parts)


#: (element id, section title, builder) of the report's figures, in page order
FIGURES = (
    ("fig-phase-blocks", "Prefill vs decode per block", lambda r: figures.phase_blocks(r.calls, r.steps, by="block")),
    ("fig-phase-roles", "Prefill vs decode per role", lambda r: figures.phase_blocks(r.calls, r.steps, by="role")),
    ("fig-step-breakdown", "One step, broken down", lambda r: figures.step_breakdown(r.calls, r.steps, r.sampling)),
    ("fig-sampling-stages", "The sampling step, stage by stage",
     lambda r: figures.sampling_stages(r.sampling, r.steps)),
    ("fig-tree-prefill", "Module tree, prefill", lambda r: tree_figures.icicle(r.calls, r.steps, phase="prefill")),
    ("fig-tree-decode", "Module tree, decode", lambda r: tree_figures.icicle(r.calls, r.steps, phase="decode")),
    ("fig-layer-roles", "Layer x role", lambda r: tree_figures.layer_roles(r.calls, r.steps)),
    ("fig-layer-heatmap", "Layer x step (decode)", lambda r: figures.layer_heatmap(r.calls, phase="decode")),
    ("fig-token-latency", "Per-token latency", lambda r: figures.token_latency(r.steps, r.runs)),
    ("fig-latency-kv", "Latency vs KV length", lambda r: figures.latency_vs_kv(r.steps)),
    ("fig-memory", "Memory and KV cache", lambda r: figures.memory_over_steps(r.steps, r.calls)),
)


#: tree level the report's tree table folds at (1 = top-level calls, 2 = at depth all the blocks inside the base model;
#: the icicle and the dashboard's Tree view go deeper)
TREE_TABLE_DEPTH = 2


def _tree_rows(run: "Run") -> pd.DataFrame:
    """The call tree collapsed at :data:`TREE_TABLE_DEPTH`, indented by depth, without the path."""
    t = run.tree(depth=TREE_TABLE_DEPTH)
    name = ["\u00a0\u00a0" * (int(d) - 1) + str(m) for d, m in zip(t["depth"], t["module"])]
    out = t.drop(columns=["node", "parent_node", "module"])
    out.insert(1, "module", pd.Series(name, dtype="string"))
    return out


def roofline_table(view: "CostView") -> pd.DataFrame:
    """The roofline rows as the report shows them (rank only where there are several)."""
    roof = view.roof
    pk = view.peaks
    biggest = pk.flops_per_s if pk is not None else float(roof["achieved_tflop_s"].max(skipna=True) or 0) * 1e12
    giga = not biggest >= 1e12  # NaN (no FLOPs at all) reads best in GFLOP/s too
    unit = "achieved_gflop_s" if giga else "achieved_tflop_s"
    out = pd.DataFrame({"rank": roof["rank"], "block": roof["module"], "phase": roof["phase"]})
    if not view.has_roofs:
        out["calls"] = roof["calls"]
        out["flops"] = roof["flops"]
        out["bytes_moved"] = roof["bytes_moved"]
    out["time_ms"] = roof["time_ms"]
    out[unit] = roof["achieved_tflop_s"] * (1e3 if giga else 1.0)
    out["achieved_gb_s"] = roof["achieved_gb_s"]
    out["intensity_flops_per_byte"] = roof["intensity_flops_per_byte"]
    if view.has_roofs:
        out["roof_fraction"] = roof["roof_fraction"]
        out["bound"] = roof["bound"]
        out["reason"] = roof["reason"]
    if len(figures.ranks(roof)) == 1:
        out = out.drop(columns="rank")
    return out


def _roofline_section(doc: Page, run: "Run", view: "CostView") -> None:
    """The "Roofline and bounds" section: roofs and their source, the chart, the table."""
    from probe.analysis.roofline import bound_summary

    from .cost_view import COST_NOTE, roofline_figure

    doc.add('<h2 id="roofline">Roofline and bounds</h2>')
    if not view.has_cost:
        doc.add(f'<p class="note" id="roofline-note">{esc(view.note)}</p>')
        return
    if view.has_roofs:
        doc.add(f'<p class="note" id="roofline-peaks">{esc(view.peaks_text())}</p>')
        doc.figure(roofline_figure(view), "fig-roofline", None)
    else:
        doc.add(f'<p class="note" id="roofline-note">{esc(view.note)}</p>')
    doc.add(f'<p class="note">{COST_NOTE}</p>')
    doc.add(table_html(roofline_table(view), caption="Per block (role) and phase", table_id="roofline-table"))
    if view.has_roofs:
        bounds = bound_summary(view.roof)
        if not bounds.empty:
            doc.add(table_html(bounds, caption="Share of block time per bound", table_id="bound-table"))


def _serving_section(doc: Page, run: "Run") -> None:
    """The "Serving" section of a continuous-batching run: requests, batches, latency, throughput."""
    from . import serve_figures as sf

    serve = run.runs[run.runs["kind"] == "serve"] if not run.runs.empty else run.runs
    if serve.empty and run.requests.empty:
        return
    doc.add('<h2 id="serving">Serving (continuous batching)</h2>')
    sv = run.meta.get("serving", {})
    bench = run.meta.get("serve_bench")
    facts = [f"{len(serve)} serving loop(s), {len(run.requests)} requests, "
             f"{len(sf.serve_steps(run.steps))} packed forwards"]
    if sv:
        facts.append(f"CUDA graphs: {sv.get('cuda_graphs')}")
        facts.append(f"batch layout: {sv.get('layout')}")
    if bench:
        facts.append("workload: " + ", ".join(f"{k} {v}" for k, v in bench.items()))
    doc.add('<p class="note" id="serving-facts">' + esc("; ".join(facts)) + "</p>")
    doc.add(table_html(sf.serve_table(run.requests), caption="Requests by status (ms)", table_id="serve-table"))
    doc.add('<p class="note">Queue: add_request() to the scheduling pass that admitted the request. TTFT: '
            "add_request() to its first token handed to the manager after sampling. ITL: between its consecutive "
            "tokens. A mixed step packs prompt tokens (prefill, possibly one chunk of a prompt) with one token of "
            "each decoding request.</p>")
    for div_id, title, fig in (
        ("fig-serve-timeline", "Request timeline", sf.request_timeline(run.requests)),
        ("fig-serve-batches", "Batch composition per step", sf.batch_composition(run.steps)),
        ("fig-serve-latency", "TTFT and ITL distributions", sf.latency_distributions(run.requests)),
        ("fig-serve-throughput", "Throughput over time", sf.throughput_over_time(run.steps)),
    ):
        doc.figure(fig, div_id, None)
    try:
        from probe.analysis.apportion import step_split

        split = step_split(run.apportion())
    except Exception as exc:  # a run saved without its config: no cost model, say so
        split = None
        doc.add(f'<p class="note" id="serve-split-note">No prefill/decode split of block time: {esc(exc)}</p>')
    if split is not None:
        doc.figure(sf.mixed_split(split), "fig-serve-split", None)
        doc.add('<p class="note">Each block call of a mixed step is split between its prefill and decode tokens '
                "by the cost model's work per token kind (attention over each request's own context), weighted by "
                "a time-vs-work line fitted on the run's pure prefill and pure decode steps; the parts add up to "
                "the measured time. The markers show what that line predicts for the whole step.</p>")


def noise_html(run: "Run") -> str:
    """The busy-machine warning (or the quiet figure) and how the run was warmed up."""
    b = run.noise()
    parts = []
    if b.busy:
        msg = esc(b.message()[:1].upper() + b.message()[1:]).replace("`--repeat`", "<code>--repeat</code>")
        parts.append(f'<p class="warn" id="busy-warning"><b>{msg}.</b> '
                     f"{b.steps_descheduled} of {b.steps} steps were descheduled. See "
                     '<a href="#noise-note">how this is measured</a>.</p>')
    warm = run.meta.get("warmup")
    if isinstance(warm, dict):
        n = warm.get("generates")
        cold = warm.get("cold_run_ids") or []
        text = (f"Warm-up: {n} unrecorded generate call(s) before recording." if n else
                "No warm-up: the first recorded generate call is cold (it pays one-time start-up).")
        if cold:
            text += " Cold: " + ", ".join(str(c) for c in cold) + "."
        parts.append(f'<p class="note" id="warmup-note">{esc(text)}</p>')
    if b.wait_pct == b.wait_pct:
        par = f", torch threads {b.threads} on {b.cores} core(s)" if b.threads else ""
        parts.append(
            f'<p class="note" id="noise-note">Machine: {b.wait_pct:.1f} % of step time waiting for a CPU '
            f"(warning above {b.threshold_pct:.0f} %{esc(par)}): the run-queue wait of the process's threads "
            "over their run time, and each step's wall time beyond its CPU time. It stretches host times and "
            "TTFT, TPOT and tok/s" + ("; CUDA event times (gpu_ms) are the GPU's own." if b.cuda else ".") + "</p>")
    return "".join(parts)


def spread_html(run: "Run") -> str:
    """Median and min-max over the recorded generate calls (``probe run --repeat N``), if several."""
    head = run.headline_spread()
    if head.empty or int(head["generates"].max()) < 2:
        return ""
    n = int(head["generates"].max())
    blocks = run.spread("block").drop(columns="level")
    metric = head["metric"].astype(str)
    head = pd.DataFrame({"metric": metric, "generates": head["generates"],
                         **{c: [format_cell(m, v) for m, v in zip(metric, head[c])] for c in ("median", "min", "max")},
                         "spread_pct": [format_cell("spread_pct", v) for v in head["spread_pct"]]})
    return (f'<h2 id="spread">Spread over {n} generate calls</h2>'
            + table_html(head, caption="Headline metrics: median and min - max over the generate calls",
                         table_id="headline-spread-table")
            + table_html(blocks, caption="Per block and phase: each generate call's self ms, median and min - max",
                         table_id="spread-table")
            + '<p class="note">spread_pct = (max - min) / median. Min - max is what was seen over the repeats '
              "(with a handful of repeats a percentile range would only interpolate between them).</p>")


def render_report(run: "Run", view: "CostView | None" = None) -> str:
    """The HTML report of ``run`` as a string (see the module docstring for its guarantees).

    Args:
        run: the recorded run (one rank, or several merged by ``probe.load``).
        view: its :func:`reports.cost_view.cost_view`, if the caller has it already.
    """
    from .cost_view import cost_view
    from .text import display_run

    run = display_run(run)
    view = cost_view(run) if view is None else view
    multi = len(figures.ranks(run)) > 1
    r0 = run.runs[run.runs["kind"] == "generate"] if not run.runs.empty else run.runs
    if r0.empty:
        r0 = run.runs
    model = str(r0["model_id"].iloc[0]) if len(r0) and not fmt.is_missing(r0["model_id"].iloc[0]) else "probe run"
    doc = Page()
    doc.add(f"<h1>probe report: {esc(model)}</h1>")
    serving = not run.requests.empty or (not run.runs.empty and (run.runs["kind"] == "serve").any())
    links = (("phases", "Prefill vs decode"), ("headline", "Per generate call"), *((("serving", "Serving"),) if serving else ()),
             *[(i + "-title", t) for i, t, _ in FIGURES],
             ("roofline", "Roofline and bounds"), ("tables", "Tables"), ("shapes", "Shapes"))
    doc.add("<nav>" + "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in links) + "</nav>")
    doc.add(headline_html(run))  # the answer first: prefill vs decode, adding up to the generate call
    doc.add(noise_html(run))  # how far to trust it, right below
    doc.add(generated_html(run))
    doc.add(table_html(_facts(run), table_id="facts"))
    doc.add('<h2 id="headline">Per generate call</h2>')
    head = figures.headline(run.runs, run.steps, meta=run.meta)
    if serving and not (run.runs["kind"] == "generate").any():
        doc.add('<p class="note" id="headline-note">No generate() call in this run: its requests and steps are '
                'in <a href="#serving">Serving</a>.</p>')
    else:
        # the model is named in the title and the facts above: its column only widened the table
        doc.add(table_html(head.drop(columns="model_id"), table_id="headline-table"))
    doc.add('<p class="note">TTFT: from entering generate() to the first token chosen. TPOT: time between '
            "consecutive tokens over the decode steps. Share: a row's self time (its time not inside another "
            "recorded call; a block's self time is its whole subtree) over its phase's forward time, so the rows "
            "of a level add up to 100 % with the residue, the forward time inside no recorded call."
            + (" peak_mem_bytes is the CUDA allocator's peak, so it is blank for a run on the CPU; there the "
               "probe records each block's output bytes and the KV cache (see Memory and KV cache)."
               if len(head) and head["peak_mem_bytes"].isna().all() else "")
            + (" This run merges several ranks: one headline row per rank's generate call; per-block charts "
               "and tables show each rank." if multi else "") + "</p>")
    doc.add(spread_html(run))
    _serving_section(doc, run)
    for div_id, title, build in FIGURES:
        doc.figure(build(run), div_id, title)
    _roofline_section(doc, run, view)
    doc.add('<h2 id="tables">Tables</h2>')
    doc.add(table_html(run.phase_summary(), caption="Per phase", table_id="phase-table"))
    if len(run.sampling):
        doc.add(table_html(run.sampling_summary(), caption="Sampling step per phase, the time outside the model stage "
                           "by stage: generate's kwargs update, each logits processor, the stopping checks, the "
                           "next inputs, the probe's own bookkeeping and the remainder (ms per step; shares of the "
                           "time outside the model and of the whole step)", table_id="sampling-table"))
    if multi:
        doc.add(table_html(per_rank_summary(run.calls, run.steps, by="role"),
                           caption="Per rank, role and phase (share of that rank's forward time)",
                           table_id="rank-role-table"))
    every = " (all ranks)" if multi else ""
    summ = run.summary()
    blocks = set(summ.loc[summ["level"] == "block", "name"])
    for level, table_id in (("block", "block-table"), ("role", "role-table"), ("module", "module-table")):
        part = summ[summ["level"] == level].drop(columns="level")
        if level == "role" and set(part["name"]) <= blocks:
            continue  # recorded at depth blocks: the roles are the blocks again
        part = part[[c for c in part.columns if part[c].notna().any()]]  # no GPU columns on a CPU run
        doc.add(table_html(part, caption=f"Per {level} and phase{every}: total = inclusive ms, self = the time "
                           "in no recorded call inside it; share = self / the phase's forward time",
                           table_id=table_id))
    doc.add(table_html(_tree_rows(run), caption=f"The call tree down to level {TREE_TABLE_DEPTH} (deeper calls "
                       f"folded into their ancestor's self time){every}", table_id="tree-table"))
    doc.add('<h2 id="shapes">Shape walkthrough</h2>')
    doc.add('<p class="note">Each block\'s input and output shapes for the prefill step and the first '
            "decode step" + (", for every rank (a sharded block shows each rank's width)" if multi else "")
            + ".</p>")
    doc.add(table_html(figures.shape_walkthrough(run.calls), table_id="shape-table", max_rows=600))
    version = run.meta.get("probe_version") or (r0["probe_version"].iloc[0] if len(r0) else "")
    doc.add(f'<p class="note">Written by probe {esc(version)}. The full per-call data is in the CSV '
            "export (<code>probe report RUN_DIR --format csv</code>).</p>")
    return doc.render(f"probe report: {model}")


def write_html(run: "Run", path: str | os.PathLike, view: "CostView | None" = None) -> Path:
    """Write :func:`render_report` of ``run`` to ``path`` (UTF-8) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, render_report(run, view))
    return out
