"""Analysis at scale: loading a large run (time and peak memory), its summary and tree, ``probe
report`` and ``probe compare``, and the dashboard's first page over a folder of many small runs,
each measured in process CPU time and printed as a ratio to what it is compared with in the same
run.

The large runs are real recordings stretched in time (``report_size.stretch``: a tiny 32-layer
LLaMA generates under the probe, then its decode steps are repeated with shifted step numbers,
KV lengths and start times) and saved with ``Run.save``. The measurements:

1. ``probe.load`` of each large run against pyarrow's own ``read_table`` + ``to_pandas`` of the
   same parquet files (target: at most 1.5x);
2. ``summary()`` and ``tree()`` of each large run against its load (target: each at most 1x);
3. the dashboard's first page (Streamlit ``AppTest``, one script run, caches cleared) over a
   folder of ``--many`` copies of the small recording, in CPU seconds with the imports made
   beforehand (target: at most 3 s).

4. the peak memory of ``probe.load`` of each large run: the growth of the resident set (VmHWM, reset
   after the imports) in a fresh process, against the loaded frames' ``memory_usage(deep=True)``
   (target: at most 1.3x), and the calls frame's bytes per row (target: at most 120);
5. ``probe report --format html`` of the 1 M-call run against its load (target: at most 3x), and
   of the small recording beyond its load (target: at most 2 s), both in this process with the
   imports made beforehand; the small report is also run as a whole command in a fresh process,
   imports included, which must not import torch or transformers (model facts come from the run);
6. ``probe compare`` of two 1 M-call runs (two recordings, stretched) against loading both
   (target: at most 3x).

Each figure is the least of ``--repeat`` tries (the machine's noise only ever adds time).

    python benchmarks/analysis_scale.py [--calls 1000000] [--big] [--many 500] [--repeat 3] [--no-report] [--out DIR]

``--big`` adds a run of 3,450,000 calls (about 4 GB of memory while it is built).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's recorder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_size import record_tiny, stretch  # noqa: E402

LOAD_TARGET = 1.5  # probe.load / (pyarrow read_table + to_pandas)
ANALYSIS_TARGET = 1.0  # summary() or tree() / probe.load
FIRST_PAGE_TARGET_S = 3.0  # dashboard's first page over the many-runs folder, CPU seconds
MEMORY_TARGET = 1.3  # RSS growth of probe.load in a fresh process / the loaded frames' memory
ROW_BYTES_TARGET = 120.0  # the calls frame in memory, bytes per row
REPORT_TARGET = 3.0  # probe report (html) of the 1 M-call run / probe.load of it
REPORT_SMALL_TARGET_S = 2.0  # probe report (html) of a small run beyond its load, CPU seconds
COMPARE_TARGET = 3.0  # probe compare of two 1 M-call runs / probe.load of both

#: run in a fresh process: the resident set's growth while ``probe.load`` reads argv[1]
MEMORY_SCRIPT = r"""
import json, sys
import probe
probe.load(sys.argv[2])  # a small run first: every lazy import made, none counted


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024


try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) starts again from the resident set now
    before = status("VmRSS")
except OSError:
    before = status("VmHWM")
run = probe.load(sys.argv[1])
peak = status("VmHWM")
frames = sum(int(getattr(run, k).memory_usage(deep=True).sum()) for k in ("calls", "steps", "runs", "sampling",
                                                                           "requests"))
print(json.dumps({"growth": peak - before, "frames": frames, "calls": int(run.calls.memory_usage(deep=True).sum()),
                  "rows": len(run.calls)}))
"""

#: run in a fresh process: the whole `probe report` command's CPU time, and the heavy modules it imported
REPORT_SCRIPT = r"""
import contextlib, io, json, resource, sys
from probe.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["report", sys.argv[1], "--format", "html", "--out", sys.argv[2], "--force"])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "cpu": ru.ru_utime + ru.ru_stime,
                  "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def cpu(fn, repeat: int) -> float:
    """Least process CPU seconds of ``repeat`` calls of ``fn`` (a collection before each)."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def pyarrow_read(run_dir: Path) -> None:
    """Every parquet file of the run read and converted as pyarrow does it by default."""
    import pyarrow.parquet as pq

    for f in sorted(run_dir.glob("*.parquet")):
        pq.read_table(f).to_pandas()


def first_page(runs_dir: Path) -> float:
    """CPU seconds of one cold AppTest script run of the dashboard over ``runs_dir``."""
    from dashboard_load import cold_page

    os.environ["PROBE_DASHBOARD_ROOT"] = str(runs_dir.parent)
    return cold_page(runs_dir, clock=time.process_time, timeout=900)[0]


def cli(argv: list[str]) -> None:
    """``probe ARGV`` in this process, its printing dropped."""
    import contextlib
    import io

    from probe.cli import main as probe_main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = probe_main(argv)
    if rc not in (0, None):
        raise RuntimeError(f"probe {' '.join(argv)} exited with {rc}")


def fresh_process(script: str, *args: str) -> dict:
    """The JSON that ``script`` prints, run with ``args`` in a new Python process."""
    import json
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_rows(run_dir: Path, small: Path, label: str) -> list[tuple]:
    """Peak RSS growth of a load in a fresh process against its frames, and the calls' bytes per row."""
    got = fresh_process(MEMORY_SCRIPT, str(run_dir), str(small))
    return [(f"load peak RSS growth / frames' memory ({label})", got["growth"] / 1e6, got["frames"] / 1e6,
             MEMORY_TARGET, "MB"),
            (f"calls frame in memory, bytes per row ({label})", got["calls"] / max(got["rows"], 1), None,
             ROW_BYTES_TARGET, "B")]


