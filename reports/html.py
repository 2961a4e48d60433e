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

This module puts the page together (:func:`render_report`, :data:`FIGURES` in page order); the
page machinery (escaping, tables, the document and its policy) is :mod:`reports.html_page`, and
the sections drawn from the run are :mod:`reports.html_sections`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from probe import fmt
from probe.store import write_text

from . import figures, tree_figures
from .html_page import (  # noqa: F401  (page machinery: part of this module's API)
    CSS, MAX_TABLE_ROWS, PLOTLY_CONFIG, Page, esc, figure_html, format_cell, page, table_html)
from .deep_section import deep_section
from .html_sections import (  # noqa: F401  (sections: part of this module's API)
    MAX_PROMPT_CHARS, TREE_TABLE_DEPTH, facts_table, generated_html, headline_html, noise_html, roofline_section,
    roofline_table, serving_section, spread_html, tree_rows)
from .tables import per_rank_summary

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

    from .cost_view import CostView

#: the calls columns the page never reads (the trace and the CSV export do): ``probe report
#: --format html`` loads the others only
UNREAD_CALLS_COLUMNS = ("end_ms", "hooks_ms", "placement", "module_type")

#: (element id, section title, builder) of the report's figures, in page order
FIGURES = (
    ("fig-phase-blocks", "Prefill vs decode per block", lambda r: figures.phase_blocks(r.calls, r.steps, by="block")),
    ("fig-phase-roles", "Prefill vs decode per role", lambda r: figures.phase_blocks(r.calls, r.steps, by="role")),
    ("fig-step-breakdown", "One step, broken down", lambda r: figures.step_breakdown(r.calls, r.steps, r.sampling)),
    ("fig-sampling-stages", "The sampling step, stage by stage",
     lambda r: figures.sampling_stages(r.sampling, r.steps)),
    ("fig-tree-prefill", "Module tree, prefill", lambda r: tree_figures.icicle(r.calls, r.steps, phase="prefill", ops=r.ops)),
    ("fig-tree-decode", "Module tree, decode", lambda r: tree_figures.icicle(r.calls, r.steps, phase="decode", ops=r.ops)),
    ("fig-layer-roles", "Layer x role", lambda r: tree_figures.layer_roles(r.calls, r.steps)),
    ("fig-layer-heatmap", "Layer x step (decode)", lambda r: figures.layer_heatmap(r.calls, phase="decode")),
    ("fig-token-latency", "Per-token latency", lambda r: figures.token_latency(r.steps, r.runs)),
    ("fig-latency-kv", "Latency vs KV length", lambda r: figures.latency_vs_kv(r.steps)),
    ("fig-memory", "Memory and KV cache", lambda r: figures.memory_over_steps(r.steps, r.calls)),
)


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
             ("roofline", "Roofline and bounds"), *((("deep", "Inside each block"),) if len(run.ops) else ()),
             ("tables", "Tables"), ("shapes", "Shapes"))
    doc.add("<nav>" + "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in links) + "</nav>")
    doc.add(headline_html(run))  # the answer first: prefill vs decode, adding up to the generate call
    doc.add(noise_html(run))  # how far to trust it, right below
    doc.add(generated_html(run))
    doc.add(table_html(facts_table(run), table_id="facts"))
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
    serving_section(doc, run)
    for div_id, title, build in FIGURES:
        doc.figure(build(run), div_id, title)
    roofline_section(doc, run, view)
    deep_section(doc, run)  # a run with a deep pass: each block's ops and memory ledger
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
    doc.add(table_html(tree_rows(run), caption=f"The call tree down to level {TREE_TABLE_DEPTH} (deeper calls "
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
