"""What timing the sampling stages adds to each generate step, measured side by side.

The lists generate builds (temperature, top-k, top-p, repetition penalty and the stopping
criteria, as transformers builds them) are applied plainly and through the probe's timed
lists, interleaved, on one CPU thread; the minimum process CPU time of the repeats is kept for
each. The difference is the probe's host cost per step for these stages (it lands in the
step's ``remainder``, which is why it is measured here rather than in a recorded run).

Then each processor's stage against a stopwatch on that processor's own ``__call__``, and
against what a one-processor ``LogitsProcessorList`` call costs (how stages were once timed),
interleaved round by round, medians of wall time (``time.perf_counter_ns``, the probe's clock);
and the ``dispatch`` stage against the plain list call less its processors' stopwatch times.

    python benchmarks/sampling_overhead.py [--vocab 32000] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.recording.sampling import SamplingRecorder, _RunRec, _timed_types  # noqa: E402
from probe.recording.stages import DISPATCH  # noqa: E402


def lists(vocab: int):
    from transformers import (LogitsProcessorList, MaxLengthCriteria, RepetitionPenaltyLogitsProcessor,
                              StoppingCriteriaList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(10), TopPLogitsWarper(0.85)])
    crits = StoppingCriteriaList([MaxLengthCriteria(max_length=10_000)])
    return procs, crits


def best_ns(fn, repeats: int) -> int:
    best = None
    for _ in range(repeats):
        t0 = time.process_time_ns()
        fn()
        dt = time.process_time_ns() - t0
        best = dt if best is None or dt < best else best
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    procs, crits = lists(args.vocab)
    timed_procs, timed_crit = _timed_types()
    rec = SamplingRecorder(model=None)
    run = rec._cur = _RunRec("bench")
    run.step = 0
    tp, tc = timed_procs(procs, rec, run), timed_crit(crits, rec, run)
    ids = torch.randint(0, args.vocab, (1, 64))
    scores = torch.randn(1, args.vocab)

    def plain():
        procs(ids, scores)
        crits(ids, None)

    def timed():
        tp(ids, scores)
        tc(ids, None)

    a = b = None
    for _ in range(5):  # interleaved rounds; the minimum of each side over all rounds
        x, y = best_ns(plain, args.repeats // 5), best_ns(timed, args.repeats // 5)
        a = x if a is None else min(a, x)
        b = y if b is None else min(b, y)
        del run.c_step[:], run.c_stage[:], run.c_ns[:], run.c_ev[:]
    stages = len(procs) + 1
    print(f"vocab {args.vocab}, {len(procs)} processors + stopping, one thread, min of {args.repeats} "
          f"(process CPU time)")
    print(f"plain lists  {a / 1e3:9.1f} us per step")
    print(f"timed lists  {b / 1e3:9.1f} us per step   ratio {b / a:.3f}")
    print(f"added        {(b - a) / 1e3:9.1f} us per step ({(b - a) / 1e3 / stages:.1f} us per stage)")
    print()
    per_stage(procs, tp, run, ids, scores, args.repeats)
    return 0


def per_stage(procs, tp, run, ids, scores, repeats: int) -> None:
    """Each processor's stage vs a stopwatch on its own ``__call__``, interleaved; medians."""
    from transformers import LogitsProcessorList

    now = time.perf_counter_ns
    names = [type(p).__name__ for p in procs]
    ones = [LogitsProcessorList([p]) for p in procs]
    own: list[list[int]] = [[] for _ in procs]
    one: list[list[int]] = [[] for _ in procs]
    stage: list[list[int]] = [[] for _ in procs]
    dispatch: list[int] = []
    whole: list[int] = []
    for _ in range(repeats):
        x = scores  # each processor gets the scores the one before it returned, as in the list
        for i, p in enumerate(procs):  # the stopwatch on the processor's own __call__
            t0 = now()
            x = p(ids, x)
            own[i].append(now() - t0)
        x = scores
        for i, lst in enumerate(ones):  # a one-processor list call
            t0 = now()
            x = lst(ids, x)
            one[i].append(now() - t0)
        t0 = now()
        procs(ids, scores)  # the plain list: what dispatch is compared with
        whole.append(now() - t0)
        n0 = len(run.c_ns)
        tp(ids, scores)  # the probe's timed list: one entry per processor, then dispatch
        for i in range(len(procs)):
            stage[i].append(run.c_ns[n0 + i])
        assert run.stages[run.c_stage[n0 + len(procs)]][0] == DISPATCH
        dispatch.append(run.c_ns[n0 + len(procs)])
        del run.c_step[:], run.c_stage[:], run.c_ns[:], run.c_ev[:]
    med = statistics.median
    print(f"each stage vs a stopwatch on the processor's own __call__, median of {repeats} interleaved rounds "
          f"(wall time)")
    print(f"{'processor':34s} {'own us':>8s} {'stage us':>9s} {'ratio':>6s} {'1-list us':>10s} {'ratio':>6s}")
    for i, name in enumerate(names):
        o, st, ol = med(own[i]), med(stage[i]), med(one[i])
        print(f"{name:34s} {o / 1e3:8.1f} {st / 1e3:9.1f} {st / o:6.2f} {ol / 1e3:10.1f} {ol / o:6.2f}")
    rest = med(whole) - sum(med(x) for x in own)
    print(f"{'dispatch (list call - processors)':34s} {rest / 1e3:8.1f} {med(dispatch) / 1e3:9.1f}"
          f"   (plain list {med(whole) / 1e3:.1f} us)")


if __name__ == "__main__":
    raise SystemExit(main())
