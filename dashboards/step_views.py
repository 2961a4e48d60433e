"""The dashboard's Timeline and Memory pages: the generate calls step by step (per-token latency,
latency against the KV length) and their memory (per block, over the steps, the KV cache's growth).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from probe.reports import figures
from probe.columns import combine

from . import data
from .context import Context, show_chart, show_table


def timeline(ctx: Context) -> None:
    """Per-token latency over the steps, and latency against the KV length."""
    run = ctx.run
    names = ctx.names()
    show_chart(ctx.memo("token_latency", lambda: figures.token_latency(run.steps, run.runs, names)), "timeline_tokens")
    show_chart(ctx.memo("latency_vs_kv", lambda: figures.latency_vs_kv(run.steps, names)), "timeline_kv")


def _block_memory_figure(mem: pd.DataFrame):
    """Bars of per-block memory by phase: allocator growth on CUDA, output bytes on CPU."""
    import plotly.express as px  # only this view needs it; keeps the first page load lighter

    if mem.empty:
        return figures.empty_figure("Memory per block")
    on_cuda = mem["mean_alloc_delta_bytes"].notna().any()
    value = "mean_alloc_delta_bytes" if on_cuda else "mean_out_bytes"
    label = "mean allocator growth per call" if on_cuda else "mean output bytes per call"
    if "run" in mem.columns:  # several runs: a bar per run, one panel per phase
        return px.bar(mem, x="role", y=value, color="run", facet_col="phase", barmode="group",
                      template=figures.TEMPLATE, title="Memory per block: " + label + ", per run",
                      labels={value: "bytes", "role": "block"}, color_discrete_sequence=figures.RUN_COLORS,
                      height=figures.HEIGHT)
    return px.bar(mem, x="role", y=value, color="phase", barmode="group", template=figures.TEMPLATE,
                  title="Memory per block: " + label, labels={value: "bytes", "role": "block"},
                  color_discrete_map=figures.PHASE_COLORS, height=figures.HEIGHT)


def _kv_growth(steps: pd.DataFrame, names: dict[str, str] | None = None) -> pd.DataFrame:
    """Per generate call: KV-cache bytes after its last step and bytes per cached position."""
    steps = steps.dropna(subset=["kv_cache_bytes"])
    if steps.empty:
        return pd.DataFrame()
    last = steps.sort_values("step").groupby("run_id", sort=False, observed=True).tail(1)
    positions = last["kv_len"] + last["q_len"]
    named = {"run": [names.get(str(r), str(r)) for r in last["run_id"]]} if names else {}
    return pd.DataFrame({
        **named, "run_id": last["run_id"].to_numpy(), "last step": last["step"].to_numpy(),
        "positions": positions.to_numpy(), "kv_cache_bytes": last["kv_cache_bytes"].to_numpy(),
        "bytes per position": (last["kv_cache_bytes"].astype("float64") / positions.where(positions > 0)).to_numpy(),
    })


def memory(ctx: Context) -> None:
    """Per-block memory (output bytes; allocator deltas on CUDA) and KV-cache growth."""
    run = ctx.run
    names = ctx.names()
    if len(ctx.selected) > 1:  # per run, never added together
        each = ctx.each()
        mem = ctx.memo("block_memory_runs", lambda: combine(
            [data.block_memory(r.calls).assign(run=n) for n, r in each.items()]))
        mem = mem[["run", *[c for c in mem.columns if c != "run"]]]
    else:
        mem = ctx.memo("block_memory", lambda: data.block_memory(run.calls))
    show_chart(ctx.memo("block_memory_fig", lambda: _block_memory_figure(mem)), "memory_blocks")
    if len(mem) and not mem["mean_alloc_delta_bytes"].notna().any():
        st.caption("On CPU the probe records each call's output tensor bytes; allocator figures need CUDA.")
    show_table(mem, "memory_table")
    show_chart(ctx.memo("memory_over_steps", lambda: figures.memory_over_steps(run.steps, run.calls, names)),
           "memory_steps")
    kv = ctx.memo("kv_growth", lambda: _kv_growth(run.steps, names if len(ctx.selected) > 1 else None))
    if len(kv):
        st.caption("KV cache after the last step shown, and its size per cached position")
        show_table(kv, "memory_kv")
