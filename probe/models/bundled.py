"""The bundled offline model, ``probe-tiny-llama-32l``: its config, tokenizer, weights and folder.

genprobe must run (and its tests must pass) without any network access, so it
ships its own model: ``probe-tiny-llama-32l``.  It is a LLaMA-architecture
decoder with the *depth* of LLaMA-2-7B (32 layers, so the per-token kernel
launch pattern, the KV-cache structure and the per-layer timeline look like the
real thing) but a tiny width (hidden size 128), and random weights generated
from a fixed seed.  Only the SentencePiece tokenizer is stored on disk
(``probe/assets/tokenizer.model``, produced by ``tools/train_tokenizer.py``);
the weights are regenerated in about a second on every load.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import pathlib
import shutil
from typing import TYPE_CHECKING, Any

from .building import build_model, record_dtype, set_generation_defaults
from .precision import resolve_dtype

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


#: Model id of the bundled offline model (accepted by :func:`preset_config` as an
#: alias of the ``"tiny"`` preset).
BUNDLED_ID = "probe-tiny-llama-32l"

# Number of pieces in probe/assets/tokenizer.model.  Kept as a constant so that
# building a config (and importing this module) never has to open the tokenizer;
# tests/test_models.py checks it against the real file, and it must match
# DEFAULT_VOCAB_SIZE in tools/train_tokenizer.py.
BUNDLED_VOCAB_SIZE = 3000

# Special token ids of the bundled tokenizer (same layout as LLaMA's).
_UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2

# The bundled architecture.  intermediate_size follows LLaMA's recipe
# (8/3 * hidden, rounded up to a multiple of 32: 341.3 -> 352), and 4 heads of
# dim 32 keep head_dim a multiple of 8 so fused attention kernels (SDPA/flash)
# accept it on GPUs.
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": BUNDLED_VOCAB_SIZE,
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
        path = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer.model"
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
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    if len(tokenizer) != BUNDLED_VOCAB_SIZE:
        raise RuntimeError(
            f"Bundled tokenizer at {path} has {len(tokenizer)} pieces, expected {BUNDLED_VOCAB_SIZE}; "
            "the tokenizer file and probe.models are out of sync."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def bundled_config(**overrides: Any) -> LlamaConfig:
    """Return the configuration of the bundled ``probe-tiny-llama-32l`` model.

    Args:
        **overrides: ``LlamaConfig`` fields to change (e.g.
            ``num_hidden_layers=2`` for a faster model in tests).

    Returns:
        A ``transformers.LlamaConfig``.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**{**copy.deepcopy(TINY_CONFIG), **overrides})


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
    model = build_model(
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
        record_dtype(model.config, torch_dtype)
    set_generation_defaults(model, tokenizer.pad_token_id)
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
