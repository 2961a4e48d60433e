"""How a frame's declared columns are enforced: the dtype names schemas use, empty frames, conform.

A schema is a ``{column: pandas dtype name}`` dict (:mod:`probe.schema` declares the recorded
frames, :mod:`probe.derived_schema` the frames computed from a run). Every frame the library hands
out, saves or reloads goes through :func:`conform`, so an empty frame still carries every column
with its dtype, and a saved run reloads to equal frames.
"""

from __future__ import annotations

import pandas as pd

#: pandas' nullable string dtype, the dtype of every text column
STR = "string"
#: dtypes whose missing values a reloaded older run can take as nulls
NULLABLE = frozenset({STR, "Int64", "float64", "boolean"})


def empty(schema: dict[str, str]) -> pd.DataFrame:
    """An empty frame with every column of ``schema`` at its dtype."""
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in schema.items()})


def conform(df: pd.DataFrame, schema: dict[str, str], *, extra: bool = True) -> pd.DataFrame:
    """Return ``df`` with exactly the schema's columns first (in order) at their dtypes.

    Missing nullable columns are added as nulls; extra columns (added by analyses) are kept
    after them, or dropped with ``extra=False``. Columns already at their dtype are not
    copied (the frame shares their data with ``df``; pandas' copy-on-write keeps the two apart).
    """
    n = len(df)
    if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
        df = df.reset_index(drop=True)
    have = set(df.columns)
    names = [c for c in schema if c in have]
    cast = {c: schema[c] for c in names if str(df[c].dtype) != schema[c]}
    for col, dtype in schema.items():
        if col not in have and n and dtype == "int64":
            raise ValueError(f"column {col!r} ({dtype}) is required and has no value")
    extras = [c for c in df.columns if c not in schema] if extra else []
    if not cast and len(names) == len(schema) and list(df.columns) == [*names, *extras]:
        return df.copy(deep=False)  # the common case: already conformed
    out = {}
    for col, dtype in schema.items():
        if col in have:
            s = df[col]
            out[col] = s.astype(dtype) if col in cast else s
        else:
            out[col] = pd.Series(pd.array([None] * n, dtype=dtype)) if n else pd.Series([], dtype=dtype)
    for col in extras:
        out[col] = df[col]
    return pd.DataFrame(out, copy=False)
