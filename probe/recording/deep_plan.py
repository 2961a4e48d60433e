"""Which steps of a deep run are sampled (:class:`DeepPlan`) and what ``deep=`` may be
(:func:`plan_of`): by default the prefill step and a few decode steps spread over the run, each
decode sample far enough from the end for its twin (:data:`~probe.recording.deep_twin.TWIN_AFTER`
steps on) to come; in a run too short for that, spread over all of it (each timed on the run again:
:meth:`~probe.recording.deep.DeepObserver.twin_rerun`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .deep_twin import TWIN_AFTER

#: decode steps a deep run samples by default (beside the prefill step)
DEFAULT_DECODE = 3
#: max_new_tokens assumed where a generate call states none (for spreading the decode samples)
ASSUMED_NEW_TOKENS = 64

@dataclass(frozen=True)
class DeepPlan:
    """Which steps of a deep run are sampled: ``steps`` (explicit step indices) or the prefill
    step and ``decode`` decode steps spread evenly over the run."""

    decode: int = DEFAULT_DECODE
    steps: frozenset[int] | None = None

    def chosen(self, max_new_tokens: Any, *, max_steps: int | None = None, decode_stride: int = 1) -> frozenset[int]:
        """The sampled step indices of one run: within ``max_steps``; decode samples land on
        steps ``decode_stride`` keeps (1, 1 + stride, ...), before the last :data:`TWIN_AFTER` steps
        and more than that apart (each is timed on a step after it); in a run too short for that,
        spread over all its decode steps (each is timed on the run again). Explicit ``steps`` are
        taken as given."""
        if self.steps is not None:
            out = set(self.steps)
        else:
            n = max_new_tokens if isinstance(max_new_tokens, int) and max_new_tokens > 0 else ASSUMED_NEW_TOKENS
            last = max(n - 1, 0)  # the last decode step's index (step 0 is prefill)
            out = {0}
            # a decode sample's ops are timed on a step after it (its twin, deep_twin): never the
            # last steps, and no sample on a step up to its twin
            hi = last - TWIN_AFTER
            if hi >= 1 and self.decode > 0:
                k = min(self.decode, hi)
                prev = -TWIN_AFTER - 1
                for i in range(k):
                    at = 1 + round(i * (hi - 1) / (k - 1)) if k > 1 else 1
                    at = 1 + ((at - 1) // decode_stride) * decode_stride
                    if at > prev + TWIN_AFTER:
                        out.add(at)
                        prev = at
            elif last >= 1 and self.decode > 0:
                # too short a run for a twin inside it: the samples spread over it, timed on the
                # run again (DeepObserver.twin_rerun) where it comes, else on the mode's clock
                k = min(self.decode, last)
                for i in range(k):
                    at = 1 + round(i * (last - 1) / (k - 1)) if k > 1 else 1
                    out.add(1 + ((at - 1) // decode_stride) * decode_stride)
        if max_steps is not None:
            out = {s for s in out if s < max_steps}
        return frozenset(out)

    def describe(self) -> str:
        if self.steps is not None:
            return f"steps {sorted(self.steps)}"
        return f"the prefill step and {self.decode} decode step(s) spread over the run"


def plan_of(deep: Any) -> DeepPlan | None:
    """``probe.attach(deep=...)``: ``None``/``False`` (off), ``True`` (the default plan), an int
    (decode steps to sample beside prefill) or a sequence of step indices.

    Raises:
        ValueError: any other value, with what to pass instead.
    """
    if deep is None or deep is False:
        return None
    if deep is True:
        return DeepPlan()
    if isinstance(deep, int) and not isinstance(deep, bool):
        if deep < 0:
            raise ValueError(f"deep={deep!r}: the number of decode steps to sample must be >= 0")
        return DeepPlan(decode=deep)
    if isinstance(deep, (Sequence, set, frozenset)) and not isinstance(deep, (str, bytes)):
        items = list(deep)
        if items and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            return DeepPlan(steps=frozenset(items))
    raise ValueError(f"deep must be True, False, a number of decode steps to sample (int >= 0) or a list of "
                     f"step indices (ints >= 0, step 0 = prefill); got {deep!r}")
