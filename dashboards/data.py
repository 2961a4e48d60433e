"""Loading, filtering and aggregating saved runs for the dashboard (pandas only, no Streamlit).

The app wraps these in Streamlit caches; keeping them free of Streamlit lets the benchmark and
the tests time and check them directly. Nothing here touches a model: runs come from
:func:`probe.load`, found in the runs folder by :mod:`dashboards.discovery`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import probe
from probe import schema
from probe.analysis.phase_cut import phase_subset
from probe.analysis.run import FILES
from probe.reports.tables import ranks
from probe.store.files import MAX_META_BYTES, META, read_regular
from probe.store.folders import rank_dirs
from probe.errors import MANIFEST
from probe.store.outdir import COMPARE_META
from probe.columns import ranked

from .discovery import (  # noqa: F401  (the runs folder's listing: part of this module's API)
    COMPARE_HTML, COMPARE_SIG, MAX_SCAN_DEPTH, SWEEP_RUNS, Found, discover, keep_selection, newest)

#: rows the Data view shows per page (the full table is a download, built on click)
PAGE_ROWS = 500


@dataclass(frozen=True)
class Comparison:
    """A folder written by ``probe compare``, as read back.

    Attributes:
        path: the folder.
        meta: its ``compare.json`` (``a``/``b``: ``path``, ``resolved``, ``run_ids``; ``written``),
            empty for a comparison written before that file existed.
        significance: ``significance.csv`` at the :data:`probe.schema.SIGNIFICANCE` dtypes.
        html: ``compare.html`` if it is there.
    """

    path: Path
    meta: dict
    significance: pd.DataFrame
    html: Path | None


def comparison_signature(d: str | os.PathLike) -> tuple:
    """(file name, mtime_ns, size) of a comparison's files: its cache key."""
    out = []
    for f in (COMPARE_META, COMPARE_SIG, COMPARE_HTML):
        try:
            st = (Path(d) / f).stat()
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    return tuple(out)


