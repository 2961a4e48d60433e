"""One model loader, with every check, for the CLI and for Python.

:func:`load` takes what a user names — a local Hugging Face model folder, a known name
(``smollm2-135m``, ``tiny``), a full-size preset (``llama-2-7b``), or nothing (``$PROBE_MODEL``,
else SmolLM2 when installed, else the bundled model) — and returns the model, its tokenizer and
the name the run shows. Everything that can go wrong is a :class:`ModelLoadError` whose message
says what to do: a folder without ``config.json`` or without a tokenizer, a tokenizer that does
not belong to the model, a missing package (with its install command), a broken cache.
Loading is offline: nothing is downloaded.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

from .. import deps
from .model_folder import Loaded, ModelLoadError, load_folder

#: environment variable naming the model to profile when none is given
MODEL_ENV = "PROBE_MODEL"


def default_model() -> str:
    """What "no model given" means: ``$PROBE_MODEL``, else ``smollm2-135m`` if installed, else ``tiny``."""
    from .. import models

    return os.environ.get(MODEL_ENV) or models.default_model_name()


def resolve(model: str | os.PathLike | None, preset: str | None = None) -> str | pathlib.Path | None:
    """The folder (a ``Path``) or known name (a ``str``) ``model`` stands for; ``None`` for a preset.

    Raises:
        ModelLoadError: both given, or neither a folder nor a known name.
    """
    from .. import models

    if model and preset:
        raise ModelLoadError("give either a model or a preset, not both")
    if preset:
        return None
    try:
        return models.resolve_model(model or default_model())
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def load(model: str | os.PathLike | None = None, *, preset: str | None = None, dtype: Any = "float32",
         device: str = "cpu", seed: int = 0, attn_implementation: str | None = None,
         trust_remote_code: bool = False, rebuild_cache: bool = False, verify_cache: bool = False,
         progress: Callable[[str], None] | None = None) -> Loaded:
    """Load a model and its tokenizer, offline, with every check.

    Args:
        model: a local model folder, a known name, or ``None`` (see :func:`default_model`).
        preset: instead, a full-size architecture with random weights (``llama-2-7b`` ...).
        dtype: a ``torch.dtype`` or its name.
        device: where to put the model.
        seed: the seed of a preset's random weights.
        attn_implementation: ``eager``, ``sdpa``, ... (default: what transformers picks).
        trust_remote_code: allow custom model code from the folder.
        rebuild_cache: convert a known model's weights again into probe's model cache.
        verify_cache: hash every file of a known model's cached folder (a damaged one is converted again).
        progress: called with a line for each slow stage (converting a known model).
    Returns:
        :class:`Loaded` ``(model, tokenizer, model_id)``, the model in eval mode on ``device``.
    Raises:
        ModelLoadError: what cannot be loaded and what to do (a missing package names its install
            command).
        probe.models.ModelNotInstalledError: a known model whose package is not installed (the
            message holds the install command).
    """
    from .. import models

    target = resolve(model, preset)
    dtype = models.resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if preset:
        try:
            m = models.build_preset(preset, dtype=dtype, device=device, seed=seed)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        return Loaded(m, models.load_tokenizer(), f"preset:{preset}")
    if isinstance(target, str):
        try:
            m, tok = models.load_named(target, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                       rebuild_cache=rebuild_cache, verify_cache=verify_cache, progress=progress)
        except models.ModelNotInstalledError:
            raise
        except (OSError, RuntimeError, ValueError, ImportError) as exc:
            fix = deps.hint(exc)
            then = f"install the missing package: {fix}" if fix else "`--rebuild-model-cache` converts it again"
            raise ModelLoadError(f"cannot load {target}: {type(exc).__name__}: {exc}; {then}") from exc
        return Loaded(m, tok, m.config.name_or_path)
    return load_folder(target, dtype, device, attn_implementation, trust_remote_code)


def random_weights(model: Any) -> bool:
    """Whether the model's weights are random (the bundled model, a preset): its text means nothing."""
    source = getattr(getattr(model, "config", None), "probe_weights_source", None) or ""
    return str(source).startswith("random")
