"""What a folder on disk is: a probe run, the ranks of a tensor-parallel run, a sweep, a comparison.

A folder is a run only if its ``meta.json`` says so (a schema version and a manifest of its
files): a user's folder that happens to hold a ``meta.json`` is not one, and no command replaces
it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .files import META, is_run_meta, read_meta

#: the files that make a folder a `probe sweep` (see :mod:`probe.routines.sweep`)
SWEEP_FILE = "sweep.parquet"
SWEEP_META = "sweep.json"

_RANK_RE = re.compile(r"rank([0-9]{1,6})")  # ASCII digits only: "rank٣" is no rank


def rank_of(name: str) -> int | None:
    """The rank a folder named ``rank<N>`` holds (ASCII digits), else ``None``."""
    m = _RANK_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def rank_dirs(root: Path) -> list[Path]:
    """The tensor-parallel rank folders of ``root`` (``rank<digits>`` exactly, each holding
    ``meta.json``), by rank number."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        rank = rank_of(e.name)
        if rank is not None and e.is_dir() and (Path(e.path) / META).is_file():
            out.append((rank, Path(e.path)))
    return [d for _, d in sorted(out)]


def is_run_dir(d: Path) -> bool:
    """``d`` holds a saved run (its ``meta.json`` has a schema version and a manifest), or the
    ranks of one (``rank<N>/meta.json``)."""
    return is_run_meta(read_meta(d)) or bool(rank_dirs(d))
