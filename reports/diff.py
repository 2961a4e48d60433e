"""Run-vs-run differences of two block summaries (pure pandas, shared by figures and compare)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from probe import schema
from probe.schema import DIFF, LEVELS, PHASES
from probe.columns import ranked

def block_diff(summary_a: pd.DataFrame, summary_b: pd.DataFrame) -> pd.DataFrame:
    """Match two ``Run.summary()`` frames by ``(level, name, phase)`` and put their numbers side by side.

    Rows present in only one summary are kept, with the other side null. The compared time is
    self time, so the rows of one level add up to the forward time without double counting.

    Args:
        summary_a, summary_b: summaries of the two runs (any levels; rows match within a level).

    Returns:
        Columns of :data:`DIFF`, ordered by level, phase, then as the rows appear in A (then B).
    """
    if summary_a.empty and summary_b.empty:
        return schema.empty(DIFF)
    keep = ["level", "name", "role", "phase", "calls", "self_ms", "total_ms", "mean_ms", "share"]
    on = ["level", "name", "phase"]
    a = summary_a[keep].astype({c: "string" for c in on}).reset_index(drop=True)
    b = summary_b[keep].astype({c: "string" for c in on}).reset_index(drop=True)
    a["_seq"] = np.arange(len(a), dtype="float64")
    b["_seq"] = np.arange(len(b), dtype="float64") + len(a) + 0.5
    m = a.merge(b, on=on, how="outer", suffixes=("_a", "_b"), sort=False)
    out = pd.DataFrame({
        "level": m["level"],
        "name": m["name"],
        "role": m["role_a"].fillna(m["role_b"]),
        "phase": m["phase"],
        "a_calls": m["calls_a"],
        "b_calls": m["calls_b"],
        "a_ms": m["self_ms_a"],
        "b_ms": m["self_ms_b"],
        "a_mean_ms": m["mean_ms_a"],
        "b_mean_ms": m["mean_ms_b"],
        "a_total_ms": m["total_ms_a"],
        "b_total_ms": m["total_ms_b"],
        "a_share": m["share_a"],
        "b_share": m["share_b"],
    })
    out["diff_ms"] = out["b_ms"] - out["a_ms"]
    a_ms = out["a_ms"].astype("float64")
    out["ratio"] = (out["b_ms"].astype("float64") / a_ms).where(a_ms > 0)
    phase_rank = {p: i for i, p in enumerate(PHASES)}
    out["_l"] = ranked(out["level"], {v: i for i, v in enumerate(LEVELS)}, len(LEVELS))
    out["_p"] = ranked(out["phase"], phase_rank, len(phase_rank))
    out["_s"] = m["_seq_a"].fillna(m["_seq_b"]).to_numpy()
    out["_r"] = out["name"].isin(["(residue)", "(probe)"]).astype("int64")  # a level's remainder rows last
    out = out.sort_values(["_l", "_p", "_r", "_s"], kind="stable").drop(columns=["_l", "_p", "_r", "_s"])
    out = out[list(DIFF)].astype(DIFF)
    return out.reset_index(drop=True)


