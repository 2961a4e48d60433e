"""FLOPs and bytes moved per recorded call, estimated from captured shapes and module weights.

One place for the cost model. Each formula is a small function over numpy arrays (or scalars)
with the assumptions in its docstring; :func:`module_cost` folds the formulas of a module's
subtree into a handful of coefficients, and :func:`annotate` evaluates those coefficients for
every row of a calls frame at once (work per distinct module and per distinct shape string,
never per row), adding ``flops``, ``bytes_moved`` and ``intensity_flops_per_byte``.

Conventions (the numbers are estimates of eager PyTorch work, not counter readings):

- A multiply-add is 2 FLOPs. A linear layer over ``T`` tokens costs ``2·T·in·out``.
- Bytes are what each op reads and writes once from memory (weights, input and output
  activations, KV cache); no cache reuse between ops is assumed, and no intermediate is
  assumed to stay on chip except the attention scores (as fused SDPA/flash kernels do).
- Attention scores cover the full rectangle ``q_len × (kv_len + q_len)`` per head, as eager
  and SDPA-math attention compute it; a causal flash kernel skips about half in prefill.
  Sliding-window layers attend to at most ``sliding_window`` positions (per layer, from
  ``config.layer_types`` where the config has them: Gemma2 alternates sliding and global).
- Mixture-of-experts: the router is a dense matmul; each token runs ``k`` of the ``E`` routed
  experts, whether they are fused ``[E, out, in]`` banks (transformers 5.x) or a list of expert
  MLPs (4.x), and an expert's weights are read only if a token of the call is routed to it.
- The embedding gather is a copy, not a matmul: 0 FLOPs, bytes = rows gathered + written.
  So "2 · parameters · tokens" holds for the parameters of matmuls: every linear weight in
  the layers plus the output head, not the input embedding (nor the tiny norm weights).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields as dc_fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..dtypes import itemsize, torch_dtype
from ..schema import COST

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# torch is imported by the functions that walk a module tree, not here: a saved run whose meta
# holds its modules' coefficients (``module_costs``) is costed without torch or transformers.

log = logging.getLogger(__name__)

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

# --------------------------------------------------------------------------- formulas
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


# --------------------------------------------------------------------------- per-module coefficients
@dataclass
class ModuleCost:
    """A module's cost as a linear form in per-call quantities (see :func:`annotate`).

    ``flops = f_tok·T + f_elem·E + f_score·S`` and
    ``bytes = b_const + bw_tok·T + a·(e_tok·T + e_elem·E + e_kv·K) + b_moe·min(1, T·moe_frac)``,
    with ``T`` tokens, ``E`` input elements, ``K = B·kv_eff`` attended positions summed over
    the batch, ``S = K·q`` scores per head summed over the batch, ``a`` the activation itemsize.
    """

    f_tok: float = 0.0  # FLOPs per token (matmuls, norms, activations, rope, residuals)
    f_elem: float = 0.0  # FLOPs per input element (a bare activation module)
    f_score: float = 0.0  # FLOPs per (query, key) pair summed over attention cores
    b_const: float = 0.0  # weight bytes read once per call
    bw_tok: float = 0.0  # bytes per token in the weight dtype (embedding rows gathered) + ids
    e_tok: float = 0.0  # activation elements read/written per token
    e_elem: float = 0.0  # activation elements per input element
    e_kv: float = 0.0  # KV elements read per attended position per sequence
    b_moe: float = 0.0  # expert weight bytes, read in the fraction of experts a call touches
    moe_frac: float = 0.0  # experts chosen per token / experts
    window: float = math.inf  # attention span cap (sliding window)
    ids_input: bool = False  # the module takes token ids (tokens = all input elements)


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _is_attention(m: nn.Module) -> bool:
    return "attention" in type(m).__name__.lower()


def _is_activation(m: nn.Module) -> bool:
    from torch import nn

    name = type(m).__name__
    return isinstance(m, (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish)) or "Activation" in name \
        or name.startswith(("GELU", "SiLU", "ReLU", "QuickGELU", "FastGELU", "NewGELU", "PytorchGELU"))


def _linear_dims(m: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, has_bias) for nn.Linear and GPT-2's Conv1D (weight stored as [in, out])."""
    from torch import nn

    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, m.bias is not None
    if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
        return int(m.weight.shape[0]), int(m.weight.shape[1]), getattr(m, "bias", None) is not None
    return None


