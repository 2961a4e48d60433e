"""The call tree of each step: which recorded call encloses which, and each call's self time.

Derived from the ``calls`` frame when frames are built (and when an older run is loaded),
never in the hot path. The nesting has one source: each call's ``descendants``, the number of
calls its wrapper saw recorded while it ran. The frame holds each step's calls in pre-order
(by start, the enclosing call first), so call ``k``'s subtree is rows ``k .. k + descendants``
and its ``parent`` is the nearest earlier call whose subtree reaches it (:func:`nest_by_counts`).
Timestamps are for time only; runs saved before the counts were kept (schema v1) nest by their
time windows instead (:func:`nest`: the nearest earlier call still open when a call starts).

- ``call``: the call's index in that order within its step; ``parent``: the ``call`` of the
  enclosing recorded call, null at the top of the step.
- ``self_ms = cpu_ms - Σ cpu_ms`` of the calls directly inside it (``gpu_self_ms`` likewise
  on the CUDA clock). A step's self times add up to the time inside its top-level calls.
- ``steps.residue_ms``: the forward time inside no recorded call and not the probe's own cost
  (``steps.probe_ms``, 0 where absent): ``forward_ms - Σ self_ms - probe_ms``. It is tensor work
  and Python glue of modules that were not recorded at that depth (at ``blocks``: the causal
  mask, rotary embeddings, the loop over layers; at ``all``: only the base model's own glue is
  left in ``self_ms`` of ``model``, and the residue is what the root forward does outside it).
  So, exactly: ``Σ self_ms + residue_ms + probe_ms = forward_ms`` per step with call records.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..columns import floats, ints, text_codes
from . import memo

TREE_COLUMNS = ("call", "parent", "self_ms", "gpu_self_ms")
#: the tree columns every call has (``gpu_self_ms`` is absent on a run without CUDA times)
_HOST_TREE = ("call", "parent", "self_ms")
_KEYS = ["rank", "run_id", "step"]


def step_keys(*frames: pd.DataFrame) -> list[np.ndarray]:
    """One int64 per row naming its step (``rank, run_id, step``), comparable across ``frames``."""
    number: dict = {}  # run id (None: a null) -> its number, shared by the frames
    codes = []
    for f in frames:
        c, uniq = text_codes(f["run_id"], na_sentinel=False)
        lut = np.array([number.setdefault(None if v is pd.NA else str(v), len(number)) for v in uniq] or [0],
                       dtype=np.int64)
        codes.append(lut[c])
    n_runs = max(len(number), 1)
    steps = [f["step"].to_numpy(dtype="int64", na_value=-1) for f in frames]
    span = max((int(st.max()) for st in steps if len(st)), default=0) + 2
    out = []
    for f, st, code in zip(frames, steps, codes):
        rank = f["rank"].to_numpy(dtype="int64", na_value=0) if "rank" in f else np.zeros(len(f), np.int64)
        out.append((rank * n_runs + code) * span + st + 1)
    return out


def _group_ids(calls: pd.DataFrame) -> np.ndarray:
    """One integer per step (``rank, run_id, step``) of each call.

    Where the same step appears in separate stretches of rows (the same run loaded twice and
    concatenated), each stretch is a step of its own.
    """
    n = len(calls)
    if n < 2:
        return np.zeros(n, np.int64)
    # numbered by stretches of equal (rank, run_id, step): where each step's rows are together (as
    # recorded) these are its steps in order of first appearance, and a step seen in two stretches is two
    return np.cumsum(np.r_[True, _changes(calls)]) - 1


def step_starts(calls: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The first row of each stretch of calls of one step (``rank, run_id, step``), and whether
    each call starts a stretch (``np.cumsum(starts_here) - 1`` numbers each call's stretch):
    what holds for a step's key holds for every row of its stretch."""
    n = len(calls)
    if n < 2:
        return np.zeros(min(n, 1), np.int64), np.ones(n, bool)
    change = np.r_[True, _changes(calls)]
    return np.flatnonzero(change), change


def _changes(calls: pd.DataFrame) -> np.ndarray:
    """Whether each call after the first is of another step than the call before it."""
    run = calls["run_id"]
    run = run.cat.codes.to_numpy() if isinstance(run.dtype, pd.CategoricalDtype) else text_codes(run)[0]
    step = ints(calls["step"])
    change = (step[1:] != step[:-1]) | (run[1:] != run[:-1])
    if "rank" in calls:
        rank = ints(calls["rank"], 0)
        change |= rank[1:] != rank[:-1]
    return change


