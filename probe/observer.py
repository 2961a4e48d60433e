"""What the recorder tells its observers, and when.

The recorder (:mod:`probe.recorder`) owns runs and steps; everything else a recording holds —
the sampling stages of a generate call (:mod:`probe.sampling`), the continuous-batching loop
(:mod:`probe.serving`), the process CPU time and run-queue wait of a run (:mod:`probe.noise`) —
is kept by an observer the probe registers with it. Each method below is called at one fixed
point of the recorder's state machine, so an observer's own clock reads always fall where the
recorder's timing expects them. Begin-type calls go to the observers in registration order,
end-type calls in reverse order (as nested context managers close), so the last observer
registered reads its clocks closest to the run's or step's own.

This module imports nothing: the read side (``import probe`` without torch) may import the
observers' modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recorder import RunRec, StepRec


class Observer:
    """Base of the recorder's observers: every method is optional and does nothing here."""

    def run_begin(self, run: "RunRec") -> None:
        """A ``generate()`` run opens; called before its clock starts."""

    def run_end(self, run: "RunRec | None") -> None:
        """The ``generate()`` run is over, after its clock stopped (``None``: the probe could
        not mark its start, so no run was opened)."""

    def stop(self, reason: str) -> None:
        """Recording stops in the middle of whatever is open (the probe detaches): close it,
        ``f"failed: {reason}"``."""

    def claim(self) -> "RunRec | None":
        """The run a root forward starting now belongs to, when this observer opened it (a
        serving loop's packed forward); the recorder then asks :meth:`shape` for its step."""
        return None

    def shape(self, step: "StepRec") -> None:
        """Set ``phase``, ``q_len``, ``kv_len`` and ``batch`` of a step in a claimed run."""

    def step_begin(self, step: "StepRec", opening_ns: int) -> None:
        """A step's clock started; ``opening_ns`` of probe work opened it (CUDA events)."""

    def step_end(self, step: "StepRec", kwargs: dict, out: Any, error: BaseException | None) -> None:
        """A step's forward returned (or raised ``error``) and the step joined its run."""

    def busy(self) -> bool:
        """Something of this observer's is running (records cannot be cleared now)."""
        return False

    def clear(self) -> None:
        """Forget every record."""

    def records(self) -> dict:
        """This observer's fields of :class:`probe.recorder.Records`."""
        return {}
