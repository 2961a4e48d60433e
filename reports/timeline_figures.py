"""Figures over the steps of the generate calls: per-token latency (TTFT marked), decode latency
against the KV length, and memory (KV cache, CUDA peak, block outputs) step by step.

Pure ``DataFrame -> Figure`` builders under the contract of :mod:`reports.figures`; long runs are
averaged in consecutive bins (:func:`reports.figure_base.binned`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe import fmt
from probe.schema import BLOCK_ROLES

from .figure_base import RUN_COLORS, base_figure, binned, distinct_text, empty_figure, floats, per_step_sum, plot_text

#: most generate runs drawn as separate traces (a sweep may hold many)
MAX_RUNS = 12


def _generate_run_ids(runs: pd.DataFrame, steps: pd.DataFrame) -> list[str]:
    """Run ids of the generate calls in recording order (from ``runs``, else from ``steps``)."""
    if not runs.empty:
        ids = runs.loc[runs["kind"] == "generate", "run_id"]
        return [str(v) for v in ids.drop_duplicates()]
    if steps.empty:
        return []
    ids = steps.loc[steps["phase"] == "prefill", "run_id"]
    return [str(v) for v in ids.drop_duplicates()]


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
            pts = binned(pd.DataFrame({"step": floats(dec["step"]), "ms": floats(y)}), "step", ["ms"])
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
    ids = distinct_text(dec["run_id"])[:MAX_RUNS]
    for i, rid in enumerate(ids):
        sub = dec[dec["run_id"] == rid].sort_values("kv_len")
        y = sub["latency_ms"].where(sub["latency_ms"].notna(), sub["forward_ms"])
        pts = binned(pd.DataFrame({"kv": floats(sub["kv_len"]), "ms": floats(y), "fwd": floats(sub["forward_ms"])}), "kv",
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
    out_bytes = per_step_sum(calls, "out_bytes", BLOCK_ROLES)  # run id -> the blocks' output bytes per step
    ids = distinct_text(steps["run_id"])[:MAX_RUNS]
    multi = len(ids) > 1
    drawn = 0
    for i, rid in enumerate(ids):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        sub = steps[(steps["run_id"] == rid) & (steps["step"] >= 0)].sort_values("step")
        series = {"kv": floats(sub["kv_cache_bytes"]) / 2**20, "peak": floats(sub["mem_peak_bytes"]) / 2**20}
        if rid in out_bytes:
            ob = out_bytes[rid]
            series["out"] = floats(pd.Series(sub["step"].map(ob).to_numpy())) / 2**20
        pts = binned(pd.DataFrame({"step": floats(sub["step"]), **series}), "step", list(series))
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
