"""The sections of the HTML report of a run, each a function of the run: the prefill vs decode
panel, what was generated and the prompt, the run's facts, the busy-machine note, the spread over
repeats, the call tree table, the roofline and bounds, and the serving (continuous batching) part.

Every string that came from the user or the model goes through :func:`reports.html_page.esc` and
is capped (:mod:`reports.text`); :func:`reports.html.render_report` puts the sections in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from probe.analysis.headline import TOKENS_NOTE, TOTAL, headline_cells, sequences

from .html_page import Page, esc, format_cell, table_html
from .tables import ranks
from .text import MAX_LONG_TEXT, cap, run_prompt

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

    from .cost_view import CostView

#: the most characters of the prompt and of each generated text shown
MAX_PROMPT_CHARS = MAX_LONG_TEXT


def facts_table(run: "Run") -> pd.DataFrame:
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
    rank_list = ranks(run)
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


#: tree level the report's tree table folds at (1 = top-level calls, 2 = at depth all the blocks inside the base model;
#: the icicle and the dashboard's Tree view go deeper)
TREE_TABLE_DEPTH = 2


def tree_rows(run: "Run") -> pd.DataFrame:
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
    if len(ranks(roof)) == 1:
        out = out.drop(columns="rank")
    return out


def roofline_section(doc: Page, run: "Run", view: "CostView") -> None:
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


def serving_section(doc: Page, run: "Run") -> None:
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
