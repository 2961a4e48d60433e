"""`probe.attach(model)`: the probe's lifecycle.

:class:`Probe` installs what records a model — a forward wrapper on each recorded module
(:mod:`probe.recording.hotpath`), a wrapper of the root forward that opens and closes steps, a
``generate`` marker (:mod:`probe.capture.install`) and whatever its observers put on the model
(the defaults of :mod:`probe.recording.defaults` and a caller's own) — all owned by one
``ExitStack``, and removes them on every path. What the wrappers record lives in a
:class:`probe.recorder.Recorder` and its observers; frames are built from its frozen
:class:`probe.recorder.Records`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
import weakref
from typing import Callable, Iterable

import torch
from torch import nn

from ..analysis.observed import check_declarations
from ..recording import attnfn, hotpath
from ..recording.deep import DeepObserver, plan_of
from ..recording.defaults import default_observers
from ..recording.discovery import ModuleInfo, select_modules
from ..recording.hooktime import HookTimers
from ..recording.distributed import OffloadClock, placements, world
from ..recording.observer import Observer
from ..recording.recorder import Recorder
from ..schema import DEPTHS, Depth
from .install import (COMPILED_ADVICE, CompiledModelWarning, calibrate, cuda_device_of, has_cuda_tensors,
                      mark_generate, record_attention_functions, wrapper_factory)

__all__ = ["CompiledModelWarning", "Probe", "ProbeError", "attach", "detach", "probe_of"]

log = logging.getLogger(__name__)

# Every module recorded by a live Probe -> a weak reference to that Probe. Weak both ways:
# nothing here keeps a model or a probe alive (a WeakKeyDictionary whose values referred back
# to their keys would keep both alive forever).
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[Probe]]" = weakref.WeakKeyDictionary()
# Every module a probe ever wrapped (weak): lets a test's leak guard check them cheaply.
_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_LOCK = threading.RLock()  # attach/detach from several threads, each on its own model


class ProbeError(RuntimeError):
    """A misuse of the probe, with a message that says what to do."""


def probe_of(model: nn.Module) -> "Probe | None":
    """The probe attached to ``model`` (or to the model a ``torch.compile`` wrapper holds), if any."""
    model = getattr(model, "_orig_mod", model)
    with _LOCK:
        ref = _ACTIVE.get(model)
    return ref() if ref is not None else None


def detach(model: nn.Module) -> bool:
    """Detach whatever probe is attached to ``model``; returns whether there was one."""
    p = probe_of(model)
    if p is None:
        return False
    p.detach()
    return True


class Probe:
    """Wrappers on one model's blocks and the records they produce.

    Create it with :func:`probe.attach`; use it as a context manager or call :meth:`detach`.
    Frames are built on demand from :attr:`run` (a :class:`probe.Run`).
    """

    def __init__(
        self,
        model: nn.Module,
        depth: Depth = "blocks",
        *,
        cuda_timing: bool | None = None,
        track_memory: bool | None = None,
        decode_stride: int = 1,
        max_steps: int | None = None,
        model_id: str | None = None,
        rank: int | None = None,
        clock: Callable[[], int] | None = None,
        cuda_graphs: bool = False,
        observers: Iterable[Observer] = (),
        time_hooks: bool = True,
        deep: object = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"probe.attach needs a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(...)); "
                f"got {type(model).__name__}"
            )
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {', '.join(repr(d) for d in DEPTHS)}; got {depth!r}")
        if not isinstance(decode_stride, int) or decode_stride < 1:
            raise ValueError(f"decode_stride must be an int >= 1 (keep every N-th decode step); got {decode_stride!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be None or an int >= 1; got {max_steps!r}")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning integer nanoseconds, like time.perf_counter_ns")
        observers = list(observers)
        plan = plan_of(deep)  # a bad value fails here, before anything is installed
        if plan is not None:
            observers.append(DeepObserver(plan))
        for o in observers:
            if not isinstance(o, Observer):
                raise TypeError(f"observers must be instances of probe.recording.observer.Observer subclasses; "
                                f"got {type(o).__name__}")
            check_declarations(type(o))
        self.model = model
        self.depth = depth
        self.decode_stride = int(decode_stride)
        self.max_steps = max_steps
        self.model_id = model_id
        self.rank = world()[0] if rank is None else int(rank)
        self.compiled = False  # the model given to attach was a torch.compile wrapper
        self._cuda_timing = cuda_timing
        self._track_memory = track_memory
        self._clock = clock
        self.cuda_graphs = bool(cuda_graphs)
        self.time_hooks = bool(time_hooks)
        self._extra_observers = observers
        self._attached = False
        self._stack = contextlib.ExitStack()
        self._forwards: list[hotpath.InstalledForward] = []
        self._keys: list[nn.Module] = []
        self._rec: Recorder | None = None
        self._offload = None
        self._calibration: dict = {}
        self._snapshot = None
        self._snapshot_key = None
        self._facts: dict | None = None

    # ------------------------------------------------------------------ lifecycle
    def _attach(self) -> "Probe":
        model = self.model
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):  # torch.compile(model) returns an OptimizedModule
            warnings.warn(
                f"probe: {type(orig).__name__} is wrapped by torch.compile; the probe records the "
                f"original module. Its generate() runs the eager model; direct calls of the compiled "
                f"module run compiled code, for which {COMPILED_ADVICE}",
                CompiledModelWarning,
                stacklevel=3,
            )
            self.model = model = orig
            self.compiled = True
        with _LOCK:
            self._claim(model)
            try:
                self._install(model)
            except BaseException:
                self.detach()
                raise
        log.debug("probe attached to %d modules at depth %s", len(self._forwards), self.depth)
        return self

    def _claim(self, model: nn.Module) -> None:
        if probe_of(model) is not None:
            raise ProbeError(
                "this model already has a probe attached; call .detach() on it (or leave its `with` block, "
                "or call probe.detach(model)) before attaching another"
            )

    def _install(self, model: nn.Module) -> None:
        selected = select_modules(model, self.depth)
        for mod, _ in selected:
            other = probe_of(mod)
            if other is not None:
                raise ProbeError(
                    f"module {type(mod).__name__} is already recorded by another probe; detach that probe "
                    f"first (probe.probe_of(model).detach())"
                )
        uses_cuda = self._cuda_timing
        if uses_cuda is None:
            uses_cuda = torch.cuda.is_available() and has_cuda_tensors(model)
        track = self._track_memory if self._track_memory is not None else bool(uses_cuda)
        device = cuda_device_of(model) if uses_cuda else None
        self._offload = OffloadClock.install(model)
        if self._offload is not None:
            self._stack.callback(self._offload.remove)  # the clock object stays: its records too
        rec = self._rec = Recorder(
            rank=self.rank, decode_stride=self.decode_stride, max_steps=self.max_steps, cuda_device=device,
            track_memory=track, offload_total=self._offload.total_ns if self._offload is not None else None,
            now=self._clock,
        )
        rec.placements = placements(model, [(info.name, mod) for mod, info in selected])
        make_for = wrapper_factory(rec, self._clock)
        self._register(model)
        self._stack.callback(self._unregister)
        root = hotpath.install_forward(model, functools.partial(hotpath.root_wrapper, rec), "")
        self._forwards.append(root)
        self._stack.callback(root.remove)
        for idx, (mod, info) in enumerate(selected):
            fwd = hotpath.install_forward(mod, make_for(idx), info.name)
            self._forwards.append(fwd)
            self._stack.callback(fwd.remove)
            rec.modules.append(info)
            self._register(mod)
        timers = None
        if self.time_hooks:  # a module's forward hooks are part of its call (probe.recording.hooktime)
            rec.hooked = []
            timers = HookTimers([(idx, mod) for idx, (mod, _) in enumerate(selected)], rec.cols,
                                rec.hooked.append, self._clock)
            self._stack.callback(timers.remove)
            timers.sync()
        if self.depth != "blocks":  # the attention function as a call inside each attention module
            record_attention_functions(self, selected, rec, make_for, self._stack)
        mark_generate(model, rec, self._forwards, self._stack, functools.partial(_each_generate, timers))
        for o in default_observers(real_clock=not rec.injected_clock, cuda_graphs=self.cuda_graphs,
                                   extra=self._extra_observers):
            rec.observers.append(o)
            o.install(model, rec, self._stack)  # what it puts on the model is undone on every path
        self._calibration = calibrate(rec, device, self._clock)
        self._attached = True

    def _register(self, mod: nn.Module) -> None:
        _ACTIVE[mod] = weakref.ref(self)
        _HOOKED.add(mod)
        self._keys.append(mod)

    def _unregister(self) -> None:
        keys, self._keys = self._keys, []
        for mod in keys:
            ref = _ACTIVE.get(mod)
            if ref is not None and ref() is self:
                _ACTIVE.pop(mod, None)

    def detach(self) -> None:
        """Remove every wrapper and the generate marker; a second call does nothing."""
        with _LOCK:
            stack, self._stack = self._stack, contextlib.ExitStack()
            self._forwards = []
            try:
                stack.close()
            finally:
                if self._attached:
                    self._attached = False
                    if self._rec is not None:
                        self._rec.close_open_runs("probe detached during generate")
                    self._snapshot = None

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ results
    @property
    def records(self):
        """A frozen :class:`probe.recorder.Records` of everything recorded so far."""
        rec = self._rec
        if rec is None:
            raise ProbeError("this probe was never attached")
        if rec.gen_run is None:
            rec.resolve_events()
        if self._facts is None:
            from ..analysis.facts import model_facts

            self._facts = model_facts(self.model, self.model_id, rec.cuda_device, rec.modules)
        return rec.records(depth=self.depth, compiled=self.compiled, calibration=dict(self._calibration),
                           env=self._facts["env"], config=self._facts["config"], costs=self._facts["costs"])

    @property
    def run(self):
        """A :class:`probe.Run` with the frames of everything recorded so far."""
        from ..analysis.frames import build_run

        rec = self._rec
        if rec is None:
            raise ProbeError("this probe was never attached")
        if self._attached:
            hotpath.check_forwards(self._forwards)
        key = (rec.version, len(rec.cols))
        if self._snapshot is None or self._snapshot_key != key:
            self._snapshot = build_run(self.records)
            self._snapshot_key = key
        return self._snapshot

    @property
    def calls(self):
        return self.run.calls

    @property
    def steps(self):
        return self.run.steps

    @property
    def runs(self):
        return self.run.runs

    def summary(self):
        """Per-block prefill-vs-decode summary (see :meth:`probe.Run.summary`)."""
        return self.run.summary()

    def save(self, path):
        """Save everything recorded so far (see :meth:`probe.Run.save`)."""
        return self.run.save(path)

    def clear(self) -> None:
        """Forget every record (the wrappers stay)."""
        rec = self._rec
        if rec is None:
            return
        if rec.busy():
            raise ProbeError("cannot clear records while a forward or generate call is running")
        rec.clear()
        self._snapshot = None

    @property
    def generate_steps(self) -> int | None:
        """Forward steps the generate call in progress has taken so far; ``None`` when none runs.

        Safe to read from another thread (a progress display): one attribute read, no lock.
        """
        rec = self._rec
        run = rec.gen_run if rec is not None else None
        return run.n_steps_seen if run is not None else None

    @property
    def modules(self) -> list[ModuleInfo]:
        """The recorded modules, in registration order."""
        return list(self._rec.modules) if self._rec is not None else []

    @property
    def calibration(self) -> dict:
        """The wrappers' own cost measured at attach (``call_ns``, ``inside_ns``), kept out of the figures."""
        return dict(self._calibration)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        n = len(self._rec.cols) if self._rec is not None else 0
        runs = len(self._rec.runs) if self._rec is not None else 0
        return f"<probe.Probe {state} depth={self.depth!r} modules={len(self.modules)} calls={n} runs={runs}>"


