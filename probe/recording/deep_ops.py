"""One sampled step of a deep run: every aten op as dispatched, and every tensor storage it made.

:class:`StepLog` is what the deep observer (:mod:`probe.recording.deep`) opens for a sampled
step. While it is open, a ``TorchDispatchMode`` (:class:`OpMode`) sees every aten op below
autograd — the overload as dispatched (``linear`` arrives as ``aten.t.default`` and
``aten.addmm.default``) — and global module hooks keep the stack of module calls, so each op
belongs to the innermost module call running it, by the order things happened, never by
timestamps. One counter (``tick``) orders ops, module entries and exits and storage frees.

Per op: input and output shapes and dtypes, host time (``perf_counter_ns`` around the op alone;
the bookkeeping is outside it, what calling it from Python adds is taken out: see :class:`OpMode`
and :mod:`probe.recording.deep_calls`; replaced by torch.profiler's time of the same op on a twin
step without the mode where there is one: :mod:`probe.recording.deep_twin`), FLOPs by PyTorch's own formulas (``torch.utils.flop_counter``)
plus those it lacks on CPU (:data:`EXTRA_FLOPS`), and bytes read and written *estimated* from the
unique storages of its inputs and outputs. Per storage an op made (an output on a storage none
of its inputs had): its bytes, the op, the module, and the tick it was freed at (a weak
reference to the storage says when) — what the memory ledger is built from.
"""

from __future__ import annotations

import time
import weakref
from array import array
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .deep_calls import others_active, replayable, template

aten = torch.ops.aten


