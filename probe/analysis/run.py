"""`Run`: the recorded frames, saved as parquet + ``meta.json`` and loaded back equal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .. import schema
from . import memo, run_view, tree
from .accounting import block_summary  # noqa: F401 - where readers have found it
from ..errors import RunSaveError
from .headline import phase_headline, phase_totals
from ..recording.stages import stage_summary
from ..store.files import (MAX_META_BYTES, META, leftover_hint, open_regular, read_regular, reason, recover,
                           temp_beside, write_folder, write_in_place)
from ..store.files import remove_leftovers as store_remove_leftovers
from ..store.folders import check_save_target, rank_dirs, rank_of
from ..schema import CALLS, REQUESTS, RUNS, SAMPLING, STEPS, Level
from .. import rules
from .part import MARK, STEP_FRAMES, TREE_INPUTS, Part, calls_schema, describe, need, select
from .. import parquet_read as reading
from ..validate import MANIFEST, RunLoadError, check_frame, check_manifest, check_meta

FILES = {"calls": "calls.parquet", "steps": "steps.parquet", "runs": "runs.parquet", "sampling": "sampling.parquet",
         "requests": "requests.parquet", "ops": "ops.parquet", "ledger": "ledger.parquet",
         "allocations": "allocations.parquet"}
#: frames added later: a run saved before them (or, for a deep pass's, without any rows) loads them empty
OPTIONAL_FILES = frozenset({"sampling", "requests", "ops", "ledger", "allocations"})


@dataclass
class Run:
    """Frames of a recording: ``calls`` (one row per block call), ``steps`` (one row per root
    forward), ``runs`` (one row per generate call or serving loop), ``sampling`` (per generate
    step, the time of each sampling stage outside the model) and ``requests`` (one row per
    request of a continuous-batching loop; empty otherwise), plus ``meta`` (JSON-able facts)."""

    calls: pd.DataFrame
    steps: pd.DataFrame
    runs: pd.DataFrame
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    sampling: pd.DataFrame = field(default_factory=lambda: schema.empty(SAMPLING))
    requests: pd.DataFrame = field(default_factory=lambda: schema.empty(REQUESTS))
    # a deep run's sampled steps (probe.attach(model, deep=...)): each op, the memory ledger, each storage
    ops: pd.DataFrame = field(default_factory=lambda: schema.empty(schema.OPS))
    ledger: pd.DataFrame = field(default_factory=lambda: schema.empty(schema.LEDGER))
    allocations: pd.DataFrame = field(default_factory=lambda: schema.empty(schema.ALLOCATIONS))
    # derived tables (summary, tree) by what was asked, each with the calls and steps frames it was
    # built from: a frame assigned anew makes it stale (frames are treated as read-only)
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _memo(self, key: tuple, build) -> pd.DataFrame:
        """``build()``, kept while ``calls`` and ``steps`` are the frames it was built from; a copy
        is handed out (:func:`probe.analysis.memo.handed`: nothing is copied unless the caller
        writes to it, where pandas copies on write)."""
        hit = self._derived.get(key)
        if hit is None or hit[0] is not self.calls or hit[1] is not self.steps:
            hit = self._derived[key] = (self.calls, self.steps, build())
        return memo.handed(hit[2])

    @property
    def part(self) -> dict | None:
        """What :func:`load` read (``columns``, ``steps``) where it read a part of the run, else ``None``."""
        got = self.meta.get(MARK)
        return got if isinstance(got, dict) else None

    # ------------------------------------------------------------------ analysis
    def summary(self, level: Level | None = None, *, by: Level | None = None) -> pd.DataFrame:
        """Where each phase's forward time went: one row per (level, block / role / module, phase).

        Columns: ``level, name, role, layer, phase, calls, total_ms, self_ms, mean_ms, share,
        gpu_total_ms, gpu_self_ms, mean_out_bytes`` (:data:`probe.schema.SUMMARY`). Levels:
        ``block`` (embed, layer, norm, head, model-level glue), ``role`` (q_proj, attention
        core, gate_proj, ...) and ``module``; ``level=None`` stacks all three. ``share`` is the
        row's self time over the phase's forward time, so within one level and phase the rows,
        the ``(residue)`` row and the ``(probe)`` row (where the probe's own cost is recorded)
        sum to 100 %. ``by`` is the older name of ``level``. See :mod:`probe.analysis.accounting`.
        """
        from .accounting import summary

        level = level if level is not None else by
        need(self.calls, "summary()", self.part)
        return self._memo(("summary", level), lambda: summary(self.calls, self.steps, level=level))

    def tree(self, depth: int | None = None, *, level: str = "module") -> pd.DataFrame:
        """The call tree per phase, one row per path of modules, collapsed at ``depth`` if given
        (:func:`probe.accounting.tree_table`); ``level="op"`` opens each node down to a deep run's
        ops and its ``(dispatch and Python)`` (:func:`probe.analysis.op_tree.op_tree`)."""
        from .accounting import tree_table
        from .op_tree import check_tree_level, op_tree

        check_tree_level(level)
        need(self.calls, "tree()", self.part)
        if level == "op" and (self.ops.empty or self.calls.empty):
            raise ValueError("tree(level='op') needs a deep run's ops and timed calls of the same run: record with "
                             "`probe run --deep` or probe.profile(..., deep=True); attach(deep=...) alone times no step")
        tree = self._memo(("tree", depth), lambda: tree_table(self.calls, self.steps, depth=depth))
        return tree if level == "module" else op_tree(tree, self.ops)  # not kept: it reads ops too

    def spread(self, level: Level = "block") -> pd.DataFrame:
        """Median and min–max over the recorded generate calls of each row's self time per phase
        (``probe run --repeat N``); joins :meth:`summary` on ``(level, name, phase)``. See
        :func:`probe.stats.block_spread`."""
        from .stats import block_spread

        return block_spread(self.calls, self.steps, self.runs, level=level)

    def headline_spread(self) -> pd.DataFrame:
        """Median and min–max of TTFT, TPOT, tok/s and total time over the generate calls."""
        from .stats import headline_spread

        return headline_spread(self.runs)

    def noise(self):
        """Was the machine busy while this run was recorded? A :class:`probe.noise.Busy`
        (``.wait_pct``, ``.busy``, ``.message()``)."""
        from ..recording.noise import busy

        return busy(self.steps, self.runs, self.meta)

    def cost(self, model=None) -> pd.DataFrame:
        """``calls`` with ``flops``, ``bytes_moved`` and ``intensity_flops_per_byte`` added.

        Estimated from the captured shapes and the model's weights (``model``), or from the
        config saved in ``meta`` (no weights needed). See :mod:`probe.analysis.cost`.
        """
        from .cost import annotate

        return annotate(self.calls, model if model is not None else self)

    def apportion(self, model=None) -> pd.DataFrame:
        """Continuous-batching steps: each call's time split into prefill and decode parts that
        add up to it (cost-model work per token kind, calibrated on the run's pure steps).
        See :mod:`probe.analysis.apportion`."""
        from .apportion import apportion

        return apportion(self, model)

    def roofline(self, peaks=None, by: str = "role", model=None) -> pd.DataFrame:
        """Achieved TFLOP/s and GB/s per block and phase against the device's peaks, with
        what bounds each (compute, memory bandwidth or the host). ``peaks`` defaults to those
        stored in ``meta`` at recording time unless measured on a busy machine, else the datasheet
        table or this machine's cached quiet CPU figure (:func:`probe.hardware.peaks_for_run`).
        CPU rows far under their roof are labelled ``wait`` when the run's noise figure says the
        CPU was waiting. See :mod:`probe.analysis.roofline`."""
        from .hardware import Peaks, peaks_for_run, usable
        from .roofline import roofline

        wait = self.noise().wait_pct
        if peaks is None and isinstance(self.meta.get("peaks"), dict):
            peaks, _ = usable(Peaks.from_dict(self.meta["peaks"]), wait)
        if peaks is None:
            peaks = peaks_for_run(self)
        return roofline(self.cost(model), peaks, self.steps, by=by, cpu_wait_pct=wait)

    def sampling_summary(self) -> pd.DataFrame:
        """Per phase and sampling stage (logits processors, ``stopping``, ``remainder``): steps,
        total and mean ms per step, GPU total, share of the time outside the model and of the
        step. See :func:`probe.sampling.stage_summary`."""
        return stage_summary(self.sampling, self.steps)

    def op_summary(self, *, top: int | None = None, by: str = "block") -> pd.DataFrame:
        """A deep run's ops per phase, block and op kind (:func:`probe.analysis.ops.op_summary`; a
        NaN dispatch row is unknown, :func:`~probe.analysis.ops.dispatch_unknown` says why); its
        memory per block is :func:`probe.analysis.ops.memory_ledger`."""
        from .ops import op_summary

        return op_summary(self.ops, self.calls, top=top, by=by)

    def flops_reconciled(self, model=None, *, by: str = "block") -> pd.DataFrame:
        """A deep run's FLOPs against the cost model's matrix products, the rest by category
        (:func:`probe.analysis.flops_check.reconcile_flops`; ``model``: default the run's config)."""
        from .flops_check import reconcile_flops

        return reconcile_flops(self, model, by=by)

    def phase_summary(self) -> pd.DataFrame:
        """One row per phase: steps, tokens, forward/outside/latency totals and means."""
        return phase_totals(self.steps)

    def headline(self) -> pd.DataFrame:
        """Prefill vs decode of the generate calls, side by side, adding up to their wall time:
        steps, time, share, time per token, tok/s, KV cache and peak memory per phase, then
        ``setup and outside`` and the ``generate`` total. See :func:`probe.headline.phase_headline`."""
        return phase_headline(self.runs, self.steps)

    def generated(self) -> list[dict]:
        """What each generate call produced: ``run_id``, ``token_ids`` (per returned sequence,
        prompt excluded) and, where the run kept text (``probe run``, ``probe.profile`` with a
        tokenizer), ``text``."""
        return run_view.generated(self)

    def _repr_html_(self) -> str:
        """Jupyter's view (:func:`probe.analysis.run_view.html`)."""
        return run_view.html(self)

    def __repr__(self) -> str:
        return run_view.short(self)

    def __str__(self) -> str:
        """``print(run)``: prefill vs decode side by side as aligned text, then what was generated
        (:func:`probe.headline.headline_text`); a run without a generate call prints its repr."""
        return run_view.text(self)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``calls.parquet``, ``steps.parquet``, ``runs.parquet`` and ``meta.json``.

        The run is written into a new hidden folder beside ``path`` and moved into place with
        renames: a reader (or a crash, or a kill) never finds a half-written or mixed run — an
        existing run at ``path`` is replaced as a whole, its reports with it. ``meta.json``
        (written last) holds a manifest of every file's size and SHA-256 that :func:`load`
        checks. Where no folder can be made beside ``path`` (its parent is read-only) the files
        are replaced inside it, ``meta.json`` removed first and written last. Leftovers of
        saves that were killed are removed.

        Returns:
            The directory.
        Raises:
            RunSaveError: ``path`` is a file, or a folder that holds files but no probe run (a
                run never replaces what is not a run), or it cannot be written, or the run was
                loaded in part (``probe.load(path, columns=..., steps=...)``); the message names
                the path and the reason.
        """
        out = Path(path)
        if self.part is not None:
            raise RunSaveError(f"this run was loaded in part ({describe(self.part)}): a part is never saved, so it "
                               "never replaces a whole run; load the run whole (probe.load(path)) to save it")
        if out.is_symlink():
            out = out.resolve()
        check_save_target(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunSaveError(f"cannot create {out.parent}: {reason(exc)}; choose a writable folder") from exc
        remove_leftovers(out)
        blobs = self._blobs()
        try:
            try:
                tmp = temp_beside(out)
            except OSError:  # the parent is read-only (or not ours): write inside the folder itself
                write_in_place(out, blobs)
            else:
                write_folder(out, blobs, tmp)
        except OSError as exc:
            err = RunSaveError(f"cannot save the run to {out}: {reason(exc)}")
            err.reason = reason(exc)  # the cause alone, for messages that name the folder themselves
            raise err from exc
        self.path = out
        return out

    def _blobs(self) -> dict[str, bytes]:
        """The bytes of every file of the saved run, ``meta.json`` (with the manifest) last."""
        blobs: dict[str, bytes] = {}
        for key, name in FILES.items():
            if key in ("ops", "ledger", "allocations") and getattr(self, key).empty:
                continue  # written only for a run with a deep pass
            buf = io.BytesIO()
            frame = getattr(self, key)
            if schema.absent_when_null(schema.FRAMES[key]):  # columns all null here (CUDA ones on a CPU run)
                frame = schema.conform(frame, schema.FRAMES[key])  # are not written
            frame.to_parquet(buf, index=False)
            blobs[name] = buf.getvalue()
        meta = dict(self.meta)
        meta["files"] = {k: v for k, v in FILES.items() if v in blobs}
        meta["schema_version"] = schema.SCHEMA_VERSION
        meta[MANIFEST] = {
            "save_id": uuid.uuid4().hex,
            "run_ids": sorted({str(v) for v in self.runs["run_id"].dropna()}),
            "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()},
        }
        blobs[META] = json.dumps(meta, indent=2, sort_keys=True, default=str).encode("utf-8")
        return blobs


def remove_leftovers(out: Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove what killed saves of ``out`` left, beside it and inside it (see :mod:`probe.store`)."""
    return store_remove_leftovers(out, min_age_s, inside=(*FILES.values(), META))


def load(path: str | os.PathLike, *, columns: Iterable[str] | str | None = None, steps: object = None) -> Run:
    """Load a run directory written by :meth:`Run.save` (or several ranks' sub-directories).

    Every file is checked: ``meta.json`` against the manifest of sizes and SHA-256 it holds
    (a folder mixing files of two saves is refused), every column of every frame against the
    schema (types, missing values, infinities, JSON shapes), so a run that loads can be reported.
    Only regular files are opened.

    Args:
        path: the run folder.
        columns: only these columns of ``calls``, with the keys every load reads
            (:data:`probe.analysis.part.KEY_COLUMNS`; ``summary()`` and ``tree()`` need
            :data:`~probe.analysis.part.ANALYSIS_COLUMNS` too). ``None``: every column.
        steps: only these steps' rows of ``calls``, ``steps`` and ``sampling``: a step number
            (that step of every generate call), a ``range`` or list of them, or a phase
            (``"prefill"``, ``"decode"``). ``None``: every step. ``runs``, ``requests``: whole.
    Returns:
        The run; read in part, ``Run.part`` says what was read and :meth:`Run.save` refuses it.
    Raises:
        RunLoadError: the folder is missing, holds no run, or a file is corrupt, mixed, or of an
            unknown schema; the message names the file (and column) and the problem.
        ValueError: an unknown column or phase, or a step that is no step number (before any read).
    """
    return _load(Path(path), select(columns, steps))


def _load(root: Path, sel: Part | None) -> Run:
    if not root.exists() and recover(root) is None:  # a save killed between its renames
        raise RunLoadError(f"run directory {root} does not exist" + leftover_hint(root))
    if not root.is_dir():
        raise RunLoadError(f"{root} is not a directory; pass the folder that holds meta.json")
    if not (root / META).exists() and not (root / META).is_symlink():
        ranks = rank_dirs(root)
        if ranks:
            runs = []
            for d in ranks:
                run = _load(d, sel)
                want = rank_of(d.name)
                got = run.meta.get("rank", want)
                if isinstance(got, bool) or not isinstance(got, int) or got != want:
                    raise RunLoadError(f"{d / META} says rank {got!r} but its folder is {d.name}: "
                                       "not a rank of this tensor-parallel run")
                runs.append(run)
            return merge(runs, path=root)
        if any((root / n).exists() for n in FILES.values()):
            raise RunLoadError(f"{root / META} is missing: the run is incomplete (an interrupted save?); "
                               "re-record it")
        raise RunLoadError(f"{root} holds no probe run (no {META}); run `probe run --out {root}` first")
    run, found = _load_folder(root, sel)
    if found:
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        raise RunLoadError(f"{root}: {found[0]}{more}; the run was edited or damaged — `probe verify {root}` lists "
                           "every problem; re-record it")
    return run


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem of a saved run, one line each; empty when it loads and every value is one a
    recording can produce. Where :func:`load` stops at the first problem, this lists them all:
    the files against the manifest and the schema, each column's rules (:mod:`probe.rules`), the
    rows' links (run ids, steps, layers) and the nesting of the calls."""
    root = Path(path)
    if root.is_dir() and not (root / META).exists() and not (root / META).is_symlink() and rank_dirs(root):
        return [f"{d.name}: {line}" for d in rank_dirs(root) for line in verify(d)]
    try:
        if not root.is_dir() or not ((root / META).exists() or (root / META).is_symlink()):
            load(root)  # says what is missing
        _, found = _load_folder(root)
    except RunLoadError as exc:
        return [str(exc)]
    return found


def _load_folder(root: Path, sel: Part | None = None) -> tuple[Run, list[str]]:
    """The run in ``root`` (which holds ``meta.json``) and the rules its values break, read in the
    part ``sel`` selects (all of it if ``None``). Problems that leave nothing to check further (a
    file corrupt, of another save, of a wrong type) raise."""
    remove_leftovers(root, min_age_s=60.0)
    meta_file = root / META
    raw = read_regular(meta_file, limit=MAX_META_BYTES)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise RunLoadError(f"{meta_file} is corrupt: JSON nested too deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunLoadError(f"{meta_file} is corrupt: {exc}") from exc
    if not isinstance(meta, dict):
        raise RunLoadError(f"{meta_file} is not a JSON object")
    version = meta.get("schema_version")
    if version not in schema.READABLE_VERSIONS:
        raise RunLoadError(
            f"{root} was saved with run schema {version!r}; this probe reads schemas "
            f"{', '.join(map(str, schema.READABLE_VERSIONS))}. Re-record it with this version of probe."
        )

    check_meta(meta, meta_file)
    manifest = meta.get(MANIFEST)
    if manifest is None and version >= 2:  # every save of schema 2 writes one; v1 runs may lack it
        raise RunLoadError(f"{meta_file} has no {MANIFEST!r}: every run of schema {version} is saved with one "
                           "(file sizes and SHA-256), so this file was edited or damaged; re-record the run")
    frames = {}
    listed = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    for key, name in FILES.items():
        f = root / name
        if key in OPTIONAL_FILES and not os.path.lexists(f):
            if isinstance(listed, dict) and name in listed:
                raise RunLoadError(f"{f} is missing although {meta_file} lists it: the folder was edited or "
                                   "damaged; re-record the run")
            frames[key] = schema.empty(schema.FRAMES[key])  # saved before this frame existed
            continue
        with open_regular(f) as data:  # read in parts: a large file is never held whole in memory
            if manifest is not None:
                check_manifest(manifest, name, data, f, meta_file)
            rows = sel.rows if sel is not None and key in STEP_FRAMES else None
            cols = sel.calls_columns() if sel is not None and key == "calls" else None
            frames[key] = check_frame(data, key, f, cols, rows)
            if cols is not None and not tree.has_tree(frames[key]):  # saved without its tree: derive it
                frames[key] = check_frame(data, key, f, sel.calls_columns(TREE_INPUTS), rows)
    if manifest is not None:
        ids = sorted({str(v) for v in frames["runs"]["run_id"].dropna()})
        if ids != manifest.get("run_ids", ids):
            raise RunLoadError(f"{root / FILES['runs']} holds runs {ids[:3]} but {meta_file} lists "
                               f"{manifest.get('run_ids', [])[:3]}: the folder mixes two saves; re-record it")
    # runs saved before the call tree was recorded get it derived here
    calls, steps = tree.ensure(frames["calls"], frames["steps"])
    frames["calls"] = schema.conform(calls, calls_schema(sel and sel.asked), extra=sel is None or sel.columns is None)
    frames["steps"] = schema.conform(steps, STEPS)
    if sel is not None:
        meta[MARK] = dict(sel.asked)
    found = rules.problems(frames, meta)
    try:
        tree.check_nesting(frames["calls"])  # every walk over the nesting must end: no loops, no forward parents
    except ValueError as exc:
        found.append(f"{FILES['calls']}: {exc}")
    if len(frames["calls"]) >= reading.COLUMNWISE_ROWS:
        reading.give_back()  # what the checks freed: not kept under what the caller builds next
    return Run(calls=frames["calls"], steps=frames["steps"], runs=frames["runs"], meta=meta, path=root,
               sampling=frames["sampling"], requests=frames["requests"], ops=frames["ops"], ledger=frames["ledger"],
               allocations=frames["allocations"]), found


def merge(runs: list[Run], path: Path | None = None) -> Run:
    """Concatenate runs (e.g. one per tensor-parallel rank) into one, rows tagged by rank."""
    if not runs:
        raise RunLoadError("nothing to merge")
    calls = schema.conform(schema.combine([r.calls for r in runs]), calls_schema(runs[0].part))
    steps = schema.conform(pd.concat([r.steps for r in runs], ignore_index=True), STEPS)
    runs_df = schema.conform(pd.concat([r.runs for r in runs], ignore_index=True), RUNS)
    sampling = schema.conform(pd.concat([r.sampling for r in runs], ignore_index=True), SAMPLING)
    reqs = schema.conform(pd.concat([r.requests for r in runs], ignore_index=True), REQUESTS)
    meta = dict(runs[0].meta)
    meta["ranks"] = [r.meta.get("rank", i) for i, r in enumerate(runs)]
    deep = {k: schema.conform(pd.concat([getattr(r, k) for r in runs], ignore_index=True), schema.FRAMES[k])
            for k in ("ops", "ledger", "allocations")}
    return Run(calls=calls, steps=steps, runs=runs_df, meta=meta, path=path, sampling=sampling, requests=reqs, **deep)

