"""Run-vs-run differences of two block summaries (pure pandas, shared by figures and compare)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from probe.schema import PHASES

DIFF_COLUMNS: dict[str, str] = {
    "module": "string",  # module name, or the role when the summaries are by role
    "role": "string",
    "phase": "string",
    "a_calls": "Int64",
    "b_calls": "Int64",
    "a_ms": "float64",  # total host ms of A (the summary's total_ms)
    "b_ms": "float64",
    "diff_ms": "float64",  # b_ms - a_ms
    "ratio": "float64",  # b_ms / a_ms (NaN where A is 0 or missing)
    "a_mean_ms": "float64",
    "b_mean_ms": "float64",
    "a_share": "float64",  # share of the phase's forward time
    "b_share": "float64",
}


def block_diff(summary_a: pd.DataFrame, summary_b: pd.DataFrame) -> pd.DataFrame:
    """Match two ``Run.summary()`` frames by ``(module, phase)`` and put their numbers side by side.

    Rows present in only one summary are kept, with the other side null. Summaries by role
    (``Run.summary(by="role")``) match by role, since their ``module`` column holds the role.

    Args:
        summary_a, summary_b: summaries of the two runs (both by module, or both by role).

    Returns:
        Columns of :data:`DIFF_COLUMNS`, ordered by phase, then as the rows appear in A (then B).
    """
    if summary_a.empty and summary_b.empty:
        return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in DIFF_COLUMNS.items()})
    keep = ["module", "role", "phase", "calls", "total_ms", "mean_ms", "share"]
    a = summary_a[keep].astype({"module": "string", "phase": "string"}).reset_index(drop=True)
    b = summary_b[keep].astype({"module": "string", "phase": "string"}).reset_index(drop=True)
    a["_seq"] = np.arange(len(a), dtype="float64")
    b["_seq"] = np.arange(len(b), dtype="float64") + len(a) + 0.5
    m = a.merge(b, on=["module", "phase"], how="outer", suffixes=("_a", "_b"), sort=False)
    out = pd.DataFrame({
        "module": m["module"],
        "role": m["role_a"].fillna(m["role_b"]),
        "phase": m["phase"],
        "a_calls": m["calls_a"],
        "b_calls": m["calls_b"],
        "a_ms": m["total_ms_a"],
        "b_ms": m["total_ms_b"],
        "a_mean_ms": m["mean_ms_a"],
        "b_mean_ms": m["mean_ms_b"],
        "a_share": m["share_a"],
        "b_share": m["share_b"],
    })
    out["diff_ms"] = out["b_ms"] - out["a_ms"]
    a_ms = out["a_ms"].astype("float64")
    out["ratio"] = (out["b_ms"].astype("float64") / a_ms).where(a_ms > 0)
    phase_rank = {p: i for i, p in enumerate(PHASES)}
    out["_p"] = out["phase"].map(phase_rank).fillna(len(phase_rank)).astype("float64")
    out["_s"] = m["_seq_a"].fillna(m["_seq_b"]).to_numpy()
    out = out.sort_values(["_p", "_s"], kind="stable").drop(columns=["_p", "_s"])
    out = out[list(DIFF_COLUMNS)].astype(DIFF_COLUMNS)
    return out.reset_index(drop=True)
