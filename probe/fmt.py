"""Number formats shared by every place a figure is shown: the terminal (``probe run``), the
HTML report, the dashboard and Jupyter (``Run._repr_html_``), so one value reads the same
everywhere.

- time: :func:`ms` keeps about four significant digits (``1,418.6``, ``14.91``, ``4.235``,
  ``0.0515``);
- memory: :func:`nbytes` in binary units (``512 B``, ``2.00 KiB``, ``416.0 KiB``, ``12.7 GiB``);
- shares: :func:`pct` from a fraction (``0.984`` -> ``98.4%``);
- throughput: :func:`tok_s` (``0.62``, ``8.01``, ``37.5``, ``1,234``);
- counts: :func:`count` (``1,234``); shapes: :func:`shape` (``[1, 7, 4096]``);
- rates and ratios: :func:`sig` (three significant digits, never ``0.0`` for a small positive
  value: ``0.0252``), :func:`flop_s` (``523 MFLOP/s``, ``52.3 GFLOP/s``), :func:`byte_s`
  (``9.10 GB/s``), :func:`intensity` (``0.0252 FLOP/B``);
- layer indices: :func:`index_set` (``{0..31}``, ``{0..4,6..31}``).

A missing value (``None``, ``NaN``, ``pd.NA``) is an empty string, never ``nan`` or ``<NA>``.
:func:`cell` picks the format from a column name's unit suffix (``_ms``, ``_bytes``, ``share``,
``tok_s``, ``_shapes``) and :func:`frame` applies it to a whole table. Standard library, and pandas where a value or table needs it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["byte_s", "cell", "count", "flop_s", "frame", "index_set", "intensity", "is_missing", "ms", "nbytes", "pct",
           "shape", "sig", "table", "tok_s"]

_MS_COLUMN = re.compile(r"(^|_)ms($|_)")  # total_ms, tpot_ms_p50, gpu_total_ms ...


def is_missing(value: object) -> bool:
    """True for ``None``, ``NaN``, ``pd.NA`` and ``NaT``."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        import pandas as pd  # only for values that are not plain floats (pd.NA, NaT)

        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array: not a scalar missing value
        return False


def _number(value: object) -> "float | str":
    """``value`` as a float, or the text shown instead of it: ``""`` when missing, ``inf`` / ``-inf``."""
    if is_missing(value):
        return ""
    v = float(value)
    special = _special(v)
    return v if special is None else special


def _special(v: float) -> str | None:
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return None


def ms(value: object, unit: bool = False) -> str:
    """Milliseconds with about four significant digits: ``1,418.6``, ``14.91``, ``4.235``, ``0.0515``.

    Args:
        value: the time in ms.
        unit: append `` ms``.
    """
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    a = abs(v)
    if a >= 100:
        text = f"{v:,.1f}"
    elif a >= 10:
        text = f"{v:.2f}"
    elif a >= 1 or a == 0:
        text = f"{v:.3f}"
    else:  # three significant digits, trailing zeros kept so a column lines up: 0.690, 0.0515
        text = f"{v:.{min(2 - math.floor(math.log10(a)), 9)}f}"
    return text + (" ms" if unit else "")


def nbytes(value: object) -> str:
    """Bytes in binary units, about three significant digits: ``512 B``, ``2.00 KiB``,
    ``416.0 KiB``, ``12.7 GiB``."""
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    a = abs(v)
    if a < 1024:
        return f"{v:,.0f} B"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if a >= scale:
            x = v / scale
            return f"{x:,.1f} {unit}" if abs(x) >= 100 else f"{x:.2f} {unit}" if abs(x) < 10 else f"{x:.1f} {unit}"
    return f"{v:,.0f} B"  # pragma: no cover - unreachable


def pct(fraction: object) -> str:
    """A fraction as a plain percentage: ``0.984`` -> ``98.4%``, ``0.0004`` -> ``0.04%``; a
    non-zero share under 0.01 % is ``< 0.01%`` (never scientific notation)."""
    if is_missing(fraction):
        return ""
    v = float(fraction) * 100
    if (s := _special(v)) is not None:
        return s
    a = abs(v)
    if v == 0 or a >= 0.1:
        return f"{v:.1f}%"
    if a >= 0.01:
        return f"{v:.2f}%"
    return "< 0.01%" if v > 0 else "> -0.01%"


