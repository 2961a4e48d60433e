"""Where a phase's forward time went, at every depth, each instant counted once.

Built on the call tree (:mod:`probe.analysis.tree`): every recorded call's *self* time belongs to
exactly one call, and per step ``Σ self_ms + residue_ms (+ probe_ms) = forward_ms``. So any
way of grouping the calls partitions the forward, and the shares of a grouping plus the
residue (and the probe's own cost, where recorded) add up to 100 %.

:func:`summary` groups at three levels:

- ``block``: embed, layer, norm, head, and ``model`` (model-level calls outside the blocks:
  the base model's own glue, ``rotary_emb``); a block's self time is its whole subtree.
- ``role``: every role of :mod:`probe.roles`. The attention function itself (scores, softmax,
  the weighted sum: sdpa, eager, flash, ...) is its own row, ``attention_fn``, at ``sublayers``
  and ``all``; what is left of the attention module's self time once calls inside it are
  recorded — RoPE on q/k, the cache update, reshapes, dispatch — is the row
  ``attention (rest)``.
- ``module``: every module.

:func:`tree_table` gives the call tree itself per phase (one row per path of modules), whole
or collapsed at a chosen tree level, and feeds the icicle chart.

Shares are taken over the steps that have call records (``decode_stride`` / ``max_steps``
keep timing every step but record calls of only some), on one clock per phase: CUDA time
where every such step has it, host time otherwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import schema
from ..columns import combine, floats, ranked, text_codes
from . import memo, tree
from .grouping import codes_in_order, first_rows, group_sum
from .labels import (  # noqa: F401  (re-exported: where readers have found them)
    ATTENTION_REST, BLOCK_ORDER, check_level, factorized, keyed, label_codes, labels, same_rows)
from .levels import blocks_from_modules, labelled, level_frame, level_sums
from .phase_cut import rows_of_phases
from ..schema import LEVELS, PHASES, SUMMARY, TREE, Level

RESIDUE = "(residue)"
PROBE = "(probe)"

SEP = " > "


class Phases:
    """Recorded steps, their calls and each phase's clock and total."""

    def __init__(self, calls: pd.DataFrame, steps: pd.DataFrame):
        calls, steps = tree.ensure(calls, steps)
        self.steps = steps[steps["residue_ms"].notna()] if len(steps) else steps
        if len(calls) and len(self.steps):
            # a call is of a recorded step if its stretch's first call is: keys of the stretches only
            starts, begins = tree.step_starts(calls)
            head = calls[[c for c in ("rank", "run_id", "step") if c in calls.columns]].iloc[starts]
            ckey, skey = tree.step_keys(head, self.steps)
            mine = np.isin(ckey, skey)
            if not mine.all():  # each call's stretch numbered only where some stretch is left out
                calls = calls[mine[np.cumsum(begins) - 1]].reset_index(drop=True)
        else:
            calls = calls.iloc[0:0]
        self.calls = calls
        self.prow = tree.parent_rows(calls)  # each call's parent row, shared by every level
        g = self.steps.groupby("phase", sort=False)
        self.n_steps = g.size()
        self.host = g["forward_ms"].sum()
        gpu = g["gpu_ms"].sum(min_count=1)
        self.on_gpu = (g["gpu_ms"].count().eq(self.n_steps) & g["gpu_residue_ms"].count().eq(self.n_steps)
                       & gpu.notna())
        self.total = gpu.where(self.on_gpu, self.host)
        self.residue = g["residue_ms"].sum()
        self.gpu_residue = g["gpu_residue_ms"].sum(min_count=1)
        self.probe = g["probe_ms"].sum() if "probe_ms" in self.steps.columns else None
        self._codes: dict[str, tuple[np.ndarray, pd.Index]] = {}
        self._floats: dict[str, np.ndarray | None] = {}
        self.nested = np.flatnonzero(self.prow >= 0)  # the calls inside another recorded call

    def floats(self, col: str) -> np.ndarray | None:
        """Number column ``col`` of the calls as float64 (see :func:`_present`), made once for every level."""
        if col not in self._floats:
            self._floats[col] = _present(self.calls, col)
        return self._floats[col]

    def codes(self, col: str) -> tuple[np.ndarray, pd.Index]:
        """``pd.factorize`` of a text column of the calls, made once and shared by every level."""
        if col not in self._codes:
            self._codes[col] = factorized(self.calls, col)
        return self._codes[col]

    def clock(self, phase: pd.Series, host: pd.Series, gpu: pd.Series) -> pd.Series:
        """``gpu`` where the row's phase is on the CUDA clock, else ``host``."""
        on = {str(k): bool(v) for k, v in self.on_gpu.items()}  # a row without a phase: host
        use = np.array([isinstance(p, str) and on.get(p, False) for p in phase.astype(object)], dtype=bool)
        return pd.Series(np.where(use, gpu.to_numpy(dtype="float64", na_value=np.nan),
                                  host.to_numpy(dtype="float64", na_value=np.nan)), index=host.index)

    def share(self, phase: pd.Series, host: pd.Series, gpu: pd.Series) -> pd.Series:
        return self.clock(phase, host, gpu) / phase.map(self.total).astype("float64").to_numpy()

    def extra_rows(self, level: str) -> list[dict]:
        """The residue row (and the probe row) of every phase."""
        rows = []
        for phase, total in self.total.items():
            n = int(self.n_steps[phase])
            host, gpu = float(self.residue[phase]), float(self.gpu_residue.get(phase, np.nan))
            on_gpu = bool(self.on_gpu[phase])
            rows.append({"level": level, "name": RESIDUE, "role": "residue", "phase": phase, "calls": n,
                         "total_ms": host, "self_ms": host, "mean_ms": host / max(n, 1),
                         "gpu_total_ms": gpu if on_gpu else np.nan, "gpu_self_ms": gpu if on_gpu else np.nan,
                         "share": (gpu if on_gpu else host) / total if total else np.nan})
            if self.probe is not None:
                own = float(self.probe[phase])
                rows.append({"level": level, "name": PROBE, "role": "probe", "phase": phase, "calls": n,
                             "total_ms": own, "self_ms": own, "mean_ms": own / max(n, 1),
                             # the probe's cost is host time; the CUDA clock does not see it
                             "share": np.nan if on_gpu else (own / total if total else np.nan)})
        return rows


