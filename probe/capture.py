"""`probe.attach(model)`: forward hooks on the blocks, a generate() marker, a columnar recorder.

The hot path (one pre and one post hook per recorded call) only reads the clock, looks up an
interned shape signature and appends to ``array.array`` columns; everything else (CUDA event
resolution, phases, frames) happens after a generate call or when frames are asked for.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
import weakref
from array import array
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .cache import cache_bytes, cache_seq_len, find_cache
from .discovery import ModuleInfo, select_modules
from .schema import DEPTHS

log = logging.getLogger(__name__)

_now = time.perf_counter_ns


def _load_c_hooks():
    """The optional C hot path; PROBE_PURE_PYTHON=1 forces the Python hooks."""
    import os

    if os.environ.get("PROBE_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _hooks
    except ImportError:
        return None
    return _hooks


_CHooks = _load_c_hooks()

# Every module hooked by a live Probe -> that Probe. Weak, so nothing is added to the model
# and nothing keeps it alive.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Probe]" = weakref.WeakKeyDictionary()
# Every module a probe ever hooked (weak): lets a test's leak guard check them cheaply.
_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

_INPUT_KWARGS = ("hidden_states", "input_ids", "inputs_embeds", "input", "x")


class ProbeError(RuntimeError):
    """A misuse of the probe, with a message that says what to do."""


class CompiledModelWarning(UserWarning):
    """Part of the model ran as compiled code, where per-block hooks do not run as written."""


_COMPILED_ADVICE = (
    "per-block records are missing for steps that ran compiled code (torch.compile traces the "
    "block hooks into its graph instead of running them); step-level timing (forward, outside, "
    "TTFT, TPOT) is still measured. For per-block cost, profile the eager model (e.g. "
    "generate(..., disable_compile=True)); compare its step times with the compiled run's."
)


def _tensor_key(t: Tensor) -> tuple:
    return (t.shape, t.dtype, t.device)


def _in_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes of the positional tensor arguments; without any, of the main keyword input."""
    shapes = tuple(a.shape for a in args if isinstance(a, Tensor)) if args else ()
    if not shapes and kwargs:
        for k in _INPUT_KWARGS:
            v = kwargs.get(k)
            if isinstance(v, Tensor):
                return (v.shape,)
        for v in kwargs.values():
            if isinstance(v, Tensor):
                return (v.shape,)
    return shapes


def _local(x: Any) -> Any:
    """A DTensor's local shard (this rank's shape); anything else as is."""
    return x.to_local() if isinstance(x, Tensor) and hasattr(x, "placements") and hasattr(x, "to_local") else x


def _local_args(args: tuple, kwargs: dict, out: Any) -> tuple[tuple, dict, Any]:
    """Args, kwargs and output with DTensors replaced by their local shards (one level deep)."""
    args = tuple(_local(a) for a in args)
    kwargs = {k: _local(v) for k, v in kwargs.items()}
    if isinstance(out, dict):
        out = {k: _local(v) for k, v in out.items()}
    elif isinstance(out, (tuple, list)):
        out = tuple(_local(v) for v in out)
    else:
        out = _local(out)
    return args, kwargs, out


def _slow_key(args: tuple, kwargs: dict, out: Any) -> tuple:
    """The per-module cache key of a call that is not one tensor in, one tensor out."""
    if isinstance(out, Tensor):
        outs: tuple = (out.shape,)
    elif isinstance(out, (tuple, list)):
        outs = tuple(v.shape for v in out if isinstance(v, Tensor))
    elif isinstance(out, dict):
        outs = tuple(v.shape for v in out.values() if isinstance(v, Tensor))
    else:
        outs = ()
    return (_in_key(args, kwargs), outs)


def _any_dtensor(args: tuple, kwargs: dict, out: Any) -> bool:
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else (out,)
    for group in (args, kwargs.values(), outs):
        for x in group:
            if type(x).__name__ == "DTensor":
                return True
    return False


