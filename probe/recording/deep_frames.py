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

import bisect
import json

import numpy as np
import pandas as pd

from .. import schema
from ..dtypes import dtype_name
from ..schema import ALLOCATIONS, LEDGER, OPS


def _sig_text(sigs: dict) -> list[tuple]:
    """Per signature index: (op, in shapes, in dtypes, out shapes, out dtypes as JSON, FLOPs)."""
    out: list = [None] * len(sigs)

    def js(items) -> str:
        return json.dumps(items, separators=(",", ":"))

    for (func, s_in, s_out), (i, flops) in sigs.items():
        out[i] = (str(func), js([list(s) for s, _ in s_in]), js([dtype_name(d) for _, d in s_in]),
                  js([list(s) for s, _ in s_out]), js([dtype_name(d) for _, d in s_out]), flops)
    return out


def deep_frames(steps: tuple, sigs: dict, weights: dict[str, int], rank: int) -> dict[str, pd.DataFrame]:
    """``{"ops", "ledger", "allocations"}`` of the sampled steps ``(run_id, step, phase, q_len,
    kv_len, StepLog, KV alloc indices)``; ``sigs``: their op signatures (see ``StepLog``);
    ``weights``: parameter bytes per module name."""
    text = _sig_text(sigs)
    ops_rows: list[tuple] = []
    ledger_rows: list[tuple] = []
    alloc_rows: list[tuple] = []
    for run_id, index, phase, q_len, kv_len, lg, kv in steps:
        head = (run_id, rank, index, phase, q_len, kv_len)
        for seq, (_, module, block, sig, ns, rd, wr, made) in enumerate(lg.ops):
            ops_rows.append((*head, seq, module, block, *text[sig][:5], ns * 1e-6, text[sig][5], rd, wr, made))
        ticks = [o[0] for o in lg.ops]
        host = np.cumsum([0] + [o[4] for o in lg.ops], dtype=np.int64)
        made_at = [al[0] for al in lg.allocs]  # in tick order, as they were made
        fl = np.cumsum([0] + [text[o[3]][5] or 0 for o in lg.ops], dtype=np.int64)
        for name, depth, t_in, t_out, live0, peak in lg.calls:
            t_out = t_out if t_out is not None else lg.tick + 1
            a, b = bisect.bisect_right(ticks, t_in), bisect.bisect_left(ticks, t_out)
            kv_b = act = tmp = 0
            for i in range(bisect.bisect_right(made_at, t_in), bisect.bisect_left(made_at, t_out)):
                _, size, _, _, t_freed, _ = lg.allocs[i]
                if t_freed is not None and t_freed < t_out:
                    tmp += size
                elif i in kv:
                    kv_b += size
                else:
                    act += size
            if name == "" and depth == 0:
                kv_b = lg.held_bytes  # the step: every storage the cache holds, made in it or before
            ledger_rows.append((*head, name, depth, weights.get(name, 0), kv_b, act, tmp, max(peak - live0, 0),
                                b - a, float(host[b] - host[a]) * 1e-6, int(fl[b] - fl[a])))
        for i, (_, size, seq, module, t_freed, freed_in) in enumerate(lg.allocs):
            alloc_rows.append((run_id, rank, index, phase, seq, text[lg.ops[seq][3]][0], module, size, t_freed is not None,
                               freed_in, i in kv))
    return {
        "ops": _frame(ops_rows, OPS),
        "ledger": _frame(ledger_rows, LEDGER),
        "allocations": _frame(alloc_rows, ALLOCATIONS),
    }


def _frame(rows: list[tuple], cols: dict[str, str]) -> pd.DataFrame:
    if not rows:
        return schema.empty(cols)
    return schema.conform(pd.DataFrame.from_records(rows, columns=list(cols)), cols)
