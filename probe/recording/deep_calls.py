"""What calling an op from the deep pass's dispatch mode adds to it, per op overload.

The dispatch mode (:class:`~probe.recording.deep_ops.OpMode`) times an op around PyTorch's C++
operator called from Python: the Python arguments are converted to the operator's, the kernel is
reached through the dispatcher, and the outputs are wrapped as Python objects again. PyTorch's
own op time (``torch.profiler``'s CPU time of an ``aten::`` event) is the dispatcher's alone:
from the ``RecordFunction`` at its entry to its exit. The conversions depend on the overload's
arguments (a list of sizes costs more than one tensor), so one constant per step cannot remove
them: a ``view`` spends about as long in them as in its kernel.

:func:`calibrate` measures them per overload, once per probe, on each overload's first call of a
sampled step, once the step is over and only where an op of the overload keeps the mode's clock
(no twin timed it: ``DeepObserver._calibrate``): the call is replayed ``repeats`` times from Python exactly
as the mode makes it, the overloads in turn as a forward calls them, each followed by the
probe's bookkeeping as on the step (the mode's clock), then as often under PyTorch's
``RecordFunction`` profiler without the bookkeeping (``torch.autograd.profiler_legacy``: the
dispatcher's clock); the difference of the least times is what the mode's clock holds beyond
the dispatcher's. That is the conversions, and what the bookkeeping between ops costs the next
op (the dispatcher's and the kernel's code and tables pushed out of the CPU's caches: 0.5 us
for a view, several for a kernel that dispatches to others, such as ``mean``) - time the op
would not take in a forward without the probe. The profiler's own cost of each event nested
inside the op (an ``aten::mean`` calls ``sum`` and ``div_``) is in the dispatcher's time
there; it is measured on ``aten.alias`` and taken out.

Replays use tensors of one element in each dimension where the op accepts them (the conversions
do not depend on sizes; the kernel's time, which does, is on both clocks), else the sampled
call's own tensors where they are still alive (weights, the KV cache), else zero tensors of
their sizes, strides and dtype. Only weak references are kept, so the ledger's frees are
unchanged. Overloads that write to an argument or draw random numbers are not replayed (the
model's outputs and random stream stay as they were), nor those whose arguments cannot be
rebuilt, nor asserts, nor ops of other namespaces (collectives, custom kernels), nor ops with
no tensor argument; theirs is the step's floor. With another profiler or dispatch mode active,
or on one rank of several, nothing is replayed (the other tool would see the replays; ranks
could fall out of step).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: the most bytes of zero tensors the replays of one step may make together (freed arguments
#: rebuilt); beyond it an overload is not replayed
MAX_REBUILT_BYTES = 64 << 20


#: aten ops never replayed although they write nothing: asserts (a zero tensor fails them; on
#: CUDA that is a sticky device error) and symbolic-shape constraints
_NEVER = ("_assert", "_functional_assert", "sym_constrain_range")


def replayable(func: Any) -> bool:
    """Whether replaying ``func`` can change nothing the model sees: an ``aten`` op (not a
    collective of another rank's, not a custom kernel whose schema may not say what it writes)
    that writes to no argument, draws no random numbers and asserts nothing."""
    try:
        if getattr(func, "namespace", None) != "aten" or func._schema.is_mutable:
            return False
        if func._schema.name.split("::")[-1].startswith(_NEVER):
            return False
        return torch.Tag.nondeterministic_seeded not in func.tags
    except Exception:
        return False


def _has_tensor(x: Any) -> bool:
    if isinstance(x, _Arg):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v) for v in x)
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    return False


def others_active() -> bool:
    """Another dispatch mode (a user's ``FlopCounterMode``, a memory tracker) or a profiler is
    active, or this is one rank of several: then nothing is replayed and no warming op is
    called, so the other tool sees only the model's own ops, and ranks stay in step."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if _get_current_dispatch_mode_stack() or torch.autograd._profiler_enabled():
        return True
    dist = getattr(torch, "distributed", None)
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    except Exception:
        return True


class _Arg:
    """A tensor argument of a sampled call: a weak reference and what rebuilds it."""

    __slots__ = ("ref", "size", "stride", "offset", "dtype", "device", "span")

    def __init__(self, t: Tensor) -> None:
        self.ref = weakref.ref(t)
        self.size, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()
        self.dtype, self.device = t.dtype, t.device
        # elements the storage needs for this view
        self.span = self.offset + 1 + sum((s - 1) * st for s, st in zip(self.size, self.stride) if s > 0) \
            if all(s > 0 for s in self.size) else 0


def template(x: Any) -> Any:
    """An op's arguments with each tensor as an :class:`_Arg` (one level of lists and tuples,
    dict values); raises ``TypeError`` on a tensor without plain strided storage."""
    if isinstance(x, Tensor):
        if x.layout is not torch.strided or type(x) is not Tensor and not isinstance(x, torch.nn.Parameter):
            raise TypeError("not a plain strided tensor")
        return _Arg(x)
    if isinstance(x, (list, tuple)):
        return type(x)(template(v) for v in x)
    if isinstance(x, dict):
        return {k: template(v) for k, v in x.items()}
    return x


def _rebuild(x: Any, budget: list, tiny: bool) -> Any:
    if isinstance(x, _Arg):
        if tiny:  # one element in each dimension: what converting it costs, with little kernel work
            return torch.zeros((1,) * len(x.size), dtype=x.dtype, device=x.device)
        t = x.ref()
        if t is not None:
            return t
        budget[0] -= x.span * x.dtype.itemsize
        if budget[0] < 0:
            raise MemoryError("a rebuilt argument is too large to replay")
        base = torch.zeros(max(x.span, 1), dtype=x.dtype, device=x.device)
        return base.as_strided(x.size, x.stride, x.offset)
    if isinstance(x, (list, tuple)):
        return type(x)(_rebuild(v, budget, tiny) for v in x)
    if isinstance(x, dict):
        return {k: _rebuild(v, budget, tiny) for k, v in x.items()}
    return x


def _replayable_call(func: Any, args: Any, kwargs: Any, budget: list) -> tuple | None:
    """``(args, kwargs)`` to replay ``func`` with: its tensors one element in each dimension where
    the op accepts that (a view's sizes must fit its tensor), else as the sampled call had them,
    freed ones rebuilt from ``budget`` (bytes left for every overload of the step together). An op
    without a tensor argument (a factory: its sizes are its own) is not replayed."""
    if not (_has_tensor(args) or _has_tensor(kwargs)):
        return None
    for tiny in (True, False):
        try:
            a, k = _rebuild(args, budget, tiny), _rebuild(kwargs, budget, tiny)
            func._op(*a, **k)
            return a, k
        except Exception:
            continue
    return None


def _descendants(e: Any) -> int:
    return sum(1 + _descendants(c) for c in e.cpu_children)


def calibrate(samples: dict[Any, tuple], into: dict[Any, int], repeats: int = 25,
              between: Callable[[Any, Any, Any, Any], Any] | None = None) -> None:
    """Per overload of ``samples`` (overload -> templated ``(args, kwargs)``), what the mode's
    clock holds beyond the dispatcher's time, in ns, into ``into`` (see the module doc). The
    overloads are replayed in turn, as a forward calls them, not each in a loop of its own; on
    the mode's clock ``between(func, args, kwargs, out)`` runs after each call, as the mode's
    bookkeeping runs after each op, and not on the dispatcher's. Of each overload's ``repeats``
    calls the least time is kept, by each clock (the least is the call undisturbed by other work
    on the machine)."""
    from torch.autograd import profiler_legacy

    if not samples or others_active():
        return
    clock = time.perf_counter_ns
    unit = torch.zeros(1)
    alias = aten.alias.default._op

    def timed(func: Any, op: Any, args: Any, kwargs: Any, after: Any = None) -> int:
        alias(unit)  # as the mode calls it: the dispatch path warm
        t0 = clock()
        out = op(*args, **kwargs)
        ns = clock() - t0
        if after is not None:
            after(func, args, kwargs, out)
        return ns

    with torch.no_grad():
        calls = []
        budget = [MAX_REBUILT_BYTES]  # for the rebuilt arguments of every overload together
        for func, (args, kwargs) in samples.items():
            got = _replayable_call(func, args, kwargs, budget)
            if got is not None:
                calls.append((func, func._op, *got))
        if not calls:
            return
        own = [min(t) for t in zip(*([timed(*c, between) for c in calls] for _ in range(repeats)))]
        bare = min(timed(None, alias, (unit,), {}) for _ in range(repeats))
        with profiler_legacy.profile() as prof:
            profiled = min(timed(None, alias, (unit,), {}) for _ in range(repeats))
            for _ in range(repeats):
                for c in calls:
                    timed(*c)
    event_ns = max(profiled - bare, 0)  # the profiler's own cost of one event
    top = [e for e in prof.function_events if e.cpu_parent is None]
    first, n = 2 * repeats, len(calls)  # the timed aliases come first, each after its warming one
    top = top[:first] + top[first + 1::2]  # each replayed call after its warming alias
    if len(top) != first + repeats * n:
        log.debug("probe: the replayed calls' events do not line up; op times keep the step's floor")
        return
    for i, (func, *_) in enumerate(calls):
        events = top[first + i::n]
        if any(e.name != "aten::" + func._schema.name.split("::")[-1] for e in events):
            continue
        dispatcher = min((e.time_range.end - e.time_range.start) * 1e3 - _descendants(e) * event_ns for e in events)
        into[func] = int(max(own[i] - dispatcher, 0))
