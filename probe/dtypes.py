"""Tensor dtypes by name and size, for the frames (which store a dtype as its name) and the cost model.

torch is imported only where a dtype name has to be turned back into a ``torch.dtype``.
"""

from __future__ import annotations

from typing import Any


def dtype_name(dt: Any) -> str | None:
    """A dtype as the frames store it: ``torch.bfloat16`` -> ``"bfloat16"``; ``None`` stays ``None``."""
    return None if dt is None else str(dt).replace("torch.", "")


def torch_dtype(d: Any):
    """The ``torch.dtype`` of a dtype or its name (``"bfloat16"``, ``"torch.float16"``); ``None`` if unknown."""
    import torch

    if d is None:
        return None
    if isinstance(d, torch.dtype):
        return d
    v = getattr(torch, dtype_name(d), None)
    return v if isinstance(v, torch.dtype) else None


#: bytes per element of the common dtypes by name, so a saved run is costed without importing torch
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8}


def itemsize(x: Any, default: int | float = 0) -> int | float:
    """Bytes per element of a tensor, a ``torch.dtype`` or a dtype name; ``default`` if unknown."""
    if hasattr(x, "element_size"):
        return int(x.element_size())
    if isinstance(x, str):
        if dtype_name(x) in ITEMSIZE:
            return ITEMSIZE[dtype_name(x)]
        x = torch_dtype(x) if x else None
    size = getattr(x, "itemsize", None)
    return default if size is None else int(size)