def _out_key(out: Any) -> tuple:
    if isinstance(out, Tensor):
        return ((out.shape,), out.dtype, out.device)
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        vals = [v for v in out.values() if isinstance(v, Tensor)]
    elif isinstance(out, (tuple, list)):
        vals = [v for v in out if isinstance(v, Tensor)]
    else:
        vals = []
    if not vals:
        return ((), None, None)
    return (tuple(v.shape for v in vals), vals[0].dtype, vals[0].device)


class _Step:
    """One forward of the root model (host-side facts; CUDA events resolved later)."""

    __slots__ = (
        "run", "index", "phase", "q_len", "kv_len", "batch", "t0", "t1", "call0", "call1",
        "ev0", "ev1", "gpu_ms", "kv_bytes", "mem_peak", "kept", "compiled",
    )

    def __init__(self) -> None:
        self.ev0 = self.ev1 = None
        self.gpu_ms = math.nan
        self.kv_bytes: int | None = None
        self.mem_peak: int | None = None
        self.kept = True
        self.compiled = False


class _RunRec:
    """One generate() call, or a stretch of forwards outside generate()."""

    __slots__ = (
        "run_id", "kind", "t_enter", "t_exit", "status", "steps", "input_len", "batch_in",
        "mask", "output_len", "output_rows", "gen_settings", "started_at", "n_steps_seen", "mem_peak",
    )

    def __init__(self, run_id: str, kind: str) -> None:
        self.run_id = run_id
        self.kind = kind
        self.t_enter: int | None = None
        self.t_exit: int | None = None
        self.status = "running"
        self.steps: list[_Step] = []
        self.input_len: int | None = None
        self.batch_in: int | None = None
        self.mask: Any = None
        self.output_len: int | None = None
        self.output_rows: int | None = None  # sequences returned (batch x num_return_sequences)
        self.gen_settings: dict = {}
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.n_steps_seen = 0
        self.mem_peak: int | None = None  # CUDA allocator peak over the whole run