def _present(calls: pd.DataFrame, col: str) -> np.ndarray | None:
    """Number column ``col`` as float64 (NaN for a null), or ``None`` where the frame lacks it
    (a column absent when all null: :data:`probe.schema.CUDA_CALLS`)."""
    return floats(calls, col) if col in calls.columns else None


def phases(calls: pd.DataFrame, steps: pd.DataFrame) -> Phases:
    """:class:`Phases` of these frames, built once while they live (:mod:`probe.analysis.memo`)."""
    return memo.derived("phases", None, calls, steps, lambda: Phases(calls, steps))


def summary(calls: pd.DataFrame, steps: pd.DataFrame, level: Level | None = None) -> pd.DataFrame:
    """Per (level, block / role / module, phase): calls, inclusive and self time, share.

    Args:
        calls, steps: the frames (tree columns are derived if missing).
        level: ``"block"``, ``"role"`` or ``"module"``; ``None`` for all three, stacked.

    Returns:
        Columns of :data:`probe.schema.SUMMARY`. Within one level and phase the ``share`` of
        every row (residue and probe rows included) sums to 1: rows hold self time.
        ``total_ms`` is the inclusive time of the row's own calls (a nested call of the same
        row counted once). At the block level a block's ``self_ms`` is its whole subtree.
        Sorted by level, phase, then blocks/roles in display order (modules as first called).
    """
    if level is not None:
        check_level(level)
    whole = memo.peek("summary", None, calls, steps)
    if level is None:
        if whole is None:
            whole = memo.derived("summary", None, calls, steps, lambda: _stacked(calls, steps))
        return memo.handed(whole)
    if whole is not None:  # every level already built (a report): its rows of this level
        return whole[(whole["level"] == level).to_numpy(dtype=bool, na_value=False)].reset_index(drop=True)
    # one level alone (a dashboard chart of 20 runs): its rows, summed as among the others, but only its
    # frame built (building a level's frame costs more than summing it, on a small run); of a phase
    # filter's cut (phase_cut.phase_subset), the whole run's rows of those phases where they are the same
    def build() -> pd.DataFrame:
        rows = rows_of_phases(calls, steps, level, phases)
        return rows if rows is not None else _summary(calls, steps, level)

    return memo.handed(memo.derived("summary", level, calls, steps, build))


