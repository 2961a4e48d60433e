"""A load generator for continuous batching: Poisson arrivals through the manager.

:func:`plan` draws the workload (arrival times, prompt lengths, prompt token ids) from one seed;
:func:`serve` feeds it to ``model.init_continuous_batching()`` at those times from the calling
thread while the manager's loop serves it, and returns each request's output. Attach a probe
first to record it (``probe serve-bench`` does both and saves the run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Workload:
    """Requests to send: ``arrivals_s[i]`` seconds after the start, prompt ``prompts[i]``."""

    arrivals_s: list[float]
    prompts: list[list[int]]
    max_new_tokens: int
    rate: float  # requests per second (inf: all at once)
    seed: int

    def describe(self) -> dict:
        return {"requests": len(self.prompts), "rate_per_s": self.rate if math.isfinite(self.rate) else "inf",
                "prompt_lens": sorted({len(p) for p in self.prompts}), "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "last_arrival_s": round(self.arrivals_s[-1], 3) if self.arrivals_s else 0.0}


def plan(requests: int, rate: float, prompt_lens: list[int], max_new_tokens: int, vocab_size: int,
         seed: int = 0, first_token: int = 3) -> Workload:
    """Draw a workload: exponential gaps of mean ``1/rate`` (Poisson arrivals; ``rate=inf`` sends
    everything at once), each prompt's length uniformly from ``prompt_lens``, its ids uniformly
    from ``[first_token, vocab_size)`` (low ids are usually special tokens)."""
    if requests < 1:
        raise ValueError(f"requests must be >= 1; got {requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second (inf for all at once); got {rate}")
    if not prompt_lens or min(prompt_lens) < 1:
        raise ValueError(f"prompt lengths must be >= 1; got {prompt_lens}")
    if vocab_size <= first_token:
        raise ValueError(f"vocabulary of {vocab_size} tokens is too small")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(requests) if math.isinf(rate) else rng.exponential(1.0 / rate, size=requests)
    gaps[0] = 0.0  # the first request opens the run
    arrivals = np.cumsum(gaps).tolist()
    lens = rng.choice(np.asarray(prompt_lens), size=requests).tolist()
    prompts = [rng.integers(first_token, vocab_size, size=int(n)).tolist() for n in lens]
    return Workload(arrivals, prompts, int(max_new_tokens), float(rate), int(seed))


def cache_config(work: Workload, *, page_size: int = 16, max_batch_tokens: int = 128,
                 num_blocks: int | None = None, **extra: Any):
    """A ``ContinuousBatchingConfig`` sized for ``work``: room for every request at once
    (sizing the paged cache from free memory is slow on a CPU and needless for a benchmark)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if num_blocks is None:
        per_req = math.ceil((max(len(p) for p in work.prompts) + work.max_new_tokens) / page_size) + 1
        num_blocks = per_req * len(work.prompts)
    return ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                    **extra)


def serve(model: Any, work: Workload, generation_config: Any, cb_config: Any, *, timeout_s: float = 600.0,
          on_result: Callable[[Any], None] | None = None, lag_s: list[float] | None = None) -> dict[str, Any]:
    """Send ``work`` through a continuous-batching manager of ``model``; return its outputs by id.

    Requests are added from this thread at their arrival times (``record_timestamps=True``) while
    the manager's own thread serves them; the manager is stopped on every path. ``lag_s``, when
    given, gets each request's send lag: when ``add_request`` was called less its planned
    arrival (this thread can be late when the serving loop starves it; the probe's arrival,
    and so queue and TTFT, count from the call).
    """
    manager = model.init_continuous_batching(generation_config=generation_config,
                                             continuous_batching_config=cb_config)
    results: dict[str, Any] = {}
    ids: list[str] = []
    manager.start()
    try:
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        i = 0
        n = len(work.prompts)
        while len(results) < n:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"{n - len(results)} of {n} requests unfinished after {timeout_s:.0f}s")
            while i < n and now - t0 >= work.arrivals_s[i]:
                if lag_s is not None:
                    lag_s.append(time.perf_counter() - t0 - work.arrivals_s[i])
                rid = manager.add_request(work.prompts[i], request_id=f"req_{i:03d}",
                                          max_new_tokens=work.max_new_tokens, record_timestamps=True)
                if rid is None:
                    raise RuntimeError("the manager refused a request (its loop is stopping or died)")
                ids.append(rid)
                i += 1
            wait = (work.arrivals_s[i] - (time.perf_counter() - t0)) if i < n else 0.5
            out = manager.get_result(timeout=max(0.001, min(wait, 0.5)))
            if out is not None and out.is_finished():
                results[out.request_id] = out
                if on_result is not None:
                    on_result(out)
            elif out is None and i >= n and not manager.is_running():
                break
    finally:
        manager.stop(block=True, timeout=30)
    return results
