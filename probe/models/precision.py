"""User-facing dtype spellings (``bf16``, ``half``, ``auto`` ...) turned into a ``torch.dtype``.

Every loader of :mod:`probe.models` takes its ``dtype`` argument through :func:`resolve_dtype`,
so ``"bf16"``, ``"torch.bfloat16"`` and ``torch.bfloat16`` mean the same everywhere. torch is
imported inside the function, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

#: every accepted spelling (lower case, no ``torch.`` prefix) -> the torch dtype's name
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "single": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def resolve_dtype(s: str | torch.dtype, *, device: str | torch.device | None = None) -> torch.dtype:
    """Turn a user-facing dtype spelling into a ``torch.dtype``.

    Args:
        s: A floating ``torch.dtype``, or one of (case-insensitive, optional
            ``torch.`` prefix) ``float32``/``fp32``/``f32``/``float``,
            ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, or ``auto``.
        device: Only used for ``"auto"``: the device the model will run on
            (default: ``cuda`` if available, else ``cpu``).  ``auto`` picks
            bfloat16 on a GPU that supports it, float16 on other GPUs, and
            float32 on CPU, where half-precision matmuls are often slower.

    Returns:
        The resolved ``torch.dtype``.

    Raises:
        ValueError: For an unknown spelling or a non-floating dtype.
    """
    import torch

    if isinstance(s, torch.dtype):
        if not s.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type for model weights, got {s}")
        return s
    if not isinstance(s, str):
        raise ValueError(f"dtype must be a string or torch.dtype, got {type(s).__name__}: {s!r}")

    key = s.strip().lower()
    if key.startswith("torch."):
        key = key[len("torch.") :]
    if key == "auto":
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in DTYPE_NAMES:
        valid = ", ".join(sorted(DTYPE_NAMES) + ["auto"])
        raise ValueError(f"Unknown dtype {s!r}. Valid choices: {valid} (or a floating torch.dtype).")
    return getattr(torch, DTYPE_NAMES[key])
