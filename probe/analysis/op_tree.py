"""The call tree opened down to its ops: ``Run.tree(level="op")``.

A deep run's ops (:mod:`probe.analysis.ops`) become children of the tree node of the innermost
*recorded* module that ran them: at depth ``blocks`` the block, at ``sublayers`` the attention,
MLP or norm (or the attention function); ops outside every recorded module (the rotary
embedding at depth blocks, the causal mask) go under ``(residue)``. The tree's figures are sums
over the phase's timed steps; an op row is its mean per *sampled* step of the phase times the
phase's timed step count, so it reads on the same scale. Each node with ops gets a
``(dispatch and Python)`` row: the node's self time less its op rows, so its children add up to
its self time exactly. It can be below 0 where the dispatch mode's op times ran slower than
the timed steps (a busy machine); the icicle then draws the ops at their own length.

The node's own row keeps its self time; at level ``op`` a share column therefore adds up to
100 % over the module rows, the op rows splitting their parent's share.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from .. import schema
from ..columns import combine
from ..derived_schema import TREE
from .accounting import PROBE, RESIDUE, SEP
from .ops import DISPATCH

#: the levels a tree opens to
TreeLevel = Literal["module", "op"]
TREE_LEVELS = ("module", "op")
#: the ``role`` of an op row and of a node's dispatch row
OP_ROLE, DISPATCH_ROLE = "op", "dispatch"


def check_tree_level(level: object) -> None:
    """Raise ``ValueError`` (saying what to pass) for a level that is not one of :data:`TREE_LEVELS`."""
    if level not in TREE_LEVELS:
        raise ValueError(f"level must be 'module' (the recorded calls) or 'op' (a deep run's ops under their "
                         f"module); got {level!r}")


def short_op(op: str) -> str:
    """``aten.addmm.default`` -> ``addmm``; other overloads keep their name (``mul.Tensor``)."""
    op = op[5:] if op.startswith("aten.") else op
    return op[:-8] if op.endswith(".default") else op


def _target(module: object, nodes: dict[str, str], residue: str | None) -> str | None:
    """The tree node of the innermost recorded module enclosing ``module`` (dotted prefixes)."""
    name = module if isinstance(module, str) else ""
    while name:
        got = nodes.get(name)
        if got is not None:
            return got
        name = name.rpartition(".")[0]
    return residue


def op_tree(tree: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """``tree`` (a :func:`probe.analysis.accounting.tree_table`) with each node's ops and its
    ``(dispatch and Python)`` row after the node's own row (see the module doc).

    Args:
        tree: the module tree of the timed steps (any collapse depth).
        ops: the run's ``ops`` frame (phases without timed steps in ``tree`` are left out).
    Returns:
        Columns of :data:`probe.derived_schema.TREE`; op rows have ``role`` ``"op"`` and
        ``module`` the op as dispatched (``aten.mm.default``), dispatch rows ``role``
        ``"dispatch"``; no GPU figures (the ops are host times). The tree pools the ranks of a
        multi-rank run (its residue counts each rank's steps), so the ops are scaled by the
        sampled steps of every rank. A phase whose tree has neither a ``(residue)`` nor a top-level
        row (a filtered tree) has no step count to scale its ops by: it is left as it is.
    """
    if ops.empty or tree.empty:
        return tree
    parts = []
    for phase, t in tree.groupby("phase", sort=False):
        mine = ops[ops["phase"] == phase]
        parts.append(_phase(t.reset_index(drop=True), mine) if len(mine) else t)
    return schema.conform(combine(parts), TREE, extra=False)


def _phase(t: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """One phase's tree rows with its op and dispatch rows after each node's own row."""
    module = t["module"].astype(object)
    at_residue = (module == RESIDUE).to_numpy()
    # the phase's timed steps: the residue's calls (one per step), else the top-level calls
    counted = t.loc[at_residue if at_residue.any() else (t["depth"] == 1).to_numpy(), "calls"]
    if counted.empty:
        return t
    n_steps = int(counted.max())
    residue = RESIDUE if at_residue.any() else None
    special = at_residue | (module == PROBE).to_numpy()
    nodes: dict[str, str] = {}
    for m, node in zip(module[~special], t.loc[~special, "node"]):
        nodes.setdefault(str(m), str(node))  # a module called from two places: its first node
    # a step is (rank, run_id, step), as in the tree: two ranks' step 3 are two sampled steps
    sampled = len(ops.drop_duplicates([c for c in ("rank", "run_id", "step") if c in ops.columns]))
    where = {m: _target(m, nodes, residue) for m in ops["module"].dropna().unique()}
    target = ops["module"].astype(object).map(where).where(ops["module"].notna(), residue)
    g = ops.assign(_node=target).dropna(subset=["_node"]).groupby(["_node", "op"], sort=False)
    per = g.agg(calls=("seq", "size"), host_ms=("host_ms", "sum")).reset_index()
    if per.empty:
        return t
    scale = n_steps / sampled  # per sampled step, then over the phase's timed steps
    row_of = {str(n): i for i, n in enumerate(t["node"])}
    per["_row"] = per["_node"].map(row_of).to_numpy(dtype="int64")
    per["calls"] = np.rint(per["calls"] * scale).astype("int64")
    per["self_ms"] = per["host_ms"] * scale
    per = per.sort_values(["_row", "self_ms"], ascending=[True, False], kind="stable")
    # each node's dispatch row: its self time less its op rows, after them (summed as numpy sums
    # a slice, so that the rows add up to the node's self time as they always did)
    ms, at = per["self_ms"].to_numpy(dtype="float64"), per["_row"].to_numpy()
    starts = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])
    rows = at[starts]
    op_ms = np.array([ms[a:b].sum() for a, b in zip(starts, [*starts[1:], len(ms)])])
    kids = pd.DataFrame({
        "_row": np.concatenate([per["_row"].to_numpy(), rows]),
        "_kind": np.repeat([1, 2], [len(per), len(rows)]),
        "module": np.concatenate([per["op"].astype(object).to_numpy(), np.full(len(rows), DISPATCH, object)]),
        "calls": np.concatenate([per["calls"].to_numpy(), np.zeros(len(rows), np.int64)]),
        "self_ms": np.concatenate([ms, t["self_ms"].to_numpy(dtype="float64")[rows] - op_ms]),
    })
    kids["role"] = np.where(kids["_kind"] == 1, OP_ROLE, DISPATCH_ROLE)
    parent = t.iloc[kids["_row"].to_numpy()]
    pnode = parent["node"].astype(object).to_numpy()
    kids["phase"] = parent["phase"].to_numpy()
    kids["parent_node"] = pnode
    kids["node"] = pnode + SEP + kids["module"].to_numpy()
    kids["layer"] = parent["layer"].array
    kids["depth"] = parent["depth"].to_numpy(dtype="int64") + 1
    kids["total_ms"] = kids["self_ms"]
    calls = kids["calls"].to_numpy(dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        kids["mean_ms"] = np.where(calls > 0, kids["self_ms"].to_numpy() / calls, np.nan)
    total = float(t["self_ms"].sum())  # the phase's host forward time (residue and probe rows included)
    kids["share"] = kids["self_ms"] / total if total else np.nan
    kids["gpu_total_ms"] = kids["gpu_self_ms"] = np.nan
    own = t.assign(_row=np.arange(len(t)), _kind=0)
    out = combine([own, kids[[*own.columns]]]).sort_values(["_row", "_kind"], kind="stable")
    return out.drop(columns=["_row", "_kind"])
