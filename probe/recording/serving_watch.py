"""What the probe puts on a transformers ``ContinuousBatchingManager``, and what it learns there.

:class:`ManagerWatch` wraps — on the manager's and its helpers' instances, never their classes —
``add_request`` / ``cancel_request`` (arrival, cancellation), the output router's ``deliver`` /
``deliver_batch`` (finish, status, transformers' own timestamps), ``_run_generation_loop`` (one
run per loop, opened by the serving observer, :mod:`probe.recording.serving`) and, on the batch
processor the loop creates, ``prepare_next_batch`` (with ``scheduler.schedule_batch`` and
``inputs_and_outputs.prepare_batch_tensors`` inside it), ``_generation_step`` and
``update_batch``. Every wrapper is removed when the loop ends and when the probe detaches.

Its records: one :class:`RequestRec` per request and one :class:`Iteration` per pass of the loop
that ran a forward, with the batch's layout read from the manager's Python objects (no tensor
is read, so no device synchronisation is added).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)


class ServingWarning(UserWarning):
    """Continuous batching ran where the probe cannot record its requests (a version gap)."""


class Iteration:
    """One pass of the manager's loop that ran a forward: host-side times and the batch."""

    __slots__ = ("t_prep0", "t_prep1", "schedule_ns", "cache_ns", "t_gen0", "t_gen1", "t_upd0", "t_upd1",
                 "layout", "step", "fwd0", "fwd1", "compiled", "paged_bytes")

    def __init__(self, t: int) -> None:
        self.t_prep0 = t
        self.t_prep1 = self.t_gen0 = self.t_gen1 = self.t_upd0 = self.t_upd1 = None
        self.schedule_ns = 0
        self.cache_ns = 0
        self.layout: list[tuple] | None = None  # (request_id, kind, tokens, cached, chunk, new_token)
        self.step: int | None = None  # the recorder's step index of its forward
        # its forward as the recorder timed it (copied when the step closed; None until then)
        self.fwd0: int | None = None
        self.fwd1: int | None = None
        self.compiled = False  # no block wrapper ran (a CUDA-graph replay, compiled code)
        self.paged_bytes: int | None = None  # paged KV cache in use after the forward

    # batch composition, from the layout
    def counts(self) -> tuple[int, int, int, int | None, int]:
        """(requests, prefill tokens, decode tokens, highest prefill chunk, tokens sampled)."""
        lay = self.layout or []
        pre = sum(e[2] for e in lay if e[1] == "prefill")
        dec = sum(e[2] for e in lay if e[1] == "decode")
        chunks = [e[4] for e in lay if e[1] == "prefill"]
        return len(lay), pre, dec, (max(chunks) if chunks else None), sum(1 for e in lay if e[5])

    def phase(self) -> str:
        _, pre, dec, _, _ = self.counts()
        if pre and dec:
            return "mixed"
        return "prefill" if pre else "decode"


class RequestRec:
    """What the probe saw of one request (probe clock: the recorder's integer ns)."""

    __slots__ = ("request_id", "arrival", "prompt_tokens", "max_new", "scheduled", "tokens", "finished",
                 "status", "generated", "cancelled", "tf_created", "tf_stamps")

    def __init__(self, request_id: str, arrival: int | None, prompt_tokens: int, max_new: int | None) -> None:
        self.request_id = request_id
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.max_new = max_new
        self.scheduled: int | None = None
        self.tokens: list[int] = []  # host time each of its tokens was available
        self.finished: int | None = None
        self.status: str | None = None
        self.generated: int | None = None
        self.cancelled: int | None = None
        self.tf_created: float | None = None  # transformers' perf_counter seconds
        self.tf_stamps: list[float] | None = None


