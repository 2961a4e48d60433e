"""Achieved FLOP/s and bandwidth per block and phase, and what bounds each: compute, memory, host.

Input: a calls frame annotated by :func:`probe.cost.annotate` and the device's
:class:`probe.hardware.Peaks`. Output: DataFrames with typed columns (empty ones too).

How a row is labelled (the numbers behind it are in ``reason``):

- ``error``: the row reaches more than 100 % of its roof. No device beats its own roof, so
  this is a measurement error, not a bound: the peaks are too low (a CPU measured on a busy
  machine), the time is wrong, or the cost estimate is; for a row under the bandwidth roof
  its data may also have come from a cache faster than the memory the roof measures.
- ``host``: on a GPU, the host took at least as long as the GPU (the GPU waited for kernel
  launches), or — for the whole forward — the GPU sat idle between blocks for at least
  :data:`GPU_IDLE_HOST_FRACTION` of the step. Where there is no GPU (a CPU run), a row that
  reaches less than :data:`OVERHEAD_FRACTION` of the roof at its intensity is labelled
  ``host`` too: framework overhead, not arithmetic or memory traffic, sets its time —
  but only when the CPU was not waiting:
- ``wait``: such a CPU row of a phase whose steps spent more than
  :data:`probe.noise.BUSY_THRESHOLD_PCT` of their time waiting for a CPU (the run's noise
  figure, or the steps' wall time beyond CPU time): the machine was busy, and waiting for a
  CPU, not this block's work nor per-call overhead, is what the time shows.
- otherwise ``compute`` if its arithmetic intensity is at or above the ridge point
  (peak FLOP/s ÷ peak bytes/s), else ``memory``.

Peaks measured while the machine was busy (:meth:`probe.hardware.Peaks.busy`) are never
used: the rows get no roofs and no bounds.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Literal

import numpy as np
import pandas as pd

from .. import fmt, schema
from ..columns import floats, ranked
from .grouping import group_sum, key_codes
from .labels import factorized
from .hardware import Peaks
from ..recording.noise import BUSY_THRESHOLD_PCT
from ..schema import BLOCK_ROLES, BOUND_SUMMARY, PHASES, ROOFLINE

log = logging.getLogger(__name__)

Bound = Literal["compute", "memory", "host", "wait", "error"]
BOUNDS: tuple[str, ...] = ("compute", "memory", "host", "wait", "error")

#: Below this fraction of the attainable roof, a host-timed (CPU) row is overhead-bound.
OVERHEAD_FRACTION = 0.10
#: A forward whose blocks keep the GPU busy for less than half the step is host-bound.
GPU_IDLE_HOST_FRACTION = 0.5

def empty_roofline() -> pd.DataFrame:
    """An empty roofline frame with every column at its dtype."""
    return schema.empty(ROOFLINE)


def _conform(df: pd.DataFrame) -> pd.DataFrame:
    return schema.conform(df, ROOFLINE, extra=False)


def _fmt_flops(v: float) -> str:
    return fmt.flop_s(v) if np.isfinite(v) else "n/a"


def _classify(flops_s: np.ndarray, bytes_s: np.ndarray, intensity: np.ndarray, host_ms: np.ndarray,
              gpu_ms: np.ndarray, idle: np.ndarray, on_gpu: np.ndarray, wait_pct: np.ndarray,
              peaks: Peaks) -> tuple[list, list]:
    """Label each row and write the numbers that decided it."""
    ridge = peaks.ridge_flops_per_byte
    where = "measured" if peaks.measured else "datasheet"
    bounds, reasons = [], []
    for i in range(len(flops_s)):
        I, f, b = intensity[i], flops_s[i], bytes_s[i]
        # use of the binding resource: f / roof for a positive intensity, b / bandwidth at
        # zero FLOPs (an embedding gather is a pure copy)
        frac = max(f / peaks.flops_per_s, b / peaks.bytes_per_s) if np.isfinite(f) and np.isfinite(b) else math.nan
        above = I >= ridge
        roof_txt = (f"intensity {fmt.intensity(I)} {'≥' if above else '<'} ridge {fmt.intensity(ridge)} "
                    f"({where} peaks {_fmt_flops(peaks.flops_per_s)}, {fmt.byte_s(peaks.bytes_per_s)})")
        used = (f"{_fmt_flops(f)} = {fmt.pct(frac)} of the compute roof" if above else
                f"{fmt.byte_s(b)} = {fmt.pct(frac)} of the bandwidth roof")
        waited = (not on_gpu[i]) and np.isfinite(wait_pct[i]) and wait_pct[i] > BUSY_THRESHOLD_PCT
        if np.isfinite(frac) and frac > 1.0:
            bounds.append("error")
            why = ("the peaks are too low or the time or the cost estimate is wrong" if above else
                   "the peaks are too low, the time or the cost estimate is wrong, or the data came from a cache "
                   "faster than the memory the roof measures")
            reasons.append(f"measurement error, not a bound: achieved {used}, {roof_txt}; nothing runs above its "
                           f"roof: {why}")
        elif on_gpu[i] and host_ms[i] >= gpu_ms[i]:
            bounds.append("host")
            reasons.append(f"host {fmt.ms(host_ms[i], True)} ≥ GPU {fmt.ms(gpu_ms[i], True)}: the GPU waits for "
                           "launches")
        elif on_gpu[i] and np.isfinite(idle[i]) and idle[i] >= GPU_IDLE_HOST_FRACTION:
            bounds.append("host")
            reasons.append(f"GPU idle {idle[i] * 100:,.0f}% of the step between blocks")
        elif not on_gpu[i] and np.isfinite(frac) and frac < OVERHEAD_FRACTION and waited:
            bounds.append("wait")
            reasons.append(f"achieved {used}, {roof_txt}; the machine was busy: {wait_pct[i]:.0f} % of the "
                           "step time was spent waiting for a CPU, so the wait, not this block's work or per-call "
                           "overhead, sets the time")
        elif not on_gpu[i] and np.isfinite(frac) and frac < OVERHEAD_FRACTION:
            bounds.append("host")
            reasons.append(f"achieved {used}, {roof_txt}: per-call overhead, not compute or memory, sets the time")
        elif not np.isfinite(I):
            bounds.append(pd.NA)
            reasons.append("no FLOP/byte estimate for this block")
        elif above:
            bounds.append("compute")
            reasons.append(f"{roof_txt}; achieved {_fmt_flops(f)} = {fmt.pct(f / peaks.flops_per_s)} of peak")
        else:
            bounds.append("memory")
            reasons.append(f"{roof_txt}; achieved {fmt.byte_s(b)} = {fmt.pct(b / peaks.bytes_per_s)} of peak")
        if waited and bounds[-1] in ("compute", "memory"):
            reasons[-1] += f" (timed while {wait_pct[i]:.0f} % of the step time was spent waiting for a CPU)"
    return bounds, reasons


def _phase_wait_pct(steps: pd.DataFrame | None) -> dict[str, float]:
    """Per phase, wall time beyond CPU time over wall time of the CPU-timed forwards, percent
    (the per-step measure of :mod:`probe.recording.noise`; GPU-timed steps are left out)."""
    if steps is None or steps.empty or "process_cpu_ms" not in steps.columns:
        return {}
    st = steps[steps["process_cpu_ms"].notna() & steps["gpu_ms"].isna()]
    if st.empty:
        return {}
    fwd = st["forward_ms"].astype("float64")
    wait = (fwd - st["process_cpu_ms"].astype("float64")).clip(lower=0.0)
    g = pd.DataFrame({"phase": st["phase"].astype(str), "fwd": fwd, "wait": wait}).groupby("phase")[["fwd", "wait"]].sum()
    return {str(p): 100.0 * float(r["wait"]) / float(r["fwd"]) for p, r in g.iterrows() if r["fwd"] > 0}


def roofline(calls: pd.DataFrame, peaks: Peaks | None, steps: pd.DataFrame | None = None,
             by: Literal["role", "module"] = "role", *, cpu_wait_pct: float | None = None,
             costs: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None) -> pd.DataFrame:
    """Achieved TFLOP/s, GB/s and intensity per block and phase, with its bound and the reason.

    Args:
        calls: a calls frame with ``flops`` and ``bytes_moved`` (see :func:`probe.cost.annotate`).
        peaks: the device's roofs (:func:`probe.hardware.peaks_for` / ``peaks_for_run``); ``None``
            leaves the roof columns and bounds empty.
        steps: the run's steps frame; adds one ``(forward)`` row per phase (the blocks' FLOPs and
            bytes over the whole forward time, with the GPU idle share between blocks).
        by: ``"role"`` (one row per block kind: embed, layer, norm, head — layers pooled) or
            ``"module"`` (one row per module).
        cpu_wait_pct: the run's noise figure (``Run.noise().wait_pct``): the share of step time
            spent waiting for a CPU. ``None``: per phase from ``steps`` (wall beyond CPU time).
            Above :data:`probe.noise.BUSY_THRESHOLD_PCT`, a CPU row far under its roof is
            labelled ``wait``, not ``host``.
        costs: ``costs(groups, n)`` gives the FLOPs and bytes of each of ``n`` groups from each
            call's group (:func:`probe.cost.group_costs`), for ``calls`` without the cost columns:
            the sums without a column per call.
    Returns:
        A frame with the :data:`probe.schema.ROOFLINE` columns, phases in prefill, decode... order. Time is
        GPU time where every call of the group has it, host time otherwise.
    """
    if by not in ("role", "module"):
        raise ValueError(f"by must be 'role' or 'module'; got {by!r}")
    if peaks is not None and peaks.busy():
        log.warning("peaks measured while %.0f %% of the measurement waited for a CPU are not used: %s",
                    peaks.wait_pct, peaks.label())
        peaks = None
    if calls.empty or ("flops" not in calls.columns and costs is None):
        if not calls.empty:
            raise ValueError("calls have no 'flops' column: run probe.cost.annotate(calls, model) first")
        return empty_roofline()
    keys = ["role", "phase"] if by == "role" else ["module", "role", "layer", "phase"]
    # the groups as groupby(sort=False) finds them, on integer codes: a run's own calls (costed by
    # signature, the report's path) on the codes its other tables keep (probe.analysis.memo)
    slot, out = key_codes(calls, keys, None if costs is None else (lambda col: factorized(calls, col)))
    m = len(out)
    n = np.bincount(slot, minlength=m)
    gpu = floats(calls, "gpu_ms") if "gpu_ms" in calls.columns else None  # absent: all null (a CPU run)
    has_gpu = None if gpu is None else ~np.isnan(gpu)
    out["calls"] = n.astype("int64")
    if costs is None:
        out["flops"] = group_sum(slot, m, floats(calls, "flops"), 1, n)
        out["bytes_moved"] = group_sum(slot, m, floats(calls, "bytes_moved"), 1, n)
    else:
        out["flops"], out["bytes_moved"] = costs(slot, m)
    out["host_ms"] = group_sum(slot, m, floats(calls, "cpu_ms"))
    out["gpu_ms"] = group_sum(slot, m, gpu, 1, n)
    out["_gpu_n"] = (np.zeros(m, np.int64) if has_gpu is None else n if has_gpu.all()
                     else np.bincount(slot[has_gpu], minlength=m))
    if by == "role":
        out["module"] = out["role"]
        out["layer"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["gpu_idle_fraction"] = np.nan
    out["_on_gpu"] = out["_gpu_n"] == out["calls"]
    if steps is not None and not steps.empty:
        out = pd.concat([out, _forward_rows(out, steps)], ignore_index=True)
    out["_on_gpu"] = out["_on_gpu"].astype(bool)
    on_gpu = out["_on_gpu"].to_numpy()
    host = out["host_ms"].to_numpy(dtype="float64", na_value=np.nan)
    gpu = out["gpu_ms"].to_numpy(dtype="float64", na_value=np.nan)
    t = np.where(on_gpu, gpu, host)
    out["time_ms"] = t
    out["time_source"] = np.where(on_gpu, "gpu", "host")
    fl = out["flops"].to_numpy(dtype="float64", na_value=np.nan)
    by_ = out["bytes_moved"].to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_s = fl / (t / 1e3)
        b_s = by_ / (t / 1e3)
        inten = np.where(by_ > 0, fl / by_, np.nan)
    out["achieved_tflop_s"] = f_s / 1e12
    out["achieved_gb_s"] = b_s / 1e9
    out["intensity_flops_per_byte"] = inten
    if peaks is not None:
        roof = np.minimum(peaks.flops_per_s, inten * peaks.bytes_per_s)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ridge_flops_per_byte"] = peaks.ridge_flops_per_byte
            out["roof_tflop_s"] = roof / 1e12
            out["roof_fraction"] = np.maximum(f_s / peaks.flops_per_s, b_s / peaks.bytes_per_s)
            out["compute_fraction"] = f_s / peaks.flops_per_s
            out["bandwidth_fraction"] = b_s / peaks.bytes_per_s
        idle = out["gpu_idle_fraction"].to_numpy(dtype="float64", na_value=np.nan)
        if cpu_wait_pct is not None and not (isinstance(cpu_wait_pct, float) and math.isnan(cpu_wait_pct)):
            wait = np.full(len(out), float(cpu_wait_pct))
        else:
            per_phase = _phase_wait_pct(steps)
            wait = out["phase"].astype(str).map(per_phase).to_numpy(dtype="float64", na_value=np.nan)
        bounds, reasons = _classify(f_s, b_s, inten, host, gpu, idle, on_gpu, wait, peaks)
        out["bound"] = pd.array(bounds, dtype="string")
        out["reason"] = pd.array(reasons, dtype="string")
        out["peaks"] = peaks.label()
    order = {p: i for i, p in enumerate(PHASES)}
    role_order = {r: i for i, r in enumerate(BLOCK_ROLES)}
    out["_p"] = ranked(out["phase"], order, 99)
    out["_r"] = ranked(out["role"], role_order, 50).where(
        (out["module"] != "(forward)").fillna(True).astype(bool), 98)  # a null module is a block row
    out = out.sort_values(["_p", "_r"], kind="stable")
    return _conform(out)


def _forward_rows(groups: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """One row per phase for the whole forward: block totals (from the groups' sums) over the
    steps' forward time."""
    blocks = groups[groups["role"].isin(BLOCK_ROLES)]
    g = blocks.groupby("phase", sort=False)
    fl = g["flops"].sum(min_count=1)
    by_ = g["bytes_moved"].sum(min_count=1)
    blk_gpu = g["gpu_ms"].sum(min_count=1)
    s = steps.groupby("phase", sort=False, observed=True)
    rows = pd.DataFrame({
        "calls": s.size(),
        "host_ms": s["forward_ms"].sum(),
        "gpu_ms": s["gpu_ms"].sum(min_count=1),
        "_gpu_n": s["gpu_ms"].count(),
    })
    rows["flops"] = fl.reindex(rows.index)
    rows["bytes_moved"] = by_.reindex(rows.index)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows["gpu_idle_fraction"] = (1.0 - blk_gpu.reindex(rows.index) / rows["gpu_ms"]).clip(lower=0.0)
    rows["_on_gpu"] = rows["_gpu_n"] == rows["calls"]
    rows = rows.reset_index()
    rows["module"] = "(forward)"
    rows["role"] = "forward"
    rows["layer"] = pd.array([pd.NA] * len(rows), dtype="Int64")
    return rows[rows["flops"].notna()]


def bound_summary(roof: pd.DataFrame) -> pd.DataFrame:
    """Per phase, the share of time each bound accounts for (block rows only).

    Returns:
        Columns of :data:`probe.schema.BOUND_SUMMARY`.
    """
    r = roof[(roof["module"] != "(forward)") & roof["role"].isin(BLOCK_ROLES) & roof["bound"].notna()]
    if r.empty:
        return schema.empty(BOUND_SUMMARY)
    g = r.groupby(["phase", "bound"], sort=False, observed=True)["time_ms"].sum().reset_index()
    g["share"] = g["time_ms"] / g.groupby("phase")["time_ms"].transform("sum")
    return g.astype(BOUND_SUMMARY)
