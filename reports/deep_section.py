"""A deep run's view: each block's top ops and its memory ledger, per phase, as text and as HTML.

Reads only :class:`probe.Run` and its public analyses (:mod:`probe.analysis.ops`). The terminal
and the report fold the numbered blocks (the decoder layers) into one row each, their mean per
layer; ``ops.csv`` and ``ledger.csv`` hold every block.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pandas as pd

from probe import fmt
from probe.analysis.op_tree import short_op
from probe.analysis.ops import (DISPATCH, LEDGER_BYTES, LEDGER_CUDA, OUTSIDE, OP_FIGURES, OP_GPU, dispatch_noise_ms,
                                dispatch_unknown, memory_ledger, op_summary)
from probe.columns import ranked

from .html_page import Page, esc, table_html

if TYPE_CHECKING:  # pragma: no cover
    from probe import Run

PHASES = ("prefill", "decode")
_NUMBER = re.compile(r"\.\d+(?=\.|$)")
TOP = 4


def op_figures(summary: pd.DataFrame) -> list[str]:
    """An op summary's figures to show: :data:`OP_FIGURES`, and on CUDA its GPU ms (a CPU run's
    summary has no such column: nothing changes there)."""
    return [*OP_FIGURES, OP_GPU] if OP_GPU in summary.columns else list(OP_FIGURES)


def ledger_figures(ledger: pd.DataFrame) -> list[str]:
    """A memory ledger's byte columns to show: :data:`LEDGER_BYTES`, and on CUDA the allocator's
    beside them where the timed calls had its counters (:data:`LEDGER_CUDA`)."""
    return [*LEDGER_BYTES, *(c for c in LEDGER_CUDA if c in ledger.columns)]


def _fold(block: str) -> str:
    """``model.layers.3.self_attn`` -> ``model.layers.*.self_attn``."""
    return _NUMBER.sub(".*", block)


def folded(df: pd.DataFrame, cols: list[str], keys: list[str], top: int | None = None) -> pd.DataFrame:
    """Rows of numbered blocks (``model.layers.3``) folded into one (``model.layers.*``): each
    figure the mean per layer over every layer of the block (an op some layers lack counts as 0
    there), ``block_ms`` the mean of the layers' own, ``layers`` how many were folded. ``top``:
    each folded block's largest ``top`` rows by ``host_ms`` (its dispatch row kept)."""
    df = df.assign(_orig=df["block"], block=df["block"].map(_fold))
    n = df.groupby(["phase", "block"], sort=False)["_orig"].nunique().rename("layers")
    sums = [c for c in cols if c != "block_ms"]
    g = df.groupby(["phase", "block", *keys], sort=False, dropna=False)
    out = g[sums].sum(min_count=1).reset_index().merge(n.reset_index(), on=["phase", "block"], how="left")
    out[sums] = out[sums].div(out["layers"], axis=0)
    if "block_ms" in cols:
        per_layer = df.drop_duplicates(["phase", "_orig"]).groupby(["phase", "block"], sort=False)["block_ms"].mean()
        out = out.merge(per_layer.rename("block_ms").reset_index(), on=["phase", "block"], how="left")
    if top is not None and "op" in out:
        disp = out["op"].eq(DISPATCH)
        rank = out[~disp].sort_values("host_ms", ascending=False, kind="stable").groupby(
            ["phase", "block"], sort=False).cumcount()
        out = out[disp | rank.reindex(out.index).lt(top)]
        order = {b: i for i, b in enumerate(dict.fromkeys(out["block"]))}
        out = out.assign(_b=ranked(out["block"], order), _d=disp, _h=-out["host_ms"].fillna(0))
        out = out.sort_values(["_b", "_d", "_h"], kind="stable").drop(columns=["_b", "_d", "_h"])
    return out.reset_index(drop=True)


#: ``meta["deep"]["op_clock"]``'s methods (``probe.recording.deep_twin``; named here so that a
#: report imports nothing of torch)
TWIN_METHOD, MODE_METHOD = "profiler twin", "dispatch mode"


