"""The probe dashboard: ``streamlit run dashboards/app.py -- --runs-dir RUNS_DIR``.

The sidebar picks the runs folder, the runs and the filters; the view chosen there draws the
selected runs (their frames concatenated, then filtered). Loading is cached per run on the
run files' modification times and sizes, so a re-recorded run is reloaded and nothing else.
Bad runs are listed with the reason and never stop the good ones from showing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import astuple, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `streamlit run`: make the probe package importable
    # a checkout holds dashboards/ beside probe/; an install holds it inside probe/ (probe.dashboards)
    _here = Path(__file__).resolve().parent.parent
    _ROOT = str(_here if (_here / "probe" / "__init__.py").is_file() else _here.parent)
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import streamlit as st

import probe
from probe.dashboards import (
    cli_root,
    cli_runs_dir,
    compare_views,
    cost_views,
    data,
    deep_views,
    escapes,
    serve_views,
    views,
    within,
)

log = logging.getLogger("dashboards.app")

#: the sidebar's views, in order: the run views, the cost views where they read best, Data last
_ALL = {**views.VIEWS, **cost_views.VIEWS, **serve_views.VIEWS, **deep_views.VIEWS, **compare_views.VIEWS}
_ORDER = ("Overview", "Layers", "Tree", "Timeline", "Memory", deep_views.VIEW, "Roofline", "Serving", "Shapes",
          "Compare", compare_views.VIEW, "Sweep", "Data")
VIEWS = {**{n: _ALL[n] for n in _ORDER if n in _ALL}, **{n: f for n, f in _ALL.items() if n not in _ORDER}}

# A loaded run is held once and shared by every rerun and session: a 1M-row frame would cost
# ~1 s to pickle into st.cache_data and ~0.2 s to unpickle on every rerun. The frames are
# treated as read-only (filters build new frames). One entry per run folder, kept with the
# signature (mtimes, sizes, inodes) of its files: a re-recorded run is loaded again and replaces
# its entry, nothing else is reloaded, and no entry limit makes a folder of hundreds of runs
# reload them all on every click.
@st.cache_resource(show_spinner=False)
def _runs_cache() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def _load(path: str, name: str, sig: tuple) -> tuple[probe.Run | None, str | None]:
    cache, lock = _runs_cache()
    key = (path, name)
    with lock:
        hit = cache.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    with st.spinner(f"Loading run {name} ..."):
        try:
            got: tuple[probe.Run | None, str | None] = (data.load_run(path, name), None)
        except probe.RunLoadError as exc:
            got = (None, str(exc))
    with lock:
        cache[key] = (sig, got)
    return got


def _peek(path: str, name: str, sig: tuple) -> str | None:
    """Why the run cannot be loaded, from its meta.json and file sizes (:func:`data.peek`), kept
    per run folder and signature; a load that failed with this signature counts too."""
    cache, lock = _runs_cache()
    with lock:
        hit = cache.get((path, name))
        seen = cache.get(("peek", path, name))
    if hit is not None and hit[0] == sig:
        return hit[1][1]
    if seen is not None and seen[0] == sig:
        return seen[1]
    got = data.peek(path)
    with lock:
        cache[("peek", path, name)] = (sig, got)
    return got


def _loaded(path: str, name: str, sig: tuple) -> probe.Run:
    """The run, loaded (and cached) on first use; :class:`probe.RunLoadError` where it cannot be."""
    run, err = _load(path, name, sig)
    if run is None:
        raise probe.RunLoadError(err)
    return run


# The selected runs concatenated (and then filtered) are held too, keyed on their names and
# file signatures (and the filters): re-concatenating a million rows on every click costs
# about as much as the load itself. The leading underscore keeps the frames out of the key.
@st.cache_resource(max_entries=4, show_spinner=False)
def _combined(key: tuple, _runs: tuple[probe.Run, ...]) -> tuple[probe.Run, dict]:
    run = data.combine(list(_runs))
    return run, data.options(run)


@st.cache_resource(max_entries=4, show_spinner=False)  # each entry may hold a filtered copy
def _filtered(key: tuple, filters: tuple, _run: probe.Run, _filters: data.Filters) -> probe.Run:
    return data.apply_filters(_run, _filters)


def _inside(runs_dir: str, name: str, path: Path, root: str) -> bool:
    """Run or sweep ``name`` (found below ``runs_dir``, itself inside ``root``) is inside ``root``:
    certainly so when no folder on the way is a symlink (one ``lstat`` each), else by resolving."""
    parts = () if name == "." else Path(name).parts
    base = Path(runs_dir).expanduser()
    if not any(os.path.islink(base.joinpath(*parts[:i + 1])) for i in range(len(parts))):
        return True
    return within(path, root)


def _sync(key: str, options: list, default: list) -> None:
    """Seed or update a multiselect's state before the widget is built.

    First time: ``default``. When the options change (another folder, other runs), keep
    what is still offered, so a value the user took out stays out, and add the options
    that are new since the last run (``default`` if nothing is left). The widgets are built
    without a default of their own: giving both a default and a state value makes Streamlit
    warn on the page.
    """
    seen = f"_options_{key}"
    prev, cur = st.session_state.get(seen), st.session_state.get(key)
    if cur is None or prev is None:
        st.session_state[key] = list(default)
    elif prev != options:
        keep = [v for v in options if v in cur or (v not in prev and v in default)]
        st.session_state[key] = keep or list(default)
    st.session_state[seen] = list(options)


def _sidebar_filters(opts: dict) -> data.Filters:
    """Phase, depth, module type, step-range (and, for several ranks, rank) widgets; a full
    selection means no filter."""
    st.sidebar.subheader("Filters")
    chosen = {}
    for key, label in (("phases", "Phase"), ("depths", "Depth (module nesting)"), ("module_types", "Module type")):
        values = opts[key]
        _sync(key, values, values)
        picked = st.sidebar.multiselect(label, values, key=key)
        chosen[key] = None if set(picked) == set(values) else tuple(picked)
    lo, hi = opts["steps"]
    step_range = None
    if hi > lo:
        cur, prev = st.session_state.get("steps"), st.session_state.get("_options_steps")
        if cur is None or prev is None or tuple(cur) == tuple(prev):
            st.session_state["steps"] = (lo, hi)  # first time, or the whole range was shown: still all
        else:  # clamp a narrowed range kept from another run
            a, b = max(lo, min(cur[0], hi)), min(hi, max(cur[1], lo))
            st.session_state["steps"] = (a, b) if a <= b else (lo, hi)
        st.session_state["_options_steps"] = (lo, hi)
        got = st.sidebar.slider("Step range", min_value=lo, max_value=hi, key="steps")
        step_range = None if tuple(got) == (lo, hi) else (int(got[0]), int(got[1]))
    rank_range = None
    if len(opts["ranks"]) > 1:  # a single-process run has nothing to pick: no widget at all
        _sync("ranks", opts["ranks"], opts["ranks"])
        picked = st.sidebar.multiselect("Rank", opts["ranks"], key="ranks")
        rank_range = None if set(picked) == set(opts["ranks"]) else tuple(int(r) for r in picked)
    return data.Filters(phases=chosen["phases"], depths=chosen["depths"], module_types=chosen["module_types"],
                        steps=step_range, ranks=rank_range)


def _pick_comparison(found: data.Found) -> None:
    """The sidebar's list of saved comparisons (``probe compare`` folders): picking one opens it."""
    if not found.comparisons:
        return
    if st.session_state.get(compare_views.PICK) not in (None, *found.comparisons):
        st.session_state[compare_views.PICK] = None  # that folder is gone
    st.sidebar.selectbox("Comparisons", list(found.comparisons), index=None, key=compare_views.PICK,
                         placeholder="open a saved comparison", on_change=compare_views.open_picked,
                         format_func=lambda n: compare_views.label(found.comparisons, n))


