"""A deep run's FLOPs set against the cost model's: what agrees, and what explains the rest.

A deep pass (``probe.attach(model, deep=...)``) counts each aten op's FLOPs by PyTorch's own
formulas (``torch.utils.flop_counter``, plus the CPU SDPA kernel): matrix products only
(``mm``, ``addmm``, ``bmm``, the attention kernels). The cost model
(:mod:`probe.analysis.cost`) also counts the elementwise work around them: bias adds, softmax,
norms, activations, the gating multiply, RoPE and the residual adds. So, call by call, the deep
FLOPs should equal the cost model's *matrix-product* FLOPs (:func:`probe.cost.flops_by_category`,
category ``matrix``), and the gap to the cost model's total is its other categories.

Where the two differ, the verdict says by how much; the known reasons are in ``docs/deep.md``
(an eager sliding-window layer computes every score and masks those outside the window, which
the cost model does not count; a run saved before the ledger kept its calls' input shapes is
costed over batch × q_len tokens, the output head in prefill included).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from .. import schema
from ..roles import BLOCKS
from ..schema import FLOPS_RECONCILED
from .coefficients import FLOP_CATEGORIES
from .cost import annotate, config_dims, flops_by_category, resolve_model

STEP = "(step)"
_CATS = [c for c in FLOP_CATEGORIES if c != "matrix"]
_FN = ".attention_fn"
#: a sampled step: two ranks' step 3 are two steps, each with its own forward and blocks
_STEP_KEYS = ["run_id", "rank", "step"]
#: config fields beside the attention dims that change a module's FLOPs without renaming it
_SIZES = ("intermediate_size", "vocab_size", "num_local_experts", "num_experts_per_tok", "sliding_window")


def reconcile_flops(run: Any, model_or_config: Any = None, *, by: str = "block") -> pd.DataFrame:
    """Per sampled step of a deep run and per block (or module): the deep pass's FLOPs against
    the cost model's matrix products, with the rest of the cost model's FLOPs by category.

    Args:
        run: a :class:`probe.Run` with a deep pass (its ``ledger`` frame).
        model_or_config: the recorded model, its config or ``config.to_dict()``; default: the
            run's own ``meta["config"]`` (a meta-device twin: no memory, no compute).
        by: ``"block"`` (embed, each layer, the final norm, the head) or ``"module"``: each module
            at the run's recorded depth (``depth="sublayers"`` adds attention, its attention
            function, MLP and norms; ``"all"`` every module). A ``(step)`` row per sampled step
            sets the whole forward against the sum of its blocks' cost.
    Returns:
        A frame of :data:`probe.schema.FLOPS_RECONCILED`, in step and model order. ``verdict``
        is ``"equal"`` where the deep FLOPs equal the cost model's matrix products exactly, else
        ``"differs by ±x.x %"`` of them; ``explained_by`` lists the categories that make up the
        gap from the deep FLOPs to the cost model's total.
    Raises:
        ValueError: ``run`` has no deep pass; ``by`` is unknown; the model or config is not the
            one the run recorded (each with what to do instead).
    """
    if by not in ("block", "module"):
        raise ValueError(f"by must be 'block' or 'module'; got {by!r}")
    ledger = getattr(run, "ledger", None)
    if not isinstance(ledger, pd.DataFrame) or ledger.empty:
        raise ValueError("this run has no deep pass (its ledger is empty): record one with "
                         "probe.attach(model, deep=True), probe.profile(..., deep=True) or `probe run MODEL --deep`, "
                         "then reconcile that run")
    meta = getattr(run, "meta", None) or {}
    if model_or_config is None and not meta.get("config"):
        raise ValueError("this run's meta has no 'config': pass the recorded model (or its config) as model_or_config")
    model = resolve_model(run if model_or_config is None else model_or_config)
    _check_same_model(model, meta, ledger)
    roles = _roles(model)
    keep = _kept_modules(run, model, ledger, by)
    calls = _calls_of(ledger, roles, getattr(run, "runs", None))
    cost = annotate(calls, model)["flops"]
    parts = flops_by_category(calls, model)
    out = calls[["run_id", "rank", "step", "phase", "q_len", "kv_len", "module", "role"]].copy()
    out["deep_flops"] = ledger.loc[calls.index, "flops"].to_numpy(dtype="float64", na_value=np.nan)
    out["cost_flops"] = cost.to_numpy()
    for cat in FLOP_CATEGORIES:
        out[f"{cat}_flops"] = parts[f"{cat}_flops"].to_numpy()
    steps = _step_rows(ledger, out)
    out = out[out["module"].isin(keep)]
    out = pd.concat([out, steps], ignore_index=True) if len(steps) else out
    order = {m: i for i, m in enumerate(dict.fromkeys(ledger["module"].dropna()))}
    out["_m"] = out["module"].map(lambda m: order.get(m, len(order)))
    out = out.sort_values(["run_id", "rank", "step", "_m"], kind="stable").drop(columns="_m")
    return schema.conform(_verdicts(out), FLOPS_RECONCILED, extra=False)


def _check_same_model(model: Any, meta: dict, ledger: pd.DataFrame) -> None:
    """Refuse a model whose dims or module names are not the run's."""
    names = dict(model.named_modules())
    missing = sorted({m for m in ledger["module"].dropna()
                      if (m.rpartition(".")[0] if m.endswith(_FN) else m) not in names})
    problem = f"modules {missing[:3]}{' ...' if len(missing) > 3 else ''} of the run are not in it" if missing else ""
    cfg = meta.get("config")
    if not problem and isinstance(cfg, dict) and getattr(model, "config", None) is not None:
        try:
            want, got = config_dims(cfg), config_dims(model.config)
        except (TypeError, ValueError):  # a config without the usual names: the module names decide
            want = got = {}
        for k in _SIZES:
            a, b = cfg.get(k), getattr(model.config, k, None)
            if a is not None and b is not None and a != b:
                want[k], got[k] = a, b
        if want != got or cfg.get("model_type", model.config.model_type) != model.config.model_type:
            problem = (f"it is a {model.config.model_type} with {got}, the run recorded a "
                       f"{cfg.get('model_type')} with {want}")
    if problem:
        raise ValueError(f"the model or config given is not the one this run recorded: {problem}; pass the "
                         "recorded model, or leave model_or_config out to use the run's own meta['config']")


