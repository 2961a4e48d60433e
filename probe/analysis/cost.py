"""FLOPs and bytes moved per recorded call, estimated from captured shapes and module weights.

One place for the cost model. Each formula is a small function over numpy arrays (or scalars)
with the assumptions in its docstring; :func:`module_cost` folds the formulas of a module's
subtree into a handful of coefficients, and :func:`annotate` evaluates those coefficients for
every row of a calls frame at once (work per distinct module and per distinct shape string,
never per row), adding ``flops``, ``bytes_moved`` and ``intensity_flops_per_byte``.

The formulas live in :mod:`probe.analysis.cost_formulas`, the per-module coefficients (and the
copy of them a run keeps) in :mod:`probe.analysis.coefficients`; this module evaluates them over
a calls frame and is the cost model's public face (``probe.cost``), naming all three.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..dtypes import itemsize, torch_dtype
from ..schema import COST
from .grouping import codes_in_order, group_sum
from .labels import factorized
# the formulas and the per-module coefficients are part of this module's public face
# (``probe.cost.linear_flops``, ``probe.cost.module_cost``): they are what annotate evaluates
from .coefficients import (COST_FIELDS, COSTS_FORMAT, FLOP_CATEGORIES, ModuleCost, module_cost, module_costs,
                           module_of, recorded_costs)
from .cost_formulas import (
    ACT_FLOPS_PER_ELEMENT,
    INDEX_BYTES,
    NORM_FLOPS_PER_ELEMENT,
    ROPE_FLOPS_PER_ELEMENT,
    SOFTMAX_FLOPS_PER_SCORE,
    attention_bytes,
    attention_flops,
    config_dims,
    elementwise_bytes,
    elementwise_flops,
    embedding_bytes,
    kv_cache_bytes_per_token,
    linear_bytes,
    linear_flops,
    norm_bytes,
    norm_flops,
    softmax_flops,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# torch is imported by the functions that build a model, not here: a saved run whose meta
# holds its modules' coefficients (``module_costs``) is costed without torch or transformers.

log = logging.getLogger(__name__)

__all__ = [
    "ACT_FLOPS_PER_ELEMENT", "COSTS_FORMAT", "COST_FIELDS", "FLOP_CATEGORIES", "INDEX_BYTES", "ModuleCost",
    "NORM_FLOPS_PER_ELEMENT", "ROPE_FLOPS_PER_ELEMENT", "SOFTMAX_FLOPS_PER_SCORE", "annotate", "attention_bytes",
    "attention_flops", "config_dims", "elementwise_bytes", "elementwise_flops", "embedding_bytes",
    "flops_by_category", "kv_cache_bytes_per_token",
    "linear_bytes", "linear_flops", "model_from_config", "module_cost", "module_costs", "norm_bytes", "norm_flops",
    "parameter_counts", "recorded_costs", "resolve_model", "softmax_flops",
]


def _table_from_facts(facts: dict[str, Any], mod_uniques, nm: int) -> tuple[dict, np.ndarray, float] | None:
    """The coefficient table of :func:`annotate` from recorded facts; ``None`` when a recorded
    call's module is missing from them (costed from the config instead)."""
    mods = facts["modules"]
    if any(str(m) not in mods for m in mod_uniques):
        return None
    table = {f: np.full(nm + 1, np.nan) for f in COST_FIELDS}
    ids_input = np.zeros(nm + 1, dtype=bool)
    for code, name in enumerate(mod_uniques):
        entry = mods[str(name)]
        for f in COST_FIELDS:
            v = entry.get(f)
            table[f][code] = math.inf if v is None and f == "window" else (np.nan if v is None else float(v))
        ids_input[code] = bool(entry.get("ids_input"))
    return table, ids_input, float(facts.get("weight_itemsize") or 4.0)