class Probe:
    """Hooks on one model's blocks and the records they produce.

    Create it with :func:`probe.attach`; use it as a context manager or call :meth:`detach`.
    Frames are built on demand from :attr:`run` (a :class:`probe.Run`).
    """

    def __init__(
        self,
        model: nn.Module,
        depth: str = "blocks",
        *,
        cuda_timing: bool | None = None,
        track_memory: bool | None = None,
        decode_stride: int = 1,
        max_steps: int | None = None,
        model_id: str | None = None,
        rank: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"probe.attach needs a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(...)); "
                f"got {type(model).__name__}"
            )
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {', '.join(repr(d) for d in DEPTHS)}; got {depth!r}")
        if decode_stride < 1:
            raise ValueError(f"decode_stride must be >= 1 (keep every N-th decode step); got {decode_stride}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be None or >= 1; got {max_steps}")
        self.model = model
        self.depth = depth
        self.decode_stride = int(decode_stride)
        self.max_steps = max_steps
        self.model_id = model_id
        self.rank = _default_rank() if rank is None else int(rank)
        self._attached = False
        self._handles: list = []
        self._gen_patched = False
        self._infos: list[ModuleInfo] = []
        self._uses_cuda = cuda_timing
        self._track_memory = track_memory
        # columnar call records (one entry per recorded call)
        self._c_t0 = array("q")
        self._c_t1 = array("q")
        self._c_sig = array("i")  # per call: index into _msigs, i.e. (module, signature)
        self._c_ev = array("i")  # index into the CUDA event pairs, CUDA only
        self._c_mem0 = array("q")
        self._c_mem1 = array("q")
        self._c_peak = array("q")
        self._c_off = array("q")  # offload transfer ns per call; with an OffloadClock only
        self._clock = None  # distributed.OffloadClock on accelerate's offloading hooks, if any
        self._placements: list = []  # per recorded module: distributed.Placement
        self._sig_ids: dict = {}
        self._sigs: list = []
        self._msigs: list[tuple[int, int]] = []  # (module index, signature index)
        self._ev_pairs: list = []  # (start, end) events awaiting resolution
        self._ev_ms = array("d")  # resolved gpu ms per event pair index
        self._ev_pool: list = []
        self._stack: list = []
        self._mem_peaks: list[int] = []  # CUDA peak of each running call, innermost last
        self._recording = [True]  # hooks skip steps whose records are dropped (decode_stride, max_steps)
        # steps and runs
        self._runs: list[_RunRec] = []
        self._open_forward: _RunRec | None = None
        self._gen_run: _RunRec | None = None
        self._gen_depth = 0
        self._root_depth = 0
        self._cur_step: _Step | None = None
        self._run_counter = 0
        self._snapshot = None
        self._snapshot_key = None
        self._run_prefix = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{id(self) & 0xFFFF:04x}"
        self.compiled = False  # the model given to attach was a torch.compile wrapper

    # ------------------------------------------------------------------ lifecycle
    def _attach(self) -> "Probe":
        model = self.model
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):  # torch.compile(model) returns an OptimizedModule
            warnings.warn(
                f"probe: {type(orig).__name__} is wrapped by torch.compile; the probe hooks the "
                f"original module. Its generate() runs the eager model; direct calls of the compiled "
                f"module run compiled code, for which {_COMPILED_ADVICE}",
                CompiledModelWarning,
                stacklevel=3,
            )
            self.model = model = orig
            self.compiled = True
        if model in _ACTIVE:
            raise ProbeError(
                "this model already has a probe attached; call .detach() on it (or leave its "
                "`with` block) before attaching another"
            )
        selected = select_modules(model, self.depth)
        for mod, _ in selected:
            if mod in _ACTIVE:
                raise ProbeError(
                    f"module {type(mod).__name__} is already recorded by another probe; detach that probe first"
                )
        if self._uses_cuda is None:
            self._uses_cuda = torch.cuda.is_available() and _has_cuda_tensors(model)
        if self._track_memory is None:
            self._track_memory = bool(self._uses_cuda)
        self._cuda_device = _cuda_device_of(model) if self._uses_cuda else None
        self._stream = torch.cuda.current_stream(self._cuda_device) if self._uses_cuda else None
        try:
            from .distributed import OffloadClock, placements

            self._placements = placements(model, [(info.name, mod) for mod, info in selected])
            self._clock = OffloadClock.install(model)
            self._handles.append(model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._root_post, with_kwargs=True, always_call=True))
            _ACTIVE[model] = self
            _HOOKED.add(model)
            make = self._make_cuda_hooks if self._uses_cuda else self._make_cpu_hooks
            for idx, (mod, info) in enumerate(selected):
                pre, post = make(idx)
                self._handles.append(mod.register_forward_pre_hook(pre))
                # no always_call: a call that raises has no end to record, and its stale
                # stack entry is cleared when the next step starts
                self._handles.append(mod.register_forward_hook(post, with_kwargs=True))
                if self._clock is not None:
                    # registered after the pair above, so they run inside its time window
                    xpre, xpost = self._make_offload_hooks()
                    self._handles.append(mod.register_forward_pre_hook(xpre))
                    self._handles.append(mod.register_forward_hook(xpost))
                self._infos.append(info)
                _ACTIVE[mod] = self
                _HOOKED.add(mod)
            self._patch_generate()
            self._attached = True
        except BaseException:
            self.detach()
            raise
        log.debug("probe attached to %d modules at depth %s", len(self._infos), self.depth)
        return self

    def detach(self) -> None:
        """Remove every hook and the generate marker; a second call does nothing."""
        handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.remove()
            except Exception:  # pragma: no cover - removal of a dead handle
                log.debug("hook handle removal failed", exc_info=True)
        self._unpatch_generate()
        if self._clock is not None:
            self._clock.remove()  # the clock object stays: frames still read its records
        for key in [k for k, v in list(_ACTIVE.items()) if v is self]:
            _ACTIVE.pop(key, None)
        if self._attached:
            self._attached = False
            self._close_open_runs()

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if self._handles:
                self.detach()
        except Exception:
            pass

    # ------------------------------------------------------------------ generate marker
    def _patch_generate(self) -> None:
        model = self.model
        gen = getattr(model, "generate", None)
        if gen is None or not callable(gen):
            return
        had_instance_attr = "generate" in model.__dict__
        original = model.__dict__.get("generate", gen)
        probe_self = self

        @functools.wraps(original)
        def generate(*args, **kwargs):
            try:
                probe_self._begin_generate(args, kwargs)
            except Exception:  # the probe's own failure must never cost the user their generate
                log.warning("probe: could not mark the start of generate(); its forwards are "
                            "recorded as plain forwards", exc_info=True)
                probe_self._abandon_generate()
                return original(*args, **kwargs)
            try:
                out = original(*args, **kwargs)
            except BaseException as exc:
                probe_self._end_generate_quietly(None, f"failed: {type(exc).__name__}: {exc}")
                raise
            probe_self._end_generate_quietly(out, "ok")
            return out

        generate.__probe_wrapper__ = True  # type: ignore[attr-defined]
        self._gen_original = (had_instance_attr, model.__dict__.get("generate"))
        object.__setattr__(model, "generate", generate)
        self._gen_patched = True

    def _unpatch_generate(self) -> None:
        if not self._gen_patched:
            return
        model = self.model
        had, orig = self._gen_original
        current = model.__dict__.get("generate")
        if current is not None and getattr(current, "__probe_wrapper__", False):
            if had:
                object.__setattr__(model, "generate", orig)
            else:
                del model.__dict__["generate"]
        self._gen_patched = False

    def _new_run(self, kind: str) -> _RunRec:
        self._run_counter += 1
        suffix = f"-r{self.rank}" if self.rank else ""
        r = _RunRec(f"{self._run_prefix}-{self._run_counter:03d}{suffix}", kind)
        self._runs.append(r)
        self._snapshot = None
        return r

    def _begin_generate(self, args: tuple, kwargs: dict) -> None:
        self._gen_depth += 1
        if self._gen_depth > 1:
            return
        self._open_forward = None
        run = self._new_run("generate")
        run.t_enter = _now()
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor):
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs")
        emb = kwargs.get("inputs_embeds")
        x = ids if isinstance(ids, Tensor) else emb if isinstance(emb, Tensor) else None
        if x is not None and x.dim() >= 1:
            run.batch_in = int(x.shape[0]) if x.dim() >= 2 else 1
            run.input_len = int(x.shape[1]) if x.dim() >= 2 else int(x.shape[0])
            run.mask = kwargs.get("attention_mask")
        run.gen_settings = _generation_settings(self.model, kwargs)
        if self._uses_cuda and self._track_memory:
            # the run's peak starts here: setup, steps and sampling between steps all count
            torch.cuda.reset_peak_memory_stats(self._cuda_device)
            run.mem_peak = _alloc_stats(self._cuda_device)[0]
        self._gen_run = run

    def _abandon_generate(self) -> None:
        self._gen_depth = max(0, self._gen_depth - 1)
        if self._gen_depth == 0:
            self._gen_run = None

    def _end_generate_quietly(self, out: Any, status: str) -> None:
        try:
            self._end_generate(out, status)
        except Exception:  # keep the user's result (or their exception) whatever happens here
            log.warning("probe: could not close the record of this generate()", exc_info=True)
            self._abandon_generate()

    def _end_generate(self, out: Any, status: str) -> None:
        self._gen_depth -= 1
        if self._gen_depth > 0:
            return
        run = self._gen_run
        self._gen_run = None
        if run is None:
            return
        run.t_exit = _now()
        run.status = status
        seqs = out
        if seqs is not None and not isinstance(seqs, Tensor):
            seqs = getattr(seqs, "sequences", None)
        if isinstance(seqs, Tensor) and seqs.dim() >= 1:
            run.output_len = int(seqs.shape[-1])
            run.output_rows = int(seqs.shape[0]) if seqs.dim() >= 2 else 1
        if self._cur_step is not None and self._root_depth == 0:
            self._cur_step = None
        self._stack.clear()
        self._root_depth = 0
        self._recording[0] = True
        if self._uses_cuda and self._track_memory:
            self._mem_fold_run_peak(run)
        if status == "ok":
            self._resolve_events()
        else:
            self._resolve_quietly()
        self._snapshot = None
        n = sum(1 for st in run.steps if st.compiled)
        if n:
            warnings.warn(f"probe: {n} of {len(run.steps)} steps of this generate() ran compiled code: "
                          f"{_COMPILED_ADVICE}", CompiledModelWarning, stacklevel=3)

    def _close_open_runs(self) -> None:
        if self._gen_run is not None:
            run = self._gen_run
            run.t_exit = _now()
            run.status = "failed: probe detached during generate"
            self._gen_run = None
            self._gen_depth = 0
        self._open_forward = None
        self._recording[0] = True
        self._resolve_quietly()
        self._snapshot = None

    # ------------------------------------------------------------------ root hooks (steps)
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._root_depth += 1
        if self._root_depth > 1:
            return
        t0 = _now()
        self._stack.clear()  # anything left is stale, from a forward interrupted by a BaseException
        run = self._gen_run
        if run is None:
            run = self._open_forward
            if run is None:
                run = self._open_forward = self._new_run("forward")
                run.t_enter = t0
        x = kwargs.get("input_ids")
        if not isinstance(x, Tensor):
            x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("inputs_embeds")
        if isinstance(x, Tensor) and x.dim() >= 2:
            batch, q_len = int(x.shape[0]), int(x.shape[1])
        elif isinstance(x, Tensor) and x.dim() == 1:
            batch, q_len = 1, int(x.shape[0])
        else:
            batch, q_len = 0, 0
        kv_len = self._kv_len(kwargs, q_len, run)
        s = _Step()
        s.run = run
        s.index = run.n_steps_seen
        run.n_steps_seen += 1
        if run.kind == "forward":
            s.phase = "forward"
        elif s.index == 0:
            s.phase = "prefill" if kv_len == 0 else "extend"
        elif q_len == 1:
            s.phase = "decode"
        elif kv_len == 0:
            s.phase = "recompute"
        else:
            s.phase = "extend"
        s.q_len, s.kv_len, s.batch = q_len, kv_len, batch
        s.call0 = len(self._c_t0)
        s.kept = self._keep(s)
        self._cur_step = s
        self._recording[0] = s.kept
        if self._uses_cuda:
            if self._track_memory:
                self._mem_fold_run_peak(run)  # allocations between steps (sampling, cat) count too
                self._mem_peaks.clear()  # stale frames of an interrupted forward
                self._mem_push()
            s.ev0 = self._event()
        s.t0 = _now() if self._uses_cuda else t0

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self._root_depth == 0:
            return
        self._root_depth -= 1
        if self._root_depth > 0:
            return
        t1 = _now()
        s = self._cur_step
        self._cur_step = None
        if s is None:
            return
        s.t1 = t1
        if self._uses_cuda:
            s.ev1 = self._event()
            if self._track_memory:
                s.mem_peak = self._mem_pop_peak()[0]
        self._recording[0] = True
        if not s.kept:
            self._truncate(s.call0)
            s.call1 = s.call0
        else:
            s.call1 = len(self._c_t0)
            if s.call1 == s.call0 and self._infos:
                s.compiled = True  # the forward ran, the block hooks did not: compiled code
            try:
                s.kv_bytes = cache_bytes(find_cache(kwargs, out))
            except Exception:  # an exotic cache must never break the user's forward
                s.kv_bytes = None
        s.run.steps.append(s)
        self._snapshot = None

    def _keep(self, s: _Step) -> bool:
        if self.max_steps is not None and s.index >= self.max_steps:
            return False
        if self.decode_stride > 1 and s.phase == "decode" and (s.index - 1) % self.decode_stride:
            return False
        return True

    def _kv_len(self, kwargs: dict, q_len: int, run: _RunRec) -> int:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[-1] >= q_len:
            return int(mask.shape[-1]) - q_len
        cache = find_cache(kwargs)
        try:
            n = cache_seq_len(cache)
        except Exception:  # an exotic cache must never break the user's forward
            n = None
        if n is not None:
            return n
        pos = kwargs.get("cache_position")
        if isinstance(pos, Tensor) and pos.numel() and pos.device.type == "cpu":
            return int(pos.reshape(-1)[0])
        if run.steps and cache is not None:
            last = run.steps[-1]
            return last.kv_len + last.q_len
        return 0

    def _truncate(self, n: int) -> None:
        for col in (self._c_t0, self._c_t1, self._c_sig):
            del col[n:]
        if self._clock is not None:
            del self._c_off[n:]
        if self._uses_cuda:
            del self._c_ev[n:]
            if self._track_memory:
                del self._c_mem0[n:], self._c_mem1[n:], self._c_peak[n:]

    # ------------------------------------------------------------------ module hooks
    def _make_cpu_hooks(self, idx: int) -> tuple[Callable, Callable]:
        if _CHooks is not None:
            # the same work in C (probe/_hooks.c): no interpreter cost per recorded call
            rec = _CHooks.Recorder(
                now=_now, tensor=Tensor, intern=functools.partial(self._intern, idx), slow_key=_slow_key,
                t0_append=self._c_t0.append, t1_append=self._c_t1.append, sig_append=self._c_sig.append,
                recording=self._recording,
            )
            return rec.pre, rec.post
        return self._make_py_hooks(idx)

    def _make_py_hooks(self, idx: int) -> tuple[Callable, Callable]:
        """The reference implementation of the CPU hooks (used where the C extension is not built)."""
        now = _now
        t0s, t1s, sigs = self._c_t0.append, self._c_t1.append, self._c_sig.append
        local: dict = {}  # this module's (input shape, output shape) -> (module, signature) id
        intern = functools.partial(self._intern, idx)
        rec = self._recording
        t0 = 0  # a module is never re-entered while running, so one start slot per module suffices

        def pre(module, args):
            nonlocal t0
            t0 = now()

        def post(module, args, kwargs, out):
            t1 = now()
            if not rec[0]:
                return  # a step whose block records are dropped (decode_stride / max_steps)
            # Fast path: one positional tensor in, one tensor out (every block of a decoder).
            if len(args) == 1 and type(out) is Tensor and type(args[0]) is Tensor:
                key = (args[0].shape, out.shape)
            else:
                key = _slow_key(args, kwargs, out)
            sid = local.get(key)
            if sid is None:
                sid = local[key] = intern(args, kwargs, out)
            t0s(t0)
            t1s(t1)
            sigs(sid)

        return pre, post

    def _make_cuda_hooks(self, idx: int) -> tuple[Callable, Callable]:
        push = self._stack.append
        pop = self._stack.pop
        now = _now
        event = self._event
        track = self._track_memory
        mem_push, mem_pop = self._mem_push, self._mem_pop_peak
        pairs = self._ev_pairs
        local: dict = {}
        intern = functools.partial(self._intern, idx)
        rec = self._recording  # [bool]: False during a step whose records are dropped anyway

        def pre(module, args):
            if not rec[0]:
                return
            # allocator read first, then the clock and the start event: the read stays outside
            # the call's window
            m0 = mem_push() if track else 0
            push((now(), event(), m0))

        def post(module, args, kwargs, out):
            if not rec[0]:
                return
            ev1 = event()
            t1 = now()
            t0, ev0, m0 = pop()
            if len(args) == 1 and type(out) is Tensor and type(args[0]) is Tensor:
                key = (args[0].shape, out.shape)
            else:
                key = (_in_key(args, kwargs), _out_key(out)[0])
            sid = local.get(key)
            if sid is None:
                sid = local[key] = intern(args, kwargs, out)
            self._c_t0.append(t0)
            self._c_t1.append(t1)
            self._c_sig.append(sid)
            self._c_ev.append(len(pairs))
            pairs.append((ev0, ev1))
            if track:
                peak, m1 = mem_pop()
                self._c_mem0.append(m0)
                self._c_mem1.append(m1)
                self._c_peak.append(peak)

        return pre, post

    def _make_offload_hooks(self) -> tuple[Callable, Callable]:
        """Hooks recording the offload transfer time inside each call (nested calls included)."""
        total = self._clock.total_ns
        offs = self._c_off.append
        x0 = 0  # as in _make_cpu_hooks: a module is never re-entered while running

        def pre(module, args):
            nonlocal x0
            x0 = total[0]

        def post(module, args, out):
            offs(total[0] - x0)

        return pre, post

    def _intern(self, idx: int, args: tuple, kwargs: dict, out: Any) -> int:
        """A new (module, signature) id; a signature is input shapes, output shapes, output
        dtype and device.

        Called once per distinct (module, input shape, output shape); dtype and device are
        taken from that first call (a module does not change them between calls of the same
        shapes), which keeps them out of the per-call hot path. One id per call names both the
        module and its signature, so the hot path appends one column fewer. A DTensor (torch
        tensor parallel with ``use_local_output=False``) is recorded by its local shard: each
        rank's frames show the rank's own shapes, as with transformers' ``tp_plan``.
        """
        if _any_dtensor(args, kwargs, out):
            args, kwargs, out = _local_args(args, kwargs, out)
        key = (_in_key(args, kwargs), _out_key(out))
        sid = self._sig_ids.get(key)
        if sid is None:
            sid = len(self._sigs)
            self._sig_ids[key] = sid
            self._sigs.append(key)
        self._msigs.append((idx, sid))
        return len(self._msigs) - 1

    # ------------------------------------------------------------------ CUDA helpers
    def _event(self):
        pool = self._ev_pool
        ev = pool.pop() if pool else torch.cuda.Event(enable_timing=True)
        ev.record(self._stream)  # the model's device, whatever the current device is
        return ev

    def _mem_fold_run_peak(self, run: _RunRec) -> None:
        peak = _alloc_stats(self._cuda_device)[1]
        if run.mem_peak is None or peak > run.mem_peak:
            run.mem_peak = peak

    def _mem_push(self) -> int:
        # Fold the allocator's peak so far into the enclosing call, then restart the peak
        # counter so this call's own peak can be read at its end.
        dev = self._cuda_device
        peaks = self._mem_peaks
        cur, peak = _alloc_stats(dev)
        if peaks and peak > peaks[-1]:
            peaks[-1] = peak
        torch.cuda.reset_peak_memory_stats(dev)
        peaks.append(cur)
        return cur

    def _mem_pop_peak(self) -> tuple[int, int]:
        """(this call's peak, allocated now)."""
        peaks = self._mem_peaks
        cur, peak = _alloc_stats(self._cuda_device)
        mine = max(peaks.pop() if peaks else 0, peak)
        if peaks and mine > peaks[-1]:
            peaks[-1] = mine
        return mine, cur

    def _resolve_events(self) -> None:
        """Turn recorded CUDA event pairs into milliseconds; once per run, never in a hook."""
        if not self._uses_cuda:
            return
        steps = [s for r in self._runs for s in r.steps if s.ev0 is not None and s.ev1 is not None]
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

    def _resolve_quietly(self) -> None:
        """Resolve on a failure path: the probe's own CUDA error must not replace the user's."""
        try:
            self._resolve_events()
        except Exception:
            log.debug("CUDA event resolution failed", exc_info=True)

    # ------------------------------------------------------------------ results
    @property
    def run(self):
        """A :class:`probe.Run` with the frames of everything recorded so far."""
        from .frames import build_run

        key = (len(self._c_t0), sum(len(r.steps) for r in self._runs), len(self._runs))
        if self._snapshot is None or self._snapshot_key != key:
            if self._gen_run is None:
                self._resolve_events()
            self._snapshot = build_run(self)
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
        """Forget every record (the hooks stay)."""
        if self._gen_run is not None or self._root_depth:
            raise ProbeError("cannot clear records while a forward or generate call is running")
        self._resolve_events()
        self._truncate(0)  # signatures stay: the hooks' local caches refer to them
        self._ev_pairs.clear()
        del self._ev_ms[:]
        self._runs.clear()
        self._open_forward = None
        self._snapshot = None

    @property
    def modules(self) -> list[ModuleInfo]:
        """The recorded modules, in registration order."""
        return list(self._infos)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"<probe.Probe {state} depth={self.depth!r} modules={len(self._infos)} "
            f"calls={len(self._c_t0)} runs={len(self._runs)}>"
        )


