"""Block time of continuous-batching steps apportioned to prefill and decode tokens.

A ``mixed`` step runs each block once over a packed batch of prompt tokens (prefill) and
single new tokens (decode), so a block's measured time has no prefill/decode split of its own.
:func:`apportion` gives each recorded call of a serving step a prefill part and a decode part
that add up to its measured time (``cpu_ms``, or ``gpu_ms`` where every call has it), by this
method:

1. **Work per token kind, from the cost model** (:func:`probe.cost.module_cost`): for the
   step's prefill tokens and its decode tokens separately, ``W = f_tok·T + f_score·S + bw_tok·T``:
   per-token FLOPs of the module's matmuls, norms and activations over the kind's tokens ``T``,
   attention scores ``S = Σ q·min(cached + q, window)`` over each request's *own* context (from
   the step's ``layout``), and for an embedding the rows it gathers. The output head computes
   logits only for tokens that are sampled (``logits_to_keep``), so its ``T`` counts those.
2. **A line fitted to the same run's pure steps**: for each module, ``time ≈ c0 + c1·W`` by
   least squares over its calls in the run's pure ``prefill`` and pure ``decode`` serving steps
   (both clipped at zero). ``c0`` is what a call costs whatever its tokens (launches, weight
   reads, the interpreter), ``c1`` the time per unit of work.
3. **Shares in a mixed step**: ``prefill = c1·W_p + c0·n_p/n``, ``decode = c1·W_d + c0·n_d/n``
   (the fixed cost split by token counts ``n_p``, ``n_d``), scaled to the measured time, so the
   two parts add up to it exactly. ``predicted_ms = c0 + c1·(W_p + W_d)`` is kept beside the
   measured time: their ratio checks how well the pure steps explain the mixed ones.

Without pure steps of both kinds for a module (no line to fit), shares fall back to the work
ratio ``W_p / (W_p + W_d)`` (``method = "work share"``). Pure steps keep their time whole.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .. import schema
from ..schema import APPORTION

def _empty() -> pd.DataFrame:
    return schema.empty(APPORTION)


def _kind_work(mc: Any, layout: list, role: str) -> tuple[float, float, int, int]:
    """(W_prefill, W_decode, prefill tokens, decode tokens) of one module in one step."""
    w = {"prefill": 0.0, "decode": 0.0}
    n = {"prefill": 0, "decode": 0}
    for e in layout:
        kind, q, cached = e[1], float(e[2]), float(e[3])
        sampled = bool(e[5]) if len(e) > 5 else True
        t = (1.0 if sampled else 0.0) if role == "head" else q
        span = min(cached + q, mc.window)
        w[kind] += mc.f_tok * t + mc.bw_tok * t + mc.f_score * q * span
        n[kind] += int(t)
    return w["prefill"], w["decode"], n["prefill"], n["decode"]


def apportion(run: Any, model: Any = None) -> pd.DataFrame:
    """Each call of a serving step with its time split into prefill and decode parts.

    Args:
        run: a :class:`probe.Run` with serving steps (``runs.kind == "serve"``).
        model: the recorded model, or None to cost a meta-device twin built from the config
            saved with the run.
    Returns:
        One row per call of a serving step (columns :data:`APPORTION`); empty without serving
        steps. ``prefill_ms + decode_ms == measured_ms`` on every row.
    """
    from .cost import module_cost, resolve_model

    runs = run.runs
    serve_ids = set(runs.loc[runs["kind"] == "serve", "run_id"]) if len(runs) else set()
    steps = run.steps[run.steps["run_id"].isin(serve_ids) & run.steps["layout"].notna()]
    calls = run.calls[run.calls["run_id"].isin(serve_ids)]
    if steps.empty or calls.empty:
        return _empty()
    m = resolve_model(model if model is not None else run)
    cfg = getattr(m, "config", None)
    names = dict(m.named_modules())
    use_gpu = not np.isnan(schema.floats(calls, "gpu_ms")).any()
    layouts = {(r, s): json.loads(js) for r, s, js in zip(steps["run_id"], steps["step"], steps["layout"])}
    costs: dict[str, Any] = {}

    rows = []
    for (module, role), sub in calls.groupby(["module", "role"], sort=False, observed=True):
        mod = names.get(str(module))
        if mod is None:
            continue
        mc = costs.get(module) or module_cost(mod, cfg, str(role))
        costs[module] = mc
        t = schema.floats(sub, "gpu_ms" if use_gpu else "cpu_ms")
        work = np.array([_kind_work(mc, layouts.get((r, s), []), str(role))
                         for r, s in zip(sub["run_id"], sub["step"])], dtype="float64").reshape(-1, 4)
        wp, wd, n_p, n_d = work.T
        phase = sub["phase"].to_numpy(dtype=object)
        pure = (phase == "prefill") | (phase == "decode")
        c0 = c1 = math.nan
        x = (wp + wd)[pure]
        if (phase == "prefill").any() and (phase == "decode").any() and np.ptp(x) > 0:
            c1, c0 = np.polyfit(x, t[pure], 1)
            c1, c0 = max(c1, 0.0), max(c0, 0.0)
        n = n_p + n_d
        with np.errstate(invalid="ignore", divide="ignore"):
            if not math.isnan(c1) and (c0 > 0 or c1 > 0):
                part_p = c1 * wp + c0 * np.where(n > 0, n_p / n, 0.0)
                part_d = c1 * wd + c0 * np.where(n > 0, n_d / n, 0.0)
                method = np.where(pure, "pure step", "fitted line")
                predicted = c0 + c1 * (wp + wd)
            else:
                part_p, part_d = wp, wd
                method = np.where(pure, "pure step", "work share")
                predicted = np.full(len(t), np.nan)
            tot = part_p + part_d
            share = np.where(tot > 0, part_p / tot, np.where(n > 0, n_p / np.maximum(n, 1), 0.0))
        share = np.where(phase == "prefill", 1.0, np.where(phase == "decode", 0.0, share))
        rows.append(pd.DataFrame({
            "run_id": sub["run_id"].to_numpy(), "step": sub["step"].to_numpy(), "phase": phase,
            "module": str(module), "role": str(role), "layer": sub["layer"].to_numpy(),
            "measured_ms": t, "prefill_ms": t * share, "decode_ms": t - t * share, "prefill_share": share,
            "work_prefill": wp, "work_decode": wd, "predicted_ms": predicted, "method": method,
        }))
    if not rows:
        return _empty()
    out = pd.concat(rows, ignore_index=True).sort_values(["run_id", "step"], kind="stable")
    return pd.DataFrame({c: out[c].astype(d) for c, d in APPORTION.items()}).reset_index(drop=True)


def step_split(apportioned: pd.DataFrame, roles: tuple[str, ...] = ("embed", "layer", "norm", "head")) -> pd.DataFrame:
    """Per serving step: blocks' measured time and its prefill/decode parts (block roles only,
    which tile a forward), with ``predicted_ms`` summed where every block has a line."""
    a = apportioned[apportioned["role"].isin(roles)]
    cols = {"measured_ms": "float64", "prefill_ms": "float64", "decode_ms": "float64", "predicted_ms": "float64"}
    if a.empty:
        base = {"run_id": "string", "step": "int64", "phase": "string"}
        return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in {**base, **cols}.items()})
    g = a.groupby(["run_id", "step", "phase"], sort=False, observed=True)
    out = g[["measured_ms", "prefill_ms", "decode_ms"]].sum()
    out["predicted_ms"] = g["predicted_ms"].sum(min_count=1).where(g["predicted_ms"].count() == g.size())
    return out.reset_index()
