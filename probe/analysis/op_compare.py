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
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import schema
from ..columns import ranked
from ..derived_schema import OP_DIFF
from .ops import DISPATCH

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
    pick = lambda s, tag: s[[*_KEYS, "calls", "host_ms"]].rename(  # noqa: E731
        columns={"calls": f"{tag}_calls", "host_ms": f"{tag}_ms"})
    out = pick(a, "a").merge(pick(b, "b"), on=_KEYS, how="outer", sort=False, indicator=True)
    out["diff_ms"] = out["b_ms"] - out["a_ms"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio"] = (out["b_ms"] / out["a_ms"]).where(out["a_ms"] > 0)
    real = ~out["op"].eq(DISPATCH)
    # a block's key as text (a null block is one too: its ops get their block's floor, not 0)
    key = pd.Series(list(zip(out["phase"].astype(str), out["block"].astype(object).fillna("").astype(str))),
                    index=out.index)
    block_a = out["a_ms"][real].groupby(key[real], sort=False).sum()
    floor = key.map(block_a).fillna(0.0) * MIN_BLOCK_SHARE
    moved = (out["ratio"] - 1).abs().ge(MIN_RATIO_CHANGE) & out["diff_ms"].abs().ge(floor) & out["diff_ms"].ne(0)
    calls = real & out["a_calls"].notna() & out["b_calls"].notna() & (out["a_calls"] - out["b_calls"]).abs().gt(1e-9)
    change = np.select(
        [out["_merge"].eq("left_only") & real, out["_merge"].eq("right_only") & real, calls,
         moved & out["diff_ms"].gt(0), moved & out["diff_ms"].lt(0)],
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


def changed(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of an :func:`op_comparison` that say something changed."""
    return frame[frame["change"].fillna("").ne("")]