def _table_from_model(model: nn.Module, calls: pd.DataFrame, mod_codes: np.ndarray, mod_uniques,
                      nm: int, parts: dict | None = None) -> tuple[dict, np.ndarray, float]:
    """The coefficient table of :func:`annotate`: one :func:`module_cost` per distinct module;
    ``parts``, when given, is filled with each category's ``f_tok``, ``f_elem``, ``f_score``."""
    cfg = getattr(model, "config", None)
    first_param = next(iter(model.parameters()), None)
    w_default = float(first_param.element_size()) if first_param is not None else 4.0
    names = dict(model.named_modules())
    table = {f: np.full(nm + 1, np.nan) for f in COST_FIELDS}
    ids_input = np.zeros(nm + 1, dtype=bool)
    first_rows = pd.Series(mod_codes).drop_duplicates()
    role_col = calls["role"]
    for row, code in zip(first_rows.index, first_rows.to_numpy()):
        if code < 0:
            continue
        role = role_col.iloc[int(row)]
        mod = module_of(names, str(mod_uniques[code]), None if pd.isna(role) else str(role))
        if mod is None:
            log.debug("annotate: module %s not in the model; its cost is NaN", mod_uniques[code])
            continue
        mc = module_cost(mod, cfg, None if pd.isna(role) else str(role))
        for f in COST_FIELDS:
            table[f][code] = getattr(mc, f)
        ids_input[code] = mc.ids_input
        for cat, coef in (parts.items() if parts is not None else ()):
            got = mc.parts.get(cat, (0.0, 0.0, 0.0))
            for f, v in zip(("f_tok", "f_elem", "f_score"), got):
                coef.setdefault(f, np.full(nm + 1, np.nan))[code] = v
    return table, ids_input, w_default


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

    flops, nbytes = _evaluate(calls, *_coefficients(calls, model_or_config, dtype, pd.factorize(calls["module"])))
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(nbytes > 0, flops / nbytes, np.nan)
    return calls.assign(
        flops=pd.Series(flops, index=calls.index, dtype="float64"),
        bytes_moved=pd.Series(nbytes, index=calls.index, dtype="float64"),
        intensity_flops_per_byte=pd.Series(intensity, index=calls.index, dtype="float64"),
    )


def _coefficients(calls: pd.DataFrame, model_or_config: Any, dtype: Any, modules: tuple) -> tuple:
    """Step 1 of :func:`annotate`: each call's module code and, per distinct module, its
    coefficients, as recorded with the run or from the model (``modules``: the calls' module
    codes and names)."""
    mod_codes, mod_uniques = modules
    nm = len(mod_uniques)
    facts = recorded_costs(model_or_config) if dtype is None else None
    found = _table_from_facts(facts, mod_uniques, nm) if facts is not None else None
    if found is None:
        found = _table_from_model(resolve_model(model_or_config, dtype), calls, mod_codes, mod_uniques, nm)
    return (mod_codes, *found)


