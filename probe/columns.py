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
    after them, or dropped with ``extra=False``.
    """
    out = {}
    n = len(df)
    for col, dtype in schema.items():
        if col in df.columns:
            s = df[col]
            if str(s.dtype) != dtype:
                s = s.astype(dtype)
            out[col] = s.reset_index(drop=True)
        elif n and dtype == "int64":
            raise ValueError(f"column {col!r} ({dtype}) is required and has no value")
        else:
            out[col] = pd.Series([None] * n, dtype=dtype) if n else pd.Series([], dtype=dtype)
    for col in df.columns if extra else ():
        if col not in schema:
            out[col] = df[col].reset_index(drop=True)
    return pd.DataFrame(out)
