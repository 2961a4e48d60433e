"""The frames of a deep run's sampled steps: ``ops``, ``ledger`` and ``allocations``.

Built from the :class:`~probe.recording.deep_ops.StepLog` of each sampled step alone. The ledger
follows PyTorch's ``MemTracker`` categories, per module call and phase: a storage made inside a
call is a *temporary* when it is freed before the call returns, else the *KV cache*'s when the
cache holds it after the step, else an *activation* (alive when the call returned). Weights are
the module's parameter bytes; the peak is the most live tensor bytes during the call above what
was live at its start. Only storages made by ops are seen: scratch a kernel allocates inside
itself is not, and shows as the gap to an allocator's or profiler's figure.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from .. import schema
from ..dtypes import dtype_name
from ..schema import ALLOCATIONS, LEDGER, OPS
from .deep_ops import ALLOC_COLS, OP_COLS
from .deep_twin import TWIN_AFTER, op_clock


def _sig_text(sigs: dict) -> list[tuple]:
    """Per signature index: (op, in shapes, in dtypes, out shapes, out dtypes as JSON, FLOPs)."""
    out: list = [None] * len(sigs)

    def js(items) -> str:
        return json.dumps(items, separators=(",", ":"))

    for (func, s_in, s_out), (i, flops) in sigs.items():
        out[i] = (str(func), js([list(s) for s, _ in s_in]), js([dtype_name(d) for _, d in s_in]),
                  js([list(s) for s, _ in s_out]), js([dtype_name(d) for _, d in s_out]), flops)
    return out


def deep_frames(steps: tuple, sigs: dict, labels: list[str], weights: dict[str, int],
                rank: int) -> dict[str, pd.DataFrame]:
    """``{"ops", "ledger", "allocations"}`` of the sampled steps ``(run_id, step, phase, q_len,
    kv_len, StepLog, KV alloc indices)``; ``sigs``: their op signatures and ``labels``: the
    module names their codes index (see ``StepLog``); ``weights``: parameter bytes per module name."""
    text = _sig_text(sigs)
    labels = [n or None for n in labels]  # the model itself ("") is null: its own code, not a module's
    names = np.array(labels + [None], dtype=object)  # code -1 (no block) -> None
    op_of = np.array([t[0] for t in text], dtype=object)
    flops_of = np.array([t[5] if t[5] is not None else 0 for t in text], dtype=np.int64)
    known = np.array([t[5] is not None for t in text], dtype=bool)
    # in and out shapes and dtypes (JSON) per signature: each step's column is one take by its ops' signatures
    sig_cols = [np.array([t[1 + j] for t in text], dtype=object) for j in range(4)]
    ops_parts, ledger_rows, alloc_parts = [], [], []
    shape_js: dict = {}  # a call's argument shapes -> their JSON, made once
    for run_id, index, phase, q_len, kv_len, lg, kv in steps:
        o = np.frombuffer(lg.ops, dtype=np.int64).reshape(-1, len(OP_COLS)) if len(lg.ops) else \
            np.zeros((0, len(OP_COLS)), dtype=np.int64)
        a = np.frombuffer(lg.allocs, dtype=np.int64).reshape(-1, len(ALLOC_COLS)) if len(lg.allocs) else \
            np.zeros((0, len(ALLOC_COLS)), dtype=np.int64)
        n, sig = len(o), o[:, 3]
        cost = np.zeros(len(sigs), dtype=np.int64)  # per signature: what calling it from Python adds
        for (func, _, _), (k, _) in sigs.items():
            cost[k] = lg.call_cost_ns(func)
        ns = np.maximum(o[:, 4] - cost[sig], 0)  # the op alone (see OpMode)
        twin = getattr(lg, "twin_ns", None)
        if twin is not None and len(twin) == n:  # timed on a twin step without the mode (deep_twin)
            t = np.frombuffer(twin, dtype=np.int64)
            ns = np.where(t >= 0, t, ns)
        head = {"run_id": run_id, "rank": rank, "step": index, "phase": phase, "q_len": q_len, "kv_len": kv_len}
        part = pd.DataFrame({**head, "seq": np.arange(n), "module": names[o[:, 1]], "block": names[o[:, 2]],
                             "op": op_of[sig]})
        for col, values in zip(("in_shapes", "in_dtypes", "out_shapes", "out_dtypes"), sig_cols):
            part[col] = values[sig]
        part["host_ms"] = ns * 1e-6
        dev = getattr(lg, "twin_device_ns", None)
        if dev is not None and len(dev) == n:  # CUDA: each op's device time on the twin (deep_twin.read_twin)
            d = np.frombuffer(dev, dtype=np.int64)
            part["gpu_ms"] = np.where(d >= 0, d * 1e-6, np.nan)
        part["flops"] = pd.array(np.where(known[sig], flops_of[sig], 0), dtype="Int64")
        part.loc[~known[sig], "flops"] = pd.NA
        part["bytes_read_est"], part["bytes_written_est"], part["alloc_bytes"] = o[:, 5], o[:, 6], o[:, 7]
        part["live_bytes"] = o[:, 8]
        part["start_ms"] = o[:, 9] * 1e-6
        ops_parts.append(part)
        ticks, made_at = o[:, 0], a[:, 0]
        host = np.concatenate([[0], np.cumsum(ns)])
        fl = np.concatenate([[0], np.cumsum(flops_of[sig])])
        is_kv = np.zeros(len(a), dtype=bool)
        is_kv[list(kv)] = True
        for code, depth, t_in, t_out, live0, peak, ns_in, ns_out, shapes in lg.calls:
            t_out = t_out if t_out is not None else lg.tick + 1
            i, j = np.searchsorted(ticks, t_in, "right"), np.searchsorted(ticks, t_out, "left")
            k0, k1 = np.searchsorted(made_at, t_in, "right"), np.searchsorted(made_at, t_out, "left")
            size, freed = a[k0:k1, 1], a[k0:k1, 4]
            tmp = (freed >= 0) & (freed < t_out)
            kv_b = int(size[~tmp & is_kv[k0:k1]].sum())
            if code == 0 and depth == 0:
                kv_b = lg.held_bytes  # the step: every storage the cache holds, made in it or before
            name = labels[code]
            ledger_rows.append((*head.values(), name, depth, _shapes_text(shapes, shape_js),
                                weights.get(name or "", 0), kv_b,
                                int(size[~tmp & ~is_kv[k0:k1]].sum()), int(size[tmp].sum()), max(peak - live0, 0),
                                int(j - i), float(host[j] - host[i]) * 1e-6, int(fl[j] - fl[i]), ns_in * 1e-6,
                                (ns_out if ns_out is not None else ns_in) * 1e-6))
        alloc_parts.append(pd.DataFrame({
            "run_id": run_id, "rank": rank, "step": index, "phase": phase, "seq": a[:, 2],
            "op": op_of[sig[a[:, 2]]] if len(a) else [], "module": names[a[:, 3]], "bytes": a[:, 1],
            "freed": a[:, 4] >= 0, "freed_in": names[a[:, 5]], "kv_cache": is_kv}))
    return {
        "ops": _frame(ops_parts, OPS),
        "ledger": _frame([pd.DataFrame.from_records(ledger_rows, columns=list(LEDGER))] if ledger_rows else [], LEDGER),
        "allocations": _frame(alloc_parts, ALLOCATIONS),
    }


def _shapes_text(shapes: tuple | None, memo: dict) -> str | None:
    """A call's argument shapes as JSON (``None``: not recorded, the step's own row)."""
    if shapes is None:
        return None
    got = memo.get(shapes)
    if got is None:
        got = memo[shapes] = json.dumps([list(s) for s in shapes], separators=(",", ":"))
    return got


def _frame(parts: list[pd.DataFrame], cols: dict[str, str]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return schema.empty(cols)
    return schema.conform(pd.concat(parts, ignore_index=True), cols)


def deep_meta(records: dict, ids: list[str], twins: list[str]) -> dict:
    """``meta["deep"]`` of the deep runs ``ids`` (and their twin runs ``twins``): what was sampled,
    how each step's ops were timed (``op_clock``), and what each figure is."""
    meta = {"deep": {"run_ids": ids, "sampled": records["plan"], "untimed": "left out of every timing figure",
                     "bytes_estimated": "ops.bytes_read_est / bytes_written_est: from the unique storages "
                                        "of each op's inputs and outputs",
                     "tied_weights": records.get("tied", {}),
                     "op_floor_us": _median([s[5].floor_ns() for s in records["steps"]]) / 1e3,
                     # ops whose bookkeeping raised: they ran, and are missing from the ops frame
                     "ops_unrecorded": sum(s[5].failed for s in records["steps"]),
                     "op_call_us": dict(records.get("call_us", {})),
                     "op_times": "each op's dispatcher time, by torch.profiler on a twin step run without "
                                 f"the dispatch mode (for a decode step, the step {TWIN_AFTER} on; for the "
                                 "prefill, and a decode step whose twin step the run does not reach or "
                                 "samples, the same step of the generate call run again: op_clock's twin), "
                                 "its outermost events aligned "
                                 "with the mode's ops by name, less the profiler's own cost of the events "
                                 "nested in each (op_clock says per step how many ops were matched). An op "
                                 "without a twin has the dispatch mode's clock: what calling it from the mode "
                                 "adds (converting its arguments and outputs, measured per overload against "
                                 "PyTorch's RecordFunction: op_call_us; else aten.alias timed the same way "
                                 "on the step, median op_floor_us) taken out and left to dispatch and Python",
                     "op_clock": op_clock(records["steps"]),
                     "twin_run_ids": twins,
                     "torch_version": torch.__version__}}
    if any(getattr(s[5], "cuda", False) for s in records["steps"]):  # CUDA steps only: a CPU run's meta as it was
        meta["deep"]["gpu_times"] = ("ops.gpu_ms: on the same twin step, the summed duration of the kernels, "
                                     "memcpys and memsets each matched op launched (kineto's correlation id "
                                     "ties a device event to the op running at its launch; the events nested "
                                     "in the op's outermost one count as its own); 0: none launched; null: "
                                     "unmatched or no twin (op_clock's gpu_matched and gpu_why say per step)")
    return meta


def _median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2] if values else 0
