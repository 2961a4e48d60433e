"""TTFT against a stopwatch around the same ``generate()`` call, measured side by side.

A one-token ``generate()`` of a tiny model built in code (its TTFT is the whole call), timed by
the probe (``runs.ttft_ms``) and by a stopwatch (``time.perf_counter_ns``) around each call;
the ratio of the medians, the per-call ratios and the probe's own start-of-generate work
(``runs.probe_start_ms``) and its closing reads (``runs.probe_end_ms``), both inside the run's
window. What remains between the two is the probe's end-of-generate work after the run's clock
stopped.

    python benchmarks/ttft_stopwatch.py [--calls 60] [--layers 4] [--hidden 64] [--prompt 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import probe  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_llama(layers=args.layers, hidden=args.hidden)
    ids = (torch.arange(args.prompt) % (model.config.vocab_size - 3) + 3).unsqueeze(0)
    watch: list[float] = []
    with probe.attach(model) as p:
        for _ in range(3):  # warm-up, forgotten
            model.generate(ids, max_new_tokens=1, do_sample=False)
        p.clear()
        for _ in range(args.calls):
            t0 = time.perf_counter_ns()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            watch.append((time.perf_counter_ns() - t0) / 1e6)
        runs = p.run.runs
    gen = runs[runs["kind"] == "generate"]
    ttft = gen["ttft_ms"].tolist()
    ratios = sorted(a / b for a, b in zip(ttft, watch))
    med = statistics.median
    print(f"one-token generate, {args.layers} layers of {args.hidden}, prompt {args.prompt}, "
          f"{args.calls} calls, one thread")
    print(f"stopwatch       median {med(watch):8.3f} ms")
    print(f"TTFT            median {med(ttft):8.3f} ms   ratio of medians {med(ttft) / med(watch):.4f}")
    print(f"per-call ratio  min {ratios[0]:.3f}  p10 {ratios[len(ratios) // 10]:.3f}  median {med(ratios):.4f}")
    print(f"probe start     median {gen['probe_start_ms'].median():8.3f} ms (inside TTFT)")
    print(f"probe end       median {gen['probe_end_ms'].median():8.3f} ms (inside TTFT: a one-token call's first token is its end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