def report_rows(run_dir: Path, root: Path, repeat: int, small: bool) -> list[tuple]:
    """``probe report --format html`` of ``run_dir`` against its load (imports made beforehand)."""
    import probe

    out = root / "report.html"
    load = cpu(lambda: probe.load(run_dir), repeat)
    report = cpu(lambda: cli(["report", str(run_dir), "--format", "html", "--out", str(out), "--force"]), repeat)
    if small:
        return [("probe report beyond its load, small run (CPU s)", report - load, None, REPORT_SMALL_TARGET_S, "s")]
    n = len(probe.load(run_dir, columns=[]).calls)
    return [(f"probe report (html) / probe.load ({n:,} calls)", report, load, REPORT_TARGET, "s")]


def compare_row(a: Path, b: Path, root: Path, repeat: int) -> tuple:
    """``probe compare A B`` against loading both."""
    import probe

    load = cpu(lambda: (probe.load(a), probe.load(b)), repeat)
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(root / "compare", ignore_errors=True)
        gc.collect()
        t0 = time.process_time()
        cli(["compare", str(a), str(b), "--out", str(root / "compare")])
        best = min(best, time.process_time() - t0)
    return ("probe compare / probe.load of both (2 runs)", best, load, COMPARE_TARGET, "s")


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


def big_case(base, n_calls: int, root: Path, repeat: int, small: Path) -> list[tuple]:
    """The load, summary, tree and memory rows for a run of ``n_calls`` calls (the run's folder is
    kept for the report and compare rows)."""
    import probe

    try:
        from probe.analysis.memo import clear as forget  # the tables kept per pair of frames
    except ImportError:  # the code before they were kept (for a before/after run of this script)
        def forget():
            return None

    run_dir = root / f"run-{n_calls}"
    stretch(base, n_calls).save(run_dir)
    gc.collect()
    arrow = cpu(lambda: pyarrow_read(run_dir), repeat)
    load = cpu(lambda: probe.load(run_dir), repeat)
    run = probe.load(run_dir)
    n = len(run.calls)

    def fresh(fn):  # a new Run each time and no table kept of these frames: nothing from the try before
        def go():
            forget()
            fn(probe.Run(calls=run.calls, steps=run.steps, runs=run.runs, meta=run.meta))
        return go

    summ = cpu(fresh(lambda r: r.summary()), repeat)
    tree = cpu(fresh(lambda r: r.tree()), repeat)
    del run
    label = f"{n:,} calls"
    return [(f"probe.load / pyarrow read+to_pandas ({label})", load, arrow, LOAD_TARGET, "s"),
            (f"summary() / probe.load ({label})", summ, load, ANALYSIS_TARGET, "s"),
            (f"tree() / probe.load ({label})", tree, load, ANALYSIS_TARGET, "s"),
            *memory_rows(run_dir, small, label)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000, help="calls of the large run (0: skip)")
    ap.add_argument("--big", action="store_true", help="also a run of 3,450,000 calls")
    ap.add_argument("--many", type=int, default=500, help="runs in the dashboard's folder (0: skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-report", action="store_true", help="skip the probe report and probe compare rows")
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="probe-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    base = record_tiny()
    small = root / "small"
    base.save(small)
    rows: list[tuple] = []
    for n in [n for n in (args.calls, 3_450_000 if args.big else 0) if n]:
        rows += big_case(base, n, root, args.repeat, small)
    heavy = None
    if not args.no_report:
        cli(["report", str(small), "--format", "html", "--out", str(root / "warm.html"), "--force"])  # imports
        rows += report_rows(small, root, args.repeat, small=True)
        whole = fresh_process(REPORT_SCRIPT, str(small), str(root / "fresh.html"))
        heavy = whole["heavy"]
        rows.append(("probe report, small run, whole command in a new process (CPU s)", whole["cpu"], None, None, "s"))
        if args.calls:
            big = root / f"run-{args.calls}"
            rows += report_rows(big, root, args.repeat, small=False)
            other = root / f"run-{args.calls}-b"
            stretch(record_tiny(seed=1), args.calls).save(other)  # another recording, as compared runs are
            cli(["compare", str(small), str(small), "--out", str(root / "warm-compare")])  # imports
            rows.append(compare_row(big, other, root, args.repeat))
    page = None
    if args.many:
        from dashboard_load import many_runs

        many = many_runs(small, root / f"{args.many}-runs", args.many)
        first_page(small)  # a first script run pays the app's imports (not the page's cost)
        page = min(first_page(many) for _ in range(args.repeat))
    print(f"analysis at scale: process CPU seconds, least of {args.repeat}; ratio = measured / compared")
    print(f"{'measure':<66} {'value':>9} {'vs':>9} {'ratio':>6} {'target':>8}")
    bad = 0
    for label, got, vs, target, unit in rows:
        ratio = got / vs if vs else float("nan")
        judged = ratio if vs is not None else got
        v = "" if target is None else verdict(judged, target)
        bad += v == "FAIL"
        shown = "" if target is None else ("<= " + f"{target:g}" + ("" if vs is not None else f" {unit}"))
        print(f"{label:<66} {got:>9.3f} {'' if vs is None else f'{vs:>9.3f}':>9} "
              f"{'' if vs is None else f'{ratio:>6.2f}':>6} {shown:>8}  {v}")
    if heavy is not None:
        print(f"modules `probe report` imported of torch, transformers: {', '.join(heavy) or 'none'}")
        bad += bool(heavy)
    if page is not None:
        v = verdict(page, FIRST_PAGE_TARGET_S)
        bad += v != "PASS"
        print(f"{'dashboard first page, ' + str(args.many) + ' runs (CPU s)':<66} {page:>9.3f} {'':>9} {'':>6} "
              f"{'<= ' + str(FIRST_PAGE_TARGET_S) + ' s':>8}  {v}")
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
