"""A recorded module's forward hooks, timed as part of its call.

The forward wrapper (:mod:`.hotpath`) times ``forward`` alone; a module's forward hooks and
pre-hooks run outside it, in ``nn.Module._call_impl`` (the global ones first, then the
instance's), so without more their time lands in the enclosing recorded call, or in the
step's residue. No hook of the probe's could enclose the global ones, so for a module that has
forward hooks the probe times the call itself: an instance-level ``_call_impl`` — which
``nn.Module._wrapped_call_impl`` looks up on the instance — reads the clock around the one the
module had. Hooks send a module down PyTorch's slow path anyway, so two clock reads add little
to it; a module without hooks gets nothing and keeps the fast path. Which modules have hooks is
checked at attach and at each ``generate()`` (hooks added after attach count), the global hook
dicts included. No hook dict is read beyond its truth value, none is touched.

Each timed call appends ``(module index, n0, n1, t0, t1)`` to a list the recorder owns: the
calls recorded while it ran are rows ``n0 .. n1 - 1`` of the columns, the module's own forward
among them. The frame builder widens that row to the whole call and says how much of it was
hooks (``calls.hooks_ms``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from torch import nn
from torch.nn.modules import module as _torch_module

from . import hotpath

log = logging.getLogger(__name__)


def global_forward_hooks() -> bool:
    """Whether forward hooks or pre-hooks are registered for every module of the process."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def has_forward_hooks(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def timed_call(impl: Callable, idx: int, cols: Any, push: Callable[[tuple], None],
               now: Callable[[], int]) -> Callable:
    """A module's ``_call_impl`` that times ``impl`` (hooks and forward) and pushes
    ``(idx, n0, n1, t0, t1)`` when a call was recorded inside it."""

    def _call_impl(*args, **kwargs):
        if not cols.recording:
            return impl(*args, **kwargs)
        n0 = len(cols)
        try:
            t0 = now()
        except Exception:  # the probe's clock failing must never cost the user their call
            return impl(*args, **kwargs)
        out = impl(*args, **kwargs)
        try:
            t1 = now()
            n1 = len(cols)
            if n1 > n0 and cols.recording:
                push((idx, n0, n1, t0, t1))
        except Exception:
            log.debug("probe: a hooked call's time could not be read", exc_info=True)
        return out

    _call_impl.__probe_wrapper__ = True  # type: ignore[attr-defined]
    return _call_impl


class HookTimers:
    """The timed ``_call_impl`` of each recorded module that has forward hooks, kept in step
    with the hooks by :meth:`sync` and removed by :meth:`remove`."""

    def __init__(self, targets: list[tuple[int, nn.Module]], cols: Any, push: Callable[[tuple], None],
                 now: Callable[[], int] | None) -> None:
        self._targets = targets  # (module index in the recorder, module)
        self._cols, self._push = cols, push
        self._now = now or time.perf_counter_ns
        self._installed: dict[int, hotpath.InstalledForward] = {}

    def _make(self, idx: int) -> Callable[[Callable], Callable]:
        return lambda impl: timed_call(impl, idx, self._cols, self._push, self._now)

    def sync(self) -> None:
        """Time the calls of exactly the recorded modules that have forward hooks now."""
        everywhere = global_forward_hooks()
        for idx, mod in self._targets:
            want = everywhere or has_forward_hooks(mod)
            cur = self._installed.get(idx)
            if cur is not None and not cur.in_place():  # replaced by other code: theirs stays
                del self._installed[idx]
                cur = None
            if want and cur is None:
                self._installed[idx] = hotpath.install_forward(mod, self._make(idx), "", attr="_call_impl")
            elif not want and cur is not None:
                cur.remove()
                del self._installed[idx]

    @property
    def timed(self) -> int:
        """How many modules' calls are timed with their hooks now."""
        return len(self._installed)

    def remove(self) -> None:
        installed, self._installed = self._installed, {}
        for f in installed.values():
            f.remove()