def attach(
    model: nn.Module,
    depth: str = "blocks",
    *,
    cuda_timing: bool | None = None,
    track_memory: bool | None = None,
    decode_stride: int = 1,
    max_steps: int | None = None,
    model_id: str | None = None,
    rank: int | None = None,
) -> Probe:
    """Put forward hooks on ``model``'s blocks and record every call of every step.

    Args:
        model: a causal LM (``AutoModelForCausalLM``-like) or any ``nn.Module``.
        depth: ``"blocks"`` (input embedding, each decoder layer, final norm, output head),
            ``"sublayers"`` (adds attention, MLP and norms inside each layer) or ``"all"``
            (every module).
        cuda_timing: record CUDA events per call; default: on when the model has CUDA tensors.
        track_memory: record CUDA allocator counters per call (resets the allocator's peak
            statistic while recording); default: with ``cuda_timing``.
        decode_stride: keep every N-th decode step's block records (steps are always
            counted and timed); stated in the run metadata.
        max_steps: record block calls of at most this many steps per generate call.
        model_id: a name for the model in the run frames (default: ``config.name_or_path``).
        rank: process rank for tensor-parallel runs (default: from ``torch.distributed``).
    Returns:
        The attached :class:`Probe`; use it as a context manager or call ``detach()``.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``depth`` or a bad option.
        ProbeError: a probe is already attached to this model.
    """
    p = Probe(
        model,
        depth,
        cuda_timing=cuda_timing,
        track_memory=track_memory,
        decode_stride=decode_stride,
        max_steps=max_steps,
        model_id=model_id,
        rank=rank,
    )
    return p._attach()


