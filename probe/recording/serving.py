"""Continuous batching: what the probe records around a transformers ``ContinuousBatchingManager``.

transformers 5 serves through continuous batching (``model.generate_batch(...)``,
``model.init_continuous_batching()`` / ``continuous_batching_context_manager``, the path under
``transformers serve``): a background thread loops *schedule → forward → sample → update*, and
each forward packs the prompt tokens of newly admitted requests (prefill, possibly one chunk of
a long prompt) with one token of each running request (decode) into one ``[1, T]`` sequence
over a paged KV cache.

While a probe is attached, ``model.init_continuous_batching`` (which every entry point calls)
is wrapped on the instance, and each manager it returns is watched
(:mod:`probe.recording.serving_watch`: its requests, the passes of its loop, the wrappers on
its instances). :class:`ServingObserver` opens one run of kind ``"serve"`` per loop, claims the
forwards of the loop's thread, keeps its records per run and step, and builds the ``requests``
frame and the serving columns of ``steps`` and ``runs`` from them
(:mod:`probe.recording.serving_frames`).

**Batch layout from host state, no device read.** Before each forward the manager's
``inputs_and_outputs.requests_in_batch`` lists the requests packed into it (Python objects:
request state, query length, whether a token is sampled for it), so the probe learns each
request's tokens, cached positions and prefill/decode role without reading ``cu_seq_lens_q`` or
any other tensor: no device synchronisation is added per step or per block.

**CUDA graphs.** On CUDA the manager captures and replays CUDA graphs by default; a replay
runs no Python, so no block wrapper (and no root-forward wrapper) runs. While profiling the
probe turns them off by default (``ContinuousBatchingConfig.use_cuda_graph=False``, stated in
the run's ``generate_kwargs`` and ``meta["serving"]``). ``attach(..., cuda_graphs=True)`` keeps
them: steps are then timed from the manager's generation step (forward + sampling) with no
block records, as for compiled models.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import warnings
from typing import Any

from .observer import Contribution, Observer
from .serving_frames import REQUEST_COLUMNS, RUN_COLUMNS, STEP_COLUMNS, serving_frames
from .serving_watch import Iteration, ManagerWatch, ServingWarning, quietly

log = logging.getLogger(__name__)

__all__ = ["ServeRun", "ServingObserver", "ServingWarning", "paged_cache_bytes"]


class ServeRun:
    """The serving observer's records of one loop's run (kind ``"serve"``), by step index."""

    __slots__ = ("run_id", "t_enter", "t_exit", "watch", "config", "steps")

    def __init__(self, run: Any, watch: ManagerWatch) -> None:
        self.run_id = run.run_id
        self.t_enter: int | None = run.t_enter  # the run's origin: request times are counted from it
        self.t_exit: int | None = None
        self.watch = watch  # its manager's requests, iterations, CUDA-graph setting
        self.config = dict(watch.config)
        self.steps: dict[int, Iteration] = {}  # step index -> the loop pass that ran its forward


class ServingObserver(Observer):
    """Owned by one Probe: wraps ``model.init_continuous_batching`` and watches each manager.

    An observer of the recorder (:mod:`probe.recording.observer`): while a manager's loop runs, it holds
    that loop's run (kind ``"serve"``) and claims the root forwards its thread makes between
    scheduling and updating a batch, shaping each step from the batch's host-side layout. Its
    records (:class:`ServeRun` per run id) build the ``requests`` frame and fill the serving
    columns of ``steps`` and ``runs``.
    """

    columns = {"steps": STEP_COLUMNS, "runs": RUN_COLUMNS}
    builds = {"requests": REQUEST_COLUMNS}

    def __init__(self, keep_cuda_graphs: bool = False) -> None:
        self.rec: Any = None  # the recorder, given at install
        self.keep_cuda_graphs = bool(keep_cuda_graphs)
        self.watches: list[ManagerWatch] = []
        self._lock = threading.Lock()
        self._warned = False
        self.runs: dict[str, ServeRun] = {}
        self.run: Any = None  # the serving loop's run in progress (a probe.recorder.RunRec)
        self.open: ServeRun | None = None  # its records
        self.thread: int | None = None  # the thread that runs it

    # ------------------------------------------------------------------ the recorder's observer
    def claim(self) -> Any:
        # any thread may ask while the loop's thread closes its run: read the records first (the
        # loop clears the run first), and claim only on the loop's own thread
        rec, run = self.open, self.run
        if run is None or rec is None or rec.run_id != run.run_id or threading.get_ident() != self.thread:
            return None
        return run if rec.watch.current is not None else None

    def shape(self, step: Any) -> None:
        it = self.open.watch.current  # a packed [1, T] forward: its composition from the manager's batch
        it.step = step.index
        self.open.steps[step.index] = it
        _shape(step, it)

    def step_end(self, step: Any, kwargs: dict, out: Any, error: BaseException | None) -> None:
        rec = self.open if step.run is self.run else None  # a forward of the loop's run, which it claimed
        it = rec.steps.get(step.index) if rec is not None else None
        if it is None:
            return
        it.fwd0, it.fwd1, it.compiled = step.t0, step.t1, step.compiled
        if step.kept and error is None:
            try:
                it.paged_bytes = paged_cache_bytes(kwargs.get("cache"))
            except Exception:  # never break the user's forward
                it.paged_bytes = None

    def stop(self, reason: str) -> None:
        if self.run is not None:
            run, rec = self.run, self.open
            self.run = self.open = self.thread = None
            self.rec.close_run(run, f"failed: {reason}")
            rec.t_exit = run.t_exit

    def busy(self) -> bool:
        return self.run is not None

    def clear(self) -> None:
        self.runs = {self.open.run_id: self.open} if self.open is not None else {}

    def records(self) -> dict:
        return dict(self.runs)

    @classmethod
    def frames(cls, records: Any, *, calls: Any, steps: Any, runs: Any, rank: int) -> Contribution:
        return serving_frames(records or {}, rank)

    # ------------------------------------------------------------------ a loop's run
    def begin_run(self, watch: ManagerWatch) -> Any:
        """Open a run of kind ``"serve"`` for a continuous-batching loop (called on its thread)."""
        run = self.rec.open_run("serve")
        self.open = self.runs[run.run_id] = ServeRun(run, watch)
        self.thread = threading.get_ident()
        self.run = run
        return run

    def end_run(self, run: Any, status: str) -> None:
        if self.run is run:
            self.run = self.open = self.thread = None
        self.rec.close_run(run, status)
        rec = self.runs.get(run.run_id)
        if rec is not None:
            rec.t_exit = run.t_exit

    def external_step(self, watch: ManagerWatch, it: Iteration) -> None:
        """A serving step whose forward ran no Python (a CUDA-graph replay): timed from the
        manager's generation step (forward + sampling), with no block records."""
        run, rec = self.run, self.open
        if run is None or rec.watch is not watch:
            return
        s = self.rec.new_step(run)
        _shape(s, it)
        s.t0, s.t1 = it.t_gen0, it.t_gen1
        s.cpu0, s.cpu_ns = 0, None
        s.compiled = True
        it.step = s.index
        it.fwd0, it.fwd1, it.compiled = s.t0, s.t1, True
        rec.steps[s.index] = it
        self.rec.add_step(s)

    # ------------------------------------------------------------------ installing
    def install(self, model: Any, recorder: Any, stack: Any) -> None:
        self.rec = recorder
        init = getattr(model, "init_continuous_batching", None)
        if init is None or not callable(init):
            return
        had = "init_continuous_batching" in model.__dict__
        original = model.__dict__.get("init_continuous_batching", init)
        try:
            params = inspect.signature(original).parameters
        except (TypeError, ValueError):
            params = {}
        observer = self

        def init_continuous_batching(*args, **kwargs):
            from ..compat import continuous_batching_gap

            gap = continuous_batching_gap()
            if gap is not None:
                if not observer._warned:
                    observer._warned = True
                    warnings.warn(f"probe: continuous batching is recorded as plain forwards: {gap}",
                                  ServingWarning, stacklevel=2)
                return original(*args, **kwargs)
            graphs = "kept (step-level timing only)" if observer.keep_cuda_graphs else "off"
            if not observer.keep_cuda_graphs:
                try:
                    args, kwargs, graphs = _graphs_off(params, args, kwargs, model)
                except Exception:
                    log.warning("probe: could not turn the manager's CUDA graphs off", exc_info=True)
                    graphs = "unknown"
            manager = original(*args, **kwargs)
            quietly(observer.watch, manager, graphs)
            return manager

        init_continuous_batching.__probe_wrapper__ = True  # type: ignore[attr-defined]
        init_continuous_batching.__wrapped__ = original  # type: ignore[attr-defined]
        model.__dict__["init_continuous_batching"] = init_continuous_batching

        def unpatch() -> None:
            if model.__dict__.get("init_continuous_batching") is init_continuous_batching:
                if had:
                    model.__dict__["init_continuous_batching"] = original
                else:
                    del model.__dict__["init_continuous_batching"]
            self.remove()

        stack.callback(unpatch)

    def watch(self, manager: Any, graphs: str) -> None:
        with self._lock:
            if any(w.manager_ref() is manager for w in self.watches):
                return
            self.watches.append(ManagerWatch(self, manager, graphs))

    def forget(self, w: ManagerWatch) -> None:
        with self._lock:
            self.watches = [x for x in self.watches if x is not w]

    def remove(self) -> None:
        with self._lock:
            watches, self.watches = self.watches, []
        for w in watches:
            w.remove()



