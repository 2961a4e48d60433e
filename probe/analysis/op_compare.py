"""Two deep runs side by side, op kind by op kind in each block: what ``probe compare`` shows when
both runs have a deep pass (eager against sdpa attention, float32 against bfloat16, two versions).

Rows are matched by ``(phase, block, op)`` on two op summaries (:func:`probe.analysis.ops.op_summary`,
folded or not, as the caller chooses), per sampled step. What changed is flagged in ``change``:

- ``only in A`` / ``only in B``: the op kind ran in one run's block and not in the other's;
- ``calls``: it ran a different number of times per sampled step;
- ``slower`` / ``faster``: its time moved by at least :data:`MIN_RATIO_CHANGE` (25 %) *and* by
  at least :data:`MIN_BLOCK_SHARE` (5 %) of the block's op time in A, so a few microseconds on a
  view never read as a change. Op times come from the dispatch mode, one generate call each,
  and carry its noise: a time flag says where to look, ``probe compare``'s significance of the
  timed blocks says whether the block as a whole changed.

A block's ``(dispatch and Python)`` row is its timed time less its ops, two measurements of other
steps: within :func:`probe.analysis.ops.dispatch_noise_ms` of 0 it is judged as 0 (a row at
-0.002 ms against one at 0.001 ms is no change), and a side below 0 by more than that (the ops
ran slower than the block: a busy machine) is no time to judge: the row keeps its numbers and
is never flagged slower or faster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import schema
from ..columns import ranked
from ..derived_schema import OP_DIFF
from .ops import DISPATCH, dispatch_noise_ms

#: a time flag needs B / A beyond 1 ± this
MIN_RATIO_CHANGE = 0.25
#: ... and a move of at least this share of the block's op time in A
MIN_BLOCK_SHARE = 0.05
_KEYS = ["phase", "block", "op"]


def op_comparison(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """A's and B's op summaries matched per phase, block and op kind, with what changed.

    Args:
        a, b: op summaries (columns ``phase, block, op, calls, host_ms``) of the two runs.
    Returns:
        Columns of :data:`probe.derived_schema.OP_DIFF`, by phase (prefill first), block in A's
        order (B's own after) and B's time.
    Raises:
        ValueError: a summary lacks one of the columns read.
    """
    for name, s in (("A", a), ("B", b)):
        lost = [c for c in (*_KEYS, "calls", "host_ms") if c not in s.columns]
        if lost:
            raise ValueError(f"the op summary of {name} lacks {', '.join(lost)}: pass Run.op_summary() of a deep run")
    if a.empty and b.empty:
        return schema.empty(OP_DIFF)

    def pick(s: pd.DataFrame, tag: str) -> pd.DataFrame:
        block_ms = s["block_ms"] if "block_ms" in s.columns else np.nan  # the dispatch row's noise
        return s[[*_KEYS, "calls", "host_ms"]].assign(block_ms=block_ms).rename(
            columns={"calls": f"{tag}_calls", "host_ms": f"{tag}_ms", "block_ms": f"_{tag}_block"})

    out = pick(a, "a").merge(pick(b, "b"), on=_KEYS, how="outer", sort=False, indicator=True)
    out["diff_ms"] = out["b_ms"] - out["a_ms"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio"] = (out["b_ms"] / out["a_ms"]).where(out["a_ms"] > 0)
    real = ~out["op"].eq(DISPATCH)
    # what the time flags judge: the dispatch rows within their noise of 0 as 0 (see the module doc)
    a_ms, b_ms, judged = _judged(out, real)
    diff = b_ms - a_ms
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a_ms > 0, b_ms / a_ms, np.where(~real.to_numpy() & (b_ms > 0), np.inf, np.nan))
    # a block's key as text (a null block is one too: its ops get their block's floor, not 0)
    key = pd.Series(list(zip(out["phase"].astype(str), out["block"].astype(object).fillna("").astype(str))),
                    index=out.index)
    block_a = out["a_ms"][real].groupby(key[real], sort=False).sum()
    floor = key.map(block_a).fillna(0.0) * MIN_BLOCK_SHARE
    moved = (judged & (np.abs(ratio - 1) >= MIN_RATIO_CHANGE) & (np.abs(diff) >= floor.to_numpy())
             & (diff != 0))
    moved = pd.Series(moved, index=out.index)
    diff = pd.Series(diff, index=out.index)
    calls = real & out["a_calls"].notna() & out["b_calls"].notna() & (out["a_calls"] - out["b_calls"]).abs().gt(1e-9)
    change = np.select(
        [out["_merge"].eq("left_only") & real, out["_merge"].eq("right_only") & real, calls,
         moved & diff.gt(0), moved & diff.lt(0)],
        ["only in A", "only in B", "calls", "slower", "faster"], default="")
    out["change"] = change
    order_b = {k: i for i, k in enumerate(dict.fromkeys([*zip(a["phase"], a["block"]), *zip(b["phase"], b["block"])]))}
    out["_p"] = ranked(out["phase"], {"prefill": 0, "decode": 1}, 2)
    out["_b"] = [order_b.get(k, len(order_b)) for k in zip(out["phase"], out["block"])]
    out["_d"] = out["op"].eq(DISPATCH)
    out["_t"] = -out[["a_ms", "b_ms"]].max(axis=1).fillna(0)
    out = out.sort_values(["_p", "_b", "_d", "_t"], kind="stable")
    out = out.drop(columns=["_merge", "_p", "_b", "_d", "_t"])
    return schema.conform(out, OP_DIFF, extra=False).reset_index(drop=True)


def _judged(out: pd.DataFrame, real: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A's and B's ms as the time flags judge them, and which rows they may judge: an op's as it
    is; a dispatch row's within its noise of 0 (its block's timed time: ``dispatch_noise_ms``) as
    0, and none where a side is below 0 by more than that."""
    a = out["a_ms"].to_numpy(dtype="float64", copy=True)
    b = out["b_ms"].to_numpy(dtype="float64", copy=True)
    disp = ~real.to_numpy()
    ok = np.ones(len(out), dtype=bool)
    for ms, block in ((a, out["_a_block"]), (b, out["_b_block"])):
        noise = dispatch_noise_ms(block.to_numpy(dtype="float64"))
        quiet = disp & (np.abs(ms) <= noise)
        ms[quiet] = 0.0
        ok &= ~(disp & (ms < 0))
    return a, b, ok


def changed(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of an :func:`op_comparison` that say something changed."""
    return frame[frame["change"].fillna("").ne("")]
