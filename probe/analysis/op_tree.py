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
        ``"dispatch"``; no GPU figures (the ops are host times).
    """
    if ops.empty or tree.empty:
        return tree
    parts = []
    for phase, t in tree.groupby("phase", sort=False):
        mine = ops[ops["phase"] == phase]
        if mine.empty:
            parts.append(t)
            continue
        parts.append(_phase(t.reset_index(drop=True), mine))
    return schema.conform(pd.concat(parts, ignore_index=True), TREE, extra=False)


def _phase(t: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    special = t["module"].isin([RESIDUE, PROBE])
    n_steps = int(t.loc[t["module"] == RESIDUE, "calls"].max()) if (t["module"] == RESIDUE).any() \
        else int(t.loc[t["depth"] == 1, "calls"].max())
    total = float(t["self_ms"].sum())  # the phase's host forward time (residue and probe rows included)
    nodes: dict[str, str] = {}
    for m, node in zip(t.loc[~special, "module"], t.loc[~special, "node"]):
        nodes.setdefault(str(m), str(node))  # a module called from two places: its first node
    residue = RESIDUE if (t["module"] == RESIDUE).any() else None
    sampled = ops[["run_id", "step"]].drop_duplicates().shape[0]
    where = {m: _target(m, nodes, residue) for m in ops["module"].dropna().unique()}
    target = ops["module"].map(where).astype(object)
    target = target.where(ops["module"].notna(), residue)
    g = ops.assign(_node=target).dropna(subset=["_node"]).groupby(["_node", "op"], sort=False)
    per = g.agg(calls=("seq", "size"), host_ms=("host_ms", "sum")).reset_index()
    scale = n_steps / sampled  # per sampled step, then over the phase's timed steps
    per["calls"] = np.rint(per["calls"] * scale).astype("int64")
    per["self_ms"] = per["host_ms"] * scale
    per = per.sort_values(["_node", "self_ms"], ascending=[True, False], kind="stable")
    row_of = {str(n): i for i, n in enumerate(t["node"])}
    children: dict[str, list[dict]] = {}
    for node, grp in per.groupby("_node", sort=False):
        parent = t.iloc[row_of[node]]
        rows = [_row(parent, op, int(c), float(ms), total, OP_ROLE)
                for op, c, ms in zip(grp["op"], grp["calls"], grp["self_ms"])]
        own = float(parent["self_ms"]) - float(grp["self_ms"].sum())
        rows.append(_row(parent, DISPATCH, 0, own, total, DISPATCH_ROLE))
        children[node] = rows
    out = []
    for i, node in enumerate(t["node"]):
        out.append(t.iloc[[i]])
        if str(node) in children:
            out.append(pd.DataFrame(children[str(node)]))
    return combine(out)


def _row(parent: pd.Series, op: str, calls: int, ms: float, total: float, role: str) -> dict:
    return {"phase": parent["phase"], "node": f"{parent['node']}{SEP}{op}", "parent_node": parent["node"],
            "module": op, "role": role, "layer": parent["layer"], "depth": int(parent["depth"]) + 1,
            "calls": calls, "total_ms": ms, "self_ms": ms, "mean_ms": ms / calls if calls else np.nan,
            "share": ms / total if total else np.nan, "gpu_total_ms": np.nan, "gpu_self_ms": np.nan}
