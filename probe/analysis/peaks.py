"""A device's roofs for one dtype — peak FLOP/s and bytes/s and where they come from — as one record.

:class:`Peaks` is what the roofline, the reports and a saved run (``meta["peaks"]``) hold, whether
the figures come from a datasheet (:mod:`probe.analysis.datasheets`) or were measured on this
machine (:mod:`probe.analysis.measured_peaks`). :data:`QUIET_WAIT_PCT` is the bar a measured figure
must pass to be used at all: measured while the process waited for a CPU more than that, it
measures the neighbours, not the machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: a measurement during which this process's threads waited for a CPU more than this share of
#: (wait + CPU time), in percent, is thrown away (the same bar as a run's noise figure)
QUIET_WAIT_PCT = 10.0


def dtype_key(dtype: Any) -> str:
    """The dtype name a figure is kept under: ``torch.bfloat16``, ``"bf16"`` -> ``"bfloat16"``."""
    name = str(dtype).replace("torch.", "")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)


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
