"""The serving observer's frames: the ``requests`` frame and the serving columns of ``steps`` and
``runs``, built from its own records (:class:`probe.recording.serving.ServeRun` per run id).

A serving loop's run row differs from a generate call's: its TTFT and TPOT are means over its
requests, its batch is the requests it served, its tok/s come from the tokens its forwards
sampled. Times are the recorder's integer nanoseconds, in ms since the run started.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .observer import Contribution
from ..schema import REQUESTS, RUNS, STEPS

_NS = 1e-6  # ns -> ms

#: the ``steps`` columns a serving step fills (the others are every step's)
STEP_COLUMNS = {c: STEPS[c] for c in (
    "kv_cache_bytes", "new_tokens", "requests", "prefill_tokens", "decode_tokens", "prefill_chunk",
    "paged_cache_bytes", "schedule_ms", "cache_ms", "sample_ms", "update_ms", "layout")}
#: the ``runs`` columns a serving loop fills (kind, status, steps, times and the model's facts are every run's)
RUN_COLUMNS = {c: RUNS[c] for c in (
    "batch", "prompt_tokens", "new_tokens", "generate_kwargs", "ttft_ms", "tpot_ms_mean", "tpot_ms_p50",
    "tpot_ms_p90", "prefill_tok_s", "decode_tok_s", "kv_cache_bytes")}
REQUEST_COLUMNS = REQUESTS


def serving_frames(runs: dict[str, Any], rank: int) -> Contribution:
    """Steps and runs columns, the ``requests`` frame and ``meta["serving"]`` of the serving runs."""
    if not runs:
        return Contribution()
    steps_rows: list[dict] = []
    runs_rows: list[dict] = []
    requests_rows: list[dict] = []
    for rec in runs.values():
        done = [(i, it) for i, it in rec.steps.items() if it.fwd1 is not None]  # steps that joined the run
        steps_rows.extend(_step_row(rec.run_id, i, it) for i, it in done)
        req_rows = _request_rows(rec, rank)
        requests_rows.extend(req_rows)
        runs_rows.append(_run_row(rec, [it for _, it in done], req_rows))
    last = list(runs.values())[-1]
    meta = {"serving": {
        "cuda_graphs": last.watch.graphs,
        "layout": "host: the manager's requests_in_batch before each forward (no device read)",
        "syncs_per_step": 0,
        "config": last.watch.config,
    }}
    return Contribution(
        steps=pd.DataFrame(steps_rows) if steps_rows else None,
        runs=pd.DataFrame(runs_rows),
        built={"requests": pd.DataFrame(requests_rows, columns=list(REQUESTS))},
        meta=meta,
    )


def _ms(a: int | None, b: int | None) -> float:
    return (b - a) * _NS if a is not None and b is not None else math.nan


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _step_row(run_id: str, step: int, it: Any) -> dict:
    """The continuous-batching columns of one step (see ``schema.STEPS``)."""
    n, pre, dec, chunk, sampled = it.counts()
    return {
        "run_id": run_id,
        "step": step,
        "kv_cache_bytes": it.paged_bytes,
        "new_tokens": sampled,
        "requests": n,
        "prefill_tokens": pre,
        "decode_tokens": dec,
        "prefill_chunk": chunk,
        "paged_cache_bytes": it.paged_bytes,
        "schedule_ms": it.schedule_ns * _NS,
        "cache_ms": it.cache_ns * _NS,
        "sample_ms": _ms(it.fwd1, it.t_gen1) if not it.compiled else math.nan,
        "update_ms": _ms(it.t_upd0, it.t_upd1),
        "layout": json.dumps([[*e[:5], int(e[5])] for e in it.layout or ()], separators=(",", ":")),
    }


def _request_rows(rec: Any, rank: int) -> list[dict]:
    """One row per request of a serving run (see ``schema.REQUESTS`` and README "requests")."""
    w = rec.watch
    origin = rec.t_enter
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    chunks: dict[str, int] = {}
    for step, it in rec.steps.items():
        for e in it.layout or ():
            first.setdefault(e[0], step)
            last[e[0]] = step
            if e[1] == "prefill":
                chunks[e[0]] = chunks.get(e[0], 0) + 1

    def at(t):
        return (t - origin) * _NS if t is not None and origin is not None else math.nan

    rows = []
    for rid, r in w.requests.items():
        status = r.status
        end = r.finished
        if status is None:  # never delivered as finished
            status = "cancelled" if r.cancelled is not None else "unfinished"
            end = r.cancelled if r.cancelled is not None else (r.tokens[-1] if r.tokens else None)
        gaps = [(b - a) * _NS for a, b in zip(r.tokens, r.tokens[1:])]
        tf_ttft = tf_itl = math.nan
        if r.tf_stamps and r.tf_created is not None:
            tf_ttft = (r.tf_stamps[0] - r.tf_created) * 1e3
            tf_gaps = [(b - a) * 1e3 for a, b in zip(r.tf_stamps, r.tf_stamps[1:])]
            tf_itl = float(np.mean(tf_gaps)) if tf_gaps else math.nan
        arrival = r.arrival
        rows.append({
            "run_id": rec.run_id,
            "rank": rank,
            "request_id": rid,
            "status": status,
            "prompt_tokens": r.prompt_tokens,
            "generated_tokens": r.generated if r.generated is not None else len(r.tokens),
            "max_new_tokens": r.max_new,
            "arrival_ms": at(arrival),
            "scheduled_ms": at(r.scheduled),
            "first_token_ms": at(r.tokens[0] if r.tokens else None),
            "finished_ms": at(end),
            "queue_ms": (r.scheduled - arrival) * _NS if arrival is not None and r.scheduled is not None else math.nan,
            "ttft_ms": (r.tokens[0] - arrival) * _NS if arrival is not None and r.tokens else math.nan,
            "itl_ms_mean": float(np.mean(gaps)) if gaps else math.nan,
            "itl_ms_p50": _percentile(gaps, 50),
            "itl_ms_p90": _percentile(gaps, 90),
            "e2e_ms": (end - arrival) * _NS if arrival is not None and end is not None else math.nan,
            "first_step": first.get(rid),
            "last_step": last.get(rid),
            "prefill_chunks": chunks.get(rid),
            "tf_ttft_ms": tf_ttft,
            "tf_itl_ms_mean": tf_itl,
        })
    return rows


def _run_row(rec: Any, steps: list, req_rows: list[dict]) -> dict:
    """The serving columns of a loop's runs row: TTFT and TPOT are means over its requests."""
    row: dict = {
        "run_id": rec.run_id,
        "generate_kwargs": json.dumps(rec.config, sort_keys=True, default=str),
        "batch": len(req_rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in req_rows),
        "new_tokens": sum(r["generated_tokens"] for r in req_rows),
    }
    ttft = [r["ttft_ms"] for r in req_rows if not math.isnan(r["ttft_ms"])]
    itl = []
    for r in rec.watch.requests.values():
        itl.extend((b - a) * _NS for a, b in zip(r.tokens, r.tokens[1:]))
    if ttft:
        row["ttft_ms"] = float(np.mean(ttft))
    if itl:
        row["tpot_ms_mean"] = float(np.mean(itl))
        row["tpot_ms_p50"] = _percentile(itl, 50)
        row["tpot_ms_p90"] = _percentile(itl, 90)
    prefill = [it for it in steps if it.layout and it.phase() == "prefill"]
    pre_ms = sum((it.fwd1 - it.fwd0) * _NS for it in prefill)
    if pre_ms > 0:
        row["prefill_tok_s"] = sum(it.counts()[1] for it in prefill) / (pre_ms / 1e3)
    total_ms = _ms(rec.t_enter, rec.t_exit)
    if not math.isnan(total_ms) and total_ms > 0:
        row["decode_tok_s"] = sum(it.counts()[4] for it in steps) / (total_ms / 1e3)
    used = [it.paged_bytes for it in steps if it.paged_bytes is not None]
    row["kv_cache_bytes"] = max(used) if used else None
    return row
