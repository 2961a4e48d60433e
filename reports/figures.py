"""Figure builders: pure functions from the probe's frames to plotly figures (or tables).

Defined once and shared by the HTML report and the Streamlit dashboard. Every builder

- aggregates with pandas first (a run may hold a million call rows) and caps the points it
  plots (long runs are binned into at most a few hundred/thousand points), so a figure stays
  small and fast whatever the run's size;
- returns an empty figure with a "no data" annotation instead of raising on empty frames;
- is deterministic: the same frames give the same figure JSON (no uids, no random colours);
- passes every string that came from the recorded data (module names, labels) through
  :func:`plot_text`, because plotly interprets a small HTML subset in text.

The table builders :func:`shape_walkthrough` and :func:`headline` live in
:mod:`reports.tables` and are re-exported here.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe import fmt
from probe.analysis.run import block_summary
from probe.recording.sampling import stage_means
from probe.schema import BLOCK_ROLES, PHASES, Phase

from .diff import block_diff
from .tables import headline, ranks, shape_walkthrough  # noqa: F401  (part of this module's API)

#: most columns of the layer x step heatmap; longer runs average consecutive steps
MAX_HEAT_COLS = 300
#: most points per line/scatter trace; longer series are averaged in consecutive bins
MAX_POINTS = 2000
#: most generate runs drawn as separate traces (a sweep may hold many)
MAX_RUNS = 12

HEIGHT = 420
TEMPLATE = "plotly_white"
PHASE_COLORS = {"prefill": "#1f77b4", "decode": "#ff7f0e", "extend": "#2ca02c", "recompute": "#9467bd",
                "forward": "#7f7f7f", "mixed": "#d62728"}
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf", "#393b79", "#637939"]
#: bar patterns that tell ranks apart in a merged (tensor-parallel) run; colours stay the phases
RANK_PATTERNS = ("", "/", "x", ".", "\\", "+", "-", "|")
#: display order and label of the parts a step's time splits into
PARTS = (("embed", "embedding"), ("layer", "layers"), ("norm", "final norm"), ("head", "lm_head"),
         ("model", "model level (base model glue, rotary)"), ("residue", "residue (in forward, in no recorded call)"),
         ("probe", "the probe's own cost"), ("outside", "outside model (logits, sampling)"))
#: the summary levels a bar chart can show, with the axis label of each
LEVEL_LABELS = {"block": "block", "role": "role", "module": "module"}
#: colours of the sampling stages in the step breakdown: one muted family, apart from the blocks'
STAGE_COLORS = ("#17becf", "#bcbd22", "#8c564b", "#e377c2", "#393b79", "#637939", "#9c9ede", "#d6616b")
STAGE_FIXED = {"update kwargs": "#52796f", "stopping": "#3d405b", "candidates": "#b5838d",
               "prepare inputs": "#b08968", "probe": "#d9d9d9", "remainder": "#a8a8a8",
               "outside (not split)": "#cfcfcf"}
STAGE_LABELS = {"update kwargs": "update kwargs (cache, mask, positions)",
                "prepare inputs": "prepare inputs (of the next forward)",
                "probe": "probe (its own step bookkeeping)",
                "remainder": "remainder (token choice, bookkeeping)",
                "outside (not split)": "not split"}


# --------------------------------------------------------------------------- helpers
def plot_text(value: object) -> str:
    """``value`` as text that plotly shows literally (its pseudo-HTML is escaped)."""
    return html.escape(str(value), quote=False)


def base_figure(title: str, xtitle: str = "", ytitle: str = "") -> go.Figure:
    """An empty figure in the reports' template, size, margins and legend place."""
    fig = go.Figure()
    fig.update_layout(title={"text": title}, template=TEMPLATE, height=HEIGHT, xaxis_title=xtitle,
                      yaxis_title=ytitle, margin={"l": 60, "r": 30, "t": 60, "b": 60},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def empty_figure(title: str, message: str = "no data recorded") -> go.Figure:
    """A figure with ``title`` and a centred ``message`` instead of data."""
    fig = base_figure(title)
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False})
    fig.add_annotation(text=plot_text(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 16})
    return fig


def _phase_rank(phase: pd.Series) -> pd.Series:
    order = {p: i for i, p in enumerate(PHASES)}
    return phase.map(order).fillna(len(order)).astype("int64")


