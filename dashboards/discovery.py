"""What a runs folder holds, for the dashboard's sidebar: the run, sweep and comparison folders a
scan finds (and the other folders, named), the run to open first, and the picks kept across reruns.

Free of Streamlit, like :mod:`dashboards.data`, which loads what is found here (and re-exports
these names). A scan lists folders and peeks at ``meta.json`` files: nothing is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import probe
from probe.store.files import MAX_META_BYTES, META, read_regular
from probe.store.folders import rank_dirs
from probe.store.outdir import COMPARE_META

log = logging.getLogger(__name__)

#: deepest folder level below the runs folder searched for run directories (e.g. sweeps)
MAX_SCAN_DEPTH = 2
#: the folder of a sweep that holds its runs (``probe sweep --out DIR`` writes ``DIR/runs/p{P}-b{B}/``)
SWEEP_RUNS = "runs"
#: what ``probe compare --out DIR`` writes beside ``compare.json`` (reports.compare)
COMPARE_HTML, COMPARE_SIG = "compare.html", "significance.csv"


@dataclass(frozen=True)
class Found:
    """What a scan of the runs folder found.

    Attributes:
        runs: run name (path relative to the runs folder, ``.`` for the folder itself) ->
            directory, for every folder that is a run (a ``meta.json`` with a schema version),
            whether or not it loads.
        sweeps: sweep name (path relative to the runs folder, ``.`` for the folder itself) ->
            directory, for every folder written by ``probe sweep --out``.
        comparisons: name -> directory, for every folder written by ``probe compare --out``.
        others: names of the top-level folders that are none of these (listed, never as errors).
        message: why nothing is listed (missing folder, not a folder, empty), else None.
    """

    runs: dict[str, Path] = field(default_factory=dict)
    sweeps: dict[str, Path] = field(default_factory=dict)
    comparisons: dict[str, Path] = field(default_factory=dict)
    others: tuple[str, ...] = ()
    message: str | None = None


#: :func:`_is_run_meta` of each ``meta.json`` seen, by path and the file's stat (a file written again
#: has another): a rerun over 500 runs no longer parses 500 files (50 ms a click)
_SEEN: dict[tuple, bool] = {}
#: files remembered at most (the memory is dropped whole past this)
SEEN_MAX = 100_000


def _is_run_meta(f: Path) -> bool:
    """``f`` is a probe run's ``meta.json``: a regular file holding a ``schema_version``, or one
    that cannot be parsed (a damaged run is reported, not hidden); another tool's JSON is not.
    Decided once per version of the file (its path, inode, size, mtime and ctime)."""
    try:
        st = os.stat(f)
    except OSError:
        return _read_run_meta(f)
    key = (str(f), st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
    got = _SEEN.get(key)
    if got is None:
        if len(_SEEN) >= SEEN_MAX:
            _SEEN.clear()
        got = _SEEN[key] = _read_run_meta(f)
    return got


def _read_run_meta(f: Path) -> bool:
    """:func:`_is_run_meta`, read from the file."""
    try:
        if not f.is_file():  # a FIFO or a folder by that name is never opened
            return False
        raw = read_regular(f, limit=MAX_META_BYTES)
    except (OSError, probe.RunLoadError):
        return True  # there, but unreadable: load names the problem
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return True
    return not isinstance(meta, dict) or "schema_version" in meta


def _is_run_dir(d: Path) -> bool:
    # a folder merely named like a rank ("ranking-test") is no tensor-parallel rank
    return _is_run_meta(d / META) or bool(rank_dirs(d))


def _is_compare_dir(d: Path) -> bool:
    """``d`` was written by ``probe compare``: its ``compare.json``, or (written before that file
    existed) its ``compare.html`` and ``significance.csv``."""
    return (d / COMPARE_META).is_file() or ((d / COMPARE_HTML).is_file() and (d / COMPARE_SIG).is_file())


def _is_sweep_dir(d: Path) -> bool:
    from probe.routines.sweep import SWEEP_FILE

    return (d / SWEEP_FILE).is_file()


def _children(d: Path) -> list[Path]:
    """Visible sub-folders of ``d``, sorted; none (and a log line) when it cannot be listed."""
    try:  # scandir's entries know their type: one system call per folder, not per child
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if not e.name.startswith((".", "_")) and e.is_dir())
        return [d / n for n in names]
    except OSError as exc:
        log.warning("cannot list %s: %s", d, exc)
        return []


def discover(runs_dir: str | os.PathLike) -> Found:
    """Find run directories and sweeps under ``runs_dir``.

    A folder holding a probe ``meta.json`` (one with a ``schema_version``; or ``rank*/meta.json``)
    is a run, whether or not it loads; so is the runs folder itself. A folder holding
    ``sweep.parquet`` is a sweep: its runs (``runs/p{P}-b{B}/``) are listed as ordinary runs
    under their relative path, and nothing else in it is looked at (its ``csv/`` is no run). A
    folder written by ``probe compare`` is a comparison. Every other direct sub-folder that
    holds none of these further down is named in :attr:`Found.others`.

    Args:
        runs_dir: the folder of runs.

    Returns:
        :class:`Found`, runs and sweeps sorted by name.
    """
    root = Path(runs_dir).expanduser()
    hint = f"record one with `probe run --out {root}/NAME` (or `probe run --out {root}/NAME MODEL_DIR`)"
    if not root.exists():
        return Found(message=f"The runs folder {root} does not exist. {hint[0].upper()}{hint[1:]}.")
    if not root.is_dir():
        return Found(message=f"{root} is a file, not a folder of runs. Pass the folder that holds run directories.")
    if _is_run_dir(root):
        return Found(runs={".": root})
    if _is_compare_dir(root):
        return Found(comparisons={".": root})
    found: dict[str, Path] = {}
    sweeps: dict[str, Path] = {}
    comparisons: dict[str, Path] = {}
    others: list[str] = []

    def name(d: Path) -> str:
        return d.relative_to(root).as_posix()

    def add_sweep(d: Path) -> None:
        """Record the sweep ``d`` and list its runs (a config that failed has no folder)."""
        sweeps[name(d)] = d
        for c in _children(d / SWEEP_RUNS) if (d / SWEEP_RUNS).is_dir() else []:
            if _is_run_dir(c):
                found[name(c)] = c

    def scan(d: Path, level: int) -> bool:
        """Add the runs under ``d``; True when any run or sweep was found."""
        any_run = False
        for c in _children(d):
            if _is_run_dir(c):
                found[name(c)] = c
                any_run = True
            elif _is_sweep_dir(c):
                add_sweep(c)  # its folder is no "bad run", even when every config failed
                any_run = True
            elif _is_compare_dir(c):
                comparisons[name(c)] = c
                any_run = True
            elif level < MAX_SCAN_DEPTH and scan(c, level + 1):
                any_run = True
            elif level == 1:
                others.append(name(c))  # a user's folder, a half-copied run: named, never an error
        return any_run

    if _is_sweep_dir(root):
        add_sweep(root)
    else:
        scan(root, 1)
    if not found and not sweeps and not comparisons:
        other = f" (other folders there: {', '.join(sorted(others))})" if others else ""
        return Found(others=tuple(sorted(others)),
                     message=f"The runs folder {root} holds no runs yet{other}. {hint[0].upper()}{hint[1:]}.")
    return Found(runs=dict(sorted(found.items())), sweeps=dict(sorted(sweeps.items())),
                 comparisons=dict(sorted(comparisons.items())), others=tuple(sorted(others)))


def keep_selection(current: list[str] | None, previous_options: list[str] | None, options: list[str],
                   default: list[str]) -> list[str]:
    """The runs picked after a rerun, given the picks before it and the runs offered then and now.

    The first time (nothing picked yet): ``default``. After that the user's picks stay as they
    are: runs that landed since are offered but never added, runs that are gone are dropped, and
    only when none of the picks is left (another folder, the runs deleted) is it ``default`` again.
    An empty selection the user made stays empty.
    """
    if current is None or previous_options is None:
        return list(default)
    kept = [v for v in current if v in options]
    if not kept and current:
        return list(default)
    return kept


def newest(found: Found, names: list[str]) -> str | None:
    """The run the dashboard opens on: of ``names``, the most recently written top-level run (a
    sweep's configurations count only when there is nothing else), by its ``meta.json`` time.
    """
    def inside_sweep(name: str) -> bool:
        return any(name == sw or name.startswith(sw.rstrip("/") + "/") or sw == "." for sw in found.sweeps)

    def written(name: str) -> float:
        d = found.runs.get(name)
        try:
            metas = [d / META] if (d / META).exists() else list(d.glob(f"rank*/{META}"))
            return max(m.stat().st_mtime for m in metas)
        except (OSError, ValueError, TypeError):
            return float("-inf")

    pool = [n for n in names if not inside_sweep(n)] or list(names)
    return max(pool, key=lambda n: (written(n), n)) if pool else None
