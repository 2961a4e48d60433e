"""The hot path: one forward wrapper per recorded module, and what it appends to.

Mechanism, chosen by measurement (``benchmarks/overhead.py``): any forward hook on a module
sends ``nn.Module._call_impl`` down its slow path (hook dicts walked, kwargs copied, results
checked), which alone costs more per call than everything the probe records. A wrapper stored
as the instance's ``forward`` keeps the fast path — ``_call_impl`` calls ``self.forward`` —
and records the call from inside it. On CPU the wrapper is the C type ``probe.recording._hooks.Wrapper``
(no interpreter frame per call); :func:`cpu_wrapper` is its Python reference, used without the
extension or with ``PROBE_PURE_PYTHON=1`` (a test checks that both record identical frames).
CUDA runs (events, allocator counters) and accelerate offloading (transfer clock) use
:func:`full_wrapper`, whose extra work dwarfs the interpreter's.

Each recorded call appends four numbers to the columns: host start and end (ns), the
(module, signature) id, and how many calls were recorded while it ran (its recorded
descendants: the frame builder derives nesting and self time from it).
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import time
import warnings
from array import array
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_INPUT_KWARGS = ("hidden_states", "input_ids", "inputs_embeds", "input", "x")


def _load_c() -> Any:
    if os.environ.get("PROBE_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _hooks
    except ImportError:
        return None
    if not (hasattr(_hooks, "Wrapper") and hasattr(_hooks, "Columns")):  # a stale in-place build
        return None
    return _hooks


C = _load_c()


class PyColumns:
    """The Python reference of ``probe.recording._hooks.Columns``."""

    __slots__ = ("t0", "t1", "sig", "inner", "post", "recording", "dropped")

    def __init__(self) -> None:
        self.t0, self.t1 = array("q"), array("q")
        self.sig, self.inner, self.post = array("i"), array("i"), array("i")
        self.recording = True
        self.dropped = 0  # calls left out because recording them raised (the forward itself ran)

    def __len__(self) -> int:
        return len(self.t0)

    def append(self, t0: int, t1: int, sig: int, inner: int, post: int = 0) -> None:
        self.t0.append(t0)
        self.t1.append(t1)
        self.sig.append(sig)
        self.inner.append(inner)
        self.post.append(post)  # 0: not read

    def truncate(self, n: int) -> None:
        for col in (self.t0, self.t1, self.sig, self.inner, self.post):
            del col[n:]

    def columns(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        return self.t0.tobytes(), self.t1.tobytes(), self.sig.tobytes(), self.inner.tobytes(), self.post.tobytes()


def new_columns(native: bool = True):
    return C.Columns() if (native and C is not None) else PyColumns()


# ---------------------------------------------------------------------- signatures
def in_key(args: tuple, kwargs: dict) -> tuple:
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


def _out_tensors(out: Any) -> list:
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [v for v in out.values() if isinstance(v, Tensor)]
    return [v for v in out if isinstance(v, Tensor)] if isinstance(out, (tuple, list)) else []


def out_key(out: Any) -> tuple:
    """(output shapes, dtype, device) of a call's output; dtype/device of its first tensor."""
    if isinstance(out, Tensor):
        return ((out.shape,), out.dtype, out.device)
    vals = _out_tensors(out)
    return (tuple(v.shape for v in vals), vals[0].dtype, vals[0].device) if vals else ((), None, None)


def out_shapes(out: Any) -> tuple:
    """The output shapes of :func:`out_key`, without its dtype and device."""
    return (out.shape,) if isinstance(out, Tensor) else tuple(v.shape for v in _out_tensors(out))


def slow_key(args: tuple, kwargs: dict, out: Any) -> tuple:
    """The per-module cache key of a call that is not exact tensors in and out."""
    return (in_key(args, kwargs), out_shapes(out))


def local_shard(x: Any) -> Any:
    """A DTensor's local shard (this rank's shape); anything else as is."""
    return x.to_local() if isinstance(x, Tensor) and hasattr(x, "placements") and hasattr(x, "to_local") else x


