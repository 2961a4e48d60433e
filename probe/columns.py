"""How a frame's declared columns are enforced: the dtype names schemas use, empty frames, conform.

A schema is a ``{column: pandas dtype name}`` dict (:mod:`probe.schema` declares the recorded
frames, :mod:`probe.derived_schema` the frames computed from a run). Every frame the library hands
out, saves or reloads goes through :func:`conform`, so an empty frame still carries every column
with its dtype, and a saved run reloads to equal frames.

A schema may declare columns **absent when all null** (:class:`Schema`): the CUDA and allocator
columns of ``calls`` are null on every call of a CPU run, so such a run carries them neither in
memory nor on disk. :func:`conform` drops them where every value is null, :func:`empty` leaves them
out, and :func:`column` / :func:`floats` read an absent one as all null: code that reads one of them
goes through those two, never ``df[name]``. ``conform(..., whole=True)`` puts every column back
(the CSV export writes them all).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

#: pandas' nullable string dtype, the dtype of text columns with many distinct values (JSON per row)
STR = "string"
#: text columns with few distinct values (names, phases, shapes): a pandas categorical whose
#: categories are the values sorted (so sorting by it sorts the text) at pandas' ``str`` dtype; a
#: frame may carry categories no row uses (a slice, a part of a run): group with ``observed=True``
CAT = "category"
#: dtypes whose missing values a reloaded older run can take as nulls
NULLABLE = frozenset({STR, CAT, "Int64", "Int32", "float64", "boolean"})
#: dtypes every row needs a value of (a missing column of these is refused)
REQUIRED = frozenset({"int64", "int32"})
#: the range of each narrow integer dtype (a value outside it is refused on load)
INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "Int32": (-(2**31), 2**31 - 1)}


class Schema(dict):
    """A frame's ``{column: dtype name}``, and the columns of it that are absent when all null
    (``absent_when_null``: a frame whose rows all lack a value there does not carry the column)."""

    def __init__(self, columns: dict[str, str], *, absent_when_null: frozenset[str] | tuple = ()):
        super().__init__(columns)
        self.absent_when_null = frozenset(absent_when_null)
        unknown = self.absent_when_null - set(self)
        if unknown or any(self[c] not in NULLABLE for c in self.absent_when_null):
            raise ValueError(f"absent_when_null names {sorted(unknown) or 'a column that is never null'}")

    def narrowed(self, columns) -> "Schema":
        """This schema with only ``columns`` (its order kept), the flags of those kept."""
        keep = set(columns)
        return Schema({c: t for c, t in self.items() if c in keep}, absent_when_null=self.absent_when_null & keep)


def absent_when_null(schema: dict[str, str]) -> frozenset[str]:
    """The columns of ``schema`` a frame leaves out where they are all null (none for a plain dict)."""
    return getattr(schema, "absent_when_null", frozenset())


def all_null(s: pd.Series) -> bool:
    """Whether ``s`` holds no value (an empty column holds none)."""
    arr = s.array
    if isinstance(arr, pd.arrays.NumpyExtensionArray) and arr.dtype.kind == "f":
        return bool(np.isnan(arr.to_numpy()).all())
    return bool(s.isna().all())


def empty(schema: dict[str, str]) -> pd.DataFrame:
    """An empty frame with every column of ``schema`` at its dtype (but those absent when all null)."""
    return _empty(tuple(schema.items()), absent_when_null(schema)).copy(deep=False)


@functools.lru_cache(maxsize=64)
def _empty(items: tuple[tuple[str, str], ...], skip: frozenset[str]) -> pd.DataFrame:
    """The empty frame of a schema, made once (handed out as shallow copies: copy-on-write keeps them apart)."""
    return pd.DataFrame({c: pd.Series([], dtype=_dtype(d)) for c, d in items if c not in skip})


def nulls(n: int, dtype, index: pd.Index | None = None) -> pd.Series:
    """``n`` nulls at schema dtype ``dtype`` (a name, or a pandas or numpy dtype that holds nulls)."""
    if isinstance(dtype, str) and dtype == CAT:
        s = pd.Series(pd.Categorical.from_codes(np.full(n, -1, np.int8), dtype=_dtype(CAT)))
    elif dtype == "float64":
        s = pd.Series(np.full(n, np.nan))
    else:
        s = pd.Series(pd.array([None] * n, dtype=dtype)) if n else pd.Series([], dtype=dtype)
    if index is not None:
        s.index = index
    return s


def column(df: pd.DataFrame, name: str, schema: dict[str, str]) -> pd.Series:
    """Column ``name`` of ``df``, or all nulls at its dtype in ``schema`` where ``df`` lacks it (a
    column absent when all null, see :class:`Schema`)."""
    if name in df.columns:
        return df[name]
    return nulls(len(df), schema[name], df.index).rename(name)


def floats(df: pd.DataFrame, name: str) -> np.ndarray:
    """The values of number column ``name`` as float64, NaN for a null; all NaN where ``df`` lacks it.
    A float64 column is handed out as a read-only view of its data (its nulls are NaN already)."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    s = df[name]
    if s.dtype == np.float64:
        return s.to_numpy()  # no copy, no scan for nulls
    return s.to_numpy(dtype="float64", na_value=np.nan)