def sdpa_cpu_flops(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu``: the two matrix products
    (scores and the weighted sum) as ``torch.utils.flop_counter`` counts them for the CUDA
    kernels (``sdpa_flop_count``, grouped-query heads included); softmax and masking uncounted."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape)))


def grouped_mm_flops(a: Tensor, b: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten._grouped_mm`` (a mixture of experts' fused expert banks on transformers 5):
    ``2·M·K·N`` per group, from shapes alone. With a 3-D operand each group is a product of its own
    rows (``[M, K] x [G, K, N]`` with offsets over M: ``2·M·K·N``; ``[G, M, K] x [G, K, N]``:
    ``2·G·M·K·N``), so it is ``2·out.numel()·K``; two 2-D operands split K between the groups
    (``[M, K] x [K, N]`` -> ``[G, M, N]``): ``2·M·K·N``. Rows past the last offset (none in
    transformers' routing, where every routed token is a row) are counted as computed: a formula
    runs once per shape signature and never reads the offsets' values."""
    k = int(a.shape[-1])
    if a.dim() == 2 and b.dim() == 2:
        return 2 * int(a.shape[0]) * k * int(b.shape[-1])
    return 2 * int(out_val.numel()) * k


#: FLOP formulas for ops ``torch.utils.flop_counter`` has none for (called like its own:
#: the op's arguments, ``out_val=`` its output)
EXTRA_FLOPS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda *a, out_val=None, **k: sdpa_cpu_flops(*a, **k),
    aten._grouped_mm: grouped_mm_flops,
}


def flops_of(func: Any, args: tuple, kwargs: dict, out: Any) -> int | None:
    """FLOPs of one op by PyTorch's registered formula (or :data:`EXTRA_FLOPS`); ``None``: none known."""
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    f = flop_registry.get(packet) or EXTRA_FLOPS.get(packet)
    if f is None:
        return None
    return int(f(*args, **kwargs, out_val=out))


def _tensors(x: Any, out: list) -> list:
    """The tensors of an op's arguments or output (one level of lists and tuples)."""
    if isinstance(x, Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, Tensor):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                _tensors(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out)
    return out


def _sig(ts: list) -> tuple:
    return tuple((t.shape, t.dtype) for t in ts)


def _storages(ts: list) -> dict[int, list]:
    """Unique storages of ``ts``: id -> [storage, bytes the tensors on it span (at most its size)]."""
    seen: dict[int, list] = {}
    for t in ts:
        try:
            st = t.untyped_storage()
        except Exception:  # a tensor without storage (meta, sparse, a subclass)
            continue
        k = id(st)
        n = t.numel() * t.element_size()
        got = seen.get(k)
        if got is None:
            seen[k] = [st, min(n, st.nbytes())]
        else:
            got[1] = min(got[1] + n, st.nbytes())
    return seen


#: columns of a StepLog's op records and storage records (flat int64 arrays, one row after another)
OP_COLS = ("tick", "module", "block", "sig", "ns", "read", "written", "made", "live", "start")
ALLOC_COLS = ("tick", "bytes", "op", "module", "freed_tick", "freed_in")
_NA, _NO = len(OP_COLS), len(ALLOC_COLS)


class StepLog:
    """What one sampled step recorded: ``ops``, module ``calls`` and ``allocs`` (see module doc).

    ``codes``: id of each module of the model -> its code, an index into the probe's list of
    module names (``0``: the model itself); ``blocks``: the codes of the model's blocks (embed,
    layers, norm, head); ``sigs``: the signatures seen so far, ``(op, input (shape, dtype)s,
    output (shape, dtype)s)`` -> ``(index, FLOPs)``, shared by the steps of one probe (a formula
    runs once per signature: FLOPs follow from the op and its shapes). Ops and storages are rows
    of flat int64 arrays (:data:`OP_COLS`, :data:`ALLOC_COLS`; ``-1``: none): a few dozen bytes
    an op, so a sampled step costs a small part of what a profiler's events take.
    """

    def __init__(self, codes: dict[int, int], blocks: frozenset[int], sigs: dict | None = None,
                 call_ns: dict | None = None) -> None:
        self.codes = codes
        self.blocks = blocks
        self.sigs = sigs if sigs is not None else {}
        # op overload -> what calling it from the dispatch mode adds (ns, deep_calls.calibrate),
        # shared by the steps of one probe; an overload without one has the step's floor
        self.call_ns = call_ns if call_ns is not None else {}
        self.tick = 0
        self.ops = array("q")  # OP_COLS per op
        self.allocs = array("q")  # ALLOC_COLS per storage made
        # [module code, depth, tick in, tick out, live bytes at entry, peak live bytes, ns in, ns out,
        #  shapes of the positional tensor arguments]
        self.calls: list[list] = []
        self.t0 = time.perf_counter_ns()  # the step's start for the ops' and calls' start times
        self.stack: list[list] = []  # the open calls (entries of ``calls``); None for a foreign module
        # beside each entry of ``stack``: (innermost module call's code, its block, module calls open,
        # that call), so what runs now is read in O(1) on every op and every free
        self.at: list[tuple] = []
        self.live = 0  # bytes of the storages made in this step and still alive
        self._refs: dict[int, tuple] = {}  # storage id -> (weak reference, alloc index)
        # storages made before the step that an op read (weights, the cache, the inputs): when one
        # is freed in the step (the cache's old keys, replaced by a longer copy) live bytes go down
        self._old: dict[int, Any] = {}
        self.failed = 0  # ops whose bookkeeping raised (the op itself ran; it is missing from the frames)
        self.held_bytes = 0  # bytes of every storage the KV cache holds after the step
        self.floor = array("q")  # ns of aten.alias timed as the ops are (see OpMode)
        self._floor: int | None = None  # their median, once the step is closed
        # per op, its time on a twin step without the mode (ns; -1: unmatched), and how the step's
        # op times were taken (see probe.recording.deep_twin); None: the mode's clock
        self.twin_ns: array | None = None
        self.clock: dict | None = None
        # on CUDA: whether the step ran there (its twin then records the device's work too), and per
        # op its device time on the twin (ns; -1: not measured; None: none read: a CPU step)
        self.cuda = False
        self.twin_device_ns: array | None = None
        # the model's own forward (the step) is the outermost call: its hooks ran before the step opened
        root = [0, 0, 0, None, 0, 0, 0, None, None]
        self.calls.append(root)
        self.stack.append(root)
        self.at.append((0, 0 if 0 in blocks else -1, 1, root))

    @property
    def n_ops(self) -> int:
        return len(self.ops) // _NA

    def op_sigs(self) -> list[int]:
        """The signature index of each op, in order."""
        return list(self.ops[3::_NA])

    def floor_ns(self) -> int:
        """What timing ``aten.alias`` from the dispatch mode takes on this step (median; 0 unknown):
        what an op whose own call cost is not calibrated loses."""
        if self._floor is not None:
            return self._floor
        f = sorted(self.floor)
        return int(f[len(f) // 2]) if f else 0

    def call_cost_ns(self, func: Any) -> int:
        """What the dispatch mode's clock holds beyond the dispatcher's time for an op ``func``."""
        got = self.call_ns.get(func)
        return got if got is not None else self.floor_ns()

    # ---------------------------------------------------------------- module calls (global hooks)
    def enter(self, module: Any, args: Any) -> None:
        # a module outside the model (None): its ops stay with the enclosing call
        self.enter_code(self.codes.get(id(module)), args)

    def enter_code(self, code: int | None, args: Any = ()) -> None:
        """A call that is not a module's (the attention function) opens, as ``code``; ``args``:
        its positional arguments, whose tensors' shapes are kept (what the cost model reads)."""
        top = self.at[-1] if self.at else (0, -1, 0, None)
        if code is None:
            self.stack.append(None)
            self.at.append(top)
            return
        self.tick += 1
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, Tensor))
        call = [code, top[2], self.tick, None, self.live, self.live, time.perf_counter_ns() - self.t0, None, shapes]
        self.calls.append(call)
        self.stack.append(call)
        self.at.append((code, code if code in self.blocks else top[1], top[2] + 1, call))

    def exit(self, module: Any = None, args: Any = None, out: Any = None) -> None:
        if not self.stack:
            return
        call = self.stack.pop()
        self.at.pop()
        if call is not None:
            self.tick += 1
            call[3] = self.tick
            call[7] = time.perf_counter_ns() - self.t0
            outer = self.at[-1][3] if self.at else None
            if outer is not None and call[5] > outer[5]:  # its peak was the enclosing call's too
                outer[5] = call[5]

    def where(self) -> tuple[int, int]:
        """(innermost module, its block; -1: none) of what runs now, as codes."""
        if not self.at:
            return 0, -1
        top = self.at[-1]
        return top[0], top[1]

    # ---------------------------------------------------------------- ops (the dispatch mode)
    def op(self, func: Any, args: tuple, kwargs: dict, out: Any, ns: int, t0: int = 0) -> None:
        self.tick += 1
        ins, outs = _tensors(args, []), _tensors(out, [])
        if kwargs:
            _tensors(kwargs, ins)
        s_in, s_out = _storages(ins), _storages(outs)
        key = (func, _sig(ins), _sig(outs))
        sig = self.sigs.get(key)
        if sig is None:
            try:
                flops = flops_of(func, args, kwargs, out)
            except Exception:  # a formula that does not fit these arguments: unknown, not wrong
                flops = None
            sig = self.sigs[key] = (len(self.sigs), flops)
        module, block = self.where()
        index = self.n_ops
        made = 0
        for k, (st, _) in s_in.items():
            if k not in self._refs and k not in self._old:
                self._old[k] = weakref.ref(st, self._old_freer(k, st.nbytes()))
        for k, (st, _) in s_out.items():
            if k in s_in or k in self._refs:
                continue
            size = st.nbytes()
            a = len(self.allocs) // _NO
            self.allocs.extend((self.tick, size, index, module, -1, -1))
            self._refs[k] = (weakref.ref(st, self._freer(k)), a)
            made += size
            self._grow(size)
        self.ops.extend((self.tick, module, block, sig[0], ns, sum(v[1] for v in s_in.values()),
                         sum(v[1] for v in s_out.values()), made, self.live, t0 - self.t0 if t0 else 0))

    def _grow(self, size: int) -> None:
        """Only the innermost call's peak is raised here; each call hands its peak to the enclosing
        one when it exits (:meth:`exit`, :meth:`close`)."""
        self.live += size
        inner = self.at[-1][3] if self.at else None
        if inner is not None and self.live > inner[5]:
            inner[5] = self.live

    def _freer(self, key: int) -> Callable:
        def freed(_ref: Any) -> None:
            got = self._refs.pop(key, None)
            if got is None:
                return
            at = got[1] * _NO
            self.allocs[at + 4] = self.tick
            self.allocs[at + 5] = self.where()[0]
            self.live -= self.allocs[at + 1]

        return freed

    def _old_freer(self, key: int, size: int) -> Callable:
        def freed(_ref: Any) -> None:
            if self._old.pop(key, None) is not None:
                self.live -= size

        return freed

    def close(self, held: dict[int, int]) -> list[int]:
        """End the step: close the calls still open (the model's own), forget the weak references
        (nothing is told of later frees) and return the alloc indices of the storages alive now
        that the KV cache holds (``held``: storage id -> bytes)."""
        self.tick += 1
        end = time.perf_counter_ns() - self.t0
        peak = None
        for c in reversed(self.stack):  # innermost first, each handing its peak outwards
            if c is None:
                continue
            if peak is not None and peak > c[5]:
                c[5] = peak
            peak = c[5]
            if c[3] is None:
                c[3], c[7] = self.tick, end
        self.stack, self.at = [], []
        self._floor = None
        self._floor = self.floor_ns()
        self.held_bytes = sum(held.values())
        refs, self._refs = self._refs, {}
        self._old = {}
        return [a for k, (_, a) in refs.items() if k in held]


class OpMode(TorchDispatchMode):
    """Hands every aten op to a :class:`StepLog`, timed alone; the op's own result is returned
    untouched (the bookkeeping never changes what the model computes).

    What the two clock reads around an op hold: the op called as PyTorch's C++ operator
    (``func._op``, not ``OpOverload.__call__``'s Python frame), which converts the Python
    arguments to the operator's, dispatches below this mode to the kernel, and wraps the outputs
    as Python objects. torch.profiler's CPU time of an op is the dispatcher's alone. Right before
    each op the mode calls ``aten.alias`` on a one-element tensor, untimed: the dispatcher's and
    the conversions' code is then back in the CPU's caches after the probe's own bookkeeping, as
    it is in a forward without the probe. What the conversions take is measured per overload
    (:func:`~probe.recording.deep_calls.calibrate`, on the first call of each overload, whose
    arguments the mode keeps as ``samples``: weak references and sizes) and taken out of each
    op's time when frames are built, left to dispatch and Python. Every :data:`FLOOR_EVERY`-th op the
    mode also times ``aten.alias`` the same way: the median of those is the step's floor
    (:meth:`StepLog.floor_ns`), what an overload that is not replayed loses instead.
    """

    #: one op in this many is followed by a timed ``aten.alias`` (the floor's sample)
    FLOOR_EVERY = 16

    def __init__(self, log: StepLog) -> None:
        super().__init__()
        self.log = log
        self.n = 0
        self.unit = torch.zeros(1)
        self.alias = aten.alias.default._op
        self.samples: dict[Any, tuple] = {}  # overload -> its first call's templated (args, kwargs)
        self._seen: set = set()  # overloads sampled, calibrated or not replayable
        # another dispatch mode or profiler under this one (a user's FlopCounterMode), or one rank
        # of several: no op of the probe's own (the warming and floor aliases) reaches it, and
        # nothing is replayed; op times then hold their Python call (see docs/deep.md)
        self.quiet = others_active()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # the C++ operator itself (an op without one, called as it comes)
        call, clock, unit, alias = getattr(func, "_op", func), time.perf_counter_ns, self.unit, self.alias
        quiet = self.quiet
        if not quiet:
            alias(unit)  # warm the dispatch path (see the class doc)
        if kwargs:
            t0 = clock()
            out = call(*args, **kwargs)
            ns = clock() - t0
        else:
            kwargs = {}
            t0 = clock()
            out = call(*args)
            ns = clock() - t0
        try:
            self.log.op(func, args, kwargs, out, ns, t0)
            self.n += 1
            if quiet:
                return out
            if self.n % self.FLOOR_EVERY == 1:
                alias(unit)
                t1 = clock()
                alias(unit)
                self.log.floor.append(clock() - t1)
            if func not in self._seen:
                self._seen.add(func)
                if func not in self.log.call_ns and replayable(func):
                    try:
                        self.samples[func] = (template(args), template(kwargs))
                    except TypeError:  # a tensor subclass or sparse argument: not replayed, the floor
                        pass
        except Exception:  # the probe's bookkeeping must never cost the user their forward
            self.log.failed += 1
        return out


def storage_bytes(tensors: Any) -> dict[int, int]:
    """Storage id -> bytes of the unique storages of ``tensors`` (what a step's cache holds)."""
    return {k: v[1] for k, v in _storages(list(tensors)).items()}


def tied_weights(model: torch.nn.Module) -> dict[str, dict]:
    """Modules whose parameters share a storage with a module outside them (tied weights, such as
    an embedding and an output head): name -> ``{"bytes": what they share, "with": [those modules]}``.
    Each module's ``weights_bytes`` counts such a storage in full; a total over modules counts it once."""
    owners: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        try:
            st = p.untyped_storage()
        except Exception:
            continue
        owners.setdefault(id(st), set()).add(name.rpartition(".")[0])
        sizes[id(st)] = max(sizes.get(id(st), 0), min(p.numel() * p.element_size(), st.nbytes()))
    out: dict[str, dict] = {}
    for key, mods in owners.items():
        if len(mods) < 2:
            continue
        holders = {m.rsplit(".", k)[0] for m in mods for k in range(m.count(".") + 1)}  # each owner and its ancestors
        for h in holders:
            inside = lambda o: o == h or o.startswith(h + ".")  # noqa: E731
            partners = sorted(o for o in mods if not inside(o))
            if partners:
                got = out.setdefault(h, {"bytes": 0, "with": []})
                got["bytes"] += sizes[key]
                got["with"] = sorted(set(got["with"]) | set(partners))
    return out


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters, each storage counted once (tied weights once)."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        try:
            st = p.untyped_storage()
            seen[id(st)] = max(seen.get(id(st), 0), min(p.numel() * p.element_size(), st.nbytes()))
        except Exception:
            continue
    return sum(seen.values())
