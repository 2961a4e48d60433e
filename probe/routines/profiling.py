"""The profiling routine: warm up, record repeated generate calls, and say how far to trust them.

:func:`profile` is what ``probe run`` and ``probe sweep`` do, for Python users too::

    run = probe.profile(model, tok("Hello", return_tensors="pt"), tokenizer=tok,
                        generate_kwargs={"max_new_tokens": 32}, repeat=3)
    print(run.headline())  # prefill vs decode, side by side
    run.save("runs/hello")

One meaning of warm-up: generate calls of the same input with the probe attached, whose
records are then cleared — they warm the model, the allocator and the probe's own signature
interning, so the first recorded call is not the cold one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ContextManager

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..capture.lifecycle import Probe
    from ..analysis.run import Run
    from ..vocab import Depth

log = logging.getLogger(__name__)

WARMUP_HOW = "unrecorded generate calls of the same input with the probe attached, records discarded"


class ProfileError(RuntimeError):
    """A generate call failed while profiling; :attr:`run` keeps every record up to the failure
    (its generate row says ``failed: reason``), and the original exception is the ``__cause__``."""

    def __init__(self, run: "Run", cause: BaseException) -> None:
        super().__init__(f"generate failed after {len(run.steps)} steps: {type(cause).__name__}: {cause}")
        self.run = run


def profile(
    model: "torch.nn.Module",
    inputs: "Mapping[str, Any] | torch.Tensor",
    *,
    tokenizer: Any = None,
    generate_kwargs: Mapping[str, Any] | None = None,
    depth: "Depth" = "blocks",
    warmup: int = 1,
    repeat: int = 1,
    seed: int | None = 0,
    threads: int | None = None,
    keep_text: bool = True,
    model_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    watch: Callable[["Probe"], ContextManager[Any]] | None = None,
    deep: Any = None,
    **attach_options: Any,
) -> "Run":
    """Profile ``model.generate(**inputs, **generate_kwargs)``: warm-up, ``repeat`` recorded calls.

    Args:
        model: a Hugging Face causal LM (anything with ``generate``).
        inputs: the tokenizer's output (``input_ids``, ``attention_mask``) or an ``input_ids`` tensor.
        tokenizer: when given (and ``keep_text``), the run keeps the exact prompt that was run
            (after any chat template) and each call's generated text in ``run.meta["text"]``.
        generate_kwargs: passed to every ``generate`` call (``max_new_tokens``, ``do_sample`` ...).
        depth: ``"blocks"``, ``"sublayers"`` or ``"all"`` (see :func:`probe.attach`).
        warmup: generate calls before the recorded ones, attached and then cleared.
        repeat: recorded generate calls of the same input (their spread shows the noise).
        seed: ``torch.manual_seed`` before every call, so sampled calls repeat; ``None`` leaves it.
        threads: torch's intra-op thread count for the calls (restored afterwards); ``None``
            keeps the current one. On a busy CPU, 1 is often fastest.
        keep_text: ``False`` keeps no text in the run (token ids are always kept).
        model_id: the name the run shows for the model.
        progress: called with a line before each generate call ("warm-up 1/1 (not recorded)").
        watch: a context manager factory entered around each recorded call with the probe
            (``Probe.generate_steps`` gives the live step count), e.g. a progress display.
        deep: after the timed calls, one more generate call of the same inputs and seed as a
            deep run (``True``, an int or a list of steps, as :func:`probe.attach`'s ``deep``):
            its sampled steps' ops and memory ledger join the run, its times count nowhere.
        attach_options: more options of :func:`probe.attach` (``decode_stride``, ``max_steps`` ...).
    Returns:
        The :class:`probe.Run`, with ``meta`` holding ``warmup``, ``repeat``, ``seed``, the
        machine's noise figure, the device's peaks (where known) and the text.
    Raises:
        ProfileError: a generate call failed; its ``run`` holds the records up to the failure.
        ValueError: bad ``warmup``, ``repeat`` or ``threads``.
    """
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0 (unrecorded generate calls); got {warmup!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1 (recorded generate calls); got {repeat!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1; got {threads!r}")
    deep_pass = _deep_observer(deep, attach_options)
    feed = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
    gen = dict(generate_kwargs or {})
    say = progress or (lambda _msg: None)
    watch = watch or (lambda _p: contextlib.nullcontext())

    def one(_i: int) -> None:
        model.generate(**feed, **gen)

    def again(n: int) -> None:  # the deep run's first n tokens once more, without the dispatch mode
        model.generate(**feed, **first_tokens(gen, n))

    run, failure = _record(model, one, depth=depth, warmup=warmup, repeat=repeat, seed=seed, threads=threads,
                           model_id=model_id, progress=say, watch=watch, what="generate",
                           attach_options=attach_options, deep=deep_pass, deep_again=again)
    _annotate(run, warmup=warmup, repeat=repeat, seed=seed)
    if tokenizer is not None and keep_text:
        text = texts(run, tokenizer, feed.get("input_ids"))
        if text:
            run.meta["text"] = text
    if failure is not None:
        raise ProfileError(run, failure) from failure
    return run


def profile_serving(
    model: "torch.nn.Module",
    workload: Any,
    generation_config: Any,
    cache_config: Any,
    *,
    depth: "Depth" = "blocks",
    warmup: int = 0,
    seed: int | None = 0,
    model_id: str | None = None,
    on_result: Callable[[Any], None] | None = None,
    progress: Callable[[str], None] | None = None,
    **attach_options: Any,
) -> "Run":
    """The serving counterpart of :func:`profile`: continuous batching of a workload, recorded.

    Args:
        model: a Hugging Face causal LM with ``generate_batch`` (transformers' continuous batching).
        workload: a :class:`probe.loadgen.Workload` (``probe.loadgen.plan``: arrivals, prompts).
        generation_config: the ``transformers.GenerationConfig`` of every request.
        cache_config: the paged cache's settings (``probe.loadgen.cache_config``).
        depth, seed, model_id, progress, attach_options: as for :func:`profile`.
        warmup: serve the workload this many times first, attached, records cleared (default 0:
            a serving benchmark's cold start is part of what it measures).
        on_result: called with each finished request's output.
    Returns:
        The :class:`probe.Run` (a ``serve`` run with its ``requests`` frame), ``meta`` as for
        :func:`profile` plus ``serve_bench`` (the workload).
    Raises:
        ProfileError: serving failed; its ``run`` holds the records up to the failure.
    """
    from .loadgen import serve

    lags: list[float] = []

    def one(_i: int) -> None:
        lags.clear()  # the recorded serving run's (warm-up runs' records are cleared too)
        serve(model, workload, generation_config, cache_config, on_result=on_result, lag_s=lags)

    run, failure = _record(model, one, depth=depth, warmup=warmup, repeat=1, seed=seed, threads=None,
                           model_id=model_id, progress=progress or (lambda _msg: None),
                           watch=lambda _p: contextlib.nullcontext(), what="serving run",
                           attach_options=attach_options)
    _annotate(run, warmup=warmup, repeat=1, seed=seed)
    run.meta["serve_bench"] = workload.describe()
    if lags:  # how late this process sent the requests against the plan (arrivals count from the send)
        run.meta["serve_bench"]["send_lag_ms_max"] = round(max(lags) * 1e3, 3)
    if failure is not None:
        raise ProfileError(run, failure) from failure
    return run


def _record(model, call: Callable[[int], None], *, depth, warmup: int, repeat: int, seed: int | None,
            threads: int | None, model_id: str | None, progress: Callable[[str], None],
            watch: Callable[["Probe"], ContextManager[Any]], what: str,
            attach_options: dict, deep: Any = None,
            deep_again: Callable[[int], None] | None = None) -> tuple["Run", Exception | None]:
    """Attach, run ``call`` ``warmup`` times and clear, run it ``repeat`` times (then once more as a
    deep run when ``deep``, an unarmed deep observer among the attach options, is given, and
    ``deep_again(n)``, the same call for its first ``n`` new tokens, as the twin of its sampled
    steps that had none in it: ``DeepObserver.twin_rerun``), detach on every path."""
    import torch

    from ..capture.lifecycle import attach

    def reseed() -> None:
        if seed is not None:
            torch.manual_seed(seed)

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    failure: Exception | None = None
    try:
        reseed()
        p = attach(model, depth=depth, model_id=model_id, **attach_options)
        try:
            for i in range(warmup):
                progress(f"warm-up {i + 1}/{warmup} (not recorded) ...")
                reseed()
                call(i)
            p.clear()
            for i in range(repeat):
                progress(f"recording {what} {i + 1}/{repeat} ...")
                reseed()
                with watch(p):
                    call(i)
            if deep is not None:
                progress("deep pass: one more generate, ops and memory of sampled steps (not timed) ...")
                deep.armed = True
                reseed()
                call(repeat)
                if deep_again is not None:
                    def again(n: int) -> None:
                        progress(f"deep pass: {'its prefill' if n == 1 else f'its first {n} tokens'} once more, "
                                 "ops timed by torch.profiler ...")
                        reseed()
                        deep_again(n)

                    deep.twin_rerun(again)
        except Exception as exc:  # keep the partial run: it is the evidence
            failure = exc
        finally:
            p.detach()
        return p.run, failure
    finally:
        if threads is not None:
            torch.set_num_threads(threads_before)


def first_tokens(gen: Mapping[str, Any], n: int) -> dict:
    """``generate`` arguments for the first ``n`` new tokens alone, no fewer (the steps to time
    must be reached: an end-of-sequence token is held back as long), no streamer (the user's
    streamer saw the deep run's tokens already)."""
    out = {k: v for k, v in gen.items() if k not in ("min_new_tokens", "min_length", "max_length", "streamer")}
    out["max_new_tokens"] = out["min_new_tokens"] = n
    return out


def _deep_observer(deep: Any, attach_options: dict) -> Any:
    """The unarmed deep observer ``deep=`` asks for, added to ``attach_options``' observers (or None)."""
    from ..recording.deep import DeepObserver, plan_of

    if "deep" in attach_options:
        raise ValueError("profile(deep=...) runs one deep generate after the timed ones; it takes no attach "
                         "option deep= (use probe.attach(model, deep=...) to make every call a deep run)")
    plan = plan_of(deep)
    if plan is None:
        return None
    obs = DeepObserver(plan, armed=False)
    attach_options["observers"] = [*attach_options.get("observers", ()), obs]
    return obs


def _annotate(run: "Run", *, warmup: int, repeat: int, seed: int | None) -> None:
    """Say in the run what was done to make its numbers trustworthy, and whether the machine was quiet."""
    gen = run.runs[run.runs["kind"] == "generate"]["run_id"].tolist()
    run.meta["warmup"] = {
        "generates": int(warmup),
        "how": WARMUP_HOW,
        # with no warm-up the first recorded call pays one-time start-up: it is the cold one
        "cold_run_ids": gen[:1] if warmup == 0 else [],
    }
    run.meta["repeat"] = int(repeat)
    run.meta["seed"] = seed
    run.meta["noise"] = run.noise().to_dict()
    store_peaks(run)


def store_peaks(run: "Run") -> None:
    """Record the device's roofs with the run (``meta["peaks"]``), where they are known."""
    try:
        from ..analysis.hardware import peaks_for_run

        peaks = peaks_for_run(run)
        if peaks is not None:
            run.meta["peaks"] = peaks.to_dict()
    except Exception as exc:  # roofline data is a bonus, never a reason to lose the run
        log.warning("could not determine device peaks: %s", exc)


def texts(run: "Run", tokenizer: Any, input_ids: Any = None) -> dict:
    """``{"prompt": the first sequence's prompt as run (special tokens kept), "generated": {run_id:
    [text per returned sequence]}}``; parts the tokenizer cannot decode are left out."""
    out: dict[str, Any] = {}
    if input_ids is not None:
        try:
            out["prompt"] = tokenizer.decode(input_ids[0] if getattr(input_ids, "dim", lambda: 1)() > 1 else input_ids,
                                             skip_special_tokens=False)
        except Exception as exc:  # ids outside the vocabulary (a preset's random prompt)
            log.debug("could not decode the prompt: %s", exc)
    generated = {}
    for item in run.generated():
        if item["token_ids"] is None:
            continue
        try:
            generated[item["run_id"]] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in item["token_ids"]]
        except Exception as exc:
            log.debug("could not decode the output of %s: %s", item["run_id"], exc)
    if generated:
        out["generated"] = generated
    return out