def ints(s: pd.Series, na: int = -1) -> np.ndarray:
    """The values of integer column ``s``, a null as ``na``: a numpy column as it is (no copy; it
    holds no null), a nullable one at its own width from 32 bits up (``Int32`` stays 4 bytes a
    row), anything else as int64."""
    if isinstance(s.dtype, np.dtype) and s.dtype.kind in "iu":
        return s.to_numpy()
    width = getattr(s.dtype, "numpy_dtype", None)
    if width is None or width.kind != "i" or width.itemsize < 4:
        width = np.dtype("int64")
    return s.to_numpy(dtype=width, na_value=na)


_CATS_DTYPE = pd.Index([], dtype="str").dtype


def _dtype(name: str):
    """The pandas dtype a schema's dtype name stands for (categories at pandas' ``str`` dtype)."""
    return pd.CategoricalDtype(pd.Index([], dtype="str")) if name == CAT else name


def _canonical(s: pd.Series) -> bool:
    """Whether ``s`` is a categorical in the schema's form: ``str`` categories, sorted."""
    if not isinstance(s.dtype, pd.CategoricalDtype) or s.dtype.ordered:
        return False
    cats = s.dtype.categories
    return cats.dtype == _CATS_DTYPE and (len(cats) < 2 or cats.is_monotonic_increasing)


def categorical(s: pd.Series) -> pd.Series:
    """``s`` (text or a categorical) as a categorical in the schema's form (see :data:`CAT`): the
    categories it already has (used or not) or its distinct values, sorted, at pandas' ``str`` dtype."""
    if _canonical(s):
        return s
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = s.dtype.categories
        values = sorted(str(v) for v in cats)
        new = pd.CategoricalDtype(pd.Index(values, dtype="str"))
        lut = np.append(new.categories.get_indexer(cats.astype(str)), -1).astype(s.cat.codes.dtype)
        codes = lut[s.cat.codes.to_numpy()]  # a missing value (-1) stays missing
        return pd.Series(pd.Categorical.from_codes(codes, dtype=new), index=s.index, name=s.name)
    codes, uniques = pd.factorize(s.astype("string"), sort=True)
    cats = pd.Index([str(v) for v in uniques], dtype="str")
    return pd.Series(pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(cats)), index=s.index, name=s.name)


def text_codes(s: pd.Series, *, na_sentinel: bool = True) -> tuple[np.ndarray, pd.Index]:
    """:func:`pd.factorize` of a text column: codes in order of first appearance (-1 for a null,
    or the null its own value with ``na_sentinel=False``) and the distinct values as text. A
    categorical is factorised on its codes, without making a string per row."""
    if not isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype("string")
    codes, uniq = pd.factorize(s, use_na_sentinel=na_sentinel)
    return codes, pd.Index(np.asarray(uniq, dtype=object), dtype="string")


def ranked(s: pd.Series, order: dict, missing: float = np.nan) -> pd.Series:
    """Each value's place in ``order`` (a dict of value -> rank), ``missing`` where it has none, as
    float64 whatever ``s``'s dtype: on pandas 2 mapping a categorical maps its categories and keeps
    the categorical dtype, which a fill with a new value then refuses."""
    return s.astype(object).map(order).astype("float64").fillna(missing)


