"""Checks :func:`probe.load` makes on a saved run, so that a run that loads can be reported.

Each frame is checked at the Arrow level before it becomes a pandas frame (the type of every
column against the schema, missing values where none may be, infinities, list-typed columns),
then the values the reports parse (JSON shapes, phases, roles). ``meta.json`` is checked for the
keys the reports read, and against the manifest of sizes and checksums :meth:`Run.save` writes.
Every failure is one :class:`probe.RunLoadError` that names the file, the column and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from .errors import MANIFEST, RunLoadError  # noqa: F401  (re-exported)
from . import schema
from .columns import INT_RANGE, REQUIRED
from . import parquet_read as reading
from .parquet_read import give_back, parquet_file, read_column, source_of


_INT_KINDS = ("int64", "Int64", "int32", "Int32")
_TEXT_KINDS = (schema.STR, schema.CAT)


def _bad(f: Path, col: str, problem: str) -> RunLoadError:
    return RunLoadError(f"{f}: column {col!r} {problem}; the file is corrupt or was not written by probe")


def check_manifest(manifest: object, name: str, data: bytes | BinaryIO, f: Path, meta_file: Path) -> None:
    """``data`` (the bytes of file ``name``, or the file open at its start, where it is left)
    matches the size and SHA-256 that ``meta.json`` lists."""
    entry = manifest.get("files", {}).get(name) if isinstance(manifest, dict) else None
    if not isinstance(entry, dict):
        raise RunLoadError(f"{meta_file} has a manifest without {name}: the file is corrupt")
    size, digest = _size_and_hash(data, f)
    want = entry.get("bytes")
    if isinstance(want, int) and size < want:
        raise RunLoadError(f"{f} is corrupt, truncated or half-written: {size:,} bytes where {meta_file} lists "
                           f"{want:,}; re-record the run")
    if want != size or entry.get("sha256") != digest:
        raise RunLoadError(
            f"{f} does not match {meta_file} (its size or SHA-256 differs from the manifest's): the folder mixes "
            "files of two saves (an interrupted save?) or was edited; re-record the run"
        )


def _size_and_hash(data: bytes | BinaryIO, f: Path) -> tuple[int, str]:
    """Size and SHA-256 of bytes, or of an open file read in blocks (not held whole in memory)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data), hashlib.sha256(data).hexdigest()
    h, size = hashlib.sha256(), 0
    try:
        data.seek(0)
        while block := data.read(1 << 20):
            h.update(block)
            size += len(block)
        data.seek(0)
    except OSError as exc:
        raise RunLoadError(f"{f} cannot be read: {exc.strerror or exc}") from exc
    return size, h.hexdigest()


def check_meta(meta: dict, f: Path) -> None:
    """The keys of ``meta.json`` that the library and the reports read have usable types."""
    def need(key: str, ok: bool, what: str) -> None:
        if key in meta and meta[key] is not None and not ok:
            raise RunLoadError(f"{f}: {key!r} must be {what}, not {type(meta[key]).__name__}; the file is corrupt")

    rank = meta.get("rank")
    need("rank", isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0, "a rank number")
    need("prompt", isinstance(meta.get("prompt"), str), "text")
    need("command", isinstance(meta.get("command"), str), "text")
    need("probe_version", isinstance(meta.get("probe_version"), str), "text")
    need("config", isinstance(meta.get("config"), dict), "a JSON object")
    need("peaks", isinstance(meta.get("peaks"), dict), "a JSON object")
    need(MANIFEST, isinstance(meta.get(MANIFEST), dict), "a JSON object")


