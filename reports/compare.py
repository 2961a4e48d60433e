"""Run-vs-run comparison: ``compare.html``, ``compare.csv`` and ``compare.json`` of two saved runs.

Rows are matched per level (block, role, module) by ``(name, phase)``; each row carries A's and
B's self times straight from their own ``Run.summary()`` (the rows of a level never overlap),
``diff_ms = b_ms - a_ms`` and ``ratio = b_ms / a_ms``. Runs recorded at different depths, prompt
lengths or models are compared all the same, with the difference said at the top. Typical uses: eager vs sdpa attention, float32 vs bfloat16, CPU vs GPU.

Whether a difference is larger than the noise is :func:`probe.stats.significance` (bootstrap
intervals over steps and generate calls), written to ``significance.csv`` and shown on the page
with each run's busy-machine figure (:mod:`probe.recording.noise`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from probe.store import write_text
from probe.store.outdir import COMPARE_META
from probe.schema import DIFF
from probe.analysis.stats import differences

from . import figures
from .diff import block_diff
from .html_page import Page, esc, format_cell, table_html

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

HEADLINE_METRICS = ("ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_mean", "prefill_tok_s", "decode_tok_s",
                    "total_ms", "peak_mem_bytes", "kv_cache_bytes")
FACTS = ("model_id", "dtype", "device", "attn_implementation", "depth", "prompt_tokens", "new_tokens", "batch",
         "gpu_name")


def run_label(run: "Run", fallback: str) -> str:
    """A short name for ``run``: its folder name, else model / dtype / attention, else ``fallback``."""
    if run.path is not None and Path(run.path).name:
        return Path(run.path).name
    gen = run.runs[run.runs["kind"] == "generate"] if not run.runs.empty else run.runs
    if len(gen):
        r = gen.iloc[0]
        return " / ".join(str(r[c]) for c in ("model_id", "dtype", "attn_implementation") if not pd.isna(r[c]))
    return fallback


def labels(run_a: "Run", run_b: "Run") -> tuple[str, str]:
    """Distinct labels of the two runs (suffixed with A / B when they would read the same)."""
    a, b = run_label(run_a, "A"), run_label(run_b, "B")
    if a == b:
        a, b = f"{a} (A)", f"{b} (B)"
    return a, b


def comparison_frame(run_a: "Run", run_b: "Run") -> pd.DataFrame:
    """Per block, role and module and phase, A's and B's numbers side by side.

    Returns:
        Columns of :data:`probe.schema.DIFF`; ``a_ms``/``b_ms`` are each run's own
        ``Run.summary()["self_ms"]`` of that level.
    """
    return block_diff(run_a.summary(), run_b.summary()).astype(DIFF)


def op_comparison_frame(run_a: "Run", run_b: "Run", *, fold: bool = True) -> pd.DataFrame | None:
    """Two deep runs' ops per phase, block and op kind (:func:`probe.analysis.op_compare.op_comparison`),
    numbered blocks folded into their mean per layer unless ``fold`` is False; ``None`` unless
    both runs have a deep pass."""
    if run_a.ops.empty or run_b.ops.empty:
        return None
    from probe.analysis.op_compare import op_comparison
    from probe.analysis.ops import OP_FIGURES

    from .deep_section import folded

    def summary(run: "Run") -> pd.DataFrame:
        s = run.op_summary()
        return folded(s, OP_FIGURES, ["op"]) if fold else s

    return op_comparison(summary(run_a), summary(run_b))


def _op_section(doc: Page, run_a: "Run", run_b: "Run", ops: pd.DataFrame | None) -> None:
    """Inside each block, A against B: the op kinds that changed (both deep), or why there is none."""
    from probe.analysis.op_compare import MIN_BLOCK_SHARE, MIN_RATIO_CHANGE, changed

    doc.add('<h2 id="ops">Inside each block: ops, A vs B</h2>')
    if ops is None:
        which = "A" if run_b.ops.empty else "B"
        doc.add('<p class="note" id="ops-none">' + esc(
            f"Only {which} has a deep pass: record both with `probe run --deep` to compare them op by op.") + "</p>")
        return
    moved = changed(ops)
    doc.add('<p class="note" id="ops-note">' + esc(
        "Each run's deep pass, per sampled step (numbered blocks folded: the mean per layer). change: an op kind "
        "only one run ran in the block, a different call count, or a time that moved by "
        f"{MIN_RATIO_CHANGE:.0%} and {MIN_BLOCK_SHARE:.0%} of the block's op time or more (op times are each "
        "deep pass's, from one generate call: the timed blocks above say whether a block as a whole changed). "
        "compare_ops.csv has every row.") + "</p>")
    doc.add(table_html(moved if len(moved) else ops.head(0), caption=f"What changed: {len(moved)} of {len(ops)} "
                       "rows (ms per sampled step)", table_id="ops-changed", max_rows=2000))


def roles_add(frame: pd.DataFrame) -> bool:
    """The role level of a :func:`comparison_frame` names something the block level does not:
    either run recorded inside its blocks (``--depth sublayers`` or ``all``). At depth blocks
    the two levels hold the same rows, and a page shows them once."""
    names = frame["name"].astype(str)
    return bool(set(names[frame["level"] == "role"]) - set(names[frame["level"] == "block"]))


def _mean_headline(run: "Run") -> pd.Series:
    h = figures.headline(run.runs, run.steps, meta=run.meta)
    ok = h[h["status"] == "ok"] if (h["status"] == "ok").any() else h
    return pd.Series({m: (float(pd.to_numeric(ok[m], errors="coerce").astype("float64").mean()) if len(ok) else np.nan)
                      for m in HEADLINE_METRICS})


def headline_comparison(run_a: "Run", run_b: "Run") -> pd.DataFrame:
    """Headline metrics of A and B (mean over each run's successful generate calls), diff and ratio."""
    a, b = _mean_headline(run_a), _mean_headline(run_b)
    out = pd.DataFrame({"metric": pd.Series(HEADLINE_METRICS, dtype="string"), "a": a.to_numpy(dtype="float64"),
                        "b": b.to_numpy(dtype="float64")})
    out["diff"] = out["b"] - out["a"]
    out["ratio"] = (out["b"] / out["a"]).where(out["a"] > 0)
    return out


def _facts(run_a: "Run", run_b: "Run", label_a: str, label_b: str) -> pd.DataFrame:
    def facts(run: "Run") -> list[str]:
        gen = run.runs[run.runs["kind"] == "generate"] if not run.runs.empty else run.runs
        r = gen.iloc[0] if len(gen) else None
        vals = ["" if r is None or pd.isna(r[c]) else str(r[c]) for c in FACTS]
        return [str(run.path) if run.path is not None else "", *vals]

    return pd.DataFrame({"fact": ["run directory", *FACTS], "A: " + label_a: facts(run_a),
                         "B: " + label_b: facts(run_b)}, dtype="string")


def _formatted_headline(head: pd.DataFrame) -> pd.DataFrame:
    """The headline comparison as text, each value in its metric's unit format."""
    rows = {"metric": head["metric"].astype(str).tolist()}
    for col, name in (("a", "A"), ("b", "B"), ("diff", "B - A")):
        rows[name] = [format_cell(m, v) for m, v in zip(rows["metric"], head[col])]
    rows["B / A"] = [format_cell("ratio", v) for v in head["ratio"]]
    return pd.DataFrame(rows, dtype="string")


def significance_table(sig: pd.DataFrame) -> pd.DataFrame:
    """The significance rows as the page shows them: a verdict in words, the interval in brackets."""
    from probe.analysis.stats import verdict

    def pct(v) -> str:
        return "" if pd.isna(v) else f"{v:+.1f}%"

    out = pd.DataFrame({
        "metric / block": sig["name"].astype(str),
        "phase": sig["phase"].astype(str),
        "samples A / B": [f"{a} / {b}" for a, b in zip(sig["a_n"], sig["b_n"])],
        "A mean": [format_cell("ms" if c != "tok/s" else "tok_s", v) for c, v in zip(sig["clock"], sig["a_mean"])],
        "B mean": [format_cell("ms" if c != "tok/s" else "tok_s", v) for c, v in zip(sig["clock"], sig["b_mean"])],
        "B slower by": [pct(v) for v in sig["slowdown_pct"]],
        "95% interval": ["" if pd.isna(lo) else f"[{lo:+.1f}%, {hi:+.1f}%]"
                         for lo, hi in zip(sig["ci_low_pct"], sig["ci_high_pct"])],
        "p (rank test)": ["" if pd.isna(v) else f"{v:.3g}" for v in sig["p_value"]],
        "verdict": [verdict(r) for _, r in sig.iterrows()],
    }, dtype="string")
    return out


def _noise_note(run_a: "Run", run_b: "Run", la: str, lb: str) -> str:
    notes = []
    for name, run in (("A", run_a), ("B", run_b)):
        b = run.noise()
        if b.busy:
            notes.append(f'<p class="warn" id="busy-{name.lower()}"><b>{name}: {esc(b.message()).replace("`--repeat`", "<code>--repeat</code>")}</b></p>')
        elif b.wait_pct == b.wait_pct:
            notes.append(f'<p class="note" id="busy-{name.lower()}">{name}: the machine was quiet '
                         f"({b.wait_pct:.1f} % of step time waiting for a CPU).</p>")
    return "".join(notes)


def render_comparison(run_a: "Run", run_b: "Run", sig: pd.DataFrame | None = None) -> str:
    """The side-by-side HTML page of two runs (offline, escaped, deterministic).

    ``sig`` is :func:`probe.stats.significance` of the two runs, if the caller has it already.
    """
    from probe.analysis.stats import significance

    from .text import display_run

    run_a, run_b = display_run(run_a), display_run(run_b)
    la, lb = labels(run_a, run_b)
    sig = significance(run_a, run_b) if sig is None else sig
    frame = comparison_frame(run_a, run_b)
    head = headline_comparison(run_a, run_b)
    doc = Page()
    doc.add(f"<h1>probe compare: A = {esc(la)} vs B = {esc(lb)}</h1>")
    doc.add(table_html(_facts(run_a, run_b, la, lb), table_id="facts"))
    doc.add('<h2 id="headline">Headline</h2>')
    doc.add(table_html(_formatted_headline(head), table_id="headline-table"))
    notes = differences(run_a, run_b)
    if notes:
        doc.add('<div class="note" id="differences"><b>Not like for like:</b><ul>'
                + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>")
    doc.add('<h2 id="significance">Is the difference larger than the noise?</h2>')
    doc.add(_noise_note(run_a, run_b, la, lb))
    shown = sig[sig["level"].isin(["metric", "block"])]
    doc.add(table_html(significance_table(shown), table_id="significance-table",
                       caption="B against A: headline metrics, then blocks per phase (self time)"))
    doc.add('<p class="note">"B slower by" is B\'s mean over A\'s minus one (for tok/s, A\'s over B\'s: '
            "positive is always worse). The 95% interval is a bootstrap percentile interval (2,000 resamples of "
            "each run's samples: steps for blocks and TPOT, generate calls for TTFT, tok/s and total time); a "
            "difference is significant when its interval excludes 0 and a two-sided Mann-Whitney U test gives "
            "p &lt; 0.05 (three calls against three can never reach it). Record several generate calls "
            "(<code>probe run --repeat N</code>) for intervals on TTFT and tok/s. Every role is in "
            "significance.csv.</p>")
    doc.figure(figures.compare_blocks(run_a.summary("block"), run_b.summary("block"), la, lb),
               "fig-compare-blocks", "Per block and phase")
    doc.add(table_html(frame[frame["level"] == "block"].drop(columns="level"), caption="Per block and phase (self ms)",
                       table_id="block-table"))
    if roles_add(frame):
        doc.figure(figures.compare_blocks(run_a.summary("role"), run_b.summary("role"), la, lb),
                   "fig-compare-roles", "Per role and phase")
        doc.add(table_html(frame[frame["level"] == "role"].drop(columns="level"),
                           caption="Per role and phase (self ms)", table_id="role-table"))
    else:
        doc.add('<p class="note" id="roles-as-blocks">Both runs were recorded at depth blocks: per role is '
                "the same as per block, so it is shown once.</p>")
    doc.add('<h2 id="modules">Per module and phase</h2>')
    doc.add(table_html(frame[frame["level"] == "module"].drop(columns="level"), caption="Per module and phase (self ms)",
                       table_id="module-table"))
    doc.add('<p class="note">a_ms and b_ms are each run\'s self host ms from its own summary (a block\'s self time '
            "is its whole subtree; a role's or module's is the time not inside another recorded call, so the rows "
            "of a level add up to the forward time with the residue); diff_ms = B - A, ratio = B / A. "
            "All rows are in compare.csv.</p>")
    if not (run_a.ops.empty and run_b.ops.empty):
        _op_section(doc, run_a, run_b, op_comparison_frame(run_a, run_b))
    return doc.render(f"probe compare: {la} vs {lb}")


def write_comparison(run_a: "Run", run_b: "Run", out_dir: str | os.PathLike,
                     sig: pd.DataFrame | None = None) -> list[Path]:
    """Write ``compare.html`` and ``compare.csv`` of two runs into ``out_dir``.

    Args:
        run_a, run_b: the runs (A is the baseline: diff = B - A, ratio = B / A).
        out_dir: destination folder (created if needed).

        sig: :func:`probe.stats.significance` of the two runs, if the caller has it already.

    Returns:
        ``[out_dir/compare.html, out_dir/compare.csv, out_dir/significance.csv, out_dir/compare.json]``,
        and ``out_dir/compare_ops.csv`` (:func:`op_comparison_frame`) where both runs have a deep pass.
    """
    from probe.analysis.stats import significance

    sig = significance(run_a, run_b) if sig is None else sig
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "compare.html"
    write_text(html_path, render_comparison(run_a, run_b, sig))
    csv_path = out / "compare.csv"
    from .text import display_run

    comparison_frame(display_run(run_a), display_run(run_b)).to_csv(csv_path, index=False, lineterminator="\n",
                                                                    encoding="utf-8")
    sig_path = out / "significance.csv"
    sig.to_csv(sig_path, index=False, lineterminator="\n", encoding="utf-8")
    paths = [html_path, csv_path, sig_path, write_compare_meta(run_a, run_b, out)]
    ops = op_comparison_frame(run_a, run_b)
    if ops is not None:
        paths.append(out / "compare_ops.csv")
        ops.to_csv(paths[-1], index=False, lineterminator="\n", encoding="utf-8")
    return paths


def compare_meta(run_a: "Run", run_b: "Run", when: datetime | None = None) -> dict:
    """What ``compare.json`` says: each run's path as given and resolved, its run ids, and the time.

    The dashboard lists a folder holding it as this comparison (not as a broken run).
    """
    def side(run: "Run") -> dict:
        ids = sorted({str(v) for v in run.runs["run_id"].dropna()}) if "run_id" in run.runs else []
        path = None if run.path is None else os.fspath(run.path)
        return {"path": path, "resolved": None if path is None else str(Path(path).expanduser().resolve()),
                "run_ids": ids}

    when = datetime.now(timezone.utc) if when is None else when
    return {"kind": "probe compare", "version": 1, "a": side(run_a), "b": side(run_b),
            "written": when.isoformat(timespec="seconds")}


def write_compare_meta(run_a: "Run", run_b: "Run", out_dir: str | os.PathLike) -> Path:
    """Write :func:`compare_meta` as ``out_dir/compare.json``; returns its path."""
    path = Path(out_dir) / COMPARE_META
    write_text(path, json.dumps(compare_meta(run_a, run_b), indent=2) + "\n")
    return path
