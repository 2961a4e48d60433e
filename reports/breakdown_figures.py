"""Figures of one step's time split into its parts: embedding, layers, norm, lm_head, model level,
residue, the probe's own cost and the time outside the model, the last split stage by stage
(logits processors, stopping checks, ...) where the run recorded the sampling step.

Pure ``DataFrame -> Figure`` builders under the contract of :mod:`reports.figures`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe import fmt
from probe.analysis import memo
from probe.analysis.run import block_summary
from probe.recording.sampling import stage_means

from .figure_base import HEIGHT, base_figure, empty_figure, phases_in, plot_text

#: display order and label of the parts a step's time splits into
PARTS = (("embed", "embedding"), ("layer", "layers"), ("norm", "final norm"), ("head", "lm_head"),
         ("model", "model level (base model glue, rotary)"), ("residue", "residue (in forward, in no recorded call)"),
         ("probe", "the probe's own cost"), ("outside", "outside model (logits, sampling)"))
#: colours of the sampling stages in the step breakdown: one muted family, apart from the blocks'
STAGE_COLORS = ("#17becf", "#bcbd22", "#8c564b", "#e377c2", "#393b79", "#637939", "#9c9ede", "#d6616b")
STAGE_FIXED = {"update kwargs": "#52796f", "dispatch": "#8d99ae", "stopping": "#3d405b", "candidates": "#b5838d",
               "prepare inputs": "#b08968", "probe": "#d9d9d9", "remainder": "#a8a8a8",
               "outside (not split)": "#cfcfcf"}
STAGE_LABELS = {"update kwargs": "update kwargs (cache, mask, positions)",
                "dispatch": "dispatch (the processors list around its processors)",
                "prepare inputs": "prepare inputs (of the next forward)",
                "probe": "probe (its own step bookkeeping)",
                "remainder": "remainder (token choice, bookkeeping)",
                "outside (not split)": "not split"}


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
    phases = phases_in(steps)
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
    phases = phases_in(steps)
    labels = [f"{p} ({int(n_steps[p])} step{'s' if n_steps[p] != 1 else ''})" for p in phases]
    parts: dict[str, list[float]] = {key: [] for key, _ in PARTS}
    step_phase = steps["phase"]
    for p in phases:
        # the two columns read, not every column of the phase's steps
        mine = (step_phase == p).to_numpy(dtype=bool, na_value=False)
        outside, forward = steps["outside_ms"][mine], steps["forward_ms"][mine]
        rows = _by_role(summ, p) if summ is not None else None
        recorded = rows is not None and "residue" in rows  # this phase has block records
        for key, _ in PARTS:
            if key == "outside":  # host time after each forward, over every step
                parts[key].append(float(outside.mean()) if outside.notna().any() else float("nan"))
            elif not recorded:  # no block records in this phase: the whole forward is residue
                parts[key].append(float(forward.mean()) if key == "residue" else 0.0)
            elif key in rows:  # per step with block records, on the summary's clock
                r = rows[key]
                ms = r["gpu_self_ms"] if pd.notna(r["gpu_self_ms"]) else r["self_ms"]
                parts[key].append(float(ms) / float(rows["residue"]["calls"]))
            else:
                parts[key].append(0.0)
    return labels, parts


def _by_role(summ: pd.DataFrame, phase: str) -> dict:
    """The summary's rows of ``phase`` by role (each a mapping of column to value): read from the
    columns' arrays, as a row looked up by role gives them (one row per role at the block level);
    by pandas where a role comes twice (a row is then several, as pandas would give them)."""
    mine = (summ["phase"] == phase).to_numpy(dtype=bool, na_value=False)
    roles = summ["role"].to_numpy(dtype=object)[mine]
    if len(set(roles)) < len(roles) or pd.isna(roles).any():
        rows = summ[summ["phase"] == phase].set_index("role")
        return {k: rows.loc[k] for k in rows.index.dropna().unique()}
    cols = {c: summ[c].to_numpy()[mine] for c in ("self_ms", "gpu_self_ms", "calls")}
    return {k: {c: v[i] for c, v in cols.items()} for i, k in enumerate(roles)}


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
    phases = [p for p in phases_in(steps) if p in set(sampling["phase"])]
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
    # the step breakdown and the sampling figure both ask: worked out once per pair of frames
    per_phase = {p: dict(memo.derived("stage_means", p, sampling, steps, lambda p=p: tuple(stage_means(sampling, steps, p))))
                 for p in phases}
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
