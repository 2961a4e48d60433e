"""`probe run` on a loaded machine: its default thread choice against OMP_NUM_THREADS=1.

Starts one busy process per CPU core (the "other work"), then runs the README's first
command's `probe run` with its default `--threads auto`, and the same command with
`OMP_NUM_THREADS=1`, alternately, ``--pairs`` times; prints each run's TPOT p50 and the ratio of
the medians. The target (issue "the front door", item 10): auto no worse than 2x the one-thread run.

    python3 benchmarks/threads.py [--model smollm2-135m] [--pairs 3] [--new-tokens 16] [--hogs N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _tpot(run_dir: Path) -> tuple[float, int]:
    import probe

    run = probe.load(run_dir)
    r = run.runs[run.runs["kind"] == "generate"].iloc[-1]
    return float(r["tpot_ms_p50"]), int(run.meta.get("torch_threads", -1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    stop = mp.Event()
    hogs = [mp.Process(target=_hog, args=(stop,), daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    time.sleep(20)  # let the one-minute load average see them
    print(f"load average with {args.hogs} busy processes: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    results: dict[str, list[float]] = {"auto": [], "OMP_NUM_THREADS=1": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.pairs):
                order = list(results) if i % 2 == 0 else list(reversed(results))
                for how in order:
                    out = Path(tmp) / f"{how.replace('=', '-')}-{i}"
                    env = dict(os.environ)
                    env.pop("OMP_NUM_THREADS", None)
                    if how != "auto":
                        env["OMP_NUM_THREADS"] = "1"
                    cmd = [sys.executable, "-m", "probe", "run", args.model, "--prompt", "What is rock climbing?",
                           "--max-new-tokens", str(args.new_tokens), "--out", str(out), "--no-report"]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr[-2000:], file=sys.stderr)
                        return 1
                    tpot, threads = _tpot(out)
                    results[how].append(tpot)
                    print(f"pair {i + 1} {how:<18} torch threads {threads}  TPOT p50 {tpot:9.2f} ms")
    finally:
        stop.set()
        for h in hogs:
            h.join(timeout=5)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["auto"] / med["OMP_NUM_THREADS=1"]
    print(f"median TPOT p50: auto {med['auto']:.2f} ms, OMP_NUM_THREADS=1 {med['OMP_NUM_THREADS=1']:.2f} ms; "
          f"ratio {ratio:.2f} (target <= 2.00: {'met' if ratio <= 2.0 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
