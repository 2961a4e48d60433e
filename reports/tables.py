"""Table builders shared by the HTML report and the dashboard: shape walkthrough, headline, ranks.

Both return DataFrames (typed columns even when empty); :mod:`reports.figures` re-exports them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from probe import fmt, schema
from probe.columns import ints
from probe.schema import HEADLINE, shape_text

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run


def ranks(data: "pd.DataFrame | Run") -> list[int]:
    """The process ranks present in a frame, or in a run (its calls; its runs frame without calls).

    ``[0]`` for one process, or a frame without ranks.
    """
    frame = data if isinstance(data, pd.DataFrame) else (data.calls if len(data.calls) else data.runs)
    if frame.empty or "rank" not in frame.columns:
        return [0]
    vals = ints(frame["rank"], 0)
    lo, hi = int(vals.min()), int(vals.max())
    if lo == hi:  # one process: two passes over the column, no hashing of it
        return [lo]
    return sorted(int(v) for v in pd.unique(vals))


def _walk_rows(calls: pd.DataFrame) -> pd.DataFrame:
    """The calls of the first generate run's prefill step and first decode step, in call order."""
    phase = calls["phase"]
    pre = np.flatnonzero((phase == "prefill").to_numpy(dtype=bool, na_value=False))
    rid = calls["run_id"].iloc[pre[0] if len(pre) else 0]
    in_run = (calls["run_id"] == rid).to_numpy(dtype=bool, na_value=False)
    step = calls["step"].to_numpy(dtype="int64")
    picked = []
    for name in ("prefill", "decode"):
        m = in_run & (phase == name).to_numpy(dtype=bool, na_value=False)
        if m.any():
            picked.append(np.flatnonzero(m & (step == step[m].min())))
    if not picked:
        picked.append(np.flatnonzero(in_run & (step == step[in_run].min())))
    sel = calls.iloc[np.concatenate(picked)][["phase", "step", "module", "role", "layer", "in_shapes",
                                              "out_shapes", "start_ms"]]
    return sel.sort_values(["step", "start_ms"], kind="stable")


_LAYER_SEGMENT = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def _collapse_layers(out: pd.DataFrame, layer: np.ndarray) -> pd.DataFrame:
    """Rows of identical decoder layers folded into one: ``model.layers.{0..31}`` (and
    ``model.layers.{0..31}.mlp`` ... at deeper depths) where every folded layer has the same
    input and output shapes; a layer that differs keeps a row of its own."""
    keys: list[tuple] = []
    names: list[str | None] = []
    rank = out["rank"].tolist() if "rank" in out else [False] * len(out)
    phase, step, ins, outs = (out[c].tolist() for c in ("phase", "step", "in_shapes", "out_shapes"))
    for i, (mod, lay) in enumerate(zip(out["module"].tolist(), layer)):
        pattern = None
        if lay >= 0:
            for m in _LAYER_SEGMENT.finditer(str(mod)):
                if int(m.group(1)) == lay:
                    pattern = str(mod)[:m.start()] + "{}" + str(mod)[m.end():]
                    break
        names.append(pattern)
        keys.append((rank[i], phase[i], step[i], pattern if pattern is not None else i, ins[i], outs[i]))
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if all(len(g) == 1 for g in groups.values()):
        return out
    first = [g[0] for g in groups.values()]
    folded = out.iloc[sorted(first)].copy()
    modules = folded["module"].astype(object).tolist()
    for g in groups.values():
        if len(g) > 1 and names[g[0]] is not None:
            pos = folded.index.get_loc(out.index[g[0]])
            modules[pos] = names[g[0]].replace("{}", fmt.index_set(layer[j] for j in g))
    folded["module"] = modules
    return folded.reset_index(drop=True)


