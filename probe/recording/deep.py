"""Deep runs: on a few sampled steps of a generate call, every op and every tensor storage.

``probe.attach(model, deep=...)`` registers a :class:`DeepObserver`: each ``generate()`` call is
then a *deep run*. On its sampled steps (:class:`DeepPlan`: by default the prefill step and a
few decode steps spread over the run) the observer opens a :class:`~probe.recording.deep_ops.StepLog`
— a ``TorchDispatchMode`` over every aten op and global module hooks for the call stack — before
the step's clock starts and closes it after the clock stopped. The dispatch mode slows the
sampled steps many times over, so a deep run never counts as a timing: its ``calls``, ``steps``
and ``sampling`` rows are left out of the frames (``Contribution.untimed``), its ``runs`` row
says ``kind = "deep"`` with no TTFT, TPOT or tok/s, and its ops, memory ledger and storages are
the frames ``ops``, ``ledger`` and ``allocations`` (:mod:`probe.recording.deep_frames`).

The ops' host times come from torch.profiler on each sampled step's *twin*, a step that runs the
same ops without the mode (:mod:`probe.recording.deep_twin`): for a decode sample the step
:data:`TWIN_AFTER` steps on, which the observer profiles as it comes; for the prefill, and for a
decode sample whose twin step cannot come in the run (too near its end, or to another sample),
the same step of the same generate call run again without the mode, for as many tokens as the
last such sample needs (:meth:`DeepObserver.twin_rerun`, which ``probe.profile(deep=...)``
runs: one token where only the prefill needs it). A step without a twin keeps the mode's clock;
``meta["deep"]["op_clock"]`` says which each step has.
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from typing import Any

from ..schema import ALLOCATIONS, LEDGER, OPS, STR
from .cache import cache_tensors, find_cache
from .deep_calls import calibrate, others_active
from .deep_ops import OpMode, StepLog, parameter_bytes, storage_bytes, tied_weights
from .deep_plan import DeepPlan, plan_of  # noqa: F401  (re-exported: where readers have found them)
from .deep_twin import (TWIN_AFTER, TWIN_METHOD, TwinProfiler, cuda_profilable, device_clock, event_cost_ns, fallback,
                        holds_cuda, on_cuda, read_twin)
from . import attnfn
from .discovery import select_modules
from .hotpath import PartialWrapper
from .observer import Contribution, Observer, RunRec, StepRec

log = logging.getLogger(__name__)

#: the timing figures of a deep run's row, left empty: the dispatch mode slowed its sampled steps
UNTIMED_RUN_COLUMNS = ("ttft_ms", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p90", "prefill_tok_s", "decode_tok_s")


class DeepObserver(Observer):
    """Makes each generate call a deep run (see the module doc)."""

    columns = {"runs": {"kind": STR, **{c: "float64" for c in UNTIMED_RUN_COLUMNS}}}
    builds = {"ops": OPS, "ledger": LEDGER, "allocations": ALLOCATIONS}

    def __init__(self, plan: DeepPlan, *, armed: bool = True) -> None:
        self.plan = plan
        self.armed = armed  # False: generate calls stay timed ones until armed (the profiling routine's)
        self.codes: dict[int, int] = {}  # id of each module of the model -> its index in ``labels``
        self.labels: list[str] = []  # the modules' qualified names ("" first: the model itself)
        self.blocks: frozenset[int] = frozenset()
        self.weights: dict[str, int] = {}
        self.tied: dict[str, dict] = {}  # modules sharing parameter storage with others (tied_weights)
        self.recorder: Any = None
        self.runs: list[str] = []  # the deep runs' ids
        self.steps: list[tuple] = []  # per sampled step: (run_id, step, phase, q_len, kv_len, StepLog, kv allocs)
        self.sigs: dict = {}  # the ops' signatures, shared by the steps (see StepLog)
        self.call_ns: dict = {}  # per op overload, what calling it from the dispatch mode adds (see StepLog)
        self._run: RunRec | None = None
        self._chosen: frozenset[int] = frozenset()
        self._open: tuple | None = None  # (step, log, mode, hook handles, attention functions replaced)
        self._model_ref: Any = None
        self._fn_codes: dict[int, int] = {}  # an attention module's code -> its attention function's
        # the twins (deep_twin): a sampled step's ops timed by torch.profiler on a step without the mode
        self.twin_runs: list[str] = []  # the generate calls run again for twins (twin_rerun)
        self._profiler = TwinProfiler()
        self._twin_open: tuple | None = None  # (the twin step, the sampled step's StepLog)
        self._pending: dict[int, tuple[int, StepLog]] = {}  # step index -> (sampled decode step, its log) it twins
        # the last deep run's sampled steps no twin in the run can time (its prefill, decode samples
        # too near the end or another sample), by step index, until the run again times them
        self._rerun: dict[int, StepLog] = {}
        self._rerun_for: dict[int, StepLog] = {}  # those being timed while the run again runs (twin_rerun)
        self._rerun_n = 0  # its new tokens
        self._twin_run: RunRec | None = None
        self._event_ns: float | None = None  # the profiler's own cost of one event (measured once)
        self._cuda = False  # the model holds a CUDA parameter or buffer (install)
        # per op signature index (``sigs``), its overload and the profiler's name of it, added as
        # signatures are (``_sig_ops``)
        self._sig_funcs: list = []
        self._sig_names: list[str] = []
        # overload -> templated (args, kwargs) of its first call, for the overloads not calibrated
        # yet: calibrated only where an op of theirs keeps the mode's clock (``_calibrate``)
        self._samples: dict = {}

    def install(self, model: Any, recorder: Any, stack: Any) -> None:
        named = list(model.named_modules())  # the model itself first, as ""
        self.labels = [n for n, _ in named]
        self.codes = {id(m): i for i, (_, m) in enumerate(named)}
        blocks = {info.name for _, info in select_modules(model, "blocks")}
        self.blocks = frozenset(i for i, n in enumerate(self.labels) if n in blocks)
        self.weights = {n: parameter_bytes(m) for n, m in named}
        self.tied = tied_weights(model)
        self._cuda = holds_cuda(model)
        self.recorder = recorder
        self._model_ref = weakref.ref(model)
        stack.callback(self._close, None)
        stack.callback(self._close_twin, None, None)  # detach leaves no profiler running

    def run_begin(self, run: RunRec) -> None:
        if run.kind == "generate" and self._rerun_for and self._twin_run is None:
            self._twin_run = run
            self.twin_runs.append(run.run_id)
            return
        if run.kind != "generate" or not self.armed:
            return
        # the last deep run's steps that waited for it to run again keep the mode's clock now
        dropped, self._rerun = self._rerun, {}
        self._calibrate(list(dropped.values()))
        self._run = run
        rec = self.recorder
        self._chosen = self.plan.chosen(run.gen_settings.get("max_new_tokens"),
                                        max_steps=rec.max_steps, decode_stride=rec.decode_stride)
        self.runs.append(run.run_id)

    def run_end(self, run: RunRec | None) -> None:
        self._close(None)
        self._close_twin(None, None)
        # sampled steps whose twin step never came wait for the run again ("ended" until then)
        ended, self._pending = list(self._pending.values()), {}
        self._rerun.update(ended)
        if run is None or run is self._twin_run:
            self._twin_run = None
        self._run = None

    def stop(self, reason: str) -> None:
        self.run_end(None)

    def step_begin(self, step: StepRec) -> None:
        if self._twin_open is None and not self._open:
            target = None
            if step.run is self._twin_run and self._twin_run is not None:
                target = self._rerun_for.pop(step.index, None)
            elif step.run is self._run and self._run is not None and step.index not in self._chosen:
                target = self._pending.pop(step.index, (None, None))[1]
            if target is not None:
                self._open_twin(step, target)
                return
        if self._run is None or step.run is not self._run or step.index not in self._chosen or self._open:
            return
        from torch.nn.modules import module as nn_module

        steplog = StepLog(self.codes, self.blocks, self.sigs, self.call_ns)
        handles, replaced = [], []
        try:
            handles.append(nn_module.register_module_forward_pre_hook(steplog.enter))
            handles.append(nn_module.register_module_forward_hook(steplog.exit, always_call=True))
            replaced = self._wrap_attention(steplog)
            mode = OpMode(steplog)
            mode.__enter__()
        except Exception:  # the probe's own failure must never cost the user their forward
            log.warning("probe: could not open the deep pass of step %d", step.index, exc_info=True)
            for h in handles:
                h.remove()
            attnfn.put_back(replaced)
            return
        self._open = (step, steplog, mode, handles, replaced)

    def _wrap_attention(self, steplog: StepLog) -> list[tuple]:
        """For this step, every attention function opens a call of its own inside its attention
        module, named as the probe names it at depth sublayers (``<attention>.attention_fn``)."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            return []
        replaced = []
        for space, key in attnfn.entries(model.modules()):
            fn = space[key]
            w = PartialWrapper(fn, _attention_call(fn, steplog, self._fn_code))
            space[key] = w
            replaced.append((space, key, fn, w))
        return replaced

    def _fn_code(self, module: Any) -> int | None:
        """The code of ``module``'s attention function (a label added on first use)."""
        code = self.codes.get(id(module))
        if code is None:
            return None
        fn = self._fn_codes.get(code)
        if fn is None:
            fn = self._fn_codes[code] = len(self.labels)
            self.labels.append(attnfn.pseudo_name(self.labels[code]))
        return fn

    def step_end(self, step: StepRec, kwargs: dict, out: Any, error: BaseException | None) -> None:
        if self._open is not None and self._open[0] is step:
            self._close((kwargs, out) if error is None else None)
        elif self._twin_open is not None and self._twin_open[0] is step:
            self._close_twin(step, error)

    # ---------------------------------------------------------------- twins (deep_twin)
    def _open_twin(self, step: StepRec, target: StepLog) -> None:
        """Start torch.profiler for ``step``, the twin of the sampled step ``target`` (before the
        step's clock starts; nothing of the probe's runs in the step while it is profiled)."""
        if others_active():  # the user's profiler or dispatch mode, or ranks: start nothing
            target.clock = fallback(target, "others")
            return
        try:
            if self._event_ns is None:  # normally measured when the sampled step closed (_close)
                self._event_ns = event_cost_ns()
            if target.cuda and cuda_profilable():
                self._profiler.start(device=True)
            else:
                self._profiler.start()
        except Exception:  # the probe's own failure must never cost the user their forward
            log.debug("probe: could not start the profiler of a twin step", exc_info=True)
            self._mode_clock(target, "failed")
            return
        self._twin_open = (step, target)

    def _close_twin(self, step: StepRec | None, error: BaseException | None) -> None:
        """Stop the twin's profiler and give its ops' times to the sampled step, keeping nothing
        else of its events (``step`` None: cut short, nothing is read)."""
        opened, self._twin_open = self._twin_open, None
        if opened is None:
            return
        try:
            results = self._profiler.stop()
        except Exception:
            log.debug("probe: could not stop the profiler of a twin step", exc_info=True)
            results = None
        twin, target = opened
        if step is None or error is not None or results is None:
            self._mode_clock(target, "failed")
            return
        device = self._profiler.device
        try:
            names = self._sig_ops()[1]
            ops = target.op_sigs()
            got = read_twin([names[k] for k in ops], results, self._event_ns or 0.0, device=device)
            times, matched = got.host_ns, got.matched
        except Exception:
            log.debug("probe: could not read the profiler of a twin step", exc_info=True)
            self._mode_clock(target, "failed")
            return
        del results
        target.twin_ns = times
        self._calibrate([target])  # the ops left unmatched keep the mode's clock
        target.clock = {"method": TWIN_METHOD, "twin": self._twin_name(twin),
                        "matched": matched, "of": target.n_ops,
                        "event_ns": round(self._event_ns or 0.0, 1)}
        if target.cuda:  # a CPU step's clock stays as it was: no device keys
            target.clock.update(device_clock(got if device else None))
            target.twin_device_ns = got.device_ns if device else None

    def _sig_ops(self) -> tuple[list, list[str]]:
        """Per op signature index, the op's overload and its name as torch.profiler writes it
        (``aten::mean``), each made once per signature (``sigs`` only grows, its indices in the
        order the signatures were added)."""
        funcs, names = self._sig_funcs, self._sig_names
        if len(funcs) < len(self.sigs):
            for func, _, _ in itertools.islice(self.sigs, len(funcs), None):
                schema = getattr(func, "_schema", None)
                funcs.append(func)
                names.append(schema.name if schema is not None else str(func))
        return funcs, names

    def _twin_name(self, twin: StepRec) -> str:
        """What a twin step is, as ``op_clock`` says it."""
        if twin.run is not self._twin_run:
            return f"step {twin.index}"
        where = "the prefill" if twin.index == 0 else f"step {twin.index}"
        if self._rerun_n == 1:
            return f"{where} of a one-token generate call of the same inputs and seed"
        return f"{where} of the generate call run again for {self._rerun_n} new tokens, the same inputs and seed"

    def twin_rerun(self, call: Any) -> None:
        """Run ``call(n)``, a generate call of the last deep run's inputs and seed for ``n`` new
        tokens (``n``: one more than the last step it must reach), with its steps profiled as the
        twins of the deep run's sampled steps that had none in the run: its prefill, and decode
        samples too near the run's end or another sample (see :mod:`probe.recording.deep_twin`).
        Nothing is run beside the user's profiler or dispatch mode, or on one rank of several (it
        would see one more generate call)."""
        targets, self._rerun = self._rerun, {}
        if not targets:
            return
        if others_active():
            for lg in targets.values():
                lg.clock = fallback(lg, "others")
            return
        self._rerun_for, self._rerun_n = dict(targets), max(targets) + 1
        try:
            call(self._rerun_n)
        finally:
            left, self._rerun_for = self._rerun_for, {}
            for lg in left.values():  # the call never reached their steps
                self._mode_clock(lg, "failed")
            self._close_twin(None, None)

    def _close(self, result: tuple | None) -> None:
        """Close the open sampled step; ``result``: the forward's ``(kwargs, output)``, where its
        cache is read (``None``: it failed or was cut short, nothing is read)."""
        opened, self._open = self._open, None
        if opened is None:
            return
        step, steplog, mode, handles, replaced = opened
        try:
            mode.__exit__(None, None, None)
        finally:
            for h in handles:
                h.remove()
            attnfn.put_back(replaced)
        held: dict[int, int] = {}
        if result is not None:
            try:
                held = storage_bytes(cache_tensors(find_cache(*result)))
            except Exception:  # an exotic cache: the ledger then has no KV part
                log.debug("probe: could not read the cache of a deep step", exc_info=True)
        kv = steplog.close(held)
        steplog.cuda = self._cuda or (result is not None and on_cuda(result))
        # the overloads first seen on this step: what calling each from Python adds is measured
        # only where one of its ops keeps the mode's clock (no twin, or unmatched on it)
        for func, sample in mode.samples.items():
            self._samples.setdefault(func, sample)
        mode.samples = {}
        if self._event_ns is None and not others_active():  # here, not right before a twin step
            try:
                self._event_ns = event_cost_ns()
            except Exception:
                log.debug("probe: could not measure the profiler's own cost of an event", exc_info=True)
        # until a twin times its ops, the step keeps the mode's clock, and says why. A prefill, and a
        # decode sample with another sample up to its twin step, are timed on the run again
        # (twin_rerun), if it comes; so is a decode sample whose twin step the run does not reach
        if step.phase == "prefill" and step.index == 0 and result is not None:
            steplog.clock = fallback(steplog, "attach")
            self._rerun[step.index] = steplog
        elif step.phase == "decode" and result is not None:
            between = any(step.index + i in self._chosen for i in range(1, TWIN_AFTER + 1))
            if between:
                steplog.clock = fallback(steplog, "sampled")
                self._rerun[step.index] = steplog
            else:
                steplog.clock = fallback(steplog, "ended")  # until its twin, if it comes, times it
                self._pending[step.index + TWIN_AFTER] = (step.index, steplog)
        else:
            self._mode_clock(steplog, "phase" if result is not None else "failed")
        self.steps.append((step.run.run_id, step.index, step.phase, step.q_len, step.kv_len, steplog, frozenset(kv)))

    def _mode_clock(self, steplog: StepLog, why: str) -> None:
        """``steplog`` keeps the dispatch mode's clock (``why``: :data:`~probe.recording.deep_twin.NO_TWIN`),
        its overloads' call costs measured now."""
        steplog.clock = fallback(steplog, why)
        self._calibrate([steplog])

    def _calibrate(self, steplogs: list[StepLog]) -> None:
        """What calling each overload from the dispatch mode adds (:func:`~probe.recording.deep_calls.calibrate`),
        for the overloads not calibrated yet of the ops of ``steplogs`` that keep the mode's clock
        (the step has no twin times, or the op was not matched on its twin); a twin's times
        replace the others'. The templates of those calibrated (or not replayable) are dropped."""
        if not self._samples:
            return
        funcs = self._sig_ops()[0]
        needed: dict = {}
        for lg in steplogs:
            twin = lg.twin_ns
            for i, k in enumerate(lg.op_sigs()):
                if twin is None or twin[i] < 0:
                    func = funcs[k]
                    if func in self._samples:
                        needed[func] = None
        if not needed:
            return
        samples = {f: s for f, s in self._samples.items() if f in needed}  # in the order the forward called them
        try:
            scratch = StepLog(self.codes, self.blocks, dict(self.sigs))  # the step's bookkeeping, kept apart
            calibrate(samples, self.call_ns, between=lambda f, a, k, out: scratch.op(f, a, k, out, 0))
        except Exception:  # their op times keep the step's floor
            log.debug("probe: could not calibrate the op call costs of a deep step", exc_info=True)
            return
        if others_active():  # nothing was replayed: keep the templates for a later chance
            return
        for f in samples:
            del self._samples[f]

    def busy(self) -> bool:
        return self._open is not None or self._twin_open is not None

    def clear(self) -> None:
        self.runs = [r for r in self.runs if self._run is not None and r == self._run.run_id]
        self.twin_runs = []
        self.steps = []
        self._pending, self._rerun = {}, {}

    def records(self) -> Any:
        # the steps no twin has timed yet keep the mode's clock for now (a prefill whose twin
        # generate is the caller's to run, or never runs: probe.attach)
        waiting = {id(lg) for _, lg in self._pending.values()} | {id(lg) for lg in self._rerun_for.values()}
        if self._twin_open is not None:
            waiting.add(id(self._twin_open[1]))
        self._calibrate([s[5] for s in self.steps if id(s[5]) not in waiting])
        return {"runs": tuple(self.runs), "twin_runs": tuple(self.twin_runs), "steps": tuple(self.steps),
                "weights": dict(self.weights),
                "tied": dict(self.tied),
                "labels": list(self.labels),
                "plan": self.plan.describe(), "sigs": dict(self.sigs),
                "call_us": {str(f): ns / 1e3 for f, ns in self.call_ns.items()}}

    @classmethod
    def frames(cls, records: Any, *, calls: Any, steps: Any, runs: Any, rank: int) -> Contribution:
        import pandas as pd

        from .deep_frames import deep_frames, deep_meta

        if not records or not records["runs"]:
            return Contribution()
        ids = list(records["runs"])
        twins = list(records.get("twin_runs", ()))
        row = {"run_id": ids + twins, "kind": ["deep"] * len(ids) + ["deep twin"] * len(twins),
               **{c: [math.nan] * (len(ids) + len(twins)) for c in UNTIMED_RUN_COLUMNS}}
        built = deep_frames(records["steps"], records["sigs"], records["labels"], records["weights"], rank)
        meta = deep_meta(records, ids, twins)
        return Contribution(runs=pd.DataFrame(row), built=built, meta=meta, untimed=frozenset(ids + twins))


def _attention_call(fn: Any, steplog: StepLog, code_of: Any) -> Any:
    def attention_function(module, *args, **kwargs):
        steplog.enter_code(code_of(module), args)
        try:
            return fn(module, *args, **kwargs)
        finally:
            steplog.exit()

    return attention_function
