"""The ``op`` level: a deep run's sampled steps opened down to their ops, and their memory ledger.

A deep run (``probe.attach(model, deep=...)``, ``probe run --deep``) records every aten op of a
few sampled steps (the ``ops`` frame) and what each module call held (``ledger``). Its times are
the dispatch mode's, op by op; what the block spent beside its ops — Python, dispatch, the
module machinery — is the block's time on *timed* steps of the same shapes (same phase, query
and cache lengths: the timed generate calls of ``probe run`` share the deep run's inputs and
seed) less the sum of its ops: the row ``(dispatch and Python)``. Without timed steps of those
shapes it is unknown (NaN), never guessed: the deep pass's own clock runs the ops many times
slower, so what it leaves beside them is not the block's Python. A deep pass alone
(``probe.attach(model, deep=...)``: every generate call is deep) times no step; use
``probe.profile(model, inputs, deep=True)`` or ``probe run --deep``, which time the same inputs
first. :func:`dispatch_unknown` says so in words.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import schema
from ..columns import ranked
from ..schema import MEMORY_LEDGER, OP_SUMMARY

OUTSIDE = "(outside blocks)"
DISPATCH = "(dispatch and Python)"
#: a block's ``(dispatch and Python)`` within this of 0 is noise, not a time: it is the block's
#: time on the timed steps less the sum of its ops timed on other steps (the deep pass's), and
#: carries the noise of both; a microsecond, or this share of the block's timed time where more
DISPATCH_NOISE_MS = 0.001
DISPATCH_NOISE_SHARE = 0.05
#: the memory ledger's byte columns, and an op summary's figures (what folding layers averages);
#: the CUDA ones (absent when all null: a CPU run) apart, in :data:`LEDGER_CUDA` and :data:`OP_GPU`
LEDGER_CUDA = [c for c in MEMORY_LEDGER if c in MEMORY_LEDGER.absent_when_null]
LEDGER_BYTES = [c for c in MEMORY_LEDGER if c.endswith("_bytes") and c not in LEDGER_CUDA]
OP_FIGURES = ["calls", "host_ms", "flops", "block_ms"]
OP_GPU = "gpu_ms"
STEP = "(step)"
_SHAPE = ["phase", "q_len", "kv_len"]


def _step_keys(frame: pd.DataFrame) -> list[str]:
    """The columns naming a sampled step: two ranks' step 3 are two steps."""
    return [c for c in ("rank", "run_id", "step") if c in frame.columns]