def _phases_in(frame: pd.DataFrame) -> list[str]:
    present = set(frame["phase"].dropna().unique())
    return [p for p in PHASES if p in present] + sorted(present - set(PHASES))


def _bins(n: int, max_points: int) -> np.ndarray:
    """Bin index of each of ``n`` consecutive points so at most ``max_points`` bins remain."""
    width = max(1, -(-n // max_points))
    return np.arange(n) // width


def _binned(df: pd.DataFrame, x: str, ys: list[str], max_points: int = MAX_POINTS) -> pd.DataFrame:
    """``df`` (sorted by ``x``) with consecutive rows averaged down to ``max_points`` rows."""
    if len(df) <= max_points:
        return df[[x, *ys]].reset_index(drop=True)
    b = _bins(len(df), max_points)
    g = df[[x, *ys]].groupby(b, sort=True)
    return g.mean().reset_index(drop=True)


def _generate_run_ids(runs: pd.DataFrame, steps: pd.DataFrame) -> list[str]:
    """Run ids of the generate calls in recording order (from ``runs``, else from ``steps``)."""
    if not runs.empty:
        ids = runs.loc[runs["kind"] == "generate", "run_id"]
        return [str(v) for v in ids.drop_duplicates()]
    if steps.empty:
        return []
    ids = steps.loc[steps["phase"] == "prefill", "run_id"]
    return [str(v) for v in ids.drop_duplicates()]


def floats(values: pd.Series) -> np.ndarray:
    """A float64 numpy array (nullable columns' NA -> NaN), which plotly stores compactly."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


# --------------------------------------------------------------------------- blocks
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
    phases = _phases_in(pd.concat([summ[["phase"]] for _, summ in parts]))
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
    phases = _phases_in(pd.concat([summ[["phase"]] for summ in summaries.values()]))
    fig = make_subplots(rows=1, cols=len(phases), subplot_titles=[plot_text(p) for p in phases],
                        horizontal_spacing=0.06)
    for i, (name, summ) in enumerate(summaries.items()):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for j, phase in enumerate(phases):
            sub = summ[summ["phase"] == phase]
            if sub.empty:
                continue
            sub = sub.set_index(sub["name"].astype(str))
            sub = sub.reindex([m for m in order if m in sub.index])
            share = floats(sub["share"])
            fig.add_trace(go.Bar(
                name=plot_text(name), x=[plot_text(m) for m in sub.index], y=floats(sub["self_ms"]),
                text=[fmt.pct(v) for v in share], textposition="outside", marker_color=color,
                legendgroup=plot_text(name), showlegend=not any(t.name == plot_text(name) for t in fig.data),
                customdata=np.column_stack([floats(sub["calls"]), floats(sub["total_ms"]), floats(sub["mean_ms"]), share * 100]),
                hovertemplate="%{x}<br>self %{y:.3f} ms, total %{customdata[1]:.3f} ms<br>%{customdata[0]} calls, "
                              "mean %{customdata[2]:.4f} ms<br>share %{customdata[3]:.1f}%<extra>"
                              + plot_text(f"{name} · {phase}") + "</extra>",
            ), row=1, col=j + 1)
    fig.update_layout(title={"text": title + "<br><sup>bar text: share of that run's phase forward time</sup>"},
                      template=TEMPLATE, height=HEIGHT + 40, barmode="group",
                      margin={"l": 60, "r": 30, "t": 90, "b": 60}, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="self host ms", col=1)
    return fig


def step_breakdown(calls: pd.DataFrame, steps: pd.DataFrame, sampling: pd.DataFrame | None = None) -> go.Figure:
    """One step split into embedding / layers / norm / lm_head / model level / residue / outside.

    One horizontal stacked bar per phase: prefill is its (single) step, decode and the other
    phases are the mean over their steps, so the bars read as "one step of this phase".
    With the ``sampling`` frame, the time outside the model is split into its stages (each
    logits processor, the stopping checks, candidate drafting, the remainder) as the bars'
    last segments; prefill's are the first token's.

    Args:
        calls: the ``calls`` frame (block time per role).
        steps: the ``steps`` frame (forward and outside time per step).
        sampling: the ``sampling`` frame, or None to show the time outside the model as one part.

    Returns:
        A stacked horizontal bar chart in ms per step.
    """
    title = "Where one step's time goes (mean per step of each phase)"
    if steps.empty:
        return empty_figure(title)
    labels, parts = _breakdown(calls, steps)
    phases = _phases_in(steps)
    stages = _stage_parts(sampling, steps, phases) if sampling is not None and len(sampling) else None
    return _breakdown_figure(title, labels, parts, stages)


def step_breakdown_runs(parts: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> go.Figure:
    """:func:`step_breakdown` of several runs, each phase's bar of each run on its own row
    (``name · decode (9 steps)``): runs are shown side by side, never added together.

    Args:
        parts: run name (its folder) -> (``calls``, ``steps``) of that run.
    """
    title = "Where one step's time goes (mean per step of each phase), per run"
    labels: list[str] = []
    merged: dict[str, list[float]] = {key: [] for key, _ in PARTS}
    for name, (calls, steps) in parts.items():
        if steps.empty:
            continue
        lab, part = _breakdown(calls, steps)
        labels += [f"{name} · {x}" for x in lab]
        for key in merged:
            merged[key] += part[key]
    if not labels:
        return empty_figure(title)
    fig = _breakdown_figure(title, labels, merged)
    fig.update_layout(height=max(HEIGHT, 120 + 40 * len(labels)))
    return fig


def _breakdown(calls: pd.DataFrame, steps: pd.DataFrame) -> tuple[list[str], dict[str, list[float]]]:
    """Bar labels (one per phase) and ms per step of each part, for :func:`step_breakdown`."""
    # The summary owns the accounting: blocks and residue over the steps that have block
    # records, on the phase's clock; the time outside the model over every step.
    summ = block_summary(calls, steps, by="block") if len(calls) else None
    n_steps = steps.groupby("phase", sort=False).size()
    phases = _phases_in(steps)
    labels = [f"{p} ({int(n_steps[p])} step{'s' if n_steps[p] != 1 else ''})" for p in phases]
    parts: dict[str, list[float]] = {key: [] for key, _ in PARTS}
    for p in phases:
        sub = steps[steps["phase"] == p]
        rows = summ[summ["phase"] == p].set_index("role") if summ is not None else None
        recorded = rows is not None and "residue" in rows.index  # this phase has block records
        for key, _ in PARTS:
            if key == "outside":  # host time after each forward, over every step
                parts[key].append(float(sub["outside_ms"].mean()) if sub["outside_ms"].notna().any() else float("nan"))
            elif not recorded:  # no block records in this phase: the whole forward is residue
                parts[key].append(float(sub["forward_ms"].mean()) if key == "residue" else 0.0)
            elif key in rows.index:  # per step with block records, on the summary's clock
                r = rows.loc[key]
                ms = r["gpu_self_ms"] if pd.notna(r["gpu_self_ms"]) else r["self_ms"]
                parts[key].append(float(ms) / float(rows.loc["residue", "calls"]))
            else:
                parts[key].append(0.0)
    return labels, parts


def _breakdown_figure(title: str, labels: list[str], parts: dict[str, list[float]],
                      stages: dict[str, np.ndarray] | None = None) -> go.Figure:
    fig = base_figure(title, "ms per step", "")
    for key, name in PARTS:
        if key == "outside" and stages is not None:
            for i, (stage, vals) in enumerate(stages.items()):
                color = STAGE_FIXED.get(stage, STAGE_COLORS[i % len(STAGE_COLORS)])
                _breakdown_bar(fig, "outside: " + plot_text(STAGE_LABELS.get(stage, stage)), labels, vals, color)
            continue
        _breakdown_bar(fig, name, labels, np.array(parts[key], dtype="float64"))
    # legend in the bars' left-to-right order
    fig.update_layout(barmode="stack", yaxis={"autorange": "reversed"}, legend={"traceorder": "normal"},
                      uniformtext={"minsize": 10, "mode": "hide"})  # no unreadable labels on thin segments
    if stages is not None:  # one legend entry per stage: give the legend room below the bars
        fig.update_layout(height=HEIGHT + 20 * len(stages), legend={"orientation": "h", "y": -0.25})
    return fig


def sampling_stages(sampling: pd.DataFrame, steps: pd.DataFrame) -> go.Figure:
    """The time outside the model, stage by stage: one stacked bar per phase, ms per step.

    The step breakdown's last segments, enlarged: each logits processor in the order generate
    applies it, the stopping checks, candidate drafting (assisted decoding) and the remainder;
    each bar adds up to the phase's mean ``outside_ms``. The hover gives each stage's share of
    the phase's whole step (forward + outside).

    Args:
        sampling: the ``sampling`` frame.
        steps: the ``steps`` frame.

    Returns:
        A stacked horizontal bar chart in ms per step.
    """
    title = "The sampling step, stage by stage (mean per step, outside the model)"
    if sampling is None or sampling.empty or steps.empty:
        return empty_figure(title, "no sampling stages recorded")
    phases = [p for p in _phases_in(steps) if p in set(sampling["phase"])]
    stages = _stage_parts(sampling, steps, phases)
    latency = [float(steps.loc[steps["phase"] == p, "latency_ms"].mean()) for p in phases]
    n_steps = steps.groupby("phase", sort=False).size()
    labels = [f"{p} ({int(n_steps[p])} step{'s' if n_steps[p] != 1 else ''})" for p in phases]
    fig = base_figure(title, "ms per step", "")
    for i, (stage, vals) in enumerate(stages.items()):
        name = plot_text(STAGE_LABELS.get(stage, stage))
        share = [v / lat * 100 if lat else float("nan") for v, lat in zip(vals, latency)]
        fig.add_trace(go.Bar(name=name, y=labels, x=vals, orientation="h", customdata=share,
                             marker={"color": STAGE_FIXED.get(stage, STAGE_COLORS[i % len(STAGE_COLORS)])},
                             text=[("" if math.isnan(v) else f"{v:.3f}") for v in vals], textposition="inside",
                             hovertemplate="%{y}<br>" + name + ": %{x:.4f} ms (%{customdata:.2f}% of the step)"
                                           "<extra></extra>"))
    fig.update_layout(barmode="stack", yaxis={"autorange": "reversed"}, legend={"traceorder": "normal"},
                      height=max(300, 200 + 60 * len(phases) + 20 * len(stages)),
                      uniformtext={"minsize": 10, "mode": "hide"})  # no unreadable labels on thin segments
    return fig


def _breakdown_bar(fig: go.Figure, name: str, labels: list[str], vals: np.ndarray, color: str | None = None) -> None:
    if np.all(np.isnan(vals) | (vals == 0)):  # a part this run has not got (model level at blocks, probe)
        return
    fig.add_trace(go.Bar(name=name, y=[plot_text(x) for x in labels], x=vals, orientation="h",
                         marker={"color": color} if color else None,
                         text=[("" if math.isnan(v) else fmt.ms(v)) for v in vals], textposition="inside",
                         hovertemplate="%{y}<br>" + name + ": %{x:.4f} ms<extra></extra>"))


def _stage_parts(sampling: pd.DataFrame, steps: pd.DataFrame, phases: list[str]) -> dict[str, np.ndarray]:
    """Per sampling stage (in order, remainder last): its mean ms per step of each phase."""
    per_phase = {p: dict(stage_means(sampling, steps, p)) for p in phases}
    names: list[str] = []
    for p in phases:
        names += [k for k in per_phase[p] if k not in names]
    tail = [k for k in ("remainder", "outside (not split)") if k in names]
    names = [k for k in names if k not in tail] + tail
    out = {}
    for k in names:
        vals = [per_phase[p].get(k, 0.0) if steps.loc[steps["phase"] == p, "outside_ms"].notna().any()
                else float("nan") for p in phases]
        out[k] = np.array(vals, dtype="float64")
    return out


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
    if value == "auto":
        gpu = calls["gpu_ms"].to_numpy(dtype="float64", na_value=np.nan)[mask]
        value = "cpu_ms" if np.isnan(gpu).all() else "gpu_ms"
    if value not in ("cpu_ms", "gpu_ms"):
        raise ValueError(f"value must be 'cpu_ms', 'gpu_ms' or 'auto'; got {value!r}")
    layer = calls["layer"].to_numpy(dtype="int64", na_value=-1)[mask]
    step = calls["step"].to_numpy(dtype="int64")[mask]
    vals = calls[value].to_numpy(dtype="float64", na_value=np.nan)[mask]
    layers, li = np.unique(layer, return_inverse=True)
    step_vals, si = np.unique(step, return_inverse=True)
    bins = _bins(len(step_vals), MAX_HEAT_COLS)
    width = int(np.bincount(bins).max())
    n_bins = int(bins[-1]) + 1
    # mean of every call in (layer, bin): several runs and binned steps weigh per call
    flat = li * n_bins + bins[si]
    ok = ~np.isnan(vals)
    total = np.bincount(flat[ok], weights=vals[ok], minlength=len(layers) * n_bins).reshape(len(layers), n_bins)
    count = np.bincount(flat[ok], minlength=len(layers) * n_bins).reshape(len(layers), n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    first_step = step_vals[np.searchsorted(bins, np.arange(n_bins))]
    unit = "GPU ms" if value == "gpu_ms" else "host ms"
    note = f", each column the mean of {width} steps" if width > 1 else ""
    fig = base_figure(f"{title}: {unit} per layer call{note}", "step" if width == 1 else "first step of bin", "layer")
    fig.add_trace(go.Heatmap(z=z, x=first_step, y=layers, colorscale="Viridis", colorbar={"title": {"text": "ms"}},
                             hovertemplate="layer %{y}<br>step %{x}<br>%{z:.4f} ms<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(layers) <= 16 else None)
    return fig


# --------------------------------------------------------------------------- steps
def token_latency(steps: pd.DataFrame, runs: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """Per-token latency over the decode steps, with each run's TTFT marked at step 0.

    Args:
        steps: the ``steps`` frame (``latency_ms`` = forward + outside time of each step).
        runs: the ``runs`` frame (``ttft_ms``, ``tpot_ms_p50``).
        names: legend name of each run id (e.g. its folder); default: the run id.

    Returns:
        A line per generate run (at most ``MAX_RUNS``); the y axis turns logarithmic when TTFT
        dwarfs the decode steps.
    """
    title = "Per-token latency over the decode steps"
    ids = _generate_run_ids(runs, steps)[:MAX_RUNS]
    if steps.empty or not ids:
        return empty_figure(title, "no generate call recorded")
    fig = base_figure(title + " (star: TTFT)", "step", "ms")
    biggest_ttft, decode_median = 0.0, math.inf
    names = names or {}
    for i, rid in enumerate(ids):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        label = names.get(rid, rid)
        name = plot_text(label if len(ids) > 1 else "decode step")
        dec = steps[(steps["run_id"] == rid) & (steps["phase"] == "decode")].sort_values("step")
        if not dec.empty:
            y = dec["latency_ms"].where(dec["latency_ms"].notna(), dec["forward_ms"])
            pts = _binned(pd.DataFrame({"step": floats(dec["step"]), "ms": floats(y)}), "step", ["ms"])
            decode_median = min(decode_median, float(np.nanmedian(pts["ms"])) if pts["ms"].notna().any() else math.inf)
            fig.add_trace(go.Scatter(x=pts["step"].to_numpy(), y=pts["ms"].to_numpy(), mode="lines+markers",
                                     name=name, line={"color": color}, marker={"size": 4},
                                     hovertemplate="step %{x}<br>%{y:.3f} ms<extra></extra>"))
        row = runs[runs["run_id"] == rid] if not runs.empty else runs
        ttft = float(row["ttft_ms"].iloc[0]) if len(row) and pd.notna(row["ttft_ms"].iloc[0]) else math.nan
        if not math.isnan(ttft):
            biggest_ttft = max(biggest_ttft, ttft)
            fig.add_trace(go.Scatter(x=np.array([0.0]), y=np.array([ttft]), mode="markers+text",
                                     name=plot_text(f"TTFT {label}" if len(ids) > 1 else "TTFT"),
                                     marker={"symbol": "star", "size": 14, "color": color},
                                     text=[f"TTFT {fmt.ms(ttft)} ms"], textposition="middle right",
                                     hovertemplate="TTFT %{y:.3f} ms<extra></extra>"))
        p50 = float(row["tpot_ms_p50"].iloc[0]) if len(row) and pd.notna(row["tpot_ms_p50"].iloc[0]) else math.nan
        if not math.isnan(p50) and not dec.empty:
            x0, x1 = float(dec["step"].min()), float(dec["step"].max())
            fig.add_trace(go.Scatter(x=np.array([x0, x1]), y=np.array([p50, p50]), mode="lines",
                                     name=plot_text(f"TPOT p50 {label}" if len(ids) > 1 else "TPOT p50"),
                                     line={"color": color, "dash": "dash", "width": 1},
                                     hovertemplate="TPOT p50 %{y:.3f} ms<extra></extra>"))
    # one prefill can dwarf every decode step; a log axis keeps both readable
    if math.isfinite(decode_median) and decode_median > 0 and biggest_ttft > 20 * decode_median:
        fig.update_yaxes(type="log")
    return fig


def latency_vs_kv(steps: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """Decode-step latency against the KV length it attended over.

    Args:
        steps: the ``steps`` frame.
        names: legend name of each run id (e.g. its folder); default: the run id.

    Returns:
        Markers per generate run (x = cached positions before the step, y = latency ms).
    """
    title = "Decode latency vs KV length"
    if steps.empty:
        return empty_figure(title)
    dec = steps[steps["phase"] == "decode"]
    if dec.empty:
        return empty_figure(title, "no decode steps recorded")
    fig = base_figure(title, "KV length (cached positions before the step)", "ms per step")
    ids = list(dict.fromkeys(dec["run_id"].astype(str)))[:MAX_RUNS]
    for i, rid in enumerate(ids):
        sub = dec[dec["run_id"] == rid].sort_values("kv_len")
        y = sub["latency_ms"].where(sub["latency_ms"].notna(), sub["forward_ms"])
        pts = _binned(pd.DataFrame({"kv": floats(sub["kv_len"]), "ms": floats(y), "fwd": floats(sub["forward_ms"])}), "kv",
                      ["ms", "fwd"])
        fig.add_trace(go.Scatter(x=pts["kv"].to_numpy(), y=pts["ms"].to_numpy(), mode="markers",
                                 name=plot_text((names or {}).get(rid, rid) if len(ids) > 1 else "decode step"),
                                 marker={"size": 5, "color": RUN_COLORS[i % len(RUN_COLORS)]},
                                 customdata=pts["fwd"].to_numpy(),
                                 hovertemplate="kv %{x}<br>latency %{y:.3f} ms<br>forward %{customdata:.3f} ms"
                                               "<extra></extra>"))
    return fig


def memory_over_steps(steps: pd.DataFrame, calls: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """KV-cache bytes, CUDA peak (where recorded) and block output bytes over the steps.

    Args:
        steps: the ``steps`` frame (``kv_cache_bytes``, ``mem_peak_bytes``).
        calls: the ``calls`` frame (``out_bytes`` of the top-level blocks, summed per step).
        names: legend name of each run id (e.g. its folder); default: the run id.

    Returns:
        Lines in MiB per generate run, x = step.
    """
    title = "Memory over the steps"
    if steps.empty:
        return empty_figure(title)
    fig = base_figure(title, "step", "MiB")
    blocks = calls.loc[calls["role"].isin(BLOCK_ROLES), ["run_id", "step", "out_bytes"]] if len(calls) else calls
    out_bytes = blocks.groupby(["run_id", "step"], sort=False)["out_bytes"].sum() if len(blocks) else None
    ids = list(dict.fromkeys(steps["run_id"].astype(str)))[:MAX_RUNS]
    multi = len(ids) > 1
    drawn = 0
    for i, rid in enumerate(ids):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        sub = steps[(steps["run_id"] == rid) & (steps["step"] >= 0)].sort_values("step")
        series = {"kv": floats(sub["kv_cache_bytes"]) / 2**20, "peak": floats(sub["mem_peak_bytes"]) / 2**20}
        if out_bytes is not None and rid in out_bytes.index.get_level_values(0):
            ob = out_bytes.xs(rid, level=0)
            series["out"] = floats(pd.Series(sub["step"].map(ob).to_numpy())) / 2**20
        pts = _binned(pd.DataFrame({"step": floats(sub["step"]), **series}), "step", list(series))
        for key, label, dash in (("kv", "KV cache", "solid"), ("peak", "CUDA peak", "dot"),
                                 ("out", "block outputs", "dash")):
            if key not in pts or not pts[key].notna().any():
                continue
            drawn += 1
            fig.add_trace(go.Scatter(x=pts["step"].to_numpy(), y=pts[key].to_numpy(), mode="lines",
                                     name=plot_text(f"{label} {(names or {}).get(rid, rid)}" if multi else label),
                                     line={"color": color, "dash": dash},
                                     hovertemplate="step %{x}<br>" + label + " %{y:.3f} MiB<extra></extra>"))
    if not drawn:
        return empty_figure(title, "no memory figures recorded")
    return fig


# --------------------------------------------------------------------------- comparison
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
    phases = _phases_in(d)
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
    fig.update_layout(title={"text": title}, template=TEMPLATE, height=HEIGHT + 40, barmode="group",
                      margin={"l": 60, "r": 30, "t": 90, "b": 60}, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="self host ms", col=1)
    return fig