def _alloc_stats(dev) -> tuple[int, int]:
    """(allocated now, allocator peak) in one C call.

    ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` each flatten the allocator's
    whole statistics dict in Python (~100 us); the nested dict is one native call.
    """
    a = torch.cuda.memory_stats_as_nested_dict(dev).get("allocated_bytes", {}).get("all", {})
    return int(a.get("current", 0)), int(a.get("peak", 0))


def _default_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover
        pass
    return 0


def _has_cuda_tensors(model: nn.Module) -> bool:
    for t in model.parameters():
        if t.is_cuda:
            return True
    for t in model.buffers():
        if t.is_cuda:
            return True
    return False


def _cuda_device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        if t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())


_GEN_KEYS = (
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "min_p", "repetition_penalty", "use_cache", "cache_implementation",
    "num_return_sequences", "num_assistant_tokens", "prompt_lookup_num_tokens", "eos_token_id",
    "pad_token_id",
)


def _generation_settings(model: nn.Module, kwargs: dict) -> dict:
    """The generation settings in effect: kwargs over the generation config, JSON-able."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    out: dict = {}
    for k in _GEN_KEYS:
        v = kwargs[k] if k in kwargs else getattr(cfg, k, None)
        if isinstance(v, Tensor):
            v = v.tolist() if v.numel() < 64 else f"tensor{list(v.shape)}"
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
        else:
            out[k] = repr(v)
    out["assisted"] = any(kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens"))
    out["streamer"] = type(kwargs["streamer"]).__name__ if kwargs.get("streamer") is not None else None
    out["user_cache"] = (kwargs.get("past_key_values") or kwargs.get("cache")) is not None
    return out