def shape_walkthrough(calls: pd.DataFrame, collapse: bool = True) -> pd.DataFrame:
    """Each block's input and output shapes for the prefill step and the first decode step.

    Decoder layers with identical shapes are folded into one row, ``model.layers.{0..31}``, as
    ``probe run`` prints them (``collapse=False`` keeps a row per layer).

    Taken from the first generate run (the first run with a prefill step); a recording with
    no prefill shows its first step instead. A recording of several ranks (tensor parallel,
    merged by ``probe.load``) walks each rank's first run and interleaves them, the same call
    of every rank on adjacent rows, so a sharded projection shows each rank's width.

    Args:
        calls: the ``calls`` frame.

    Returns:
        Columns ``phase, step, module, role, in_shapes, out_shapes`` in call order, shapes as
        text such as ``[1, 7, 64]``; with more than one rank, a leading ``rank`` column.
    """
    cols = {"phase": "string", "step": "int64", "module": "string", "role": "string", "in_shapes": "string",
            "out_shapes": "string"}
    if calls.empty:
        return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in cols.items()})
    rank_list = ranks(calls)
    if len(rank_list) == 1:
        sel = _walk_rows(calls)
    else:
        parts = []
        rank_col = calls["rank"].to_numpy(dtype="int64", na_value=0)
        for r in rank_list:
            part = _walk_rows(calls[rank_col == r])
            # position of the call within its step: the key that lines the ranks up
            parts.append(part.assign(rank=r, _pos=part.groupby("step", sort=False, observed=True).cumcount()))
        sel = pd.concat(parts).sort_values(["step", "_pos", "rank"], kind="stable")
        cols = {"rank": "int64", **cols}
    shape_in = {s: shape_text(s) for s in sel["in_shapes"].unique()}
    shape_out = {s: shape_text(s) for s in sel["out_shapes"].unique()}
    out = pd.DataFrame({
        "phase": sel["phase"].to_numpy(), "step": sel["step"].to_numpy(dtype="int64"),
        "module": sel["module"].to_numpy(), "role": sel["role"].to_numpy(),
        "in_shapes": sel["in_shapes"].map(shape_in).to_numpy(), "out_shapes": sel["out_shapes"].map(shape_out).to_numpy(),
    })
    if "rank" in cols:
        out.insert(0, "rank", sel["rank"].to_numpy(dtype="int64"))
    if collapse:
        out = _collapse_layers(out, pd.to_numeric(sel["layer"], errors="coerce").fillna(-1).to_numpy(dtype="int64"))
    return out.astype(cols)


def _overhead_items(meta: dict | None) -> dict[str, float]:
    """Numeric ``overhead*`` facts from the run metadata (flat or one dict deep), sorted."""
    out: dict[str, float] = {}
    for key in sorted((meta or {}).keys()):
        if not str(key).startswith("overhead"):
            continue
        val = meta[key]
        items = sorted(val.items()) if isinstance(val, dict) else [("", val)]
        for sub, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}_{sub}" if sub else str(key)] = float(v)
    return out


def headline(runs: pd.DataFrame, steps: pd.DataFrame, meta: dict | None = None) -> pd.DataFrame:
    """The headline numbers: one row per generate run.

    Args:
        runs: the ``runs`` frame.
        steps: the ``steps`` frame (peak memory when ``runs`` lacks it).
        meta: the run metadata; its numeric ``overhead*`` entries (the probe's measured
            overhead) become extra columns.

    Returns:
        Columns ``run_id, model_id, status, prompt_tokens, new_tokens, batch, ttft_ms,
        tpot_ms_p50, tpot_ms_p90, tpot_ms_mean, prefill_tok_s, decode_tok_s, total_ms,
        peak_mem_bytes, kv_cache_bytes`` and any ``overhead*`` columns; where the runs come
        from more than one rank (a merged tensor-parallel run), a ``rank`` column after
        ``run_id``: one row per rank's generate call.
    """
    extra = _overhead_items(meta)
    if runs.empty or not (runs["kind"] == "generate").any():
        out = schema.empty(HEADLINE)
        for k in extra:
            out[k] = pd.Series([], dtype="float64")
        return out
    gen = runs[runs["kind"] == "generate"].reset_index(drop=True)
    out = pd.DataFrame({c: gen[c].astype(d) for c, d in HEADLINE.items()})
    if out["peak_mem_bytes"].isna().any() and not steps.empty:
        peaks = steps.groupby("run_id", sort=False, observed=True)["mem_peak_bytes"].max()
        out["peak_mem_bytes"] = out["peak_mem_bytes"].fillna(out["run_id"].map(peaks).astype("Int64"))
    if len(ranks(gen)) > 1:
        out.insert(1, "rank", gen["rank"].astype("int64"))
    for k, v in extra.items():
        out[k] = pd.Series([v] * len(out), dtype="float64")
    return out


def per_rank_summary(calls: pd.DataFrame, steps: pd.DataFrame, by: str = "role") -> pd.DataFrame:
    """``Run.summary(by)`` of each rank on its own, with a leading ``rank`` column.

    Shares are over each rank's own forward time (ranks run side by side, not one after the
    other). Rows of the same block and phase sit next to each other, rank by rank.
    """
    from probe.analysis.run import block_summary

    rank_list = ranks(calls)
    rc = calls["rank"].to_numpy(dtype="int64", na_value=0) if "rank" in calls.columns else np.zeros(len(calls), "int64")
    rs = steps["rank"].to_numpy(dtype="int64", na_value=0) if "rank" in steps.columns else np.zeros(len(steps), "int64")
    parts = []
    for r in rank_list:
        part = block_summary(calls[rc == r], steps[rs == r], by=by)
        part.insert(0, "rank", r)
        parts.append(part.assign(_pos=range(len(part))))
    out = pd.concat(parts, ignore_index=True).sort_values(["_pos", "rank"], kind="stable")
    return out.drop(columns="_pos").reset_index(drop=True).astype({"rank": "int64"})
