"""What a probe puts on a model besides its observers: the block wrappers, the ``generate``
marker, and the measurement of the wrappers' own cost.

Each function hands whatever it installs to the caller's ``ExitStack`` (the probe's,
:mod:`probe.capture.lifecycle`), which removes it on every path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..recording import attnfn, hotpath
from ..recording.discovery import ModuleInfo
from ..recording.generation import generation_settings, inputs_of
from ..recording.recorder import Recorder

log = logging.getLogger(__name__)


class CompiledModelWarning(UserWarning):
    """Part of the model ran as compiled code, where per-block wrappers do not run as written."""


COMPILED_ADVICE = (
    "per-block records are missing for steps that ran compiled code (torch.compile traces the "
    "model's forward into its graph instead of running the probe's wrappers); step-level timing "
    "(forward, outside, TTFT, TPOT) is still measured. For per-block cost, profile the eager model "
    "(e.g. generate(..., disable_compile=True)); compare its step times with the compiled run's."
)


def calibrate(rec: Recorder, device: Any, clock: Callable[[], int] | None) -> dict:
    """The wrappers' own cost per call, measured now with a throwaway recorder of the same kind."""
    if clock is not None:  # an injected clock: the instrument costs nothing on it
        return {"call_ns": 0.0, "inside_ns": 0.0, "method": "injected clock"}
    probe_rec = Recorder(rank=0, decode_stride=1, max_steps=None, cuda_device=rec.cuda_device,
                         track_memory=rec.track_memory, offload_total=rec.offload_total)
    make_for = wrapper_factory(probe_rec, None)
    try:
        cal = hotpath.calibrate(lambda fn, cols: make_for(0)(fn), lambda: probe_rec.cols, device=device or "cpu")
    except Exception:  # calibration must never cost the user their attach
        log.warning("probe: could not measure the wrappers' own cost; none is subtracted", exc_info=True)
        return {"call_ns": 0.0, "inside_ns": 0.0, "method": "failed"}
    cal["method"] = "min of interleaved rounds, wrapped vs bare identity module, at attach"
    cal["native"] = hotpath.C is not None and not rec.needs_full_wrappers  # an injected clock returned above
    return cal


def mark_generate(model: nn.Module, rec: Recorder, forwards: list, stack: contextlib.ExitStack,
                  on_generate: Callable[[], None] | None = None) -> None:
    """Wrap ``model.generate`` (on the instance) so that each call opens and closes a run
    (``on_generate()`` first: what the probe checks again at each generate)."""
    gen = getattr(model, "generate", None)
    if gen is None or not callable(gen):
        return
    had = "generate" in model.__dict__
    original = model.__dict__.get("generate", gen)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        entered = rec.now()  # the run's window opens here, as a stopwatch around the call would
        try:
            hotpath.check_forwards(forwards)
            if on_generate is not None:
                on_generate()
            rec.begin_generate(*inputs_of(args, kwargs), generation_settings(model, kwargs), entered=entered)
        except Exception:  # the probe's own failure must never cost the user their generate
            log.warning("probe: could not mark the start of generate(); its forwards are "
                        "recorded as plain forwards", exc_info=True)
            rec.abandon_generate()
            return original(*args, **kwargs)
        try:
            out = original(*args, **kwargs)
        except BaseException as exc:
            end_quietly(rec, None, f"failed: {type(exc).__name__}: {exc}")
            raise
        run = end_quietly(rec, out, "ok")
        n = sum(1 for st in run.steps if st.compiled) if run is not None else 0
        if n:
            warnings.warn(f"probe: {n} of {len(run.steps)} steps of this generate() ran compiled code: "
                          f"{COMPILED_ADVICE}", CompiledModelWarning, stacklevel=2)
        return out

    # a partial of the user's generate, like the forward wrappers: its signature and attributes
    # are theirs, and copying or pickling the model says to detach first
    marked = hotpath.PartialWrapper(original, generate)
    model.__dict__["generate"] = marked

    def unpatch() -> None:
        if model.__dict__.get("generate") is marked:
            if had:
                model.__dict__["generate"] = original
            else:
                del model.__dict__["generate"]

    stack.callback(unpatch)


def wrapper_factory(rec: Recorder, clock: Callable[[], int] | None) -> Callable[[int], Callable[[Callable], Callable]]:
    """``make_for(module index)(forward)``: the wrapper that records that module into ``rec``."""
    if rec.needs_full_wrappers:
        return lambda idx: lambda fn: hotpath.full_wrapper(fn, rec.cols, rec.intern_for(idx), clock,
                                                           rec.extras.call_begin, rec.extras.call_end,
                                                           rec.extras.truncate)
    return lambda idx: lambda fn: hotpath.cpu_wrapper(fn, rec.cols, rec.intern_for(idx), clock,
                                                      interned=rec.interned, index=idx)


def record_attention_functions(holder: Any, selected: list, rec: Recorder, make_for: Callable[[int], Callable],
                               stack: contextlib.ExitStack) -> None:
    """Record the attention function called inside each recorded attention module as a call of
    its own (:mod:`probe.recording.attnfn`), a pseudo-module one level below it."""
    callers = {}
    for mod, info in selected:
        if info.role != "attention":
            continue
        idx = len(rec.modules)
        rec.modules.append(ModuleInfo(attnfn.pseudo_name(info.name), "AttentionFunction", attnfn.ROLE,
                                      info.depth + 1, info.layer))
        if len(rec.placements) == idx:
            rec.placements.append(None)  # no weights of its own
        callers[mod] = make_for(idx)(attnfn.through)
    if callers:
        attnfn.acquire(holder, callers)
        stack.callback(attnfn.release, holder, callers)  # the stack keeps the callers alive till then


def end_quietly(rec: Recorder, out: Any, status: str):
    """Close the generate() run; the probe's own failure here is logged, never raised."""
    try:
        return rec.end_generate(out, status)
    except Exception:  # keep the user's result (or their exception) whatever happens here
        log.warning("probe: could not close the record of this generate()", exc_info=True)
        rec.abandon_generate()
        return None


def has_cuda_tensors(model: nn.Module) -> bool:
    """The model holds a CUDA parameter or buffer."""
    return any(t.is_cuda for t in model.parameters()) or any(t.is_cuda for t in model.buffers())


def cuda_device_of(model: nn.Module) -> torch.device:
    """The device of the model's first CUDA parameter (else the current CUDA device)."""
    for t in model.parameters():
        if t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())
