"""The sampling step, stage by stage: what a generate step's ``outside_ms`` is made of.

While a recorded ``generate()`` runs, the model instance's ``_get_logits_processor`` and
``_get_stopping_criteria`` are wrapped so that the lists generate builds come back as timed
subclasses of ``LogitsProcessorList`` / ``StoppingCriteriaList``: the same items in the same
order, each processor still applied by transformers' own ``LogitsProcessorList.__call__``, so
generate behaves exactly as without the probe. The wrappers are removed when generate returns;
the user's ``logits_processor=`` / ``stopping_criteria=`` lists and their objects are never
touched (generate builds new lists from them).

Per step (the forward it follows), the recorder keeps the host time of every processor call
(temperature, top-k, top-p, repetition penalty, a user's processor, ... by class name, in list
order) and of every stopping-criteria call (``stopping``), plus CUDA event time where the scores
are on a CUDA device (pooled events, resolved once after generate, no synchronisation while it
runs). Two model methods generate calls between forwards are timed the same way (host time,
wrapped on the instance for the call): ``_update_model_kwargs_for_generation`` (``update
kwargs``: carrying the cache, attention mask and positions over to the next step) and
``prepare_inputs_for_generation`` (``prepare inputs``: slicing the next forward's inputs).
The probe's own bookkeeping of the step that falls outside the forward (closing the step,
reading the cache size; on CUDA also opening the next step) is the stage ``probe``.
Everything else outside the model until the next forward (the scores copy, softmax +
multinomial or argmax, appending the token, generate's bookkeeping, and the few microseconds
per stage the timing itself costs) is the ``remainder``, so a step's stages add up to its
``outside_ms`` (the remainder is ``outside_ms`` minus the timed stages).

Beam search: the processors run on the log-softmax scores of every beam; the remainder holds
the log-softmax and the beam bookkeeping. Assisted and prompt-lookup decoding: the processors
and stopping checks are timed wherever generate calls them (several times per step), and the
candidate generator's ``get_candidates`` (the assistant model's own generate, or the prompt
lookup) is the stage ``candidates``; the first candidates, drawn before the first forward, are
generate's setup (in TTFT), not a step's.

This module imports only pandas and numpy up front; torch and transformers are imported when a
generate call is recorded.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from array import array
from typing import Any, Callable

import numpy as np
import pandas as pd

from .. import schema
from .observer import Observer
from ..schema import SAMPLING

log = logging.getLogger(__name__)

_now = time.perf_counter_ns
_NS = 1e-6  # ns -> ms

PROCESSOR, STOPPING, CANDIDATES, REMAINDER = "processor", "stopping", "candidates", "remainder"
UPDATE_KWARGS, PREPARE_INPUTS, PROBE = "update kwargs", "prepare inputs", "probe"
#: model methods generate calls between forwards, timed as a stage each (transformers 4.57 and 5.x)
_METHODS = {"_update_model_kwargs_for_generation": UPDATE_KWARGS, "prepare_inputs_for_generation": PREPARE_INPUTS}
#: every model attribute wrapped (on the instance, during a generate call): the builders of
#: generate's per-call helpers, then the timed methods
WRAPPED = ("_get_logits_processor", "_get_stopping_criteria", "_get_candidate_generator", *_METHODS)
#: display order of the stage kinds, roughly that of a step: after the forward, its cache and
#: mask are carried over, the processors run (in list order), the token is chosen, the
#: stopping checks run, candidates are drafted, the next forward's inputs are prepared;
#: then the probe's own bookkeeping of the step; the remainder (token choice and the rest) is
#: always last
_KIND_ORDER = {UPDATE_KWARGS: 0, PROCESSOR: 1, STOPPING: 2, CANDIDATES: 3, PREPARE_INPUTS: 4, PROBE: 5}


class _RunRec:
    """The stage records of one generate call: one entry per timed call, columnar."""

    __slots__ = ("run_id", "stages", "stage_ids", "step", "c_step", "c_stage", "c_ns", "c_ev", "ev_ms")

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
    or the probe detaches).
    """

    def __init__(self, model: Any, now: Callable[[], int] | None = None) -> None:
        self.model = model
        self.now = now or _now  # the recorder's clock: stages and steps must share it
        self.runs: dict[str, _RunRec] = {}
        self._cur: _RunRec | None = None
        self._installed: list[tuple[str, bool, Any]] = []  # (name, had an instance attribute, its value)
        self._pairs: list = []  # CUDA (start, end) events of the current run, awaiting resolution
        self._pool: list = []

    # ------------------------------------------------------------------ the recorder's observer
    def run_begin(self, run: Any) -> None:
        self.begin(run.run_id)  # times generate's processors, stopping checks, ...

    def run_end(self, run: Any) -> None:
        self.end()  # its wrappers off, its CUDA events resolved

    def stop(self, reason: str) -> None:
        self.end()

    def step_begin(self, step: Any, opening_ns: int) -> None:
        if step.run.kind == "generate":
            self.own(opening_ns)  # opening this step (CUDA events), outside the previous step's forward

    def step_end(self, step: Any, kwargs: dict, out: Any, error: BaseException | None) -> None:
        if step.run.kind == "generate":
            # sampling calls from here to the next forward belong to this step; so does this bookkeeping
            self.step(step.index, self.now() - step.t1)

    def records(self) -> dict:
        return {"sampling": dict(self.runs)}

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
        cur.c_step.append(cur.step)
        cur.c_stage.append(cur.stage_id(PROBE, 0, PROBE))
        cur.c_ns.append(ns)
        cur.c_ev.append(-1)

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
            object.__setattr__(model, name, self._wrapper(orig, name))

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
            self._singles: list | None = None

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
        """A ``LogitsProcessorList`` that times each processor, applied one by one as the base does."""

        _base = LogitsProcessorList

        def __call__(self, input_ids, scores, **kwargs):
            run = self._active()
            if run is None:
                return LogitsProcessorList.__call__(self, input_ids, scores, **kwargs)
            singles = self._singles
            if singles is None or len(singles) != len(self) or any(s[0] is not p for s, p in zip(singles, self)):
                singles = self._singles = _singles(self, run)
            rec = self._probe[0]
            apply = LogitsProcessorList.__call__
            device = scores.device
            for _, one, sid in singles:
                scores = rec.timed(run, sid, device, apply, (one, input_ids, scores), kwargs)
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

    def _singles(lst, run: _RunRec) -> list:
        """Per processor: itself, a one-item list (so the base applies it with its own rules), stage id."""
        out, seen = [], {}
        for i, proc in enumerate(lst):
            name = type(proc).__name__
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:  # the same class twice in one list stays two stages
                name = f"{name} ({seen[name]})"
            out.append((proc, LogitsProcessorList([proc]), run.stage_id(PROCESSOR, i, name)))
        return out

    return TimedLogitsProcessorList, TimedStoppingCriteriaList


# ---------------------------------------------------------------------- frames
def sampling_frame(runs: dict[str, _RunRec], steps: pd.DataFrame, rank: int) -> pd.DataFrame:
    """The ``sampling`` frame: per generate step, one row per stage in order, then ``remainder``.

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


def _run_rows(r: _RunRec, st: pd.DataFrame, rank: int) -> pd.DataFrame:
    n_stage = len(r.stages)
    # display order: processors by list position, stopping, candidates, then the remainder
    keys = sorted(range(n_stage), key=lambda i: (_KIND_ORDER[r.stages[i][0]], r.stages[i][1], i))
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
    out["_p"] = out["phase"].map(rank).fillna(len(rank))
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
