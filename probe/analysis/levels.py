"""The summary's levels summed on integer codes: each level's groups (row x phase, in the order
first called) and their sums (:func:`level_sums`), the block level from the module level's sums
where no call is inside another (:func:`blocks_from_modules`), and a level's rows as a frame
(:func:`level_frame`). :func:`probe.analysis.accounting.summary` stacks them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..columns import ranked
from ..schema import ROLES
from .grouping import codes_in_order, first_rows, group_sum
from .labels import ATTENTION_REST, BLOCK_ORDER, keyed, label_codes

#: a :class:`probe.analysis.accounting.Phases` (its calls, their parent rows, codes and floats)
Phases = Any


def level_sums(ph: "Phases", level: str) -> dict:
    """One level's groups (row x phase, in the order first called) and their sums."""
    c = ph.calls
    n = len(c)
    prow = ph.prow
    rcodes, _ = ph.codes("role")
    kcodes, names = label_codes(c, level)
    own = _own(ph, level, kcodes, names)
    pcodes, puniq = ph.codes("phase")
    n_phase = max(len(puniq), 1)
    # a call counts towards its row's total unless its parent is a call of the same row (looked
    # at for the nested calls only: none at depth blocks)
    inner, up = ph.nested, prow[ph.nested]
    root = own.copy() if own is not None else np.ones(n, bool)
    if len(inner):
        root[inner] &= ~((kcodes[up] == kcodes[inner]) & (True if own is None else own[up]))
    whole = bool(root.all())
    cpu = ph.floats("cpu_ms")
    gpu = ph.floats("gpu_ms")
    gk = kcodes.astype(np.int64) * n_phase + pcodes
    slot, keys = codes_in_order(gk, max(len(names), 1) * n_phase)  # output rows in the order they were first called
    m = len(keys)
    first = first_rows(slot, m)  # each row's first call

    def agg(values, min_count=0):
        return group_sum(slot, m, values, min_count)

    every = own is None  # every call is its row's own call (the same sums, less work)
    counts = np.bincount(slot, minlength=m)
    calls_n = (counts if every else np.bincount(slot, weights=own, minlength=m)).astype("float64")
    ob = ph.floats("out_bytes")
    if not every:
        ob = np.where(own, ob, np.nan)
    has_ob = ~np.isnan(ob) if np.isnan(ob.sum()) else None  # one pass where no call lacks the bytes
    own_cpu = agg(cpu if every else np.where(own, cpu, 0.0))
    return {
        "name": np.asarray(keys, np.int64) // n_phase, "phase": np.asarray(keys, np.int64) % n_phase, "first": first,
        "names": names, "calls": calls_n, "own_cpu": own_cpu,
        # every call a root of its row (depth blocks): its total is the sum of its calls, as is the mean's
        "total_ms": own_cpu if whole and every else agg(np.where(root, cpu, 0.0)),
        "self_ms": agg(ph.floats("self_ms")),
        "gpu_total_ms": agg(None if gpu is None else np.where(root, gpu, np.nan), 1),
        "gpu_self_ms": agg(ph.floats("gpu_self_ms"), 1),
        "out_bytes": agg(ob), "out_n": counts if has_ob is None else np.bincount(slot[has_ob], minlength=m),
        "rcodes": rcodes[first],
    }


def _own(ph: "Phases", level: str, kcodes: np.ndarray, names: list[str]) -> np.ndarray | None:
    """Which calls are their row's own calls (at the block level, a call of the block's role or
    outside every block; a call of another role inside a block adds only its self time);
    ``None`` where every call is."""
    if level != "block":
        return None
    rcodes, runiq = ph.codes("role")
    role_as_key = np.array([names.index(str(r)) if str(r) in names else -1 for r in runiq] or [-1], np.int64)
    own = (role_as_key[rcodes] == kcodes) | (kcodes == names.index("model"))
    return None if own.all() else own


