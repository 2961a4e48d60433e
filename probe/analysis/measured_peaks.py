"""Roofs measured on this machine: a short matmul and copy micro-benchmark, and the quiet CPU figure.

:func:`measure_peaks` times back-to-back matrix products and a large copy on a device now (well
under 2 s, cached per process). A CPU's figure for runs is :func:`cpu_peaks`: measured **once per
machine, when it is quiet**, and cached, because a measurement on a busy machine reads the
neighbours' load, not the machine (0.5 GFLOP/s, a ridge of "0.0 FLOP/B", blocks at 800 % of their
roof). "Quiet" is :func:`probe.recording.noise.quiet_now` before measuring, checked again by the
measurement's own run-queue wait (:data:`probe.analysis.peaks.QUIET_WAIT_PCT`); a busy machine with
no cached figure gets no CPU peaks at all, never a busy measurement. The cache lives in
``$XDG_CACHE_HOME/probe/peaks`` (``~/.cache/probe/peaks``), one small JSON file per CPU model, core
count, torch version, dtype and thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from .peaks import QUIET_WAIT_PCT, Peaks, dtype_key

log = logging.getLogger(__name__)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, reps: int, budget_s: float) -> float:
    """Best wall time of ``fn`` over up to ``reps`` runs within ``budget_s``."""
    best = float("inf")
    t_end = time.perf_counter() + budget_s
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return best


#: counted by :func:`measurements`: how many micro-benchmarks this process has run
_MEASURED = [0]


def measurements() -> int:
    """How many peak measurements this process has run (a cached figure runs none)."""
    return _MEASURED[0]


def _measure_now(device_str: str, dtype_str: str, budget_s: float, threads: int) -> Peaks:
    """One micro-benchmark, with the run-queue wait of this process while it ran (Linux)."""
    import torch

    from ..recording.noise import read_run_delay, run_delay_between

    _MEASURED[0] += 1
    device = torch.device(device_str)
    dtype = getattr(torch, dtype_str)
    half = budget_s / 2
    sched0, cpu0 = read_run_delay(), time.process_time_ns()
    # Matmul: back-to-back products (a lone small product on a busy machine mostly measures
    # thread wake-up), batched until one timed batch lasts ~20 ms; best batch of several.
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    k = 1

    def products() -> None:
        for _ in range(k):
            torch.mm(a, b, out=c)

    while True:
        t = _best_time(products, device, 2, half / 4)
        if t >= 0.02 or k >= 1024:
            break
        k *= 2
    t = _best_time(products, device, 10, half / 2)
    flops = 2.0 * n**3 * k / t
    # Copy: a buffer well past the last-level cache; read + write = 2 × bytes per copy.
    size = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    tc = _best_time(lambda: dst.copy_(src), device, 10, half / 2)
    bw = 2.0 * size / tc
    del a, b, c, src, dst
    wait_ns = run_delay_between(sched0, read_run_delay())
    cpu_ns = time.process_time_ns() - cpu0
    wait_pct = 100.0 * wait_ns / (wait_ns + cpu_ns) if wait_ns is not None and wait_ns + cpu_ns > 0 else None
    if device.type == "cpu":
        name = f"CPU ({platform.machine() or 'unknown'}, {threads} thread{'s' if threads != 1 else ''})"
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    how = (f"measured on this machine: {k} x {n}x{n} {dtype_str} matmuls (best of several), "
           f"{size // 2**20} MiB copy (read + write)")
    if wait_pct is not None:
        how += f"; {wait_pct:.1f} % of it waiting for a CPU"
    log.debug("measured peaks on %s: %.3g GFLOP/s, %.3g GB/s (wait %s %%)", name, flops / 1e9, bw / 1e9, wait_pct)
    return Peaks(name=name, dtype=dtype_str, flops_per_s=flops, bytes_per_s=bw, source=how, measured=True,
                 wait_pct=wait_pct)


_measure = functools.lru_cache(maxsize=None)(_measure_now)


def measure_peaks(device: Any = "cpu", dtype: Any = "float32", budget_s: float = 0.6) -> Peaks:
    """Measure peak matmul FLOP/s and copy bandwidth on ``device`` now (cached per process).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (any torch device that computes).
        dtype: matmul dtype (the run's dtype: half precision on many CPUs is far slower).
        budget_s: rough time budget for the whole measurement (default 0.6 s).
    Returns:
        :class:`Peaks` with ``measured=True``. The numbers are what this machine reaches
        now, with its current thread count and neighbours, busy or not (``wait_pct`` says
        how busy); :func:`cpu_peaks` is the CPU figure runs use: measured only when quiet.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    # keyed by the thread count too: the CPU roofs are those of the threads torch will use
    return _measure(str(dev), dtype_key(dtype), float(budget_s), torch.get_num_threads() if dev.type == "cpu" else 0)


#: bump when the cache file's layout or the micro-benchmark changes: older files are ignored
CACHE_FORMAT = 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_key(dtype: Any = "float32", threads: int | None = None) -> dict[str, Any]:
    """What a cached CPU figure is valid for: CPU model, cores, torch version, dtype, threads."""
    import torch

    return {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count() or 1, "torch_version": torch.__version__,
            "dtype": dtype_key(dtype), "threads": int(threads if threads is not None else torch.get_num_threads()),
            "format": CACHE_FORMAT}


def cache_path(key: dict[str, Any]) -> Path:
    """The cache file of ``key`` in ``$XDG_CACHE_HOME/probe/peaks`` (``~/.cache/probe/peaks``)."""
    from ..store.files import user_cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return user_cache_dir() / "peaks" / f"cpu-{key['dtype']}-{key['threads']}t-{digest}.json"


def _read_cached(path: Path, key: dict[str, Any]) -> Peaks | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        pk = Peaks.from_dict(data["peaks"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    good = all(math.isfinite(v) and v > 0 for v in (pk.flops_per_s, pk.bytes_per_s))
    return pk if good and not pk.busy() else None


def _write_cached(path: Path, key: dict[str, Any], peaks: Peaks) -> None:
    """Write the cache file whole or not at all: a temporary file beside it, then renamed over
    it (two processes measuring at once leave one complete file)."""
    text = json.dumps({"key": key, "peaks": peaks.to_dict(),
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..store.files import write_text

    write_text(path, text)


def cpu_peaks(dtype: Any = "float32", *, measure: bool = True, budget_s: float = 0.6) -> tuple[Peaks | None, str]:
    """This machine's CPU roofs for ``dtype`` at torch's thread count: cached, or measured now if quiet.

    Args:
        dtype: the run's dtype.
        measure: on a cache miss, measure when the machine is quiet (else return ``None``).
        budget_s: time budget of a measurement.
    Returns:
        ``(peaks, why)``: peaks from the cache file, or from a measurement taken now on a quiet
        machine (then cached, atomically); ``None`` when there is no cached figure and the
        machine is busy, or the measurement found itself waiting for a CPU (thrown away).
        ``why`` says which, with the numbers.
    """
    import torch

    threads = torch.get_num_threads()
    key = cpu_key(dtype, threads)
    path = cache_path(key)
    cached = _read_cached(path, key)
    if cached is not None:
        return cached, f"CPU peaks from the cache ({path})"
    if not measure:
        return None, f"no cached CPU peaks for this machine ({path})"
    from ..recording.noise import quiet_now

    verdict = quiet_now(threads)
    if not verdict.quiet:
        return None, (f"CPU peaks not measured: the machine is busy ({verdict.why}); they are measured once, "
                      f"when it is quiet, and cached in {path}")
    pk = _measure_now("cpu", key["dtype"], float(budget_s), threads)
    if pk.busy():
        return None, (f"CPU peaks thrown away: {pk.wait_pct:.0f} % of the measurement was spent waiting for a "
                      f"CPU (over {QUIET_WAIT_PCT:.0f} %); they are measured again when the machine is quiet")
    pk = Peaks(**{**pk.to_dict(), "source": pk.source + f"; on a quiet machine, cached in {path.name}"})
    try:
        _write_cached(path, key, pk)
    except OSError as exc:  # a read-only home costs a re-measurement next time, not the peaks
        log.warning("could not cache the CPU peaks in %s: %s", path, exc)
    return pk, "CPU peaks measured now on a quiet machine"
