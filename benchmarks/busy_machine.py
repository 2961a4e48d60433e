"""Does the busy-machine detector flag a run beside CPU hogs, and leave a quiet one alone?

The real thing, on this machine: the bundled model's generate() is recorded in rounds, each
round once as the machine is and once beside N busy-loop processes (the hogs: one per core by
default, each stopped after the run and bounded by its own deadline). The two conditions are
interleaved, so slow drift of the machine's own load hits both alike. For every run it prints
the noise figure (probe.noise: run-queue share and wall-beyond-CPU share), whether the run was
flagged, TTFT and TPOT; then the count flagged per condition and the medians.

A machine that is already busy without the hogs is flagged in both conditions: that is the
detector working, not failing. What the script shows then is the difference the hogs make.

    PYTHONPATH=. python3 benchmarks/busy_machine.py [--rounds 3] [--hogs N] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import probe
from probe import models
from probe.recording.noise import BUSY_THRESHOLD_PCT, cores_available

HOG = "import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end:\n    pass\n"


def start_hogs(n: int, secs: float) -> list[subprocess.Popen]:
    """``n`` processes spinning on a CPU for at most ``secs`` seconds each."""
    return [subprocess.Popen([sys.executable, "-c", HOG.format(secs=secs)]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:  # only the processes this script started, by their own handles
        if h.poll() is None:
            h.terminate()
    for h in hogs:
        try:
            h.wait(timeout=5)
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()


def record(model, inputs, new_tokens: int) -> dict:
    with probe.attach(model) as p:
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    run = p.run
    b = run.noise()
    r = run.runs[run.runs["kind"] == "generate"].iloc[0]
    return {"wait": b.wait_pct, "runqueue": b.runqueue_pct, "steps": b.steps_pct, "busy": b.busy,
            "ttft": float(r["ttft_ms"]), "tpot": float(r["tpot_ms_p50"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=cores_available(), help="busy-loop processes (default: one per core)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--hog-seconds", type=float, default=120.0, help="deadline of each hog, in case this script dies")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = models.load_bundled()
    inputs = tok(["我喜欢攀岩"], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up, unrecorded
    print(f"bundled model, {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"{cores_available()} core(s), {args.hogs} hog(s); busy above {BUSY_THRESHOLD_PCT:.0f} %")
    print(f"{'round':>5}  {'condition':<10}{'noise %':>9}{'run-queue %':>13}{'wall>cpu %':>12}  {'flagged':<8}"
          f"{'TTFT ms':>10}{'TPOT p50 ms':>13}")
    seen: dict[str, list[dict]] = {"as is": [], "with hogs": []}
    for i in range(args.rounds):
        for cond in ("as is", "with hogs"):
            hogs = start_hogs(args.hogs, args.hog_seconds) if cond == "with hogs" else []
            try:
                if hogs:
                    time.sleep(0.3)  # let the hogs reach the CPUs
                res = record(model, inputs, args.max_new_tokens)
            finally:
                stop_hogs(hogs)
            seen[cond].append(res)
            print(f"{i + 1:>5}  {cond:<10}{res['wait']:>9.1f}{res['runqueue']:>13.1f}{res['steps']:>12.1f}  "
                  f"{'yes' if res['busy'] else 'no':<8}{res['ttft']:>10.1f}{res['tpot']:>13.2f}")
    print()
    for cond, rs in seen.items():
        print(f"{cond:<10} flagged {sum(r['busy'] for r in rs)}/{len(rs)}   median noise "
              f"{statistics.median(r['wait'] for r in rs):.1f} %   median TTFT "
              f"{statistics.median(r['ttft'] for r in rs):.1f} ms   median TPOT p50 "
              f"{statistics.median(r['tpot'] for r in rs):.2f} ms")
    quiet = statistics.median(r["wait"] for r in seen["as is"])
    hog = statistics.median(r["wait"] for r in seen["with hogs"])
    print(f"hogs raise the median noise figure by {hog - quiet:+.1f} points "
          f"({'the machine was already busy without them' if quiet > BUSY_THRESHOLD_PCT else 'quiet without them'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
