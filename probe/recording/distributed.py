"""More than one device: where each block's weights live, accelerate's offload transfer time, and
one run directory per rank for tensor-parallel runs.

Offload. accelerate's ``AlignDevicesHook`` (``dispatch_model``, ``cpu_offload``,
``disk_offload``, ``from_pretrained(device_map=..., offload_folder=...)``) replaces
``module.forward``; its ``pre_forward`` loads the offloaded weights onto the execution device and
its ``post_forward`` puts them back on ``meta``. Both run *inside* ``module.forward``, so inside
the probe's pre/post hook window: a block's ``cpu_ms`` already includes its weight transfer.
:class:`OffloadClock` makes that part visible as such: it counts the host time spent in those two
methods of every offloading hook in one cumulative counter, so a recorded call's transfer time is
the counter's difference between its pre and post hooks (nested calls included).

Tensor parallel. Under ``torchrun`` each process records its own shard of the work (transformers'
``tp_plan`` hands local tensors between modules, so the recorded shapes are the rank's shapes).
Convention: each rank saves to ``RUN_DIR/rank{r}`` with :func:`save_rank`, nothing is written
in ``RUN_DIR`` itself, and ``probe.load(RUN_DIR)`` merges the ranks into one run whose rows carry
their ``rank``.
"""

from __future__ import annotations

import functools
import logging
import time
from array import array
from typing import Any, NamedTuple

from torch import nn

log = logging.getLogger(__name__)

_now = time.perf_counter_ns



# --------------------------------------------------------------------------- ranks
def world() -> tuple[int, int]:
    """This process's ``(rank, world_size)`` from ``torch.distributed``; ``(0, 1)`` without it."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:  # pragma: no cover - a broken distributed build
        log.debug("torch.distributed unavailable", exc_info=True)
    return 0, 1


class Placement(NamedTuple):
    """Where a module's weights are kept between calls."""

    where: str | None  # a device ("cpu", "cuda:0"), "disk", "mixed", or None (no parameters)
    offloaded: bool  # accelerate loads (some of) its weights for each call


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook`` objects on ``module`` (inside a ``SequentialHook`` too)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def _weights_location(weights_map: Any, name: str) -> str:
    """``"disk"`` or ``"cpu"``: where accelerate's weights map keeps tensor ``name``."""
    prefix = getattr(weights_map, "prefix", "")
    store = getattr(weights_map, "dataset", weights_map)
    key = f"{prefix}{name}"
    state = getattr(store, "state_dict", None)
    index = getattr(store, "index", None)
    if isinstance(state, dict) and key in state:
        return "cpu"
    if isinstance(index, dict) and key in index:
        return "disk"
    return "cpu"


def _offloaded_tensors(model: nn.Module) -> dict[str, str]:
    """Qualified parameter name -> ``"cpu"`` / ``"disk"`` for every parameter accelerate offloads."""
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for hook in _align_hooks(mod):
            if not getattr(hook, "offload", False):
                continue
            recurse = bool(getattr(hook, "place_submodules", False))
            for name, _ in mod.named_parameters(recurse=recurse):
                full = f"{mod_name}.{name}" if mod_name else name
                out[full] = _weights_location(hook.weights_map, name)
    return out


def placements(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[Placement]:
    """Where each of ``modules`` keeps its weights between calls, and whether they are offloaded.

    Works from accelerate's hooks and the parameters themselves, so ``dispatch_model``,
    ``cpu_offload``, ``disk_offload`` and ``from_pretrained(device_map=...)`` are read alike.

    Args:
        model: the root model.
        modules: ``(qualified name, module)`` pairs below ``model``.
    Returns:
        One :class:`Placement` per module, in order. ``where`` is the single location of all
        the module's parameters (resident device, or ``"cpu"``/``"disk"`` for offloaded ones),
        ``"mixed"`` when they differ, ``None`` without parameters.
    """
    offloaded = _offloaded_tensors(model)
    out = []
    for name, mod in modules:
        where: set[str] = set()
        off = False
        for pname, p in mod.named_parameters(prefix=name):
            loc = offloaded.get(pname)
            if loc is not None:
                off = True
                where.add(loc)
            else:
                where.add(str(p.device))
        place = None if not where else where.pop() if len(where) == 1 else "mixed"
        out.append(Placement(place, off))
    return out


# --------------------------------------------------------------------------- offload timing
class OffloadClock:
    """Host time spent in accelerate's weight loading and unloading, as one cumulative counter.

    Wraps ``pre_forward``/``post_forward`` of every offloading ``AlignDevicesHook`` in ``model``
    with an instance attribute on the hook object (accelerate looks the method up on each call);
    :meth:`remove` deletes them, leaving the hooks exactly as found. The modules themselves are
    not touched. Read :attr:`total_ns` ``[0]`` before and after a call: the difference is the
    transfer time inside it.
    """

    def __init__(self, hooks: list) -> None:
        self.total_ns = array("q", [0])
        self._hooks: list = []
        for hook in hooks:
            for meth in ("pre_forward", "post_forward"):
                if meth in hook.__dict__:  # someone else's instance override: leave it alone
                    continue
                setattr(hook, meth, self._timed(getattr(hook, meth)))
                self._hooks.append((hook, meth))

    @classmethod
    def install(cls, model: nn.Module) -> "OffloadClock | None":
        """A clock on ``model``'s offloading hooks, or ``None`` when nothing is offloaded."""
        hooks = {id(h): h for m in model.modules() for h in _align_hooks(m) if getattr(h, "offload", False)}
        return cls(list(hooks.values())) if hooks else None

    def _timed(self, fn):
        total = self.total_ns

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += _now() - t0

        timed.__probe_offload_clock__ = True  # type: ignore[attr-defined]
        return timed

    @property
    def hooks(self) -> int:
        """How many accelerate hooks are timed."""
        return len({id(h) for h, _ in self._hooks})

    def remove(self) -> None:
        """Delete the wrappers; a second call does nothing."""
        hooks, self._hooks = self._hooks, []
        for hook, meth in hooks:
            fn = hook.__dict__.get(meth)
            if fn is not None and getattr(fn, "__probe_offload_clock__", False):
                del hook.__dict__[meth]