def read_comparison(d: str | os.PathLike) -> Comparison:
    """Read a ``probe compare`` folder.

    Raises:
        ValueError: ``significance.csv`` or ``compare.json`` is missing or unreadable; the
            message names the file and says how to write it again.
    """
    d = Path(d)
    again = "write it again with `probe compare A B --out " + str(d) + "`"
    meta: dict = {}
    f = d / COMPARE_META
    if f.exists():
        try:
            meta = json.loads(read_regular(f, limit=MAX_META_BYTES).decode("utf-8"))
        except (probe.RunLoadError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{f} cannot be read ({exc}); {again}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{f} is not a JSON object; {again}")
    f = d / COMPARE_SIG
    try:
        raw = read_regular(f)
        sig = pd.read_csv(io.BytesIO(raw), keep_default_na=False, na_values=[""])
        sig = schema.conform(sig, schema.SIGNIFICANCE, extra=False)
    except (probe.RunLoadError, ValueError, TypeError, KeyError, pd.errors.ParserError) as exc:
        raise ValueError(f"{f} cannot be read ({exc}); {again}") from exc
    sig["phase"] = sig["phase"].fillna("")
    html = d / COMPARE_HTML
    return Comparison(path=d, meta=meta, significance=sig, html=html if html.is_file() else None)


def comparison_runs(meta: dict) -> tuple[str, str]:
    """The A and B of a ``compare.json`` as short text (the folder names as given), ``?`` if unknown."""
    def one(side: str) -> str:
        got = meta.get(side) if isinstance(meta.get(side), dict) else {}
        path = got.get("path") or got.get("resolved")
        return Path(str(path)).name or str(path) if path else "?"

    return one("a"), one("b")


def signature(run_dir: str | os.PathLike) -> tuple:
    """(relative path, mtime_ns, size) of the files :func:`probe.load` reads: the cache key.

    A run re-recorded into the same folder changes it, so a cached load is never stale;
    reports written next to the run (``report.html``, ``csv/``) do not count. A few ``stat``
    calls per run (no folder walk), so that hundreds of runs are keyed in milliseconds.
    """
    root = os.fspath(run_dir)
    names = (META, *FILES.values())
    folders = [""]
    if not os.path.exists(os.path.join(root, META)):
        folders += [d.name + "/" for d in rank_dirs(Path(root))]
    out = []
    for rel in folders:
        for n in names:
            try:
                st = os.stat(os.path.join(root, rel + n))
            except OSError:  # missing, or vanished while scanning: part of the key all the same
                continue
            out.append((rel + n, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def sweep_signature(sweep_dir: str | os.PathLike) -> tuple:
    """(file name, mtime_ns, size) of a sweep's ``sweep.parquet`` and ``sweep.json``: its cache key."""
    from probe.routines.sweep import SWEEP_FILE, SWEEP_META

    out = []
    for f in (SWEEP_FILE, SWEEP_META):
        try:
            st = (Path(sweep_dir) / f).stat()
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:  # missing (no sweep.json) or vanished: part of the key all the same
            out.append((f, None, None))
    return tuple(out)


def peek(run_dir: str | os.PathLike) -> str | None:
    """Why the run in ``run_dir`` cannot be loaded, judged from its ``meta.json`` and the sizes of
    its files alone (no frame is read: a folder of hundreds of runs is listed in milliseconds);
    ``None`` where it looks whole. :func:`load_run` checks everything else when the run is picked."""
    root = Path(run_dir)
    if not (root / META).exists() and not (root / META).is_symlink():
        ranks = rank_dirs(root)
        for d in ranks:
            got = peek(d)
            if got is not None:
                return got
        return None if ranks else f"{root / META} is missing: the run is incomplete (an interrupted save?); re-record it"
    meta_file = root / META
    try:
        meta = json.loads(read_regular(meta_file, limit=MAX_META_BYTES).decode("utf-8"))
    except probe.RunLoadError as exc:
        return str(exc)
    except RecursionError:
        return f"{meta_file} is corrupt: JSON nested too deep"
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{meta_file} is corrupt: {exc}"
    if not isinstance(meta, dict):
        return f"{meta_file} is not a JSON object"
    version = meta.get("schema_version")
    if version not in schema.READABLE_VERSIONS:
        return (f"{root} was saved with run schema {version!r}; this probe reads schemas "
                f"{', '.join(map(str, schema.READABLE_VERSIONS))}. Re-record it with this version of probe.")
    manifest = meta.get(MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None if manifest is None and version < 2 else (
            f"{meta_file} has no usable {MANIFEST!r}: the file was edited or damaged; re-record the run")
    for name, entry in files.items():
        want = entry.get("bytes") if isinstance(entry, dict) else None
        try:
            size = os.stat(root / str(name)).st_size
        except OSError:
            return f"{root / str(name)} is missing although {meta_file} lists it: the folder was edited or damaged"
        if isinstance(want, int) and size < want:
            return (f"{root / str(name)} is corrupt, truncated or half-written: {size:,} bytes where {meta_file} "
                    f"lists {want:,}; re-record the run")
        if want != size:
            return (f"{root / str(name)} does not match {meta_file} (its size differs from the manifest's): the "
                    "folder mixes files of two saves (an interrupted save?) or was edited; re-record the run")
    return None


class Loaded(Mapping):
    """The readable runs by name, each loaded on first access (by ``load(name)``, which caches):
    listing them (and :attr:`paths`, their folders) reads no frame. A run that turns out unreadable raises :class:`probe.RunLoadError`."""

    def __init__(self, paths: dict[str, Path], load: Callable[[str], probe.Run]):
        self.paths = dict(paths)  # name -> run folder
        self._names, self._load = list(paths), load

    def __getitem__(self, name: str) -> probe.Run:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_run(run_dir: str | os.PathLike, name: str) -> probe.Run:
    """:func:`probe.load` a run and tag its ``runs`` rows with the run's name (column ``run``).

    Raises:
        probe.RunLoadError: the run cannot be read; every other failure (a frame of the
            right columns but unreadable values) is turned into one, with the reason.
    """
    try:
        run = probe.load(run_dir)
    except probe.RunLoadError:
        raise
    except Exception as exc:  # a malformed file can fail inside pandas/pyarrow in many ways
        raise probe.RunLoadError(f"{run_dir} cannot be read: {type(exc).__name__}: {exc}") from exc
    runs = run.runs.copy()
    runs["run"] = pd.array([name] * len(runs), dtype="string")
    run.runs = runs
    return run


@dataclass(frozen=True)
class Filters:
    """The sidebar's filters; ``None`` means "no filter" for that field."""

    phases: tuple[str, ...] | None = None
    depths: tuple[int, ...] | None = None
    module_types: tuple[str, ...] | None = None
    steps: tuple[int, int] | None = None
    ranks: tuple[int, ...] | None = None  # offered only for runs merged from several ranks


def combine(runs: list[probe.Run]) -> probe.Run:
    """One :class:`probe.Run` holding the frames of several (concatenated, schema kept)."""
    if len(runs) == 1:
        return runs[0]
    if not runs:
        return probe.Run(calls=schema.empty(schema.CALLS), steps=schema.empty(schema.STEPS),
                         runs=schema.empty(schema.RUNS).assign(run=pd.Series([], dtype="string")))
    return probe.Run(
        calls=schema.conform(schema.combine([r.calls for r in runs]), schema.CALLS),
        steps=schema.conform(pd.concat([r.steps for r in runs], ignore_index=True), schema.STEPS),
        runs=schema.conform(pd.concat([r.runs for r in runs], ignore_index=True), schema.RUNS),
        meta=dict(runs[0].meta),
        sampling=schema.conform(pd.concat([r.sampling for r in runs], ignore_index=True), schema.SAMPLING),
        requests=schema.conform(pd.concat([r.requests for r in runs], ignore_index=True), schema.REQUESTS),
        **{k: schema.conform(pd.concat([getattr(r, k) for r in runs], ignore_index=True), cols)
           for k, cols in (("ops", schema.OPS), ("ledger", schema.LEDGER), ("allocations", schema.ALLOCATIONS))},
    )


def options(run: probe.Run) -> dict:
    """Values the filters can take for ``run``: phases, depths, module types, step range, ranks."""
    calls, steps = run.calls, run.steps
    # .unique() first: iterating a million-row string column in Python takes seconds
    present = set(steps["phase"].dropna().unique()) | set(calls["phase"].dropna().unique())
    phases = [p for p in schema.PHASES if p in present] + sorted(str(p) for p in present - set(schema.PHASES))
    lo = int(steps["step"].min()) if len(steps) else 0
    hi = int(steps["step"].max()) if len(steps) else 0
    return {
        "phases": phases,
        "depths": sorted(int(d) for d in calls["depth"].dropna().unique()),
        "module_types": sorted(str(t) for t in calls["module_type"].dropna().unique()),
        "steps": (lo, hi),
        "ranks": ranks(run),
    }


def apply_filters(run: probe.Run, f: Filters) -> probe.Run:
    """``run`` with its calls and steps cut to the filters (phase, step and rank apply to both;
    rank to the runs too).

    Returns the same frames untouched when no filter narrows them, so the common case
    copies nothing.
    """
    calls, steps, runs = run.calls, run.steps, run.runs
    cmask = np.ones(len(calls), dtype=bool)
    smask = np.ones(len(steps), dtype=bool)
    if f.phases is not None:
        cmask &= calls["phase"].isin(f.phases).to_numpy(dtype=bool, na_value=False)
        smask &= steps["phase"].isin(f.phases).to_numpy(dtype=bool, na_value=False)
    if f.depths is not None:
        cmask &= calls["depth"].isin(f.depths).to_numpy(dtype=bool, na_value=False)
    if f.module_types is not None:
        cmask &= calls["module_type"].isin(f.module_types).to_numpy(dtype=bool, na_value=False)
    if f.steps is not None:
        lo, hi = f.steps
        cs = calls["step"].to_numpy()
        ss = steps["step"].to_numpy()
        cmask &= (cs >= lo) & (cs <= hi)
        smask &= (ss >= lo) & (ss <= hi)
    if f.ranks is not None:
        cmask &= _in_ranks(calls, f.ranks)
        smask &= _in_ranks(steps, f.ranks)
        rmask = _in_ranks(runs, f.ranks)
        runs = runs if rmask.all() else runs[rmask].reset_index(drop=True)
    if f.phases is not None and f.depths is None and f.module_types is None and f.steps is None and f.ranks is None:
        # the same rows, noted as the phases' cut: their summary is read from the whole run's where it can be
        new_calls, new_steps = phase_subset(calls, steps, f.phases)
    else:
        new_calls = calls if cmask.all() else calls[cmask].reset_index(drop=True)
        new_steps = steps if smask.all() else steps[smask].reset_index(drop=True)
    samp = run.sampling
    if len(samp) and not smask.all():  # the sampling rows of the steps kept
        key = ["rank", "run_id", "step"]
        kept = pd.MultiIndex.from_frame(new_steps[key].astype(object))
        samp = samp[pd.MultiIndex.from_frame(samp[key].astype(object)).isin(kept)].reset_index(drop=True)
    reqs = run.requests
    if f.ranks is not None and len(reqs):
        rq = _in_ranks(reqs, f.ranks)
        reqs = reqs if rq.all() else reqs[rq].reset_index(drop=True)
    ops = run.ops  # a deep pass's sampled steps: the phase filter applies (its steps are not timed ones)
    if f.phases is not None and len(ops):
        ops = ops[ops["phase"].isin(f.phases).to_numpy(dtype=bool, na_value=False)].reset_index(drop=True)
    return probe.Run(calls=new_calls, steps=new_steps, runs=runs, meta=run.meta, path=run.path, sampling=samp,
                     requests=reqs, ops=ops, ledger=run.ledger, allocations=run.allocations)


def _in_ranks(frame: pd.DataFrame, picked: tuple[int, ...]) -> np.ndarray:
    """Rows of ``frame`` recorded by one of the ``picked`` ranks (a frame without ranks is rank 0)."""
    if "rank" not in frame.columns:
        return np.full(len(frame), 0 in picked)
    return np.isin(frame["rank"].to_numpy(dtype="int64", na_value=0), np.asarray(picked, dtype="int64"))


def block_memory(calls: pd.DataFrame) -> pd.DataFrame:
    """Per block role and phase: mean output bytes per call, and on CUDA the mean allocator
    growth (``mem_after - mem_before``) and peak above the start of the call.

    Columns: ``role, phase, calls, mean_out_bytes, mean_alloc_delta_bytes, max_peak_over_bytes``
    (the last two null on CPU, where the allocator counters are not recorded).
    """
    cols = ["role", "phase", "calls", "mean_out_bytes", "mean_alloc_delta_bytes", "max_peak_over_bytes"]
    if calls.empty:
        return pd.DataFrame({c: pd.Series([], dtype="string" if c in ("role", "phase") else "float64")
                             for c in cols})
    before = schema.floats(calls, "mem_before_bytes")  # the allocator columns are absent on CPU
    df = pd.DataFrame({
        "role": calls["role"], "phase": calls["phase"], "out": calls["out_bytes"].astype("float64"),
        "delta": schema.floats(calls, "mem_after_bytes") - before,
        "over": schema.floats(calls, "mem_peak_bytes") - before,
    })
    g = df.groupby(["role", "phase"], sort=False, observed=True)
    out = pd.DataFrame({
        "calls": g.size(), "mean_out_bytes": g["out"].mean(),
        "mean_alloc_delta_bytes": g["delta"].mean(), "max_peak_over_bytes": g["over"].max(),
    }).reset_index()
    order = {r: i for i, r in enumerate(schema.ROLES)}
    porder = {p: i for i, p in enumerate(schema.PHASES)}
    out = out.assign(_r=ranked(out["role"], order, 99),
                     _p=ranked(out["phase"], porder, 99))
    return out.sort_values(["_p", "_r"], kind="stable").drop(columns=["_r", "_p"]).reset_index(drop=True)[cols]


def page(df: pd.DataFrame, number: int, rows: int | None = None) -> pd.DataFrame:
    """Rows ``[number*rows, (number+1)*rows)`` of ``df`` (pages count from 0; ``rows``
    defaults to :data:`PAGE_ROWS`)."""
    rows = PAGE_ROWS if rows is None else rows
    start = max(number, 0) * rows
    return df.iloc[start:start + rows]


def csv_bytes(df: pd.DataFrame, max_rows: int | None = None) -> bytes:
    """``df`` as UTF-8 CSV (shape columns stay JSON strings), at most ``max_rows`` rows."""
    if max_rows is not None:
        df = df.iloc[:max_rows]
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def report_html(run: probe.Run) -> bytes:
    """The self-contained HTML report of ``run`` (``reports.write_reports``), as bytes.

    Written to a temporary file, so the run's own folder is left untouched.
    """
    from probe.reports import write_reports

    with tempfile.TemporaryDirectory(prefix="probe-report-") as tmp:
        # with one format, `out` is the file to write
        paths = write_reports(run, run.path or tmp, formats=("html",), out=Path(tmp) / "report.html")
        return Path(paths[0]).read_bytes()
