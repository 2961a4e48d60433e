"""Per-call extras: what the full wrappers record beside the host columns.

On CUDA, a pair of pooled ``torch.cuda.Event`` per call and per step, recorded on the model's
stream and resolved into milliseconds once per run — never a synchronisation inside a call;
with memory tracking, the allocator's counters before and after each call and its peak (a stack
of the running calls' peaks, innermost last, so each call's peak includes its children's); with
accelerate offloading, the transfer time an :class:`probe.distributed.OffloadClock` counted
during the call. Each column is appended in call order, aligned with the recorder's host
columns (:mod:`probe.recording.hotpath`), and truncated with them.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import torch


class CallExtras:
    """The per-call extra columns of one recorder, and the CUDA event pool they draw from."""

    def __init__(self, cuda_device: Any = None, track_memory: bool = False, offload_total: Any = None) -> None:
        self.cuda_device = cuda_device
        self.uses_cuda = cuda_device is not None
        self.track_memory = bool(track_memory and self.uses_cuda)
        self.offload_total = offload_total  # array('q', [ns]) of an OffloadClock, or None
        self._c_ev = array("i")  # per call: index into _ev_pairs / _ev_ms
        self._c_mem0, self._c_mem1, self._c_peak = array("q"), array("q"), array("q")
        self._c_off = array("q")
        self._ev_pairs: list = []
        self._ev_ms = array("d")
        self._ev_pool: list = []
        self._mem_peaks: list[int] = []  # CUDA peak of each running call, innermost last
        self._stream = torch.cuda.current_stream(cuda_device) if self.uses_cuda else None

    @property
    def needed(self) -> bool:
        """Whether the wrappers must record extras (else the plain CPU wrappers do)."""
        return self.uses_cuda or self.offload_total is not None

    # ------------------------------------------------------------------ per call (full wrappers)
    def call_begin(self) -> tuple:
        """Before a call: allocator read first, then the start event, so the read stays outside
        the call's window."""
        m0 = self._mem_push() if self.track_memory else 0
        ev0 = self.event() if self.uses_cuda else None
        x0 = self.offload_total[0] if self.offload_total is not None else 0
        return ev0, m0, x0

    def call_end(self, tok: tuple, ok: bool) -> None:
        """After a call: its extras appended when ``ok`` (the call is recorded), else dropped."""
        ev0, m0, x0 = tok
        if self.offload_total is not None and ok:
            self._c_off.append(self.offload_total[0] - x0)
        if self.uses_cuda:
            if ok:
                ev1 = self.event()
                self._c_ev.append(len(self._ev_pairs))
                self._ev_pairs.append((ev0, ev1))
            else:
                self._ev_pool.append(ev0)
        if self.track_memory:
            peak, m1 = self._mem_pop_peak()
            if ok:
                self._c_mem0.append(m0)
                self._c_mem1.append(m1)
                self._c_peak.append(peak)

    def event(self):
        pool = self._ev_pool
        ev = pool.pop() if pool else torch.cuda.Event(enable_timing=True)
        ev.record(self._stream)  # the model's device, whatever the current device is
        return ev

    # ------------------------------------------------------------------ per run and step (CUDA only)
    def run_begin(self, run: Any) -> None:
        """The run's peak starts here: setup, steps and sampling between steps all count."""
        if self.track_memory:
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
            run.mem_peak = alloc_stats(self.cuda_device)[0]

    def run_end(self, run: Any) -> None:
        if self.track_memory:
            self._fold_run_peak(run)

    def step_begin(self, run: Any):
        """The step's start event (returned), after its allocator reads."""
        if self.track_memory:
            self._fold_run_peak(run)  # allocations between steps (sampling, cat) count too
            self._mem_peaks.clear()
            self._mem_push()
        return self.event()

    def step_end(self, s: Any) -> None:
        s.ev1 = self.event()
        if self.track_memory:
            s.mem_peak = self._mem_pop_peak()[0]
            self._mem_peaks.clear()

    def reset(self) -> None:
        """Forget the running calls (a step or run closed without unwinding them)."""
        self._mem_peaks.clear()

    def _fold_run_peak(self, run: Any) -> None:
        peak = alloc_stats(self.cuda_device)[1]
        if run.mem_peak is None or peak > run.mem_peak:
            run.mem_peak = peak

    def _mem_push(self) -> int:
        # Fold the allocator's peak so far into the enclosing call, then restart the peak
        # counter so this call's own peak can be read at its end.
        dev = self.cuda_device
        peaks = self._mem_peaks
        cur, peak = alloc_stats(dev)
        if peaks and peak > peaks[-1]:
            peaks[-1] = peak
        torch.cuda.reset_peak_memory_stats(dev)
        peaks.append(cur)
        return cur

    def _mem_pop_peak(self) -> tuple[int, int]:
        """(this call's peak, allocated now)."""
        peaks = self._mem_peaks
        cur, peak = alloc_stats(self.cuda_device)
        mine = max(peaks.pop() if peaks else 0, peak)
        if peaks and mine > peaks[-1]:
            peaks[-1] = mine
        return mine, cur

    # ------------------------------------------------------------------ results
    def truncate(self, n: int) -> None:
        if self.offload_total is not None:
            del self._c_off[n:]
        if self.uses_cuda:
            del self._c_ev[n:]
            if self.track_memory:
                del self._c_mem0[n:], self._c_mem1[n:], self._c_peak[n:]

    def clear(self) -> None:
        self.truncate(0)
        self._ev_pairs.clear()
        del self._ev_ms[:]

    def resolve(self, steps: list) -> None:
        """Turn recorded event pairs into milliseconds (calls', and ``steps``' ``gpu_ms``);
        once per run, never per call."""
        start = len(self._ev_ms)
        pending = len(self._ev_pairs) - start
        if not pending and not steps:
            return
        # wait for the last of both kinds: the step's end is recorded after its blocks' ends
        if pending:
            self._ev_pairs[-1][1].synchronize()
        if steps:
            steps[-1].ev1.synchronize()
        for i in range(start, len(self._ev_pairs)):
            ev0, ev1 = self._ev_pairs[i]
            self._ev_ms.append(ev0.elapsed_time(ev1))
            self._ev_pool.append(ev0)
            self._ev_pool.append(ev1)
            self._ev_pairs[i] = None  # events go back to the pool; the index stays aligned
        for s in steps:
            s.gpu_ms = s.ev0.elapsed_time(s.ev1)
            self._ev_pool.append(s.ev0)
            self._ev_pool.append(s.ev1)
            s.ev0 = s.ev1 = None

    def arrays(self, n: int) -> tuple:
        """(gpu ms, (mem before, after, peak), offload ns) per call for the first ``n`` calls;
        ``None`` for what is not recorded."""
        gpu = None
        if self.uses_cuda and len(self._c_ev) == n:
            ev = np.frombuffer(self._c_ev, dtype=np.int32, count=n)
            ms = np.frombuffer(self._ev_ms, dtype=np.float64) if len(self._ev_ms) else np.zeros(0)
            gpu = np.full(n, np.nan)
            ok = ev < len(ms)
            gpu[ok] = ms[ev[ok]]
        mem = None
        if self.track_memory and len(self._c_mem0) == n:
            mem = tuple(np.frombuffer(c, dtype=np.int64, count=n).copy()
                        for c in (self._c_mem0, self._c_mem1, self._c_peak))
        off = None
        if self.offload_total is not None and len(self._c_off) == n:
            off = np.frombuffer(self._c_off, dtype=np.int64, count=n).copy()
        return gpu, mem, off


def alloc_stats(dev) -> tuple[int, int]:
    """(allocated now, allocator peak) in one C call.

    ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` each flatten the allocator's
    whole statistics dict in Python (~100 us); the nested dict is one native call.
    """
    a = torch.cuda.memory_stats_as_nested_dict(dev).get("allocated_bytes", {}).get("all", {})
    return int(a.get("current", 0)), int(a.get("peak", 0))
