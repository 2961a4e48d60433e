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

import pandas as pd

from .errors import MANIFEST, RunLoadError  # noqa: F401  (re-exported)
from . import schema
from .columns import INT_RANGE, REQUIRED


_INT_KINDS = ("int64", "Int64", "int32", "Int32")
_TEXT_KINDS = (schema.STR, schema.CAT)


def _bad(f: Path, col: str, problem: str) -> RunLoadError:
    return RunLoadError(f"{f}: column {col!r} {problem}; the file is corrupt or was not written by probe")


def check_manifest(manifest: object, name: str, data: bytes, f: Path, meta_file: Path) -> None:
    """``data`` (the bytes of file ``name``) matches the size and SHA-256 that ``meta.json`` lists."""
    entry = manifest.get("files", {}).get(name) if isinstance(manifest, dict) else None
    if not isinstance(entry, dict):
        raise RunLoadError(f"{meta_file} has a manifest without {name}: the file is corrupt")
    want = entry.get("bytes")
    if isinstance(want, int) and len(data) < want:
        raise RunLoadError(f"{f} is corrupt, truncated or half-written: {len(data):,} bytes where {meta_file} lists "
                           f"{want:,}; re-record the run")
    if want != len(data) or entry.get("sha256") != hashlib.sha256(data).hexdigest():
        raise RunLoadError(
            f"{f} does not match {meta_file} (its size or SHA-256 differs from the manifest's): the folder mixes "
            "files of two saves (an interrupted save?) or was edited; re-record the run"
        )


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


