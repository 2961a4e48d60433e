"""The differences between the transformers versions probe supports, in one place.

Supported: transformers 4.57 (the floor, ``pyproject.toml``) to the newest 5.x; CI runs the
suite on both ends. What differs, and where it is handled:

- Rotary embeddings in 4.x enter ``torch.autocast(device_type=x.device.type, enabled=False)``,
  which torch refuses for ``"meta"`` tensors ("unsupported scalarType"); 5.x goes through
  ``maybe_autocast``, which skips device types without autocast. :func:`meta_forward` gives
  4.x the same rule for the duration of a forward on the meta device.
- Tensor parallelism: 5.x takes ``distributed_config=DistributedConfig(tp_plan=...)`` (the
  bare ``tp_plan=`` is deprecated there); 4.x takes ``tp_plan=`` and its ``DistributedConfig``
  has no ``tp_plan``. :func:`tensor_parallel_kwargs`.
- The forward's cache argument: ``cache`` in 5.x, ``past_key_values`` in 4.x. :func:`cache_kwarg`.
- Continuous batching: both have ``generate_batch``; only newer versions take
  ``record_timestamps=True`` (per-token timestamps of each request). :func:`has_cb_timestamps`.
  The probe reads the manager's host-side state between forwards (the batch processor, its
  scheduler, its inputs/outputs holder and the requests packed into each forward), whose layout
  exists in the 5.x line only; :func:`continuous_batching_gap` says what is missing elsewhere.
- Mixture-of-experts layers: 4.x keeps experts as a ``ModuleList`` of small MLPs of
  ``nn.Linear`` (Mixtral's under ``block_sparse_moe``), 5.x as fused ``[E, out, in]`` weight
  banks (under ``mlp``), run by default through fused kernels (:func:`eager_experts_kwargs`
  selects the plain loop). The cost model reads both structures (``probe.cost``), so nothing
  here names them.

Same on both ends (no switch needed): ``dtype=`` in ``from_pretrained``/``from_config`` (4.56+),
``DynamicCache(config=...)`` (4.56+), ``config.layer_types`` for per-layer sliding windows
(Gemma2, Qwen2, Mistral-style configs), ``Cache.layers[i].keys`` (4.56+; ``probe.cache`` also
reads older layouts).

This module imports torch only; transformers is imported inside the functions that need it,
and its version is read from the installed distribution's metadata, so ``import probe`` stays
free of transformers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch

#: The oldest transformers probe supports (and CI tests).
TRANSFORMERS_FLOOR = (4, 57)


def _parse_version(text: str) -> tuple[int, int, int]:
    """``"4.57.6"`` -> ``(4, 57, 6)``; pre-release and local suffixes are ignored."""
    parts = [int(m) for m in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


@functools.cache
def transformers_version() -> tuple[int, int, int] | None:
    """The installed transformers as ``(major, minor, patch)``; ``None`` when it is not installed."""
    try:
        return _parse_version(importlib.metadata.version("transformers"))
    except importlib.metadata.PackageNotFoundError:
        return None


def is_transformers_5() -> bool:
    """True on transformers 5.x (and later)."""
    v = transformers_version()
    return v is not None and v >= (5, 0, 0)


# --------------------------------------------------------------------------- meta-device forwards
class _MetaTolerantAutocast(torch.autocast):
    """``torch.autocast`` that is a no-op for a *disabled* autocast on a device type without
    autocast support (``meta``), as transformers 5's ``maybe_autocast``; otherwise torch's own."""

    def __new__(cls, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None):
        if not enabled and not torch.amp.is_autocast_available(device_type):
            return contextlib.nullcontext()
        return super().__new__(cls)


@contextlib.contextmanager
def meta_forward() -> Iterator[None]:
    """Context for running a forward of a transformers model on meta tensors.

    On transformers 4.x the rotary embeddings switch autocast off with
    ``torch.autocast(device_type="meta", enabled=False)``, which torch refuses. Inside this
    context ``torch.autocast`` turns such a disabled autocast on a device type that has none
    into a null context (what 5.x does in ``maybe_autocast``); every other use is torch's own
    class. The original is restored on exit, on every path. On 5.x this does nothing.
    """
    if is_transformers_5() or torch.autocast is _MetaTolerantAutocast:
        yield
        return
    original = torch.autocast
    torch.autocast = _MetaTolerantAutocast  # type: ignore[misc]
    try:
        yield
    finally:
        torch.autocast = original  # type: ignore[misc]


# --------------------------------------------------------------------------- model loading and forwards
def tensor_parallel_kwargs(plan: str | dict = "auto") -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a tensor-parallel load with ``plan``.

    5.x: ``{"distributed_config": DistributedConfig(tp_plan=plan)}``; 4.x: ``{"tp_plan": plan}``.
    """
    if is_transformers_5():
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan=plan)}
    return {"tp_plan": plan}


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` (5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an inspectable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def eager_experts_kwargs() -> dict[str, Any]:
    """``from_config``/``from_pretrained`` keyword arguments that run mixture-of-experts layers
    as a plain loop of matmuls over each expert's routed tokens.

    5.x defaults to fused kernels (``experts_implementation="grouped_mm"``), which
    ``torch.utils.flop_counter`` does not count; 4.x always runs experts as such a loop of
    ``nn.Linear`` calls and takes no such argument.
    """
    return {"experts_implementation": "eager"} if is_transformers_5() else {}


def new_dynamic_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` laid out for ``config`` (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


# --------------------------------------------------------------------------- continuous batching
@functools.cache
def has_cb_timestamps() -> bool:
    """Whether continuous batching can record per-token timestamps of each request.

    True when ``generate_batch`` takes ``record_timestamps`` (newer 5.x); False on 4.57, whose
    continuous batching exists but records no timestamps, so per-request TTFT/ITL cannot be
    read from it there: a feature that needs them should refuse clearly on that version,
    naming the transformers it needs.
    """
    from transformers import GenerationMixin

    fn = getattr(GenerationMixin, "generate_batch", None)
    if fn is None:
        return False
    return "record_timestamps" in inspect.signature(fn).parameters


def gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask for dense float32 weights: newer transformers keeps GGUF blocks packed when it can.

    Transformers releases with ``GgufConfig`` keep the weights in their quantized blocks when
    a matmul kernel is available; the probe must time an ordinary model, so the weights are
    unpacked. Older releases always unpack and have no such option.
    """
    import transformers

    config_cls = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": config_cls(dequantize=True)} if config_cls is not None else {}


@functools.cache
def continuous_batching_gap() -> str | None:
    """Why the probe cannot profile continuous batching with the installed transformers, or
    ``None`` when it can.

    Needs: ``record_timestamps`` (per-request token times to check against), the
    ``ContinuousBatchingConfig`` switch for CUDA graphs (``use_cuda_graph``), and the host-side
    batch description the manager fills before each forward (``FutureRequestState`` entries
    with ``state``, ``query_length`` and ``has_new_token``).
    """
    v = transformers_version()
    if v is None:
        return "transformers is not installed"
    name = ".".join(str(x) for x in v)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.requests import FutureRequestState
    except ImportError:
        return (f"transformers {name} has no ContinuousBatchingConfig/FutureRequestState (its continuous batching "
                f"predates the manager layout the probe reads); install transformers>=5 for per-request profiling")
    if not has_cb_timestamps():
        return (f"transformers {name} records no per-token timestamps in continuous batching "
                f"(generate_batch has no record_timestamps); install transformers>=5 for per-request profiling")
    if "use_cuda_graph" not in getattr(ContinuousBatchingConfig, "__dataclass_fields__", {}):
        return f"transformers {name}: ContinuousBatchingConfig has no use_cuda_graph switch"
    if not {"state", "query_length", "has_new_token"} <= set(getattr(FutureRequestState, "__slots__", ())):
        return f"transformers {name}: the batch's FutureRequestState lacks state/query_length/has_new_token"
    return None