def blocks_of_modules(ph: "Phases") -> bool:
    """Whether :func:`blocks_from_modules` takes the block level from the module level: no call is
    inside another, every call has a module, a phase and a role, and every call is its block's own."""
    if len(ph.nested) or not keyed(ph.calls):
        return False  # nested calls, or calls without a module, phase or role: summed from the calls
    kcodes, names = label_codes(ph.calls, "block")
    return _own(ph, "block", kcodes, names) is None


def blocks_from_modules(ph: "Phases", mods: dict) -> dict | None:
    """The block level's sums from the module level's, where every call is its block's own call
    and none is inside another (depth blocks): each module lies in one block, so a block's sums
    are its modules' (added in another order: equal up to rounding). ``None`` otherwise."""
    if not blocks_of_modules(ph):
        return None
    kcodes, names = label_codes(ph.calls, "block")
    n_phase = max(len(ph.codes("phase")[1]), 1)
    bkey = kcodes[mods["first"]].astype(np.int64) * n_phase + mods["phase"]  # each module row's block row
    order = np.argsort(mods["first"], kind="stable")  # module rows as first called
    slot, keys = pd.factorize(bkey[order])  # block rows in the order first called
    group = np.empty(len(order), np.int64)
    group[order] = slot
    m = len(keys)
    first = np.full(m, np.iinfo(np.int64).max)
    np.minimum.at(first, group, mods["first"])

    def add(values, min_count=0):
        return group_sum(group, m, values, min_count)

    return {
        "name": np.asarray(keys, np.int64) // n_phase, "phase": np.asarray(keys, np.int64) % n_phase, "first": first,
        "names": names, "calls": add(mods["calls"]), "own_cpu": add(mods["own_cpu"]), "total_ms": add(mods["total_ms"]),
        "self_ms": add(mods["self_ms"]), "gpu_total_ms": add(mods["gpu_total_ms"], 1),
        "gpu_self_ms": add(mods["gpu_self_ms"], 1), "out_bytes": add(mods["out_bytes"]), "out_n": add(mods["out_n"]),
        "rcodes": ph.codes("role")[0][first],
    }


def level_frame(ph: "Phases", level: str, g: dict) -> pd.DataFrame:
    """A level's rows from its groups' sums (:func:`level_sums`)."""
    _, runiq = ph.codes("role")
    _, puniq = ph.codes("phase")
    roles = [str(r) for r in runiq]
    names = g["names"]
    calls_n = g["calls"]
    out = pd.DataFrame({
        "name": pd.array([names[k] for k in g["name"]], dtype="string"),
        "phase": pd.array([str(puniq[p]) for p in g["phase"]], dtype="string"),
        "role": pd.array([roles[r] for r in g["rcodes"]], dtype="string"),
        "layer": (ph.calls["layer"].array.take(g["first"]) if level == "module"
                  else pd.array([pd.NA] * len(calls_n), dtype="Int64")),
        "calls": calls_n.astype("int64"),
        "total_ms": g["total_ms"],
        "self_ms": g["self_ms"],
        "gpu_total_ms": g["gpu_total_ms"],
        "gpu_self_ms": g["gpu_self_ms"],
        "mean_out_bytes": g["out_bytes"] / np.where(g["out_n"] > 0, g["out_n"], np.nan),
    })
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_ms"] = g["own_cpu"] / np.where(calls_n > 0, calls_n, np.nan)
    out["share"] = ph.share(out["phase"], out["self_ms"], out["gpu_self_ms"])
    return labelled(out, level)


def labelled(out: pd.DataFrame, level: str) -> pd.DataFrame:
    """A level's rows given their ``role``, ``level`` and display order columns."""
    if level == "block":
        out["role"] = out["name"]
    elif level == "role":
        out["role"] = out["name"].where(out["name"] != ATTENTION_REST, "attention")
    out["level"] = level
    if level == "block":
        out["_o"] = ranked(out["name"], {b: i for i, b in enumerate(BLOCK_ORDER)}, len(BLOCK_ORDER))
    elif level == "role":
        out["_o"] = ranked(out["role"], {r: i for i, r in enumerate(ROLES)}, len(ROLES))
    else:
        out["_o"] = 0
    return out
