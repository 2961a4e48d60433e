"""A phase filter's frames and their summary: :func:`phase_subset` cuts a run's calls and steps to
some phases and notes the cut, so that a level's summary of the cut is read from the whole
frames' kept summary (:func:`rows_of_phases`) where that gives the very same rows: a dashboard's
phase filter over 20 runs then sums nothing again."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import pandas as pd

from . import memo
from .labels import same_rows
from .levels import blocks_of_modules

#: a :class:`probe.analysis.accounting.Phases`
Phases = Any


def phase_subset(calls: pd.DataFrame, steps: pd.DataFrame, phases) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The calls and steps of ``phases`` (rows kept in order, a null phase left out; a frame all kept
    is handed back as it is), noted as cut from these frames: a level's
    :func:`probe.analysis.accounting.summary` of them is then the whole frames' kept rows of those
    phases, where it is provably the same (:func:`rows_of_phases`), instead of summed again."""
    cmask = calls["phase"].isin(phases).to_numpy(dtype=bool, na_value=False)
    smask = steps["phase"].isin(phases).to_numpy(dtype=bool, na_value=False)
    sub_c = calls if cmask.all() else calls[cmask].reset_index(drop=True)
    sub_s = steps if smask.all() else steps[smask].reset_index(drop=True)
    if sub_c is not calls or sub_s is not steps:
        kept = tuple(phases)
        memo.derived("phase_subset", None, sub_c, sub_s, lambda: (weakref.ref(calls), weakref.ref(steps), kept))
    return sub_c, sub_s


def _same_totals(a: Phases, b: Phases, kept: tuple) -> bool:
    """Whether two :class:`Phases` hold the very same totals of the ``kept`` phases (pandas may sum
    one phase's steps in another order when it is the only group: then a last bit can differ)."""
    for name in ("n_steps", "host", "total", "residue", "gpu_residue", "on_gpu", "probe"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            if x is not y:
                return False
            continue
        xs, ys = ({str(k): v for k, v in z.items() if k in kept} for z in (x, y))
        if xs.keys() != ys.keys() or any(not (xs[k] == ys[k] or (xs[k] != xs[k] and ys[k] != ys[k])) for k in xs):
            return False
    return True


def rows_of_phases(calls: pd.DataFrame, steps: pd.DataFrame, level: str,
                   phases: Callable[[pd.DataFrame, pd.DataFrame], Phases]) -> pd.DataFrame | None:
    """``level``'s summary of frames cut by :func:`phase_subset`, as the rows of those phases of the
    whole frames' summary, where that summary is kept and gives the very same rows; else ``None``.

    Each row of a phase is summed from that phase's calls and steps alone, in their order, which the
    cut keeps: the same numbers, in the same order, as long as both frames take the same way through
    :func:`probe.analysis.accounting.summary` (``phases``: its
    :func:`~probe.analysis.accounting.phases`). That holds where, in the whole frames, no call is
    inside another, every call has a module, phase and role and is its block's own
    (:func:`blocks_of_modules`: then also in the cut), the roles are the blocks where the level is
    ``role`` (then also in the cut), the cut's calls of recorded steps are all the whole frames'
    calls of those phases (a call whose step is of another phase, or has none, would be left out of
    the cut's sums only), and the phases' totals over their steps came out the same
    (:func:`_same_totals`)."""
    src = memo.peek("phase_subset", None, calls, steps)
    if src is None:
        return None
    whole_c, whole_s, kept = src[0](), src[1](), src[2]
    if whole_c is None or whole_s is None:
        return None
    rows = memo.peek("summary", None, whole_c, whole_s)
    rows = rows[(rows["level"] == level).to_numpy(dtype=bool, na_value=False)] if rows is not None \
        else memo.peek("summary", level, whole_c, whole_s)
    parent = memo.peek("phases", None, whole_c, whole_s)
    if rows is None or parent is None or not blocks_of_modules(parent):
        return None
    if level == "role" and not same_rows(parent.calls, "role", "block"):
        return None
    ph = phases(calls, steps)
    n_kept = int(parent.calls["phase"].isin(kept).to_numpy(dtype=bool, na_value=False).sum())
    if len(ph.nested) or not len(ph.calls) or len(ph.calls) != n_kept or not _same_totals(ph, parent, kept):
        return None
    return rows[rows["phase"].isin(kept).to_numpy(dtype=bool, na_value=False)].reset_index(drop=True)