def nest(gid: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-order position, tree level and parent position of intervals nested within groups.

    Args:
        gid: group of each interval (intervals of different groups never nest).
        start_ns, end_ns: integer interval bounds (ns).

    Returns:
        ``order`` (row indices in pre-order: by group, start, longest first), ``level`` (0 at
        the top) and ``parent`` (position in ``order`` of the enclosing interval, -1 at the
        top), the last two indexed by position in ``order``.
    """
    n = len(gid)
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    end_ns = np.maximum(end_ns, start_ns + 1)  # a zero-length call still encloses nothing after it
    dur = end_ns - start_ns
    dg, ds = np.diff(gid), np.diff(start_ns)
    in_order = bool(np.all((dg > 0) | ((dg == 0) & ((ds > 0) | ((ds == 0) & (np.diff(dur) <= 0))))))
    # frames come sorted by step and start: sort only when they are not
    order = np.arange(n) if in_order else np.lexsort((-dur, start_ns, gid))
    g, s, e = gid[order], start_ns[order], end_ns[order]
    # lay the groups out one after the other on one time line, so they cannot nest
    first = np.r_[True, g[1:] != g[:-1]]
    g_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    span = int((e - s).max()) + 1 if n else 1
    base = s[g_start]
    offset = (np.cumsum(first) - 1) * (int((e - base).max()) + span)
    s2, e2 = s - base + offset, e - base + offset
    # level: calls before me (they started no later) that are still open when I start
    ended = np.searchsorted(np.sort(e2), s2, side="right")
    level = np.arange(n) - ended
    level = np.maximum(level, 0)
    # parent: the last call before me one level up (pre-order)
    parent = np.full(n, -1, dtype=np.int64)
    pos = np.arange(n)
    for lv in range(1, int(level.max()) + 1 if n else 1):
        last = np.maximum.accumulate(np.where(level == lv - 1, pos, -1))
        at = level == lv
        parent[at] = last[at]
    return order, level, parent


def nest_by_counts(gid: np.ndarray, descendants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tree level and parent position of calls in pre-order, from their descendant counts.

    Args:
        gid: group (step) of each row; rows of one group are contiguous.
        descendants: calls recorded inside each call (its subtree is the rows after it).

    Returns:
        ``level`` (0 at the top) and ``parent`` (row of the enclosing call, -1 at the top).
    Raises:
        ValueError: the counts do not describe a tree in this row order (a subtree running
            past its step's rows or across a sibling's): a damaged frame.

    Linear in the rows and vectorised per tree level; terminates on any input.
    """
    n = len(gid)
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e
    d = np.asarray(descendants, dtype=np.int64)
    pos = np.arange(n, dtype=np.int64)
    end = pos + d  # last row of each subtree
    if (d < 0).any() or (end >= n).any() or (gid[np.minimum(end, n - 1)] != gid).any():
        raise ValueError("calls.descendants does not fit the rows: a subtree runs past its step")
    # level of row j: how many subtrees (k, end_k] cover it
    cover = np.zeros(n + 1, np.int64)
    np.add.at(cover, pos[d > 0] + 1, 1)
    np.add.at(cover, end[d > 0] + 1, -1)
    level = np.cumsum(cover[:n])
    # parent: the last row before me one level up
    parent = np.full(n, -1, dtype=np.int64)
    for lv in range(1, int(level.max()) + 1):
        last = np.maximum.accumulate(np.where(level == lv - 1, pos, -1))
        at = level == lv
        parent[at] = last[at]
    # laminar: every subtree lies inside its parent's, in the same step
    has = parent >= 0
    if (level[has] != level[parent[has]] + 1).any() or (end[has] > end[parent[has]]).any() \
            or (gid[has] != gid[parent[has]]).any():
        raise ValueError("calls.descendants does not describe a tree: subtrees overlap")
    return level, parent


def annotate(calls: pd.DataFrame, steps: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``calls`` with ``call, parent, self_ms, gpu_self_ms``; ``steps`` with the residues.

    The frames keep their row order. Uses ``end_ms`` for a call's end where the frame has it
    (an end on the raw clock when ``cpu_ms`` has the probe's own cost taken out), else
    ``start_ms + cpu_ms``.
    """
    calls = calls.copy(deep=False)  # new columns only: the caller's frame is left as it was
    n = len(calls)
    if n:
        cpu = calls["cpu_ms"].to_numpy(dtype="float64", na_value=0.0)
        start = calls["start_ms"].to_numpy(dtype="float64", na_value=0.0)
        end = calls["end_ms"].to_numpy(dtype="float64", na_value=np.nan) if "end_ms" in calls else start + cpu
        end = np.where(np.isnan(end), start + cpu, end)
        start_ns = np.rint(start * 1e6).astype(np.int64)
        end_ns = np.rint(end * 1e6).astype(np.int64)
        gid = _group_ids(calls)
        desc = calls["descendants"].to_numpy(dtype="float64", na_value=np.nan) if "descendants" in calls else None
        if desc is not None and not np.isnan(desc).any():
            order = np.arange(n)  # the frame's own row order is pre-order: the counts say so
            _, parent_pos = nest_by_counts(gid, desc.astype(np.int64))
        else:  # saved before the counts were kept: nest by the time windows
            order, _, parent_pos = nest(gid, start_ns, end_ns)
        g = gid[order]
        first = np.r_[True, g[1:] != g[:-1]]
        g_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        call_o = np.arange(n) - g_start
        has_parent = parent_pos >= 0
        parent_o = np.where(has_parent, parent_pos - g_start, 0)
        call = np.empty(n, np.int64)
        call[order] = call_o
        parent_v = np.empty(n, np.int64)
        parent_v[order] = parent_o
        parent_na = np.empty(n, bool)
        parent_na[order] = ~has_parent
        # self = own time - the children's time, children summed onto their parent's row
        parent_row = np.where(has_parent, order[np.maximum(parent_pos, 0)], -1)
        parent_row_by_row = np.empty(n, np.int64)
        parent_row_by_row[order] = parent_row
        child = parent_row_by_row >= 0
        cpu_children = np.bincount(parent_row_by_row[child], weights=cpu[child], minlength=n)
        gpu = floats(calls, "gpu_ms")
        gpu_children = np.bincount(parent_row_by_row[child], weights=np.nan_to_num(gpu[child]), minlength=n)
        calls["call"] = pd.array(call, dtype="Int64")
        calls["parent"] = pd.arrays.IntegerArray(parent_v, parent_na)
        # a call's calibrated cost can leave its children a few microseconds longer than itself:
        # such a self time is 0 (and the step's residue absorbs the difference), never negative
        calls["self_ms"] = np.maximum(cpu - cpu_children, 0.0)
        if np.isnan(gpu).all():  # no CUDA times: the column is absent (see probe.schema.CALLS)
            calls = calls.drop(columns=["gpu_self_ms"], errors="ignore")
        else:
            calls["gpu_self_ms"] = np.maximum(gpu - gpu_children, 0.0)
    else:
        for col, dt in zip(_HOST_TREE, ("Int64", "Int64", "float64")):
            calls[col] = pd.Series([], dtype=dt)
    if steps is None:
        return calls, None
    return calls, residues(calls, steps)


def residues(calls: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """``steps`` with ``residue_ms`` and ``gpu_residue_ms`` from the calls' self times (see module doc)."""
    steps = steps.copy(deep=False)
    idx = pd.MultiIndex.from_frame(steps[_KEYS].astype(object))
    if len(calls):
        g = calls.groupby(_KEYS, sort=False, dropna=False, observed=True)
        host = g["self_ms"].sum().reindex(idx).to_numpy(dtype="float64", na_value=np.nan)
        gpu = (g["gpu_self_ms"].sum(min_count=1).reindex(idx).to_numpy(dtype="float64", na_value=np.nan)
               if "gpu_self_ms" in calls.columns else np.full(len(steps), np.nan))
    else:
        host = gpu = np.full(len(steps), np.nan)
    has_probe = "probe_ms" in steps
    probe_ms = steps["probe_ms"].to_numpy(dtype="float64", na_value=0.0) if has_probe else np.zeros(len(steps))
    residue = steps["forward_ms"].to_numpy(dtype="float64", na_value=np.nan) - host - probe_ms
    # The probe's cost is a calibrated estimate: where it leaves less than nothing for the residue
    # it is trimmed to what the step had left, so Σ self + residue + probe = forward still holds;
    # a residue still below 0 (self times beyond the forward by clock granularity) is 0.
    short = residue < 0
    if has_probe and short.any():
        trimmed = np.where(short, np.maximum(probe_ms + residue, 0.0), probe_ms)
        residue = residue + (probe_ms - trimmed)
        steps["probe_ms"] = np.where(steps["probe_ms"].isna().to_numpy(), np.nan, trimmed)
    steps["residue_ms"] = np.where(residue < 0, 0.0, residue)
    gpu_residue = steps["gpu_ms"].to_numpy(dtype="float64", na_value=np.nan) - gpu
    steps["gpu_residue_ms"] = np.where(gpu_residue < 0, 0.0, gpu_residue)
    return steps


def has_tree(calls: pd.DataFrame) -> bool:
    """Whether ``calls`` carries the tree columns with values (an older run's are null)."""
    return all(c in calls.columns for c in _HOST_TREE) and (calls.empty or calls["self_ms"].notna().all())


def ensure(calls: pd.DataFrame, steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frames with the tree columns and residues, derived only where they are missing."""
    if not has_tree(calls):
        calls, steps = annotate(calls, steps)
    elif "residue_ms" not in steps.columns or (len(steps) and steps["residue_ms"].isna().all() and len(calls)):
        steps = residues(calls, steps)
    return calls, steps


def parent_rows(calls: pd.DataFrame) -> np.ndarray:
    """Row position of each call's parent in ``calls`` (-1 at the top of a step), as integers.

    Every walk over the nesting (tree levels, the icicle, role attribution) follows these rows,
    so they are checked here, in linear time: within its step each ``call`` is unique and below
    the step's call count, and a parent is an *earlier* call of the same step (the calls are
    numbered in pre-order). Parent chains then strictly descend and every walk ends; a frame
    that breaks this (a damaged or edited ``calls.parquet``: ``parent = call``, a loop, a
    parent in another step) raises :class:`ValueError` instead of sending a walk round a cycle.
    """
    return memo.derived("parent_rows", None, calls, calls, lambda: _read_only(_parent_rows(calls)))


def check_nesting(calls: pd.DataFrame) -> None:
    """Raise :class:`ValueError` where the nesting of ``calls`` is not a tree (see
    :func:`parent_rows`), keeping nothing: a load checks every run, and most are never walked."""
    _parent_rows(calls, answer=False)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by every walk of these frames (probe.analysis.memo)
    return a


#: rows of the call columns read at a time while the nesting is checked (its copies stay small)
PART_ROWS = 1 << 17


def _parent_rows(calls: pd.DataFrame, answer: bool = True) -> np.ndarray | None:
    """The parent rows (see :func:`parent_rows`); with ``answer`` false only checked, ``None``."""
    n = len(calls)
    if n == 0:
        return np.zeros(0, np.int64)
    # The usual case, every recording's: each step's calls in its rows in order, numbered from 0,
    # so a call's row is its step's first row plus its number (and the numbers are unique).
    # Checked and answered in parts of rows, so that nothing of a million rows is copied whole.
    change = np.r_[True, _changes(calls)]
    small = np.int32 if n < 2**31 - 1 else np.int64
    found = np.empty(n if answer else 0, small)
    dense, unnumbered, early, before = True, None, None, -1
    for i in range(0, n, PART_ROWS):
        j = min(n, i + PART_ROWS)
        call = ints(calls["call"].iloc[i:j])
        parent = ints(calls["parent"].iloc[i:j])
        if unnumbered is None and (call < 0).any():
            unnumbered = i + int(np.flatnonzero(call < 0)[0])
        bad = (parent >= 0) & (parent >= call)
        if early is None and bad.any():
            early = i + int(np.flatnonzero(bad)[0])
        if dense:
            after = np.r_[before, call[:-1]] + 1  # what each call's number is if it follows the one above
            dense = bool(np.where(change[i:j], call == 0, call == after).all())
            before = call[-1]
        if dense and answer:
            rows = np.arange(i, j, dtype=small)
            rows -= call.astype(small, copy=False)
            rows += parent.astype(small, copy=False)
            found[i:j] = np.where(parent >= 0, rows, -1)  # the parent's row: same step, an earlier number
    if unnumbered is not None:
        raise ValueError(_bad_nesting(calls, unnumbered, "has no call number"))
    if early is not None:
        raise ValueError(_bad_nesting(calls, early, f"names call {calls['parent'].iloc[early]} as its parent, "
                                                    "which does not come before it"))
    if dense:
        return found if answer else None  # int32 below 2**31 rows: kept (memo), half the size
    del found, change
    call = ints(calls["call"])
    parent = ints(calls["parent"])
    has = parent >= 0
    gid = _group_ids(calls)
    if int(call.max()) < n:  # numbers beyond their rows but below the row count: a dense (step, call) table
        width = int(call.max()) + 1
        key = gid * width + call
        lookup = np.full((int(gid.max()) + 1) * width, -1, dtype=np.int64)
        lookup[key] = np.arange(n)
        dup = lookup[key] != np.arange(n)
        found = np.where(has, lookup[gid * width + np.where(has, parent, 0)], -1)
    else:  # numbers beyond the row count (a subset of a huge step, or damage): hash them
        index = pd.MultiIndex.from_arrays([gid, call])
        dup = index.duplicated(keep="last")
        found = np.where(has, index.get_indexer(pd.MultiIndex.from_arrays([gid, np.where(has, parent, 0)]))
                         if index.is_unique else -1, -1)
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(_bad_nesting(calls, i, f"shares its number {call[i]} with another call of its step"))
    return found if answer else None


def _bad_nesting(calls: pd.DataFrame, i: int, problem: str) -> str:
    row = calls.iloc[i]
    return (f"calls: the nesting is not a tree — call {row.get('call')} ({row.get('module')}) of run "
            f"{row.get('run_id')} step {row.get('step')} {problem}; calls.parquet is damaged or was edited "
            "(`probe verify RUN` lists what else is wrong); re-record the run")