def _roles(model: Any) -> dict[str, str]:
    """Module name -> its role (:mod:`probe.roles`), the attention functions' pseudo-modules included."""
    from ..recording.discovery import select_modules

    roles = {info.name: info.role for _, info in select_modules(model, "all")}
    roles.update({f"{n}{_FN}": "attention_fn" for n, r in list(roles.items()) if r == "attention"})
    return roles


def _kept_modules(run: Any, model: Any, ledger: pd.DataFrame, by: str) -> set:
    """The ledger's modules the rows are for: the blocks, or the modules at the recorded depth."""
    from ..recording.discovery import select_modules

    depth = "blocks"
    if by == "module":
        runs = getattr(run, "runs", None)
        ids = set(ledger["run_id"])
        got = runs.loc[runs["run_id"].isin(ids), "depth"].dropna() if isinstance(runs, pd.DataFrame) \
            and "depth" in runs else pd.Series([], dtype=object)
        depth = str(got.iloc[0]) if len(got) else str((getattr(run, "meta", None) or {}).get("depth", "blocks"))
        depth = depth if depth in ("blocks", "sublayers", "all") else "blocks"
    chosen = {info.name: info.role for _, info in select_modules(model, depth)}
    keep = {n for n, r in chosen.items() if by == "module" or r in BLOCKS}
    if depth != "blocks":  # the attention function is recorded beside its module's sublayers
        keep |= {f"{n}{_FN}" for n, r in chosen.items() if r == "attention"}
    return keep


