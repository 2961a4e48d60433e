"""Spread over repeated generate calls (and, re-exported, whether two runs differ beyond noise).

Pure functions over the frames (pandas and numpy only), so they are tested with numbers made
up for the purpose.

- :func:`block_spread` / :func:`headline_spread`: median and **min–max** over the recorded
  generate calls of a run (``probe run --repeat N``), per block × phase and per headline metric.
  With a handful of repeats min–max is what was seen; a percentile range would interpolate.
- :func:`significance`, :func:`gate`, :func:`verdict`, :func:`comparability` and their helpers
  (two runs side by side) live in :mod:`probe.analysis.comparison`; this module re-exports them,
  so ``probe.stats.significance`` keeps working.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .comparison import (  # noqa: F401  (re-exported: the comparison's public names)
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    GATE_MIN_SHARE,
    HIGHER_IS_BETTER,
    LARGE_SAMPLE,
    NOT_SHOWN,
    bootstrap_slowdown,
    comparability,
    differences,
    fact,
    gate,
    gate_family,
    gate_verdict,
    holm,
    mann_whitney_p,
    significance,
    verdict,
)
from .samples import OUTSIDE, generate_ids, metric_samples, per_step, recorded, step_samples  # noqa: F401
from .. import schema
from ..columns import ranked
from ..schema import HEADLINE_SPREAD, PHASES, SPREAD, Level

SPREAD_METRICS = ("ttft_ms", "tpot_ms_p50", "tpot_ms_mean", "prefill_tok_s", "decode_tok_s", "total_ms")

__all__ = [
    "ALPHA", "BOOTSTRAP_RESAMPLES", "CONFIDENCE", "GATE_MIN_SHARE", "HIGHER_IS_BETTER", "LARGE_SAMPLE", "NOT_SHOWN",
    "OUTSIDE", "SPREAD_METRICS", "block_spread", "bootstrap_slowdown", "comparability", "differences", "fact", "gate",
    "gate_family", "gate_verdict", "headline_spread", "holm", "mann_whitney_p", "per_generate_totals", "significance",
    "verdict",
]


def per_generate_totals(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame,
                        level: Level = "block") -> pd.DataFrame:
    """Each row's self time per phase in each successful generate call (the rows of
    :func:`per_step` summed over the steps). Columns ``level, name, phase, run_id, total_ms``."""
    per = per_step(calls, steps, runs, level)
    out = per.groupby(["name", "phase", "run_id"], sort=False, observed=True)["ms"].sum().rename("total_ms").reset_index()
    cols = {"level": "string", "name": "string", "phase": "string", "run_id": "string", "total_ms": "float64"}
    return out.assign(level=level)[list(cols)].astype(cols)


def _spread_stats(g) -> pd.DataFrame:
    med = g.median()
    lo, hi = g.min(), g.max()
    return pd.DataFrame({"generates": g.size(), "median_ms": med, "min_ms": lo, "max_ms": hi,
                         "spread_pct": ((hi - lo) / med * 100).where(med > 0)})


def block_spread(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level = "block") -> pd.DataFrame:
    """Median and min–max over the generate calls of each row's self time per phase.

    Args:
        calls, steps, runs: the run's frames.
        level: ``"block"`` (embed, layer, norm, head, model), ``"role"`` or ``"module"``, the
            levels of :meth:`probe.Run.summary`.

    Returns:
        Columns of :data:`SPREAD`, one row per name and phase (with ``(residue)``,
        ``(probe)`` and ``(outside model)`` rows), in phase order. One generate call gives
        min = max = median. Joins ``Run.summary(level)`` on ``(level, name, phase)``.
    """
    tot = per_generate_totals(calls, steps, runs, level=level)
    if tot.empty:
        return schema.empty(SPREAD)
    tot["_seq"] = np.arange(len(tot))
    first = tot.groupby(["level", "name", "phase"], sort=False, observed=True)[["_seq"]].first()
    g = tot.groupby(["level", "name", "phase"], sort=False, observed=True)["total_ms"]
    out = _spread_stats(g).join(first).reset_index()
    order = {p: i for i, p in enumerate(PHASES)}
    out["_p"] = ranked(out["phase"], order, len(order))
    out = out.sort_values(["_p", "_seq"], kind="stable")
    return out[list(SPREAD)].astype(SPREAD).reset_index(drop=True)


def headline_spread(runs: pd.DataFrame, metrics=SPREAD_METRICS) -> pd.DataFrame:
    """Median and min–max of each headline metric over the successful generate calls."""
    ids = generate_ids(runs)
    if not ids:
        return schema.empty(HEADLINE_SPREAD)
    gen = runs[runs["run_id"].isin(ids)]
    rows = []
    for m in metrics:
        v = pd.to_numeric(gen[m], errors="coerce").astype("float64").dropna()
        if v.empty:
            continue
        med = float(v.median())
        rows.append({"metric": m, "generates": len(v), "median": med, "min": float(v.min()), "max": float(v.max()),
                     "spread_pct": (float(v.max() - v.min()) / med * 100) if med > 0 else math.nan})
    if not rows:
        return schema.empty(HEADLINE_SPREAD)
    return pd.DataFrame(rows).astype(HEADLINE_SPREAD)