def check_frame(data: bytes | BinaryIO, key: str, f: Path, columns: tuple[str, ...] | None = None,
                rows=None) -> pd.DataFrame:
    """Parse the parquet bytes (or open file) of frame ``key`` (``calls``/``steps``/``runs``),
    check every schema column, and return the conformed frame.

    ``columns`` (schema columns) narrows what is read and returned to those columns; ``rows`` (a
    ``pyarrow.compute.Expression``) keeps the rows it selects, applied in Arrow as the file is read.

    A whole file is read one column at a time, each checked and converted to pandas before the
    next is decoded: the load's peak memory is the frame plus one column, not the frame plus the
    whole decoded file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sch = schema.FRAMES[key]
    if columns is not None:
        sch = sch.narrowed(columns) if isinstance(sch, schema.Schema) else {c: t for c, t in sch.items()
                                                                           if c in set(columns)}
    try:
        # text columns read as dictionaries: parquet stores them so, and their few distinct values
        # are checked once each; categorical ones stay dictionaries into pandas (_to_pandas)
        names = pq.read_schema(source_of(data)).names
        texts = [c for c in names if sch.get(c) in _TEXT_KINDS]
        read = None if columns is None else [c for c in names if c in sch]
        if rows is not None:  # rows filtered in Arrow as they are read
            source = pq.read_table(source_of(data), columns=read, read_dictionary=texts, filters=rows)
        else:
            source = parquet_file(source_of(data), texts)
            if source.metadata.num_rows < reading.COLUMNWISE_ROWS:  # small: one read (one chunk per row group)
                source = source.read(columns=read, use_pandas_metadata=False)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunLoadError(f"{f} is corrupt or half-written: {exc}") from exc
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RunLoadError(f"{f} has columns {dupes} more than once; the file is corrupt")
    # Columns added to the schema later are nullable: an older run gets them as nulls.
    missing = [c for c in sch if c not in names and sch[c] not in schema.NULLABLE]
    if missing:
        raise RunLoadError(f"{f} lacks columns {missing}: saved by an older or foreign schema")
    columnwise = isinstance(source, pq.ParquetFile)
    n = source.metadata.num_rows if columnwise else source.num_rows
    sparse = schema.absent_when_null(sch)
    got: dict[str, pd.Series] = {}  # columns converted one by one (a large file)
    cast: dict[str, tuple] = {}  # or cast in Arrow, converted together (a small one)
    arr = None
    try:
        for col in names:
            if col not in sch and columns is not None:
                continue
            arr = read_column(source, col, f)
            dtype = sch.get(col)
            if dtype is not None:
                _check_column(arr, col, dtype, f)
            _check_values(arr, col, key, f)
            if col in sparse and arr.null_count == n:  # absent when all null (an older run saved the nulls)
                continue
            arr = _arrow_column(arr, dtype)
            if columnwise:
                handed = [arr]
                del arr  # _to_pandas holds the only reference: the Arrow buffers go as it converts
                got[col] = _to_pandas(handed, col, dtype)
            else:
                cast[col] = (arr, dtype)
        source = arr = None  # the file's reader and last column: not held while pandas converts
        if columnwise:
            # the Arrow buffers pandas did not take are free now: hand their pages back to the
            # system, so that what the load builds next (its checks of the rows) does not stack on them
            give_back()
            df = _frame(got, n)
        else:
            df = _table_to_pandas(cast, n)
        return schema.conform(df, sch)
    except RunLoadError:
        raise
    except Exception as exc:  # a type the checks above let through and pandas refuses
        raise RunLoadError(f"{f} cannot be read as the {key} frame: {type(exc).__name__}: {exc}") from exc


def _frame(got: dict[str, pd.Series], n: int) -> pd.DataFrame:
    """The converted columns as one frame, sharing their data (no copy, no consolidation)."""
    if not got:
        return pd.DataFrame(index=pd.RangeIndex(n))
    return pd.DataFrame(got, copy=False)


def _check_column(arr, col: str, dtype: str, f: Path) -> None:
    """Column ``col`` (an Arrow chunked array) holds values of the schema's ``dtype``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if dtype in _INT_KINDS:
        if not (pa.types.is_integer(t) or pa.types.is_null(t)):
            raise _bad(f, col, f"holds {t} values where whole numbers belong")
        if dtype in REQUIRED and arr.null_count:
            raise _bad(f, col, f"has {arr.null_count} missing values where every row needs one")
        if pa.types.is_unsigned_integer(t) and len(arr) and pc.max(_plain(arr)).as_py() > 2**63 - 1:
            raise _bad(f, col, "holds numbers too large for int64")
        low_high = INT_RANGE.get(dtype)
        narrow = pa.types.is_integer(t) and t.bit_width < (33 if pa.types.is_signed_integer(t) else 32)
        if low_high and pa.types.is_integer(t) and not narrow and len(arr) > arr.null_count:  # int32 fits
            got = pc.min_max(_plain(arr)).as_py()
            if got["min"] < low_high[0] or got["max"] > low_high[1]:
                raise _bad(f, col, f"holds numbers beyond {dtype} ({got['min']} to {got['max']}), which no "
                                   "recording produces")
    elif dtype == "float64":
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
            raise _bad(f, col, f"holds {t} values where numbers belong")
        if pa.types.is_floating(t) and len(arr):
            inf = pc.sum(pc.is_inf(_plain(arr))).as_py() or 0
            if inf:
                raise _bad(f, col, f"holds {inf} infinite values")
    elif dtype == "boolean":
        if not (pa.types.is_boolean(t) or pa.types.is_null(t)):
            raise _bad(f, col, f"holds {t} values where true/false belongs")
    elif dtype in _TEXT_KINDS:
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise _bad(f, col, f"holds {t} values where text belongs")