def _calls_of(ledger: pd.DataFrame, roles: dict[str, str], runs: Any) -> pd.DataFrame:
    """The ledger's module calls as a calls frame the cost model reads: shapes, batch, lengths.

    A call without recorded shapes (keyword arguments only, or a run saved before the ledger
    kept them) is costed over batch × q_len tokens, as :func:`probe.cost.annotate` does."""
    rows = ledger.dropna(subset=["module"])
    rank = _ranks(rows)
    first = {s: _first_dim(s) for s in rows["in_shapes"].dropna().unique()}
    lead = rows["in_shapes"].map(first).astype("float64")
    # a step's batch: the leading dim of its first call with a batched input (the embedding's ids),
    # else the run's input sequences
    batch = lead.groupby([rows["run_id"], rank, rows["step"]]).transform("first")
    if batch.isna().any() and isinstance(runs, pd.DataFrame) and "batch" in runs:
        per_run = runs.drop_duplicates("run_id").set_index("run_id")["batch"].astype("float64")
        batch = batch.fillna(rows["run_id"].map(per_run).astype("float64"))
    batch = batch.fillna(1).astype("int64")
    return pd.DataFrame({
        "run_id": rows["run_id"], "rank": rank, "step": rows["step"], "phase": rows["phase"], "q_len": rows["q_len"],
        "kv_len": rows["kv_len"], "module": rows["module"], "role": rows["module"].map(roles),
        "in_shapes": rows["in_shapes"], "batch": batch, "dtype": pd.Series(None, index=rows.index, dtype=object),
    }, index=rows.index)


def _ranks(ledger: pd.DataFrame) -> pd.Series:
    """The rows' rank (0 for a ledger without the column: one process)."""
    if "rank" in ledger.columns:
        return ledger["rank"].astype("int64")
    return pd.Series(np.zeros(len(ledger), np.int64), index=ledger.index)


def _first_dim(text: str) -> float:
    """The leading dim of a call's first argument of two or more dims (NaN: none)."""
    try:
        shapes = json.loads(text)
    except ValueError:
        return np.nan
    return float(shapes[0][0]) if shapes and isinstance(shapes[0], list) and len(shapes[0]) >= 2 else np.nan


def _step_rows(ledger: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Per sampled step: the whole forward's deep FLOPs against the sum of its blocks' cost."""
    blocks = rows[rows["role"].isin(BLOCKS)]
    if blocks.empty:
        return pd.DataFrame()
    sums = blocks.groupby(_STEP_KEYS, sort=False)[
        ["cost_flops", "deep_flops", *(f"{c}_flops" for c in FLOP_CATEGORIES)]].sum(min_count=1)
    sums = sums.rename(columns={"deep_flops": "_blocks"})
    head = ledger[ledger["module"].isna()]
    head = head.assign(rank=_ranks(head)).set_index(_STEP_KEYS)
    out = sums.join(head[["phase", "q_len", "kv_len", "flops"]], how="inner").reset_index()
    out["deep_flops"] = out.pop("flops").to_numpy(dtype="float64", na_value=np.nan)
    # ops of the forward outside every block (transformers 4.x's rotary frequencies are a matmul
    # of the positions, run before the first layer): the deep pass's alone, kept apart
    out["outside_flops"] = out["deep_flops"] - out.pop("_blocks").fillna(0.0)
    return out.assign(module=STEP, role=None)


def _verdicts(out: pd.DataFrame) -> pd.DataFrame:
    """The difference to the matrix products, its verdict, and the gap's categories."""
    deep, matrix, cost = (out[c].to_numpy(dtype="float64") for c in ("deep_flops", "matrix_flops", "cost_flops"))
    outside = (out["outside_flops"].to_numpy(dtype="float64", na_value=np.nan) if "outside_flops" in out
               else np.full(len(out), np.nan))
    deep = deep - np.nan_to_num(outside)  # compared: what ran inside the blocks the cost model costs
    out["diff_flops"] = deep - matrix
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(matrix > 0, 100.0 * (deep - matrix) / matrix, np.nan)
    out["diff_pct"] = pct
    out["rest_flops"] = cost - matrix
    out["gap_flops"] = cost - deep
    verdict = []
    for d, m, p in zip(deep, matrix, pct):
        if np.isnan(m):
            verdict.append("not costed")
        elif d == m:
            verdict.append("equal")
        elif m == 0:
            verdict.append("deep only")
        else:
            verdict.append(f"differs by {p:+.1f} %")
    out["verdict"] = verdict
    cats = out[[f"{c}_flops" for c in _CATS]].to_numpy(dtype="float64")
    out["explained_by"] = [" + ".join(f"{_CATS[j]} {v:,.0f}" for j, v in sorted(
        ((j, v) for j, v in enumerate(r) if v > 0), key=lambda t: -t[1])) for r in cats]
    out["explained_by"] = [e + (f"; outside the blocks (deep only) {o:,.0f}" if o == o and o > 0 else "")
                           for e, o in zip(out["explained_by"], outside)]
    return out
