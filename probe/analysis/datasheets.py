"""Datasheet roofs of known accelerators: the table (:data:`KNOWN`) and its look-up by device name.

Dense peaks only (half of the "with sparsity" figures), each entry with its source; a CUDA device
name from ``torch.cuda.get_device_name()`` is matched by regex, and boards that share a name are
told apart by their memory. A CPU has no entry: its roofs are measured
(:mod:`probe.analysis.measured_peaks`).
"""

from __future__ import annotations

import re
from typing import Any

from .peaks import Peaks, dtype_key

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


def table_peaks(device_name: str, dtype: Any = "bfloat16", total_memory_bytes: int | None = None) -> Peaks | None:
    """Datasheet :class:`Peaks` for a known accelerator and dtype, or ``None`` if unknown.

    ``float32`` uses the TF32 tensor-core peak when PyTorch allows TF32 matmuls, else the
    plain FP32 peak (PyTorch's default).
    """
    entry = lookup(device_name, total_memory_bytes)
    if entry is None:
        return None
    key = dtype_key(dtype)
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
