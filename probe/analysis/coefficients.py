"""A module's cost as a handful of coefficients, folded from its subtree, and recorded with a run.

:func:`module_cost` walks a module (real weights or on the ``meta`` device) and folds the
formulas of :mod:`probe.analysis.cost_formulas` for its linears, attention cores, norms,
activations, embeddings and mixture-of-experts banks into one :class:`ModuleCost`: a linear form
in per-call quantities that :func:`probe.analysis.cost.annotate` evaluates for every recorded
call. :func:`module_costs` keeps those coefficients with a run (``meta["module_costs"]``), so a
saved run is costed later without its model, torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields as dc_fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import itemsize
from .cost_formulas import (
    ACT_FLOPS_PER_ELEMENT,
    INDEX_BYTES,
    ROPE_FLOPS_PER_ELEMENT,
    SOFTMAX_FLOPS_PER_SCORE,
    config_dims,
    linear_flops,
    norm_flops,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# torch is imported by the functions that walk a module tree, not here.


@dataclass
class ModuleCost:
    """A module's cost as a linear form in per-call quantities (see :func:`probe.analysis.cost.annotate`).

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
    # the FLOP coefficients by kind of work: category -> [per token, per input element, per
    # score]; over the categories they add up to (f_tok, f_elem, f_score) (see FLOP_CATEGORIES)
    parts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, category: str, tok: float = 0.0, elem: float = 0.0, score: float = 0.0) -> None:
        """Add FLOPs per token, per input element and per score, under ``category``."""
        self.f_tok += tok
        self.f_elem += elem
        self.f_score += score
        self.note(category, tok, elem, score)

    def note(self, category: str, tok: float = 0.0, elem: float = 0.0, score: float = 0.0) -> None:
        """Book FLOPs already in the totals under ``category`` (a term that adds up several kinds)."""
        got = self.parts.setdefault(category, [0.0, 0.0, 0.0])
        got[0] += tok
        got[1] += elem
        got[2] += score


#: the kinds of work the cost model's FLOPs are made of (:attr:`ModuleCost.parts`): ``matrix``
#: the matrix products (linears' ``2·in·out`` per token, routers and expert banks, the
#: attention's QKᵀ and weighted sum), what ``torch.utils.flop_counter`` counts too; the rest are
#: elementwise work it has no formula for: ``bias`` (a linear's bias add, ``out`` per token),
#: ``softmax``, ``norm``, ``activation``, ``gating`` (a gated MLP's multiply), ``rope``,
#: ``residual`` (a decoder layer's two adds)
FLOP_CATEGORIES = ("matrix", "bias", "softmax", "norm", "activation", "gating", "rope", "residual")


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
    if role == "attention_fn":
        return _attention_function_cost(module, cfg)
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
            c.note("matrix", tok=linear_flops(1, i, o) * share)
            if b:
                c.note("bias", tok=o * share)
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
            c.add("norm", tok=norm_flops(1, dim))
            c.e_tok += 2 * dim
            c.b_const += sum(p.numel() * itemsize(p) for p in own)
            covered.update(id(p) for p in own)
        elif _is_activation(m) and m is module:
            c.add("activation", elem=ACT_FLOPS_PER_ELEMENT)  # a bare activation: cost scales with its input
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
                c.add("matrix", tok=2 * p.numel())
                c.b_const += p.numel() * w
                c.e_tok += p.shape[0] + p.shape[1]
            elif p.dim() >= 3:
                c.add("matrix", tok=2 * p.numel() * frac)
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
        c.note("activation", tok=ACT_FLOPS_PER_ELEMENT * inter * share)
        if gated:
            c.note("gating", tok=inter * share)
        c.e_tok += (3 if gated else 2) * inter * share
    for m in innermost:
        heads, kv, hd = _attention_shape(m, cfg)
        c.f_score += 4 * heads * hd + SOFTMAX_FLOPS_PER_SCORE * heads
        c.note("matrix", score=4 * heads * hd)
        c.note("softmax", score=SOFTMAX_FLOPS_PER_SCORE * heads)
        c.e_tok += 2 * heads * hd + 2 * kv * hd
        c.e_kv += 2 * kv * hd
        if has_rope:
            c.add("rope", tok=ROPE_FLOPS_PER_ELEMENT * (heads + kv) * hd)
            c.e_tok += 2 * (heads + kv) * hd
        c.window = min(c.window, _window(m, cfg))
    if role == "layer":
        hidden = config_dims(cfg)["hidden"]
        c.add("residual", tok=2 * hidden)  # two residual adds
        c.e_tok += 6 * hidden
    return c


def _attention_function_cost(module: nn.Module, cfg: Any) -> ModuleCost:
    """The attention function called inside ``module`` (an attention module): scores, softmax
    and the weighted sum over the cached keys and values; its projections and RoPE are not in it."""
    c = ModuleCost()
    attn = [m for m in module.modules() if _is_attention(m)] or [module]
    for m in attn[-1:]:
        heads, kv, hd = _attention_shape(m, cfg)
        c.f_score += 4 * heads * hd + SOFTMAX_FLOPS_PER_SCORE * heads
        c.note("matrix", score=4 * heads * hd)
        c.note("softmax", score=SOFTMAX_FLOPS_PER_SCORE * heads)
        c.e_tok += 2 * heads * hd  # queries in, outputs out; keys and values are read per position
        c.e_kv += 2 * kv * hd
        c.window = min(c.window, _window(m, cfg))
    return c


def module_of(names: dict, name: str, role: Any) -> Any:
    """The model's module a recorded name stands for: the attention module for an attention
    function (a pseudo-module ``<attention>.attention_fn``, :mod:`probe.recording.attnfn`)."""
    if role == "attention_fn":
        name = name.rpartition(".")[0]
    return names.get(name)


#: bump when :class:`ModuleCost` or :func:`module_cost` changes meaning: older runs are costed
#: from their config again (a meta-device model), as runs saved before ``module_costs``
COSTS_FORMAT = 1
#: the numeric coefficients of :class:`ModuleCost` (what a run records and annotate evaluates)
COST_FIELDS = tuple(f.name for f in dc_fields(ModuleCost) if f.name not in ("ids_input", "parts"))


def module_costs(model: nn.Module, modules: list[tuple[str, str | None]]) -> dict[str, Any]:
    """The facts a saved run needs to be costed without its model: per recorded module, its
    :class:`ModuleCost` coefficients, parameters and weight bytes (JSON-able).

    Args:
        model: the recorded model.
        modules: ``(qualified name, role)`` of each recorded module.
    Returns:
        ``{"format", "weight_itemsize", "modules": {name: {coefficient: value, ...,
        "ids_input", "parameters", "weight_bytes"}}}``; an unbounded attention span is ``None``.
        Stored as ``meta["module_costs"]`` and read back by :func:`probe.analysis.cost.annotate` given a run.
    """
    cfg = getattr(model, "config", None)
    first = next(iter(model.parameters()), None)
    names = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name, role in modules:
        mod = module_of(names, name, role)
        if mod is None or name in out:
            continue
        mc = module_cost(mod, cfg, role)
        entry: dict[str, Any] = {f: (None if math.isinf(v := float(getattr(mc, f))) else v) for f in COST_FIELDS}
        seen = {id(p): p for p in mod.parameters()} if role != "attention_fn" else {}  # a function: no weights
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
