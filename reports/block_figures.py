"""Figures of the time per block: prefill vs decode bars per block, role or module (of one run,
several runs side by side, or two runs A vs B), and the layer x step heatmap.

Pure ``DataFrame -> Figure`` builders under the contract of :mod:`reports.figures`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe import fmt
from probe.analysis.run import block_summary
from probe.schema import Phase, floats as column_floats

from .diff import block_diff
from .figure_base import (HEIGHT, PHASE_COLORS, RUN_COLORS, base_figure, bin_index, empty_figure, floats, themed,
                          phases_in, plot_text, unique_inverse)
from .tables import ranks

#: most columns of the layer x step heatmap; longer runs average consecutive steps
MAX_HEAT_COLS = 300
#: bar patterns that tell ranks apart in a merged (tensor-parallel) run; colours stay the phases
RANK_PATTERNS = ("", "/", "x", ".", "\\", "+", "-", "|")
#: the summary levels a bar chart can show, with the axis label of each
LEVEL_LABELS = {"block": "block", "role": "role", "module": "module"}


def phase_blocks(calls: pd.DataFrame, steps: pd.DataFrame, by: str = "block") -> go.Figure:
    """Prefill vs decode self time per block, role or module (``by`` = the summary level).

    Bars are the self ms of each row of :meth:`probe.Run.summary` at that level, which never
    overlap (a block's self time is its whole subtree); the text on each bar is its share of
    the phase's forward time, and the residue (and the probe's own cost, where recorded) are
    bars of their own, so a phase's texts add up to 100 %. A run merged from several ranks
    gets one bar per phase and rank (``prefill · rank 1``), each rank's share taken over its
    own forward time; ranks differ by bar pattern, phases by colour.

    Args:
        calls: the ``calls`` frame.
        steps: the ``steps`` frame (phase totals, residue).
        by: ``"block"`` (embed / layer / norm / head / model), ``"role"`` (q_proj, attention
            core, ...) or ``"module"`` (each module).

    Returns:
        A grouped bar chart, one trace per phase (per phase and rank with several ranks).
    """
    if by not in LEVEL_LABELS:
        raise ValueError(f"by must be one of {', '.join(map(repr, LEVEL_LABELS))}; got {by!r}")
    title = f"Self time per {LEVEL_LABELS[by]}, prefill vs decode"
    rank_list = ranks(calls)
    if len(rank_list) > 1:
        rc = calls["rank"].to_numpy(dtype="int64", na_value=0)
        rs = steps["rank"].to_numpy(dtype="int64", na_value=0)
        parts = [(r, block_summary(calls[rc == r], steps[rs == r], by=by)) for r in rank_list]
    else:
        parts = [(None, block_summary(calls, steps, by=by))]
    if all(summ.empty for _, summ in parts):
        return empty_figure(title)
    order = list(dict.fromkeys(m for _, summ in parts for m in summ["name"].astype(str)))
    phases = phases_in(pd.concat([summ[["phase"]] for _, summ in parts]))
    # no x title: the block names say it, and a half-width chart's rotated names would run into it
    fig = base_figure(title + "<br><sup>bar text: share of the phase's forward time</sup>", "", "self host ms")
    for phase in phases:
        for i, (rank, summ) in enumerate(parts):
            sub = summ[summ["phase"] == phase]
            if sub.empty:
                continue
            sub = sub.set_index(sub["name"].astype(str))
            sub = sub.reindex([m for m in order if m in sub.index])
            share = floats(sub["share"]) * 100
            name = phase if rank is None else f"{phase} · rank {rank}"
            fig.add_trace(go.Bar(
                name=plot_text(name), x=[plot_text(m) for m in sub.index], y=floats(sub["self_ms"]),
                text=[fmt.pct(s / 100) for s in share], textposition="outside",
                customdata=np.column_stack([floats(sub["calls"]), floats(sub["total_ms"]), floats(sub["mean_ms"]), share]),
                hovertemplate="%{x}<br>self %{y:.3f} ms, total %{customdata[1]:.3f} ms<br>%{customdata[0]} calls, "
                              "mean %{customdata[2]:.4f} ms<br>share %{customdata[3]:.1f}%<extra>"
                              + plot_text(name) + "</extra>",
                marker_color=PHASE_COLORS.get(phase),
                **({} if rank is None else {"marker_pattern_shape": RANK_PATTERNS[i % len(RANK_PATTERNS)],
                                            "legendgroup": plot_text(phase)}),
            ))
    fig.update_layout(barmode="group")
    return fig


def phase_blocks_runs(parts: dict[str, tuple[pd.DataFrame, pd.DataFrame]], by: str = "block") -> go.Figure:
    """Several runs side by side: one panel per phase, and in it one bar per run for each block.

    Runs are never added together (their blocks, phases and step counts differ); each bar is
    that run's own self time, with its share of that run's phase as text.

    Args:
        parts: run name (its folder; the legend shows it) -> (``calls``, ``steps``) of that run.
        by: ``"block"``, ``"role"`` or ``"module"``, as in :func:`phase_blocks`.
    """
    from plotly.subplots import make_subplots

    if by not in LEVEL_LABELS:
        raise ValueError(f"by must be one of {', '.join(map(repr, LEVEL_LABELS))}; got {by!r}")
    title = f"Self time per {LEVEL_LABELS[by]}, prefill vs decode, per run"
    summaries = {name: block_summary(c, s, by=by) for name, (c, s) in parts.items()}
    if all(summ.empty for summ in summaries.values()):
        return empty_figure(title)
    order = list(dict.fromkeys(m for summ in summaries.values() for m in summ["name"].astype(str)))
    phases = phases_in(pd.concat([summ[["phase"]] for summ in summaries.values()]))
    fig = make_subplots(rows=1, cols=len(phases), subplot_titles=[plot_text(p) for p in phases],
                        horizontal_spacing=0.06)
    shown: set[str] = set()  # the runs with a trace so far: the first one has the legend entry
    for i, (name, summ) in enumerate(summaries.items()):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for j, phase in enumerate(phases):
            got = _in_order(summ, phase, order)
            if got is None:
                continue
            x, cols = got
            share = cols["share"]
            # a trace given as its dict is validated once, as the figure's (a go.Bar is validated, then
            # copied and validated again): the same trace, in a quarter of the time (40 bars of 20 runs)
            fig.add_trace(dict(
                type="bar", name=plot_text(name), x=[plot_text(m) for m in x], y=cols["self_ms"],
                text=[fmt.pct(v) for v in share], textposition="outside", marker={"color": color},
                legendgroup=plot_text(name), showlegend=plot_text(name) not in shown,
                customdata=np.column_stack([cols["calls"], cols["total_ms"], cols["mean_ms"], share * 100]),
                hovertemplate="%{x}<br>self %{y:.3f} ms, total %{customdata[1]:.3f} ms<br>%{customdata[0]} calls, "
                              "mean %{customdata[2]:.4f} ms<br>share %{customdata[3]:.1f}%<extra>"
                              + plot_text(f"{name} · {phase}") + "</extra>",
            ), row=1, col=j + 1)
            shown.add(plot_text(name))
    themed(fig).update_layout(title={"text": title + "<br><sup>bar text: share of that run's phase forward time</sup>"},
                      height=HEIGHT + 40, barmode="group",
                      margin={"l": 60, "r": 30, "t": 90, "b": 60}, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="self host ms", col=1)
    return fig


_BAR_COLUMNS = ("self_ms", "calls", "total_ms", "mean_ms", "share")


def _in_order(summ: pd.DataFrame, phase: str, order: list[str]) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """A run's summary rows of ``phase`` in the names' ``order``: the names and the bars' columns as
    floats; ``None`` where it has none. Found on the columns' arrays (a run's rows of a phase set
    by name and reindexed cost 2 ms a bar); by pandas where a name is null or comes twice."""
    names = summ["name"].astype(str)
    mask = (summ["phase"] == phase).to_numpy(dtype=bool, na_value=False)
    at = np.flatnonzero(mask)
    if not len(at):
        return None
    mine = [str(n) for n in names.to_numpy()[at]]
    if names.isna().any() or len(set(mine)) < len(mine):
        sub = summ[summ["phase"] == phase]
        sub = sub.set_index(sub["name"].astype(str))
        sub = sub.reindex([m for m in order if m in sub.index])
        return list(sub.index), {c: floats(sub[c]) for c in _BAR_COLUMNS}
    pos = dict(zip(mine, at))
    rows = np.array([pos[m] for m in order if m in pos], dtype=np.int64)
    return [m for m in order if m in pos], {c: floats(summ[c])[rows] for c in _BAR_COLUMNS}


def layer_heatmap(calls: pd.DataFrame, phase: Phase = "decode", value: str = "auto") -> go.Figure:
    """Layer x step heatmap of each decoder layer's time in ``phase``.

    Args:
        calls: the ``calls`` frame.
        phase: which phase's steps to show (default ``decode``).
        value: ``"cpu_ms"``, ``"gpu_ms"`` or ``"auto"`` (GPU time where recorded, else host).

    Returns:
        A heatmap (y = layer index, x = step). Several generate runs are averaged per step;
        more than ``MAX_HEAT_COLS`` steps are averaged in consecutive bins.
    """
    title = f"Layer x step ({phase})"
    if calls.empty:
        return empty_figure(title)
    # numpy on the few needed columns: selecting rows of the whole frame costs ~0.5 s at 1M rows
    mask = ((calls["role"] == "layer") & (calls["phase"] == phase) & calls["layer"].notna()).to_numpy(
        dtype=bool, na_value=False)
    if not mask.any():
        return empty_figure(title, f"no decoder-layer calls in {phase}")
    if value == "auto":  # a CPU run has no GPU column at all
        value = "gpu_ms" if "gpu_ms" in calls.columns and not np.isnan(column_floats(calls, "gpu_ms")[mask]).all() \
            else "cpu_ms"
    if value not in ("cpu_ms", "gpu_ms"):
        raise ValueError(f"value must be 'cpu_ms', 'gpu_ms' or 'auto'; got {value!r}")
    layer = calls["layer"].to_numpy(dtype="int64", na_value=-1)[mask]
    step = calls["step"].to_numpy(dtype="int64")[mask]
    vals = column_floats(calls, value)[mask]
    layers, li = unique_inverse(layer)
    step_vals, si = unique_inverse(step)
    bins = bin_index(len(step_vals), MAX_HEAT_COLS)
    width = int(np.bincount(bins).max())
    n_bins = int(bins[-1]) + 1
    # mean of every call in (layer, bin): several runs and binned steps weigh per call
    flat = li * n_bins + bins[si]
    if np.isnan(vals.sum()):  # calls without the time: left out of their cell's mean
        ok = ~np.isnan(vals)
        flat, vals = flat[ok], vals[ok]
    total = np.bincount(flat, weights=vals, minlength=len(layers) * n_bins).reshape(len(layers), n_bins)
    count = np.bincount(flat, minlength=len(layers) * n_bins).reshape(len(layers), n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    first_step = step_vals[np.searchsorted(bins, np.arange(n_bins))]
    unit = "GPU ms" if value == "gpu_ms" else "host ms"
    note = f", each column the mean of {width} steps" if width > 1 else ""
    fig = base_figure(f"{title}: {unit} per layer call{note}", "step" if width == 1 else "first step of bin", "layer")
    fig.add_trace(dict(type="heatmap", z=z, x=first_step, y=layers, colorscale="Viridis",  # validated once
                       colorbar={"title": {"text": "ms"}}, hovertemplate="layer %{y}<br>step %{x}<br>%{z:.4f} ms<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(layers) <= 16 else None)
    return fig


def compare_blocks(summary_a: pd.DataFrame, summary_b: pd.DataFrame, label_a: str = "A",
                   label_b: str = "B") -> go.Figure:
    """Side-by-side self ms per block (or role, or module) of two runs' summaries, one panel per
    phase.

    Each phase has its own panel and y scale: a prefill of a short prompt takes a fraction of
    the decode steps' time, and on one axis its bars would be too small to see.

    Args:
        summary_a, summary_b: ``Run.summary(level)`` of the two runs (same level).
        label_a, label_b: legend names of the two runs.

    Returns:
        Grouped bars (A and B per name) in one subplot per phase, the difference and ratio in
        the hover.
    """
    from plotly.subplots import make_subplots

    d = block_diff(summary_a, summary_b)
    level = str(d["level"].iloc[0]) if len(d) else "block"
    title = (f"Self time per {plot_text(LEVEL_LABELS.get(level, level))}: A vs B, each phase on its own scale"
             "<br><sup>A = " + plot_text(label_a) + ", B = " + plot_text(label_b) + "</sup>")
    if d.empty:
        return empty_figure(title)
    phases = phases_in(d)
    fig = make_subplots(rows=1, cols=len(phases), subplot_titles=[plot_text(p) for p in phases],
                        horizontal_spacing=0.06)
    for j, phase in enumerate(phases):
        sub = d[d["phase"] == phase]
        x = [plot_text(m) for m in sub["name"]]
        extra = np.column_stack([floats(sub["diff_ms"]), floats(sub["ratio"])])
        for col, label, color in (("a_ms", label_a, RUN_COLORS[0]), ("b_ms", label_b, RUN_COLORS[1])):
            fig.add_trace(go.Bar(name=plot_text(label), x=x, y=floats(sub[col]), marker_color=color, customdata=extra,
                                 legendgroup=plot_text(label), showlegend=j == 0,
                                 hovertemplate="%{x}<br>%{y:.3f} ms<br>B - A %{customdata[0]:.3f} ms, "
                                               "B / A %{customdata[1]:.3f}<extra>" + plot_text(phase) + "</extra>"),
                          row=1, col=j + 1)
    themed(fig).update_layout(title={"text": title}, height=HEIGHT + 40, barmode="group",
                      margin={"l": 60, "r": 30, "t": 90, "b": 60}, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="self host ms", col=1)
    return fig