def op_summary(ops: pd.DataFrame, calls: pd.DataFrame, *, top: int | None = None,
               by: str = "block") -> pd.DataFrame:
    """Per phase, block and op kind: calls, host time and FLOPs per sampled step, and per block
    the ``(dispatch and Python)`` row (see the module doc).

    Args:
        ops: a run's ``ops`` frame.
        calls: its ``calls`` frame (the timed calls; a deep run's own are not in it).
        top: keep each block's ``top`` op kinds by time (the dispatch row always stays).
        by: ``"block"``, or ``"module"``: each op with the innermost module that ran it (what an
            attention module's own code is made of, its projections apart); no dispatch row
            there, as the timed calls hold modules only at the depth they were recorded at.
    Returns:
        A frame of :data:`probe.schema.OP_SUMMARY`, by phase, block (in model order) and time.
    Raises:
        ValueError: an unknown ``by``.
    """
    if by not in ("block", "module"):
        raise ValueError(f"by must be 'block' or 'module'; got {by!r}")
    if ops.empty:
        return schema.empty(OP_SUMMARY)
    if by == "module":
        ops, calls = ops.assign(block=ops["module"].fillna(OUTSIDE)), calls.iloc[:0]
    else:
        ops = ops.assign(block=ops["block"].fillna(OUTSIDE))
    sampled = ops.drop_duplicates(_step_keys(ops))[[*_step_keys(ops), *_SHAPE]]
    n_steps = sampled.groupby("phase").size()
    g = ops.groupby(["phase", "block", "op"], sort=False)
    rows = g.agg(calls=("seq", "size"), host_ms=("host_ms", "sum"),
                 flops=("flops", lambda s: float(s.fillna(0).sum()))).reset_index()
    figures = ["calls", "host_ms", "flops"]
    if OP_GPU in ops.columns:  # CUDA: the ops' device time, where measured (NaN for a kind with none)
        rows[OP_GPU] = g[OP_GPU].sum(min_count=1).to_numpy(dtype="float64")
        figures.append(OP_GPU)
    per = n_steps.reindex(rows["phase"]).to_numpy(dtype="float64")
    for col in figures:
        rows[col] = rows[col].to_numpy(dtype="float64") / per
    block_ms = _timed_means(ops["block"], sampled, calls, {"cpu_ms": schema.floats(calls, "cpu_ms")})["cpu_ms"]
    ops_ms = rows.groupby(["phase", "block"], sort=False)["host_ms"].sum()
    disp = []
    for (phase, block), total in (ops_ms.items() if by == "block" else ()):
        timed = block_ms.get((phase, block), np.nan)
        disp.append({"phase": phase, "block": block, "op": DISPATCH, "calls": np.nan,
                     "host_ms": timed - total if not np.isnan(timed) else np.nan, "flops": 0.0})
    rows = pd.concat([rows, pd.DataFrame(disp)], ignore_index=True) if disp else rows
    rows["steps"] = n_steps.reindex(rows["phase"]).to_numpy(dtype="int64")
    keys = list(zip(rows["phase"], rows["block"]))
    rows["block_ms"] = [block_ms.get(k, np.nan) for k in keys]
    denom = [block_ms.get(k, np.nan) if not np.isnan(block_ms.get(k, np.nan)) else ops_ms.get(k, np.nan) for k in keys]
    with np.errstate(divide="ignore", invalid="ignore"):  # a block whose ops took no measurable time
        rows["share"] = rows["host_ms"].to_numpy(dtype="float64") / np.asarray(denom, dtype="float64")
    order = {b: i for i, b in enumerate(ops.drop_duplicates("block")["block"])}
    rows["_b"] = ranked(rows["block"], order)
    rows["_d"] = rows["op"].eq(DISPATCH)
    rows = rows.sort_values(["phase", "_b", "_d", "host_ms"], ascending=[False, True, True, False], kind="stable")
    if top is not None:
        rows = rows[rows["_d"] | (rows.groupby(["phase", "block"]).cumcount() < top)]
    return schema.conform(rows.drop(columns=["_b", "_d"]), OP_SUMMARY, extra=False)


def dispatch_noise_ms(block_ms: object) -> object:
    """How far a block's ``(dispatch and Python)`` may be from 0 and be noise, in ms, for the block's
    timed time ``block_ms`` (a number or an array; NaN: unknown, the microsecond alone)."""
    timed = np.nan_to_num(np.asarray(block_ms, dtype="float64"), nan=0.0)
    return np.maximum(DISPATCH_NOISE_MS, DISPATCH_NOISE_SHARE * np.abs(timed))


def dispatch_unknown(summary: pd.DataFrame) -> str | None:
    """Why an :func:`op_summary`'s ``(dispatch and Python)`` rows are NaN, in words; ``None`` where
    every block's is known (``(outside blocks)`` has no timed time of its own: its row is never known)."""
    disp = summary[(summary["op"] == DISPATCH) & (summary["block"] != OUTSIDE)]
    unknown = int(disp["host_ms"].isna().sum())
    if not unknown:
        return None
    which = "every block" if unknown == len(disp) else f"{unknown} of {len(disp)} blocks by phase"
    return (f"dispatch and Python is unknown for {which}: no timed step has the sampled step's phase, query and "
            "cache lengths (a deep pass alone, probe.attach(model, deep=...), times none). Record with "
            "`probe run --deep` or probe.profile(model, inputs, deep=True): they time the same inputs first")


