"""Tables derived from a run's ``calls`` and ``steps`` frames, kept while those frames live.

A report asks for the same summary, call tree and per-step groundwork several times over the same
frames, through different doors (``Run.summary()``, a figure that takes bare frames, a comparison).
Each is built once per pair of frame objects: a result is kept with weak references to the two
frames and handed out again while both are the very same objects with the same shape and columns.
Frames are treated as read-only: a frame edited in place keeps its stale tables; assign a new
frame instead (as :class:`probe.Run` documents).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import pandas as pd

T = TypeVar("T")

#: results kept per kind; a kind whose results hold the frames themselves keeps very few
LIMITS = {"phases": 2}
DEFAULT_LIMIT = 64
#: ... but keeps more (up to :data:`DEFAULT_LIMIT`) while their frames hold this many call rows in
#: all: a dashboard of 20 small runs asks again for each run's groundwork at the next chart
SMALL_ROWS = 200_000

_STORE: dict[str, OrderedDict] = {}
_LOCK = threading.Lock()


def handed(df: pd.DataFrame) -> pd.DataFrame:
    """A kept table as handed to a caller: a shallow copy where pandas copies on write (pandas 3,
    or pandas 2 with ``mode.copy_on_write`` on), else a deep one, so that a caller's edit in place
    (``table.loc[0, "self_ms"] = ...``) never reaches the table kept (the tables are small: one row
    per module, block or role and phase)."""
    return df.copy(deep=not _copies_on_write())


def _copies_on_write() -> bool:
    if int(pd.__version__.split(".", 1)[0]) >= 3:
        return True
    try:
        return pd.get_option("mode.copy_on_write") is True
    except KeyError:  # pragma: no cover - a pandas without the option
        return False


def _sig(df: pd.DataFrame) -> tuple:
    return df.shape, tuple(df.columns)


def peek(kind: str, key: Hashable, calls: pd.DataFrame, steps: pd.DataFrame):
    """The result kept for ``(kind, key)`` of these frames, or ``None``."""
    with _LOCK:
        hit = _STORE.get(kind, {}).get((key, id(calls), id(steps)))
    if hit is None:
        return None
    rc, rs, sc, ss, value = hit
    if rc() is calls and rs() is steps and sc == _sig(calls) and ss == _sig(steps):
        return value
    return None


def derived(kind: str, key: Hashable, calls: pd.DataFrame, steps: pd.DataFrame, build: Callable[[], T]) -> T:
    """``build()`` for these frames, built once while they live (see the module doc)."""
    got = peek(kind, key, calls, steps)
    if got is not None:
        return got
    value = build()
    entry = (weakref.ref(calls), weakref.ref(steps), _sig(calls), _sig(steps), value)
    with _LOCK:
        for kept in _STORE.values():
            for k in [k for k, e in kept.items() if e[0]() is None or e[1]() is None]:
                del kept[k]  # frames gone: their tables go with them
        store = _STORE.setdefault(kind, OrderedDict())
        store[(key, id(calls), id(steps))] = entry
        while len(store) > LIMITS.get(kind, DEFAULT_LIMIT) and (
                len(store) > DEFAULT_LIMIT or sum(e[2][0][0] for e in store.values()) > SMALL_ROWS):
            store.popitem(last=False)
    return value


def clear() -> None:
    """Drop every kept table."""
    with _LOCK:
        _STORE.clear()
