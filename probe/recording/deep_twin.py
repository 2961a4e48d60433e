"""Op times of a sampled step from torch.profiler, on a twin step run without the dispatch mode.

A Python dispatch mode slows the ops it sees, not only by its own clock's reads: a kernel with
much code runs 1.15-1.8x longer between the mode's Python, and a view's own bookkeeping (above
the mode) is missed (docs/deep.md, "Why not PyTorch's own op clock"). No clock read under the
mode gives an op's time in a plain forward. So the deep pass times a sampled step's ops on a
*twin*: a step that runs the same ops in the same order without the mode, under torch.profiler
(kineto, CPU activity only; no shapes, memory or stacks, which slow cheap ops):

- a decode step ``k`` has step ``k + TWIN_AFTER`` of the same generate call (a few more keys in
  the cache; the steps between run plain, so the twin finds the CPU's caches as a plain forward
  does: :data:`TWIN_AFTER`);
- the prefill step has the prefill of one more generate call of the same inputs and seed, run
  for one token (only where the deep pass runs its own generate: ``probe.profile(deep=...)``);
  where a decode sample's twin step is not in the run (the run ends first, or samples a step up
  to it), that call runs for as many tokens as the last such sample needs, and its step of the
  same index is the twin (the steps before it run plain, as in a plain generate).

:class:`TwinProfiler` starts and stops the profiler around the twin step; :func:`read_twin`
reads its events once the step is over and keeps only one number per op of the sampled step:
the profiler's outermost events of the op names the mode saw (the mode sees ``mean`` with the
``sum`` and ``div_`` it dispatches to below it; the profiler records them as events of their
own inside it) are aligned with the mode's ops by name (:func:`align`: the two sequences are
the same but for a few ops one instrument sees and the other does not), and a matched op gets
the event's time less the profiler's own cost of each event nested inside it (:func:`event_cost_ns`).
An op left unmatched keeps the mode's clock.

On CUDA (a sampled step whose model or output is on a CUDA device, where kineto can record CUDA
activity: :func:`cuda_profilable`) the twin's profiler records the device's work too, and each
matched op also gets its device time (:func:`read_twin`, the ops frame's ``gpu_ms``): the summed
duration of the kernels, memcpys and memsets launched inside the op's outermost event. A device
event is tied to the CPU op that launched it by kineto's correlation id (the device event's
``linked_correlation_id()`` is the ``correlation_id()`` of the innermost op running at the launch;
:func:`device_ns_by_op`), not by timestamps: a kernel runs asynchronously, queued behind earlier
work, and mostly starts and ends after the CPU event of the op that launched it has closed, so no
time window of the op holds it; the correlation id names its op whenever it runs. The ids of every
event nested in the outermost one are summed with its own (``aten::linear`` launches nothing
itself; the ``aten::addmm`` inside it does). This is what ``FunctionEvent.device_time_total``
of torch's own event list adds up too, but that list is built for every event of the step (a
``FunctionEvent`` each, its tree, its memory records: the cost :class:`TwinProfiler` avoids by
reading the raw results once); :func:`read_twin` walks the raw events once, as :func:`outermost`
does. The figure is a sum of kernel durations (device busy time), not a span: queueing before a
kernel and idle gaps are in no op's time, and kernels of one op overlapping on two streams count
twice. The profiler stops with a device synchronisation (torch's ``profile.__exit__``), so the
twin step's last kernels are recorded. Host times of a CUDA twin carry CUPTI's cost of tracing
each launch (its ``cudaLaunchKernel`` events are kept out of the walk and of the nested-event
count, not taken out of the op's time).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

#: a decode sample's twin is the step this many after it: the steps between run without the mode
#: too, so the twin finds the CPU's caches as a plain forward does. On the bundled model (step
#: 100, least of 4) the twin's matrix products read 1.69x a plain forward's two steps after the
#: mode's step; six after, 1.05x, 1.16x and 1.26x in three benchmark runs (mm reads every weight
#: once a step, and the mode's step leaves the caches cold); ten after, 0.96x and 1.04x in two
#: side-by-side runs of 6, 8, 10 and 12 (least of 3 and 5), with every op kind of 1 % of the step
#: or 50 us within 10 % at 10 and 12 in both, not at 6 or 8 (cat and SDPA, which grow with the
#: cache, at 0.97-1.04x at ten)
TWIN_AFTER = 10
#: how a sampled step's op times were taken (``meta["deep"]["op_clock"]``)
TWIN_METHOD = "profiler twin"
MODE_METHOD = "dispatch mode"
#: why a sampled step keeps the dispatch mode's clock, by case
#: (``probe.profile(deep=...)`` and ``probe run --deep`` run the generate call again for the
#: prefill, "sampled" and "ended": :meth:`~probe.recording.deep.DeepObserver.twin_rerun`)
AGAIN = "; probe.profile(deep=...) and probe run --deep time it on the generate call run again"
NO_TWIN = {
    "attach": "no prefill twin: the generate call is the user's own (probe.attach)" + AGAIN,
    "sampled": "a step up to its twin is sampled too" + AGAIN,
    "ended": "no twin step after it: the run ended first" + AGAIN,
    "others": "another profiler or dispatch mode is active, or this is one rank of several: no profiler started",
    "failed": "the twin step failed or could not be profiled",
    "phase": "no twin for this phase",
}
#: ops that must agree in a row for the alignment to pick up again after a difference
RESYNC = 4
#: how far ahead, in either sequence, the alignment looks for that
WINDOW = 24
#: ops the profiler records under another name than the dispatch mode sees them by: under a
#: Python dispatch mode ``aten::_reshape_alias`` (a ``reshape`` that needs no copy, after the CPU
#: SDPA kernel) reaches the mode as the ``view`` it decomposes to
SAME_OP = {"aten::_reshape_alias": "aten::view"}
#: kineto activity types of the device's own work, whose durations make an op's device time
DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
#: kineto activity types of host events CUPTI records for the CUDA runtime and driver calls (a
#: launch): on the forward's thread beside the ops, never an op, nor an event the profiler's own
#: per-event cost (event_ns) is about
RUNTIME = frozenset({"cuda_runtime", "cuda_driver", "privateuse1_runtime", "privateuse1_driver"})
#: why a sampled step on CUDA has no device times, by case (``clock["gpu_why"]``)
NO_DEVICE = {
    "cupti": "this build's profiler records no CUDA activity (kineto without CUPTI): no device times",
    "none": "the twin's profiler recorded no device work",
}
#: what this build's profiler prints to stderr at each start and stop (kineto's USDT probe lines)
PROFILER_LINES = ("USDT:", "SyncActivityProfilerHandler")


def quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` with file descriptor 2 led to a temporary file: what the profiler's C++ prints at
    start and stop does not reach the user's terminal; any other line written meanwhile is
    written back to stderr afterwards (nothing else is lost)."""
    try:
        sys.stderr.flush()
    except Exception:
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        return fn()
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 2)
        try:
            return fn()
        finally:
            os.dup2(saved, 2)
            try:
                sink.seek(0)
                kept = [ln for ln in sink.read().splitlines(keepends=True)
                        if not any(m.encode() in ln for m in PROFILER_LINES)]
                if kept:
                    os.write(2, b"".join(kept))
            except OSError:
                pass
    finally:
        os.close(saved)
        sink.close()


