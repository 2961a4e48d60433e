"""What timing the sampling stages adds to each generate step, measured side by side.

The lists generate builds (temperature, top-k, top-p, repetition penalty and the stopping
criteria, as transformers builds them) are applied plainly and through the probe's timed
lists, interleaved, on one CPU thread; the minimum process CPU time of the repeats is kept for
each. The difference is the probe's host cost per step for these stages (it lands in the
step's ``remainder``, which is why it is measured here rather than in a recorded run).

    python benchmarks/sampling_overhead.py [--vocab 32000] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.recording.sampling import SamplingRecorder, _RunRec, _timed_types  # noqa: E402


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