def op_clock_text(deep: dict) -> str:
    """How a deep pass's op times were taken, in words, from its ``op_clock``."""
    clock = deep.get("op_clock") if isinstance(deep.get("op_clock"), dict) else {}
    phases = [v for k, v in clock.items() if k != "steps" and isinstance(v, dict)]
    methods = {str(v.get("method")) for v in phases}
    if methods == {TWIN_METHOD}:
        matched, of = sum(int(v.get("matched") or 0) for v in phases), sum(int(v.get("of") or 0) for v in phases)
        return f"op times from torch.profiler on twin steps, {matched:,} of {of:,} ops matched"
    why = _mode_steps(clock.get("steps"))
    why = f" ({why})" if why else ""
    if not methods or methods == {MODE_METHOD}:
        return "op times of the dispatch mode" + why
    return "op times from torch.profiler on twin steps where a step has one, else of the dispatch mode" + why


def _mode_steps(steps: Any) -> str:
    """The sampled steps on the dispatch mode's clock, by why: "step 0: <why>; steps 3, 7: <why>"."""
    by_why: dict[str, dict[str, None]] = {}
    for s in steps if isinstance(steps, list) else []:
        if isinstance(s, dict) and s.get("method") == MODE_METHOD:
            by_why.setdefault(str(s.get("why") or "no twin"), {})[str(s.get("step"))] = None
    return "; ".join(f"step{'s' if len(v) > 1 else ''} {', '.join(v)}: {why}" for why, v in by_why.items())