def local_call(args: tuple, kwargs: dict, out: Any) -> tuple[tuple, dict, Any]:
    """Args, kwargs and output with DTensors replaced by their local shards (one level deep)."""
    args = tuple(local_shard(a) for a in args)
    kwargs = {k: local_shard(v) for k, v in kwargs.items()}
    if isinstance(out, dict):
        out = {k: local_shard(v) for k, v in out.items()}
    elif isinstance(out, (tuple, list)):
        out = tuple(local_shard(v) for v in out)
    else:
        out = local_shard(out)
    return args, kwargs, out


def any_dtensor(args: tuple, kwargs: dict, out: Any) -> bool:
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else (out,)
    for group in (args, kwargs.values(), outs):
        for x in group:
            if type(x).__name__ == "DTensor":
                return True
    return False


# ---------------------------------------------------------------------- wrappers
class PartialWrapper(functools.partial):
    """A recorded module's forward in Python: a ``functools.partial`` of the original forward
    with no bound arguments, whose call records. Being a partial is what keeps the probe out of
    compiled code: torch.compile traces a partial as a call of its ``.func``, so a compiled
    graph holds the module's own forward and nothing of the probe (the C wrapper is a partial
    for the same reason)."""

    __probe_wrapper__ = True

    def __reduce__(self):  # pickle.dumps(model), copy.deepcopy(model): say what to do
        raise TypeError(ATTACHED)

    def __reduce_ex__(self, protocol):
        raise TypeError(ATTACHED)

    def __deepcopy__(self, memo):
        raise TypeError(ATTACHED)

    def __new__(cls, fn: Callable, impl: Callable):
        self = super().__new__(cls, fn)
        self._impl = impl
        return self

    # Calling the wrapper calls ``impl`` directly: the type's ``__call__`` is a C descriptor that
    # hands back the instance's ``impl``, so no Python frame of this class runs per call.
    __call__ = property(operator.attrgetter("_impl"))

    @property
    def __wrapped__(self) -> Callable:  # inspect.signature and unwrap see the original
        return self.func

    def __getattr__(self, name: str) -> Any:  # __name__, __doc__, __func__ ... of the original
        return getattr(self.func, name)


#: Why an attached model cannot be copied or pickled, and what to do (the C wrapper says the same).
ATTACHED = ("probe: a model cannot be copied or pickled while a probe is attached to it (its wrappers hold the "
            "live recording); detach first - probe.detach(model), or leave the `with probe.attach(...)` block - "
            "then copy or pickle it")


def dropped(cols, exc: Exception) -> None:
    """The probe's own work failed while recording a call (a clock, the signature key,
    interning): that one record is left out and the first such failure of ``cols`` warns. The
    C wrapper does the same; ``KeyboardInterrupt`` and other ``BaseException`` subclasses are never
    caught, so they propagate from both."""
    cols.dropped += 1
    if cols.dropped == 1:
        try:
            warnings.warn(f"probe: a module call could not be recorded and is left out of the run "
                          f"({type(exc).__name__}: {exc}); the forward itself ran normally", RuntimeWarning,
                          stacklevel=3)
        except Exception:  # warnings turned into errors: the forward still must not fail
            pass


def _recorder(cols, intern: Callable, now: Callable[[], int] | None) -> Callable:
    """``record(args, kwargs, out, t0, t1, n0)``: append one call of a module to ``cols``, its
    signature id from the module's own cache (interned on a miss), and on the probe's own clock
    (``now`` None) what making the record took (the ``post`` column, as the C wrapper's)."""
    push = cols.append
    clock = time.perf_counter_ns if now is None else None
    local: dict = {}  # this module's (input shapes, output shapes) -> (module, signature) id

    def record(args: tuple, kwargs: dict, out: Any, t0: int, t1: int, n0: int) -> None:
        # one tensor in, one tensor out: every block of a decoder
        if len(args) == 1 and type(out) is Tensor and type(args[0]) is Tensor:
            key = (args[0].shape, out.shape)
        else:
            key = slow_key(args, kwargs, out)
        sid = local.get(key)
        if sid is None:
            sid = local[key] = intern(args, kwargs, out)
        push(t0, t1, sid, len(cols) - n0, max(clock() - t1, 1) if clock is not None else 0)

    return record


