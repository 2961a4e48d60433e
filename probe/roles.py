"""What each recorded module is for: its role, from its attribute name inside its parent and its type.

Shapes alone cannot tell a query projection from a key projection, or a gate from an up
projection; names can. The tables below are data, one entry per architecture family, keyed by
the role of the parent: the attribute name of a child of an ``attention`` module says whether
it is ``q_proj`` or ``o_proj``, the same name under an ``mlp`` may mean something else
(GPT-2's ``c_proj`` is the output projection under ``attn`` and the down projection under
``mlp``). A name no table knows falls back to the module's type (a ``*Norm`` class is a norm, an
activation class is ``act_fn``, ``Linear`` is ``linear``) and then to ``other``.

Roles, from the outside in:

- blocks (found structurally by :mod:`probe.recording.discovery`): ``embed``, ``layer``, ``norm`` (the
  final norm), ``head``;
- model level: ``model`` (the base model that holds the layers, e.g. ``model`` of
  ``LlamaForCausalLM``), ``rotary_emb`` (computed once per forward for every layer),
  ``dropout``;
- inside a layer: ``attention``, ``mlp`` (dense or mixture-of-experts), ``layer_norm``;
- inside attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``qkv_proj`` (fused),
  ``qk_norm``, ``rotary_emb``, and ``attention_fn``: the attention function itself (sdpa,
  eager, flash, flex, paged: scores, softmax, the weighted sum), not a module but recorded as
  the pseudo-module ``<attention>.attention_fn`` (:mod:`probe.recording.attnfn`); what is left
  of the attention module's self time is the rest (RoPE applied to q/k, the cache update,
  reshapes, dispatch);
- inside an MLP: ``gate_proj``, ``up_proj``, ``down_proj``, ``gate_up_proj`` (fused),
  ``act_fn``; in a mixture of experts ``router`` and ``experts`` (one fused module on
  transformers 5; on 4.x one call per active expert, whose projections are ``gate_proj`` /
  ``up_proj`` / ``down_proj`` again), ``shared_expert``.

Only names and type names are read, so the same function serves live modules and saved runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

#: roles of the four blocks that tile a forward (in the order a forward runs them)
BLOCKS = ("embed", "layer", "norm", "head")
#: roles a module can get, blocks first, in display order
ROLES: tuple[str, ...] = (
    *BLOCKS, "model", "rotary_emb", "attention", "q_proj", "k_proj", "v_proj", "qkv_proj", "qk_norm", "attention_fn",
    "o_proj", "mlp", "router", "experts", "shared_expert", "gate_proj", "up_proj", "gate_up_proj", "act_fn", "down_proj",
    "layer_norm", "dropout", "linear", "other",
)

# (parent role) -> {attribute name: role}, one entry per family that names things its own way.
# A child of a list (``experts.3``) is looked up under the list's own attribute name.
_FAMILIES: dict[str, dict[str, dict[str, str]]] = {
    # Llama, Mistral, Qwen2/3, Gemma/Gemma2, OLMo2, Starcoder2, Mixtral, Phi, GPT-NeoX, OPT, BLOOM
    "layer": {
        "common": {"self_attn": "attention", "attn": "attention", "attention": "attention",
                   "self_attention": "attention", "mlp": "mlp", "feed_forward": "mlp", "ffn": "mlp",
                   "input_layernorm": "layer_norm", "post_attention_layernorm": "layer_norm",
                   "dropout": "dropout", "resid_dropout": "dropout", "post_attention_dropout": "dropout",
                   "post_mlp_dropout": "dropout"},
        "gpt2": {"ln_1": "layer_norm", "ln_2": "layer_norm"},
        "gemma2": {"pre_feedforward_layernorm": "layer_norm", "post_feedforward_layernorm": "layer_norm"},
        "mixtral_4x": {"block_sparse_moe": "mlp"},
        "opt": {"self_attn_layer_norm": "layer_norm", "final_layer_norm": "layer_norm", "fc1": "up_proj",
                "fc2": "down_proj", "activation_fn": "act_fn"},
    },
    "attention": {
        "common": {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
                   "out_proj": "o_proj", "qkv_proj": "qkv_proj", "q_norm": "qk_norm", "k_norm": "qk_norm",
                   "rotary_emb": "rotary_emb", "attn_dropout": "dropout", "resid_dropout": "dropout",
                   "attention_dropout": "dropout", "dropout": "dropout"},
        "gpt2": {"c_attn": "qkv_proj", "c_proj": "o_proj"},
        "phi": {"dense": "o_proj"},
        "gpt_neox_bloom": {"query_key_value": "qkv_proj"},
        "mpt_dbrx": {"Wqkv": "qkv_proj"},
    },
    "mlp": {
        "common": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                   "gate_up_proj": "gate_up_proj", "act_fn": "act_fn", "act": "act_fn", "activation_fn": "act_fn",
                   "dropout": "dropout", "router": "router", "experts": "experts", "shared_expert": "shared_expert",
                   "shared_expert_gate": "router"},
        "gpt2": {"c_fc": "up_proj", "c_proj": "down_proj"},
        "phi": {"fc1": "up_proj", "fc2": "down_proj"},
        "gpt_neox_bloom": {"dense_h_to_4h": "up_proj", "dense_4h_to_h": "down_proj", "gelu_impl": "act_fn"},
        "mixtral_4x": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
    },
    "model": {
        "common": {"rotary_emb": "rotary_emb", "drop": "dropout", "dropout": "dropout", "embed_dropout": "dropout",
                   "emb_drop": "dropout"},
    },
}
# what is inside an expert (or a shared expert) is named like an MLP's insides
_ALIASES = {"experts": "mlp", "shared_expert": "mlp"}
_TABLE: dict[str, dict[str, str]] = {
    parent: {name: role for fam in fams.values() for name, role in fam.items()} for parent, fams in _FAMILIES.items()
}

# fallbacks on the type name (then on the attribute name) when no table knows the attribute
_BY_TYPE: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"rotary", re.I), "rotary_emb"),
    (re.compile(r"norm", re.I), "layer_norm"),
    (re.compile(r"attention|attn", re.I), "attention"),
    (re.compile(r"router|topk", re.I), "router"),
    (re.compile(r"experts$", re.I), "experts"),
    (re.compile(r"mlp|feedforward|moe", re.I), "mlp"),
    (re.compile(r"dropout", re.I), "dropout"),
    (re.compile(r"activation|^(gelu|silu|relu|tanh|sigmoid|quickgelu|gelutanh|newgelu).*$", re.I), "act_fn"),
    (re.compile(r"^(linear|conv1d)$", re.I), "linear"),
)
_BY_NAME: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|_)(norm|ln(_\d+)?|layernorm|layer_norm)($|_)|norm$", re.I), "layer_norm"),
    (re.compile(r"attn|attention", re.I), "attention"),
    (re.compile(r"mlp|feed_forward|ffn|moe", re.I), "mlp"),
    (re.compile(r"experts", re.I), "experts"),
    (re.compile(r"act", re.I), "act_fn"),
)


def _split(name: str) -> tuple[str, str]:
    """(parent name, attribute name); an element of a list is named by the list's attribute."""
    parent, _, attr = name.rpartition(".")
    while attr.isdigit() and parent:
        parent, _, attr = parent.rpartition(".")
    return parent, attr


