"""Find the blocks of a causal LM generically: input embedding, decoder layers, final norm, head.

Works from structure, not from class names, so that Llama, Mistral, Qwen, Gemma, Phi, GPT-2,
GPT-NeoX, OPT, BLOOM, Mixtral, OLMo, Starcoder2 and unseen architectures are handled alike:

- the input embedding is ``model.get_input_embeddings()``;
- the output head is ``model.get_output_embeddings()``;
- the decoder layers are the ``nn.ModuleList`` of identical modules whose length equals
  ``config.num_hidden_layers`` (else the longest such list nearest the root);
- the final norm is the norm-like sibling of that list registered after it.

When no layer list is found, the fallback is every direct child of the innermost module that
holds the embedding (or of the model), with a warning; ``depth="all"`` always works.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..roles import assign_roles
from ..schema import DEPTHS, Depth

log = logging.getLogger(__name__)

_NORM_NAME = re.compile(r"(^|[._])(norm|ln_f|final_layer_?norm|final_layernorm|ln_out|ln)([._]|$)|norm$", re.I)


@dataclass(frozen=True)
class ModuleInfo:
    """What the probe knows statically about one recorded module."""

    name: str  # fully qualified name below the profiled model
    module_type: str  # class name
    role: str  # see probe.roles: embed | layer | norm | head | attention | q_proj | ... | other
    depth: int  # nesting depth below the profiled model
    layer: int | None  # decoder layer index, None outside the layers


@dataclass
class Blocks:
    """The structure found in a model."""

    embed: list[str]
    layers_name: str | None  # qualified name of the decoder ModuleList
    layers: list[str]
    norm: str | None
    head: str | None
    recognised: bool


class UnrecognisedModelWarning(UserWarning):
    """The model's decoder structure was not recognised; a documented fallback was used."""


def _is_norm(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1]
    return ("norm" in cls) or bool(_NORM_NAME.search(leaf))


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    n_layers = None
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n_layers = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    candidates: list[tuple[int, int, int, str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        types = {type(m) for m in mod}
        if len(types) != 1:
            continue
        # decoder layers hold parameters and several children (attention, mlp, norms)
        first = mod[0]
        if sum(1 for _ in first.children()) < 2:
            continue
        depth = name.count(".") + 1 if name else 0
        matches = 0 if (n_layers is not None and len(mod) == n_layers) else 1
        candidates.append((matches, depth, -len(mod), name, mod))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[:3])
    _, _, _, name, mod = candidates[0]
    return name, mod


def _qualname(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules():
        if mod is target and name:
            return name
    return None


def find_blocks(model: nn.Module) -> Blocks:
    """Locate the input embedding, decoder layers, final norm and output head of ``model``."""
    embed_mod = None
    head_mod = None
    if hasattr(model, "get_input_embeddings"):
        try:
            embed_mod = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embed_mod = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head_mod = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            head_mod = None
    embed = _qualname(model, embed_mod)
    head = _qualname(model, head_mod)

    found = _find_layer_list(model)
    if found is None:
        return Blocks(embed=[embed] if embed else [], layers_name=None, layers=[], norm=None, head=head, recognised=False)
    layers_name, layer_list = found
    layers = [f"{layers_name}.{i}" for i in range(len(layer_list))]

    # The final norm: a norm-like sibling of the layer list, registered after it.
    parent_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    parent = model.get_submodule(parent_name) if parent_name else model
    norm = None
    seen_layers = False
    late, early = [], []
    for child_name, child in parent.named_children():
        qual = f"{parent_name}.{child_name}" if parent_name else child_name
        if qual == layers_name:
            seen_layers = True
            continue
        if _is_norm(child_name, child):
            (late if seen_layers else early).append(qual)
    if late:
        norm = late[0]
    else:
        # Some decoders register the final norm before the layers (OPT's final_layer_norm);
        # norms of the embeddings (BLOOM's word_embeddings_layernorm) are never the final one.
        early = [q for q in early if "emb" not in q.rsplit(".", 1)[-1].lower()]
        finals = [q for q in early if "final" in q.rsplit(".", 1)[-1].lower()]
        norm = (finals or early or [None])[-1]
    # Extra embeddings beside the input one (learned positions: GPT-2 wpe, OPT embed_positions).
    extra_embed = [
        f"{parent_name}.{n}" if parent_name else n
        for n, c in parent.named_children()
        if isinstance(c, nn.Embedding) and (f"{parent_name}.{n}" if parent_name else n) != embed
    ]
    embeds = ([embed] if embed else []) + extra_embed
    return Blocks(embed=embeds, layers_name=layers_name, layers=layers, norm=norm, head=head, recognised=True)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def select_modules(model: nn.Module, depth: Depth = "blocks") -> list[tuple[nn.Module, ModuleInfo]]:
    """The modules to hook at ``depth``, in registration order, with their static facts.

    Args:
        model: the model given to :func:`probe.attach` (never itself in the list: its
            forwards are the steps).
        depth: ``"blocks"``, ``"sublayers"`` or ``"all"``.
    Returns:
        ``(module, info)`` pairs. A module reachable under two names is listed once.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {', '.join(repr(d) for d in DEPTHS)}; got {depth!r}")
    blocks = find_blocks(model)
    layer_index: dict[str, int] = {name: i for i, name in enumerate(blocks.layers)}
    roles: dict[str, str] = {n: "embed" for n in blocks.embed}
    roles.update({n: "layer" for n in blocks.layers})
    if blocks.norm:
        roles[blocks.norm] = "norm"
    if blocks.head:
        roles[blocks.head] = "head"

    if not blocks.recognised:
        warnings.warn(
            f"probe: no decoder-layer list found in {type(model).__name__}; recording every direct "
            "child of the model instead (use depth='all' to record every module).",
            UnrecognisedModelWarning,
            stacklevel=3,
        )

    def layer_of(name: str) -> int | None:
        if blocks.layers_name and name.startswith(blocks.layers_name + "."):
            idx = name[len(blocks.layers_name) + 1 :].split(".", 1)[0]
            if idx.isdigit():
                return int(idx)
        return None

    # roles of every module from its attribute name and type (probe.roles); blocks keep theirs
    all_roles = assign_roles(((n, type(m).__name__) for n, m in model.named_modules()), roles, blocks.layers_name)
    chosen: list[tuple[nn.Module, ModuleInfo]] = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not name or id(mod) in seen:
            continue
        role = roles.get(name)
        take = False
        if depth == "all":
            take = True
        elif role is not None:
            take = True
        elif not blocks.recognised and "." not in name:
            take = True  # fallback: direct children
        elif depth == "sublayers":
            parent = name.rsplit(".", 1)[0]
            take = parent in layer_index
        if not take:
            continue
        if role is None:
            role = all_roles.get(name, "other")
        seen.add(id(mod))
        info = ModuleInfo(
            name=name,
            module_type=type(mod).__name__,
            role=role,
            depth=name.count(".") + 1,
            layer=layer_of(name),
        )
        chosen.append((mod, info))
    return chosen
