"""What the recorder tells its observers, and when; what an observer hands the frame builder.

The recorder (:mod:`probe.recording.recorder`) owns runs and steps; everything else a recording holds —
the sampling stages of a generate call (:mod:`probe.recording.sampling`), the continuous-batching loop
(:mod:`probe.recording.serving`), the process CPU time and run-queue wait of a run (:mod:`probe.recording.noise`),
or a user's own plug-in (``probe.attach(model, observers=[...])``) — is kept by an observer the
probe registers with it. Each observer keeps its own records and builds its own frames; the
recorder and the frame builder (:mod:`probe.analysis.frames`) know only this interface.

Each hook below is called at one fixed point of the recorder's state machine, outside the
windows the recorder times: begin-type hooks before a run's or step's clock starts, end-type
hooks after it stopped, so an observer's bookkeeping never lands in a forward's or a run's
time. Begin-type calls go to the observers in registration order, end-type calls in reverse
order (as nested context managers close), so the last observer registered reads its clocks
closest to the run's or step's own.

The records the recorder tells them about — :class:`StepRec` (one root forward) and
:class:`RunRec` (one generate call, or a stretch of forwards) — live here too, so observers and
recorder share them without importing each other. This module imports nothing of the project:
the read side (``import probe`` without torch) may import the observers' modules.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from pandas import DataFrame
    from torch import Tensor


@dataclass
class Contribution:
    """What one observer adds to a recording's frames (:meth:`Observer.frames`).

    ``steps`` and ``runs`` hold rows keyed by ``run_id, step`` / ``run_id`` with values of the
    columns the observer declares in :attr:`Observer.columns`; the frame builder writes them
    into the shared frames' rows of the same keys (rows it has no value for keep theirs).
    ``built`` holds whole frames by name (a frame of :class:`probe.Run` such as ``requests``),
    each declared in :attr:`Observer.builds`; ``meta`` joins the run's metadata. ``untimed``
    names runs whose times this observer disturbed (a deep run): their rows leave ``calls``,
    ``steps`` and the frames other observers built, so no timing figure counts them; their
    ``runs`` row stays.
    """

    steps: "DataFrame | None" = None
    runs: "DataFrame | None" = None
    built: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    untimed: frozenset = frozenset()


class Observer:
    """Base of the recorder's observers: every hook is optional and does nothing here.

    A plug-in subclasses it, declares the columns it fills (:attr:`columns`) and the frames it
    builds (:attr:`builds`), keeps its records from the hooks, hands a frozen copy of them to
    :meth:`records` and turns that copy into frames in :meth:`frames`. Attaching with it
    (``probe.attach(model, observers=[MyObserver()])``) needs no change anywhere else.
    """

    #: the columns this observer fills in the shared frames, by frame (``"steps"``, ``"runs"``):
    #: column -> dtype. A column of :mod:`probe.schema` keeps the schema's dtype; any other is
    #: added to the frame after the schema's columns.
    columns: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    #: the frames this observer builds whole (a frame of :class:`probe.Run`): name -> its columns
    builds: ClassVar[Mapping[str, Mapping[str, str]]] = {}

    def install(self, model: Any, recorder: Any, stack: Any) -> None:
        """The probe registers this observer with ``recorder`` (its clock: ``recorder.now``);
        anything it puts on ``model`` is undone by a callback on ``stack`` (the probe's
        ``ExitStack``, closed on detach and on every failure path)."""

    def run_begin(self, run: "RunRec") -> None:
        """A ``generate()`` run opens, inside its window (the work here is its ``probe_start_ns``)."""

    def run_closing(self, run: "RunRec") -> None:
        """The ``generate()`` run is about to close: its forwards and sampling are over, its
        clock has not stopped. Reads that close a measurement of the run's own window go here
        (the probe's work from here to the clock's stop is the run's ``probe_end_ns``)."""

    def run_end(self, run: "RunRec | None") -> None:
        """The ``generate()`` run is over, after its clock stopped (``None``: the probe could
        not mark its start, so no run was opened)."""

    def stop(self, reason: str) -> None:
        """Recording stops in the middle of whatever is open (the probe detaches): close it,
        ``f"failed: {reason}"``."""

    def claim(self) -> "RunRec | None":
        """The run a root forward starting now belongs to, when this observer opened it (a
        serving loop's packed forward); the recorder then asks :meth:`shape` for its step and
        leaves reading its cache to the observer."""
        return None

    def shape(self, step: "StepRec") -> None:
        """Set ``phase``, ``q_len``, ``kv_len`` and ``batch`` of a step in a claimed run."""

    def step_begin(self, step: "StepRec") -> None:
        """A step is about to start: it has its run, index and shape; its clock has not started
        (``step.opened``: when the probe began opening it)."""

    def step_end(self, step: "StepRec", kwargs: dict, out: Any, error: BaseException | None) -> None:
        """A step's forward returned (or raised ``error``), its clock stopped and the step
        joined its run."""

    def busy(self) -> bool:
        """Something of this observer's is running (records cannot be cleared now)."""
        return False

    def clear(self) -> None:
        """Forget every record (keeping what is still running)."""

    def records(self) -> Any:
        """A frozen copy of this observer's records, for :meth:`frames` (``None``: nothing)."""
        return None

    @classmethod
    def frames(cls, records: Any, *, calls: "DataFrame", steps: "DataFrame", runs: "DataFrame",
               rank: int) -> Contribution:
        """What this observer adds to the frames, built from its :meth:`records` alone and the
        recorder's frames (``calls``, ``steps``, ``runs``; not to be modified)."""
        return Contribution()


def notify_all(observers: list, hook: str, *args: Any) -> None:
    """``hook(*args)`` on every observer, the last registered first. One observer's failure is
    logged and the others still run: closing a step or a run (its clock, the sampling wrappers
    coming off the model) must not stop halfway for one observer's error."""
    for o in reversed(observers):
        try:
            getattr(o, hook)(*args)
        except Exception:
            logging.getLogger(__name__).warning("probe: the observer %s failed in %s; its records of this run "
                                                "may be incomplete", type(o).__name__, hook, exc_info=True)


class StepRec:
    """One forward of the root model (host-side facts; CUDA events resolved later)."""

    __slots__ = (
        "run", "index", "phase", "q_len", "kv_len", "batch", "opened", "t0", "t1", "call0", "call1",
        "ev0", "ev1", "gpu_ms", "kv_bytes", "mem_peak", "kept", "compiled", "cpu0", "cpu_ns", "status",
    )

    def __init__(self, run: "RunRec") -> None:
        self.run = run
        self.index = run.n_steps_seen
        run.n_steps_seen += 1
        self.opened: int | None = None  # the clock when the probe began opening it (before t0)
        self.ev0 = self.ev1 = None
        self.gpu_ms = math.nan
        self.kv_bytes: int | None = None
        self.mem_peak: int | None = None
        self.kept = True
        self.compiled = False
        self.cpu_ns: int | None = None
        self.status = "ok"


class RunRec:
    """One generate() call, or a stretch of forwards outside generate()."""

    __slots__ = (
        "run_id", "kind", "t_enter", "t_exit", "status", "steps", "input_len", "batch_in",
        "mask", "output_len", "output_rows", "output_ids", "output_held", "gen_settings", "started_at", "n_steps_seen",
        "mem_peak", "prompt_in_output", "probe_start_ns", "probe_end_ns",
    )

    def generated(self) -> Any:
        """:attr:`output_ids`, copied from the held output tensor the first time it is asked for."""
        held, self.output_held = self.output_held, None
        if held is not None:
            from .generation import copy_held

            self.output_ids = copy_held(held)
        return self.output_ids

    def __init__(self, run_id: str, kind: str) -> None:
        self.run_id = run_id
        self.kind = kind
        self.t_enter: int | None = None
        self.t_exit: int | None = None
        self.probe_start_ns: int | None = None  # the probe's own work from t_enter until generate's own code
        self.probe_end_ns: int | None = None  # the probe's own work from generate's return until t_exit
        self.status = "running"
        self.steps: list[StepRec] = []
        self.input_len: int | None = None
        self.batch_in: int | None = None
        self.mask: Any = None
        self.output_len: int | None = None
        self.output_rows: int | None = None  # sequences returned (batch x num_return_sequences)
        self.output_ids: Any = None  # the generated tokens (prompt excluded), on the host (an array or a tensor)
        # the output tensor they are copied from when first asked for (generation.hold_generated)
        self.output_held: tuple | None = None
        self.prompt_in_output = True  # False: generate(inputs_embeds=...) returns only new tokens
        self.gen_settings: dict = {}
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.n_steps_seen = 0
        self.mem_peak: int | None = None  # CUDA allocator peak over the whole run