def table(rows: "Iterable[Iterable[object]]", header: "Iterable[object] | None" = None, *, left: int = 1,
          gap: int = 2, indent: str = "") -> list[str]:
    """Aligned plain-text columns: the first ``left`` columns left-aligned, the rest right-aligned,
    ``gap`` spaces between columns, each as wide as its widest cell (cells are already text)."""
    body = [[str(c) for c in r] for r in rows]
    head = [str(c) for c in header] if header is not None else None
    grid = ([head] if head else []) + body
    if not grid:
        return []
    n = max(len(r) for r in grid)
    grid = [r + [""] * (n - len(r)) for r in grid]
    widths = [max(len(r[i]) for r in grid) for i in range(n)]
    sep = " " * gap
    return [indent + sep.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in grid]


def tok_s(value: object, unit: bool = False) -> str:
    """Tokens per second: ``0.62``, ``8.01``, ``37.5``, ``1,234`` (about three significant digits)."""
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    a = abs(v)
    text = f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    return text + (" tok/s" if unit else "")


def sig(value: object, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits (``0.0252``, ``52.3``, ``1,234``): a small
    positive number never reads ``0.0``."""
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(a)))}f}"


def _scaled(value: object, unit: str, scales: tuple[tuple[str, float], ...]) -> str:
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    for prefix, scale in scales:
        if abs(v) >= scale:
            return f"{sig(v / scale)} {prefix}{unit}"
    return f"{sig(v)} {unit}"


_SI = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def flop_s(value: object) -> str:
    """FLOP per second with an SI prefix, three significant digits: ``523 MFLOP/s``, ``52.3 GFLOP/s``."""
    return _scaled(value, "FLOP/s", _SI)


def flops(value: object) -> str:
    """A count of floating-point operations with an SI prefix: ``155 kFLOP``, ``1.23 GFLOP``."""
    return _scaled(value, "FLOP", _SI)


def byte_s(value: object) -> str:
    """Bytes per second, decimal units as bandwidth is quoted: ``9.10 GB/s``, ``3.35 TB/s``."""
    return _scaled(value, "B/s", _SI)


def intensity(value: object) -> str:
    """Arithmetic intensity: ``0.0252 FLOP/B``, ``295 FLOP/B``."""
    return "" if is_missing(value) else f"{sig(value)} FLOP/B"


def count(value: object) -> str:
    """A whole number with thousands separators: ``1,234``."""
    v = _number(value)
    if isinstance(v, str):  # missing (""), NaN or infinite
        return v
    return f"{v:,.0f}"


def shape(js: object) -> str:
    """A shapes value (JSON ``[[1,7,64]]``) as ``[1, 7, 64]``; empty for a null; text that is
    already formatted (``[1, 7, 64]``) as it is."""
    from .schema import shape_text

    try:
        return shape_text(js)
    except TypeError:  # one shape, not a list of them: already display text
        return str(js)


def index_set(indices: Iterable[int]) -> str:
    """Layer indices folded into runs: ``{0..31}``, ``{0..4,6..31}``, ``{3}``."""
    vals = sorted({int(i) for i in indices})
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}..{vals[j]}")
        i = j + 1
    return "{" + ",".join(parts) + "}"


def cell(column: str, value: object) -> str:
    """A table cell's text, the format chosen by the column's name (its unit suffix)."""
    if is_missing(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if column.endswith("_shapes") and isinstance(value, str):
        return shape(value)
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return str(value)
        if column in ("share", "a_share", "b_share") or column.endswith(("_share", "_fraction")):
            return pct(v)
        if column.endswith("_bytes") or column in ("bytes per position",):
            return nbytes(v)
        if column in ("parameters", "flops", "bytes_moved", "calls"):
            return count(v)
        if column.endswith("tok_s"):
            return tok_s(v)
        if column.endswith("_pct"):  # already a percentage (spread_pct, slowdown_pct ...)
            return f"{v:,.1f}%"
        if _MS_COLUMN.search(column) or column.endswith(" ms"):
            return ms(v)
        if (s := _special(v)) is not None:
            return s
        if v.is_integer():
            return f"{int(v)}" if abs(v) < 10_000 else f"{v:,.0f}"
        return f"{v:.4g}"
    return str(value)


def frame(df: "pd.DataFrame", drop_empty: bool = False) -> "pd.DataFrame":
    """``df`` with every cell as text by :func:`cell` (for display only; keep the numbers for
    anything else).

    Args:
        df: the table.
        drop_empty: leave out columns with no value at all (the GPU columns of a CPU run).
    """
    cols = [c for c in df.columns if not (drop_empty and df[c].isna().all() and len(df))]
    import pandas as pd

    return pd.DataFrame({c: [cell(str(c), v) for v in df[c].tolist()] for c in cols},
                        index=df.index, dtype="string")
