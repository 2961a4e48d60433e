"""The cost formulas: FLOPs and bytes of one linear, attention core, norm, embedding or elementwise op.

Each formula is a small function over numpy arrays (or scalars) with its assumptions in its
docstring, following the conventions of :mod:`probe.analysis.cost` (a multiply-add is 2 FLOPs;
bytes are read and written once from memory). :mod:`probe.analysis.coefficients` folds them into
per-module coefficients. Nothing here imports torch: configs are read by attribute name.
"""

from __future__ import annotations

from typing import Any

#: FLOPs per element of a norm: RMSNorm squares, accumulates, scales by rsqrt and by the
#: weight (LayerNorm adds a mean and a bias: the same order).
NORM_FLOPS_PER_ELEMENT = 4
#: FLOPs per element of an activation (SiLU/GELU ≈ exp, add, divide, multiply).
ACT_FLOPS_PER_ELEMENT = 4
#: FLOPs per element of rotary position embedding (x·cos + rotate(x)·sin).
ROPE_FLOPS_PER_ELEMENT = 3
#: FLOPs per attention score for the softmax (scale, max-subtract, exp, sum, divide).
SOFTMAX_FLOPS_PER_SCORE = 5
#: Bytes of one token id read by an embedding gather (int64).
INDEX_BYTES = 8


def linear_flops(tokens, in_features: int, out_features: int, bias: bool = False):
    """FLOPs of ``y = x·Wᵀ (+ b)`` over ``tokens`` rows: ``2·T·in·out`` (+ ``T·out`` for the bias).

    Args:
        tokens: rows of ``x`` (batch × positions); scalar or array.
        in_features, out_features: the weight's shape ``[out, in]``.
        bias: whether a bias is added.
    Returns:
        FLOPs, same shape as ``tokens``.
    """
    return 2 * tokens * in_features * out_features + (tokens * out_features if bias else 0)


def linear_bytes(tokens, in_features: int, out_features: int, weight_itemsize: int, act_itemsize: int,
                 bias: bool = False):
    """Bytes a linear layer moves: its weight (and bias) once, the input read, the output written.

    Returns:
        ``(in·out + out·bias)·w + T·(in + out)·a`` bytes.
    """
    return (in_features * out_features + (out_features if bias else 0)) * weight_itemsize \
        + tokens * (in_features + out_features) * act_itemsize


def embedding_bytes(tokens, dim: int, weight_itemsize: int, act_itemsize: int):
    """Bytes of an embedding lookup: the ids read, ``T`` rows of ``dim`` gathered and written.

    The gather does no arithmetic (0 FLOPs); a repeated id is counted each time it is read.
    """
    return tokens * (INDEX_BYTES + dim * weight_itemsize + dim * act_itemsize)


def attention_flops(batch, q_len, kv_total, heads: int, head_dim: int):
    """FLOPs of the two attention matmuls, QKᵀ and (softmax)·V: ``4·B·heads·q·kv·head_dim``.

    Args:
        batch: sequences.
        q_len: new positions per sequence (the prompt in prefill, 1 in decode).
        kv_total: positions attended per sequence: cached + new (``kv_len + q_len``), capped
            by a sliding window. Grouped-query attention shares K/V heads but each query head
            still does its own products, so the count uses the query heads.
        heads: query heads; head_dim: dimension per head.
    """
    return 4 * batch * heads * q_len * kv_total * head_dim


def softmax_flops(batch, q_len, kv_total, heads: int):
    """FLOPs of the softmax over ``B·heads·q·kv`` scores (``SOFTMAX_FLOPS_PER_SCORE`` each)."""
    return SOFTMAX_FLOPS_PER_SCORE * batch * heads * q_len * kv_total


def attention_bytes(batch, q_len, kv_total, heads: int, kv_heads: int, head_dim: int, itemsize: int):
    """Bytes of a fused attention core: Q read, K and V read for every attended position, the
    new K/V written to the cache, the output written (scores stay on chip).

    Returns:
        ``a·(2·B·q·heads·hd + 2·B·kv·kv_heads·hd + 2·B·q·kv_heads·hd)``; the middle term is the
        KV-cache read, which grows with context and dominates decode at long context.
    """
    return itemsize * (2 * batch * q_len * heads * head_dim + 2 * batch * kv_total * kv_heads * head_dim
                       + 2 * batch * q_len * kv_heads * head_dim)


def norm_flops(tokens, dim: int):
    """FLOPs of a RMSNorm/LayerNorm over ``T`` vectors of ``dim``."""
    return NORM_FLOPS_PER_ELEMENT * tokens * dim


def norm_bytes(tokens, dim: int, weight_itemsize: int, act_itemsize: int, n_weights: int = 1):
    """Bytes of a norm: input read, output written, ``n_weights`` vectors of ``dim`` read."""
    return 2 * tokens * dim * act_itemsize + n_weights * dim * weight_itemsize


def elementwise_flops(elements, ops_per_element: float):
    """FLOPs of an elementwise op (activation, residual add, gating multiply)."""
    return ops_per_element * elements


def elementwise_bytes(elements, reads: int, writes: int, itemsize: int):
    """Bytes of an elementwise op reading ``reads`` and writing ``writes`` tensors of ``elements``."""
    return (reads + writes) * elements * itemsize


def kv_cache_bytes_per_token(config: Any, itemsize: int) -> int:
    """KV-cache bytes one position of one sequence adds: ``2 (K, V) · layers · kv_heads · head_dim · a``.

    Args:
        config: a transformers config (or anything with its attribute names).
        itemsize: bytes per cache element (2 for bf16/fp16).
    """
    dims = config_dims(config)
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * itemsize


def config_dims(config: Any) -> dict[str, int]:
    """Hidden size, layers, heads, KV heads and head dim from a config, across naming schemes."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names, default=None):
        for n in names:
            v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
            if v is not None:
                return v
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head", "num_heads"))
    kv = int(first("num_key_value_heads", "num_kv_heads", default=None) or (1 if first("multi_query") else heads))
    head_dim = int(first("head_dim", default=None) or hidden // heads)
    layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
    return {"hidden": hidden, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "layers": layers}