class Patches:
    """Instance attributes set by the probe, each restored exactly once."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, str, bool, Any, Any]] = []

    def set(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        had = name in getattr(obj, "__dict__", {})
        old = obj.__dict__[name] if had else None
        fn = make(getattr(obj, name))
        fn.__probe_wrapper__ = True  # type: ignore[attr-defined]
        setattr(obj, name, fn)
        self._items.append((obj, name, had, old, fn))

    def restore(self) -> None:
        items, self._items = self._items, []
        for obj, name, had, old, fn in reversed(items):
            try:
                if obj.__dict__.get(name) is not fn:
                    continue  # replaced by someone else since: leave theirs
                if had:
                    obj.__dict__[name] = old
                else:
                    del obj.__dict__[name]
            except Exception:  # a half-torn-down manager must not break detach
                log.debug("could not restore %s", name, exc_info=True)


class ManagerWatch:
    """The probe's records of one ``ContinuousBatchingManager`` and the wrappers on it."""

    def __init__(self, observer: Any, manager: Any, graphs: str) -> None:
        self.observer = observer  # the probe.recording.serving.ServingObserver that watches it
        self.now = observer.rec.now  # the recorder's clock
        self.manager_ref = weakref.ref(manager)
        self.graphs = graphs  # how the probe left the manager's CUDA graphs
        self.patches = Patches()
        self.proc_patches = Patches()
        self.requests: dict[str, RequestRec] = {}
        self.iterations: list[Iteration] = []
        self.chunks: dict[str, int] = {}
        self.current: Iteration | None = None
        self.layout_ok = True
        self.config: dict = {}
        self._install(manager)

    # ------------------------------------------------------------------ manager wrappers
    def _install(self, manager: Any) -> None:
        p = self.patches
        p.set(manager, "add_request", self._wrap_add)
        p.set(manager, "cancel_request", self._wrap_cancel)
        p.set(manager, "_run_generation_loop", self._wrap_loop)
        p.set(manager, "_create_batch_processor", self._wrap_create)
        router = getattr(manager, "output_router", None)
        if router is not None and hasattr(router, "deliver") and hasattr(router, "deliver_batch"):
            p.set(router, "deliver", self._wrap_deliver)
            p.set(router, "deliver_batch", self._wrap_deliver_batch)
        bp = getattr(manager, "batch_processor", None)
        if bp is not None:  # a persistent manager's processor, reused by the next loop
            self._patch_processor(bp)

    def remove(self) -> None:
        self.proc_patches.restore()
        self.patches.restore()

    def _wrap_add(self, fn: Callable) -> Callable:
        def add_request(input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
            t = self.now()
            rid = fn(input_ids, request_id, max_new_tokens, *args, **kwargs)
            if rid is not None:
                m = self.manager_ref()
                if max_new_tokens is None and m is not None:
                    max_new_tokens = getattr(m.generation_config, "max_new_tokens", None)
                self.requests[rid] = RequestRec(rid, t, len(input_ids), max_new_tokens)
            return rid

        return add_request

    def _wrap_cancel(self, fn: Callable) -> Callable:
        def cancel_request(request_id, *args, **kwargs):
            r = self.requests.get(request_id)
            if r is not None and r.cancelled is None:
                r.cancelled = self.now()
            return fn(request_id, *args, **kwargs)

        return cancel_request

    def _on_output(self, out: Any) -> None:
        try:
            finished = out.is_finished()
        except Exception:
            return
        if not finished:
            return
        rid = out.request_id
        r = self.requests.get(rid) or self._new_request(rid, len(getattr(out, "prompt_ids", []) or []))
        r.finished = self.now()
        error = getattr(out, "error", None)
        r.status = "ok" if error is None else f"failed: {error}"
        r.generated = len(getattr(out, "generated_tokens", []) or [])
        r.tf_created = getattr(out, "created_time", None)
        stamps = getattr(out, "timestamps", None)
        r.tf_stamps = list(stamps) if stamps else None

    def _wrap_deliver(self, fn: Callable) -> Callable:
        def deliver(output, *args, **kwargs):
            quietly(self._on_output, output)
            return fn(output, *args, **kwargs)

        return deliver

    def _wrap_deliver_batch(self, fn: Callable) -> Callable:
        def deliver_batch(outputs, *args, **kwargs):
            for o in outputs:
                quietly(self._on_output, o)
            return fn(outputs, *args, **kwargs)

        return deliver_batch

    def _new_request(self, rid: str, prompt_tokens: int) -> RequestRec:
        # forked children (num_return_sequences) and requests added around the wrapper
        r = self.requests[rid] = RequestRec(rid, None, prompt_tokens, None)
        return r

    def _wrap_create(self, fn: Callable) -> Callable:
        def create_batch_processor(*args, **kwargs):
            bp = fn(*args, **kwargs)
            quietly(self._patch_processor, bp)
            return bp

        return create_batch_processor

    def _wrap_loop(self, fn: Callable) -> Callable:
        def run_generation_loop(*args, **kwargs):
            run = None
            try:
                self._read_config()
                run = self.observer.begin_run(self)
            except Exception:  # the probe's own failure must never cost the user their loop
                log.warning("probe: could not open the serving run", exc_info=True)
            status = "ok"
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                status = f"failed: {type(exc).__name__}: {exc}"
                raise
            finally:
                m = self.manager_ref()
                fatal = getattr(getattr(m, "background_thread_status", None), "fatal_error", None)
                if fatal is not None and status == "ok":
                    status = f"failed: {type(fatal).__name__}: {fatal}"
                if run is not None:
                    quietly(self.observer.end_run, run, status)
                self.remove()  # nothing of the probe stays on the manager once its loop ends
                self.observer.forget(self)

        return run_generation_loop

    def _read_config(self) -> None:
        m = self.manager_ref()
        cfg = getattr(m, "continuous_batching_config", None)
        keys = ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph",
                "use_async_batching", "scheduler_type", "allow_block_sharing")
        self.config = {k: jsonable(getattr(cfg, k, None)) for k in keys}
        self.config["cuda_graphs"] = self.graphs
        model = getattr(m, "model", None)
        self.config["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)

    # ------------------------------------------------------------------ batch processor wrappers
    def _patch_processor(self, bp: Any) -> None:
        if any(o is bp for o, *_ in self.proc_patches._items):
            return
        io = getattr(bp, "inputs_and_outputs", None)
        sched = getattr(bp, "scheduler", None)
        needed = (hasattr(bp, "prepare_next_batch") and hasattr(bp, "update_batch")
                  and hasattr(bp, "_generation_step") and io is not None and hasattr(io, "requests_in_batch"))
        if not needed:
            self.layout_ok = False
            warnings.warn("probe: this transformers' batch processor lacks the host-side batch description the "
                          "probe reads; serving steps are timed but their composition is unknown", ServingWarning,
                          stacklevel=2)
            return
        p = self.proc_patches
        p.set(bp, "prepare_next_batch", self._wrap_prepare)
        p.set(bp, "_generation_step", self._wrap_generation_step)
        p.set(bp, "update_batch", self._wrap_update)
        if sched is not None and hasattr(sched, "schedule_batch"):
            p.set(sched, "schedule_batch", self._wrap_timed("schedule_ns"))
        if hasattr(io, "prepare_batch_tensors"):
            p.set(io, "prepare_batch_tensors", self._wrap_timed("cache_ns"))
        self._io = io

    def _wrap_prepare(self, fn: Callable) -> Callable:
        def prepare_next_batch(*args, **kwargs):
            it = self.current = Iteration(self.now())
            ok = fn(*args, **kwargs)
            it.t_prep1 = self.now()
            if not ok:
                self.current = None  # an idle pass: nothing was scheduled
            return ok

        return prepare_next_batch

    def _wrap_timed(self, field: str) -> Callable[[Callable], Callable]:
        def make(fn: Callable) -> Callable:
            def timed(*args, **kwargs):
                t0 = self.now()
                try:
                    return fn(*args, **kwargs)
                finally:
                    it = self.current
                    if it is not None:
                        setattr(it, field, getattr(it, field) + self.now() - t0)

            timed.__name__ = getattr(fn, "__name__", "timed")
            return timed

        return make

    def _wrap_generation_step(self, fn: Callable) -> Callable:
        def generation_step(*args, **kwargs):
            it = self.current
            if it is None:  # prepare ran outside the wrapper: time the step anyway
                it = self.current = Iteration(self.now())
                it.t_prep1 = it.t_prep0
            quietly(self._read_layout, it)
            self.iterations.append(it)
            it.t_gen0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                it.t_gen1 = self.now()
                if it.step is None:  # no root forward ran Python (a CUDA-graph replay, compiled code)
                    quietly(self.observer.external_step, self, it)

        return generation_step

    def _wrap_update(self, fn: Callable) -> Callable:
        def update_batch(*args, **kwargs):
            it = self.current
            t0 = self.now()
            # A request's token time: the manager takes the sampled tokens (already on the host)
            # to update its requests — the moment transformers' record_timestamps stamps too.
            for e in (it.layout or ()) if it is not None else ():
                if e[5]:
                    r = self.requests.get(e[0])
                    if r is not None:
                        r.tokens.append(t0)
            try:
                return fn(*args, **kwargs)
            finally:
                if it is not None:
                    it.t_upd0, it.t_upd1 = t0, self.now()
                self.current = None

        return update_batch

    def _read_layout(self, it: Iteration) -> None:
        """The packed batch, from the manager's Python objects (no tensor is read)."""
        lay = []
        for fs in self._io.requests_in_batch:
            st = fs.state
            q = int(fs.query_length)
            rid = st.request_id
            cached = int(st.position_offset) - q  # prepare_batch_tensors already advanced it
            decode = q == 1 and st.generated_len() > 0
            r = self.requests.get(rid)
            if r is None:
                r = self._new_request(rid, len(st.initial_tokens))
            if r.scheduled is None:
                r.scheduled = it.t_prep0
            if decode:
                chunk = None
            else:
                chunk = self.chunks.get(rid, 0)
                self.chunks[rid] = chunk + 1
            lay.append((rid, "decode" if decode else "prefill", q, cached, chunk, bool(fs.has_new_token)))
        it.layout = lay


def jsonable(v: Any) -> Any:
    """``v`` as JSON-able data (a config value: numbers, strings, lists; anything else as text)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    return str(v)


def quietly(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, its failure logged instead of raised (``None``)."""
    try:
        return fn(*args)
    except Exception:  # the probe's own failure must never break the user's serving loop
        log.warning("probe: serving record failed in %s", getattr(fn, "__name__", fn), exc_info=True)
        return None