def cuda_profilable() -> bool:
    """Whether this build's kineto records CUDA activity on this machine (CUPTI; a CUDA device)."""
    try:
        from torch.profiler import ProfilerActivity, supported_activities

        return torch.cuda.is_available() and ProfilerActivity.CUDA in supported_activities()
    except Exception:  # a build without kineto
        return False


class TwinProfiler:
    """torch.profiler (kineto, CPU activity alone; with ``device=True`` CUDA activity too) around
    one twin step; :meth:`stop` hands back its raw results (read them at once and drop them: they
    hold every event of the step)."""

    def __init__(self) -> None:
        self._prof: Any = None
        self.device = False  # the profiler running (or last run) records CUDA activity

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self, device: bool = False) -> None:
        """Start it; ``device``: record CUDA activity too (only where :func:`cuda_profilable`: the
        legacy fallback torch takes without CUPTI times each op with CUDA events, which the twin's
        host times must not carry)."""
        from torch.autograd import profiler

        kw = {"use_device": "cuda"} if device else {}
        prof = profiler.profile(use_cpu=True, use_kineto=True, record_shapes=False, profile_memory=False,
                                with_stack=False, **kw)
        quietly(prof.__enter__)
        self._prof = prof
        self.device = device

    def stop(self) -> Any:
        """The profiler's raw results (``None``: it was not running)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return None
        quietly(lambda: prof.__exit__(None, None, None))
        return prof.kineto_results


def loop_event_ns(profiled: Any, rounds: int = 7, n: int = 300) -> float:
    """A profiler's own cost of one event here: a loop of ``aten::t`` (three events a call: ``t``,
    ``transpose``, ``as_strided``) run by ``profiled(loop, n)`` (which runs it under the profiler
    and returns its time per call and the events per call) against the same loop unprofiled, in
    turn; the least time per call of each (the loop undisturbed by other work on the machine)."""
    x = torch.zeros(2, 3)

    def loop() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            x.t()
        return (time.perf_counter_ns() - t) / n

    loop()
    plain, timed, events = [], [], 3.0
    for _ in range(rounds):
        plain.append(loop())
        per_call, seen = profiled(loop, n)
        timed.append(per_call)
        events = seen or events
    return max((min(timed) - min(plain)) / max(events, 1.0), 0.0)


def event_cost_ns(rounds: int = 7, n: int = 300) -> float:
    """torch.profiler's own cost of one event here, as the twin runs it (:func:`loop_event_ns`)."""
    def profiled(loop: Any, n: int) -> tuple[float, float]:
        tp = TwinProfiler()
        tp.start()
        try:
            per_call = loop()
        finally:
            res = tp.stop()
        return per_call, (len(res.events()) / n if res is not None else 0.0)

    return loop_event_ns(profiled, rounds, n)