def _listing(found: data.Found, good, bad: dict[str, str]) -> None:
    """Below the sidebar's run and comparison pickers, once: what the folder holds, the runs that cannot be read
    (red, with the reason) and the folders that are neither runs nor comparisons (quietly)."""
    parts = [f"{len(found.runs)} run(s), {len(good)} readable"]
    if found.sweeps:
        parts.append(f"{len(found.sweeps)} sweep(s)")
    if found.comparisons:
        parts.append(f"{len(found.comparisons)} comparison(s)")
    st.sidebar.caption(", ".join(parts))
    if bad:
        # the run's own folder is named once, not again in front of every file of its reason
        short = {n: e.replace(str(found.runs[n]) + os.sep, "") for n, e in bad.items()}
        st.sidebar.error("Cannot be shown:\n" + "\n".join(f"- **{views.md(n)}**: {views.md(e)}" for n, e in short.items()),
                         icon="⚠️")
    if found.others:
        st.sidebar.caption("Other folders (no run in them): " + ", ".join(views.md(o) for o in found.others))


def _none_readable(found: data.Found, runs_dir: str, bad: dict[str, str]) -> None:
    """The page of a folder without a readable run: the listing, a warning, and the sweeps and
    saved comparisons it holds (they are still shown)."""
    _listing(found, [], bad)
    if found.runs:
        st.warning(f"None of the {len(found.runs)} run folder(s) in {views.md(runs_dir)} holds a readable run; "
                   f"record one with `probe run --out {runs_dir}/NAME`.")
    if found.sweeps:  # a sweep whose configs all failed still has its table and charts
        st.header("Sweep")
        cost_views.draw_sweeps(Path(runs_dir), found.sweeps)
    if found.comparisons:  # a folder of comparisons only: they are still shown
        _pick_comparison(found)
        st.header(compare_views.VIEW)
        compare_views.draw_comparisons(Path(runs_dir), found.comparisons, {})


