"""The observers' part of the frames: what each declares, what it returns, where it goes.

Every observer of the recorder (:class:`probe.recording.observer.Observer`) builds its own part
of a recording's frames from its own records (:meth:`~probe.recording.observer.Observer.frames`):
values of the ``steps`` and ``runs`` columns it declares in ``columns``, whole frames it declares
in ``builds``, and meta. Here each part is checked against its declaration and written into the
shared frames; the frame builder (:mod:`probe.analysis.frames`) calls :func:`contributions` and
knows no observer by name. The public frames keep the columns and dtypes of :mod:`probe.schema`:
an observer may fill a schema column only at the schema's dtype, and add a column of its own
after the schema's.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from .. import schema
from ..schema import RUNS, STEPS

#: the shared frames an observer may add columns to, with the keys its rows are matched on
SHARED = {"steps": (STEPS, ("run_id", "step")), "runs": (RUNS, ("run_id",))}
#: the frames of a :class:`probe.Run` an observer may build whole (the recorder builds the others)
BUILDABLE = {name: cols for name, cols in schema.FRAMES.items() if name not in ("calls", *SHARED)}


def check_declarations(kind: type) -> None:
    """Raise ``TypeError`` where an observer class's ``columns`` / ``builds`` break the frames'
    schema (checked when the probe registers it, so a plug-in fails at attach, not at the end)."""
    who = kind.__name__
    for frame, cols in dict(kind.columns).items():
        if frame not in SHARED:
            raise TypeError(f"{who}.columns names the frame {frame!r}; an observer adds columns to "
                            f"{' or '.join(map(repr, SHARED))} (build a whole frame with `builds`)")
        base = SHARED[frame][0]
        for col, dtype in dict(cols).items():
            if col in SHARED[frame][1]:
                raise TypeError(f"{who}.columns[{frame!r}] declares the key column {col!r}: its rows are "
                                f"matched on {SHARED[frame][1]}, which it must not declare")
            if col in base and base[col] != dtype:
                raise TypeError(f"{who}.columns[{frame!r}][{col!r}] is {dtype!r}; the schema's column is "
                                f"{base[col]!r} (probe.schema), declare it so")
            _dtype(dtype, f"{who}.columns[{frame!r}][{col!r}]")
    for name, cols in dict(kind.builds).items():
        if name not in BUILDABLE:
            raise TypeError(f"{who}.builds names {name!r}; an observer builds one of the frames "
                            f"{sorted(BUILDABLE)} of probe.Run (or adds columns to steps or runs)")
        if dict(cols) != BUILDABLE[name]:
            raise TypeError(f"{who}.builds[{name!r}] must declare the schema's columns and dtypes "
                            f"(probe.schema.FRAMES[{name!r}])")


def contributions(observed: tuple, calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame,
                  rank: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame], dict]:
    """``(calls, steps, runs, built frames by name, meta)`` once every observer has added its
    part, the rows of the runs an observer set apart as untimed left out of ``calls``, ``steps``
    and the frames the other observers built.

    Args:
        observed: ``(observer class, its frozen records)`` per observer, in registration order
            (``Records.observed``); each sees the frames as the ones before it left them.
        calls, steps, runs: the recorder's frames (conformed to the schema).
        rank: the recording's rank.
    Raises:
        ValueError: an observer returned a column or a frame it does not declare.
    """
    built: dict[str, pd.DataFrame] = {}
    meta: dict = {}
    untimed: dict[str, frozenset] = {}  # the observer's name -> the runs it set apart
    builder: dict[str, str] = {}
    for kind, records in observed:
        who = kind.__name__
        part = kind.frames(records, calls=calls, steps=steps, runs=runs, rank=rank)
        steps = _fill(steps, part.steps, "steps", kind.columns.get("steps", {}), who)
        runs = _fill(runs, part.runs, "runs", kind.columns.get("runs", {}), who)
        for name, df in part.built.items():
            cols = kind.builds.get(name)
            if cols is None:
                raise ValueError(f"{who} built the frame {name!r} without declaring it in {who}.builds")
            if name in built:
                raise ValueError(f"two observers built the frame {name!r}; one frame has one builder")
            # a column absent when all null (schema.Schema) may be left out
            odd = sorted((set(df.columns) ^ set(cols)) - (schema.absent_when_null(cols) - set(df.columns)))
            if odd:
                raise ValueError(f"{who} built {name!r} with columns other than it declares: {odd}")
            built[name] = schema.conform(df, cols, extra=False) if len(df) else schema.empty(cols)
            builder[name] = who
        meta.update(part.meta)
        if part.untimed:
            untimed[who] = frozenset(part.untimed)
    apart = frozenset().union(*untimed.values())
    if apart:
        calls, steps = _without(calls, apart), _without(steps, apart)
        built = {name: _without(df, apart - untimed.get(builder[name], frozenset())) for name, df in built.items()}
    return calls, steps, runs, built, meta


def _without(df: pd.DataFrame, run_ids: frozenset) -> pd.DataFrame:
    """``df`` without the rows of ``run_ids``."""
    if not run_ids or not len(df) or "run_id" not in df:
        return df
    keep = ~df["run_id"].isin(run_ids).to_numpy(dtype=bool)
    return df if keep.all() else df[keep].reset_index(drop=True)


def _fill(frame: pd.DataFrame, part: pd.DataFrame | None, name: str, declared: Mapping[str, str],
          who: str) -> pd.DataFrame:
    """``frame`` with ``part``'s values written into the rows of the same keys (others keep theirs)."""
    if part is None:
        return frame
    base, keys = SHARED[name]
    keys = list(keys)
    missing = [k for k in keys if k not in part.columns]
    if missing:
        raise ValueError(f"{who}'s {name} rows lack the key columns {missing}")
    undeclared = [c for c in part.columns if c not in keys and c not in declared]
    if undeclared:
        raise ValueError(f"{who} returned {name} columns it does not declare in {who}.columns: {undeclared}")
    if not len(part):
        return frame
    at = _index(frame, keys).get_indexer(_index(part, keys))
    found = at >= 0
    rows, n = at[found], len(frame)
    out = frame.copy()
    for col in (c for c in part.columns if c not in keys):
        dtype = declared[col]
        try:
            values = part[col].astype(dtype).array[found]
            column = out[col].astype(dtype).array.copy() if col in out else _nulls(n, dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{who}'s {name}.{col} does not hold {dtype} values "
                             f"(a column that can be missing needs a nullable dtype, e.g. 'Int64'): {exc}") from exc
        column[rows] = values
        out[col] = column
    return schema.conform(out, base)


def _index(df: pd.DataFrame, keys: list[str]) -> pd.Index:
    if len(keys) == 1:
        return pd.Index(df[keys[0]].astype(object))
    return pd.MultiIndex.from_frame(df[keys].astype(object))


def _nulls(n: int, dtype: str) -> Any:
    return pd.Series([None] * n, dtype=dtype).array.copy() if n else pd.array([], dtype=dtype)


def _dtype(dtype: str, where: str) -> None:
    try:
        pd.api.types.pandas_dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{where} is {dtype!r}, not a pandas dtype") from exc

