"""A causal LM built from its config with seeded random weights, directly on its device.

Shared by the bundled model (:mod:`probe.models.bundled`) and the full-size presets
(:mod:`probe.models.presets`): parameters are allocated on the target device in the target
dtype, from a generator seeded without touching the caller's RNG state, so a 7B model is never
materialised on the CPU first and a given seed gives the same weights every time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the RNG used to initialise weights on ``device`` without leaking state.

    ``torch.manual_seed`` would also reseed every CUDA device, so instead we seed
    only the generator of the device the weights are created on, inside
    ``torch.random.fork_rng`` so the caller's RNG state is restored afterwards.

    Args:
        seed: Seed for the weight initialisation.
        device: Device the parameters are created on.

    Yields:
        Nothing; the block runs with a freshly seeded generator.
    """
    import torch

    if device.type == "meta":  # nothing random happens on meta tensors
        yield
        return
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = getattr(torch, device.type)
    index = device.index
    if index is None:
        index = module.current_device() if hasattr(module, "current_device") else 0
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        else:  # e.g. mps/xpu: their manual_seed targets the (single/current) device
            module.manual_seed(seed)
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (restored on exit).

    Args:
        dtype: Floating dtype new parameters should be created in.

    Yields:
        Nothing.
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def record_dtype(config: PretrainedConfig, dtype: torch.dtype) -> None:
    """Store the weights' dtype on a config (``config.dtype``, transformers 4.56+ and 5.x).

    Args:
        config: The model config.
        dtype: The parameter dtype.
    """
    config.dtype = dtype


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    attn_implementation: str | None,
) -> PreTrainedModel:
    """Instantiate a causal LM with random weights directly on ``device``.

    Parameters are allocated on the target device and in the target dtype (via
    ``with torch.device(...)`` and the default dtype), so a 7B model is never
    materialised on the CPU first.  Weights come from transformers' own init,
    driven by a generator seeded with ``seed`` (see :func:`_seeded_rng`).

    Args:
        config: Model configuration.
        dtype: Parameter dtype.
        device: Target device (``meta`` allocates nothing).
        seed: Initialisation seed.
        attn_implementation: Optional attention backend (``"eager"``,
            ``"sdpa"``, ``"flash_attention_2"``...).

    Returns:
        The model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _seeded_rng(seed, device), _default_dtype(dtype), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    record_dtype(model.config, dtype)
    return model.eval()


def set_generation_defaults(model: PreTrainedModel, pad_token_id: int | None) -> None:
    """Fill in special-token ids on the model's generation config.

    Sampling settings are left at transformers' defaults (greedy unless the
    caller asks for ``do_sample=True``).

    Args:
        model: The model whose ``generation_config`` is updated.
        pad_token_id: Id used for padding (``None`` leaves it unset).
    """
    gen = model.generation_config
    gen.bos_token_id = model.config.bos_token_id
    gen.eos_token_id = model.config.eos_token_id
    if pad_token_id is not None:
        gen.pad_token_id = pad_token_id
