"""Dashboard load + Overview draw time for a run of 1,000,000 call rows (target: under 5 s).

The big run is a real recording stretched in time (``report_size.stretch``: a tiny 32-layer
LLaMA generates under the probe, then its decode steps are repeated with shifted step numbers,
KV lengths and start times) and saved with ``Run.save``. Three measurements, each cold (caches
cleared, files read again) and side by side with the unstretched recording:

1. the data path: ``probe.load`` + filter options + the Overview's figures, serialised to the
   JSON Streamlit sends to the browser; and ``probe.load`` + the Roofline view's cost model
   (FLOPs and bytes of every call, the roofline per block and phase);
2. the app under Streamlit's ``AppTest``: one full script run of the Overview page;
3. (with ``/usr/bin/chromium``) ``probe dashboard`` in headless Chromium: page open until both
   Overview charts are drawn, on a new server (its first session imports the app: torch,
   pandas, plotly, streamlit) and again on the same, warm server.
4. a folder of many runs (``--many 500``: copies of the small recording) against a folder of
   two: under ``AppTest``, the first page (every run read once) and then the clicks a user
   makes, interleaved between the two folders and timed: a rerun with nothing changed, each
   view, picking other runs, a phase filter, and the same with 20 runs selected; and 20 runs
   not read yet picked one click at a time, as a user adds them (the slowest click). Target:
   every click within 0.5 s at 500 runs.

    python benchmarks/dashboard_load.py [--rows 1000000] [--repeat 3] [--out DIR] [--no-browser]
                                        [--many 500] [--only-many]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's recorder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_size import record_tiny, stretch  # noqa: E402

TARGET_S = 5.0
CLICK_TARGET_S = 0.5
CHROMIUM = "/usr/bin/chromium"


def data_path(run_dir: Path) -> float:
    """Seconds to load ``run_dir`` and build + serialise the Overview, as the app does."""
    from probe.dashboards import data
    from probe.reports import figures

    t0 = time.perf_counter()
    run = data.load_run(run_dir, run_dir.name)
    data.options(run)
    run = data.apply_filters(run, data.Filters())
    figs = [figures.phase_blocks(run.calls, run.steps, by="role"), figures.step_breakdown(run.calls, run.steps)]
    figures.headline(run.runs, run.steps, meta=run.meta)
    for f in figs:
        f.to_json()
    return time.perf_counter() - t0


def roofline_path(run_dir: Path) -> float:
    """Seconds to load ``run_dir`` and build what the Roofline view shows (cost of every call)."""
    from probe.dashboards import data
    from probe.dashboards.cost_views import roofline_parts

    t0 = time.perf_counter()
    parts = roofline_parts(data.load_run(run_dir, run_dir.name))
    if parts["table"] is None:
        raise RuntimeError(f"no cost estimate: {parts['view'].note}")
    return time.perf_counter() - t0


def cold_page(runs_dir: Path, clock=time.perf_counter, timeout: int = 300):
    """One cold AppTest script run of the dashboard over ``runs_dir`` (caches cleared):
    ``(seconds on clock, the AppTest)``; raises if the page failed."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.session_state["runs_dir"] = str(runs_dir)
    t0 = clock()
    at.run()
    dt = clock() - t0
    if at.exception or at.error:
        raise RuntimeError(f"the page failed: {[e.value for e in [*at.exception, *at.error]]}")
    return dt, at


def app_test(runs_dir: Path) -> float:
    """Seconds for one cold AppTest run of the Overview over ``runs_dir``."""
    dt, at = cold_page(runs_dir)
    if len(at.get("plotly_chart")) != 2:
        raise RuntimeError("the Overview did not draw its two charts")
    return dt


