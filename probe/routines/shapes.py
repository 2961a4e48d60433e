"""`probe shapes`: the shape walkthrough of a full-size architecture on the meta device.

A real forward of the model runs with the probe attached, on ``meta`` tensors: every shape
and dtype is computed, no weight is allocated and no arithmetic is done, so a 7B model walks
through in about a second on any machine. One prefill step over the prompt and one decode
step on its KV cache are recorded, then each block gets its parameters, FLOPs and bytes.

``generate()`` cannot run on meta tensors (choosing a token reads values), so the two
forwards are called directly, with a ``DynamicCache`` carried from the first to the second.
A plain forward computes logits at every prompt position, so ``lm_head`` shows ``[B, P, V]``
in prefill; ``generate()`` keeps only the last position (``[B, 1, V]``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from torch import nn

from ..dtypes import dtype_name, torch_dtype
from ..schema import WALK, Depth, shape_text

log = logging.getLogger(__name__)

def meta_model(model_or_preset: Any, dtype: Any = "bfloat16") -> nn.Module:
    """A model on the meta device: a preset name, a config, a model directory or a model.

    A model that already lives on ``meta`` is used as is; a model with real weights gets a
    meta twin built from its config in its own dtype (nothing is copied).
    """
    import torch

    from ..analysis.cost import model_from_config

    if isinstance(model_or_preset, nn.Module):
        first = next(iter(model_or_preset.parameters()), None)
        if first is None or first.device.type == "meta":
            return model_or_preset.eval()
        with torch.device("meta"):
            twin = type(model_or_preset)(model_or_preset.config).to(first.dtype)
        return twin.eval()
    if isinstance(model_or_preset, (str, Path)) and Path(model_or_preset).is_dir():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_or_preset, local_files_only=True)
        return model_from_config(cfg, dtype).eval()
    if isinstance(model_or_preset, str):
        from .. import models

        return models.build_preset(model_or_preset, dtype=torch_dtype(dtype) or dtype, meta=True).eval()
    return model_from_config(model_or_preset, dtype).eval()


def walkthrough(model_or_preset: Any, prompt_tokens: int | Sequence[int], batch: int = 1, depth: Depth = "blocks",
                dtype: Any = "bfloat16") -> pd.DataFrame:
    """Shapes, parameters, FLOPs and bytes of every recorded block, for prefill and one decode step.

    Args:
        model_or_preset: a preset name (``"chinese-llama-2-7b"``), a config, a local model
            directory, or a model (a meta twin is used; its weights are never touched).
        prompt_tokens: the prompt length, or the prompt's token ids (only their count matters).
        batch: sequences.
        depth: probe depth (``"blocks"``, ``"sublayers"``, ``"all"``).
        dtype: weight dtype for presets and configs.
    Returns:
        A frame with :data:`WALK`, prefill rows then decode rows. ``frame.attrs``
        holds the totals: ``model``, ``parameters``, ``weight_bytes``, ``dtype``,
        ``prompt_tokens``, ``batch``, ``kv_cache_bytes_per_token`` (one position of one
        sequence, from the config), ``kv_cache_bytes_prefill`` / ``kv_cache_bytes_decode``
        (read from the meta cache's tensors), and ``full_logits`` (True).
    """
    import torch

    from ..capture.lifecycle import attach
    from ..recording.cache import cache_bytes
    from ..compat import cache_kwarg, meta_forward, new_dynamic_cache
    from ..analysis.cost import annotate, kv_cache_bytes_per_token, parameter_counts

    n = len(prompt_tokens) if not isinstance(prompt_tokens, int) else int(prompt_tokens)
    if n < 1:
        raise ValueError(f"the prompt needs at least one token; got {n}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    model = meta_model(model_or_preset, dtype)
    cfg = model.config
    kw = cache_kwarg(model)
    ids = torch.zeros(batch, n, dtype=torch.long, device="meta")
    step_ids = torch.zeros(batch, 1, dtype=torch.long, device="meta")
    cache = new_dynamic_cache(cfg)

    # the forwards fill the cache they are given in place, so the decode step reuses it
    with meta_forward(), attach(model, depth=depth, model_id=type(model).__name__) as p, torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
        kv_prefill = cache_bytes(cache)
        model(input_ids=step_ids, use_cache=True, **{kw: cache})
        kv_decode = cache_bytes(cache)
    run = p.run
    calls = run.calls[run.calls["run_id"] == run.runs["run_id"].iloc[-1]].copy()
    # both forwards ran outside generate(): name them by what they are
    calls["phase"] = calls["step"].map({0: "prefill", 1: "decode"}).astype("string")
    calls = annotate(calls, model)
    counts = parameter_counts(model, list(dict.fromkeys(calls["module"].tolist())))
    df = calls.merge(counts, on="module", how="left")
    df = df[list(WALK)].astype(WALK).reset_index(drop=True)
    params = {id(t): t for t in model.parameters()}
    first = next(iter(params.values()))
    df.attrs.update({
        "model": type(model).__name__,
        "parameters": int(sum(t.numel() for t in params.values())),
        "weight_bytes": int(sum(t.numel() * t.element_size() for t in params.values())),
        "dtype": dtype_name(first.dtype),
        "prompt_tokens": n,
        "batch": batch,
        "kv_cache_bytes_per_token": int(kv_cache_bytes_per_token(cfg, first.element_size())),
        "kv_cache_bytes_prefill": kv_prefill,
        "kv_cache_bytes_decode": kv_decode,
        "full_logits": True,
    })
    return df


def _gb(b: float) -> str:
    return f"{b / 1e9:,.2f} GB ({b / 2**30:,.2f} GiB)"


def format_walkthrough(df: pd.DataFrame, title: str) -> str:
    """The readable table ``probe shapes`` prints; identical decoder layers are folded into one line."""
    a = df.attrs
    per_tok = a["kv_cache_bytes_per_token"]
    lines = [
        f"{title} ({a['model']}, {a['dtype']}, meta device: no weights allocated, no compute)",
        f"parameters  {a['parameters']:,} ({a['parameters'] / 1e9:,.2f} B)    weights {_gb(a['weight_bytes'])}",
        f"KV cache    {per_tok / 2**20:,.3f} MiB per token ({per_tok:,} bytes); after prefill "
        f"{(a['kv_cache_bytes_prefill'] or 0) / 2**20:,.2f} MiB, after one decode step "
        f"{(a['kv_cache_bytes_decode'] or 0) / 2**20:,.2f} MiB",
    ]
    head = f"  {'block':<42}{'input -> output':<40}{'params':>14}{'GFLOPs':>11}{'MB moved':>11}{'FLOP/B':>8}"
    for phase in ("prefill", "decode"):
        sub = df[df["phase"] == phase]
        if sub.empty:
            continue
        r0 = sub.iloc[0]
        lines += ["", f"{phase} (q_len {r0['q_len']}, kv_len {r0['kv_len']}, batch {r0['batch']})", head]
        layers = sub[sub["role"] == "layer"]
        first = layers["layer"].min() if not layers.empty else None
        # identical decoder layers are printed once, with their count
        fold = len(layers) > 1 and layers["in_shapes"].nunique() == 1 and layers["flops"].nunique() == 1
        for _, r in sub.iterrows():
            name = r["module"]
            if fold and pd.notna(r["layer"]):
                if r["layer"] != first:
                    continue
                if r["role"] == "layer":
                    name = f"{name} (x{len(layers)}, each)"
            io = f"{shape_text(r['in_shapes'])} -> {shape_text(r['out_shapes'])}"
            lines.append(f"  {name:<42}{io:<40}{r['parameters']:>14,}{r['flops'] / 1e9:>11.3f}"
                         f"{r['bytes_moved'] / 1e6:>11.2f}{r['intensity_flops_per_byte']:>8.1f}")
        blocks = sub[sub["role"].isin(["embed", "layer", "norm", "head"])]
        lines.append(f"  {'total (blocks)':<42}{'':<40}{'':>14}{blocks['flops'].sum() / 1e9:>11.3f}"
                     f"{blocks['bytes_moved'].sum() / 1e6:>11.2f}")
    lines += ["", "note: lm_head runs over all prompt positions here (full logits, as a plain forward does); "
                  "generate() computes logits only at the last position."]
    return "\n".join(lines)