def main() -> None:
    """Build the page for the current widget state."""
    st.set_page_config(page_title="probe dashboard", layout="wide")
    if "runs_dir" not in st.session_state:
        st.session_state["runs_dir"] = cli_runs_dir()
    st.sidebar.title("probe")
    runs_dir = st.sidebar.text_input("Runs folder", key="runs_dir").strip()
    if not runs_dir:
        st.info("Enter the folder that holds your runs (each one written by `probe run --out FOLDER/NAME`).")
        return
    root = cli_root()
    if not within(runs_dir, root):
        st.error(f"{views.md(runs_dir)} is outside the folder this dashboard may read "
                 f"({views.md(str(Path(root).expanduser().resolve()))}). Start it with "
                 "`probe dashboard RUNS_DIR --root FOLDER` to look elsewhere.")
        return

    found = data.discover(runs_dir)
    if found.message:
        st.info(found.message)
        return
    # a symlinked run that leads out of the root is not read either
    found = replace(found, **{k: {n: p for n, p in getattr(found, k).items() if _inside(runs_dir, n, p, root)}
                              for k in ("runs", "sweeps", "comparisons")})
    # The listing reads each run's meta.json and its files' sizes, never a frame: a run's frames
    # are loaded when it is picked (or a view asks for it), and a run that then fails to load
    # leaves the list with its reason.
    bad: dict[str, str] = {}
    sigs: dict[str, tuple] = {}
    for name, path in found.runs.items():
        out = escapes(path, root, inside=True)  # the folder itself is inside (_inside, above)
        if out is not None:  # a symlink inside the run (a file, a rank folder) leads elsewhere: not read
            bad[name] = (f"{path} links outside the folder this dashboard may read ({out}); it is not read. "
                         "Copy the run inside the folder, or start the dashboard with a wider --root")
            continue
        sigs[name] = data.signature(path)
        err = _peek(str(path), name, sigs[name])
        if err is not None:
            bad[name] = err
    names = [n for n in found.runs if n not in bad]
    if not names:
        _none_readable(found, runs_dir, bad)
        return

    # runs that land while the page is open join the list, never the user's selection
    prev, cur = st.session_state.get("_options_runs"), st.session_state.get("runs")
    while True:  # the picked runs are loaded first: one that cannot be read leaves the list
        newest = data.newest(found, names)  # the latest top-level run, not a sweep's last config
        picked = data.keep_selection(cur, prev, names, [newest] if newest else names[-1:])
        failed = {}
        for n in picked:
            run, err = _load(str(found.runs[n]), n, sigs[n])
            if run is None:
                failed[n] = err
        if not failed:
            break
        bad.update(failed)
        names = [n for n in names if n not in failed]
        cur = [n for n in (cur or []) if n not in failed] if cur is not None else None
    if not names:
        _none_readable(found, runs_dir, bad)
        return
    good = data.Loaded({n: found.runs[n] for n in names}, lambda n: _loaded(str(found.runs[n]), n, sigs[n]))
    st.session_state["runs"] = picked
    st.session_state["_options_runs"] = names
    selected = st.sidebar.multiselect("Runs", names, key="runs")
    _pick_comparison(found)
    _listing(found, good, bad)
    if not selected:
        st.info("Pick one or more runs in the sidebar.")
        return
    view = st.sidebar.radio("View", list(VIEWS), key="view", horizontal=False)
    key = (str(Path(runs_dir).expanduser().resolve()), tuple((n, sigs[n]) for n in selected))
    combined, opts = _combined(key, tuple(good[n] for n in selected))
    filters = _sidebar_filters(opts)

    ctx = views.Context(runs_dir=Path(runs_dir), selected=selected, loaded=good, filters=filters,
                        run=_filtered(key, astuple(filters), combined, filters), signatures=sigs,
                        sweeps=found.sweeps, comparisons=found.comparisons)
    st.header(view)
    try:
        VIEWS[view](ctx)
    except Exception as exc:  # a bug in one view must not take the page down with a traceback
        log.exception("view %s failed", view)
        st.error(f"The {view} view failed: {type(exc).__name__}: {views.md(str(exc))}")


try:
    main()
except Exception as exc:  # the last guard (Streamlit's own rerun/stop signals are BaseException)
    log.exception("the dashboard failed")
    st.error(f"The dashboard failed: {type(exc).__name__}: {views.md(str(exc))}")
