"""The recorder: the step/phase state machine, the call columns and what resolves them.

It owns everything a recording is made of — runs (one per ``generate()`` call, or a stretch of
plain forwards), steps (one per root forward, with its phase decided from shapes alone), the
call columns the hot path appends to, interned shape signatures, the CUDA event pool and the
allocator-counter stack (:mod:`probe.recording.extras`) — and hands a plain frozen
:class:`Records` to the frame builder. It knows nothing about how it is attached to a model
(that is :mod:`probe.capture.lifecycle`), nor about what its observers keep beside it: it knows
only their interface (:mod:`probe.recording.observer`), tells them when runs and steps begin
and end — outside the windows it times — and hands each one's frozen records on in
``Records.observed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import Tensor

from . import hotpath
from .cache import cache_bytes, cached_len, find_cache
from .discovery import ModuleInfo
from .generation import hold_generated
from .extras import CallExtras
from .observer import Observer, RunRec, StepRec, notify_all
from ..schema import Phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Records:
    """Everything recorded so far, as plain data: what :func:`probe.frames.build_run` reads."""

    t0: np.ndarray  # int64 ns, per call
    t1: np.ndarray
    msig: np.ndarray  # int32 per call: index into msigs
    inner: np.ndarray  # int32 per call: calls recorded while it ran
    msigs: list  # (module index, signature index)
    sigs: list  # ((in shapes), (out shapes, dtype, device))
    modules: list[ModuleInfo]
    placements: list
    runs: list[RunRec]
    gpu_ms: np.ndarray | None  # per call, CUDA only
    mem: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # before, after, peak per call
    offload_ns: np.ndarray | None  # per call, with accelerate offloading only
    rank: int
    depth: str
    decode_stride: int
    max_steps: int | None
    compiled: bool
    calibration: dict
    env: dict = field(default_factory=dict)
    config: dict | None = None
    costs: dict | None = None  # probe.cost.module_costs of the recorded modules
    dropped_calls: int = 0  # calls left out because recording them raised (hotpath.dropped)
    #: calls of modules with forward hooks, timed whole (probe.recording.hooktime): int64 rows of
    #: (module index, first row recorded inside, row after the last, t0, t1); None: not timed
    hooked: np.ndarray | None = None
    #: per registered observer, in order: (its class, its frozen records), for its own frames
    observed: tuple = ()
    #: int32 per call: ns the wrapper spent recording it after its window closed, read in place
    #: (the C wrapper on its own clock); 0 where not read (the calibration's figure stands in)
    post: np.ndarray | None = None


class Recorder:
    """Step/phase state machine and columns of one probe."""

    def __init__(self, *, rank: int, decode_stride: int, max_steps: int | None, cuda_device=None,
                 track_memory: bool = False, offload_total=None, now: Callable[[], int] | None = None,
                 native: bool = True) -> None:
        self.rank = rank
        self.decode_stride = decode_stride
        self.max_steps = max_steps
        self.extras = CallExtras(cuda_device, track_memory, offload_total)
        self.now = now or time.perf_counter_ns
        self.injected_clock = now is not None
        self.cols = hotpath.new_columns(native and not self.injected_clock)
        self.modules: list[ModuleInfo] = []
        self.placements: list = []
        # (module index, signature) per (module, signature) id, in the order first seen: the hot
        # path appends (the C wrapper itself, or through intern); msigs/sigs are made from it
        self.interned: list[tuple[int, tuple]] = []
        self._sig_ids: dict = {}
        self.sigs: list = []
        self.msigs: list[tuple[int, int]] = []
        # runs and steps
        self.runs: list[RunRec] = []
        self._open_forward: RunRec | None = None
        self.gen_run: RunRec | None = None
        self._gen_depth = 0
        self.root_depth = 0
        self._cur_step: StepRec | None = None
        self._cur_owner: Observer | None = None  # the observer that claimed the open step, if one did
        self._run_counter = 0
        self._run_prefix = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{id(self) & 0xFFFF:04x}"
        self.observers: list[Observer] = []  # told of run and step boundaries (probe.observer)
        self._unresolved: list[StepRec] = []  # steps with CUDA events not yet turned into ms
        # (module index, n0, n1, t0, t1) per call timed with its hooks (probe.recording.hooktime),
        # in the order they ended (n1 never decreases); None: hooks are not timed
        self.hooked: list[tuple] | None = None
        self.version = 0  # bumped on every change the frames can see

    # ------------------------------------------------------------------ modules and signatures
    @property
    def needs_full_wrappers(self) -> bool:
        return self.extras.needed

    # what the per-call extras were set up with (probe.extras owns them)
    cuda_device = property(lambda self: self.extras.cuda_device)
    uses_cuda = property(lambda self: self.extras.uses_cuda)
    track_memory = property(lambda self: self.extras.track_memory)
    offload_total = property(lambda self: self.extras.offload_total)  # array('q', [ns]) of an OffloadClock

    def intern_for(self, idx: int) -> Callable:
        def intern(args: tuple, kwargs: dict, out: Any) -> int:
            return self.intern(idx, args, kwargs, out)

        return intern

    def intern(self, idx: int, args: tuple, kwargs: dict, out: Any) -> int:
        """A new (module, signature) id; a signature is input shapes, output shapes, output
        dtype and device, taken from the first call of each distinct (input, output) shape
        (a module does not change them between calls of the same shapes). A DTensor (tensor
        parallel) is recorded by its local shard: each rank's frames show its own shapes.
        The C wrapper appends what it builds itself to the same list (:attr:`interned`)."""
        if len(args) == 1 and type(out) is Tensor and type(args[0]) is Tensor:
            # one plain tensor in, one out (most modules): what in_key and out_key would give
            key = ((args[0].shape,), ((out.shape,), out.dtype, out.device))
        else:
            if hotpath.any_dtensor(args, kwargs, out):
                args, kwargs, out = hotpath.local_call(args, kwargs, out)
            key = (hotpath.in_key(args, kwargs), hotpath.out_key(out))
        self.interned.append((idx, key))
        return len(self.interned) - 1

    def _resolve_signatures(self) -> None:
        """``msigs``/``sigs`` up to date with :attr:`interned` (equal signatures share an index)."""
        interned, msigs, sigs, sig_ids = self.interned, self.msigs, self.sigs, self._sig_ids
        for i in range(len(msigs), len(interned)):
            idx, key = interned[i]
            sid = sig_ids.get(key)
            if sid is None:
                sid = sig_ids[key] = len(sigs)
                sigs.append(key)
            msigs.append((idx, sid))

    # ------------------------------------------------------------------ runs
    def new_run(self, kind: str) -> RunRec:
        self._run_counter += 1
        suffix = f"-r{self.rank}" if self.rank else ""
        r = RunRec(f"{self._run_prefix}-{self._run_counter:03d}{suffix}", kind)
        self.runs.append(r)
        self.version += 1
        return r

    def begin_generate(self, batch: int | None, input_len: int | None, mask: Any, prompt_in_output: bool,
                       settings: dict, entered: int | None = None) -> None:
        """A generate() call opens a run (a nested call records into its caller's). ``entered``:
        the clock at the first statement of the generate wrapper, where the run's window opens
        as a stopwatch around the call would (default: now); the probe's work from there until
        generate's own code runs is the run's ``probe_start_ns``."""
        self._gen_depth += 1
        if self._gen_depth > 1:
            return
        self._open_forward = None
        run = self.new_run("generate")
        run.batch_in, run.input_len, run.mask = batch, input_len, mask
        run.prompt_in_output = prompt_in_output
        run.gen_settings = settings
        for o in self.observers:
            o.run_begin(run)  # the probe's work, stated apart as probe_start_ns
        self.extras.run_begin(run)
        self.gen_run = run
        started = self.now()
        run.t_enter = entered if entered is not None else started
        run.probe_start_ns = started - run.t_enter

    def abandon_generate(self) -> None:
        self._gen_depth = max(0, self._gen_depth - 1)
        if self._gen_depth == 0:
            self.gen_run = None
            notify_all(self.observers, "run_end", None)

    def end_generate(self, out: Any, status: str) -> RunRec | None:
        """Close the outermost generate(); returns its run (None for a nested call)."""
        self._gen_depth -= 1
        if self._gen_depth > 0:
            return None
        run, self.gen_run = self.gen_run, None
        if run is None:
            return None
        closing = self.now()  # the closing reads (~13-18 µs cold) are inside the run, as in a stopwatch's
        notify_all(self.observers, "run_closing", run)
        run.t_exit = self.now()
        run.probe_end_ns, run.status = run.t_exit - closing, status
        notify_all(self.observers, "run_end", run)
        seqs = out
        if seqs is not None and not isinstance(seqs, Tensor):
            seqs = getattr(seqs, "sequences", None)
        if isinstance(seqs, Tensor) and seqs.dim() >= 1:
            run.output_len = int(seqs.shape[-1])
            run.output_rows = int(seqs.shape[0]) if seqs.dim() >= 2 else 1
            # after the clock stopped: what was generated, kept with the run (a few ints a token)
            start = run.input_len if run.prompt_in_output and run.input_len is not None else 0
            run.output_ids, run.output_held = hold_generated(seqs, start, run.output_rows)
        self._reset_step_state()
        self.extras.run_end(run)
        if status == "ok":
            self.resolve_events()
        else:
            self.resolve_quietly()
        self.version += 1
        return run

    def close_open_runs(self, reason: str) -> None:
        if self.gen_run is not None:
            run = self.gen_run
            run.t_exit = self.now()
            run.status = f"failed: {reason}"
            self.gen_run = None
            self._gen_depth = 0
        for o in self.observers:
            o.stop(reason)
        self._open_forward = None
        self._reset_step_state()
        self.resolve_quietly()
        self.version += 1

    def open_run(self, kind: str) -> RunRec:
        """A run an observer opens for the forwards it will claim (a serving loop's)."""
        self._open_forward = None
        run = self.new_run(kind)
        run.t_enter = self.now()
        return run

    def close_run(self, run: RunRec, status: str) -> None:
        """Close a run an observer opened."""
        run.t_exit = self.now()
        run.status = status
        if self._cur_step is not None and self._cur_step.run is run:
            self._reset_step_state()
        self.resolve_quietly()
        self.version += 1

    @staticmethod
    def new_step(run: RunRec) -> StepRec:
        return StepRec(run)

    def add_step(self, s: StepRec) -> None:
        """A step an observer timed itself: its forward ran no wrapper (a CUDA-graph replay)."""
        s.call0 = s.call1 = len(self.cols)
        s.run.steps.append(s)
        self.version += 1

    def _reset_step_state(self) -> None:
        self._cur_step = self._cur_owner = None
        self.root_depth = 0
        self.extras.reset()
        self.cols.recording = True

    # ------------------------------------------------------------------ steps
    def step_begin(self, args: tuple, kwargs: dict) -> None:
        """Before a root forward: open a step, decide its phase from shapes alone."""
        self.root_depth += 1
        if self.root_depth > 1:
            return
        opened = self.now()
        owner = run = None
        for o in self.observers:
            run = o.claim()
            if run is not None:
                owner = o
                break
        if run is None:
            run = self.gen_run if self.gen_run is not None else self._open_forward
        fresh = run is None
        if fresh:
            run = self._open_forward = self.new_run("forward")
        s = StepRec(run)
        s.opened = opened
        if owner is not None:
            owner.shape(s)
        else:
            batch, q_len = _batch_and_q_len(args, kwargs)
            last = run.steps[-1] if run.steps else None
            kv_len = cached_len(kwargs, q_len, last.kv_len + last.q_len if last is not None else None)
            s.phase = phase_of(run.kind, s.index, q_len, kv_len)
            s.q_len, s.kv_len, s.batch = q_len, kv_len, batch
        s.call0 = len(self.cols)
        s.kept = self._keep(s)
        self._cur_step, self._cur_owner = s, owner
        for o in self.observers:
            o.step_begin(s)  # before the clock starts: their bookkeeping is the probe's, not the forward's
        self.cols.recording = s.kept
        if self.uses_cuda:
            s.ev0 = self.extras.step_begin(run)
        # CPU time goes beside wall time only on the real clock: an injected clock has no CPU time
        s.cpu0 = time.process_time_ns() if not self.injected_clock else None
        s.t0 = self.now()
        if fresh:
            run.t_enter = s.t0  # a stretch of plain forwards starts with its first forward

    def step_end(self, kwargs: dict, out: Any, error: BaseException | None = None) -> None:
        """After a root forward (also when it raised, KeyboardInterrupt included)."""
        if self.root_depth == 0:
            return
        self.root_depth -= 1
        if self.root_depth > 0:
            return
        t1 = self.now()
        s, self._cur_step = self._cur_step, None
        owner, self._cur_owner = self._cur_owner, None
        if s is None:
            return
        s.t1 = t1
        s.cpu_ns = time.process_time_ns() - s.cpu0 if s.cpu0 is not None else None
        if error is not None:
            s.status = f"failed: {type(error).__name__}"
        if self.uses_cuda:
            self.extras.step_end(s)
            if s.ev0 is not None:
                self._unresolved.append(s)
        self.cols.recording = True
        if not s.kept:
            self._truncate(s.call0)
            s.call1 = s.call0
        else:
            s.call1 = len(self.cols)
            if s.call1 == s.call0 and self.modules and error is None:
                s.compiled = True  # the forward ran, the block wrappers did not: compiled code
            if error is None and owner is None:  # a claimed step's cache is its owner's to read
                try:
                    s.kv_bytes = cache_bytes(find_cache(kwargs, out))
                except Exception:  # an exotic cache must never break the user's forward
                    s.kv_bytes = None
        s.run.steps.append(s)
        notify_all(self.observers, "step_end", s, kwargs, out, error)
        self.version += 1

    def _keep(self, s: StepRec) -> bool:
        if self.max_steps is not None and s.index >= self.max_steps:
            return False
        if self.decode_stride > 1 and s.phase == "decode" and (s.index - 1) % self.decode_stride:
            return False
        return True

    def _truncate(self, n: int) -> None:
        self.cols.truncate(n)
        self.extras.truncate(n)
        hooked = self.hooked
        if hooked:
            k = len(hooked)
            while k and hooked[k - 1][2] > n:
                k -= 1
            del hooked[k:]  # in place: the timed calls append to this list

    # ------------------------------------------------------------------ results
    def resolve_events(self) -> None:
        """Turn recorded CUDA event pairs into milliseconds; once per run, never per call."""
        if self.uses_cuda:
            # only the steps recorded since the last resolve (walking every run's steps made each
            # generate's end grow with the session); kept until resolved, so a failed resolve retries
            self.extras.resolve([s for s in self._unresolved if s.ev0 is not None and s.ev1 is not None])
            self._unresolved = []

    def resolve_quietly(self) -> None:
        """Resolve on a failure path: the probe's own CUDA error must not replace the user's."""
        try:
            self.resolve_events()
        except Exception:
            log.debug("CUDA event resolution failed", exc_info=True)

    def busy(self) -> bool:
        return self.gen_run is not None or self.root_depth > 0 or any(o.busy() for o in self.observers)

    def clear(self) -> None:
        """Forget every record (signatures stay: the wrappers' caches refer to them)."""
        self.resolve_events()
        self.cols.truncate(0)
        self.cols.dropped = 0
        if self.hooked:
            del self.hooked[:]
        self.extras.clear()
        self.runs.clear()
        for o in self.observers:
            o.clear()
        self._open_forward = None
        self.version += 1

    def records(self, **facts: Any) -> Records:
        """A frozen copy of everything recorded so far (``facts``: the probe's own fields)."""
        n = len(self.cols)
        t0b, t1b, sigb, innerb, postb = self.cols.columns()
        self._resolve_signatures()
        gpu, mem, off = self.extras.arrays(n)
        observed = tuple((type(o), o.records()) for o in self.observers)
        hooked = None
        if self.hooked is not None:
            rows = [h for h in self.hooked if h[2] <= n]
            hooked = np.array(rows, dtype=np.int64).reshape(-1, 5)
        return Records(
            t0=np.frombuffer(t0b, dtype=np.int64, count=n),
            t1=np.frombuffer(t1b, dtype=np.int64, count=n),
            msig=np.frombuffer(sigb, dtype=np.int32, count=n),
            inner=np.frombuffer(innerb, dtype=np.int32, count=n),
            post=np.frombuffer(postb, dtype=np.int32, count=n),
            msigs=list(self.msigs), sigs=list(self.sigs), modules=list(self.modules),
            placements=list(self.placements), runs=list(self.runs), gpu_ms=gpu, mem=mem, offload_ns=off,
            rank=self.rank, decode_stride=self.decode_stride, max_steps=self.max_steps, observed=observed,
            dropped_calls=self.cols.dropped, hooked=hooked, **facts,
        )


def _batch_and_q_len(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(batch, query length) of a root forward, from its token ids or embeddings."""
    x = kwargs.get("input_ids")
    if not isinstance(x, Tensor):
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("inputs_embeds")
    if isinstance(x, Tensor) and x.dim() >= 2:
        return int(x.shape[0]), int(x.shape[1])
    if isinstance(x, Tensor) and x.dim() == 1:
        return 1, int(x.shape[0])
    return 0, 0


def phase_of(kind: str, index: int, q_len: int, kv_len: int) -> Phase:
    """The phase of a step, from shapes alone (see :data:`probe.schema.PHASES`)."""
    if kind == "forward":
        return "forward"
    if index == 0:
        return "prefill" if kv_len == 0 else "extend"
    if q_len == 1:
        return "decode"
    if kv_len == 0:
        return "recompute"
    return "extend"

