"""The sampling stages: their kinds and order, the ``sampling`` frame and its summaries.

The pandas side of :mod:`probe.recording.sampling`: the stage records that observer keeps
(one entry per timed call, columnar) become the ``sampling`` frame here, one row per stage
per generate step, adding up to the step's ``outside_ms``; :func:`stage_summary` and
:func:`stage_means` read that frame (``Run.sampling_summary()``, the reports' step breakdown).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .. import schema
from ..columns import ranked
from ..schema import SAMPLING

_NS = 1e-6  # ns -> ms

PROCESSOR, STOPPING, CANDIDATES, REMAINDER = "processor", "stopping", "candidates", "remainder"
UPDATE_KWARGS, PREPARE_INPUTS, PROBE, DISPATCH = "update kwargs", "prepare inputs", "probe", "dispatch"
#: display order of the stage kinds, roughly that of a step: after the forward, its cache and
#: mask are carried over, the processors run (in list order; ``dispatch`` is the processors list's
#: own work around them), the token is chosen, the stopping checks run, candidates are drafted, the next forward's inputs are prepared;
#: then the probe's own bookkeeping of the step; the remainder (token choice and the rest) is
#: always last
KIND_ORDER = {UPDATE_KWARGS: 0, PROCESSOR: 1, DISPATCH: 2, STOPPING: 3, CANDIDATES: 4, PREPARE_INPUTS: 5, PROBE: 6}


# ---------------------------------------------------------------------- frames
def sampling_frame(runs: dict[str, Any], steps: pd.DataFrame, rank: int) -> pd.DataFrame:
    """The ``sampling`` frame: per generate step, one row per stage in order, then ``remainder``
    (``runs``: run id -> the sampling observer's stage records of that call).

    Every step of a timed generate call gets a row for every stage seen in that call (0 ms
    where a stage did not run in a step); ``remainder = outside_ms - sum(stages)``, so the
    rows of a step add up to its ``outside_ms``. Steps without ``outside_ms`` (a run still
    going) and generate calls that were not timed get no rows.
    """
    if not runs or steps.empty:
        return schema.empty(SAMPLING)
    parts = []
    by_run = {rid: g for rid, g in steps.groupby("run_id", sort=False)}
    for rid, r in runs.items():
        st = by_run.get(rid)
        if st is None or not r.stages:
            continue
        st = st[st["outside_ms"].notna()]
        if st.empty:
            continue
        parts.append(_run_rows(r, st, rank))
    if not parts:
        return schema.empty(SAMPLING)
    return schema.conform(pd.concat(parts, ignore_index=True), SAMPLING)


def _run_rows(r: Any, st: pd.DataFrame, rank: int) -> pd.DataFrame:
    n_stage = len(r.stages)
    # display order: processors by list position, stopping, candidates, then the remainder
    keys = sorted(range(n_stage), key=lambda i: (KIND_ORDER[r.stages[i][0]], r.stages[i][1], i))
    order = np.empty(n_stage, dtype=np.int64)
    order[keys] = np.arange(n_stage)
    step_vals = st["step"].to_numpy(dtype=np.int64)
    pos = {int(s): i for i, s in enumerate(step_vals)}
    n_step = len(step_vals)
    host = np.zeros((n_step, n_stage))
    gpu = np.zeros((n_step, n_stage))
    calls = np.zeros((n_step, n_stage), dtype=np.int64)
    has_gpu = np.zeros(n_stage, dtype=bool)
    n = len(r.c_ns)
    if n:
        c_step = np.frombuffer(r.c_step, dtype=np.int32, count=n)
        row = np.array([pos.get(int(s), -1) for s in c_step], dtype=np.int64)
        ok = row >= 0
        stage = np.frombuffer(r.c_stage, dtype=np.int32, count=n)[ok]
        row = row[ok]
        ns = np.frombuffer(r.c_ns, dtype=np.int64, count=n)[ok]
        np.add.at(host, (row, stage), ns * _NS)
        np.add.at(calls, (row, stage), 1)
        ev = np.frombuffer(r.c_ev, dtype=np.int32, count=n)[ok]
        ev_ms = np.frombuffer(r.ev_ms, dtype=np.float64) if len(r.ev_ms) else np.zeros(0)
        timed = (ev >= 0) & (ev < len(ev_ms))
        if timed.any():
            np.add.at(gpu, (row[timed], stage[timed]), ev_ms[ev[timed]])
            has_gpu[np.unique(stage[timed])] = True
    gpu[:, ~has_gpu] = np.nan
    outside = st["outside_ms"].to_numpy(dtype=np.float64)
    remainder = outside - host.sum(axis=1)
    names = [s[2] for s in r.stages]
    phases = st["phase"].astype(object).to_numpy()
    rows = {
        "run_id": np.repeat(r.run_id, n_step * (n_stage + 1)),
        "rank": np.full(n_step * (n_stage + 1), rank, dtype=np.int64),
        "step": np.repeat(step_vals, n_stage + 1),
        "phase": np.repeat(phases, n_stage + 1),
        "stage": np.tile(np.array([names[i] for i in keys] + [REMAINDER], dtype=object), n_step),
        "order": np.tile(np.arange(n_stage + 1, dtype=np.int64), n_step),
        "host_ms": np.column_stack([host[:, keys], remainder]).ravel(),
        "gpu_ms": np.column_stack([gpu[:, keys], np.full(n_step, np.nan)]).ravel(),
        "calls": pd.array(np.column_stack([calls[:, keys], np.zeros(n_step, np.int64)]).ravel(), dtype="Int64"),
    }
    df = pd.DataFrame(rows)
    df.loc[df["stage"] == REMAINDER, "calls"] = pd.NA
    return df


# ---------------------------------------------------------------------- analysis
def stage_summary(sampling: pd.DataFrame, steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per phase and stage: the sampling step's time, in stage order.

    Columns: ``phase, stage, order, steps, calls, total_ms, mean_ms`` (per step),
    ``gpu_total_ms`` (NaN without CUDA), ``outside_share`` (of the phase's time outside the
    model over the same steps) and, with ``steps``, ``step_share`` (of the phase's latency,
    forward + outside, over the same steps). Stages of the same name in several generate
    calls are one row; the order is the first call's.
    """
    cols = {"phase": "string", "stage": "string", "order": "int64", "steps": "int64", "calls": "Int64",
            "total_ms": "float64", "mean_ms": "float64", "gpu_total_ms": "float64",
            "outside_share": "float64", "step_share": "float64"}
    if sampling is None or sampling.empty:
        return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in cols.items()})
    s = sampling
    key = ["rank", "run_id", "step"]
    n_steps = s[key + ["phase"]].drop_duplicates().groupby("phase", sort=False).size()
    g = s.groupby(["phase", "stage"], sort=False, observed=True)
    out = pd.DataFrame(
        {
            "order": g["order"].min(),
            "calls": g["calls"].sum(min_count=1),
            "total_ms": g["host_ms"].sum(),
            "gpu_total_ms": g["gpu_ms"].sum(min_count=1),
        }
    ).reset_index()
    out["steps"] = out["phase"].map(n_steps).astype("int64")
    out["mean_ms"] = out["total_ms"] / out["steps"]
    outside = s.groupby("phase", sort=False)["host_ms"].sum()
    out["outside_share"] = out["total_ms"] / out["phase"].map(outside).astype("float64")
    out["step_share"] = np.nan
    if steps is not None and not steps.empty:
        timed = steps.merge(s[key].drop_duplicates(), on=key, how="inner")
        latency = timed.groupby("phase", sort=False)["latency_ms"].sum()
        out["step_share"] = out["total_ms"] / out["phase"].map(latency).astype("float64")
    rank = {p: i for i, p in enumerate(schema.PHASES)}
    out["_p"] = ranked(out["phase"], rank, len(rank))
    out["_r"] = out["stage"].eq(REMAINDER)  # the remainder last even where orders differ by run
    out = out.sort_values(["_p", "_r", "order"], kind="stable").drop(columns=["_p", "_r"])
    return out[list(cols)].astype(cols).reset_index(drop=True)


def stage_means(sampling: pd.DataFrame, steps: pd.DataFrame, phase: str) -> list[tuple[str, float]]:
    """``(stage, ms per step)`` of ``phase`` in order, over every step of the phase.

    Steps without sampling rows (a generate call that was not timed) contribute their whole
    ``outside_ms`` as ``outside (not split)``, so the values add up to the phase's mean
    ``outside_ms``.
    """
    sub = steps[steps["phase"] == phase]
    n = len(sub)
    if n == 0:
        return []
    out: list[tuple[str, float]] = []
    if sampling is not None and not sampling.empty:
        ss = sampling[sampling["phase"] == phase]
        summ = stage_summary(ss)
        out = [(str(r.stage), float(r.total_ms) / n) for r in summ.itertuples(index=False)]
        key = ["rank", "run_id", "step"]
        split = sub.merge(ss[key].drop_duplicates(), on=key, how="left", indicator=True)
        rest = split.loc[split["_merge"] == "left_only", "outside_ms"].sum(min_count=1)
    else:
        rest = sub["outside_ms"].sum(min_count=1)
    if pd.notna(rest) and (rest != 0 or not out):
        out.append(("outside (not split)", float(rest) / n))
    return out
