"""Figure builders for continuous-batching runs (``runs.kind == "serve"``): pure frame -> figure.

Shared by the HTML report's "Serving" section and the dashboard's Serving view, like
:mod:`reports.figures`: empty frames give a "no data" figure, strings from the data go through
:func:`reports.figures.plot_text`, and long runs are capped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .figure_base import PHASE_COLORS, base_figure, empty_figure, floats, plot_text

#: most requests drawn in the timeline (the earliest arrivals)
MAX_REQUESTS = 400
#: most steps drawn as bars; longer runs are summed in consecutive bins
MAX_STEPS = 1500
SEGMENTS = (("queue", "#b0b0b0"), ("prefill", PHASE_COLORS["prefill"]), ("decode", PHASE_COLORS["decode"]))


def serve_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps of serving loops (those with a batch composition)."""
    if steps.empty or "requests" not in steps:
        return steps.iloc[0:0]
    return steps[steps["requests"].notna()]


def request_timeline(requests: pd.DataFrame) -> go.Figure:
    """One row per request: waiting in the queue, prefill (admitted to first token), decode
    (first to last token), on the run's clock.

    The queue ends at the scheduling pass that took the request's first prefill chunk; a prompt
    split into chunks waits through the passes between them inside its prefill segment, which
    the hover says (chunks, first step, and the segment's start and end on the loop's clock).
    """
    title = "Request timeline"
    if requests.empty:
        return empty_figure(title, "no requests recorded (not a continuous-batching run)")
    rq = requests.sort_values(["arrival_ms", "request_id"], kind="stable").head(MAX_REQUESTS)
    labels = [plot_text(f"{rid} ({st})" if st != "ok" else rid) for rid, st in zip(rq["request_id"], rq["status"])]
    arrival, sched, first, end = (floats(rq[c]) for c in ("arrival_ms", "scheduled_ms", "first_token_ms", "finished_ms"))
    first = np.where(np.isnan(first), end, first)
    sched = np.where(np.isnan(sched), end, sched)
    parts = {"queue": (arrival, sched - arrival), "prefill": (sched, first - sched), "decode": (first, end - first)}
    chunks = [f"{int(c)} prefill chunk{'s' if c != 1 else ''} from step {int(s)}" if pd.notna(c) and pd.notna(s)
              else "" for c, s in zip(rq["prefill_chunks"], rq["first_step"])]
    notes = {"queue": ["arrival to the pass that took its first prefill chunk"] * len(rq),
             "prefill": [plot_text(f"admitted to first token: {c}") for c in chunks],
             "decode": ["first to last token"] * len(rq)}
    fig = base_figure(title, "ms since the serving loop started", "")
    for name, color in SEGMENTS:
        base, width = parts[name]
        fig.add_trace(go.Bar(y=labels, x=np.nan_to_num(width, nan=0.0), base=np.nan_to_num(base, nan=0.0),
                             orientation="h", name=name, marker_color=color,
                             customdata=np.stack([np.nan_to_num(base, nan=0.0), np.nan_to_num(base + width, nan=0.0),
                                                  np.array(notes[name], dtype=object)], axis=1),
                             hovertemplate=(f"%{{y}}<br>{name}: %{{x:,.1f}} ms (%{{customdata[0]:,.1f}} to "
                                            f"%{{customdata[1]:,.1f}} ms)<br>%{{customdata[2]}}<extra></extra>")))
    fig.update_layout(barmode="overlay", height=max(320, min(1200, 60 + 16 * len(rq))),
                      yaxis={"autorange": "reversed", "type": "category"})
    if len(requests) > MAX_REQUESTS:
        fig.add_annotation(text=f"first {MAX_REQUESTS} of {len(requests)} requests", xref="paper", yref="paper",
                           x=1, y=1.06, showarrow=False)
    return fig