def _plain(arr):
    """A dictionary-encoded column as its values (other columns as they are)."""
    import pyarrow as pa

    return arr.cast(arr.type.value_type) if pa.types.is_dictionary(arr.type) else arr


#: the Arrow type each schema dtype is read as, before the one conversion to pandas
_ARROW = {"int64": "int64", "Int64": "int64", "int32": "int32", "Int32": "int32", "float64": "float64",
          "boolean": "bool_", schema.STR: "large_string", schema.CAT: "large_string"}


@functools.lru_cache(maxsize=32)
def _pandas_meta(items: tuple[tuple[str, str], ...]) -> dict:
    """The pandas metadata of an empty frame at these dtypes: with it, Arrow's conversion makes them."""
    import pyarrow as pa

    return pa.Schema.from_pandas(schema.empty(dict(items)), preserve_index=False).metadata


def _arrow_column(arr, dtype: str | None):
    """Column ``arr`` at the Arrow type from which pandas makes schema ``dtype`` (``None``: a
    column the schema lacks, as it is): dictionaries kept for categoricals, decoded for text."""
    import pyarrow as pa

    if dtype is None:
        return arr
    if dtype == schema.CAT:  # kept a dictionary: pandas makes a categorical of it (conform sorts it)
        return arr if pa.types.is_dictionary(arr.type) else arr.cast(pa.large_string()).dictionary_encode()
    if pa.types.is_dictionary(arr.type) and dtype != schema.STR:
        arr = arr.cast(arr.type.value_type)  # not as parquet writes them
    t = getattr(pa, _ARROW[dtype])()
    return arr if arr.type == t else arr.cast(t)  # STR dictionaries are decoded here


def _table_to_pandas(cast: dict[str, tuple], n: int) -> pd.DataFrame:
    """Columns cast by :func:`_arrow_column` as one frame, in one conversion that copies no column
    twice (``split_blocks``) and makes the schema's dtypes from pandas metadata."""
    import pyarrow as pa

    if not cast:
        return pd.DataFrame(index=pd.RangeIndex(n))
    known = tuple((c, d) for c, (_, d) in cast.items() if d is not None)
    fields = [pa.field(c, a.type) for c, (a, _) in cast.items()]
    table = pa.Table.from_arrays([a for a, _ in cast.values()], schema=pa.schema(fields, metadata=_pandas_meta(known)))
    cast.clear()
    return table.to_pandas(split_blocks=True, self_destruct=True)