def deep_lines(run: "Run") -> list[str]:
    """The text ``probe run --deep`` prints: per phase, each block's top ops (ms per sampled
    step, with the block's dispatch and Python) and its memory ledger; empty without a deep run."""
    if run.ops.empty:
        return []
    deep = run.meta.get("deep") or {}
    lines = ["", f"inside each block (deep pass, not timed: {deep.get('sampled', 'sampled steps')}; "
                 f"ms per sampled step, {op_clock_text(deep)})"]
    summary = op_summary(run.ops, run.calls)
    gpu = OP_GPU in summary.columns
    ops = folded(summary, op_figures(summary), ["op"])
    unknown = dispatch_unknown(summary)
    own = folded(op_summary(run.ops, run.calls, by="module"), ["calls", "host_ms", "flops"], ["op"])
    tied = deep.get("tied_weights") or {}
    whole = memory_ledger(run.ledger, run.ops, tied, run.calls)
    ledger = folded(whole, ledger_figures(whole), [])
    noisy = False
    flops = _flops_lines(run)
    for phase in PHASES:
        part = ops[ops["phase"] == phase]
        if part.empty:
            continue
        lines.append(f"{phase}")
        for block, grp in part.groupby("block", sort=False):
            n = int(grp["layers"].iloc[0])
            name = f"{block} (mean of {n})" if n > 1 else block
            timed = grp["block_ms"].iloc[0]
            real = grp[grp["op"] != DISPATCH].sort_values("host_ms", ascending=False)
            total = real["host_ms"].sum()
            disp = grp.loc[grp["op"] == DISPATCH, "host_ms"]
            head = (f"timed {fmt.ms(timed)} ms = ops {fmt.ms(total)} ms + dispatch and Python "
                    f"{fmt.ms(disp.iloc[0])} ms" if len(disp) and not fmt.is_missing(disp.iloc[0])
                    else f"ops {fmt.ms(total)} ms" + (", dispatch and Python unknown" if block != OUTSIDE else ""))
            # below 0 by more than its noise (a microsecond, or 5 % of the block): say why
            if len(disp) and not fmt.is_missing(disp.iloc[0]) and disp.iloc[0] < -dispatch_noise_ms(timed):
                head += " (below 0: see the note below)"
                noisy = True
            if gpu:  # CUDA: the device time of the block's ops (on their twins), beside the host's
                head += f"; GPU {fmt.ms(real[OP_GPU].sum(min_count=1))} ms"
            lines.append(f"  {name:<34} {head}")
            tops = [f"{short_op(r.op)} {fmt.ms(r.host_ms)} ({fmt.pct(r.host_ms / total if total else float('nan'))}, "
                    f"x{r.calls:.0f}" + (f", GPU {fmt.ms(getattr(r, OP_GPU))}" if gpu else "") + ")"
                    for r in real.head(TOP).itertuples()]
            lines.append(f"  {'':<34} top: " + ", ".join(tops))
            mem = ledger[(ledger["phase"] == phase) & (ledger["block"] == block)]
            if len(mem):
                m = mem.iloc[0]
                shared = tied.get(block, {}).get("with") if n == 1 and m.shared_weights_bytes > 0 else None
                tie = f" (tied: {fmt.nbytes(m.shared_weights_bytes)} shared with {', '.join(shared)})" if shared else ""
                lines.append(f"  {'':<34} memory: weights {fmt.nbytes(m.weights_bytes)}{tie}, KV cache "
                             f"{fmt.nbytes(m.kv_cache_bytes)}, activations {fmt.nbytes(m.activations_bytes)}, "
                             f"temporaries {fmt.nbytes(m.temporaries_bytes)}, peak +{fmt.nbytes(m.peak_added_bytes)}"
                             + _allocator_text(m))
        # what the attention's own time is made of: its own code (RoPE, the cache update, reshapes)
        # and the attention function (a call of its own, named as at depth sublayers)
        attn = own[(own["phase"] == phase) & own["block"].str.contains(r"(?:attn|attention|attention_fn)$")]
        for block, grp in attn.groupby("block", sort=False):
            n = int(grp["layers"].iloc[0])
            grp = grp.sort_values("host_ms", ascending=False)
            what = "the function" if block.endswith("attention_fn") else "its own ops (projections, function apart)"
            lines.append(f"  {block + (f' (mean of {n})' if n > 1 else '')}: {what} {fmt.ms(grp['host_ms'].sum())} ms: "
                         + ", ".join(f"{short_op(r.op)} {fmt.ms(r.host_ms)}" for r in grp.head(TOP + 2).itertuples()))
        step = ledger[(ledger["phase"] == phase) & (ledger["block"] == "(step)")]
        if len(step):
            m = step.iloc[0]
            lines.append(f"  {'whole step':<34} memory: KV cache held {fmt.nbytes(m.kv_cache_bytes)}, temporaries "
                         f"{fmt.nbytes(m.temporaries_bytes)}, peak +{fmt.nbytes(m.peak_added_bytes)}")
        if phase in flops:
            lines.append(f"  {'FLOPs vs the cost model':<34} {flops[phase]}")
    if unknown:
        lines.append(f"  ({unknown})")
    if noisy:
        lines.append("  (dispatch and Python below 0: the ops ran slower in the one deep generate call than the block "
                     "did in the timed ones, as on a busy machine; rerun on a quieter one. Memory does not depend on it)")
    lines.append("  (bytes are tensor storages made by ops; scratch inside kernels is not seen. ops.parquet, "
                 "ledger.parquet and allocations.parquet hold every op and storage)")
    return lines


