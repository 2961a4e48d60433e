"""The first answer: prefill vs decode, side by side, adding up to the whole generate call.

:func:`phase_headline` gives one row per phase of the generate calls (prefill, decode, and any
other phase they had), one row ``setup and outside`` (generate's own time before the first
forward and after the last step's token: input preparation, cache set-up, the end-of-generate
work), and one row ``generate`` (the total). Shares are of the generate calls' wall time, so
the parts add up to 100 %. :func:`phase_totals` is the per-phase total of any steps frame.
"""

from __future__ import annotations

import math

import pandas as pd

#: the headline's rows besides the phases
SETUP = "setup and outside"
TOTAL = "generate"

HEADLINE: dict[str, str] = {
    "part": "string",  # a phase, SETUP or TOTAL
    "generates": "int64",  # generate calls summed over
    "steps": "Int64",  # forwards (null for SETUP)
    "time_ms": "float64",  # Σ step latency (forward + the sampling after it); SETUP: the rest of generate
    "share": "float64",  # of the generate calls' wall time (total_ms); the parts add up to 1
    "tokens": "Int64",  # prefill: prompt positions x rows; decode: new tokens x rows
    "ms_per_token": "float64",  # time_ms / tokens (prefill: per prompt token)
    "tok_s": "float64",  # tokens / time
    "kv_cache_bytes": "Int64",  # KV cache after the phase's last step (the last generate call)
    "mem_peak_bytes": "Int64",  # CUDA peak during the phase's steps; null where not measured (CPU)
}

PHASE_TOTALS: dict[str, str] = {
    "phase": "string", "steps": "int64", "tokens": "int64", "forward_ms": "float64",
    "outside_ms": "float64", "latency_ms": "float64", "mean_latency_ms": "float64", "tok_s": "float64",
}


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in columns.items()})


def _tokens(st: pd.DataFrame) -> pd.Series:
    """Positions each step processed (prefill-like phases) or tokens it produced (decode), x rows."""
    per_seq = st["q_len"].where(st["phase"] != "decode", st["new_tokens"])
    tokens = per_seq * st["batch"]
    if "requests" in st:  # a packed continuous-batching forward: q_len is all its tokens already
        tokens = tokens.where(st["requests"].isna(), st["q_len"])
    return tokens


def phase_totals(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per phase: steps, tokens, forward/outside/latency totals and means, tok/s."""
    if steps.empty:
        return _empty(PHASE_TOTALS)
    st = steps.assign(_tokens=_tokens(steps))
    g = st.groupby("phase", sort=False)
    out = pd.DataFrame(
        {
            "steps": g.size(),
            "tokens": g["_tokens"].sum(),
            "forward_ms": g["forward_ms"].sum(),
            "outside_ms": g["outside_ms"].sum(min_count=1),
            "latency_ms": g["latency_ms"].sum(min_count=1),
            "mean_latency_ms": g["latency_ms"].mean(),
        }
    ).reset_index()
    t = out["latency_ms"].where(out["latency_ms"].notna(), out["forward_ms"])
    out["tok_s"] = out["tokens"] / (t / 1e3)
    out["phase"] = out["phase"].astype("string")
    return out


def phase_headline(runs: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Prefill vs decode of the generate calls in ``runs`` (see the module's docstring).

    Args:
        runs, steps: a run's frames (:attr:`probe.Run.runs`, :attr:`probe.Run.steps`).
    Returns:
        One row per part (columns :data:`HEADLINE`); empty (typed) without a generate call.
    """
    gen = runs[runs["kind"] == "generate"]
    if gen.empty:
        return _empty(HEADLINE)
    ids = list(gen["run_id"])
    st = steps[steps["run_id"].isin(ids)]
    total = float(gen["total_ms"].sum(min_count=1))
    last = st[st["run_id"] == ids[-1]]
    rows = []
    stepped = 0.0
    for tot in phase_totals(st).itertuples(index=False):
        sub = st[st["phase"] == tot.phase]
        t = tot.latency_ms if not _missing(tot.latency_ms) else tot.forward_ms
        stepped += t
        kv = last.loc[last["phase"] == tot.phase, "kv_cache_bytes"].dropna()
        peak = sub["mem_peak_bytes"].dropna()
        rows.append({
            "part": str(tot.phase), "steps": int(tot.steps), "time_ms": t, "tokens": int(tot.tokens),
            "kv_cache_bytes": int(kv.iloc[-1]) if len(kv) else None,
            "mem_peak_bytes": int(peak.max()) if len(peak) else None,
        })
    order = {"prefill": 0, "decode": 1}
    rows.sort(key=lambda r: order.get(r["part"], 2))
    rows.append({"part": SETUP, "steps": None, "time_ms": max(total - stepped, 0.0) if not math.isnan(total) else math.nan,
                 "tokens": None, "kv_cache_bytes": None, "mem_peak_bytes": None})
    peaks = gen["peak_mem_bytes"].dropna()
    rows.append({"part": TOTAL, "steps": int(len(st)), "time_ms": total, "tokens": None,
                 "kv_cache_bytes": int(gen["kv_cache_bytes"].dropna().iloc[-1]) if gen["kv_cache_bytes"].notna().any() else None,
                 "mem_peak_bytes": int(peaks.max()) if len(peaks) else None})
    out = pd.DataFrame(rows)
    out["generates"] = len(gen)
    out["share"] = out["time_ms"] / total if total and not math.isnan(total) else math.nan
    tokens = out["tokens"].astype("Float64")
    out["ms_per_token"] = (out["time_ms"] / tokens).astype("float64")
    out["tok_s"] = (tokens / (out["time_ms"] / 1e3)).astype("float64")
    return pd.DataFrame({c: out[c].astype(d) for c, d in HEADLINE.items()})


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA
