"""The observers every probe registers with its recorder, in the order they must be told.

Begin-type hooks go to observers in this order and end-type hooks in reverse
(:mod:`probe.recording.observer`), so the order decides whose bookkeeping falls where:

- sampling (:mod:`.sampling`) first: its step-end hook runs last, so the stage ``probe`` of a
  generate step holds every observer's bookkeeping after the forward;
- a caller's own observers (``probe.attach(model, observers=[...])``) next;
- serving (:mod:`.serving`), which claims the forwards of a continuous-batching loop;
- process CPU time and run-queue wait (:mod:`.noise`) last, its reads the closest to the
  run's clock; on the real clock only (an injected clock has no CPU time).
"""

from __future__ import annotations

from typing import Iterable

from .noise import RunCpu
from .observer import Observer
from .sampling import SamplingRecorder
from .serving import ServingObserver


def default_observers(*, real_clock: bool, cuda_graphs: bool = False, extra: Iterable[Observer] = ()) -> list[Observer]:
    """Fresh observers for one probe, ``extra`` (a caller's own) in their place.

    Args:
        real_clock: the probe reads ``time.perf_counter_ns`` (not an injected clock).
        cuda_graphs: keep a continuous-batching manager's CUDA graphs (see ``probe.attach``).
        extra: observers of the caller's, in the order given.
    """
    cpu = [RunCpu()] if real_clock else []
    return [SamplingRecorder(), *extra, ServingObserver(keep_cuda_graphs=cuda_graphs), *cpu]