def _moe_counts(config: Any) -> tuple[int, int] | None:
    """(experts chosen per token, routed experts) of a mixture-of-experts config, else None."""
    k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None)
    e = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) \
        or getattr(config, "n_routed_experts", None)
    return (int(k), int(e)) if k and e else None


def _moe_fraction(config: Any) -> float:
    counts = _moe_counts(config)
    return counts[0] / counts[1] if counts else 1.0


def _expert_scale(module: nn.Module, config: Any) -> dict[int, float]:
    """id -> fraction of tokens it sees, for every module inside a list of routed experts.

    Experts kept as a ``ModuleList`` of small MLPs (transformers 4.x Mixtral, Qwen2-MoE, ...):
    a list named ``*experts`` with one entry per routed expert. Each token runs through ``k``
    of its ``E`` entries, so every module in it works on ``k/E`` of the tokens on average.
    (Fused ``[E, out, in]`` banks, the 5.x layout, are costed from their parameters instead.)
    """
    from torch import nn

    counts = _moe_counts(config)
    if counts is None:
        return {}
    k, e = counts
    scale: dict[int, float] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == e and "expert" in name.rsplit(".", 1)[-1].lower():
            for expert in m:
                for sub in expert.modules():
                    scale[id(sub)] = k / e
    return scale


