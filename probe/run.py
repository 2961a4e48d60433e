"""`Run`: the recorded frames, saved as parquet + ``meta.json`` and loaded back equal."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .sampling import stage_summary
from .schema import BLOCK_ROLES, CALLS, REQUESTS, RUNS, SAMPLING, STEPS, SUMMARY

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
    def summary(self, by: str = "module") -> pd.DataFrame:
        """Per-block prefill-vs-decode summary: one row per module (or role) and phase.

        Columns: ``module, role, layer, phase, calls, total_ms, mean_ms, share, gpu_total_ms,
        mean_out_bytes``. ``share`` is the block's host time over the phase's total forward
        time (sum of ``steps.forward_ms``); the residue of the forward outside every block is a
        row with module ``(residue)``, and the time outside the model a row ``(outside model)``.
        """
        return block_summary(self.calls, self.steps, by=by)

    def spread(self, by: str = "role") -> pd.DataFrame:
        """Median and min–max over the recorded generate calls of each block's time per phase
        (``probe run --repeat N``); joins :meth:`summary` on ``(module, phase)``. See
        :func:`probe.stats.block_spread`."""
        from .stats import block_spread

        return block_spread(self.calls, self.steps, self.runs, by=by)

    def headline_spread(self) -> pd.DataFrame:
        """Median and min–max of TTFT, TPOT, tok/s and total time over the generate calls."""
        from .stats import headline_spread

        return headline_spread(self.runs)

    def noise(self):
        """Was the machine busy while this run was recorded? A :class:`probe.noise.Busy`
        (``.wait_pct``, ``.busy``, ``.message()``)."""
        from .noise import busy

        return busy(self.steps, self.runs, self.meta)

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


def block_summary(calls: pd.DataFrame, steps: pd.DataFrame, by: str = "module") -> pd.DataFrame:
    """See :meth:`Run.summary`. ``by`` is ``"module"`` or ``"role"``.

    Shares and the residue are taken over the steps that have block records (``decode_stride``
    and ``max_steps`` keep timing every step but record blocks of only some), and on one clock
    per phase: CUDA time where every such step has it, host time otherwise.
    """
    if by not in ("module", "role"):
        raise ValueError(f"by must be 'module' or 'role'; got {by!r}")
    if calls.empty:
        return schema.empty(SUMMARY)
    recorded = steps[steps["blocks_ms"].notna()]
    g_steps = recorded.groupby("phase", sort=False)
    fwd_host = g_steps["forward_ms"].sum()
    fwd_gpu = g_steps["gpu_ms"].sum(min_count=1)
    on_gpu = g_steps["gpu_ms"].count().eq(g_steps.size()) & fwd_gpu.notna()
    phase_total = fwd_gpu.where(on_gpu, fwd_host)
    keys = ["module", "role", "layer", "phase"] if by == "module" else ["role", "phase"]
    g = calls.groupby(keys, sort=False, dropna=False, observed=True)
    out = pd.DataFrame(
        {
            "calls": g.size(),
            "total_ms": g["cpu_ms"].sum(),
            "gpu_total_ms": g["gpu_ms"].sum(min_count=1),
            "mean_out_bytes": g["out_bytes"].mean(),
        }
    ).reset_index()
    out["mean_ms"] = out["total_ms"] / out["calls"]
    gpu_phase = out["phase"].map(on_gpu).fillna(False).astype(bool)
    t = out["gpu_total_ms"].where(gpu_phase & out["gpu_total_ms"].notna(), out["total_ms"])
    out["share"] = t / out["phase"].map(phase_total).astype("float64")
    if by == "role":
        out["module"] = out["role"]
        out["layer"] = pd.array([pd.NA] * len(out), dtype="Int64")
    # residue (forward time outside every block) and time outside the model, per phase
    extra = []
    is_block = out["role"].isin(BLOCK_ROLES)
    by_phase = out.loc[is_block, "phase"]
    in_blocks = t[is_block].groupby(by_phase).sum()
    host_in_blocks = out.loc[is_block, "total_ms"].groupby(by_phase).sum()
    gpu_in_blocks = out.loc[is_block, "gpu_total_ms"].groupby(by_phase).sum(min_count=1)
    for phase, total in phase_total.items():
        n_rec = int(g_steps.size()[phase])
        if phase in in_blocks.index:
            res = float(total - in_blocks[phase])  # on the phase's clock
            host_res = float(fwd_host[phase] - host_in_blocks[phase])
            gpu_res = float(fwd_gpu[phase] - gpu_in_blocks[phase]) if on_gpu[phase] else np.nan
            extra.append({"module": "(residue)", "role": "residue", "phase": phase, "calls": n_rec,
                          "total_ms": host_res, "gpu_total_ms": gpu_res, "mean_ms": host_res / max(n_rec, 1),
                          "share": res / total if total else np.nan})
    for phase, sub in steps.groupby("phase", sort=False):
        outside = sub["outside_ms"].sum(min_count=1)
        fwd = float(sub["forward_ms"].sum())  # host clock, like the time outside the model
        if pd.notna(outside):
            extra.append({"module": "(outside model)", "role": "outside", "phase": phase, "calls": len(sub),
                          "total_ms": float(outside), "mean_ms": float(outside) / max(len(sub), 1),
                          "share": float(outside) / fwd if fwd else np.nan})
    if extra:
        out = pd.concat([out, pd.DataFrame(extra)], ignore_index=True)
    order = {p: i for i, p in enumerate(schema.PHASES)}
    out["_o"] = out["phase"].map(order).fillna(99)
    out = out.sort_values(["_o"], kind="stable").drop(columns="_o")
    return schema.conform(out, SUMMARY)