def batch_composition(steps: pd.DataFrame) -> go.Figure:
    """Prefill and decode tokens of each packed forward, stacked; hover shows its requests."""
    title = "Batch composition per step"
    st = serve_steps(steps)
    if st.empty:
        return empty_figure(title, "no serving steps recorded")
    st = st.reset_index(drop=True)
    width = max(1, -(-len(st) // MAX_STEPS))
    b = np.arange(len(st)) // width
    g = st.groupby(b)
    x = floats(g["step"].first())
    pre, dec, req = (floats(g[c].sum() if width > 1 else g[c].first()) for c in ("prefill_tokens", "decode_tokens", "requests"))
    phase = g["phase"].first().astype(str).to_numpy()
    xt = "step" if width == 1 else f"step (bins of {width})"
    fig = base_figure(title, xt, "tokens in the forward")
    custom = np.stack([req, phase], axis=1)
    for name, y in (("prefill tokens", pre), ("decode tokens", dec)):
        color = PHASE_COLORS["prefill" if name.startswith("prefill") else "decode"]
        fig.add_trace(go.Bar(x=x, y=y, name=name, marker_color=color, customdata=custom,
                             hovertemplate="step %{x}<br>%{y:,.0f} " + name
                                           + "<br>requests %{customdata[0]}<br>%{customdata[1]}<extra></extra>"))
    fig.update_layout(barmode="stack", bargap=0.05)
    return fig


def latency_distributions(requests: pd.DataFrame) -> go.Figure:
    """Histograms of the requests' TTFT and mean ITL (ms)."""
    title = "TTFT and ITL distributions"
    ok = requests[requests["status"] == "ok"] if not requests.empty else requests
    if ok.empty or ok["ttft_ms"].dropna().empty:
        return empty_figure(title, "no finished requests recorded")
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    fig.add_trace(go.Histogram(x=floats(ok["ttft_ms"]), name="TTFT", marker_color=PHASE_COLORS["prefill"], nbinsx=30,
                               hovertemplate="%{x} ms: %{y} requests<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Histogram(x=floats(ok["itl_ms_mean"]), name="ITL", marker_color=PHASE_COLORS["decode"], nbinsx=30,
                               hovertemplate="%{x} ms: %{y} requests<extra></extra>"), row=1, col=2)
    base = base_figure(title)
    fig.update_layout(base.layout)
    fig.update_layout(showlegend=False)
    fig.update_yaxes(title_text="requests")
    fig.update_xaxes(title_text="TTFT per request (ms)", row=1, col=1)
    fig.update_xaxes(title_text="mean ITL per request (ms)", row=1, col=2)
    for q, dash in ((0.5, "dot"), (0.9, "dash")):
        for col, c in ((1, "ttft_ms"), (2, "itl_ms_mean")):
            v = ok[c].dropna()
            if not v.empty:
                fig.add_vline(x=float(v.quantile(q)), line_dash=dash, line_color="#444", row=1, col=col,
                              annotation_text=f"p{int(q * 100)}", annotation_position="top")
    return fig


def throughput_over_time(steps: pd.DataFrame) -> go.Figure:
    """Generated tokens per second and prompt tokens per second, in time bins of the loop."""
    title = "Throughput over time"
    st = serve_steps(steps)
    if st.empty:
        return empty_figure(title, "no serving steps recorded")
    end_s = (floats(st["start_ms"]) + floats(st["forward_ms"])) / 1e3
    span = float(np.nanmax(end_s)) if len(end_s) else 0.0
    nb = int(min(60, max(5, len(st) // 3)))
    width = max(span / nb, 1e-3)
    b = np.minimum((end_s // width).astype(np.int64), nb - 1)
    frame = pd.DataFrame({"b": b, "gen": floats(st["new_tokens"]), "pre": floats(st["prefill_tokens"])})
    g = frame.groupby("b").sum().reindex(range(nb), fill_value=0.0)
    x = (np.arange(nb) + 0.5) * width
    fig = base_figure(title, "seconds since the serving loop started", "tokens per second")
    fig.add_trace(go.Scatter(x=x, y=g["gen"].to_numpy() / width, name="generated tok/s", mode="lines+markers",
                             line={"color": PHASE_COLORS["decode"]},
                             hovertemplate="%{x:.2f} s: %{y:,.1f} generated tok/s<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=g["pre"].to_numpy() / width, name="prompt tok/s (prefill)", mode="lines+markers",
                             line={"color": PHASE_COLORS["prefill"], "dash": "dot"},
                             hovertemplate="%{x:.2f} s: %{y:,.1f} prompt tok/s<extra></extra>"))
    return fig


def mixed_split(split: pd.DataFrame) -> go.Figure:
    """Blocks' time per serving step split into prefill and decode parts (see
    :mod:`probe.analysis.apportion`), with what the pure steps' lines predict."""
    title = "Block time per step: prefill vs decode part"
    if split.empty:
        return empty_figure(title, "no serving steps with block records")
    sp = split.head(MAX_STEPS)
    x = floats(sp["step"])
    fig = base_figure(title, "step", "ms in the recorded blocks")
    for name, col in (("prefill part", "prefill_ms"), ("decode part", "decode_ms")):
        color = PHASE_COLORS["prefill" if name.startswith("prefill") else "decode"]
        fig.add_trace(go.Bar(x=x, y=floats(sp[col]), name=name, marker_color=color,
                             customdata=sp["phase"].astype(str).to_numpy(),
                             hovertemplate="step %{x} (%{customdata})<br>" + name + " %{y:,.2f} ms<extra></extra>"))
    if sp["predicted_ms"].notna().any():
        fig.add_trace(go.Scatter(x=x, y=floats(sp["predicted_ms"]), name="predicted from pure steps", mode="markers",
                                 marker={"color": "#222", "symbol": "line-ew-open", "size": 12},
                                 hovertemplate="step %{x}: predicted %{y:,.2f} ms<extra></extra>"))
    fig.update_layout(barmode="stack", bargap=0.05)
    return fig


def serve_table(requests: pd.DataFrame) -> pd.DataFrame:
    """Per status: requests, and TTFT / ITL / end-to-end mean, p50, p90 (ms)."""
    stats = [(c, q, f"{c.replace('_ms_mean', '').replace('_ms', '')}_{q}_ms")
             for c, qs in (("ttft_ms", ("mean", "p50", "p90")), ("itl_ms_mean", ("mean", "p50", "p90")),
                           ("e2e_ms", ("mean", "p90")), ("queue_ms", ("mean",))) for q in qs]
    if requests.empty:
        return pd.DataFrame({"status": pd.Series([], dtype="string"), "requests": pd.Series([], dtype="int64"),
                             **{k: pd.Series([], dtype="float64") for _, _, k in stats}})
    rows = []
    for status, sub in requests.groupby(requests["status"].str.split(":").str[0], sort=True):
        row = {"status": status, "requests": len(sub)}
        for c, q, key in stats:
            v = sub[c].dropna()
            row[key] = (v.mean() if q == "mean" else v.quantile(0.5 if q == "p50" else 0.9)) if len(v) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).astype({"status": "string", "requests": "int64"})