def role_of(attr: str, type_name: str, parent_role: str, siblings: Iterable[str] = ()) -> str:
    """The role of a module named ``attr`` of class ``type_name`` inside a ``parent_role`` module.

    ``siblings`` (the parent's other attribute names) resolves ``gate``: a router where the
    parent also holds ``experts`` (Mixtral, Qwen-MoE), a gate projection otherwise.
    """
    table = _TABLE.get(_ALIASES.get(parent_role, parent_role), {})
    if attr == "gate":
        return "router" if "experts" in set(siblings) else "gate_proj"
    if attr in table:
        return table[attr]
    for pattern, role in _BY_TYPE:
        if pattern.search(type_name):
            return role
    for pattern, role in _BY_NAME:
        if pattern.search(attr):
            return role
    return "other"


def assign_roles(modules: Iterable[tuple[str, str]], fixed: Mapping[str, str], layers_name: str | None) -> dict[str, str]:
    """The role of every named module.

    Args:
        modules: ``(qualified name, class name)`` of the model's modules (the root, named ``""``,
            may be included; it gets no role).
        fixed: roles decided structurally (the blocks: ``embed``, ``layer``, ``norm``, ``head``).
        layers_name: qualified name of the decoder-layer list; its ancestors are ``model``.

    Returns:
        ``{name: role}`` for every non-root module.
    """
    mods = [(n, t) for n, t in modules if n]
    children: dict[str, set[str]] = {}
    for name, _ in mods:
        parent, attr = _split(name)
        children.setdefault(parent, set()).add(attr)
    ancestors = set()
    if layers_name:
        parts = layers_name.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    roles: dict[str, str] = {}
    for name, type_name in sorted(mods, key=lambda m: m[0].count(".")):
        if name in fixed:
            roles[name] = fixed[name]
            continue
        if name in ancestors:
            roles[name] = "model"
            continue
        parent, attr = _split(name)
        parent_role = roles.get(parent, "model") if parent else "model"
        roles[name] = role_of(attr, type_name, parent_role, children.get(parent, ()))
    return roles
