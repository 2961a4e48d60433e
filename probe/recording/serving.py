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
its instances). :class:`ServingObserver` opens one run of kind ``"serve"`` per loop and claims
the forwards of the loop's thread.

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

from .observer import Observer
from .serving_watch import Iteration, ManagerWatch, ServingWarning, quietly

__all__ = ["ServingObserver", "ServingWarning", "paged_cache_bytes"]

log = logging.getLogger(__name__)


class ServingObserver(Observer):
    """Owned by one Probe: wraps ``model.init_continuous_batching`` and watches each manager.

    An observer of the recorder (:mod:`probe.recording.observer`): while a manager's loop runs, it holds
    that loop's run (kind ``"serve"``) and claims the root forwards its thread makes between
    scheduling and updating a batch, shaping each step from the batch's host-side layout.
    """

    def __init__(self, rec: Any, keep_cuda_graphs: bool = False) -> None:
        self.rec = rec
        self.keep_cuda_graphs = bool(keep_cuda_graphs)
        self.watches: list[ManagerWatch] = []
        self._lock = threading.Lock()
        self._warned = False
        self.run: Any = None  # the serving loop's run in progress (a probe.recorder.RunRec)
        self.thread: int | None = None  # the thread that runs it

    # ------------------------------------------------------------------ the recorder's observer
    def claim(self) -> Any:
        run = self.run
        if run is not None and run.serve.current is not None and threading.get_ident() == self.thread:
            return run
        return None

    def shape(self, step: Any) -> None:
        it = step.run.serve.current  # a packed [1, T] forward: its composition from the manager's batch
        it.step = step.index
        _shape(step, it)

    def step_end(self, step: Any, kwargs: dict, out: Any, error: BaseException | None) -> None:
        if step.owner is self and step.kept and error is None:
            try:
                step.paged_bytes = paged_cache_bytes(kwargs.get("cache"))
            except Exception:  # never break the user's forward
                step.paged_bytes = None
            step.kv_bytes = step.paged_bytes

    def stop(self, reason: str) -> None:
        if self.run is not None:
            run, self.run, self.thread = self.run, None, None
            run.t_exit = self.rec.now()
            run.status = f"failed: {reason}"

    def busy(self) -> bool:
        return self.run is not None

    # ------------------------------------------------------------------ a loop's run
    def begin_run(self, watch: ManagerWatch) -> Any:
        """Open a run of kind ``"serve"`` for a continuous-batching loop (called on its thread)."""
        run = self.rec.open_run("serve")
        run.serve = watch
        run.gen_settings = dict(watch.config)
        self.thread = threading.get_ident()
        self.run = run
        return run

    def end_run(self, run: Any, status: str) -> None:
        if self.run is run:
            self.run = self.thread = None
        self.rec.close_run(run, status)

    def external_step(self, watch: ManagerWatch, it: Iteration) -> None:
        """A serving step whose forward ran no Python (a CUDA-graph replay): timed from the
        manager's generation step (forward + sampling), with no block records."""
        run = self.run
        if run is None or run.serve is not watch:
            return
        s = self.rec.new_step(run)
        _shape(s, it)
        s.t0, s.t1 = it.t_gen0, it.t_gen1
        s.cpu0, s.cpu_ns = 0, None
        s.compiled = True
        it.step = s.index
        self.rec.add_step(s)

    # ------------------------------------------------------------------ installing

    def install(self, model: Any, stack: Any) -> None:
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
    s.serve = it
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
