"""A local Hugging Face model folder, loaded offline and checked (see :mod:`probe.models.loading`).

Kept apart from :mod:`probe.models.loading` so that :func:`probe.models.load_model` can use it too.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import deps

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the reason and what to do."""


class Loaded(NamedTuple):
    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    model_id: str


def _fix(exc: BaseException) -> str:
    fix = deps.hint(exc)
    return f"; install the missing package: {fix}" if fix else ""


def load_folder(path: pathlib.Path, dtype: Any, device: str, attn_implementation: str | None = None,
                trust_remote_code: bool = False) -> Loaded:
    """A local Hugging Face model folder, checked (see :func:`load`)."""
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {type(exc).__name__}: {exc}{_fix(exc)}") from exc
    if not getattr(tok, "vocab_size", 1):  # transformers 5 builds an empty tokenizer where the folder has none
        raise ModelLoadError(f"{path} holds no tokenizer (no tokenizer.json, tokenizer.model or vocabulary files): "
                             "save it beside the weights with tokenizer.save_pretrained(folder), or copy the "
                             "tokenizer files of the model this one was trained from into the folder")
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw, **extra)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model from {path}: {type(exc).__name__}: {exc}{_fix(exc)}") from exc
    model.to(device).eval()
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ModelLoadError(f"the tokenizer in {path} has {len(tok)} tokens but the model's vocabulary is {vocab}: "
                             "they do not belong together; put the model's own tokenizer files in the folder")
    return Loaded(model, tok, str(path))