def _kind(e: Any) -> str | None:
    """A kineto event's activity type (``"cpu_op"``, ``"kernel"``, ``"cuda_runtime"``, ...); ``None``
    where this build does not say."""
    try:
        return e.activity_type()
    except AttributeError:
        return None


def _on_host(e: Any) -> bool:
    """An event of the host's own (an op, an annotation), not the device's work nor a runtime call."""
    return str(e.device_type()).rsplit(".", 1)[-1] == "CPU" and _kind(e) not in RUNTIME


def device_ns_by_op(results: Any) -> tuple[dict[int, int], int]:
    """The device work of a profiler's results (:data:`DEVICE_WORK`) by the CPU op that launched
    it: ``{the op's correlation id: summed duration in ns}``, and the duration of all of it (ns;
    the part linked to no op is in the total only)."""
    by_op: dict[int, int] = {}
    total = 0
    for e in results.events():
        if _kind(e) not in DEVICE_WORK or _on_host(e):
            continue
        ns = max(int(e.duration_ns()), 0)
        total += ns
        op = e.linked_correlation_id()
        if op > 0:
            by_op[op] = by_op.get(op, 0) + ns
    return by_op, total


def _walk(results: Any, names: set[str], device: dict[int, int] | None) -> tuple[list, list, list, list]:
    """:func:`outermost`, and with ``device`` (:func:`device_ns_by_op`) each event's device ns: its
    own and that of every event nested in it (an empty list without)."""
    by_thread: dict[int, list] = {}
    for e in results.events():
        if _on_host(e):
            by_thread.setdefault(e.start_thread_id(), []).append(e)
    if not by_thread:
        return [], [], [], []
    events = max(by_thread.values(), key=len)
    if device is None:
        spans = sorted((e.start_ns(), -e.duration_ns(), e.name(), 0) for e in events)
    else:
        spans = sorted((e.start_ns(), -e.duration_ns(), e.name(), device.get(e.correlation_id(), 0))
                       for e in events)
    out_names: list[str] = []
    out_ns: list[int] = []
    nested: list[int] = []
    dev: list[int] = []
    end = -1  # the end of the counted event open now (-1: none)
    for start, neg, name, d in spans:
        if start < end:  # inside a counted event: the profiler's own cost is in its time
            nested[-1] += 1
            if device is not None:
                dev[-1] += d
            continue
        name = SAME_OP.get(name, name)
        if name in names:
            out_names.append(name)
            out_ns.append(-neg)
            nested.append(0)
            if device is not None:
                dev.append(d)
            end = start - neg
    return out_names, out_ns, nested, dev


