"""Peak compute and memory bandwidth of the device a run used: a datasheet table, or measured.

Known accelerators come from :data:`KNOWN` (dense peaks, no 2:4 sparsity, each with its
source; :mod:`probe.analysis.datasheets`). A CPU has no datasheet entry: its roofs are measured
by a short matrix-product and copy micro-benchmark (:func:`measure_peaks`, well under 2 s), and
the result says ``measured=True`` so charts and bound labels can say where their roofs came from.

CPU peaks are measured **once per machine, when it is quiet**, and cached (:func:`cpu_peaks`,
:mod:`probe.analysis.measured_peaks`): a busy machine with no cached figure gets no CPU peaks at
all, never a busy measurement (:data:`QUIET_WAIT_PCT`).

This module decides which roofs a device (:func:`peaks_for`) or a recorded run
(:func:`peaks_for_run`) gets, and whether figures may be used (:func:`usable`); it is the public
face of all three (``probe.hardware``), naming the record (:class:`Peaks`), the table and the
measurements too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

# the record, the datasheet table and the measurements are this module's public face too
# (``probe.hardware.Peaks``, ``probe.hardware.KNOWN``, ``probe.hardware.measure_peaks``):
# this module decides which of them a device or a run gets
from .datasheets import KNOWN, lookup, table_peaks
from .measured_peaks import CACHE_FORMAT, cache_path, cpu_key, cpu_peaks, measure_peaks, measurements
from .peaks import QUIET_WAIT_PCT, Peaks, dtype_key

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT", "KNOWN", "QUIET_WAIT_PCT", "Peaks", "cache_path", "cpu_key", "cpu_peaks", "dtype_key",
    "lookup", "measure_peaks", "measurements", "peaks_for", "peaks_for_run", "table_peaks", "usable",
]


def usable(peaks: Peaks | None, run_wait_pct: float | None = None) -> tuple[Peaks | None, str]:
    """``peaks`` unless they were measured on a busy machine, with the reason when not.

    Busy: the measurement's own run-queue wait passed :data:`QUIET_WAIT_PCT`
    (:meth:`Peaks.busy`), or the peaks were measured without recording their wait (runs
    recorded before the figure was cached), at recording time, and the run's noise figure
    ``run_wait_pct`` (``Run.noise().wait_pct``) says the machine was busy then.
    """
    if peaks is None:
        return None, ""
    if peaks.busy():
        return None, (f"the peaks were measured while {peaks.wait_pct:.0f} % of the measurement was spent waiting "
                      "for a CPU: they measure the neighbours, not the machine")
    busy_run = run_wait_pct is not None and math.isfinite(run_wait_pct) and run_wait_pct > QUIET_WAIT_PCT
    if peaks.measured and peaks.wait_pct is None and busy_run:
        return None, (f"the peaks were measured while recording on a busy machine ({run_wait_pct:.0f} % of the "
                      "step time was spent waiting for a CPU): they measure the neighbours, not the machine")
    return peaks, ""


def peaks_for(device: Any = "cpu", dtype: Any = "float32", *, device_name: str | None = None,
              measure: bool = True) -> Peaks | None:
    """The roofs for a device: the datasheet table if the GPU is known; a CPU's from
    :func:`cpu_peaks` (cached, or measured now only if the machine is quiet); else a measurement.

    Args:
        device: the torch device the run used (``"cpu"``, ``"cuda:0"``...).
        dtype: the run's dtype.
        device_name: a recorded GPU name (``runs.gpu_name``), for a run loaded elsewhere.
        measure: measure (or, on CPU, read the cache) when the table does not know the device;
            ``False`` returns ``None`` for it.
    Returns:
        :class:`Peaks` or ``None`` (a CPU on a busy machine with nothing cached: the reason is
        logged as a warning).
    """
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" or device_name:
        name = device_name
        mem = None
        if dev.type == "cuda" and torch.cuda.is_available():
            name = name or torch.cuda.get_device_name(dev)
            mem = torch.cuda.get_device_properties(dev).total_memory
        found = table_peaks(name or "", dtype, mem)
        if found is not None:
            return found
        if dev.type == "cuda" and not torch.cuda.is_available():
            return None
    if not measure or dev.type == "meta":
        return None
    if dev.type == "cpu":
        peaks, why = cpu_peaks(dtype)
        if peaks is None:
            log.warning("%s", why)
        return peaks
    return measure_peaks(dev, dtype)


def _local_cuda_name(device: str) -> str | None:
    import torch

    try:
        return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # the recorded cuda:N does not exist here
        return None


def peaks_for_run(run: Any, measure: bool = True) -> Peaks | None:
    """Roofs for a recorded :class:`probe.Run`: its GPU from the table, else measured here.

    A CPU run gets this machine's cached quiet figure, or a measurement now if the machine is
    quiet (:func:`cpu_peaks`), else ``None`` with the reason logged as a warning; never a
    measurement on a busy machine. That is the recording machine's only if you analyse where
    you recorded; the returned ``source`` says how it was measured.
    """
    runs = run.runs
    if runs.empty:
        return None
    r = runs.iloc[0]

    def text(v: Any) -> str | None:
        try:
            import pandas as pd

            if v is None or pd.isna(v):
                return None
        except (TypeError, ValueError):
            pass
        return str(v)

    device = text(r["device"]) or "cpu"
    dtype = text(r["dtype"]) or "float32"
    gpu = text(r["gpu_name"])
    if device.startswith("cuda"):
        if gpu is not None:
            # the recorded card's datasheet, wherever the run is read: never the local GPU's
            known = table_peaks(gpu, dtype)
            if known is not None:
                return known
        if not measure:
            return None
        import torch

        local_same = (torch.cuda.is_available() and gpu is not None
                      and _local_cuda_name(device) == gpu)
        return peaks_for(device, dtype, device_name=gpu, measure=measure) if local_same else None
    if not measure:  # no datasheet for a CPU; nothing of this machine either (no torch import)
        return None
    return peaks_for("cpu", dtype)
