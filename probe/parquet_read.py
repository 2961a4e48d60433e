"""Reading a large parquet file with a bounded peak of memory: one column at a time, decoded into
a pool that reuses the freed decoding buffers, and freed pages handed back to the system.

:func:`probe.load` (through :mod:`probe.validate`) reads a file of at least
:data:`COLUMNWISE_ROWS` rows column by column, converting each to pandas before the next is
decoded, so that its peak is the frame plus about one column, not the frame plus the whole
decoded file (``benchmarks/analysis_scale.py`` measures it: at most 1.3x the loaded frames).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import BinaryIO

from .errors import RunLoadError


#: rows from which a file is read one column at a time (below, one read costs less time and
#: the memory is small)
COLUMNWISE_ROWS = 100_000


_POOL_LOCK = threading.Lock()


def source_of(data: bytes | BinaryIO):
    """What pyarrow reads: bytes without a copy, or the open file from its start."""
    import pyarrow as pa

    if isinstance(data, (bytes, bytearray, memoryview)):
        return pa.BufferReader(data)
    data.seek(0)
    return data


def parquet_file(source, texts: list[str]):
    """A reader of the parquet ``source`` (columns ``texts`` as dictionaries) that decodes into
    :func:`reading_pool`. The reader takes its pool when made: Arrow's default is switched for
    that moment only, under a lock."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _POOL_LOCK:
        before = pa.default_memory_pool()
        pa.set_memory_pool(reading_pool())
        try:
            return pq.ParquetFile(source, read_dictionary=texts)
        finally:
            pa.set_memory_pool(before)


@functools.lru_cache(maxsize=1)
def reading_pool():
    """The memory pool a large file is decoded into: jemalloc where pyarrow has it, else the C
    heap (``malloc``). A load decodes one column after another and keeps most of each (numbers
    are shared with pandas); Arrow's default pool (mimalloc) keeps the freed decoding buffers'
    pages beside them, which added 0.2x the frame to the load's peak (1.5x -> 1.3x the frames
    at a million calls, ``benchmarks/analysis_scale.py``); jemalloc reuses them at no cost in
    time, where ``malloc`` costs page faults (load 1.3x -> 1.6x pyarrow's read)."""
    import pyarrow as pa

    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it
        return pa.system_memory_pool()


def give_back() -> None:
    """Hand the pages of freed memory back to the system: Arrow's pools' (the default one and the
    one large files are read into), and the C heap's (glibc keeps freed blocks of a few MB for
    reuse, so a load's temporaries would add up in the peak)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    reading_pool().release_unused()
    if _trim is not None:
        _trim(0)


def _malloc_trim():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; a libc without it (musl) returns memory itself
    except (OSError, AttributeError):
        return None


_trim = _malloc_trim()


def read_column(source, col: str, f: Path):
    """Column ``col`` of a ``ParquetFile`` (decoded now, one chunk per row group) or of a table."""
    if not hasattr(source, "read"):  # a table read whole
        return source.column(col)
    try:
        return source.read(columns=[col], use_pandas_metadata=False).column(0)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunLoadError(f"{f} is corrupt or half-written: {exc}") from exc