def _stacked(calls: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Every level: where a level was built alone first (a report's charts ask for the block and
    role levels, its tree for the module level, before the whole), the levels alone stacked (the
    missing ones built alone too) instead of built again; they are the whole's rows of each
    level to the bit, and the whole is sorted by level first."""
    made = {lv: memo.peek("summary", lv, calls, steps) for lv in LEVELS}
    if all(m is None for m in made.values()):
        return _summary(calls, steps)
    parts = [m if m is not None else summary(calls, steps, lv) for lv, m in made.items()]
    parts = [p for p in parts if len(p)]
    return schema.conform(combine(parts), SUMMARY, extra=False) if parts else schema.empty(SUMMARY)


def block_summary(calls: pd.DataFrame, steps: pd.DataFrame, by: Level | None = None) -> pd.DataFrame:
    """:func:`summary` of bare frames (``by`` = level: ``block``, ``role``, ``module`` or None)."""
    return summary(calls, steps, level=by)


def _summary(calls: pd.DataFrame, steps: pd.DataFrame, level: Level | None = None) -> pd.DataFrame:
    ph = phases(calls, steps)
    if ph.calls.empty:
        return schema.empty(SUMMARY)
    bodies: dict[str, pd.DataFrame] = {}
    if level is not None:
        return _one_level(ph, _level_body(ph, calls, steps, level, bodies), level)
    parts = []
    for lv in ("module", "block", "role"):
        parts.append(_level_body(ph, calls, steps, lv, bodies))
        extra = pd.DataFrame(ph.extra_rows(lv))
        extra["_o"] = 10_000 + np.arange(len(extra))
        parts.append(extra)
    # a part's all-null columns (the extra rows' figures) take the others' dtypes
    out = combine([p for p in parts if len(p)])
    out["_l"] = ranked(out["level"], {v: i for i, v in enumerate(LEVELS)})
    out["_p"] = ranked(out["phase"], {p: i for i, p in enumerate(PHASES)}, len(PHASES))
    out = out.sort_values(["_l", "_p", "_o"], kind="stable").drop(columns=["_l", "_p", "_o"])
    return schema.conform(out, SUMMARY, extra=False)


def _one_level(ph: Phases, body: pd.DataFrame, level: str) -> pd.DataFrame:
    """One level's summary: ``body`` and the phases' residue and probe rows, in the order and at
    the dtypes :func:`_summary` gives the level among the others (as its stack, sort and conform
    would make them), put together column by column: on a small run those pandas steps cost
    more than the sums."""
    extra = ph.extra_rows(level)
    rank = {p: i for i, p in enumerate(PHASES)}
    p_rank = np.concatenate([ranked(body["phase"], rank, len(PHASES)).to_numpy(),
                             np.array([rank.get(r["phase"], len(PHASES)) for r in extra], np.float64)])
    o_rank = np.concatenate([body["_o"].to_numpy(dtype=np.float64), 10_000 + np.arange(len(extra), dtype=np.float64)])
    order = np.lexsort((o_rank, p_rank))  # stable: by phase, then display order, then as stacked

    def col(name: str, dtype: str):
        mine = body[name] if name in body.columns else pd.Series([None] * len(body), dtype=object)
        theirs = [r.get(name) for r in extra]
        if dtype == "int64":  # the calls: never null
            return np.concatenate([mine.to_numpy(dtype=np.int64), np.array(theirs, np.int64)])[order]
        if dtype == "float64":
            return np.concatenate([mine.to_numpy(dtype=np.float64, na_value=np.nan),
                                   np.array([np.nan if v is None else v for v in theirs], np.float64)])[order]
        vals = np.concatenate([mine.astype(object).to_numpy(), np.array(theirs, dtype=object)])
        return pd.array(vals[order], dtype=dtype)

    out = pd.DataFrame({name: col(name, dtype) for name, dtype in SUMMARY.items()})
    return schema.conform(out, SUMMARY, extra=False)


def _level_body(ph: Phases, calls: pd.DataFrame, steps: pd.DataFrame, level: str,
                bodies: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One level's rows (no residue or probe row; ``bodies`` keeps those made), summed the one way
    whether asked for alone or with the others: at depth blocks the blocks are sums of the modules'
    sums, and the roles are the blocks' rows where they are the same rows."""
    if level not in bodies:
        if level == "role" and same_rows(ph.calls, "role", "block"):  # the same rows: summed once
            bodies[level] = labelled(_level_body(ph, calls, steps, "block", bodies).copy(), "role")
        else:
            bodies[level] = level_frame(ph, level, _sums(ph, calls, steps, level))
    return bodies[level]


def _sums(ph: Phases, calls: pd.DataFrame, steps: pd.DataFrame, level: str) -> dict:
    """:func:`level_sums` of ``level`` (the block level from the module level's where it can be),
    kept while the frames live: a chart asks for one level, the next view for another."""
    def build() -> dict:
        if level == "block":
            got = blocks_from_modules(ph, _sums(ph, calls, steps, "module"))
            if got is not None:
                return got
        return level_sums(ph, level)

    return memo.derived("level_sums", level, calls, steps, build)


def _tree_levels(prow: np.ndarray) -> np.ndarray:
    """Tree level of each call (0 at the top) from its parent row (:func:`tree.parent_rows`
    checked that parent chains strictly descend, so this ends within the deepest chain)."""
    level = np.zeros(len(prow), np.int64)
    cur = prow.copy()
    for _ in range(len(prow)):
        if not (cur >= 0).any():
            break
        level += cur >= 0
        cur = np.where(cur >= 0, prow[np.maximum(cur, 0)], -1)
    return level


def _codes_with_nulls(calls: pd.DataFrame, col: str) -> tuple[np.ndarray, pd.Index]:
    """:func:`text_codes` of ``col`` with a null its own value: the frame's kept factorisation
    where the column has no null (the same codes), else made here."""
    codes, uniq = factorized(calls, col)
    if len(codes) and int(codes.min()) < 0:
        return text_codes(calls[col], na_sentinel=False)
    return codes, uniq


def _tree_of_modules(summ: pd.DataFrame) -> pd.DataFrame:
    """The call tree of a recording where no call is inside another: every call a top-level node
    named by its module, so the rows, sums and order are the summary's module level's (the
    residue and probe rows after each phase's modules, as the tree puts them)."""
    m = summ[(summ["level"] == "module").to_numpy(dtype=bool, na_value=False)].reset_index(drop=True)
    out = m.rename(columns={"name": "node"}).assign(module=m["name"], depth=1,
                                                   parent_node=pd.Series([None] * len(m), dtype="string"))
    return pd.DataFrame({k: out[k].astype(v) for k, v in TREE.items()})


def _tree_nodes(calls: pd.DataFrame, prow: np.ndarray, lv: np.ndarray) -> tuple[np.ndarray, list[str], list]:
    """Each call's node in the tree of module paths, interned level by level as (node of its
    parent, module) pairs, numbered in order of first appearance; with each node's path and its
    parent's path (``None`` at the top)."""
    mod_codes, mods = _codes_with_nulls(calls, "module")
    n_mods = max(len(mods), 1)
    node = np.full(len(calls), -1, np.int64)
    paths: list[str] = []
    parent_path: list[str | None] = []
    for d in range(int(lv.max()) + 1 if len(lv) else 0):
        at = np.flatnonzero(lv == d)
        par = node[prow[at]] if d else np.full(len(at), -1, np.int64)
        codes, pairs = codes_in_order((par + 1) * n_mods + mod_codes[at], (len(paths) + 1) * n_mods)
        node[at] = len(paths) + codes
        for key in pairs.tolist():  # one per new node, not per call
            pn, mc = key // n_mods - 1, key % n_mods
            paths.append((paths[pn] + SEP if pn >= 0 else "") + str(mods[mc]))
            parent_path.append(paths[pn] if pn >= 0 else None)
    return node, paths, parent_path


def _tree_shape(calls: pd.DataFrame, prow: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], list]:
    """Each call's tree level and node, with the nodes' paths: shared by the tables at every depth."""
    lv = _tree_levels(prow)
    node, paths, parent_path = _tree_nodes(calls, prow, lv)
    lv.flags.writeable = node.flags.writeable = False  # kept while the frames live (probe.analysis.memo)
    return lv, node, paths, parent_path


