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

from probe.run import block_summary
from probe.schema import BLOCK_ROLES, PHASES

from .diff import block_diff
from .tables import HEADLINE_COLUMNS, headline, ranks, shape_walkthrough  # noqa: F401  (part of this module's API)

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
         ("residue", "residue (in forward, outside blocks)"), ("outside", "outside model (logits, sampling)"))
ROLE_ORDER = {r: i for i, r in enumerate((*BLOCK_ROLES, "attention", "mlp", "layer_norm", "other", "residue",
                                          "outside"))}


# --------------------------------------------------------------------------- helpers
def plot_text(value: object) -> str:
    """``value`` as text that plotly shows literally (its pseudo-HTML is escaped)."""
    return html.escape(str(value), quote=False)


def _figure(title: str, xtitle: str = "", ytitle: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title={"text": title}, template=TEMPLATE, height=HEIGHT, xaxis_title=xtitle,
                      yaxis_title=ytitle, margin={"l": 60, "r": 30, "t": 60, "b": 60},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def empty_figure(title: str, message: str = "no data recorded") -> go.Figure:
    """A figure with ``title`` and a centred ``message`` instead of data."""
    fig = _figure(title)
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


def _f(values: pd.Series) -> np.ndarray:
    """A float64 numpy array (nullable columns' NA -> NaN), which plotly stores compactly."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


# --------------------------------------------------------------------------- blocks
def phase_blocks(calls: pd.DataFrame, steps: pd.DataFrame, by: str = "role") -> go.Figure:
    """Prefill vs decode host time per block (``by="role"``) or per module (``by="module"``).

    Bars are total ms per phase; the text on each bar is the block's share of its phase's
    forward time. The residue (forward time outside every block) and the time outside the
    model (logits processing, sampling) are shown as their own bars. A run merged from
    several ranks gets one bar per phase and rank (``prefill · rank 1``), each rank's share
    taken over its own forward time; ranks differ by bar pattern, phases by colour.

    Args:
        calls: the ``calls`` frame.
        steps: the ``steps`` frame (phase totals, residue, outside time).
        by: ``"role"`` (embed / layer / norm / head ...) or ``"module"`` (each module).

    Returns:
        A grouped bar chart, one trace per phase (per phase and rank with several ranks).
    """
    title = "Time per block, prefill vs decode"
    rank_list = ranks(calls)
    if len(rank_list) > 1:
        rc = calls["rank"].to_numpy(dtype="int64", na_value=0)
        rs = steps["rank"].to_numpy(dtype="int64", na_value=0)
        parts = [(r, block_summary(calls[rc == r], steps[rs == r], by=by)) for r in rank_list]
    else:
        parts = [(None, block_summary(calls, steps, by=by))]
    if all(summ.empty for _, summ in parts):
        return empty_figure(title)
    if by == "role":
        parts = [(r, summ.assign(_o=summ["role"].map(ROLE_ORDER).fillna(len(ROLE_ORDER))).sort_values(
            "_o", kind="stable")) for r, summ in parts]
    order = list(dict.fromkeys(m for _, summ in parts for m in summ["module"].astype(str)))
    phases = _phases_in(pd.concat([summ[["phase"]] for _, summ in parts]))
    fig = _figure(title + " (bar text: share of the phase's forward time)", "block", "total host ms")
    for phase in phases:
        for i, (rank, summ) in enumerate(parts):
            sub = summ[summ["phase"] == phase]
            if sub.empty:
                continue
            sub = sub.set_index(sub["module"].astype(str))
            sub = sub.reindex([m for m in order if m in sub.index])
            share = _f(sub["share"]) * 100
            name = phase if rank is None else f"{phase} · rank {rank}"
            fig.add_trace(go.Bar(
                name=plot_text(name), x=[plot_text(m) for m in sub.index], y=_f(sub["total_ms"]),
                text=[("" if math.isnan(s) else f"{s:.1f}%") for s in share], textposition="outside",
                customdata=np.column_stack([_f(sub["calls"]), _f(sub["mean_ms"]), share]),
                hovertemplate="%{x}<br>total %{y:.3f} ms<br>%{customdata[0]} calls, mean %{customdata[1]:.4f} ms"
                              "<br>share %{customdata[2]:.1f}%<extra>" + plot_text(name) + "</extra>",
                marker_color=PHASE_COLORS.get(phase),
                **({} if rank is None else {"marker_pattern_shape": RANK_PATTERNS[i % len(RANK_PATTERNS)],
                                            "legendgroup": plot_text(phase)}),
            ))
    fig.update_layout(barmode="group")
    return fig


def step_breakdown(calls: pd.DataFrame, steps: pd.DataFrame) -> go.Figure:
    """One step split into embedding / layers / norm / lm_head / residue / outside the model.

    One horizontal stacked bar per phase: prefill is its (single) step, decode and the other
    phases are the mean over their steps, so the bars read as "one step of this phase".

    Args:
        calls: the ``calls`` frame (block time per role).
        steps: the ``steps`` frame (forward and outside time per step).

    Returns:
        A stacked horizontal bar chart in ms per step.
    """
    title = "Where one step's time goes (mean per step of each phase)"
    if steps.empty:
        return empty_figure(title)
    # The summary owns the accounting: blocks and residue over the steps that have block
    # records, on the phase's clock; the time outside the model over every step.
    summ = block_summary(calls, steps, by="role") if len(calls) else None
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
                ms = r["gpu_total_ms"] if pd.notna(r["gpu_total_ms"]) else r["total_ms"]
                parts[key].append(float(ms) / float(rows.loc["residue", "calls"]))
            else:
                parts[key].append(0.0)
    fig = _figure(title, "ms per step", "")
    for key, name in PARTS:
        vals = np.array(parts[key], dtype="float64")
        if np.all(np.isnan(vals)):
            continue
        fig.add_trace(go.Bar(name=name, y=labels, x=vals, orientation="h",
                             text=[("" if math.isnan(v) else f"{v:.3f}") for v in vals], textposition="inside",
                             hovertemplate="%{y}<br>" + name + ": %{x:.4f} ms<extra></extra>"))
    fig.update_layout(barmode="stack", yaxis={"autorange": "reversed"})
    return fig


def layer_heatmap(calls: pd.DataFrame, phase: str = "decode", value: str = "auto") -> go.Figure:
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
    fig = _figure(f"{title}: {unit} per layer call{note}", "step" if width == 1 else "first step of bin", "layer")
    fig.add_trace(go.Heatmap(z=z, x=first_step, y=layers, colorscale="Viridis", colorbar={"title": {"text": "ms"}},
                             hovertemplate="layer %{y}<br>step %{x}<br>%{z:.4f} ms<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(layers) <= 16 else None)
    return fig


# --------------------------------------------------------------------------- steps
def token_latency(steps: pd.DataFrame, runs: pd.DataFrame) -> go.Figure:
    """Per-token latency over the decode steps, with each run's TTFT marked at step 0.

    Args:
        steps: the ``steps`` frame (``latency_ms`` = forward + outside time of each step).
        runs: the ``runs`` frame (``ttft_ms``, ``tpot_ms_p50``).

    Returns:
        A line per generate run (at most ``MAX_RUNS``); the y axis turns logarithmic when TTFT
        dwarfs the decode steps.
    """
    title = "Per-token latency over the decode steps"
    ids = _generate_run_ids(runs, steps)[:MAX_RUNS]
    if steps.empty or not ids:
        return empty_figure(title, "no generate call recorded")
    fig = _figure(title + " (star: TTFT)", "step", "ms")
    biggest_ttft, decode_median = 0.0, math.inf
    for i, rid in enumerate(ids):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        name = plot_text(rid if len(ids) > 1 else "decode step")
        dec = steps[(steps["run_id"] == rid) & (steps["phase"] == "decode")].sort_values("step")
        if not dec.empty:
            y = dec["latency_ms"].where(dec["latency_ms"].notna(), dec["forward_ms"])
            pts = _binned(pd.DataFrame({"step": _f(dec["step"]), "ms": _f(y)}), "step", ["ms"])
            decode_median = min(decode_median, float(np.nanmedian(pts["ms"])) if pts["ms"].notna().any() else math.inf)
            fig.add_trace(go.Scatter(x=pts["step"].to_numpy(), y=pts["ms"].to_numpy(), mode="lines+markers",
                                     name=name, line={"color": color}, marker={"size": 4},
                                     hovertemplate="step %{x}<br>%{y:.3f} ms<extra></extra>"))
        row = runs[runs["run_id"] == rid] if not runs.empty else runs
        ttft = float(row["ttft_ms"].iloc[0]) if len(row) and pd.notna(row["ttft_ms"].iloc[0]) else math.nan
        if not math.isnan(ttft):
            biggest_ttft = max(biggest_ttft, ttft)
            fig.add_trace(go.Scatter(x=np.array([0.0]), y=np.array([ttft]), mode="markers+text",
                                     name=plot_text(f"TTFT {rid}" if len(ids) > 1 else "TTFT"),
                                     marker={"symbol": "star", "size": 14, "color": color},
                                     text=[f"TTFT {ttft:.2f} ms"], textposition="middle right",
                                     hovertemplate="TTFT %{y:.3f} ms<extra></extra>"))
        p50 = float(row["tpot_ms_p50"].iloc[0]) if len(row) and pd.notna(row["tpot_ms_p50"].iloc[0]) else math.nan
        if not math.isnan(p50) and not dec.empty:
            x0, x1 = float(dec["step"].min()), float(dec["step"].max())
            fig.add_trace(go.Scatter(x=np.array([x0, x1]), y=np.array([p50, p50]), mode="lines",
                                     name=plot_text(f"TPOT p50 {rid}" if len(ids) > 1 else "TPOT p50"),
                                     line={"color": color, "dash": "dash", "width": 1},
                                     hovertemplate="TPOT p50 %{y:.3f} ms<extra></extra>"))
    # one prefill can dwarf every decode step; a log axis keeps both readable
    if math.isfinite(decode_median) and decode_median > 0 and biggest_ttft > 20 * decode_median:
        fig.update_yaxes(type="log")
    return fig


def latency_vs_kv(steps: pd.DataFrame) -> go.Figure:
    """Decode-step latency against the KV length it attended over.

    Args:
        steps: the ``steps`` frame.

    Returns:
        Markers per generate run (x = cached positions before the step, y = latency ms).
    """
    title = "Decode latency vs KV length"
    if steps.empty:
        return empty_figure(title)
    dec = steps[steps["phase"] == "decode"]
    if dec.empty:
        return empty_figure(title, "no decode steps recorded")
    fig = _figure(title, "KV length (cached positions before the step)", "ms per step")
    ids = list(dict.fromkeys(dec["run_id"].astype(str)))[:MAX_RUNS]
    for i, rid in enumerate(ids):
        sub = dec[dec["run_id"] == rid].sort_values("kv_len")
        y = sub["latency_ms"].where(sub["latency_ms"].notna(), sub["forward_ms"])
        pts = _binned(pd.DataFrame({"kv": _f(sub["kv_len"]), "ms": _f(y), "fwd": _f(sub["forward_ms"])}), "kv",
                      ["ms", "fwd"])
        fig.add_trace(go.Scatter(x=pts["kv"].to_numpy(), y=pts["ms"].to_numpy(), mode="markers",
                                 name=plot_text(rid if len(ids) > 1 else "decode step"),
                                 marker={"size": 5, "color": RUN_COLORS[i % len(RUN_COLORS)]},
                                 customdata=pts["fwd"].to_numpy(),
                                 hovertemplate="kv %{x}<br>latency %{y:.3f} ms<br>forward %{customdata:.3f} ms"
                                               "<extra></extra>"))
    return fig


def memory_over_steps(steps: pd.DataFrame, calls: pd.DataFrame) -> go.Figure:
    """KV-cache bytes, CUDA peak (where recorded) and block output bytes over the steps.

    Args:
        steps: the ``steps`` frame (``kv_cache_bytes``, ``mem_peak_bytes``).
        calls: the ``calls`` frame (``out_bytes`` of the top-level blocks, summed per step).

    Returns:
        Lines in MiB per generate run, x = step.
    """
    title = "Memory over the steps"
    if steps.empty:
        return empty_figure(title)
    fig = _figure(title, "step", "MiB")
    blocks = calls.loc[calls["role"].isin(BLOCK_ROLES), ["run_id", "step", "out_bytes"]] if len(calls) else calls
    out_bytes = blocks.groupby(["run_id", "step"], sort=False)["out_bytes"].sum() if len(blocks) else None
    ids = list(dict.fromkeys(steps["run_id"].astype(str)))[:MAX_RUNS]
    multi = len(ids) > 1
    drawn = 0
    for i, rid in enumerate(ids):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        sub = steps[(steps["run_id"] == rid) & (steps["step"] >= 0)].sort_values("step")
        series = {"kv": _f(sub["kv_cache_bytes"]) / 2**20, "peak": _f(sub["mem_peak_bytes"]) / 2**20}
        if out_bytes is not None and rid in out_bytes.index.get_level_values(0):
            ob = out_bytes.xs(rid, level=0)
            series["out"] = _f(pd.Series(sub["step"].map(ob).to_numpy())) / 2**20
        pts = _binned(pd.DataFrame({"step": _f(sub["step"]), **series}), "step", list(series))
        for key, label, dash in (("kv", "KV cache", "solid"), ("peak", "CUDA peak", "dot"),
                                 ("out", "block outputs", "dash")):
            if key not in pts or not pts[key].notna().any():
                continue
            drawn += 1
            fig.add_trace(go.Scatter(x=pts["step"].to_numpy(), y=pts[key].to_numpy(), mode="lines",
                                     name=plot_text(f"{label} {rid}" if multi else label),
                                     line={"color": color, "dash": dash},
                                     hovertemplate="step %{x}<br>" + label + " %{y:.3f} MiB<extra></extra>"))
    if not drawn:
        return empty_figure(title, "no memory figures recorded")
    return fig


# --------------------------------------------------------------------------- comparison
def compare_blocks(summary_a: pd.DataFrame, summary_b: pd.DataFrame, label_a: str = "A",
                   label_b: str = "B") -> go.Figure:
    """Side-by-side total ms per (block, phase) of two runs' summaries.

    Args:
        summary_a, summary_b: ``Run.summary(by=...)`` of the two runs (same ``by``).
        label_a, label_b: legend names of the two runs.

    Returns:
        Grouped bars (x = ``phase · block``), the difference and ratio in the hover.
    """
    title = "Per block and phase: " + plot_text(label_a) + " vs " + plot_text(label_b)
    d = block_diff(summary_a, summary_b)
    if d.empty:
        return empty_figure(title)
    x = [plot_text(f"{p} · {m}") for p, m in zip(d["phase"], d["module"])]
    extra = np.column_stack([_f(d["diff_ms"]), _f(d["ratio"])])
    fig = _figure(title, "phase · block", "total host ms")
    for col, label, color in (("a_ms", label_a, "#1f77b4"), ("b_ms", label_b, "#ff7f0e")):
        fig.add_trace(go.Bar(name=plot_text(label), x=x, y=_f(d[col]), marker_color=color, customdata=extra,
                             hovertemplate="%{x}<br>%{y:.3f} ms<br>B - A %{customdata[0]:.3f} ms, "
                                           "B / A %{customdata[1]:.3f}<extra></extra>"))
    fig.update_layout(barmode="group")
    return fig
