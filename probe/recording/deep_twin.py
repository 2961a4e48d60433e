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
  for one token (only where the deep pass runs its own generate: ``probe.profile(deep=...)``).

:class:`TwinProfiler` starts and stops the profiler around the twin step; :func:`twin_times`
reads its events once the step is over and keeps only one number per op of the sampled step:
the profiler's outermost events of the op names the mode saw (the mode sees ``mean`` with the
``sum`` and ``div_`` it dispatches to below it; the profiler records them as events of their
own inside it) are aligned with the mode's ops by name (:func:`align`: the two sequences are
the same but for a few ops one instrument sees and the other does not), and a matched op gets
the event's time less the profiler's own cost of each event nested inside it (:func:`event_cost_ns`).
An op left unmatched keeps the mode's clock.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from array import array
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
NO_TWIN = {
    "attach": "no prefill twin: the generate call is the user's own (probe.attach); probe.profile(deep=...) "
              "and probe run --deep run a one-token generate for it",
    "sampled": "a step up to its twin is sampled too",
    "ended": "no twin step after it: the run ended first",
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


class TwinProfiler:
    """torch.profiler (kineto, CPU activity alone) around one twin step; :meth:`stop` hands back
    its raw results (read them at once and drop them: they hold every event of the step)."""

    def __init__(self) -> None:
        self._prof: Any = None

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        from torch.autograd import profiler

        prof = profiler.profile(use_cpu=True, use_kineto=True, record_shapes=False, profile_memory=False,
                                with_stack=False)
        quietly(prof.__enter__)
        self._prof = prof

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


def outermost(results: Any, names: set[str]) -> tuple[list[str], list[int], list[int]]:
    """The profiler's outermost events whose names are in ``names`` (none of ``names`` around
    them: what the dispatch mode sees as one op), in order, on the thread that ran the most
    events (the one the forward ran on): their names, durations (ns) and the events nested
    inside each (each carries the profiler's own cost inside the op's time)."""
    by_thread: dict[int, list] = {}
    for e in results.events():
        by_thread.setdefault(e.start_thread_id(), []).append(e)
    if not by_thread:
        return [], [], []
    events = max(by_thread.values(), key=len)
    spans = sorted((e.start_ns(), -e.duration_ns(), e.name()) for e in events)
    out_names: list[str] = []
    out_ns: list[int] = []
    nested: list[int] = []
    end = -1  # the end of the counted event open now (-1: none)
    for start, neg, name in spans:
        if start < end:  # inside a counted event: the profiler's own cost is in its time
            nested[-1] += 1
            continue
        name = SAME_OP.get(name, name)
        if name in names:
            out_names.append(name)
            out_ns.append(-neg)
            nested.append(0)
            end = start - neg
    return out_names, out_ns, nested


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


def twin_times(op_names: list[str], results: Any, event_ns: float) -> tuple[array, int]:
    """Per op of a sampled step (``op_names``: the profiler's name of each, ``aten::mean``), its
    time on the twin step whose profiler ``results`` are given, in ns (``-1``: unmatched, the
    mode's clock stays), and how many were matched. The profiler's own cost of each nested event
    (``event_ns``) is taken out."""
    names, ns, nested = outermost(results, set(op_names))
    out = array("q", [-1]) * len(op_names)
    pairs = align(op_names, names)
    for i, j in pairs:
        out[i] = max(int(ns[j] - nested[j] * event_ns), 0)
    return out, len(pairs)


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
    phases = {ph: {"method": " and ".join(sorted(v.pop("methods"))), **v} for ph, v in by_phase.items()}
    return {**phases, "steps": per_step}