def check_frame(data: bytes, key: str, f: Path, columns: tuple[str, ...] | None = None,
                rows=None) -> pd.DataFrame:
    """Parse the parquet bytes of frame ``key`` (``calls``/``steps``/``runs``), check every
    schema column, and return the conformed frame.

    ``columns`` (schema columns) narrows what is read and returned to those columns; ``rows`` (a
    ``pyarrow.compute.Expression``) keeps the rows it selects, applied in Arrow as the file is read.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sch = schema.FRAMES[key]
    if columns is not None:
        sch = sch.narrowed(columns) if isinstance(sch, schema.Schema) else {c: t for c, t in sch.items()
                                                                           if c in set(columns)}
    try:
        # text columns read as dictionaries: parquet stores them so, and their few distinct values
        # are checked once each; categorical ones stay dictionaries into pandas (to_frame)
        names = pq.read_schema(io.BytesIO(data)).names
        texts = [c for c in names if sch.get(c) in _TEXT_KINDS]
        read = None if columns is None else [c for c in names if c in sch]
        if rows is None:  # the file's reader gives one chunk per row group: pandas then takes columns without a copy
            table = pq.ParquetFile(io.BytesIO(data), read_dictionary=texts).read(columns=read, use_pandas_metadata=False)
        else:  # rows filtered in Arrow as they are read
            table = pq.read_table(io.BytesIO(data), columns=read, read_dictionary=texts, filters=rows)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunLoadError(f"{f} is corrupt or half-written: {exc}") from exc
    pa.default_memory_pool().release_unused()  # the reader's scratch buffers: not held while pandas converts
    names = table.column_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RunLoadError(f"{f} has columns {dupes} more than once; the file is corrupt")
    # Columns added to the schema later are nullable: an older run gets them as nulls.
    missing = [c for c in sch if c not in names and sch[c] not in schema.NULLABLE]
    if missing:
        raise RunLoadError(f"{f} lacks columns {missing}: saved by an older or foreign schema")
    arr = None
    for col, dtype in sch.items():
        if col not in names:
            continue
        arr = table.column(col)
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
    _check_values(table, key, f)
    handed = [table]
    del table, arr  # to_frame holds the only reference: what it has converted is freed as it goes
    try:
        return to_frame(handed, sch)
    except Exception as exc:  # a type the checks above let through and pandas refuses
        raise RunLoadError(f"{f} cannot be read as the {key} frame: {type(exc).__name__}: {exc}") from exc


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


def to_frame(table, sch: dict[str, str]) -> pd.DataFrame:
    """The Arrow ``table`` as a pandas frame at the dtypes of ``sch`` (see :func:`probe.schema.conform`):
    every column cast once in Arrow (missing nullable ones added as nulls, extra ones kept after),
    then one conversion to pandas that copies no column twice and frees each converted column's
    Arrow buffers as it goes where nothing else holds them (``self_destruct``). Pass the table in a
    one-item list to hand it over: a caller's reference (an argument is one until the call
    returns) would keep every buffer alive to the end."""
    import pyarrow as pa

    if isinstance(table, list):
        table = table.pop()
    n = table.num_rows
    names = table.column_names
    # columns absent when all null are left out (an older run saved them as nulls)
    gone = {c for c in schema.absent_when_null(sch) if c not in names or table.column(c).null_count == n}
    if gone:
        sch = sch.narrowed(c for c in sch if c not in gone)
    cols, fields, arr = [], [], None
    for col, dtype in sch.items():
        t = getattr(pa, _ARROW[dtype])()
        if dtype == schema.CAT:  # kept a dictionary: pandas makes a categorical of it (conform sorts it)
            t = pa.dictionary(pa.int32(), t)
        if col in names:
            arr = table.column(col)
            if pa.types.is_dictionary(arr.type) and dtype != schema.STR and dtype != schema.CAT:
                arr = arr.cast(arr.type.value_type)  # not as parquet writes them
            if dtype == schema.CAT:
                if not pa.types.is_dictionary(arr.type):
                    arr = arr.cast(pa.large_string()).dictionary_encode()
                t = arr.type  # its dictionary as parquet gave it: nothing decoded
            cols.append(arr if arr.type == t else arr.cast(t))  # STR dictionaries are decoded here
        elif n and dtype in REQUIRED:
            raise ValueError(f"column {col!r} ({dtype}) is required and has no value")
        elif dtype == schema.CAT:
            cols.append(pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.large_string())))
        else:
            cols.append(pa.nulls(n, t))
        fields.append(pa.field(col, t))
    extras = [c for c in names if c not in sch and c not in gone]
    for col in extras:
        cols.append(table.column(col))
        fields.append(pa.field(col, table.column(col).type))
    out = pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=_pandas_meta(tuple(sch.items()))))
    del table, cols, arr
    df = out.to_pandas(split_blocks=True, self_destruct=True)
    del out
    # the Arrow buffers pandas did not take are free now: hand their pages back to the system, so
    # that what the load builds next (its checks of the rows) does not stack on top of them
    pa.default_memory_pool().release_unused()
    return schema.conform(df, sch)


def _unique_text(table, col: str) -> list[str]:
    """The distinct non-null values of text column ``col`` (none if the column is absent):
    shapes repeat across calls, so a million rows hold a few hundred distinct values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if col not in table.column_names:
        return []
    arr = table.column(col)
    if pa.types.is_dictionary(arr.type):  # the values the rows use, from each chunk's dictionary
        used: dict = {}
        for chunk in arr.chunks:
            used.update(dict.fromkeys(chunk.dictionary.take(pc.unique(chunk.indices).drop_null()).to_pylist()))
        return [v for v in used if v is not None]
    return [v for v in pc.unique(arr).to_pylist() if v is not None]


def _check_values(table, key: str, f: Path) -> None:
    """The values reports parse or look up: shapes JSON, phases, roles, JSON columns of runs."""
    bad = [v for v in _unique_text(table, "phase") if v not in schema.PHASES]
    if bad:
        raise _bad(f, "phase", f"holds unknown phases {_show(bad)} (known: {', '.join(schema.PHASES)})")
    if key == "calls":
        bad = [v for v in _unique_text(table, "role") if v not in schema.ROLES]
        if bad:
            raise _bad(f, "role", f"holds unknown roles {_show(bad)} (known: {', '.join(schema.ROLES)})")
        for col in ("in_shapes", "out_shapes"):
            for v in _unique_text(table, col):
                if not _is_shapes(v):
                    raise _bad(f, col, f"holds {_show([v])}, not a JSON list of shapes such as [[1, 7, 64]]")
    if key == "runs":
        for v in _unique_text(table, "prompt_tokens_real"):
            got = _json(v)
            if not (isinstance(got, list) and all(_is_int(x) for x in got)):
                raise _bad(f, "prompt_tokens_real", f"holds {_show([v])}, not a JSON list of token counts")
        for v in _unique_text(table, "generate_kwargs"):
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

