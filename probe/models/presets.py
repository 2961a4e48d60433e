"""Full-size architectures with random weights: the preset table and :func:`build_preset`.

For memory/throughput studies of real model sizes, :data:`PRESETS` describes the
architectures of a few popular 7B models (and the bundled ``tiny`` one);
:func:`build_preset` instantiates them with random weights directly on the target device, or
on the ``meta`` device for zero-memory shape walkthroughs. No checkpoint is downloaded.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from .building import build_model, set_generation_defaults
from .bundled import BUNDLED_ID, TINY_CONFIG
from .precision import resolve_dtype

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

#: Full-size architectures (random weights only: no checkpoint is downloaded).
#: Each entry has ``model_type`` (a transformers config type), ``source`` (where
#: the numbers come from) and ``config`` (keyword arguments for that config class).
#: ``rope_theta`` is given as a plain kwarg, which transformers 4.x stores as is
#: and 5.x folds into ``rope_parameters``.
# LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json); chinese-llama-2-7b differs only in vocab.
_LLAMA2_7B_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Source: meta-llama/Llama-2-7b-hf, config.json.
    "llama-2-7b": {
        "model_type": "llama",
        "source": "meta-llama/Llama-2-7b-hf config.json",
        "config": dict(_LLAMA2_7B_CONFIG),
    },
    # Source: Linly-AI/Chinese-LLaMA-2-7B-hf, config.json (LLaMA-2-7B with 8076
    # Chinese pieces added to the vocabulary: 32000 + 8076 = 40076).  Note that
    # the similarly named hfl/chinese-llama-2-7b uses a 55296-piece vocabulary.
    "chinese-llama-2-7b": {
        "model_type": "llama",
        "source": "Linly-AI/Chinese-LLaMA-2-7B-hf config.json (LLaMA-2-7B, vocab 32000 + 8076 Chinese pieces)",
        "config": {**_LLAMA2_7B_CONFIG, "vocab_size": 40076},
    },
    # Source: mistralai/Mistral-7B-Instruct-v0.2, config.json.  We follow v0.2
    # (full attention, sliding_window=None, rope_theta=1e6) rather than v0.1
    # (sliding_window=4096, rope_theta=1e4): v0.2+ is what people deploy today,
    # and with full attention the KV cache grows with the whole context, which is
    # what the profiler's memory reports should show.  Shapes are identical.
    "mistral-7b": {
        "model_type": "mistral",
        "source": "mistralai/Mistral-7B-Instruct-v0.2 config.json (v0.2+: no sliding window)",
        "config": {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
    },
    # Source: Qwen/Qwen2-7B, config.json (base model; q/k/v projections carry a
    # bias, which Qwen2's modeling code adds unconditionally).
    "qwen2-7b": {
        "model_type": "qwen2",
        "source": "Qwen/Qwen2-7B config.json",
        "config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 28,
            "initializer_range": 0.02,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "tie_word_embeddings": False,
        },
    },
    # The bundled offline model (see bundled_config / load_bundled).
    "tiny": {
        "model_type": "llama",
        "source": f"bundled {BUNDLED_ID} (probe.models.bundled)",
        "config": TINY_CONFIG,
    },
}

# Other spellings accepted by preset_config/build_preset.
_PRESET_ALIASES = {BUNDLED_ID: "tiny"}


def _normalize_preset_name(name: str) -> str:
    """Map a user-provided preset name to a key of :data:`PRESETS`.

    Args:
        name: Preset name, case-insensitive; ``_`` may be used for ``-``.

    Returns:
        The canonical key.

    Raises:
        ValueError: If the name is unknown (the message lists the valid names).
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        valid = ", ".join(sorted(PRESETS) + sorted(_PRESET_ALIASES))
        raise ValueError(f"Unknown preset {name!r}. Valid presets: {valid}.")
    return key


def find_preset(name: str) -> str | None:
    """The :data:`PRESETS` key ``name`` stands for (case-insensitive, ``_`` for ``-``), else ``None``."""
    try:
        return _normalize_preset_name(name)
    except ValueError:
        return None


def preset_names() -> list[str]:
    """Every preset name :func:`find_preset` accepts, sorted (for error messages and help)."""
    return sorted(PRESETS) + sorted(_PRESET_ALIASES)


def preset_source(name: str) -> str:
    """Where the numbers of preset ``name`` come from (a model card's ``config.json``).

    Raises:
        ValueError: For an unknown preset (the message lists the valid names).
    """
    return str(PRESETS[_normalize_preset_name(name)]["source"])


def preset_config(name: str, **overrides: Any) -> PretrainedConfig:
    """Build the transformers config of a preset.

    Args:
        name: A key of :data:`PRESETS` (or ``BUNDLED_ID``).
        **overrides: Config fields to change (e.g. ``num_hidden_layers=2``).

    Returns:
        An instance of the preset's config class (``LlamaConfig``,
        ``MistralConfig``, ``Qwen2Config``...).

    Raises:
        ValueError: For an unknown preset name.
    """
    from transformers import AutoConfig

    entry = PRESETS[_normalize_preset_name(name)]
    kwargs = {**copy.deepcopy(entry["config"]), **overrides}
    return AutoConfig.for_model(entry["model_type"], **kwargs)


def build_preset(
    name: str,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    seed: int = 0,
    meta: bool = False,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Instantiate a preset architecture with random weights.

    Parameters are created directly on ``device`` in ``dtype`` (a 7B model in
    bfloat16 needs ~13.5 GB there and nothing on the CPU).  The caller's RNG
    state is preserved.  Note that weights initialised on different devices
    differ (each device has its own generator).

    Args:
        name: Preset name (see :data:`PRESETS`).
        dtype: Parameter dtype (anything :func:`resolve_dtype` accepts).
        device: Target device; ignored when ``meta`` is true.
        seed: Weight initialisation seed.
        meta: Build on the ``meta`` device: shapes and dtypes only, no memory,
            no computation — for parameter counting and shape walkthroughs.
        attn_implementation: Optional attention backend for transformers.
        **config_overrides: Changes to the preset config (e.g.
            ``num_hidden_layers=2``).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: For an unknown preset or dtype.
    """
    import torch

    config = preset_config(name, **config_overrides)
    torch_device = torch.device("meta") if meta else torch.device(device)
    torch_dtype = resolve_dtype(dtype, device=None if meta else torch_device)
    model = build_model(
        config, dtype=torch_dtype, device=torch_device, seed=seed, attn_implementation=attn_implementation
    )
    set_generation_defaults(model, getattr(config, "pad_token_id", None))
    model.config.probe_weights_source = "none (meta device)" if meta else f"random (seed {seed}): generated text is meaningless"
    model.config.name_or_path = f"preset:{name}"  # the id the CLI gives it too
    logger.debug("built preset %s (dtype=%s, device=%s)", name, torch_dtype, torch_device)
    return model