def cpu_wrapper(fn: Callable, cols, intern: Callable, now: Callable | None, *, native: bool = True,
                interned: list | None = None, index: int | None = None) -> Callable:
    """A recorded module's forward on CPU: the C wrapper, or its Python reference.
    ``interned``/``index``, where given: the list that ``intern`` appends (module index,
    signature) to and this module's index, which the C wrapper appends to itself on a miss
    whose signature it built (the id is the position in the list, as ``intern``'s)."""
    if native and C is not None and isinstance(cols, C.Columns):
        return C.Wrapper(fn, cols, intern, slow_key, Tensor, now, interned, index)
    record = _recorder(cols, intern, now)
    now = now or time.perf_counter_ns

    def forward(*args, **kwargs):
        if not cols.recording:
            return fn(*args, **kwargs)
        n0 = len(cols)
        try:
            t0 = now()
        except Exception as exc:
            dropped(cols, exc)
            return fn(*args, **kwargs)  # this call goes unrecorded
        out = fn(*args, **kwargs)
        try:
            t1 = now()
            if cols.recording:
                record(args, kwargs, out, t0, t1, n0)
        except Exception as exc:
            dropped(cols, exc)
        return out

    return PartialWrapper(fn, forward)


def full_wrapper(fn: Callable, cols, intern: Callable, now: Callable | None, begin: Callable,
                 end: Callable, truncate: Callable[[int], None]) -> Callable:
    """A recorded module's forward with per-call extras (CUDA events and allocator counters,
    offload transfer time): ``begin()`` before the call returns a token, ``end(token, ok)``
    after it appends the extras in the order of the columns (only when ``ok``), and
    ``truncate(n)`` takes them back to ``n`` rows when the call's own record could not be made."""
    record = _recorder(cols, intern, now)
    now = now or time.perf_counter_ns

    def forward(*args, **kwargs):
        if not cols.recording:
            return fn(*args, **kwargs)
        n0 = len(cols)
        tok = begin()
        t0 = now()
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            end(tok, False)
            raise
        if not cols.recording:
            end(tok, False)
            return out
        end(tok, True)  # the end event and allocator read first, as the start ones came last
        try:
            t1 = now()
            record(args, kwargs, out, t0, t1, n0)
        except Exception as exc:
            truncate(len(cols))  # the extras row of this call goes with its record
            dropped(cols, exc)
        return out

    return PartialWrapper(fn, forward)


# ---------------------------------------------------------------------- installing and checking
class InstalledForward:
    """One wrapper installed as an instance attribute of a module (its ``forward``, or the
    ``_call_impl`` of :mod:`.hooktime`) and what detach puts back."""

    __slots__ = ("module", "wrapper", "original", "had_attr", "name", "make", "attr")

    def __init__(self, module: nn.Module, make: Callable[[Callable], Callable], name: str,
                 attr: str = "forward") -> None:
        self.module, self.make, self.name, self.attr = module, make, name, attr
        self.install()

    def install(self) -> None:
        """Wrap what the module has now and put the wrapper in place (again, after other code
        replaced it)."""
        d = self.module.__dict__
        self.had_attr = self.attr in d
        self.original = d[self.attr] if self.had_attr else getattr(self.module, self.attr)
        self.wrapper = self.make(self.original)
        d[self.attr] = self.wrapper  # nn.Module.__setattr__ would add nothing but checks

    def in_place(self) -> bool:
        """Still reached when the module runs: as its attribute, or as what a forward wrapper
        installed after ours (accelerate's ``add_hook_to_module``, which keeps ``_old_forward``)
        calls."""
        d = self.module.__dict__
        return d.get(self.attr) is self.wrapper or d.get(f"_old_{self.attr}") is self.wrapper

    def remove(self) -> None:
        d = self.module.__dict__
        if d.get(self.attr) is self.wrapper:
            if self.had_attr:
                d[self.attr] = self.original
            else:
                del d[self.attr]
        elif d.get(f"_old_{self.attr}") is self.wrapper:
            # accelerate wrapped ours after attach: it keeps working, calling what we wrapped
            d[f"_old_{self.attr}"] = self.original


def install_forward(module: nn.Module, make: Callable[[Callable], Callable], name: str,
                    attr: str = "forward") -> InstalledForward:
    return InstalledForward(module, make, name, attr)


