"""Build the ``calls`` / ``steps`` / ``runs`` frames from a probe's columnar records.

Vectorised with numpy: per-call work is array indexing, per-signature work (shape JSON,
bytes) is done once per distinct signature. The recorder's observers then add their parts —
columns of ``steps`` and ``runs``, whole frames such as ``sampling`` and ``requests``, meta —
each from its own records (:mod:`probe.analysis.observed`); this module knows none of them.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import schema
from . import tree
from ..dtypes import dtype_name, itemsize
from .observed import contributions
from ..schema import CALLS, RUNS, STEPS, BLOCK_ROLES

if TYPE_CHECKING:  # pragma: no cover
    from ..recording.recorder import Records
    from .run import Run

_NS = 1e-6  # ns -> ms


def _sig_table(sigs: list) -> dict[str, list]:
    """Per distinct signature: in/out shape JSON, dtype, device, out bytes."""
    ins, outs, dtypes, devices, nbytes = [], [], [], [], []
    for in_shapes, (out_shapes, dt, dev) in sigs:
        ins.append(json.dumps([list(s) for s in in_shapes], separators=(",", ":")))
        outs.append(json.dumps([list(s) for s in out_shapes], separators=(",", ":")))
        dtypes.append(dtype_name(dt))
        devices.append(None if dev is None else str(dev))
        size = itemsize(dt)
        nbytes.append(sum(math.prod(s) for s in out_shapes) * size)
    return {"in": ins, "out": outs, "dtype": dtypes, "device": devices, "bytes": nbytes}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def build_run(p: "Records") -> "Run":
    """The frames of a recording (see README, "Frames", for every column)."""
    from .run import Run

    steps_rows: list[dict] = []
    n_calls = len(p.t0)
    step_of_call = np.full(n_calls, -1, dtype=np.int64)
    step_meta: list[tuple] = []  # per kept step: run_id, step, phase, q, kv, batch, origin ns
    runs_rows: list[dict] = []
    env = p.env
    cost_sums = _cost_sums(p)
    for run in p.runs:
        origin = run.t_enter if run.t_enter is not None else (run.steps[0].t0 if run.steps else 0)
        steps = run.steps
        produced = _new_tokens(run)
        latencies, per_token = [], []
        for i, s in enumerate(steps):
            if run.kind != "forward":  # a run with an end: the time after its last forward counts too
                nxt = steps[i + 1].t0 if i + 1 < len(steps) else run.t_exit
                outside = (nxt - s.t1) * _NS if nxt is not None else math.nan
            else:
                outside = math.nan
            fwd = (s.t1 - s.t0) * _NS
            # the wrappers' own cost inside this forward: what each recorded call added (_call_costs)
            probe_ms = (cost_sums[s.call1] - cost_sums[s.call0]) * _NS
            latency = fwd + outside
            row_index = len(step_meta)
            if s.call1 > s.call0:
                step_of_call[s.call0 : s.call1] = row_index
            step_meta.append((run.run_id, s.index, s.phase, s.q_len, s.kv_len, s.batch, origin))
            steps_rows.append(
                {
                    "run_id": run.run_id,
                    "rank": p.rank,
                    "step": s.index,
                    "phase": s.phase,
                    "q_len": s.q_len,
                    "kv_len": s.kv_len,
                    "batch": s.batch,
                    "start_ms": (s.t0 - origin) * _NS,
                    "forward_ms": fwd,
                    "gpu_ms": s.gpu_ms,
                    "outside_ms": outside,
                    "latency_ms": latency,
                    "kv_cache_bytes": s.kv_bytes,
                    "mem_peak_bytes": s.mem_peak,
                    "new_tokens": produced[i],
                    "blocks_ms": math.nan,
                    "probe_ms": probe_ms,
                    "process_cpu_ms": s.cpu_ns * _NS if s.cpu_ns is not None else math.nan,
                }
            )
            latencies.append(latency)
            if i > 0 and produced[i] > 0 and not math.isnan(latency):
                per_token.append(latency / produced[i])
        runs_rows.append(_run_row(p, run, steps, produced, latencies, per_token, env))

    calls = _calls_frame(p, step_of_call, step_meta, cost_sums)
    steps_df = schema.conform(pd.DataFrame(steps_rows), STEPS) if steps_rows else schema.empty(STEPS)
    if len(calls) and len(steps_df):
        blocks = calls[calls["role"].isin(BLOCK_ROLES)]
        sums = blocks.groupby(["run_id", "step"], sort=False, observed=True)["cpu_ms"].sum()
        idx = pd.MultiIndex.from_frame(steps_df[["run_id", "step"]].astype(object))
        vals = sums.reindex(idx).to_numpy(dtype="float64", na_value=np.nan)
        steps_df["blocks_ms"] = vals
    # the call tree (parent, self time) and each step's residue, from the calls' nesting
    calls, steps_df = tree.annotate(calls, steps_df)
    calls, steps_df = schema.conform(calls, CALLS), schema.conform(steps_df, STEPS)
    runs_df = schema.conform(pd.DataFrame(runs_rows), RUNS) if runs_rows else schema.empty(RUNS)
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "depth": p.depth,
        "decode_stride": p.decode_stride,
        "max_steps": p.max_steps,
        "dropped_steps": sum(1 for r in p.runs for s in r.steps if not s.kept),
        "dropped_calls": p.dropped_calls,
        "compiled_model": p.compiled,
        "compiled_steps": sum(1 for r in p.runs for s in r.steps if s.compiled),
        "rank": p.rank,
        "modules": [m.__dict__ for m in p.modules],
        "config": p.config,
        "module_costs": p.costs,
        "calibration": p.calibration,
        **env,
    }
    # what the observers add, each from its own records: columns, whole frames, meta
    calls, steps_df, runs_df, built, observed_meta = contributions(p.observed, calls, steps_df, runs_df, p.rank)
    meta.update(observed_meta)
    return Run(calls=calls, steps=steps_df, runs=runs_df, meta=meta, **built)


def _calls_frame(p: "Records", step_of_call: np.ndarray, step_meta: list[tuple],
                 sums: np.ndarray) -> pd.DataFrame:
    """The calls frame (``sums``: :func:`_cost_sums`, made once with the steps' ``probe_ms``)."""
    n = len(p.t0)
    if n == 0:
        return schema.empty(CALLS)
    msig_table = np.array(p.msigs, dtype=np.int64).reshape(-1, 2)
    mod = msig_table[p.msig, 0]
    t0, t1, inner, hooks_ns, inside_sums = _with_hooks(p.t0, p.t1, p.inner, mod, p.hooked, sums)
    sig = msig_table[p.msig, 1]
    # Host time of each call without the probe's own cost: what lands inside its window, and
    # what each recorded call inside it added (_call_costs; see README "Overhead").
    own_ns = float(p.calibration.get("inside_ns", 0.0) or 0.0) + inside_sums

    infos = p.modules
    mod_depth = np.array([m.depth for m in infos], dtype=np.int64)
    mod_layer_v = np.array([m.layer if m.layer is not None else 0 for m in infos], dtype=np.int64)
    mod_layer_na = np.array([m.layer is None for m in infos], dtype=bool)
    places = p.placements if len(p.placements) == len(infos) else [None] * len(infos)
    mod_place = [pl.where if pl is not None else None for pl in places]
    mod_off = np.array([bool(pl is not None and pl.offloaded) for pl in places], dtype=bool)

    st = _sig_table(p.sigs)
    sig_bytes = np.array(st["bytes"], dtype=np.int64)

    # Calls outside any root forward (a submodule called directly) get their own row in
    # step_meta so that every call has a run and a phase.
    if (step_of_call < 0).any():
        orphan = len(step_meta)
        step_meta = step_meta + [(p.runs[-1].run_id if p.runs else "unattributed", -1, "forward", 0, 0, 0, int(t0.min()))]
        step_of_call = np.where(step_of_call < 0, orphan, step_of_call)

    sm_step = np.array([m[1] for m in step_meta], dtype=np.int64)
    sm_q = np.array([m[3] for m in step_meta], dtype=np.int64)
    sm_kv = np.array([m[4] for m in step_meta], dtype=np.int64)
    sm_b = np.array([m[5] for m in step_meta], dtype=np.int64)
    sm_origin = np.array([m[6] for m in step_meta], dtype=np.int64)

    gpu = p.gpu_ms if p.gpu_ms is not None else np.full(n, np.nan)
    offload = np.full(n, np.nan)  # NaN: the module has no offloaded weights
    if p.offload_ns is not None:
        offload = np.where(mod_off[mod], p.offload_ns * _NS, np.nan)
    mem0, mem1, peak = p.mem if p.mem is not None else (None, None, None)

    # pre-order within each step: by start, and an enclosing call (more descendants) before the
    # first call inside it when both read the same clock tick
    order = np.lexsort((-inner.astype(np.int64), t0, step_of_call))
    s_idx = step_of_call[order]
    mod_o = mod[order]
    sig_o = sig[order]
    df = pd.DataFrame(
        {
            "run_id": _take_str([m[0] for m in step_meta], s_idx),
            "rank": np.full(n, p.rank, dtype=np.int64),
            "step": sm_step[s_idx],
            "phase": _take_str([m[2] for m in step_meta], s_idx),
            "module": _take_str([m.name for m in infos], mod_o),
            "module_type": _take_str([m.module_type for m in infos], mod_o),
            "role": _take_str([m.role for m in infos], mod_o),
            "depth": mod_depth[mod_o],
            "layer": _int_na(mod_layer_v[mod_o], mod_layer_na[mod_o]),
            "q_len": sm_q[s_idx],
            "kv_len": sm_kv[s_idx],
            "batch": sm_b[s_idx],
            "in_shapes": _take_str(st["in"], sig_o),
            "out_shapes": _take_str(st["out"], sig_o),
            "dtype": _take_str(st["dtype"], sig_o),
            "device": _take_str(st["device"], sig_o),
            "placement": _take_str(mod_place, mod_o),
            "start_ms": (t0[order] - sm_origin[s_idx]) * _NS,
            "cpu_ms": ((t1[order] - t0[order]) - own_ns[order]) * _NS,
            "end_ms": (t1[order] - sm_origin[s_idx]) * _NS,  # the raw window (timestamps are for time only)
            "descendants": inner[order].astype(np.int64),  # the nesting (probe.tree), as the wrapper counted
            "gpu_ms": gpu[order],
            "offload_ms": offload[order],
            "hooks_ms": hooks_ns[order] * _NS,
            "mem_before_bytes": mem0[order] if mem0 is not None else _int_na(np.zeros(n, np.int64), np.ones(n, bool)),
            "mem_after_bytes": mem1[order] if mem1 is not None else _int_na(np.zeros(n, np.int64), np.ones(n, bool)),
            "mem_peak_bytes": peak[order] if peak is not None else _int_na(np.zeros(n, np.int64), np.ones(n, bool)),
            "out_bytes": sig_bytes[sig_o],
        }
    )
    return schema.conform(df, CALLS)


def _call_costs(p: "Records") -> np.ndarray:
    """What each recorded call added, in ns, to the time of whatever encloses it (its parent
    call, the step's forward): the record the C wrapper made after the call's window closed, as
    it read it in place (``Records.post``), and the rest of the wrapper's cost as calibrated at
    attach (``call_ns`` less the calibration loop's own reading of the record, ``post_ns``). A
    call whose record was not read (a Python wrapper, an injected clock) costs ``call_ns``. In a
    forward the record costs several times what it does in the calibration's loop, where its
    memory stays warm: a calibrated figure alone left the difference in the parent's self time."""
    cal = p.calibration
    call_ns = float(cal.get("call_ns", 0.0) or 0.0)
    n = len(p.t0)
    post = p.post
    if post is None or not len(post) or not post.any():
        return np.full(n, call_ns)
    post_ns = min(float(cal.get("post_ns", 0.0) or 0.0), call_ns)
    return np.where(post > 0, (call_ns - post_ns) + post.astype(np.float64), call_ns)


def _cost_sums(p: "Records") -> np.ndarray:
    """Prefix sums of :func:`_call_costs` (``n + 1`` entries, from 0): rows ``a .. b - 1`` cost
    ``sums[b] - sums[a]``."""
    costs = _call_costs(p)
    out = np.zeros(len(costs) + 1)
    np.cumsum(costs, out=out[1:])
    return out


def _with_hooks(t0: np.ndarray, t1: np.ndarray, inner: np.ndarray, mod: np.ndarray,
                hooked: np.ndarray | None, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """Host windows and descendant counts of the calls with each hooked call widened to the
    whole call (:mod:`probe.recording.hooktime`), each call's hook time in ns (0 without
    hooks; NaN for every call when hooks were not timed), and what its descendants' records
    cost (``sums``: :func:`_cost_sums`). A call's descendants are the rows recorded while it
    ran: the ``inner`` rows just before its own (a row is appended when its call returns).

    A hooked call ``(module, n0, n1, t0, t1)`` holds rows ``n0 .. n1 - 1``; the module's own
    forward is the last of them recorded for that module (the last row of all unless a post-hook
    recorded calls). Its row takes the whole window, and every row recorded inside the call,
    hooks' included, becomes its descendant.
    """
    n = len(t0)
    rows = np.arange(n)
    inside = sums[rows] - sums[rows - inner.astype(np.int64)]
    if hooked is None:
        return t0, t1, inner, np.full(n, np.nan), inside
    hooks_ns = np.zeros(n)
    if not len(hooked):
        return t0, t1, inner, hooks_ns, inside
    idx, n0, n1, h0, h1 = (hooked[:, k] for k in range(5))
    row = n1 - 1
    ok = (row < n) & (mod[np.minimum(row, n - 1)] == idx)
    for k in np.flatnonzero(~ok):  # a post-hook recorded calls after the forward's row
        hits = np.flatnonzero(mod[n0[k]:min(n1[k], n)] == idx[k])
        if len(hits):
            row[k], ok[k] = n0[k] + hits[-1], True
    row, n0, n1, h0, h1 = row[ok], n0[ok], n1[ok], h0[ok], h1[ok]
    t0, t1, inner = t0.copy(), t1.copy(), inner.copy()
    hooks_ns[row] = np.maximum((h1 - h0) - (t1[row] - t0[row]), 0)
    t0[row], t1[row] = h0, h1
    inner[row] = n1 - n0 - 1
    n1 = np.minimum(n1, n)
    inside[row] = sums[n1] - sums[n0] - (sums[row + 1] - sums[row])  # every row of the call but its own
    return t0, t1, inner, hooks_ns, inside


def _take_str(values: list, codes: np.ndarray) -> pd.Series:
    """``values[codes]`` as a string column, gathered in Arrow (no per-row Python objects)."""
    import pyarrow as pa

    arr = pa.array(values, type=pa.string()).take(pa.array(codes, type=pa.int64()))
    if pd.StringDtype().storage == "pyarrow":
        return pd.Series(pd.arrays.ArrowStringArray(arr), copy=False)
    return pd.Series(arr.to_pandas(), dtype="string")


def _int_na(values: np.ndarray, mask: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.arrays.IntegerArray(np.ascontiguousarray(values, dtype=np.int64), np.ascontiguousarray(mask))


def _generated(run) -> int | None:
    """New positions per sequence from the output tensor: its length less the prompt's, or all
    of it when generate() was given ``inputs_embeds`` alone (it then returns only new tokens)."""
    if run.output_len is None or run.input_len is None:
        return None
    return run.output_len - (run.input_len if run.prompt_in_output else 0)


def _new_tokens(run) -> list[int]:
    """Tokens each step appended to each sequence (see README, 'Metric definitions')."""
    steps = run.steps
    n = len(steps)
    if run.kind != "generate" or n == 0:
        return [0] * n
    out = []
    for i, s in enumerate(steps):
        if i + 1 < n:
            nxt = steps[i + 1]
            if nxt.phase == "recompute":
                k = nxt.q_len - s.q_len
            elif s.phase in ("decode", "extend") and s.index > 0:
                k = nxt.kv_len - s.kv_len
            else:
                k = nxt.kv_len - s.kv_len - s.q_len + 1
            out.append(max(int(k), 1))
        else:
            out.append(1)
    total = _generated(run)
    if total is not None and n and steps[-1].index == run.n_steps_seen - 1:
        rest = total - sum(out[:-1])
        if rest >= 0:
            out[-1] = rest
    return out


def _run_row(p, run, steps, produced, latencies, per_token, env) -> dict:
    row: dict = {
        "run_id": run.run_id,
        "rank": p.rank,
        "kind": run.kind,
        "status": run.status if run.kind != "forward" else "ok",  # plain forwards are never closed
        "depth": p.depth,
        "steps": run.n_steps_seen,
        "started_at": run.started_at,
        **{k: env.get(k) for k in (
            "model_id", "model_class", "model_type", "parameters", "dtype", "device",
            "attn_implementation", "torch_version", "transformers_version", "probe_version", "gpu_name",
            "weights_source",
        )},
    }
    if run.kind == "forward":
        row["total_ms"] = ((steps[-1].t1 - steps[0].t0) * _NS) if steps else math.nan
    elif run.t_enter is not None and run.t_exit is not None:
        row["total_ms"] = (run.t_exit - run.t_enter) * _NS
    if run.probe_start_ns is not None:  # generate runs: the probe's work on entering the call
        row["probe_start_ms"] = run.probe_start_ns * _NS
    if run.probe_end_ns is not None:  # and on leaving it, before its clock stopped
        row["probe_end_ms"] = run.probe_end_ns * _NS
    if run.kind != "generate":
        row["batch"] = steps[0].batch if steps else None
        return row
    g = run.gen_settings
    real = _real_lengths(run)  # one read of the mask (a device sync on CUDA), after generate
    row.update(
        {
            "prompt_tokens": run.input_len,
            "prompt_tokens_real": json.dumps(real),
            "new_tokens": _generated(run) if _generated(run) is not None else sum(produced),
            "batch": run.batch_in if run.batch_in is not None else (steps[0].batch if steps else None),
            "do_sample": g.get("do_sample"),
            "top_k": g.get("top_k"),
            "top_p": g.get("top_p"),
            "temperature": g.get("temperature"),
            "num_beams": g.get("num_beams"),
            "max_new_tokens": g.get("max_new_tokens"),
            "generate_kwargs": json.dumps(g, sort_keys=True, default=str),
            "output_ids": json.dumps(ids.tolist()) if (ids := run.generated()) is not None else None,
        }
    )
    if steps:
        first = steps[0]
        first_token_at = steps[1].t0 if len(steps) > 1 else run.t_exit
        if first.index == 0 and first_token_at is not None:
            row["ttft_ms"] = (first_token_at - run.t_enter) * _NS
            if latencies and latencies[0] > 0 and not math.isnan(latencies[0]):
                # the user's prompt tokens, each prompt once, pads excluded (from the mask)
                prompt_tokens = sum(real) if real else first.batch * first.q_len
                row["prefill_tok_s"] = prompt_tokens / (latencies[0] / 1e3)
        if per_token:
            row["tpot_ms_mean"] = float(np.mean(per_token))
            row["tpot_ms_p50"] = _percentile(per_token, 50)
            row["tpot_ms_p90"] = _percentile(per_token, 90)
        later = [(lat, produced[i]) for i, lat in enumerate(latencies) if i > 0 and not math.isnan(lat)]
        dec_time = sum(lat for lat, _ in later)
        if dec_time > 0:
            # sequences delivered (beam search runs batch x beams rows but returns batch rows)
            rows = run.output_rows if run.output_rows is not None else steps[0].batch
            row["decode_tok_s"] = rows * sum(k for _, k in later) / (dec_time / 1e3)
        peaks = [s.mem_peak for s in steps if s.mem_peak is not None]
        if run.mem_peak is not None:
            peaks.append(run.mem_peak)
        row["peak_mem_bytes"] = max(peaks) if peaks else None
        row["kv_cache_bytes"] = steps[-1].kv_bytes
    return row


def _real_lengths(run) -> list[int]:
    mask = run.mask
    try:
        import torch

        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return [int(v) for v in mask.sum(dim=-1).tolist()]
    except Exception:
        pass
    if run.input_len is not None and run.batch_in:
        return [run.input_len] * run.batch_in
    return []