def group_costs(calls: pd.DataFrame, model_or_config: Any, groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group of calls, the sums of :func:`annotate`'s ``flops`` and ``bytes_moved`` (NaN
    where no call of the group has one), without a column per call where the formulas allow:
    a call's cost is a constant of its signature plus a multiple of its KV length, so a group's
    sum is its count of each signature times the constants plus one weighted sum of the KV
    lengths (the same figures up to rounding; a sliding window, calls without tensor arguments,
    a missing KV length or more than 2**24 (group, signature) pairs take the per-call path).

    Args:
        calls, model_or_config: as for :func:`annotate`.
        groups: each call's group, in ``[0, n)``.
    """
    if not len(calls):
        return np.full(n, np.nan), np.full(n, np.nan)
    # the frame's kept module codes (the report's summary uses them too): a frame is read-only
    # while its tables are kept (probe.analysis.memo)
    return _evaluate(calls, *_coefficients(calls, model_or_config, None, factorized(calls, "module")),
                     groups=(groups, n))


def flops_by_category(calls: pd.DataFrame, model_or_config: Any, *, dtype: Any = None) -> pd.DataFrame:
    """The cost model's FLOPs of each call split by kind of work (:data:`FLOP_CATEGORIES`).

    Args:
        calls: a calls frame, as for :func:`annotate`.
        model_or_config: the model, or its config / ``config.to_dict()`` / a :class:`probe.Run`
            (a meta-device twin is built: the split is not among a run's recorded coefficients).
        dtype: as for :func:`annotate` (FLOPs do not depend on it).
    Returns:
        A frame on ``calls``' index with one float64 column ``<category>_flops`` per category,
        evaluated exactly as :func:`annotate` evaluates ``flops``; across a row they add up to
        its ``flops`` (NaN where the module is not in the model).
    """
    out = {f"{cat}_flops": pd.Series(np.nan, dtype="float64", index=calls.index) for cat in FLOP_CATEGORIES}
    if len(calls) == 0:
        return pd.DataFrame(out, index=calls.index)
    mod_codes, mod_uniques = pd.factorize(calls["module"], use_na_sentinel=True)
    nm = len(mod_uniques)
    parts: dict[str, dict] = {cat: {} for cat in FLOP_CATEGORIES}
    table, ids_input, w_default = _table_from_model(resolve_model(model_or_config, dtype), calls, mod_codes,
                                                    mod_uniques, nm, parts)
    for cat, coef in parts.items():
        if not coef:  # no module was costed
            coef = {f: np.full(nm + 1, np.nan) for f in ("f_tok", "f_elem", "f_score")}
        flops, _ = _evaluate(calls, mod_codes, {**table, **coef}, ids_input, w_default)
        out[f"{cat}_flops"] = pd.Series(flops, index=calls.index, dtype="float64")
    return pd.DataFrame(out, index=calls.index)


def _codes(s: pd.Series) -> tuple[np.ndarray, Any]:
    """Codes of a text column (-1 for a null) and the values they stand for: a categorical's own
    codes and categories (no hashing of its rows), else :func:`pd.factorize`'s."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy().astype(np.int64), s.dtype.categories
    return pd.factorize(s, use_na_sentinel=True)


def _filled(codes: np.ndarray, missing: int) -> np.ndarray:
    """``codes`` as a new int64 array, a null (-1) as ``missing``."""
    out = codes.astype(np.int64)
    out[out < 0] = missing
    return out


def _evaluate(calls: pd.DataFrame, mod_codes: np.ndarray, table: dict, ids_input: np.ndarray,
              w_default: float, groups: tuple[np.ndarray, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, bytes) of every row of ``calls`` from the coefficient ``table`` (steps 2-4 of
    :func:`annotate`); with ``groups`` (each row's group, the number of groups), their sums
    per group (see :func:`group_costs`)."""
    fields = COST_FIELDS
    nm = len(ids_input) - 1
    # 2. per distinct shape string and dtype
    # an attention function's first input is the queries [B, heads, q, d]: its tokens come from
    # batch x q_len, as for a call without tensor arguments
    role = calls["role"]
    shapes = calls["in_shapes"]
    if not isinstance(role.dtype, pd.CategoricalDtype) or "attention_fn" in role.dtype.categories:
        shapes = shapes.mask(role.eq("attention_fn").fillna(False).astype(bool))
    shp_codes, shp_uniques = _codes(shapes)
    parsed = np.array([_parse_first_shape(s) for s in shp_uniques] + [(math.nan, math.nan, math.nan, 0.0)])
    dt_codes, dt_uniques = _codes(calls["dtype"])
    isz = np.array([itemsize(str(d), w_default) for d in dt_uniques] + [w_default])
    ns, nd = len(shp_uniques) + 1, len(dt_uniques) + 1
    # 3. per distinct (module, shape, dtype) signature: everything but the KV length
    key = _filled(mod_codes, nm)  # (module * ns + shape) * nd + dtype, built in place
    key *= ns
    key += _filled(shp_codes, ns - 1)
    key *= nd
    key += _filled(dt_codes, nd - 1)
    sig_codes, sig_keys = codes_in_order(key, (nm + 1) * ns * nd)
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
    if groups is not None:
        summed = _group_sums(groups, sig_codes, kv, q, f0, fk, b0, bk, c["window"], tokens)
        if summed is not None:
            return summed
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
    if groups is not None:
        g, n = groups
        return group_sum(g, n, flops, 1), group_sum(g, n, nbytes, 1)
    return flops, nbytes


def _group_sums(groups: tuple[np.ndarray, int], sig_codes: np.ndarray, kv: np.ndarray, q: np.ndarray,
                f0: np.ndarray, fk: np.ndarray, b0: np.ndarray, bk: np.ndarray, window: np.ndarray,
                tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`group_costs` by signature: each group's count of each signature times the
    signature's constant term, plus the KV lengths weighted by its per-position term. ``None``
    where a signature has a window (the cost is then not linear in the KV length) or no tokens,
    or a KV length is missing."""
    g, n = groups
    n_sig = len(f0)
    if np.isnan(kv).any() or not np.isposinf(window).all() or np.isnan(tokens).any() or n * n_sig > 1 << 24:
        return None
    key = g.astype(np.int64)
    key *= n_sig
    key += sig_codes
    count = np.bincount(key, minlength=n * n_sig).reshape(n, n_sig)  # calls per (group, signature)
    kv_sum = np.bincount(key, weights=kv, minlength=n * n_sig).reshape(n, n_sig)  # their KV lengths
    out = []
    for const, per_kv in ((f0, fk), (b0, bk)):
        with np.errstate(invalid="ignore"):
            a = const + per_kv * q  # a call's cost at KV length 0
        ok = ~np.isnan(a) & ~np.isnan(per_kv)  # a call of another signature has no such cost (NaN)
        total = count @ np.where(ok, a, 0.0) + kv_sum @ np.where(ok, per_kv, 0.0)
        out.append(np.where(count @ ok.astype(np.int64) > 0, total, np.nan))
    return out[0], out[1]


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