def root_wrapper(rec: Any, fn: Callable) -> Callable:
    """The root model's forward: each call is a step. Closed on every path, KeyboardInterrupt
    included (forward hooks' ``always_call`` covers only ``Exception``)."""

    def forward(*args, **kwargs):
        try:
            rec.step_begin(args, kwargs)
        except Exception:  # the probe's own failure must never cost the user their forward
            log.warning("probe: could not open a step", exc_info=True)
            rec.root_depth = max(rec.root_depth - 1, 0)
            return fn(*args, **kwargs)
        try:
            out = fn(*args, **kwargs)
        except BaseException as exc:
            _quietly(rec.step_end, kwargs, None, exc)
            raise
        _quietly(rec.step_end, kwargs, out)
        return out

    # a partial of the user's forward, like the block wrappers: inspect.signature sees theirs
    # (generate asks it for logits_to_keep), and copying or pickling the model says to detach
    return PartialWrapper(fn, forward)


def _quietly(fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        log.warning("probe: could not close a step", exc_info=True)
        return None


def check_forwards(forwards: list[InstalledForward]) -> None:
    """Say so when something removed a wrapper while attached (accelerate's
    ``remove_hook_from_module`` restores the forward it saw before its own), and put it back."""
    lost = [f for f in forwards if not f.in_place()]
    if not lost:
        return
    names = ", ".join(f.name or "<model>" for f in lost[:5]) + (" ..." if len(lost) > 5 else "")
    warnings.warn(
        f"probe: the forward wrappers of {len(lost)} module(s) ({names}) were replaced by other code "
        f"(e.g. accelerate's remove_hook_from_module) after attach; their calls since then were not "
        f"recorded. The probe re-installed them; attach after changing accelerate hooks to record every call.",
        RuntimeWarning,
        stacklevel=3,
    )
    for f in lost:
        f.install()


# ---------------------------------------------------------------------- calibration
class _Unit(nn.Module):
    """The cheapest module there is: what a wrapper adds to it is the wrapper's own cost."""

    def forward(self, x):
        return x


def calibrate(make: Callable[[Callable, Any], Callable], new_cols: Callable[[], Any], device: Any = "cpu",
              *, calls: int = 400, rounds: int = 7) -> dict:
    """The probe's own cost per recorded call, measured on this machine at attach.

    ``make(fn, cols)`` builds a wrapper as the probe does for real modules. Returns
    ``call_ns``: what one recorded call adds to whatever encloses it (its parent call, the
    step's forward); ``inside_ns``: the part inside the call's own window; ``post_ns``: the part
    that is its record, made after the window closed, which the wrappers also read in place on
    every call (``Records.post``: in a forward, cold, it costs several times this loop's figure;
    the frames take each call's own reading and ``call_ns - post_ns`` for the rest). Minima (10th
    percentiles per call) over interleaved rounds: the instrument's cost, not the machine's noise.
    """
    unit = _Unit()
    x = torch.zeros(1, device=device)
    cols = new_cols()
    wrapper = make(unit.forward, cols)
    bare_call = wrapped_call = direct = float("inf")
    fwd = unit.forward
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(calls):
            unit(x)
        bare_call = min(bare_call, time.perf_counter_ns() - t)
        unit.__dict__["forward"] = wrapper
        try:
            t = time.perf_counter_ns()
            for _ in range(calls):
                unit(x)
            wrapped_call = min(wrapped_call, time.perf_counter_ns() - t)
        finally:
            del unit.__dict__["forward"]
        t = time.perf_counter_ns()
        for _ in range(calls):
            fwd(x)
        direct = min(direct, time.perf_counter_ns() - t)
    n = len(cols)
    if n:
        import numpy as np

        t0b, t1b, _, _, postb = cols.columns()
        dur = np.frombuffer(t1b, dtype=np.int64, count=n) - np.frombuffer(t0b, dtype=np.int64, count=n)
        window = float(np.percentile(dur, 10))
        read = np.frombuffer(postb, dtype=np.int32, count=n)
        read = read[read > 0]
        post = float(np.percentile(read, 10)) if len(read) else 0.0
    else:  # pragma: no cover - the wrapper recorded nothing
        window = post = 0.0
    call_ns = max(0.0, (wrapped_call - bare_call) / calls)
    inside_ns = min(call_ns, max(0.0, window - direct / calls))
    return {"call_ns": round(call_ns, 1), "inside_ns": round(inside_ns, 1), "post_ns": round(min(post, call_ns), 1),
            "calls": calls, "rounds": rounds}