def _graphs_off(params: Any, args: tuple, kwargs: dict, model: Any) -> tuple[tuple, dict, str]:
    """The same call with ``continuous_batching_config.use_cuda_graph=False`` (a copy; the
    caller's config object is left as it was)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    names = [n for n in params if n != "self"]
    args = list(args)
    pos = names.index("continuous_batching_config") if "continuous_batching_config" in names else None
    if pos is not None and pos < len(args):
        cfg = args[pos]
    else:
        cfg = kwargs.get("continuous_batching_config")
    if cfg is None:
        gen = args[0] if args else kwargs.get("generation_config")
        gen = gen if gen is not None else getattr(model, "generation_config", None)
        legacy = getattr(gen, "continuous_batching_config", None)
        cfg = legacy if isinstance(legacy, ContinuousBatchingConfig) else ContinuousBatchingConfig()
    cfg = copy.copy(cfg)
    was = cfg.use_cuda_graph
    cfg.use_cuda_graph = False
    if pos is not None and pos < len(args):
        args[pos] = cfg
    else:
        kwargs["continuous_batching_config"] = cfg
    said = "off (turned off by the probe: graph replays run no block wrappers)"
    if was not in (None, False, (False, False)):
        said += f"; the config asked for use_cuda_graph={was!r}"
    return tuple(args), kwargs, said



def _shape(s: Any, it: Iteration) -> None:
    """A serving step's phase and shape, from the batch layout of its iteration."""
    n, pre, dec, _, _ = it.counts()
    s.phase = it.phase() if it.layout else "forward"
    s.q_len = pre + dec
    s.batch = n
    s.kv_len = max((e[3] for e in it.layout or ()), default=0)  # the longest cached context



def paged_cache_bytes(cache: Any) -> int | None:
    """Bytes of the paged KV cache held by requests now (allocated blocks), from host counters."""
    if cache is None or not hasattr(cache, "compute_free_capacity"):
        return None
    total = int(cache.num_sectors) * int(cache.bytes_per_sector)
    return max(0, total - int(cache.compute_free_capacity(relative=False)))
