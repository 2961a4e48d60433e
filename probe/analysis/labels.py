"""Each call's row at a level of the accounting (:mod:`probe.analysis.accounting`), as integer
codes into a list of names, made once while the frames live (:mod:`probe.analysis.memo`):

- ``block``: embed / layer / norm / head, ``model`` outside every block (the nearest
  ancestor-or-self module recorded with a block role);
- ``role``: the call's role, ``attention (rest)`` for an attention call with recorded calls
  inside it;
- ``module``: the module.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..columns import text_codes
from . import memo, tree
from ..schema import BLOCK_ROLES, LEVELS, Level

#: name of the attention module's self-time row at the role level when calls inside it are recorded
#: (its projections, the attention function): what is left is RoPE, the cache update, reshapes
ATTENTION_REST = "attention (rest)"
#: display order of the block level
BLOCK_ORDER = (*BLOCK_ROLES, "model")


def _factorize(s: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Codes of a text column and its distinct values in order of appearance (-1 for a null)."""
    return text_codes(s)


def factorized(calls: pd.DataFrame, col: str) -> tuple[np.ndarray, pd.Index]:
    """:func:`pd.factorize` of text column ``col`` of ``calls``, made once while the frame lives."""
    def build():
        codes, uniq = _factorize(calls[col])
        codes.flags.writeable = False  # shared by every table of these frames
        return codes, uniq

    return memo.derived("factorize", col, calls, calls, build)


def _block_codes(modules: pd.Series, roles: pd.Series, codes=None) -> tuple[np.ndarray, list[str]]:
    """Each module's block (embed / layer / norm / head, ``model`` outside every block) as codes
    into :data:`BLOCK_ORDER`: the nearest ancestor-or-self module recorded with a block role
    (worked out once per distinct module)."""
    mcodes, muniq = codes("module") if codes else _factorize(modules)
    rc, ru = codes("role") if codes else _factorize(roles)
    # each module's role: that of its first call with one
    at = np.full(len(muniq), len(rc), np.int64)
    head = np.flatnonzero((rc[:65536] >= 0) & (mcodes[:65536] >= 0))  # every module is called in the first steps
    np.minimum.at(at, mcodes[head], head)
    if len(rc) > 65536 and (at == len(rc)).any():  # a module first called later (or never with a role)
        has = np.flatnonzero((rc >= 0) & (mcodes >= 0))
        np.minimum.at(at, mcodes[has], has)
    role_of = [str(ru[rc[i]]) if i < len(rc) else "" for i in at]
    blocks = {str(m): role_of[i] for i, m in enumerate(muniq) if role_of[i] in BLOCK_ROLES}
    index = {b: i for i, b in enumerate(BLOCK_ORDER)}
    per_module = np.empty(len(muniq), np.int64)
    for i, m in enumerate(muniq):
        parts = str(m).split(".")
        found = next((blocks[p] for p in (".".join(parts[:j]) for j in range(len(parts), 0, -1)) if p in blocks),
                     "model")
        per_module[i] = index[found]
    return per_module[mcodes], list(BLOCK_ORDER)


def _has_children(n: int, prow: np.ndarray) -> np.ndarray:
    return np.bincount(prow[prow >= 0], minlength=n) > 0


def _role_codes(calls: pd.DataFrame, prow: np.ndarray, codes=None) -> tuple[np.ndarray, list[str]]:
    """Each call's row name at the role level, as codes into a list of names: its role, or
    ``attention (rest)`` for an attention call with recorded calls inside it (its self time is
    then what it does outside them)."""
    rcodes, runiq = codes("role") if codes else _factorize(calls["role"])
    names = [str(r) for r in runiq]
    if "attention" in names:
        core = (rcodes == names.index("attention")) & _has_children(len(calls), prow)
        if core.any():
            rcodes = np.where(core, len(names), rcodes)
            names.append(ATTENTION_REST)
    return rcodes, names


def check_level(level: str) -> None:
    """A clear error for a level that is not one of :data:`probe.schema.LEVELS`."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(repr(v) for v in LEVELS)}; got {level!r}")


def labels(calls: pd.DataFrame, level: Level) -> np.ndarray:
    """Each call's row name at ``level`` (``block``, ``role`` or ``module``), as in :func:`summary`.

    Summing ``self_ms`` by these names gives :func:`summary`'s ``self_ms``: at the block level a
    block's calls are its whole subtree, so their self times add up to the block's inclusive time.
    """
    check_level(level)
    if level == "module":
        codes, names = factorized(calls, "module")
        return np.append(np.asarray(names, dtype=object), pd.NA)[codes]
    codes, names = label_codes(calls, level)
    return np.asarray(names, dtype=object)[codes] if len(calls) else np.zeros(0, dtype=object)


def label_codes(calls: pd.DataFrame, level: Level) -> tuple[np.ndarray, list[str]]:
    """:func:`labels` as codes into a list of names (no name made per call)."""
    check_level(level)
    return memo.derived("labels", level, calls, calls, lambda: _codes(
        calls, level, tree.parent_rows(calls) if level == "role" else None, lambda col: factorized(calls, col)))


def keyed(calls: pd.DataFrame) -> bool:
    """Every call has a module, a phase and a role (read from the codes the frame keeps): the
    condition for taking a level or the tree from another level's sums (a call without one is
    a row of its own in each)."""
    return all(len(calls) == 0 or int(factorized(calls, col)[0].min()) >= 0 for col in ("module", "phase", "role"))


def same_rows(calls: pd.DataFrame, level: Level, other: Level) -> bool:
    """Whether every call has a row of the same name at ``level`` as at ``other`` (at depth
    blocks the roles are the blocks): the two levels' rows are then the same sums."""
    codes, names = label_codes(calls, level)
    codes_o, names_o = label_codes(calls, other)
    at = {n: i for i, n in enumerate(names_o)}
    lut = np.array([at.get(n, -2) for n in names] + [-1], dtype=np.int64)  # a null (-1) stays one
    return bool(np.array_equal(lut[codes], codes_o))


def _codes(calls: pd.DataFrame, level: str, prow: np.ndarray | None, codes=None) -> tuple[np.ndarray, list[str]]:
    """Each call's row at ``level`` as codes into a list of names (``prow``: the parent rows,
    needed at the role level; ``codes``: :meth:`Phases.codes`, to factorize each column once)."""
    if level == "module":
        kcodes, kuniq = codes("module") if codes else _factorize(calls["module"])
        return kcodes, [str(m) for m in kuniq]
    if level == "role":
        return _role_codes(calls, prow, codes)
    return _block_codes(calls["module"], calls["role"], codes)
