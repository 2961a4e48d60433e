"""What a folder on disk is: a probe run, the ranks of a tensor-parallel run, a sweep, a comparison.

A folder is a run only if its ``meta.json`` says so (a schema version and a manifest of its
files): a user's folder that happens to hold a ``meta.json`` is not one, and no command replaces
it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import RunSaveError
from .files import META, TMP, TRASH, is_run_meta, read_meta, reason

#: the files that make a folder a `probe sweep` (see :mod:`probe.routines.sweep`)
SWEEP_FILE = "sweep.parquet"
SWEEP_META = "sweep.json"

_RANK_RE = re.compile(r"rank([0-9]{1,6})")  # ASCII digits only: "rank٣" is no rank


def rank_of(name: str) -> int | None:
    """The rank a folder named ``rank<N>`` holds (ASCII digits), else ``None``."""
    m = _RANK_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def marks_rank(meta: dict | None) -> bool:
    """A rank folder's ``meta.json`` marks it as a rank of a tensor-parallel run: it has the
    ``world_size`` :func:`probe.save_rank` writes (loading then checks that its ``rank`` is the
    folder's) — or it cannot be read, so that loading names the damage rather than the folder
    passing for something else."""
    if meta is None:
        return True
    size = meta.get("world_size")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 1


def rank_dirs(root: Path) -> list[Path]:
    """The tensor-parallel rank folders of ``root``, by rank number: named ``rank<digits>``
    exactly and marked as a rank in their ``meta.json`` (an ordinary run in a folder that
    happens to be called ``rank3`` is not one)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        rank = rank_of(e.name)
        if rank is not None and e.is_dir() and (Path(e.path) / META).is_file() \
                and marks_rank(read_meta(Path(e.path))):
            out.append((rank, Path(e.path)))
    return [d for _, d in sorted(out)]


def is_run_dir(d: Path) -> bool:
    """``d`` holds a saved run (its ``meta.json`` has a schema version and a manifest), or the
    ranks of one (``rank<N>/meta.json``)."""
    return is_run_meta(read_meta(d)) or bool(rank_dirs(d))


def check_save_target(out: Path) -> None:
    """Refuse to save a run at ``out`` where it would replace a file or a folder that is not a run."""
    if out.exists() and not out.is_dir():
        raise RunSaveError(f"{out} is a file, not a folder; choose a folder for the run")
    if out.is_dir() and not is_run_dir(out):
        try:
            entries = [e for e in os.listdir(out)
                       if not (e.startswith(".") and (e.endswith(TMP) or e.endswith(TRASH)))]
        except OSError as exc:
            raise RunSaveError(f"cannot read the folder {out}: {reason(exc)}") from exc
        if entries:
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunSaveError(f"{out} holds files that are not a probe run ({shown}); a run is saved only into "
                               "a new or empty folder, or over another run")
