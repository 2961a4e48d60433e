"""Figures of the cost model: the roofline and the sweep charts. Pure ``DataFrame -> Figure``.

Used by the HTML report and the dashboard alike; nothing here reads files or touches a model.

- :func:`roofline` — achieved FLOP/s against arithmetic intensity per block and phase, under
  the device's roofs (from :func:`probe.roofline.roofline` and :class:`probe.hardware.Peaks`).
- :func:`sweep_prefill`, :func:`sweep_decode`, :func:`sweep_throughput` — from a sweep frame
  (:func:`probe.sweep.sweep` / :func:`probe.sweep.load_sweep`).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe import fmt

from .figure_base import themed

_PHASE_COLORS = {"prefill": "#1f77b4", "decode": "#d62728", "extend": "#9467bd", "recompute": "#8c564b",
                 "forward": "#7f7f7f"}
_BOUND_SYMBOLS = {"compute": "circle", "memory": "square", "host": "x", "wait": "hourglass",
                  "error": "circle-x-open"}
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    themed(fig).update_layout(title=title, annotations=[dict(text=why, showarrow=False, xref="paper", yref="paper",
                                                             x=0.5, y=0.5)])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _peaks_dict(peaks: Any) -> dict | None:
    if peaks is None:
        return None
    if isinstance(peaks, dict):
        return peaks
    return {k: getattr(peaks, k) for k in ("name", "dtype", "flops_per_s", "bytes_per_s", "source", "measured")}


def roofline(roof_df: pd.DataFrame, peaks: Any, *, where: str | None = None, labels: bool = True) -> go.Figure:
    """Roofline chart: achieved FLOP/s against FLOP/byte, one marker per block and phase.

    Args:
        roof_df: output of :func:`probe.roofline.roofline`.
        peaks: :class:`probe.hardware.Peaks` or its ``to_dict()``; the title says whether the
            roofs are measured on this machine or from a datasheet.
        where: the title's word for where measured roofs come from (default "measured on
            this machine"; a report of a saved run says "measured where recorded").
        labels: write each marker's block name next to it (off for crowded charts, e.g. one
            marker per rank; the name stays in the hover).
    Returns:
        A log-log figure: the memory roof (slope = bandwidth) and the compute roof meeting at
        the ridge point; markers coloured by phase, shaped by bound (compute ●, memory ■,
        host ×, wait ⧗, measurement error ⊗ — a marker above its roof, whose label says so);
        rows with zero FLOPs (embedding gathers) cannot sit on a log axis and are listed under
        the chart instead.
    """
    pk = _peaks_dict(peaks)
    title = "Roofline"
    if roof_df is None or roof_df.empty or pk is None:
        return _empty(title, "no cost estimate (annotate the calls) or no device peaks")
    giga = pk["flops_per_s"] < 1e12
    unit, scale = ("GFLOP/s", 1e9) if giga else ("TFLOP/s", 1e12)
    where = (where or "measured on this machine") if pk["measured"] else "datasheet"
    title = (f"Roofline — {html.escape(str(pk['name']))}, {pk['dtype']} ({where}: "
             f"{fmt.flop_s(pk['flops_per_s'])}, {fmt.byte_s(pk['bytes_per_s'])})")
    df = roof_df.copy()
    df["_y"] = df["achieved_tflop_s"].astype("float64") * 1e12 / scale
    ok = (df["intensity_flops_per_byte"] > 0) & (df["_y"] > 0) & df["_y"].notna()
    shown, hidden = df[ok], df[~ok]
    ridge = pk["flops_per_s"] / pk["bytes_per_s"]
    xs = shown["intensity_flops_per_byte"].to_numpy(dtype="float64")
    lo = min([ridge / 100] + list(xs / 2))
    hi = max([ridge * 10] + list(xs * 2))
    x = np.geomspace(lo, hi, 200)
    y = np.minimum(pk["flops_per_s"], x * pk["bytes_per_s"]) / scale
    ys = shown["_y"].to_numpy(dtype="float64")
    y_lo = float(np.log10(ys.min())) if len(ys) else 0.0
    y_hi = float(np.log10(max(float(y.max()), ys.max() if len(ys) else 0.0)))
    y_range = (y_lo - 0.3, y_hi + 0.3)
    # labels are annotations placed where they overlap no other label or marker, further out
    # with a leader line when the markers crowd (several blocks of one phase at one intensity)
    # a marker above its roof is a measurement error, not a bound: its label says so
    names = [f"{m} ({fmt.pct(f)} of roof: measurement error)" if b == "error" else m for m, b, f in
             zip(shown["module"].astype(str), shown["bound"].astype(object), shown["roof_fraction"].astype(float))]
    labels_at = _place_labels(np.log10(xs), np.log10(ys) if len(ys) else ys, names,
                              (float(np.log10(lo)), float(np.log10(hi))), y_range) if labels else []
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="roof", line=dict(color="black", width=2),
                             hovertemplate="intensity %{x:.3g} FLOP/B<br>roof %{y:.3g} " + unit + "<extra></extra>"))
    for phase, sub in shown.groupby("phase", sort=False, observed=True):
        fig.add_trace(go.Scatter(
            x=sub["intensity_flops_per_byte"], y=sub["_y"], mode="markers",
            name=str(phase),
            text=sub["module"].astype(str).map(html.escape),
            marker=dict(size=11, color=_PHASE_COLORS.get(str(phase), "#333"),
                        symbol=[_BOUND_SYMBOLS.get(str(b), "diamond") for b in sub["bound"].astype(object)]),
            customdata=list(zip(sub["bound"].astype(str), sub["reason"].astype(str).map(html.escape),
                                sub["time_ms"].astype(float), sub["time_source"].astype(str))),
            hovertemplate=("<b>%{text}</b> (" + str(phase) + ")<br>intensity %{x:.3g} FLOP/B<br>achieved %{y:.3g} "
                           + unit + "<br>%{customdata[2]:.3f} ms (%{customdata[3]} time)<br>bound: %{customdata[0]}"
                           "<br>%{customdata[1]}<extra></extra>"),
        ))
    for (text, dx, dy, arrow), lx, ly in zip(labels_at, np.log10(xs), np.log10(ys)):
        if not text:
            continue
        common = dict(x=float(lx), y=float(ly), xref="x", yref="y", text=html.escape(text), font=dict(size=11))
        if arrow:  # ay counts downwards in pixels
            fig.add_annotation(**common, showarrow=True, ax=dx, ay=-dy, arrowhead=0, arrowwidth=0.7,
                               arrowcolor="#999", standoff=5)
        else:
            fig.add_annotation(**common, showarrow=False, xshift=dx, yshift=dy)
    fig.add_vline(x=ridge, line=dict(dash="dot", color="gray"))
    # an annotation on a log axis takes log10(x) (add_vline's own label would sit at 10**ridge)
    fig.add_annotation(x=float(np.log10(ridge)), y=1, xref="x", yref="paper", text=f"ridge {fmt.intensity(ridge)}",
                       showarrow=False, xanchor="right", yanchor="top", font=dict(size=11, color="gray"))
    notes = []
    errors = shown[shown["bound"].astype(object) == "error"]
    if not errors.empty:
        notes.append("measurement error, not a bound (above its roof: the peaks too low, or the time or estimate "
                     "wrong): " + ", ".join(f"{html.escape(str(m))} ({p}, {fmt.pct(f)} of roof)" for m, p, f in
                                           zip(errors["module"], errors["phase"], errors["roof_fraction"])))
    if not hidden.empty:
        notes.append("not on the log axes (zero FLOPs or time): " + ", ".join(
            f"{html.escape(str(m))} ({p})" for m, p in zip(hidden["module"], hidden["phase"])))
    notes.append(f"roofs: {html.escape(str(pk['source']))}")
    # taller than the other charts: the notes sit in the bottom margin, below the axis title
    themed(fig).update_layout(title=title, legend_title_text="phase", height=520,
                      margin=dict(b=150))
    fig.add_annotation(text="<br>".join(notes), showarrow=False, xref="paper", yref="paper", x=0, y=-0.2,
                       yanchor="top",
                       xanchor="left", align="left", font=dict(size=10))
    # an explicit range: left to autorange, the ridge annotation stretches the axis decades too far
    fig.update_xaxes(type="log", title="arithmetic intensity (FLOP/byte)", range=[np.log10(lo), np.log10(hi)])
    fig.update_yaxes(type="log", title=f"achieved {unit}", range=list(y_range))
    return fig


#: directions a marker's label may go, tried in order (unit steps in x and y, y up)
_LABEL_DIRS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1))


def _place_labels(lx: np.ndarray, ly: np.ndarray, texts: list[str], x_range: tuple[float, float],
                  y_range: tuple[float, float], width_px: float = 850, height_px: float = 270
                  ) -> list[tuple[str, float, float, bool]]:
    """(text, dx, dy, leader line) of each marker's label, in pixels from the marker (y up), so
    that labels overlap neither each other nor a marker.

    Greedy, in the plot's pixel space (log10 coordinates scaled to the plot area): each label
    takes the first free spot next to its marker, else the first free one further out (drawn
    with a leader line), else the least covered. A marker sitting on another with the same
    name (one block in two phases) gets no second label.
    """
    def px(i: int) -> tuple[float, float]:
        fx = (lx[i] - x_range[0]) / ((x_range[1] - x_range[0]) or 1.0)
        fy = (ly[i] - y_range[0]) / ((y_range[1] - y_range[0]) or 1.0)
        return fx * width_px, fy * height_px

    char_w, line_h, gap, mark = 6.5, 14.0, 5.0, 6.0
    pts = [px(i) for i in range(len(texts))]
    boxes = [(x - mark, y - mark, x + mark, y + mark) for x, y in pts]  # the markers themselves

    def overlap(b: tuple[float, float, float, float]) -> float:
        total = 0.0
        for o in boxes:
            w = min(b[2], o[2]) - max(b[0], o[0])
            h = min(b[3], o[3]) - max(b[1], o[1])
            if w > 0 and h > 0:
                total += w * h
        return total

    out: list[tuple[str, float, float, bool]] = []
    for i, text in enumerate(texts):
        x, y = pts[i]
        if any(texts[j] == text and abs(pts[j][0] - x) < 8 and abs(pts[j][1] - y) < 8 for j in range(i)):
            out.append(("", 0.0, 0.0, False))
            continue
        half = len(text) * char_w / 2
        best = None
        for reach in (1.0, 2.2, 3.4, 4.6):
            for ux, uy in _LABEL_DIRS:
                dx = ux * (half + gap + mark) * reach
                dy = uy * (line_h / 2 + gap + mark) * reach
                box = (x + dx - half, y + dy - line_h / 2, x + dx + half, y + dy + line_h / 2)
                if not (0 <= box[0] and box[2] <= width_px and 0 <= box[1] and box[3] <= height_px):
                    continue  # off the plot
                cost = overlap(box)
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, reach > 1, box)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # nowhere inside the plot: straight above
            best = (0.0, 0.0, line_h / 2 + gap + mark, False, (x - half, y, x + half, y + line_h))
        boxes.append(best[4])
        out.append((text, best[1], best[2], best[3]))
    return out


def _median_band(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    g = df.groupby(keys, observed=True)[value]
    return pd.DataFrame({"median": g.median(), "low": g.min(), "high": g.max(), "n": g.size()}).reset_index()


def sweep_prefill(sweep_df: pd.DataFrame) -> go.Figure:
    """Prefill time (ms, median over repeats, bars = min..max) against prompt length, a line per batch."""
    title = "Prefill time vs prompt length"
    pre = sweep_df[sweep_df["phase"] == "prefill"] if sweep_df is not None and not sweep_df.empty else None
    if pre is None or pre.empty:
        return _empty(title, "no prefill steps in this sweep")
    per_run = pre.groupby(["batch", "prompt_len", "repeat"], as_index=False)["latency_ms"].sum()
    band = _median_band(per_run, ["batch", "prompt_len"], "latency_ms")
    fig = go.Figure()
    for i, (b, sub) in enumerate(band.groupby("batch")):
        sub = sub.sort_values("prompt_len")
        fig.add_trace(go.Scatter(
            x=sub["prompt_len"], y=sub["median"], mode="lines+markers", name=f"batch {b}",
            line=dict(color=_PALETTE[i % len(_PALETTE)]),
            error_y=dict(type="data", symmetric=False, array=sub["high"] - sub["median"],
                         arrayminus=sub["median"] - sub["low"]),
            hovertemplate="prompt %{x} tokens<br>prefill %{y:.2f} ms<extra>batch " + str(b) + "</extra>",
        ))
    themed(fig).update_layout(title=title, legend_title_text="batch")
    fig.update_xaxes(type="log", title="prompt length (tokens)", tickvals=sorted(band["prompt_len"].unique()))
    fig.update_yaxes(title="prefill latency (ms)", rangemode="tozero")
    return fig


def sweep_decode(sweep_df: pd.DataFrame) -> go.Figure:
    """Decode ms per token against KV length (cached positions), a colour per batch size.

    Each prompt length gives one segment (its decode steps); the median over repeats.
    """
    title = "Decode time per token vs KV length"
    dec = sweep_df[sweep_df["phase"] == "decode"] if sweep_df is not None and not sweep_df.empty else None
    if dec is None or dec.empty:
        return _empty(title, "no decode steps in this sweep")
    band = _median_band(dec, ["batch", "prompt_len", "kv_len"], "latency_ms")
    fig = go.Figure()
    for i, (b, sub_b) in enumerate(band.groupby("batch")):
        color = _PALETTE[i % len(_PALETTE)]
        for j, (p, sub) in enumerate(sub_b.groupby("prompt_len")):
            sub = sub.sort_values("kv_len")
            fig.add_trace(go.Scatter(
                x=sub["kv_len"], y=sub["median"], mode="lines+markers", marker=dict(size=4), name=f"batch {b}",
                legendgroup=f"b{b}",
                showlegend=j == 0, line=dict(color=color),
                hovertemplate=("KV length %{x}<br>%{y:.2f} ms/token<extra>batch " + str(b)
                               + f", prompt {p}</extra>"),
            ))
    themed(fig).update_layout(title=title, legend_title_text="batch")
    kv = band["kv_len"][band["kv_len"] > 0]
    wide = not kv.empty and kv.max() / kv.min() > 20  # 16..1056 reads better on a log axis
    fig.update_xaxes(title="KV length (cached positions)", type="log" if wide else "linear")
    fig.update_yaxes(title="decode latency per token (ms)", rangemode="tozero")
    return fig


def sweep_throughput(sweep_df: pd.DataFrame) -> go.Figure:
    """Decode tokens/s (all sequences together) against batch size, a line per prompt length."""
    title = "Decode throughput vs batch size"
    if sweep_df is None or sweep_df.empty:
        return _empty(title, "empty sweep")
    runs = sweep_df.groupby(["prompt_len", "batch", "repeat"], as_index=False)["decode_tok_s"].first()
    runs = runs[runs["decode_tok_s"].notna()]
    if runs.empty:
        return _empty(title, "no decode throughput recorded (one new token only?)")
    band = _median_band(runs, ["prompt_len", "batch"], "decode_tok_s")
    fig = go.Figure()
    for i, (p, sub) in enumerate(band.groupby("prompt_len")):
        sub = sub.sort_values("batch")
        fig.add_trace(go.Scatter(
            x=sub["batch"], y=sub["median"], mode="lines+markers", name=f"prompt {p}",
            line=dict(color=_PALETTE[i % len(_PALETTE)]),
            hovertemplate="batch %{x}<br>%{y:,.1f} tok/s<extra>prompt " + str(p) + "</extra>",
        ))
    themed(fig).update_layout(title=title, legend_title_text="prompt length")
    fig.update_xaxes(title="batch size", tickvals=sorted(band["batch"].unique()))
    fig.update_yaxes(title="decode tokens/s (batch total)", rangemode="tozero")
    return fig

