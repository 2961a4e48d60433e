"""Peak compute and memory bandwidth of the device a run used: a datasheet table, or measured.

Known accelerators come from :data:`KNOWN` (dense peaks, no 2:4 sparsity, each with its
source). A CPU has no datasheet entry: its roofs are measured by a short matrix-product and
copy micro-benchmark (:func:`measure_peaks`, well under 2 s), and the result says
``measured=True`` so charts and bound labels can say where their roofs came from.

CPU peaks are measured **once per machine, when it is quiet**, and cached
(:func:`cpu_peaks`): a measurement on a busy machine reads the neighbours' load, not the
machine (0.5 GFLOP/s, a ridge of "0.0 FLOP/B", blocks at 800 % of their roof). "Quiet" is
defined by :func:`probe.noise.quiet_now` before measuring and checked again by the
measurement's own run-queue wait (:data:`QUIET_WAIT_PCT`); a busy machine with no cached
figure gets no CPU peaks at all, never a busy measurement. The cache lives in ``$XDG_CACHE_HOME/probe/peaks``
(``~/.cache/probe/peaks``), one small JSON file per CPU model, core count, torch version,
dtype and thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peaks:
    """A device's roofs for one dtype: peak FLOP/s, peak bytes/s, and where they come from."""

    name: str  # device, e.g. "NVIDIA H100 SXM" or "CPU (x86_64, 2 threads)"
    dtype: str  # dtype the compute peak applies to
    flops_per_s: float  # dense peak FLOP/s for matmuls in ``dtype``
    bytes_per_s: float  # peak memory bandwidth, bytes/s
    source: str  # datasheet URL, or how it was measured
    measured: bool  # True: micro-benchmark on this machine; False: datasheet table
    # measured peaks: the share (percent) of the measurement this process spent waiting for a
    # CPU (run-queue wait over wait + CPU time); None where not recorded (datasheet, old runs)
    wait_pct: float | None = None

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where the two roofs meet: above it, compute bounds."""
        return self.flops_per_s / self.bytes_per_s

    @property
    def tflops(self) -> float:
        return self.flops_per_s / 1e12

    @property
    def gb_s(self) -> float:
        return self.bytes_per_s / 1e9

    def label(self) -> str:
        """A short human label, e.g. ``"measured peaks of CPU: 52.0 GFLOP/s float32, 9.10 GB/s"``."""
        from ..fmt import flop_s, byte_s

        kind = "measured" if self.measured else "datasheet"
        return f"{kind} peaks of {self.name}: {flop_s(self.flops_per_s)} {self.dtype}, {byte_s(self.bytes_per_s)}"

    def busy(self, threshold_pct: float | None = None) -> bool:
        """Measured while this process waited for a CPU more than ``threshold_pct`` (default
        :data:`QUIET_WAIT_PCT`) of the time: the figure measures the neighbours, do not use it."""
        limit = QUIET_WAIT_PCT if threshold_pct is None else threshold_pct
        return bool(self.measured and self.wait_pct is not None and self.wait_pct > limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Peaks":
        wait = d.get("wait_pct")
        return cls(**{k: d[k] for k in ("name", "dtype", "flops_per_s", "bytes_per_s", "source", "measured")},
                   wait_pct=None if wait is None else float(wait))


_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_L4 = "https://www.nvidia.com/en-us/data-center/l4/ (NVIDIA L4 datasheet)"
_A10 = "https://www.nvidia.com/en-us/data-center/products/a10-gpu/"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (Appendix A)"
_L40S = "https://www.nvidia.com/en-us/data-center/l40s/"

#: Dense datasheet peaks (TFLOP/s per dtype, memory GB/s), half of the "with sparsity" figures.
#: ``match`` is a regex on ``torch.cuda.get_device_name()``; ``mem_gib`` (min, max) tells
#: apart boards that share a name (A100 40 GB vs 80 GB).
KNOWN: list[dict[str, Any]] = [
    {"name": "NVIDIA H200 NVL", "match": r"H200.*NVL", "tflops": {"bfloat16": 835, "float16": 835, "tf32": 417, "float32": 60},
     "gb_s": 4800, "source": _H200},
    {"name": "NVIDIA H200 SXM", "match": r"H200", "tflops": {"bfloat16": 989, "float16": 989, "tf32": 494, "float32": 67},
     "gb_s": 4800, "source": _H200},
    {"name": "NVIDIA H100 NVL", "match": r"H100.*NVL", "tflops": {"bfloat16": 835, "float16": 835, "tf32": 417, "float32": 60},
     "gb_s": 3900, "source": _H100},
    {"name": "NVIDIA H100 PCIe", "match": r"H100.*PCIe", "tflops": {"bfloat16": 756, "float16": 756, "tf32": 378, "float32": 51},
     "gb_s": 2000, "source": _H100},
    {"name": "NVIDIA H100 SXM", "match": r"H100", "tflops": {"bfloat16": 989, "float16": 989, "tf32": 494, "float32": 67},
     "gb_s": 3350, "source": _H100},
    {"name": "NVIDIA A100 80GB PCIe", "match": r"A100.*PCI", "mem_gib": (60, 100),
     "tflops": {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}, "gb_s": 1935, "source": _A100},
    {"name": "NVIDIA A100 40GB PCIe", "match": r"A100.*PCI", "mem_gib": (0, 60),
     "tflops": {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}, "gb_s": 1555, "source": _A100},
    {"name": "NVIDIA A100 80GB SXM", "match": r"A100", "mem_gib": (60, 100),
     "tflops": {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}, "gb_s": 2039, "source": _A100},
    {"name": "NVIDIA A100 40GB SXM", "match": r"A100", "mem_gib": (0, 60),
     "tflops": {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}, "gb_s": 1555, "source": _A100},
    {"name": "NVIDIA L40S", "match": r"L40S", "tflops": {"bfloat16": 362, "float16": 362, "tf32": 183, "float32": 91.6},
     "gb_s": 864, "source": _L40S},
    {"name": "NVIDIA L4", "match": r"\bL4\b", "tflops": {"bfloat16": 121, "float16": 121, "tf32": 60, "float32": 30.3},
     "gb_s": 300, "source": _L4},
    {"name": "NVIDIA A10", "match": r"\bA10\b(?!0)", "tflops": {"bfloat16": 125, "float16": 125, "tf32": 62.5, "float32": 31.2},
     "gb_s": 600, "source": _A10},
    # FP16/BF16 tensor throughput with FP32 accumulation (what PyTorch matmuls use).
    {"name": "NVIDIA GeForce RTX 4090", "match": r"RTX 4090", "tflops": {"bfloat16": 165.2, "float16": 165.2, "tf32": 82.6,
                                                                          "float32": 82.6},
     "gb_s": 1008, "source": _ADA},
]


def lookup(device_name: str, total_memory_bytes: int | None = None) -> dict[str, Any] | None:
    """The :data:`KNOWN` entry for a CUDA device name (first match wins), or ``None``."""
    if not device_name:
        return None
    gib = total_memory_bytes / 2**30 if total_memory_bytes else None
    for entry in KNOWN:
        if not re.search(entry["match"], device_name, flags=re.I):
            continue
        rng = entry.get("mem_gib")
        if rng is not None and gib is not None and not (rng[0] <= gib < rng[1]):
            continue
        return entry
    return None


def _dtype_key(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)


def table_peaks(device_name: str, dtype: Any = "bfloat16", total_memory_bytes: int | None = None) -> Peaks | None:
    """Datasheet :class:`Peaks` for a known accelerator and dtype, or ``None`` if unknown.

    ``float32`` uses the TF32 tensor-core peak when PyTorch allows TF32 matmuls, else the
    plain FP32 peak (PyTorch's default).
    """
    entry = lookup(device_name, total_memory_bytes)
    if entry is None:
        return None
    key = _dtype_key(dtype)
    if key == "float32":
        try:
            import torch

            if torch.backends.cuda.matmul.allow_tf32:
                key = "tf32"
        except Exception:  # pragma: no cover
            pass
    tflops = entry["tflops"].get(key)
    if tflops is None:
        return None
    return Peaks(name=entry["name"], dtype=key, flops_per_s=tflops * 1e12, bytes_per_s=entry["gb_s"] * 1e9,
                 source=entry["source"], measured=False)


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
    return _measure(str(dev), _dtype_key(dtype), float(budget_s), torch.get_num_threads() if dev.type == "cpu" else 0)


# --------------------------------------------------------------------------- quiet CPU peaks
#: a measurement during which this process's threads waited for a CPU more than this share of
#: (wait + CPU time), in percent, is thrown away (the same bar as a run's noise figure)
QUIET_WAIT_PCT = 10.0
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
            "dtype": _dtype_key(dtype), "threads": int(threads if threads is not None else torch.get_num_threads()),
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
