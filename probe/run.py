"""`Run`: the recorded frames, saved as parquet + ``meta.json`` and loaded back equal."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import schema
from . import tree
from .sampling import stage_summary
from .schema import CALLS, REQUESTS, RUNS, SAMPLING, STEPS

FILES = {"calls": "calls.parquet", "steps": "steps.parquet", "runs": "runs.parquet", "sampling": "sampling.parquet",
         "requests": "requests.parquet"}
#: frames added later: saved with every run; a run saved before them loads them empty
OPTIONAL_FILES = frozenset({"sampling", "requests"})
META = "meta.json"


class RunLoadError(ValueError):
    """A run directory that cannot be read, with the reason and what to do."""


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

    # ------------------------------------------------------------------ analysis
    def summary(self, level: str | None = None, *, by: str | None = None) -> pd.DataFrame:
        """Where each phase's forward time went: one row per (level, block / role / module, phase).

        Columns: ``level, name, role, layer, phase, calls, total_ms, self_ms, mean_ms, share,
        gpu_total_ms, gpu_self_ms, mean_out_bytes`` (:data:`probe.schema.SUMMARY`). Levels:
        ``block`` (embed, layer, norm, head, model-level glue), ``role`` (q_proj, attention
        core, gate_proj, ...) and ``module``; ``level=None`` stacks all three. ``share`` is the
        row's self time over the phase's forward time, so within one level and phase the rows,
        the ``(residue)`` row and the ``(probe)`` row (where the probe's own cost is recorded)
        sum to 100 %. ``by`` is the older name of ``level``. See :mod:`probe.accounting`.
        """
        from .accounting import summary

        return summary(self.calls, self.steps, level=level if level is not None else by)

    def tree(self, depth: int | None = None) -> pd.DataFrame:
        """The call tree per phase, one row per path of modules, collapsed at ``depth`` if given.

        See :func:`probe.accounting.tree_table`.
        """
        from .accounting import tree_table

        return tree_table(self.calls, self.steps, depth=depth)

    def cost(self, model=None) -> pd.DataFrame:
        """``calls`` with ``flops``, ``bytes_moved`` and ``intensity_flops_per_byte`` added.

        Estimated from the captured shapes and the model's weights (``model``), or from the
        config saved in ``meta`` (no weights needed). See :mod:`probe.cost`.
        """
        from .cost import annotate

        return annotate(self.calls, model if model is not None else self)

    def apportion(self, model=None) -> pd.DataFrame:
        """Continuous-batching steps: each call's time split into prefill and decode parts that
        add up to it (cost-model work per token kind, calibrated on the run's pure steps).
        See :mod:`probe.apportion`."""
        from .apportion import apportion

        return apportion(self, model)

    def roofline(self, peaks=None, by: str = "role", model=None) -> pd.DataFrame:
        """Achieved TFLOP/s and GB/s per block and phase against the device's peaks, with
        what bounds each (compute, memory bandwidth or the host). ``peaks`` defaults to those
        stored in ``meta`` at recording time, else the datasheet table or a measurement here.
        See :mod:`probe.roofline`."""
        from .hardware import Peaks, peaks_for_run
        from .roofline import roofline

        if peaks is None and isinstance(self.meta.get("peaks"), dict):
            peaks = Peaks.from_dict(self.meta["peaks"])
        if peaks is None:
            peaks = peaks_for_run(self)
        return roofline(self.cost(model), peaks, self.steps, by=by)

    def sampling_summary(self) -> pd.DataFrame:
        """Per phase and sampling stage (logits processors, ``stopping``, ``remainder``): steps,
        total and mean ms per step, GPU total, share of the time outside the model and of the
        step. See :func:`probe.sampling.stage_summary`."""
        return stage_summary(self.sampling, self.steps)

    def phase_summary(self) -> pd.DataFrame:
        """One row per phase: steps, tokens, forward/outside/latency totals and means."""
        st = self.steps
        if st.empty:
            return pd.DataFrame(
                {c: pd.Series([], dtype=d) for c, d in {
                    "phase": "string", "steps": "int64", "tokens": "int64", "forward_ms": "float64",
                    "outside_ms": "float64", "latency_ms": "float64", "mean_latency_ms": "float64",
                    "tok_s": "float64",
                }.items()}
            )
        # prefill-like phases process q_len positions; decode produces new_tokens per sequence
        per_seq = st["q_len"].where(st["phase"] != "decode", st["new_tokens"])
        tokens = per_seq * st["batch"]
        if "requests" in st:  # a packed continuous-batching forward: q_len is all its tokens already
            tokens = tokens.where(st["requests"].isna(), st["q_len"])
        st = st.assign(_tokens=tokens)
        g = st.groupby("phase", sort=False)
        out = pd.DataFrame(
            {
                "steps": g.size(),
                "tokens": g["_tokens"].sum(),
                "forward_ms": g["forward_ms"].sum(),
                "outside_ms": g["outside_ms"].sum(min_count=1),
                "latency_ms": g["latency_ms"].sum(min_count=1),
                "mean_latency_ms": g["latency_ms"].mean(),
            }
        ).reset_index()
        t = out["latency_ms"].where(out["latency_ms"].notna(), out["forward_ms"])
        out["tok_s"] = out["tokens"] / (t / 1e3)
        out["phase"] = out["phase"].astype("string")
        return out

    def _repr_html_(self) -> str:
        """Jupyter's view: the generate calls' headline numbers and the per-role summary, in
        the units and formats of the terminal and the report (:mod:`probe.fmt`)."""
        from html import escape

        from . import fmt

        runs = self.runs
        head = "<b>probe run</b>"
        if runs.empty:
            return head + ": no records"
        cols = [c for c in ("run_id", "model_id", "status", "prompt_tokens", "new_tokens", "ttft_ms",
                            "tpot_ms_mean", "prefill_tok_s", "decode_tok_s", "total_ms", "peak_mem_bytes",
                            "kv_cache_bytes") if c in runs]
        table = fmt.frame(runs[cols], drop_empty=True).to_html(index=False, escape=True, na_rep="")
        summ = fmt.frame(self.summary(by="role"), drop_empty=True)
        table2 = summ.to_html(index=False, escape=True, na_rep="")
        return f"{head} {escape(str(self.path or ''))}{table}<br>{table2}"

    def __repr__(self) -> str:
        return (
            f"<probe.Run runs={len(self.runs)} steps={len(self.steps)} calls={len(self.calls)}"
            f"{f' requests={len(self.requests)}' if len(self.requests) else ''}"
            f"{' path=' + str(self.path) if self.path else ''}>"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``calls.parquet``, ``steps.parquet``, ``runs.parquet`` and ``meta.json``.

        Each file is written under a temporary name in the same folder and renamed, so a
        crash never leaves a half-written file. Returns the directory.
        """
        out = Path(path)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create run directory {out}: {exc.strerror or exc}; choose a writable --out") from exc
        if not os.access(out, os.W_OK):
            raise PermissionError(f"run directory {out} is not writable; choose a writable --out")
        for key, name in FILES.items():
            df = getattr(self, key)
            _atomic(out / name, lambda tmp, df=df: df.to_parquet(tmp, index=False))
        meta = dict(self.meta)
        meta["files"] = dict(FILES)
        meta["schema_version"] = schema.SCHEMA_VERSION
        text = json.dumps(meta, indent=2, sort_keys=True, default=str)
        _atomic(out / META, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.path = out
        return out


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; saved runs get ordinary permissions
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str | os.PathLike) -> Run:
    """Load a run directory written by :meth:`Run.save` (or several ranks' sub-directories).

    Raises:
        RunLoadError: the folder is missing, holds no run, or a file is corrupt or of an
            unknown schema; the message names the file and the problem.
    """
    root = Path(path)
    if not root.exists():
        raise RunLoadError(f"run directory {root} does not exist")
    if not root.is_dir():
        raise RunLoadError(f"{root} is not a directory; pass the folder that holds meta.json")
    if not (root / META).exists():
        ranks = sorted((d for d in root.glob("rank*") if (d / META).exists()), key=_rank_order)
        if ranks:
            return merge([load(d) for d in ranks], path=root)
        raise RunLoadError(f"{root} holds no probe run (no {META}); run `probe run --out {root}` first")
    try:
        meta = json.loads((root / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunLoadError(f"{root / META} is corrupt: {exc}") from exc
    if not isinstance(meta, dict):
        raise RunLoadError(f"{root / META} is not a JSON object")
    version = meta.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise RunLoadError(
            f"{root} was saved with run schema {version!r}; this probe reads schema "
            f"{schema.SCHEMA_VERSION}. Re-record it with this version of probe."
        )
    frames = {}
    for key, name in FILES.items():
        f = root / name
        if not f.exists() and key in OPTIONAL_FILES:
            frames[key] = schema.empty(schema.FRAMES[key])
            continue
        if not f.exists():
            raise RunLoadError(f"{f} is missing: the run is incomplete (was the recording interrupted?)")
        try:
            df = pd.read_parquet(f)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise RunLoadError(f"{f} is corrupt or half-written: {exc}") from exc
        sch = schema.FRAMES[key]
        # Columns added to the schema later are nullable: an older run gets them as nulls.
        missing = [c for c in sch if c not in df.columns and sch[c] not in schema.NULLABLE]
        if missing:
            raise RunLoadError(f"{f} lacks columns {missing}: saved by an older or foreign schema")
        frames[key] = schema.conform(df, sch)
    # runs saved before the call tree was recorded get it derived here
    calls, steps = tree.ensure(frames["calls"], frames["steps"])
    frames["calls"], frames["steps"] = schema.conform(calls, CALLS), schema.conform(steps, STEPS)
    return Run(calls=frames["calls"], steps=frames["steps"], runs=frames["runs"], meta=meta, path=root,
               sampling=frames["sampling"], requests=frames["requests"])


def _rank_order(d: Path) -> tuple:
    """rank2 before rank10: numbered rank directories first, by number."""
    tail = d.name[len("rank"):]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, d.name)


def merge(runs: list[Run], path: Path | None = None) -> Run:
    """Concatenate runs (e.g. one per tensor-parallel rank) into one, rows tagged by rank."""
    if not runs:
        raise RunLoadError("nothing to merge")
    calls = schema.conform(pd.concat([r.calls for r in runs], ignore_index=True), CALLS)
    steps = schema.conform(pd.concat([r.steps for r in runs], ignore_index=True), STEPS)
    runs_df = schema.conform(pd.concat([r.runs for r in runs], ignore_index=True), RUNS)
    sampling = schema.conform(pd.concat([r.sampling for r in runs], ignore_index=True), SAMPLING)
    reqs = schema.conform(pd.concat([r.requests for r in runs], ignore_index=True), REQUESTS)
    meta = dict(runs[0].meta)
    meta["ranks"] = [r.meta.get("rank", i) for i, r in enumerate(runs)]
    return Run(calls=calls, steps=steps, runs=runs_df, meta=meta, path=path, sampling=sampling, requests=reqs)


def block_summary(calls: pd.DataFrame, steps: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """:meth:`Run.summary` of bare frames (``by`` = level: ``block``, ``role``, ``module`` or None)."""
    from .accounting import summary

    return summary(calls, steps, level=by)