def tree_table(calls: pd.DataFrame, steps: pd.DataFrame, depth: int | None = None) -> pd.DataFrame:
    """The call tree per phase, one row per path of modules, optionally collapsed at ``depth``.

    Args:
        calls, steps: the frames.
        depth: keep tree levels ``1..depth`` and fold everything deeper into its ancestor at
            ``depth`` (whose ``self_ms`` becomes its inclusive time); ``None`` keeps all.

    Returns:
        Columns of :data:`TREE`, plus a ``(residue)`` row (and ``(probe)``) per phase at depth 1;
        per phase the ``share`` column sums to 1. Rows are in pre-order of the first step.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be 1 or more (1 = the top-level calls); got {depth!r}")
    if depth is not None and not calls.empty:
        ph = phases(calls, steps)
        # nothing deeper to fold: the whole tree (one build for both); every call at the top when none is nested
        if not len(ph.nested) or int(memo.derived("tree_nodes", None, ph.calls, ph.calls,
                                                  lambda: _tree_shape(ph.calls, ph.prow))[0].max()) < depth:
            depth = None
    return memo.handed(memo.derived("tree", depth, calls, steps, lambda: _tree_table(calls, steps, depth)))


def _tree_table(calls: pd.DataFrame, steps: pd.DataFrame, depth: int | None) -> pd.DataFrame:
    ph = phases(calls, steps)
    c = ph.calls
    if c.empty:
        return schema.empty(TREE)
    if not len(ph.nested) and keyed(c):  # no call inside another (depth blocks): the tree is the module level
        summ = memo.peek("summary", None, calls, steps)  # among the others where built, else alone
        return _tree_of_modules(summ if summ is not None else summary(calls, steps, "module"))
    prow = ph.prow
    lv, node, paths, parent_path = memo.derived("tree_nodes", None, c, c, lambda: _tree_shape(c, prow))
    n = len(c)
    keep = node
    if depth is not None:  # fold deeper calls into their ancestor at `depth`
        anc = np.arange(n)
        for _ in range(max(int(lv.max()) - depth + 1, 0)):
            deep = lv[anc] >= depth
            anc = np.where(deep, prow[anc], anc)
        keep = node[anc]
    shown = lv < depth if depth is not None else np.ones(n, bool)
    cpu = floats(c, "cpu_ms")
    gpu = _present(c, "gpu_ms")
    # one group per (phase, node), aggregated on integer codes
    pcodes, puniq = _codes_with_nulls(c, "phase")
    slot, gkeys = codes_in_order(pcodes.astype(np.int64) * max(len(paths), 1) + keep,
                                 max(len(paths), 1) * max(len(puniq), 1))
    m = len(gkeys)
    # the node's first own call (folded calls sort after every shown one)
    order = np.where(shown, np.arange(n), n + np.arange(n))
    first = np.full(m, 2 * n, np.int64)
    np.minimum.at(first, slot, order)
    at = first_rows(slot, m)  # each group's first row
    gnode, gphase = keep[at], pcodes[at]
    out = pd.DataFrame({
        "phase": pd.array([str(puniq[p]) for p in gphase], dtype="string"),
        "calls": np.bincount(slot, weights=shown.astype("float64"), minlength=m).astype("int64"),
        "total_ms": group_sum(slot, m, np.where(shown, cpu, 0.0)),
        "self_ms": group_sum(slot, m, floats(c, "self_ms")),
        "gpu_total_ms": group_sum(slot, m, None if gpu is None else np.where(shown, gpu, np.nan), 1),
        "gpu_self_ms": group_sum(slot, m, _present(c, "gpu_self_ms"), 1),
        "first": first,
    })
    row = np.where(first < n, first, first - n)
    out["role"] = c["role"].array.take(row).astype("string")
    out["layer"] = c["layer"].array.take(row)
    out["module"] = c["module"].array.take(row).astype("string")
    out["depth"] = [paths[k].count(SEP) + 1 for k in gnode]
    out["parent_node"] = [parent_path[k] for k in gnode]
    out["node"] = [paths[k] for k in gnode]
    out["mean_ms"] = out["total_ms"] / out["calls"].where(out["calls"] > 0)
    out["share"] = ph.share(out["phase"], out["self_ms"], out["gpu_self_ms"])
    out["_p"] = ranked(out["phase"], {p: i for i, p in enumerate(PHASES)}, len(PHASES))
    out = out.sort_values(["_p", "first"], kind="stable")
    extra = pd.DataFrame(ph.extra_rows("tree"))
    if len(extra):
        extra = extra.rename(columns={"name": "node"}).assign(module=extra["name"], depth=1, parent_node=None)
        extra["_p"] = ranked(extra["phase"], {p: i for i, p in enumerate(PHASES)}, len(PHASES))
        out = pd.concat([out, extra], ignore_index=True).sort_values(["_p"], kind="stable")
    out = out.drop(columns=["_p", "first", "level"], errors="ignore")
    return pd.DataFrame({k: out[k].astype(v) if k in out else pd.Series([None] * len(out), dtype=v)
                         for k, v in TREE.items()}).reset_index(drop=True)
