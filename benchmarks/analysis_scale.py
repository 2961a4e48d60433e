"""Analysis at scale: loading a large run, its summary and tree, and the dashboard's first page
over a folder of many small runs, each measured in process CPU time and printed as a ratio to
what it is compared with in the same run.

The large runs are real recordings stretched in time (``report_size.stretch``: a tiny 32-layer
LLaMA generates under the probe, then its decode steps are repeated with shifted step numbers,
KV lengths and start times) and saved with ``Run.save``. Four measurements:

1. ``probe.load`` of each large run against pyarrow's own ``read_table`` + ``to_pandas`` of the
   same parquet files (target: at most 1.5x);
2. ``summary()`` and ``tree()`` of each large run against its load (target: each at most 1x);
3. the dashboard's first page (Streamlit ``AppTest``, one script run, caches cleared) over a
   folder of ``--many`` copies of the small recording, in CPU seconds with the imports made
   beforehand (target: at most 3 s).

Each figure is the least of ``--repeat`` tries (the machine's noise only ever adds time).

    python benchmarks/analysis_scale.py [--calls 1000000] [--big] [--many 500] [--repeat 3] [--out DIR]

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
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    os.environ["PROBE_DASHBOARD_ROOT"] = str(runs_dir.parent)
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=900)
    at.session_state["runs_dir"] = str(runs_dir)
    t0 = time.process_time()
    at.run()
    dt = time.process_time() - t0
    if at.exception or at.error:
        raise RuntimeError(f"the page failed: {[e.value for e in [*at.exception, *at.error]]}")
    return dt


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


def big_case(base, n_calls: int, root: Path, repeat: int) -> list[tuple[str, float, float, float]]:
    """The load, summary and tree rows for a run of ``n_calls`` calls."""
    import probe

    run_dir = root / f"run-{n_calls}"
    stretch(base, n_calls).save(run_dir)
    gc.collect()
    arrow = cpu(lambda: pyarrow_read(run_dir), repeat)
    load = cpu(lambda: probe.load(run_dir), repeat)
    run = probe.load(run_dir)
    n = len(run.calls)

    def fresh(fn):  # a new Run each time: nothing cached from the try before
        def go():
            fn(probe.Run(calls=run.calls, steps=run.steps, runs=run.runs, meta=run.meta))
        return go

    summ = cpu(fresh(lambda r: r.summary()), repeat)
    tree = cpu(fresh(lambda r: r.tree()), repeat)
    del run
    shutil.rmtree(run_dir)
    label = f"{n:,} calls"
    return [(f"probe.load / pyarrow read+to_pandas ({label})", load, arrow, LOAD_TARGET),
            (f"summary() / probe.load ({label})", summ, load, ANALYSIS_TARGET),
            (f"tree() / probe.load ({label})", tree, load, ANALYSIS_TARGET)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000, help="calls of the large run (0: skip)")
    ap.add_argument("--big", action="store_true", help="also a run of 3,450,000 calls")
    ap.add_argument("--many", type=int, default=500, help="runs in the dashboard's folder (0: skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="probe-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    base = record_tiny()
    rows: list[tuple[str, float, float, float]] = []
    for n in [n for n in (args.calls, 3_450_000 if args.big else 0) if n]:
        rows += big_case(base, n, root, args.repeat)
    page = None
    if args.many:
        small = root / "small"
        base.save(small)
        many = root / f"{args.many}-runs"
        for i in range(args.many):
            shutil.copytree(small, many / f"run{i:03d}")
        first_page(root / "small")  # a first script run pays the app's imports (not the page's cost)
        page = min(first_page(many) for _ in range(args.repeat))
    print(f"analysis at scale: process CPU seconds, least of {args.repeat}; ratio = measured / compared")
    print(f"{'measure':<58} {'CPU s':>8} {'vs s':>8} {'ratio':>6} {'target':>7}")
    bad = 0
    for label, got, vs, target in rows:
        ratio = got / vs if vs else float("nan")
        v = verdict(ratio, target)
        bad += v != "PASS"
        print(f"{label:<58} {got:>8.3f} {vs:>8.3f} {ratio:>6.2f} {'<= ' + str(target):>7}  {v}")
    if page is not None:
        v = verdict(page, FIRST_PAGE_TARGET_S)
        bad += v != "PASS"
        print(f"{'dashboard first page, ' + str(args.many) + ' runs (CPU s)':<58} {page:>8.3f} {'':>8} {'':>6} "
              f"{'<= ' + str(FIRST_PAGE_TARGET_S) + ' s':>7}  {v}")
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