def deep_section(doc: Page, run: "Run") -> None:
    """The report's "Inside each block" section (only for a run with a deep pass)."""
    if run.ops.empty:
        return
    deep = run.meta.get("deep") or {}
    doc.add('<h2 id="deep">Inside each block (deep pass)</h2>')
    doc.add('<p class="note" id="deep-note">' + esc(
        f"One extra generate call of the same inputs and seed, not timed; sampled: {deep.get('sampled', '?')}. "
        "Every aten op as dispatched, attributed to the innermost module call; times are the op alone, per "
        "sampled step. (dispatch and Python) = the block's time on timed steps of the same shapes less its ops. "
        "Memory: tensor storages made by ops (scratch inside kernels is not seen); weights are parameter bytes; "
        "bytes read/written are estimates from storages.") + "</p>")
    summary = op_summary(run.ops, run.calls)
    unknown = dispatch_unknown(summary)
    if unknown:
        doc.add('<p class="warn" id="deep-dispatch-unknown">' + esc(unknown[0].upper() + unknown[1:] + ".") + "</p>")
    figures = op_figures(summary)
    table = folded(summary, figures, ["op"], top=8)
    table = table[["phase", "block", "layers", "op", *figures]]
    for phase in PHASES:
        part = table[table["phase"] == phase].drop(columns="phase")
        if len(part):
            doc.add(table_html(part, caption=f"{phase}: each block's top ops (ms and FLOPs per sampled step; numbered "
                                             "blocks folded into one row, the mean per layer: 'layers' says how many; "
                                             "ops.csv has every block)",
                               table_id=f"deep-ops-{phase}", max_rows=2000))
    ledger = memory_ledger(run.ledger, run.ops, deep.get("tied_weights"), run.calls)
    if len(ledger):
        cats = ledger_figures(ledger)
        ledger = folded(ledger, cats, [])[["phase", "block", "layers", *cats]]
        cuda = (" allocator_added_bytes and allocator_peak_added_bytes: the CUDA allocator's counters of the timed "
                "calls of the same shapes, beside the ledger's tensor bytes (allocator blocks, kernels' scratch "
                "included)" if len(cats) > len(LEDGER_BYTES) else "")
        doc.add(table_html(ledger, caption="Memory ledger per block and phase (bytes per sampled step, numbered blocks "
                                           "folded: the mean per layer; weights tied between two blocks, such as an "
                                           "embedding and lm_head, show in each, shared_weights_bytes says how much "
                                           "of a block's weights is shared: the (step) row counts them once)" + cuda,
                           table_id="deep-ledger"))
    for phase in PHASES:
        part = run.ops[run.ops["phase"] == phase]
        if len(part):
            doc.figure(live_bytes_figure(part, phase), f"fig-deep-live-{phase}", None)


def _allocator_text(m) -> str:
    """A ledger row's CUDA allocator figures, in words ("" where it has none: a CPU run)."""
    added = getattr(m, "allocator_added_bytes", None)
    peak = getattr(m, "allocator_peak_added_bytes", None)
    if added is None or fmt.is_missing(added):
        return ""
    return f"; CUDA allocator (timed calls) +{fmt.nbytes(added)}, peak +{fmt.nbytes(peak)}"


def live_bytes_figure(ops: pd.DataFrame, phase: str):
    """Live tensor bytes over each sampled step of one phase, op by op (from the step's start),
    one line a step (a phase's own figure: prefill's bytes would flatten decode's)."""
    from .figure_base import PHASE_COLORS, base_figure, binned

    fig = base_figure(f"Live tensor bytes over each sampled {phase} step (from its start)",
                      "op (in the step's order)", "bytes")
    dashes = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
    for i, ((run_id, step), grp) in enumerate(ops.groupby(["run_id", "step"], sort=False)):
        pts = binned(grp[["seq", "live_bytes"]].astype("float64"), "seq", ["live_bytes"])
        fig.add_scatter(x=pts["seq"], y=pts["live_bytes"], mode="lines", name=f"step {step}",
                        line={"color": PHASE_COLORS.get(phase), "dash": dashes[i % len(dashes)]})
    return fig


def _flops_lines(run: "Run") -> dict[str, str]:
    """Per phase, one line: how the deep pass's FLOPs of the blocks stand against the cost
    model's matrix products (:meth:`Run.flops_reconciled`), and what else the cost model counts;
    nothing where the run cannot be costed (no config in its meta)."""
    try:
        rec = run.flops_reconciled()
    except (ValueError, TypeError, KeyError):  # no config, another model: the reconciliation says why when asked
        return {}
    out = {}
    for phase, grp in rec[rec["module"] != "(step)"].groupby("phase", sort=False, observed=True):
        grp = grp[grp["verdict"] != "not costed"]
        if grp.empty:
            continue
        equal = int((grp["verdict"] == "equal").sum())
        text = (f"{equal} of {len(grp)} block rows equal its matrix products "
                f"({fmt.flops(float(grp['deep_flops'].sum()))} over the sampled steps)")
        off = grp[grp["verdict"] != "equal"].drop_duplicates("module")
        if len(off):
            text += "; " + ", ".join(f"{m} {v}" for m, v in zip(off["module"].head(3), off["verdict"].head(3)))
        rest = float(grp["rest_flops"].sum())
        if rest > 0:
            text += f"; the cost model also counts {fmt.flops(rest)} of elementwise work torch's formulas leave out"
        out[str(phase)] = text
    return out