def combine(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """``pd.concat(frames, ignore_index=True)`` (rows of several parts, runs or ranks), rows in the
    order given, with each column's dtype taken from the frames that hold values in it.

    - A column all null in one frame (figures a part lacks, or a frame without the column) is
      made nulls at the dtype of the first frame holding values there (:func:`nulls`), so it
      does not turn the others' floats into objects: pandas 2 excludes such columns while warning
      that it will stop, pandas 3 no longer does; this gives the same frame on both.
    - A categorical column stays one: its categories are the union of the frames' (sorted).
    - Every column is kept, in order of first appearance, even where every frame is null (at
      the first frame's dtype); a frame with rows and no columns adds rows of nulls.
    """
    frames = [f for f in frames if len(f) or len(f.columns)]
    if not frames:
        return pd.DataFrame()
    cols = list(dict.fromkeys(c for f in frames for c in f.columns))
    held = [{c for c in f.columns if not all_null(f[c])} for f in frames]
    target = {}
    for c in cols:
        have = [f[c] for f, h in zip(frames, held) if c in h] or [next(f[c] for f in frames if c in f.columns)]
        if any(isinstance(s.dtype, pd.CategoricalDtype) for s in have):  # unused categories kept too
            target[c] = _union_categorical([f[c] for f in frames if c in f.columns])
        else:
            target[c] = have[0].dtype
    parts = []
    for f, h in zip(frames, held):
        if list(f.columns) == cols and len(h) == len(cols) and all(f[c].dtype == target[c] for c in cols):
            parts.append(f)  # the common case: nothing to fill or cast
            continue
        parts.append(pd.DataFrame({c: _at(f[c], target[c]) if c in h else _nulls_at(len(f), target[c], f.index)
                                   for c in cols}, index=f.index, copy=False))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)


def _union_categorical(cols: list[pd.Series]) -> pd.CategoricalDtype:
    """The schema's categorical dtype of the union of ``cols``' categories or values (sorted)."""
    union = sorted({str(v) for s in cols for v in (s.dtype.categories if isinstance(s.dtype, pd.CategoricalDtype)
                                                    else s.dropna().unique())})
    return pd.CategoricalDtype(pd.Index(union, dtype="str"))


def _at(s: pd.Series, dtype) -> pd.Series:
    """``s`` at categorical ``dtype`` where that is the column's, else as it is (pandas finds the common dtype)."""
    return s.astype(dtype) if isinstance(dtype, pd.CategoricalDtype) and s.dtype != dtype else s


def _nulls_at(n: int, dtype, index: pd.Index) -> pd.Series:
    """``n`` nulls at ``dtype``; where it holds none (a numpy int or bool) NaN or ``None``, which
    pandas widens the column for (float64, object) as it does for a frame without the column."""
    if isinstance(dtype, pd.CategoricalDtype):
        return pd.Series(pd.Categorical.from_codes(np.full(n, -1, np.int8), dtype=dtype), index=index)
    if n and isinstance(dtype, np.dtype) and dtype.kind in "iub":
        dtype = "float64" if dtype.kind in "iu" else object
    return nulls(n, dtype, index)


def conform(df: pd.DataFrame, schema: dict[str, str], *, extra: bool = True, whole: bool = False) -> pd.DataFrame:
    """Return ``df`` with exactly the schema's columns first (in order) at their dtypes.

    Missing nullable columns are added as nulls; extra columns (added by analyses) are kept
    after them, or dropped with ``extra=False``. Columns absent when all null (:class:`Schema`)
    are left out where ``df`` lacks them or holds only nulls there, unless ``whole`` (every
    column, as a CSV file has them). Columns already at their dtype are not copied (the frame
    shares their data with ``df``; pandas' copy-on-write keeps the two apart).
    """
    n = len(df)
    if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
        df = df.reset_index(drop=True)
    have = set(df.columns)
    sparse = frozenset() if whole else absent_when_null(schema)
    gone = {c for c in sparse if c not in have or all_null(df[c])}
    target = [c for c in schema if c not in gone]
    names = [c for c in target if c in have]
    dtypes = dict(zip(df.columns, df.dtypes))  # one pass: a column looked up by name costs more than its dtype
    cast = {c: schema[c] for c in names
            if (not _canonical(df[c]) if schema[c] == CAT else str(dtypes[c]) != schema[c])}
    for col, dtype in schema.items():
        if col not in have and n and dtype in REQUIRED:
            raise ValueError(f"column {col!r} ({dtype}) is required and has no value")
    extras = [c for c in df.columns if c not in schema] if extra else []
    if not cast and len(names) == len(target) and list(df.columns) == [*names, *extras]:
        return df.copy(deep=False)  # the common case: already conformed
    out = {}
    for col in target:
        dtype = schema[col]
        if col in have:
            s = df[col]
            out[col] = (categorical(s) if dtype == CAT else s.astype(dtype)) if col in cast else s
        else:
            out[col] = nulls(n, dtype)
    for col in extras:
        out[col] = df[col]
    return pd.DataFrame(out, copy=False)