def _each_generate(timers: HookTimers | None) -> None:
    """What is checked again at each generate: which modules have hooks, new attention functions."""
    if timers is not None:
        timers.sync()
    attnfn.refresh()


def attach(
    model: nn.Module,
    depth: Depth = "blocks",
    *,
    cuda_timing: bool | None = None,
    track_memory: bool | None = None,
    decode_stride: int = 1,
    max_steps: int | None = None,
    model_id: str | None = None,
    rank: int | None = None,
    clock: Callable[[], int] | None = None,
    cuda_graphs: bool = False,
    observers: Iterable[Observer] = (),
    time_hooks: bool = True,
    deep: object = None,
) -> Probe:
    """Record every call of ``model``'s blocks, step by step, until detached.

    Args:
        model: a causal LM (``AutoModelForCausalLM``-like) or any ``nn.Module``.
        depth: ``"blocks"`` (input embedding, each decoder layer, final norm, output head),
            ``"sublayers"`` (adds attention, MLP and norms inside each layer) or ``"all"``
            (every module); at both, the attention function each attention module calls (sdpa,
            eager, flash, ...) is a call of its own inside it, ``<attention>.attention_fn``.
        cuda_timing: record CUDA events per call; default: on when the model has CUDA tensors.
        track_memory: record CUDA allocator counters per call (resets the allocator's peak
            statistic while recording); default: with ``cuda_timing``.
        decode_stride: keep every N-th decode step's block records (steps are always
            counted and timed); stated in the run metadata.
        max_steps: record block calls of at most this many steps per generate call.
        model_id: a name for the model in the run frames (default: ``config.name_or_path``).
        rank: process rank for tensor-parallel runs (default: from ``torch.distributed``).
        clock: integer-nanosecond clock for every time the probe reads (default
            ``time.perf_counter_ns``); an injected clock makes timings exact in tests.
        cuda_graphs: continuous batching (``generate_batch``, ``init_continuous_batching``)
            replays CUDA graphs by default on CUDA, and a replay runs none of the probe's
            wrappers; the probe turns them off while attached (stated in the run). ``True``
            keeps them: serving steps are then timed as a whole, without block records.
        observers: observers of your own (subclasses of
            :class:`probe.recording.observer.Observer`), told of every run and step beside the
            probe's own; each keeps its records and adds its declared columns to the frames.
        time_hooks: a recorded module's forward hooks and pre-hooks (its own and global ones,
            checked at attach and at each ``generate()``) are timed as part of its call, and
            ``calls.hooks_ms`` says how much of it they were; such a module's call is then timed
            around ``_call_impl`` (it runs PyTorch's slow path for its hooks anyway). ``False``
            times ``forward`` alone and leaves hooks to the enclosing call (``hooks_ms`` null).
        deep: make every ``generate()`` call a deep run: on sampled steps every aten op and tensor
            storage is recorded (``run.ops``, ``run.ledger``, ``run.allocations``) and the run is
            left out of every timing figure. ``True``: the prefill step and 3 decode steps spread
            over the run; an int: that many decode steps; a list: those step indices.
    Returns:
        The attached :class:`Probe`; use it as a context manager or call ``detach()``.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``depth`` or a bad option.
        ProbeError: a probe is already attached to this model.
    """
    p = Probe(
        model, depth, cuda_timing=cuda_timing, track_memory=track_memory, decode_stride=decode_stride,
        max_steps=max_steps, model_id=model_id, rank=rank, clock=clock, cuda_graphs=cuda_graphs,
        observers=observers, time_hooks=time_hooks, deep=deep,
    )
    return p._attach()
