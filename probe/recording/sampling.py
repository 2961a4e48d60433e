"""The sampling step, stage by stage: what a generate step's ``outside_ms`` is made of.

While a recorded ``generate()`` runs, the model instance's ``_get_logits_processor`` and
``_get_stopping_criteria`` are wrapped so that the lists generate builds come back as timed
subclasses of ``LogitsProcessorList`` / ``StoppingCriteriaList``: the same items in the same
order. The processors list is applied by transformers' own ``LogitsProcessorList.__call__``, as
without the probe, over a shadow list of timing proxies, one per processor (each presents its
processor's own ``__call__`` signature, which transformers inspects to pass keyword arguments),
so generate behaves exactly as without the probe. The wrappers are removed when generate
returns; the user's ``logits_processor=`` / ``stopping_criteria=`` lists and their objects are
never touched (generate builds new lists from them).

Per step (the forward it follows), the recorder keeps the host time of every processor's own
call (temperature, top-k, top-p, repetition penalty, a user's processor, ... by class name, in
list order); ``dispatch``, the list call's time less its processors' (transformers inspecting
each processor's signature, the loop, and what timing each processor costs: two reads of the
clock, and two CUDA events on CUDA); the time of every stopping-criteria call (``stopping``);
plus CUDA event time of the processors and stopping checks where the scores are on a CUDA
device (pooled events, resolved once after generate, no synchronisation while it runs). Two model methods generate calls between forwards are timed the same way (host time,
wrapped on the instance for the call): ``_update_model_kwargs_for_generation`` (``update
kwargs``: carrying the cache, attention mask and positions over to the next step) and
``prepare_inputs_for_generation`` (``prepare inputs``: slicing the next forward's inputs).
The probe's own bookkeeping outside the forward (closing the step, reading the cache size, the
observers' bookkeeping, opening the next step or closing the run) is the stage ``probe``.
Everything else outside the model until the next forward (the scores copy, softmax +
multinomial or argmax, appending the token, generate's bookkeeping, and the few microseconds
the other stages' timing costs) is the ``remainder``, so a step's stages add up to its
``outside_ms`` (the remainder is ``outside_ms`` minus the timed stages).

Beam search: the processors run on the log-softmax scores of every beam; the remainder holds
the log-softmax and the beam bookkeeping. Assisted and prompt-lookup decoding: the processors
and stopping checks are timed wherever generate calls them (several times per step), and the
candidate generator's ``get_candidates`` (the assistant model's own generate, or the prompt
lookup) is the stage ``candidates``; the first candidates, drawn before the first forward, are
generate's setup (in TTFT), not a step's.

The observer keeps its stage records per generate call and builds the ``sampling`` frame from
them (:mod:`probe.recording.stages`, with pandas). Torch and transformers are imported when a
generate call is recorded.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from array import array
from typing import Any, Callable

from .observer import Contribution, Observer
from .stages import CANDIDATES, DISPATCH, PREPARE_INPUTS, PROBE, PROCESSOR, STOPPING, UPDATE_KWARGS, sampling_frame
from .stages import stage_means, stage_summary  # noqa: F401 - the summaries, where readers have found them
from ..schema import SAMPLING

log = logging.getLogger(__name__)

_now = time.perf_counter_ns
#: model methods generate calls between forwards, timed as a stage each (transformers 4.57 and 5.x)
_METHODS = {"_update_model_kwargs_for_generation": UPDATE_KWARGS, "prepare_inputs_for_generation": PREPARE_INPUTS}
#: every model attribute wrapped (on the instance, during a generate call): the builders of
#: generate's per-call helpers, then the timed methods
WRAPPED = ("_get_logits_processor", "_get_stopping_criteria", "_get_candidate_generator", *_METHODS)


class _RunRec:
    """The stage records of one generate call: one entry per timed call, columnar."""

    __slots__ = ("run_id", "stages", "stage_ids", "step", "c_step", "c_stage", "c_ns", "c_ev", "ev_ms", "own_at")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.stages: list[tuple[str, int, str]] = []  # (kind, position in its list, name)
        self.stage_ids: dict[tuple[str, int, str], int] = {}
        self.step = -1  # the last forward that finished: calls until the next one belong to it
        self.c_step = array("i")
        self.c_stage = array("i")
        self.c_ns = array("q")
        self.c_ev = array("i")  # index into ev_ms, -1 without CUDA
        self.ev_ms = array("d")
        self.own_at = -1  # the entry of the probe's own bookkeeping after the last forward, if any

    def stage_id(self, kind: str, pos: int, name: str) -> int:
        key = (kind, pos, name)
        sid = self.stage_ids.get(key)
        if sid is None:
            sid = self.stage_ids[key] = len(self.stages)
            self.stages.append(key)
        return sid


class SamplingRecorder(Observer):
    """Times the logits processors and stopping criteria of the generate calls of one model.

    An observer of the recorder (:mod:`probe.recording.observer`): :meth:`begin` when a generate call
    starts, :meth:`step` when each of its forwards ends, :meth:`end` when it returns (or fails,
    or the probe detaches). Builds the ``sampling`` frame from its own records.
    """

    builds = {"sampling": SAMPLING}

    def __init__(self, model: Any = None, now: Callable[[], int] | None = None) -> None:
        self.model = model
        self.now = now or _now  # the recorder's clock: stages and steps must share it
        self.runs: dict[str, _RunRec] = {}
        self._cur: _RunRec | None = None
        self._installed: list[tuple[str, bool, Any]] = []  # (name, had an instance attribute, its value)
        self._built: dict[str, tuple[tuple, Callable]] = {}  # name -> ((function, its object), wrapper)
        self._pairs: list = []  # CUDA (start, end) events of the current run, awaiting resolution
        self._pool: list = []

    # ------------------------------------------------------------------ the recorder's observer
    def install(self, model: Any, recorder: Any, stack: Any) -> None:
        self.model = model
        self.now = recorder.now
        stack.callback(self.end)  # its generate-time wrappers go on every path

    def run_begin(self, run: Any) -> None:
        self.begin(run.run_id)  # times generate's processors, stopping checks, ...

    def run_end(self, run: Any) -> None:
        if run is not None and run.probe_end_ns:  # closing the run, after the last step's sampling
            self.own(run.probe_end_ns)
        self.end()  # its wrappers off, its CUDA events resolved

    def stop(self, reason: str) -> None:
        self.end()

    def step_end(self, step: Any, kwargs: dict, out: Any, error: BaseException | None) -> None:
        if step.run.kind == "generate":
            # opening this step (before its clock) was the probe's work after the previous forward
            if step.opened is not None:
                self.own(step.t0 - step.opened)
            # sampling calls from here to the next forward belong to this step; so does this bookkeeping
            self.step(step.index, self.now() - step.t1)

    def records(self) -> dict:
        return dict(self.runs)

    @classmethod
    def frames(cls, records: Any, *, calls: Any, steps: Any, runs: Any, rank: int) -> Contribution:
        return Contribution(built={"sampling": sampling_frame(records or {}, steps, rank)})

    # ------------------------------------------------------------------ lifecycle
    def begin(self, run_id: str) -> None:
        """A generate call starts: wrap the list builders on the model instance."""
        self.end()
        try:
            self._cur = self.runs[run_id] = _RunRec(run_id)
            self._install()
        except Exception:  # the probe's own failure must never cost the user their generate
            log.warning("probe: could not time the sampling stages of this generate()", exc_info=True)
            self._uninstall()
            self._cur = None

    def step(self, index: int, own_ns: int = 0) -> None:
        """Forward ``index`` of the current generate call has finished; the probe spent
        ``own_ns`` of its time outside the model closing it."""
        cur = self._cur
        if cur is not None:
            cur.step = index
            self.own(own_ns)

    def own(self, ns: int) -> None:
        """``ns`` of the probe's own work between forwards, for the stage ``probe``."""
        cur = self._cur
        if cur is None or cur.step < 0 or ns <= 0:
            return
        at = cur.own_at
        if at >= 0 and cur.c_step[at] == cur.step:  # closing a step and opening the next: one stage call
            cur.c_ns[at] += ns
            return
        cur.own_at = len(cur.c_ns)
        cur.c_step.append(cur.step)
        cur.c_stage.append(cur.stage_id(PROBE, 0, PROBE))
        cur.c_ns.append(ns)
        cur.c_ev.append(-1)

    def dispatch(self, run: _RunRec, ns: int) -> None:
        """``ns`` of a processors list's call outside its processors' own calls, for the stage ``dispatch``."""
        run.c_step.append(run.step)
        run.c_stage.append(run.stage_id(DISPATCH, 0, DISPATCH))
        run.c_ns.append(ns)
        run.c_ev.append(-1)

    def end(self) -> None:
        """The generate call is over: remove the wrappers, resolve CUDA events. Idempotent."""
        self._uninstall()
        cur, self._cur = self._cur, None
        if cur is not None and self._pairs:
            try:
                self._resolve(cur)
            except Exception:  # a CUDA error of the probe's own must not replace the user's
                log.debug("sampling CUDA event resolution failed", exc_info=True)
                self._pairs.clear()

    def clear(self) -> None:
        """Forget every record (keeps the current generate call's, if one is running)."""
        cur = self._cur
        self.runs = {cur.run_id: cur} if cur is not None else {}

    def _install(self) -> None:
        model = self.model
        for name in WRAPPED:
            orig = getattr(model, name, None)
            if orig is None or not callable(orig):
                continue  # a transformers without this builder: outside_ms stays unsplit
            had = name in model.__dict__
            self._installed.append((name, had, model.__dict__.get(name)))
            object.__setattr__(model, name, self._wrapper_for(orig, name))

    def _uninstall(self) -> None:
        installed, self._installed = self._installed, []
        model = self.model
        for name, had, prev in reversed(installed):
            current = model.__dict__.get(name)
            if current is None or not getattr(current, "__probe_wrapper__", False):
                continue  # replaced by someone else meanwhile: theirs stays
            if had:
                object.__setattr__(model, name, prev)
            else:
                del model.__dict__[name]

    def _wrapper_for(self, orig: Callable, name: str) -> Callable:
        """The wrapper of ``orig``, built at the first generate and kept while ``orig`` is the
        same function of the same object (the wrappers read the current run when called):
        building five of them took ~35 µs of each generate's start."""
        ident = (getattr(orig, "__func__", orig), getattr(orig, "__self__", None))
        kept = self._built.get(name)
        if kept is not None and kept[0][0] is ident[0] and kept[0][1] is ident[1]:
            return kept[1]
        wrapper = self._wrapper(orig, name)
        self._built[name] = (ident, wrapper)
        return wrapper

    def _wrapper(self, orig: Callable, name: str) -> Callable:
        if name in _METHODS:
            return self._timed_method(orig, _METHODS[name])
        wrap = {"_get_logits_processor": self._timed_processors, "_get_stopping_criteria": self._timed_criteria,
                "_get_candidate_generator": self._timed_candidates}[name]

        @functools.wraps(orig)
        def builder(*args, **kwargs):
            built = orig(*args, **kwargs)
            try:
                return wrap(built)
            except Exception:  # generate gets its list untimed rather than an error
                log.debug("could not time %s's list", name, exc_info=True)
                return built

        builder.__probe_wrapper__ = True  # type: ignore[attr-defined]
        return builder

    def _timed_processors(self, built: Any) -> Any:
        timed_procs, _ = _timed_types()
        from transformers import LogitsProcessorList

        if self._cur is None or type(built) is not LogitsProcessorList:
            return built
        return timed_procs(built, self, self._cur)

    def _timed_criteria(self, built: Any) -> Any:
        _, timed_crit = _timed_types()
        from transformers import StoppingCriteriaList

        if self._cur is None or type(built) is not StoppingCriteriaList:
            return built
        return timed_crit(built, self, self._cur)

    def _timed_method(self, orig: Callable, stage: str) -> Callable:
        """``orig`` (a bound model method generate calls between forwards), timed as ``stage``."""
        rec = self

        @functools.wraps(orig)  # keeps the signature generate inspects (via __wrapped__)
        def method(*args, **kwargs):
            run = rec._cur
            if run is None or run.step < 0:  # before the first forward: generate's setup
                return orig(*args, **kwargs)
            return rec.timed(run, run.stage_id(stage, 0, stage), None, orig, args, kwargs)

        method.__probe_wrapper__ = True  # type: ignore[attr-defined]
        return method

    def _timed_candidates(self, gen: Any) -> Any:
        """Time ``gen.get_candidates`` (an instance attribute on generate's own, per-call object)."""
        run = self._cur
        orig = getattr(gen, "get_candidates", None)
        if run is None or orig is None or not callable(orig):
            return gen
        rec = self

        @functools.wraps(orig)
        def get_candidates(*args, **kwargs):
            if run is not rec._cur or run.step < 0:  # before the first forward: generate's setup
                return orig(*args, **kwargs)
            ids = args[0] if args else kwargs.get("input_ids")
            sid = run.stage_id(CANDIDATES, 0, CANDIDATES)
            return rec.timed(run, sid, getattr(ids, "device", None), orig, args, kwargs)

        object.__setattr__(gen, "get_candidates", get_candidates)
        return gen

    # ------------------------------------------------------------------ timing
    def timed(self, run: _RunRec, sid: int, device: Any, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """``fn(*args, **kwargs)``, its host time (and CUDA time on a CUDA ``device``) recorded."""
        now = self.now
        if getattr(device, "type", None) == "cuda":
            import torch

            stream = torch.cuda.current_stream(device)
            ev0 = self._event(stream)
            t0 = now()
            out = fn(*args, **kwargs)
            t1 = now()
            ev1 = self._event(stream)  # recorded outside the host window: its cost is the remainder's
            run.c_ev.append(len(self._pairs))
            self._pairs.append((ev0, ev1))
        else:
            t0 = now()
            out = fn(*args, **kwargs)
            t1 = now()
            run.c_ev.append(-1)
        run.c_step.append(run.step)
        run.c_stage.append(sid)
        run.c_ns.append(t1 - t0)
        return out

    def _event(self, stream):
        import torch

        ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _resolve(self, run: _RunRec) -> None:
        """CUDA event pairs -> ms, once after the generate call; the events go back to the pool."""
        pairs, self._pairs = self._pairs, []
        pairs[-1][1].synchronize()
        for ev0, ev1 in pairs:  # a run is resolved once: its c_ev indices are positions in pairs
            run.ev_ms.append(ev0.elapsed_time(ev1))
            self._pool.append(ev0)
            self._pool.append(ev1)


class _TimedProcessor:
    """One logits processor as transformers' loop sees it in the timed list's shadow list.

    Calling it times the processor's own ``__call__`` (the stage of its name). Its ``__call__``
    attribute is the processor's own bound ``__call__``, so the signature transformers inspects
    to decide which keyword arguments to pass is the processor's, and its ``__class__`` is the
    processor's (the class transformers names in its errors); calling it goes through this
    class's ``__call__`` (Python looks special methods up on the type).
    """

    def __init__(self, proc: Any, rec: SamplingRecorder, run: _RunRec, sid: int) -> None:
        self.proc = proc
        self.__call__ = proc.__call__  # what inspect.signature(processor.__call__) reads
        self._probe = (rec, run, sid)

    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D105 - the processor's class, for isinstance and messages
        return type(self.proc)

    def __call__(self, input_ids, scores, **kwargs):  # noqa: F811 - called via the type
        rec, run, sid = self._probe
        return rec.timed(run, sid, getattr(scores, "device", None), self.proc, (input_ids, scores), kwargs)


@functools.lru_cache(maxsize=None)
def _timed_types() -> tuple[type, type]:
    """The timed list classes (subclasses of transformers' own, defined on first use)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    class _Timed:
        """Shared by both lists: copies stay timed, pickles are the plain list."""

        _base: type

        def __init__(self, items=(), recorder: SamplingRecorder | None = None, run: _RunRec | None = None):
            self._base.__init__(self, items)
            self._probe = (recorder, run)
            self._shadowed: Any = None  # the timing proxies transformers' loop applies

        def _active(self) -> _RunRec | None:
            rec, run = self._probe
            if rec is None or run is None or run is not rec._cur or run.step < 0:
                return None  # used outside its generate call, or before the first forward
            return run

        def __copy__(self):
            return type(self)(list(self), *self._probe)

        def __deepcopy__(self, memo):
            return type(self)(copy.deepcopy(list(self), memo), *self._probe)

        def __reduce_ex__(self, protocol):
            return (self._base, (list(self),))

    class TimedLogitsProcessorList(_Timed, LogitsProcessorList):
        """A ``LogitsProcessorList`` whose processors are timed one by one, each on its own call.

        transformers' own ``LogitsProcessorList.__call__`` applies them, as without the probe,
        over a shadow list of :class:`_TimedProcessor` proxies (the list itself keeps the
        processors: whatever reads its items sees them unchanged); the list call's time less
        the processors' is the stage ``dispatch``.
        """

        _base = LogitsProcessorList

        def __call__(self, input_ids, scores, **kwargs):
            run = self._active()
            if run is None or not len(self):  # nothing to time: an empty list only returns the scores
                return LogitsProcessorList.__call__(self, input_ids, scores, **kwargs)
            shadow = self._shadowed
            if shadow is None or len(shadow) != len(self) or any(t.proc is not p for t, p in zip(shadow, self)):
                shadow = self._shadowed = _shadow(self, self._probe[0], run)
            rec = self._probe[0]
            now = rec.now
            n0 = len(run.c_ns)
            t0 = now()
            scores = LogitsProcessorList.__call__(shadow, input_ids, scores, **kwargs)
            t1 = now()
            rec.dispatch(run, t1 - t0 - sum(run.c_ns[n0:]))
            return scores

    class TimedStoppingCriteriaList(_Timed, StoppingCriteriaList):
        """A ``StoppingCriteriaList`` whose calls are timed as one stage, ``stopping``."""

        _base = StoppingCriteriaList

        def __call__(self, input_ids, scores, **kwargs):
            run = self._active()
            if run is None:
                return StoppingCriteriaList.__call__(self, input_ids, scores, **kwargs)
            sid = run.stage_id(STOPPING, 0, STOPPING)
            return self._probe[0].timed(run, sid, input_ids.device, StoppingCriteriaList.__call__,
                                        (self, input_ids, scores), kwargs)

    def _shadow(lst, rec: SamplingRecorder, run: _RunRec) -> Any:
        """The list transformers' loop applies: a timing proxy per processor, in list order."""
        out, seen = [], {}
        for i, proc in enumerate(lst):
            name = type(proc).__name__
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:  # the same class twice in one list stays two stages
                name = f"{name} ({seen[name]})"
            out.append(_TimedProcessor(proc, rec, run, run.stage_id(PROCESSOR, i, name)))
        return LogitsProcessorList(out)

    return TimedLogitsProcessorList, TimedStoppingCriteriaList