def _attention_shape(m: nn.Module, config: Any) -> tuple[int, int, int]:
    dims = config_dims(getattr(m, "config", None) or config)
    heads = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or dims["heads"]
    groups = getattr(m, "num_key_value_groups", None)
    kv = getattr(m, "num_key_value_heads", None) or (heads // groups if groups else None) or dims["kv_heads"]
    hd = getattr(m, "head_dim", None) or dims["head_dim"]
    return int(heads), int(kv), int(hd)


def _window(m: nn.Module, config: Any) -> float:
    """The attention span cap of this attention module (inf for full attention)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return math.inf
    types = getattr(config, "layer_types", None)
    idx = getattr(m, "layer_idx", None)
    if types and idx is not None and idx < len(types):
        return float(window) if "sliding" in str(types[idx]) else math.inf
    if getattr(config, "use_sliding_window", True) is False:
        return math.inf
    return float(window)


def module_cost(module: nn.Module, config: Any, role: str | None = None) -> ModuleCost:
    """Fold the cost formulas of ``module``'s subtree into one :class:`ModuleCost`.

    Decided by module type, so a decoder layer recorded at depth ``"blocks"`` gets the sum of
    its linears, attention core(s), norms, activations and its two residual adds without any
    sub-layer records.

    Args:
        module: the recorded module (real weights or on the meta device).
        config: the model's (text) config: heads, KV heads, head dim, window, experts.
        role: the probe's role for the module (``"layer"`` adds the residual adds).
    Returns:
        The coefficients; all zero for a module with no known cost (a rotary embedding).
    """
    from torch import nn

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    c = ModuleCost()
    mods = list(module.named_modules())
    covered: set[int] = set()  # parameters counted by a typed rule
    attn = [m for _, m in mods if _is_attention(m)]
    innermost = [m for m in attn if not any(o is not m and _is_attention(o) for o in m.modules())]
    has_rope = getattr(cfg, "rope_parameters", None) is not None or getattr(cfg, "rope_theta", None) is not None \
        or getattr(cfg, "rotary_dim", None) is not None or getattr(cfg, "partial_rotary_factor", None) is not None
    routed = _expert_scale(module, cfg)  # modules inside a list of experts: share of tokens
    for _, m in mods:
        dims = _linear_dims(m)
        if dims is not None:
            i, o, b = dims
            w = itemsize(m.weight)
            share = routed.get(id(m), 1.0)
            c.f_tok += linear_flops(1, i, o, b) * share
            c.e_tok += (i + o) * share
            if id(m) in routed:  # an expert's weight is read only when a token is routed to it
                c.b_moe += (i * o + (o if b else 0)) * w
                c.moe_frac = share
            else:
                c.b_const += (i * o + (o if b else 0)) * w
            covered.update(id(p) for p in m.parameters(recurse=False))
        elif isinstance(m, nn.Embedding):
            w = itemsize(m.weight)
            c.bw_tok += INDEX_BYTES + m.embedding_dim * w
            c.e_tok += m.embedding_dim
            c.ids_input = True
            covered.update(id(p) for p in m.parameters(recurse=False))
        elif _is_norm(m):
            own = list(m.parameters(recurse=False))
            dim = int(own[0].numel()) if own else int(np.prod(getattr(m, "normalized_shape", (0,))) or 0)
            c.f_tok += norm_flops(1, dim)
            c.e_tok += 2 * dim
            c.b_const += sum(p.numel() * itemsize(p) for p in own)
            covered.update(id(p) for p in own)
        elif _is_activation(m) and m is module:
            c.f_elem += ACT_FLOPS_PER_ELEMENT  # a bare activation: cost scales with its input
            c.e_elem += 2
    # Parameters outside typed modules: routers ([E, H]) are dense matmuls; expert banks
    # ([E, out, in]) are matmuls in which each token uses k of E experts.
    frac = _moe_fraction(cfg)
    for _, m in mods:
        for p in m.parameters(recurse=False):
            if id(p) in covered:
                continue
            w = itemsize(p)
            if p.dim() == 2:
                c.f_tok += 2 * p.numel()
                c.b_const += p.numel() * w
                c.e_tok += p.shape[0] + p.shape[1]
            elif p.dim() >= 3:
                c.f_tok += 2 * p.numel() * frac
                c.b_moe += p.numel() * w
                c.moe_frac = frac
                c.e_tok += (p.shape[-1] + p.shape[-2]) * p.shape[0] * frac
            else:
                c.b_const += p.numel() * w
    # Activations inside an MLP run over the intermediate width: the widest output of the
    # activation's sibling matmuls; a gated MLP (three projections) adds the gating multiply.
    for name, m in mods:
        if not _is_activation(m) or m is module:
            continue
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        lin = [d for d in (_linear_dims(x) for x in parent.children()) if d is not None]
        banks = [p for p in parent.parameters() if p.dim() >= 3]
        if lin:
            inter = max(o for _, o, _ in lin)
            gated = len(lin) >= 3
        elif banks:  # expert banks [E, 2I, H] and [E, H, I]: I is the narrowest non-hidden dim
            hidden = config_dims(cfg)["hidden"]
            widths = [int(d) for p in banks for d in p.shape[-2:] if int(d) != hidden]
            if not widths:
                continue
            inter = min(widths) * frac * banks[0].shape[0]  # k active experts per token
            gated = True
        else:
            continue
        share = routed.get(id(m), 1.0)
        c.f_tok += (ACT_FLOPS_PER_ELEMENT + (1 if gated else 0)) * inter * share
        c.e_tok += (3 if gated else 2) * inter * share
    for m in innermost:
        heads, kv, hd = _attention_shape(m, cfg)
        c.f_score += 4 * heads * hd + SOFTMAX_FLOPS_PER_SCORE * heads
        c.e_tok += 2 * heads * hd + 2 * kv * hd
        c.e_kv += 2 * kv * hd
        if has_rope:
            c.f_tok += ROPE_FLOPS_PER_ELEMENT * (heads + kv) * hd
            c.e_tok += 2 * (heads + kv) * hd
        c.window = min(c.window, _window(m, cfg))
    if role == "layer":
        hidden = config_dims(cfg)["hidden"]
        c.f_tok += 2 * hidden  # two residual adds
        c.e_tok += 6 * hidden
    return c


# --------------------------------------------------------------------------- recorded with the run
#: bump when :class:`ModuleCost` or :func:`module_cost` changes meaning: older runs are costed
#: from their config again (a meta-device model), as runs saved before ``module_costs``
COSTS_FORMAT = 1
_FIELDS = tuple(f.name for f in dc_fields(ModuleCost) if f.name != "ids_input")


def module_costs(model: nn.Module, modules: list[tuple[str, str | None]]) -> dict[str, Any]:
    """The facts a saved run needs to be costed without its model: per recorded module, its
    :class:`ModuleCost` coefficients, parameters and weight bytes (JSON-able).

    Args:
        model: the recorded model.
        modules: ``(qualified name, role)`` of each recorded module.
    Returns:
        ``{"format", "weight_itemsize", "modules": {name: {coefficient: value, ...,
        "ids_input", "parameters", "weight_bytes"}}}``; an unbounded attention span is ``None``.
        Stored as ``meta["module_costs"]`` and read back by :func:`annotate` given a run.
    """
    cfg = getattr(model, "config", None)
    first = next(iter(model.parameters()), None)
    names = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name, role in modules:
        mod = names.get(name)
        if mod is None or name in out:
            continue
        mc = module_cost(mod, cfg, role)
        entry: dict[str, Any] = {f: (None if math.isinf(v := float(getattr(mc, f))) else v) for f in _FIELDS}
        seen = {id(p): p for p in mod.parameters()}
        entry.update(ids_input=bool(mc.ids_input), parameters=int(sum(p.numel() for p in seen.values())),
                     weight_bytes=int(sum(p.numel() * p.element_size() for p in seen.values())))
        out[name] = entry
    return {"format": COSTS_FORMAT, "weight_itemsize": float(first.element_size()) if first is not None else 4.0,
            "modules": out}


def recorded_costs(obj: Any) -> dict[str, Any] | None:
    """``meta["module_costs"]`` of a run (anything with a ``meta`` dict and ``calls``), if it
    holds usable ones of this :data:`COSTS_FORMAT`; else ``None``."""
    meta = getattr(obj, "meta", None)
    if not isinstance(meta, dict) or not hasattr(obj, "calls"):
        return None
    facts = meta.get("module_costs")
    if not isinstance(facts, dict) or facts.get("format") != COSTS_FORMAT or not isinstance(facts.get("modules"), dict):
        return None
    return facts


def _table_from_facts(facts: dict[str, Any], mod_uniques, nm: int) -> tuple[dict, np.ndarray, float] | None:
    """The coefficient table of :func:`annotate` from recorded facts; ``None`` when a recorded
    call's module is missing from them (costed from the config instead)."""
    mods = facts["modules"]
    if any(str(m) not in mods for m in mod_uniques):
        return None
    table = {f: np.full(nm + 1, np.nan) for f in _FIELDS}
    ids_input = np.zeros(nm + 1, dtype=bool)
    for code, name in enumerate(mod_uniques):
        entry = mods[str(name)]
        for f in _FIELDS:
            v = entry.get(f)
            table[f][code] = math.inf if v is None and f == "window" else (np.nan if v is None else float(v))
        ids_input[code] = bool(entry.get("ids_input"))
    return table, ids_input, float(facts.get("weight_itemsize") or 4.0)


def _table_from_model(model: nn.Module, calls: pd.DataFrame, mod_codes: np.ndarray, mod_uniques,
                      nm: int) -> tuple[dict, np.ndarray, float]:
    """The coefficient table of :func:`annotate`: one :func:`module_cost` per distinct module."""
    cfg = getattr(model, "config", None)
    first_param = next(iter(model.parameters()), None)
    w_default = float(first_param.element_size()) if first_param is not None else 4.0
    names = dict(model.named_modules())
    table = {f: np.full(nm + 1, np.nan) for f in _FIELDS}
    ids_input = np.zeros(nm + 1, dtype=bool)
    first_rows = pd.Series(mod_codes).drop_duplicates()
    role_col = calls["role"]
    for row, code in zip(first_rows.index, first_rows.to_numpy()):
        if code < 0:
            continue
        mod = names.get(str(mod_uniques[code]))
        if mod is None:
            log.debug("annotate: module %s not in the model; its cost is NaN", mod_uniques[code])
            continue
        role = role_col.iloc[int(row)]
        mc = module_cost(mod, cfg, None if pd.isna(role) else str(role))
        for f in _FIELDS:
            table[f][code] = getattr(mc, f)
        ids_input[code] = mc.ids_input
    return table, ids_input, w_default


# --------------------------------------------------------------------------- annotate
def model_from_config(config: Any, dtype: Any = None) -> nn.Module:
    """A meta-device model of ``config`` (no memory) whose weights give the shapes and itemsizes.

    Args:
        config: a transformers config, or ``config.to_dict()`` (it needs ``model_type``).
        dtype: weight dtype (a ``torch.dtype`` or its name); default: the config's, else float32.
    Returns:
        The causal-LM model of the config on the ``meta`` device.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        d = dict(config)
        model_type = d.pop("model_type", None)
        if not model_type:
            raise ValueError("a config dict needs 'model_type' (store config.to_dict() in run.meta['config'])")
        stored = d.pop("dtype", None) or d.pop("torch_dtype", None)
        for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype"):
            d.pop(k, None)
        dtype = dtype or stored
        config = AutoConfig.for_model(model_type, **d)
    tdt = torch_dtype(dtype) or torch_dtype(getattr(config, "dtype", None)) or torch.float32
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=tdt)


def resolve_model(model_or_config: Any, dtype: Any = None) -> nn.Module:
    """The module tree to cost: a model as is, or a meta model built from a config / config dict
    / :class:`probe.Run` (its ``meta["config"]``, with ``meta["dtype"]`` for the weights).

    A run is told by its data (a ``meta`` dict beside a ``calls`` frame), so the cost model
    needs nothing of :mod:`probe.analysis.run`, which calls it.
    """
    from torch import nn

    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if isinstance(getattr(model_or_config, "meta", None), dict) and hasattr(model_or_config, "calls"):
        cfg = model_or_config.meta.get("config")
        if not cfg:
            raise ValueError("this run's meta has no 'config'; pass the model or its config to annotate()")
        return model_from_config(cfg, dtype or model_or_config.meta.get("dtype"))
    return model_from_config(model_or_config, dtype)


def _parse_first_shape(text: Any) -> tuple[float, float, float, float]:
    """(tokens excluding last dim, all elements, batch, ndim) of the first shape in a JSON list."""
    try:
        shapes = json.loads(text) if isinstance(text, str) else []
    except (TypeError, ValueError):
        shapes = []
    if not shapes or not isinstance(shapes[0], list):
        return (math.nan, math.nan, math.nan, 0.0)
    s = shapes[0]
    total = float(math.prod(s))
    tok = float(math.prod(s[:-1])) if len(s) >= 2 else total
    return (tok, total, float(s[0]) if len(s) >= 2 else 1.0, float(len(s)))


def annotate(calls: pd.DataFrame, model_or_config: Any, *, dtype: Any = None) -> pd.DataFrame:
    """Add ``flops``, ``bytes_moved`` and ``intensity_flops_per_byte`` to a calls frame.

    Args:
        calls: a calls frame (``Run.calls``); needs ``module``, ``role``, ``in_shapes``,
            ``q_len``, ``kv_len``, ``batch`` and ``dtype``.
        model_or_config: the recorded model (weights give the dims and the weight dtype), or
            its config / ``config.to_dict()`` / a :class:`probe.Run`. A run recorded with its
            modules' coefficients (``meta["module_costs"]``, see :func:`module_costs`) is costed
            from them (no model is built, nothing of torch or transformers is imported); an
            older run from its config (a meta-device twin: no memory, no compute).
        dtype: weight dtype when building from a config (default: the config's, else float32).
    Returns:
        A copy of ``calls`` with the three float64 columns; NaN for rows whose module is not
        in the model. Tokens come from each call's first input shape (``[B, q, H]``; ids
        ``[B, q]`` for an embedding), attended positions from ``kv_len + q``.
    Cost:
        One :func:`module_cost` per distinct module, one JSON parse per distinct shape string,
        the formulas once per distinct (module, shape, dtype) signature; per row only the
        KV-length term (a 1M-row frame takes about 0.1 s on one CPU core).
    """
    n = len(calls)
    if n == 0:
        return calls.assign(**{col: pd.Series([], dtype=dt, index=calls.index) for col, dt in COST.items()})

    # 1. per distinct module: its coefficients, as recorded with the run or from the model
    mod_codes, mod_uniques = pd.factorize(calls["module"], use_na_sentinel=True)
    nm = len(mod_uniques)
    facts = recorded_costs(model_or_config) if dtype is None else None
    found = _table_from_facts(facts, mod_uniques, nm) if facts is not None else None
    if found is None:
        found = _table_from_model(resolve_model(model_or_config, dtype), calls, mod_codes, mod_uniques, nm)
    table, ids_input, w_default = found
    fields = _FIELDS
    # 2. per distinct shape string and dtype
    shp_codes, shp_uniques = pd.factorize(calls["in_shapes"], use_na_sentinel=True)
    parsed = np.array([_parse_first_shape(s) for s in shp_uniques] + [(math.nan, math.nan, math.nan, 0.0)])
    dt_codes, dt_uniques = pd.factorize(calls["dtype"], use_na_sentinel=True)
    isz = np.array([itemsize(str(d), w_default) for d in dt_uniques] + [w_default])
    ns, nd = len(shp_uniques) + 1, len(dt_uniques) + 1
    m_ = np.where(mod_codes < 0, nm, mod_codes).astype(np.int64)
    s_ = np.where(shp_codes < 0, ns - 1, shp_codes).astype(np.int64)
    d_ = np.where(dt_codes < 0, nd - 1, dt_codes).astype(np.int64)
    # 3. per distinct (module, shape, dtype) signature: everything but the KV length
    sig_codes, sig_keys = pd.factorize((m_ * ns + s_) * nd + d_)
    sig_keys = np.asarray(sig_keys, dtype=np.int64)
    sm, rest = np.divmod(sig_keys, ns * nd)
    ss, sd = np.divmod(rest, nd)
    c = {f: table[f][sm] for f in fields}
    tok_excl, elems, b_shape, ndim = (parsed[ss, i] for i in range(4))
    tokens = np.where(ids_input[sm] & (ndim == 2), elems, tok_excl)
    elems = np.where(np.isnan(elems), tokens, elems)
    batch = np.where((ndim >= 2) & (b_shape > 0), b_shape, 1.0)
    a = isz[sd]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = tokens / batch
        moe = np.where(c["b_moe"] > 0, c["b_moe"] * np.minimum(1.0, tokens * c["moe_frac"]), 0.0)
        f0 = c["f_tok"] * tokens + c["f_elem"] * elems  # FLOPs that do not depend on the cache
        fk = c["f_score"] * batch * q  # FLOPs per attended position
        b0 = c["b_const"] + c["bw_tok"] * tokens + a * (c["e_tok"] * tokens + c["e_elem"] * elems) + moe
        bk = a * c["e_kv"] * batch  # bytes per attended position
    # 4. per row: only the attended positions vary
    kv = calls["kv_len"].to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        kv_eff = np.minimum(kv + q[sig_codes], c["window"][sig_codes])
        flops = f0[sig_codes] + fk[sig_codes] * kv_eff
        nbytes = b0[sig_codes] + bk[sig_codes] * kv_eff
    missing = np.isnan(tokens)[sig_codes]
    if missing.any():  # calls recorded without tensor arguments: tokens from batch × q_len
        idx = np.flatnonzero(missing)
        b = calls["batch"].to_numpy(dtype="float64", na_value=np.nan)[idx]
        qq = calls["q_len"].to_numpy(dtype="float64", na_value=np.nan)[idx]
        t = b * qq
        sc = sig_codes[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            ke = np.minimum(kv[idx] + qq, c["window"][sc])
            flops[idx] = c["f_tok"][sc] * t + c["f_elem"][sc] * t + c["f_score"][sc] * b * ke * qq
            nbytes[idx] = c["b_const"][sc] + c["bw_tok"][sc] * t + a[sc] * (
                (c["e_tok"][sc] + c["e_elem"][sc]) * t + c["e_kv"][sc] * b * ke) \
                + np.where(c["b_moe"][sc] > 0, c["b_moe"][sc] * np.minimum(1.0, t * c["moe_frac"][sc]), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(nbytes > 0, flops / nbytes, np.nan)
    return calls.assign(
        flops=pd.Series(flops, index=calls.index, dtype="float64"),
        bytes_moved=pd.Series(nbytes, index=calls.index, dtype="float64"),
        intensity_flops_per_byte=pd.Series(intensity, index=calls.index, dtype="float64"),
    )


def parameter_counts(model: nn.Module, names: list[str]) -> pd.DataFrame:
    """Parameters and weight bytes of each named module (its whole subtree, shared ones once).

    Returns:
        Columns ``module`` (string), ``parameters`` (int64), ``weight_bytes`` (int64).
    """
    mods = dict(model.named_modules())
    rows = []
    for name in names:
        m = mods.get(name)
        seen: dict[int, Any] = {}
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        rows.append((name, sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())))
    return pd.DataFrame({
        "module": pd.Series([r[0] for r in rows], dtype="string"),
        "parameters": pd.Series([r[1] for r in rows], dtype="int64"),
        "weight_bytes": pd.Series([r[2] for r in rows], dtype="int64"),
    })