def many_runs(run_dir: Path, folder: Path, n: int) -> Path:
    """``n`` copies of the saved run ``run_dir`` in the runs folder ``folder`` (``run000`` ...), made
    afresh where an earlier measurement (``--out`` given again) left the folder."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    for i in range(n):
        shutil.copytree(run_dir, folder / f"run{i:03d}")
    return folder


def clicks(folders: list[Path], repeat: int) -> tuple[list[float], dict[str, list[tuple[list[float], list[float]]]]]:
    """Each click a user makes, timed on every folder in turn (interleaved), as AppTest reruns
    the script (what the server does on a click, before the browser draws).

    Returns:
        the first page's wall seconds per folder (every run read once), and per click and
        folder the (wall seconds, process CPU seconds) of each repeat.
    """
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    os.environ.setdefault("PROBE_DASHBOARD_ROOT", str(Path(folders[0]).parent))
    st.cache_resource.clear()
    st.cache_data.clear()
    apps, first = [], []
    for d in folders:
        at = AppTest.from_file(str(APP), default_timeout=900)
        at.session_state["runs_dir"] = str(d)
        t0 = time.perf_counter()
        at.run()
        first.append(time.perf_counter() - t0)
        if at.exception or at.error:
            raise RuntimeError(f"the page failed: {[e.value for e in [*at.exception, *at.error]]}")
        apps.append(at)
    out: dict[str, list[tuple[list[float], list[float]]]] = {}

    def timed(label: str, act) -> None:
        for k, at in enumerate(apps):
            names = at.sidebar.multiselect(key="runs").options
            w, c = time.perf_counter(), time.process_time()
            act(at, names).run()
            w, c = time.perf_counter() - w, time.process_time() - c
            if at.exception:
                raise RuntimeError(f"{label}: {[e.value for e in at.exception]}")
            slot = out.setdefault(label, [([], []) for _ in apps])[k]
            slot[0].append(w)
            slot[1].append(c)

    for i in range(repeat):
        timed("rerun, nothing changed", lambda at, n: at)
        for view in ("Layers", "Timeline", "Data", "Overview"):
            timed(f"view {view}", lambda at, n, view=view: at.sidebar.radio(key="view").set_value(view))
        timed("pick other runs", lambda at, n, i=i: at.sidebar.multiselect(key="runs").set_value(n[i % len(n):][:2]))
        timed("pick the last run", lambda at, n: at.sidebar.multiselect(key="runs").set_value(n[-1:]))
        timed("phase filter: decode only", lambda at, n: at.sidebar.multiselect(key="phases").set_value(["decode"]))
        timed("phase filter: all", lambda at, n: at.sidebar.multiselect(key="phases").set_value(["prefill", "decode"]))
        # the case: 20 runs selected (as many as a folder has, where it has fewer), then each view
        timed("pick 20 runs", lambda at, n: at.sidebar.multiselect(key="runs").set_value(n[:20]))
        for view in ("Layers", "Timeline", "Data", "Overview"):
            timed(f"20 runs: view {view}", lambda at, n, view=view: at.sidebar.radio(key="view").set_value(view))
        timed("20 runs: phase filter decode", lambda at, n: at.sidebar.multiselect(key="phases").set_value(["decode"]))
        timed("20 runs: phase filter all", lambda at, n: at.sidebar.multiselect(key="phases").set_value(["prefill", "decode"]))
        timed("back to one run", lambda at, n: at.sidebar.multiselect(key="runs").set_value(n[-1:]))
        if i == 0:  # as a user picks them: one more run a click, up to 20 (runs not read yet), the slowest
            for k in range(1, 21):
                timed("add runs one by one to 20", lambda at, n, k=k: at.sidebar.multiselect(key="runs").set_value(
                    (n[20:] or n)[:k]))
    return first, out


def many_case(run_dir: Path, root: Path, n: int, repeat: int, rows: int) -> None:
    """Print the clicks over ``n`` copies of ``run_dir`` against 2 copies (see the module docstring)."""
    two = many_runs(run_dir, root / "two-runs", 2)
    many = many_runs(run_dir, root / f"{n}-runs", n)
    first, got = clicks([two, many], repeat)
    print(f"runs folders of copies of one recording ({rows:,} call rows): 2 runs and {n} runs; first page "
          f"(every run read once) {first[0]:.2f} s and {first[1]:.2f} s")
    print(f"\nclicks (AppTest reruns), {repeat} repeats interleaved; CPU = min process CPU seconds, "
          f"wall = max seconds; target: {n} runs within {CLICK_TARGET_S} s")
    print(f"{'click':<28} {'CPU 2':>7} {'CPU ' + str(n):>8} {'ratio':>6} {'wall 2':>7} {'wall ' + str(n):>9}  within")
    for label, ((w1, c1), (wn, cn)) in got.items():
        print(f"{label:<28} {min(c1):>7.3f} {min(cn):>8.3f} {min(cn) / min(c1):>6.2f} {max(w1):>7.3f} "
              f"{max(wn):>9.3f}  {'yes' if max(wn) <= CLICK_TARGET_S else 'NO'}")


def browser(runs_dirs: list[Path], repeat: int) -> dict[Path, tuple[list[float], list[float]]]:
    """Per runs folder: seconds from opening the page to both Overview charts drawn.

    Each of ``repeat`` fresh servers is opened twice: cold (the server's first session imports
    the app and reads the run) and then warm (imports done, run cached; the browser still
    fetches and runs Streamlit's and plotly's JavaScript in a new page).

    Returns:
        folder -> (cold seconds, warm seconds).
    """
    from playwright.sync_api import sync_playwright

    drawn = ("() => { const p = [...document.querySelectorAll('.js-plotly-plot')];"
             " return p.length === 2 && p.every(e => e.querySelector('.trace')); }")
    out: dict[Path, tuple[list[float], list[float]]] = {}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                               "--disable-background-networking"])
        try:
            for d in runs_dirs:
                out[d] = ([], [])
                for _ in range(repeat):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    proc = subprocess.Popen([sys.executable, "-m", "probe", "dashboard", str(d), "--port", str(port)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        _wait_health(port, proc)
                        for times in out[d]:
                            page = b.new_page(viewport={"width": 1400, "height": 1000})
                            t0 = time.perf_counter()
                            page.goto(f"http://127.0.0.1:{port}/")
                            page.wait_for_function(drawn, timeout=120_000)
                            times.append(time.perf_counter() - t0)
                            page.close()
                    finally:
                        proc.terminate()
                        proc.wait(timeout=20)
        finally:
            b.close()
    return out


def _wait_health(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the dashboard did not come up in 120 s")


def _line(label: str, small: list[float], big: list[float]) -> str:
    ms, mb = statistics.median(small), statistics.median(big)
    return (f"{label:<38} {ms:>8.2f} {mb:>8.2f} {max(big):>8.2f} {mb / ms:>7.1f}x  "
            f"{'yes' if max(big) < TARGET_S else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep the runs in this folder")
    ap.add_argument("--no-browser", action="store_true", help="skip the headless Chromium measurement")
    ap.add_argument("--many", type=int, default=500, help="runs in the many-runs folder (0: skip that case)")
    ap.add_argument("--only-many", action="store_true", help="measure the many-runs folder only")
    args = ap.parse_args()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="probe-dashboard-load-"))
    base = record_tiny()
    small_dir, big_dir = root / "small", root / "big"
    base.save(small_dir / "run")
    if args.many:
        many_case(small_dir / "run", root, args.many, args.repeat, len(base.calls))
        if args.only_many:
            return
    t0 = time.perf_counter()
    big = stretch(base, args.rows)
    big.save(big_dir / "run")
    print(f"runs in {root}: small {len(base.calls):,} call rows; big {len(big.calls):,} call rows, "
          f"{len(big.steps):,} steps (built and saved in {time.perf_counter() - t0:.1f} s, "
          f"calls.parquet {(big_dir / 'run' / 'calls.parquet').stat().st_size / 1e6:.1f} MB)")

    # warm the interpreter once (imports, Streamlit's one-time component scan): a running
    # dashboard pays these at start-up, not per page load
    data_path(small_dir / "run")
    app_test(small_dir)

    rows = {
        "data: load + Overview figures": ([data_path(small_dir / "run") for _ in range(args.repeat)],
                                          [data_path(big_dir / "run") for _ in range(args.repeat)]),
        "data: load + Roofline cost model": ([roofline_path(small_dir / "run") for _ in range(args.repeat)],
                                             [roofline_path(big_dir / "run") for _ in range(args.repeat)]),
        "AppTest: cold Overview page": ([app_test(small_dir) for _ in range(args.repeat)],
                                        [app_test(big_dir) for _ in range(args.repeat)]),
    }
    if not args.no_browser and Path(CHROMIUM).exists():
        got = browser([small_dir, big_dir], args.repeat)
        rows["Chromium, new server: page to charts"] = (got[small_dir][0], got[big_dir][0])
        rows["Chromium, warm server: page to charts"] = (got[small_dir][1], got[big_dir][1])
    elif not args.no_browser:
        print(f"(no {CHROMIUM}: browser measurement skipped)")

    print(f"\nseconds, median of {args.repeat} cold runs; target: big under {TARGET_S:.0f} s")
    print(f"{'measurement':<38} {'small':>8} {'big':>8} {'big max':>8} {'ratio':>8}  under target")
    for label, (small, bigs) in rows.items():
        print(_line(label, small, bigs))


if __name__ == "__main__":
    main()