def _to_pandas(handed: list, col: str, dtype: str | None) -> pd.Series:
    """One column cast by :func:`_arrow_column` as a pandas series at schema ``dtype``, converted
    as Arrow's table conversion converts a column of that dtype: numbers without nulls shared
    with Arrow, not copied; nullable integers with their values shared too (pandas' own
    conversion copies them); dictionaries as categoricals. Pass the column in a one-item list to
    hand it over: a caller's reference would keep its buffers alive to the end."""
    arr = handed.pop()
    if dtype is None or dtype == schema.CAT:
        return arr.to_pandas().rename(col)
    if dtype in _PLAIN:  # numpy: shared with Arrow where one chunk holds no null
        values = arr.chunk(0).to_numpy(zero_copy_only=False) if arr.num_chunks == 1 else arr.to_numpy()
        return pd.Series(values, name=col, copy=False)
    if dtype in ("Int32", "Int64") and arr.num_chunks == 1:
        return pd.Series(_masked_ints(arr.chunk(0), dtype), name=col, copy=False)
    return pd.Series(pd.api.types.pandas_dtype(dtype).__from_arrow__(arr), name=col, copy=False)


#: schema dtypes held in plain numpy arrays
_PLAIN = ("float64", "int64", "int32")


def _masked_ints(chunk, dtype: str):
    """A nullable integer column of one Arrow chunk as pandas' masked array, its values shared with
    Arrow (pandas' own conversion copies them): only the mask is made."""
    import numpy as np

    n = len(chunk)
    data = chunk.buffers()[1]
    if data is None:  # all null, no values stored
        values = np.zeros(n, dtype=dtype.lower())
    else:
        values = np.frombuffer(data, dtype=dtype.lower())[chunk.offset:chunk.offset + n]
    if chunk.null_count:
        mask = chunk.is_null().to_numpy(zero_copy_only=False)
    else:
        mask = np.zeros(n, dtype=bool)
    return pd.arrays.IntegerArray(values, mask, copy=False)


def _unique_text(arr) -> list[str]:
    """The distinct non-null values of a text column: shapes repeat across calls, so a million
    rows hold a few hundred distinct values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):  # the values the rows use, from each chunk's dictionary
        used: dict = {}
        for chunk in arr.chunks:
            used.update(dict.fromkeys(chunk.dictionary.take(pc.unique(chunk.indices).drop_null()).to_pylist()))
        return [v for v in used if v is not None]
    return [v for v in pc.unique(arr).to_pylist() if v is not None]


def _check_values(arr, col: str, key: str, f: Path) -> None:
    """The values of column ``col`` that reports parse or look up: shapes JSON, phases, roles, the
    JSON columns of runs."""
    if col == "phase":
        bad = [v for v in _unique_text(arr) if v not in schema.PHASES]
        if bad:
            raise _bad(f, "phase", f"holds unknown phases {_show(bad)} (known: {', '.join(schema.PHASES)})")
    elif key == "calls" and col == "role":
        bad = [v for v in _unique_text(arr) if v not in schema.ROLES]
        if bad:
            raise _bad(f, "role", f"holds unknown roles {_show(bad)} (known: {', '.join(schema.ROLES)})")
    elif key == "calls" and col in ("in_shapes", "out_shapes"):
        for v in _unique_text(arr):
            if not _is_shapes(v):
                raise _bad(f, col, f"holds {_show([v])}, not a JSON list of shapes such as [[1, 7, 64]]")
    elif key == "runs" and col == "prompt_tokens_real":
        for v in _unique_text(arr):
            got = _json(v)
            if not (isinstance(got, list) and all(_is_int(x) for x in got)):
                raise _bad(f, "prompt_tokens_real", f"holds {_show([v])}, not a JSON list of token counts")
    elif key == "runs" and col == "generate_kwargs":
        for v in _unique_text(arr):
            if not isinstance(_json(v), dict):
                raise _bad(f, "generate_kwargs", f"holds {_show([v])}, not a JSON object")


_MISSING = object()


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shapes(text: str) -> bool:
    got = _json(text)
    return isinstance(got, list) and all(
        isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in got)


def _show(values: list[str], n: int = 3, width: int = 60) -> str:
    def one(v: str) -> str:
        return repr(v if len(v) <= width else v[:width] + "...")

    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(one(v) for v in values[:n]) + more