def _timed_means(blocks: pd.Series, sampled: pd.DataFrame, calls: pd.DataFrame,
                 values: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per figure of ``values`` (one value per timed call, NaN: none), (phase, block) -> the block's
    mean on timed steps of each sampled step's shapes, averaged over the sampled steps that have
    such timed steps (where the figure has a value)."""
    out: dict[str, dict] = {k: {} for k in values}
    if calls.empty:
        return out
    blocks = set(blocks.dropna())
    keep = calls["module"].isin(blocks).to_numpy()
    if not keep.any():
        return out
    timed = calls.loc[keep, ["module", *_SHAPE]].assign(**{f"_{k}": v[keep] for k, v in values.items()})
    means = timed.groupby(["module", *_SHAPE], observed=True)[[f"_{k}" for k in values]].mean()
    for key in values:
        mean = means[f"_{key}"]
        for block in blocks:
            for phase, grp in sampled.groupby("phase"):
                vals = [mean.get((block, phase, int(q), int(kv))) for q, kv in zip(grp["q_len"], grp["kv_len"])]
                vals = [v for v in vals if v is not None and not np.isnan(v)]
                if vals:
                    out[key][(phase, block)] = float(np.mean(vals))
    return out


def memory_ledger(ledger: pd.DataFrame, ops: pd.DataFrame, tied: dict | None = None,
                  calls: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per phase and block (and the whole step, ``(step)``): weights, KV cache, activations,
    temporaries and the peak of live tensor bytes above the block's start, per sampled step.
    See :mod:`probe.recording.deep_frames` for what each category holds.

    ``tied``: the deep run's ``meta["deep"]["tied_weights"]`` (:func:`probe.recording.deep_ops.tied_weights`); a block's
    ``shared_weights_bytes`` is the part of its weights tied to another module's (0 without it).
    Such weights show in full in each block that holds them and once in ``(step)``, the total to
    read (the blocks' weights added up would count a tied tensor twice).

    ``calls``: the run's timed calls. On CUDA, where they carry the allocator's counters
    (``mem_before_bytes``, ``mem_after_bytes``, ``mem_peak_bytes``), each block also gets them
    beside the ledger's own figures: ``allocator_added_bytes`` (after less before) and
    ``allocator_peak_added_bytes`` (peak less before), the mean over the block's timed calls of
    each sampled step's phase, query and cache lengths, as ``(dispatch and Python)`` is joined in
    :func:`op_summary`: the deep pass's own calls are not in the frames (its steps are untimed),
    so the join is by shapes, never call by call. Absent where no timed call has them (a CPU run,
    a deep pass alone); the ``(step)`` row has none (no call spans the whole forward)."""
    if ledger.empty:
        return schema.empty(MEMORY_LEDGER)
    blocks = list(dict.fromkeys(ops["block"].dropna()))
    keep = ledger[ledger["module"].isin(blocks) | ledger["module"].isna()]
    keep = keep.assign(block=keep["module"].fillna(STEP))
    cols = [c for c in LEDGER_BYTES if c in keep.columns]
    per_step = keep.groupby(["phase", "block", *_step_keys(keep)], sort=False)[cols].sum().reset_index()
    out = per_step.groupby(["phase", "block"], sort=False).agg(
        steps=("step", "size"), **{c: (c, "mean") for c in cols}).reset_index()
    out["shared_weights_bytes"] = [float((tied or {}).get(b, {}).get("bytes", 0)) for b in out["block"]]
    if calls is not None and "mem_before_bytes" in calls.columns:
        before = schema.floats(calls, "mem_before_bytes")
        sampled = keep.drop_duplicates(_step_keys(keep))[[*_step_keys(keep), *_SHAPE]]
        got = _timed_means(pd.Series(blocks, dtype=object), sampled, calls, {
            "allocator_added_bytes": schema.floats(calls, "mem_after_bytes") - before,
            "allocator_peak_added_bytes": schema.floats(calls, "mem_peak_bytes") - before})
        for col, by in got.items():
            out[col] = [by.get(k, np.nan) for k in zip(out["phase"], out["block"])]
    order = {b: i for i, b in enumerate([STEP, *blocks])}
    out = out.sort_values(["phase", "block"], key=lambda s: ranked(s, order) if s.name == "block" else s,
                          ascending=[False, True], kind="stable")
    return schema.conform(out, MEMORY_LEDGER, extra=False)
