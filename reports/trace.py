"""Chrome trace export (Trace Event Format, JSON object form), for Perfetto or chrome://tracing.

Layout:

- one process (``pid``) per generate/forward run (and rank);
- one thread (``tid``) per phase with host time: a ``step N`` span for each root forward,
  the module spans of every call nested inside it, and an ``outside model`` span for the
  time in generate after the forward (logits processing, sampling);
- where GPU time was recorded, one more thread per phase, ``<phase> (GPU)``, with the
  top-level blocks' GPU durations. CUDA events measure durations, not timestamps, so each GPU
  span is placed at ``max(its host start, the previous GPU span's end)``: the stream runs
  kernels in order and never before they are launched.
- a run with a deep pass: one more process per sampled step (``deep pass, step N``), its module
  calls (``ledger``) nested with every aten op (``ops``) inside them, on the deep pass's own
  clock from the step's start (the recording slows the step: these spans show order and
  proportion, the timed figures are the other processes').

Times are µs (``ts``/``dur``) from the run's first recorded event; ``args`` carry the step,
phase, shapes (as lists), output bytes and q/kv lengths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from probe.schema import BLOCK_ROLES, PHASES, floats
from probe.store import write_text

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

_US = 1000.0  # ms -> µs


def _us(v: float) -> float:
    # ns resolution is what the host clock gives; more digits only bloat the file
    return round(float(v) * _US, 3)


def _tracks(run: "Run") -> tuple[dict[tuple[int, str], int], dict[str, int]]:
    """pid per (rank, run_id) in recording order, tid per phase (host; GPU is tid + 1)."""
    keys: list[tuple[int, str]] = []
    for df in (run.runs, run.steps, run.calls):
        if len(df):
            keys += list(zip(df["rank"].astype("int64").tolist(), df["run_id"].astype(str).tolist()))
    pids = {k: i + 1 for i, k in enumerate(dict.fromkeys(keys))}
    seen = set(run.steps["phase"].dropna().astype(str)) | set(run.calls["phase"].dropna().astype(str))
    phases = list(PHASES) + sorted(seen - set(PHASES))
    tids = {p: 2 * i + 1 for i, p in enumerate(phases)}
    return pids, tids


def _meta_events(run: "Run", pids: dict, tids: dict, gpu_phases: set[tuple[int, str]]) -> list[dict]:
    labels = {}
    if len(run.runs):
        for r in run.runs.itertuples(index=False):
            labels[(int(r.rank), str(r.run_id))] = f"{r.kind} {r.run_id} ({r.model_id})"
    used: dict[int, set[str]] = {}
    for df in (run.steps, run.calls):
        if len(df):
            for rank, rid, phase in df[["rank", "run_id", "phase"]].drop_duplicates().itertuples(index=False):
                used.setdefault(pids[(int(rank), str(rid))], set()).add(str(phase))
    out: list[dict] = []
    for key, pid in pids.items():
        rank, rid = key
        name = labels.get(key, f"run {rid}") + (f" rank {rank}" if rank else "")
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for phase in sorted(used.get(pid, ()), key=lambda p: tids[p]):
            tid = tids[phase]
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"{phase} (host)"}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
            if (pid, phase) in gpu_phases:
                out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid + 1,
                            "args": {"name": f"{phase} (GPU)"}})
                out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid + 1,
                            "args": {"sort_index": tid + 1}})
    return out


def _step_events(steps: pd.DataFrame, pids: dict, tids: dict) -> list[dict]:
    out: list[dict] = []
    if steps.empty:
        return out
    cols = ["rank", "run_id", "step", "phase", "start_ms", "forward_ms", "outside_ms", "gpu_ms", "q_len", "kv_len",
            "batch", "kv_cache_bytes"]
    for rank, rid, step, phase, start, fwd, outside, gpu, q, kv, b, kvb in steps[cols].itertuples(index=False):
        if pd.isna(start) or pd.isna(fwd):
            continue
        pid, tid = pids[(int(rank), str(rid))], tids[str(phase)]
        args: dict[str, Any] = {"step": int(step), "phase": str(phase), "q_len": int(q), "kv_len": int(kv),
                                "batch": int(b)}
        if not pd.isna(kvb):
            args["kv_cache_bytes"] = int(kvb)
        if not pd.isna(gpu):
            args["gpu_ms"] = float(gpu)
        out.append({"ph": "X", "name": f"step {int(step)}", "cat": "step", "pid": pid, "tid": tid,
                    "ts": _us(start), "dur": _us(fwd), "args": args})
        if not pd.isna(outside) and outside > 0:
            out.append({"ph": "X", "name": "outside model", "cat": "outside", "pid": pid, "tid": tid,
                        "ts": _us(start + fwd), "dur": _us(outside),
                        "args": {"step": int(step), "phase": str(phase),
                                 "what": "logits processing, sampling, stopping checks"}})
    return out


def _call_events(calls: pd.DataFrame, pids: dict, tids: dict) -> tuple[list[dict], set[tuple[int, str]]]:
    out: list[dict] = []
    gpu_phases: set[tuple[int, str]] = set()
    if calls.empty:
        return out, gpu_phases
    shapes: dict[str, Any] = {}

    def parsed(s: object) -> Any:
        # a run repeats few distinct shape strings: parse each once
        key = "" if pd.isna(s) else str(s)
        if key not in shapes:
            shapes[key] = json.loads(key) if key else None
        return shapes[key]

    pid_col = [pids[(r, i)] for r, i in zip(calls["rank"].astype("int64").tolist(), calls["run_id"].astype(str).tolist())]
    cols = [calls[c].tolist() for c in ("step", "phase", "module", "role", "module_type", "start_ms", "cpu_ms",
                                         "in_shapes", "out_shapes", "out_bytes", "q_len", "kv_len")]
    for pid, step, phase, module, role, mtype, start, cpu, ins, outs, ob, q, kv in zip(pid_col, *cols):
        if cpu != cpu or start != start:  # NaN: a call whose end was never seen
            continue
        out.append({"ph": "X", "name": module, "cat": role, "pid": pid, "tid": tids[phase], "ts": _us(start),
                    "dur": _us(cpu), "args": {"step": step, "phase": phase, "module_type": mtype,
                                              "in_shapes": parsed(ins), "out_shapes": parsed(outs), "out_bytes": ob,
                                              "q_len": q, "kv_len": kv}})
    timed = ~np.isnan(floats(calls, "gpu_ms"))  # gpu_ms is absent from a run without CUDA times
    gpu = calls[timed & calls["role"].isin(BLOCK_ROLES).to_numpy()] if timed.any() else calls.iloc[0:0]
    if len(gpu):
        gpu = gpu.sort_values(["rank", "run_id", "start_ms"], kind="stable")
        end: dict[int, float] = {}
        for rank, rid, step, phase, module, role, start, g in gpu[
                ["rank", "run_id", "step", "phase", "module", "role", "start_ms", "gpu_ms"]].itertuples(index=False):
            pid = pids[(int(rank), str(rid))]
            ts = max(_us(start), end.get(pid, -np.inf))
            dur = _us(g)
            end[pid] = ts + dur
            gpu_phases.add((pid, str(phase)))
            out.append({"ph": "X", "name": str(module), "cat": f"gpu {role}", "pid": pid, "tid": tids[str(phase)] + 1,
                        "ts": round(ts, 3), "dur": dur,
                        "args": {"step": int(step), "phase": str(phase), "gpu_ms": float(g),
                                 "placement": "start estimated: max(host start, previous GPU span end)"}})
    return out, gpu_phases


def build_trace(run: "Run") -> dict:
    """The trace of ``run`` as a JSON-able dict: ``{"traceEvents": [...], "displayTimeUnit": "ms"}``."""
    pids, tids = _tracks(run)
    calls = run.calls
    if len(calls):
        # plain Python values: numpy scalars and pandas NA are not JSON-serialisable
        calls = calls.astype({"step": "int64", "q_len": "int64", "kv_len": "int64", "out_bytes": "int64",
                              "phase": object, "module": object, "role": object, "module_type": object})
    call_events, gpu_phases = _call_events(calls, pids, tids)
    events = _meta_events(run, pids, tids, gpu_phases) + _step_events(run.steps, pids, tids) + call_events
    events += _deep_events(run, max(pids.values(), default=0) + 1)
    # otherData first: it names the producer near the top of the file (how --out knows probe wrote it)
    return {"otherData": {"producer": "probe", "run_dir": str(run.path) if run.path else ""},
            "traceEvents": events, "displayTimeUnit": "ms"}


def _deep_events(run: "Run", first_pid: int) -> list[dict]:
    """A deep pass's sampled steps, one process each: module calls with their ops inside."""
    ops, ledger = run.ops, run.ledger
    if ops.empty:
        return []
    out: list[dict] = []
    keys = list(dict.fromkeys(zip(ops["run_id"].astype(str), ops["step"].astype("int64").tolist())))
    pid_of = {k: first_pid + i for i, k in enumerate(keys)}
    for (rid, step), pid in pid_of.items():
        phase = str(ops.loc[(ops["run_id"] == rid) & (ops["step"] == step), "phase"].iloc[0])
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                    "args": {"name": f"deep pass {rid}, step {step} ({phase}), not timed"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
    for r in ledger.itertuples(index=False):
        pid = pid_of.get((str(r.run_id), int(r.step)))
        if pid is None:
            continue
        name = "(forward)" if pd.isna(r.module) else str(r.module)
        out.append({"ph": "X", "name": name, "cat": "module", "pid": pid, "tid": 1, "ts": _us(r.start_ms),
                    "dur": max(_us(r.end_ms - r.start_ms), 0.0),
                    "args": {c: int(getattr(r, c)) for c in ("weights_bytes", "kv_cache_bytes", "activations_bytes",
                                                              "temporaries_bytes", "peak_added_bytes")}})
    for r in ops.itertuples(index=False):
        out.append({"ph": "X", "name": str(r.op), "cat": "op", "pid": pid_of[(str(r.run_id), int(r.step))], "tid": 1,
                    "ts": _us(r.start_ms), "dur": _us(r.host_ms),
                    "args": {"in_shapes": json.loads(r.in_shapes), "out_shapes": json.loads(r.out_shapes),
                             "flops": None if pd.isna(r.flops) else int(r.flops), "alloc_bytes": int(r.alloc_bytes)}})
    return out


def write_trace(run: "Run", path: str | os.PathLike) -> Path:
    """Write :func:`build_trace` of ``run`` as compact JSON to ``path`` and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # dumps + one write: json.dump streams through many small writes, several times slower
    from .text import display_run

    text = json.dumps(build_trace(display_run(run)), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    write_text(out, text)
    return out