def outermost(results: Any, names: set[str]) -> tuple[list[str], list[int], list[int]]:
    """The profiler's outermost events whose names are in ``names`` (none of ``names`` around
    them: what the dispatch mode sees as one op), in order, on the thread that ran the most
    events (the one the forward ran on): their names, durations (ns) and the events nested
    inside each (each carries the profiler's own cost inside the op's time). Only the host's
    own events count: the device's, and the runtime calls CUPTI records beside the ops, do not."""
    return _walk(results, names, None)[:3]


def align(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``a[i] == b[j]``, in order: the two sequences walked together, and
    where they differ, the nearest place (fewest ops skipped in both) from where :data:`RESYNC`
    ops agree, within :data:`WINDOW` of either; past a difference none resolves, the rest of
    the two is matched by :mod:`difflib` (the same ops in the same order, bar a few, make that
    the rare path: it is quadratic in the ops of one name)."""
    pairs: list[tuple[int, int]] = []
    i = j = 0
    n, m = len(a), len(b)
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i += 1
            j += 1
            continue
        best = None
        for skip in range(1, 2 * WINDOW + 1):  # fewest skipped first
            for di in range(max(0, skip - WINDOW), min(skip, WINDOW) + 1):
                dj = skip - di
                k = min(RESYNC, n - i - di, m - j - dj)
                ends = k == RESYNC or i + di + k == n or j + dj + k == m
                if k > 0 and ends and a[i + di:i + di + k] == b[j + dj:j + dj + k]:
                    best = (di, dj)
                    break
            if best is not None:
                break
        if best is None:
            import difflib

            sm = difflib.SequenceMatcher(None, a[i:], b[j:], autojunk=False)
            pairs.extend((i + x.a + t, j + x.b + t) for x in sm.get_matching_blocks() for t in range(x.size))
            break
        i, j = i + best[0], j + best[1]
    return pairs


@dataclass
class TwinTimes:
    """What :func:`read_twin` reads of a twin step, per op of the sampled step (``-1``: none)."""

    host_ns: array  # host time, the profiler's own cost of nested events taken out
    matched: int  # ops matched on the twin
    # device time (ns) of each matched op (0: it launched no device work); None: not read (CPU),
    # or the twin recorded no device work at all (then ``device["why"]`` says so)
    device_ns: array | None = None
    # with device=True: the twin's device work in all (``total_ns``), the part in matched ops
    # (``matched_ns``) and the matched ops that launched some (``ops``); None on CPU
    device: dict | None = None


def read_twin(op_names: list[str], results: Any, event_ns: float, *, device: bool) -> TwinTimes:
    """Per op of a sampled step (``op_names``: the profiler's name of each, ``aten::mean``), its
    time on the twin step whose profiler ``results`` are given, in ns (``-1``: unmatched, the
    mode's clock stays), and how many were matched; the profiler's own cost of each nested event
    (``event_ns``) is taken out. With ``device`` (a twin profiled with CUDA activity), each
    matched op's device time too: the device work linked (by correlation id) to its outermost
    event or any event nested in it (see the module doc)."""
    by_op, total = device_ns_by_op(results) if device else ({}, 0)
    names, ns, nested, dev = _walk(results, set(op_names), by_op if device else None)
    out = array("q", [-1]) * len(op_names)
    pairs = align(op_names, names)
    for i, j in pairs:
        out[i] = max(int(ns[j] - nested[j] * event_ns), 0)
    if not device:
        return TwinTimes(out, len(pairs))
    info = {"total_ns": total, "matched_ns": 0, "ops": 0}
    if total <= 0:  # no device work at all: a 0 per op would claim a measurement
        return TwinTimes(out, len(pairs), None, {**info, "why": NO_DEVICE["none"]})
    dns = array("q", [-1]) * len(op_names)
    for i, j in pairs:
        dns[i] = dev[j]
        info["matched_ns"] += dev[j]
        info["ops"] += dev[j] > 0
    return TwinTimes(out, len(pairs), dns, info)


def fallback(steplog: Any, why: str) -> dict:
    """A sampled step that keeps the dispatch mode's clock, and why (:data:`NO_TWIN`)."""
    return {"method": MODE_METHOD, "why": NO_TWIN[why], "matched": 0, "of": steplog.n_ops}


def op_clock(steps: tuple) -> dict:
    """How the sampled steps' op times were taken: per phase, the method (both, where the
    steps of a phase differ) and the ops matched on a twin of all the phase's ops; per step, the
    step's own (``DeepObserver._close_twin``, :func:`fallback`)."""
    by_phase: dict[str, dict] = {}
    per_step = []
    for run_id, index, phase, *_, lg, _kv in steps:
        clock = dict(getattr(lg, "clock", None) or fallback(lg, "failed"))
        per_step.append({"run_id": run_id, "step": int(index), "phase": phase, **clock})
        got = by_phase.setdefault(phase, {"methods": set(), "matched": 0, "of": 0})
        got["methods"].add(clock["method"])
        got["matched"] += int(clock["matched"])
        got["of"] += int(clock["of"])
        if "gpu_matched" in clock:  # a CUDA step (a CPU run's entries stay as they were)
            got["gpu_matched"] = got.get("gpu_matched", 0) + int(clock["gpu_matched"])
    phases = {ph: {"method": " and ".join(sorted(v.pop("methods"))), **v} for ph, v in by_phase.items()}
    return {**phases, "steps": per_step}


def holds_cuda(model: Any) -> bool:
    """The model holds a CUDA parameter or buffer (where CUDA is available at all)."""
    if not torch.cuda.is_available():
        return False
    return any(t.is_cuda for t in model.parameters()) or any(t.is_cuda for t in model.buffers())


def on_cuda(result: tuple) -> bool:
    """A forward's ``(kwargs, output)`` holds a CUDA tensor at its top level (its logits, the
    input ids): the step ran on CUDA though the model's weights were elsewhere between calls
    (offloaded)."""
    kwargs, out = result
    values = [getattr(out, "logits", None), *(kwargs or {}).values()]
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in values)


def device_clock(got: Any) -> dict:
    """A CUDA step's device keys of its ``op_clock`` entry: the ops with a device time, the twin's
    device work in all and in matched ops (ms); or why it has none (``gpu_why``)."""
    if got is None:
        return {"gpu_matched": 0, "gpu_why": NO_DEVICE["cupti"]}
    info = got.device or {}
    out = {"gpu_matched": got.matched if got.device_ns is not None else 0,
           "gpu_total_ms": info.get("total_ns", 0) / 1e6, "gpu_matched_ms": info.get("matched_ns", 0) / 1e6,
           "gpu_ops": int(info.get("ops", 0))}
    if "why" in info:
        out["gpu_why"] = info["why"]
    return out
