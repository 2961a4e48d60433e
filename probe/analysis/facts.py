"""What a run records about its model and software, once per probe: the environment (model
id and class, parameters, dtype, device, versions, host threads), the config as JSON and the
recorded modules' cost coefficients, so that a saved run can be costed without its model."""

from __future__ import annotations

import json
import logging

from ..dtypes import dtype_name

log = logging.getLogger(__name__)


def model_facts(model, model_id: str | None, cuda_device, modules: list | None = None) -> dict:
    """What a run records about its model and software: ``{"env": ..., "config": ...,
    "costs": ...}``; ``costs`` (the recorded ``modules``' cost coefficients, parameters and
    weight bytes) lets a saved run be costed without building its model."""
    return {"env": _environment(model, model_id, cuda_device), "config": _config_dict(model),
            "costs": _module_costs(model, modules or [])}


def _module_costs(model, modules: list) -> dict | None:
    """:func:`probe.cost.module_costs` of the recorded modules (``ModuleInfo``), or ``None``."""
    from .cost import module_costs

    try:
        return module_costs(model, [(m.name, m.role) for m in modules])
    except Exception:  # an exotic module must not cost the user their frames: costed from the config later
        log.debug("module costs not recorded", exc_info=True)
        return None


def _config_dict(model) -> dict | None:
    """The model's config as JSON-able data, so a saved run can be costed without the model."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    try:
        return json.loads(json.dumps(cfg.to_dict(), default=str))
    except Exception:  # an exotic config must not cost the user their frames
        return None


def _environment(model, model_id: str | None, cuda_device) -> dict:
    import torch

    from ..version import __version__
    from ..recording.noise import host_facts

    cfg = getattr(model, "config", None)
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # pragma: no cover
        tf_version = None
    first = next(iter(model.parameters()), None)
    n_params = sum(t.numel() for t in model.parameters())
    gpu = None
    if cuda_device is not None:
        try:
            gpu = torch.cuda.get_device_name(cuda_device)
        except Exception:  # pragma: no cover
            gpu = None
    attn = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    if isinstance(attn, dict):
        attn = json.dumps(attn, sort_keys=True)
    return {
        "model_id": model_id or (getattr(cfg, "name_or_path", None) or None) or type(model).__name__,
        "model_class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "parameters": n_params,
        "dtype": dtype_name(first.dtype) if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "attn_implementation": attn,
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "probe_version": __version__,
        "gpu_name": gpu,
        # set by probe.models' loaders (e.g. "GGUF Q4_1, de-quantized to float32"); null otherwise
        "weights_source": getattr(cfg, "probe_weights_source", None) if cfg is not None else None,
        **host_facts(),
    }
