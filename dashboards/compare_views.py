"""The dashboard's two comparison pages: Compare, any two loaded runs side by side (headline,
blocks, the per-block difference and whether it is larger than the noise), and Saved comparison,
a folder written by ``probe compare --out``, listed as that comparison (never as a broken run),
with its significance table and its page."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import streamlit as st

from probe.analysis.run import block_summary
from probe.reports import figures

from . import data
from .context import Context, cached, md, named_headline, show_chart, show_table

VIEW = "Saved comparison"
#: the sidebar's pick of a saved comparison (session state key)
PICK = "comparison"


def compare(ctx: Context) -> None:
    """Two runs side by side: headline, blocks, and the per-block difference."""
    from probe.analysis.stats import differences
    from probe.reports.diff import block_diff

    pool = list(ctx.loaded)  # any readable run; the sidebar's picks are the defaults
    if len(pool) < 2:
        st.info("Compare needs two readable runs in the runs folder; record another with "
                f"`probe run --out {ctx.runs_dir}/NAME`.")
        return
    picks = [n for n in ctx.selected if n in pool] + [n for n in pool if n not in ctx.selected]
    for key, default in (("compare_a", picks[0]), ("compare_b", picks[1])):
        if st.session_state.get(key) not in pool:  # first visit, or the run list changed
            st.session_state[key] = default
    c1, c2 = st.columns(2)
    a = c1.selectbox("Run A", pool, key="compare_a")
    b = c2.selectbox("Run B", pool, key="compare_b")
    if a == b:
        st.warning("Pick two different runs to compare.")
    summaries = {}
    for col, name, tag in ((c1, a, "a"), (c2, b, "b")):
        run = data.apply_filters(ctx.loaded[name], ctx.filters)
        with col:
            st.subheader(md(name))
            show_table(ctx.memo("headline", lambda: named_headline(run), runs=(name,)),
                   f"compare_head_{tag}")
            show_chart(ctx.memo("phase_blocks", lambda: figures.phase_blocks(run.calls, run.steps, by="block"), "block",
                            runs=(name,)), f"compare_blocks_{tag}")
        summaries[tag] = ctx.memo("summary", lambda: block_summary(run.calls, run.steps), runs=(name,))
    for note in differences(ctx.loaded[a], ctx.loaded[b]):
        st.info(md(f"Not like for like: {note}."))
    deep = not (ctx.loaded[a].ops.empty or ctx.loaded[b].ops.empty)
    level = st.radio("Compare by", ["block", "role", "module", *(["op"] if deep else [])], horizontal=True,
                     key="compare_level", help="op: both runs have a deep pass; their ops per block and op kind")
    if level == "op":
        _ops(ctx, a, b)
        return
    sa, sb = (summaries[t][summaries[t]["level"] == level] for t in ("a", "b"))
    show_chart(figures.compare_blocks(sa, sb, a, b), "compare_diff")
    st.caption(f"Per {level} and phase: B - A and B / A of the self host ms (the rows never overlap)")
    show_table(block_diff(sa, sb), "compare_table")
    if a != b:
        from probe.analysis.stats import significance
        from probe.reports.compare import significance_table

        ra = data.apply_filters(ctx.loaded[a], ctx.filters)
        rb = data.apply_filters(ctx.loaded[b], ctx.filters)
        sig = ctx.memo("significance", lambda: significance(ra, rb), a, b, runs=(a, b))
        st.subheader("Is the difference larger than the noise?")
        for tag, name in (("A", a), ("B", b)):
            nb = ctx.memo("noise", lambda name=name: ctx.loaded[name].noise(), runs=(name,), filtered=False)
            if nb.busy:
                st.warning(f"{tag} ({md(name)}): {nb.message()}.", icon="⚠️")
        st.caption("B slower by: B's mean over A's minus one (tok/s: A's over B's; positive is worse), with a 95% "
                   "bootstrap interval; significant when the interval excludes 0 and a Mann-Whitney U test gives "
                   "p < 0.05. `probe compare A B --fail-above PCT` turns this into a CI gate.")
        show_table(significance_table(sig), "compare_significance")


def _ops(ctx: Context, a: str, b: str) -> None:
    """Two deep runs op kind by op kind in each block, what changed first (:mod:`probe.analysis.op_compare`)."""
    from probe.analysis.op_compare import MIN_BLOCK_SHARE, MIN_RATIO_CHANGE, changed
    from probe.reports.compare import op_comparison_frame

    each = st.checkbox("Every numbered block apart (else the layers fold into one row, their mean per layer)",
                       key="compare_ops_each")
    frame = ctx.memo("op_comparison", lambda: op_comparison_frame(ctx.loaded[a], ctx.loaded[b], fold=not each),
                     a, b, each, runs=(a, b))
    moved = changed(frame)
    st.caption(f"Per sampled step of each run's deep pass. change: an op kind only one run ran in the block, a "
               f"different call count, or a time that moved by {MIN_RATIO_CHANGE:.0%} and {MIN_BLOCK_SHARE:.0%} of "
               "the block's op time or more (each deep pass's times, from one call: the block level says whether a block "
               "as a whole changed).")
    st.subheader(f"What changed ({len(moved)} of {len(frame)} rows)")
    show_table(moved, "compare_ops_changed")
    with st.expander("Every row"):
        show_table(frame, "compare_ops_all")


def label(comparisons: dict[str, Path], name: str) -> str:
    """``name (A vs B)`` for the sidebar, from the folder's ``compare.json`` when it reads."""
    try:
        got = _read(comparisons[name])
    except (ValueError, KeyError):
        return name
    a, b = data.comparison_runs(got.meta)
    return name if a == b == "?" else f"{name} ({a} vs {b})"


def _read(path: Path) -> data.Comparison:
    # keyed on the three files: a comparison written again into the same folder is read again
    return cached((str(path.expanduser().resolve()), data.comparison_signature(path)), "comparison", (),
                  lambda: data.read_comparison(path))


def open_picked() -> None:
    """The sidebar pick's callback: show the comparison just picked."""
    if st.session_state.get(PICK):
        st.session_state["view"] = VIEW


def draw_comparisons(runs_dir: Path, comparisons: dict[str, Path], run_paths: dict[str, Path]) -> None:
    """The comparison picked in the sidebar (else the first): A and B, the significance table
    ``probe compare`` wrote, and its ``compare.html``.

    Args:
        runs_dir: the runs folder (named in the hint when it holds no comparison).
        comparisons: name -> folder (:attr:`data.Found.comparisons`).
        run_paths: the runs listed in the sidebar, name -> folder: A and B are named by them
            when they are in this runs folder.
    """
    from probe.reports.compare import significance_table

    if not comparisons:
        st.info(f"No saved comparison in {md(runs_dir)}. Write one with "
                f"`probe compare {runs_dir}/A {runs_dir}/B --out {runs_dir}/a-vs-b`; it is listed here, and the "
                "Compare view compares any two runs live.")
        return
    names = list(comparisons)
    name = st.session_state.get(PICK)
    name = name if name in comparisons else names[0]
    path = comparisons[name]
    try:
        got = _read(path)
    except ValueError as exc:
        st.error(f"Comparison **{md(name)}** cannot be shown: {md(exc)}", icon="⚠️")
        return
    st.subheader(md(name))
    here = {p.expanduser().resolve(): n for n, p in run_paths.items()}
    lines = []
    for side in ("a", "b"):
        info = got.meta.get(side) if isinstance(got.meta.get(side), dict) else {}
        given, resolved = info.get("path"), info.get("resolved")
        listed = here.get(Path(resolved)) if resolved else None
        where = f" — listed here as run **{md(listed)}**" if listed else ""
        ids = ", ".join(str(i) for i in info.get("run_ids") or [])
        text = f"`{given}`" if given else "unknown (written before probe recorded it)"
        if resolved and given and str(Path(given).expanduser().resolve()) != resolved:
            text += f" (`{resolved}`)"
        lines.append(f"**{side.upper()}**: {text}{where}" + (f" · run ids {md(ids)}" if ids else ""))
    st.markdown("  \n".join(lines))
    if got.meta.get("written"):
        st.caption(f"Written {md(got.meta['written'])} by `probe compare`, in `{md(path)}`.")
    if got.html is not None:
        html = got.html
        st.download_button("Open compare.html (the full page: charts and every table)", data=lambda: html.read_bytes(),
                           file_name=f"{Path(name).name if name != '.' else 'compare'}.html", mime="text/html",
                           key="comparison_html", on_click="ignore")
        st.caption(f"Or open `{md(html.resolve().as_uri())}` in a browser.")
    sig = got.significance
    st.markdown("**Is the difference larger than the noise?** B against A: headline metrics, then blocks per "
                "phase (self time); every role is in significance.csv.")
    show_table(significance_table(sig[sig["level"].isin(["metric", "block"])]), "comparison_significance")


def saved_comparison(ctx: Context) -> None:
    """The Saved comparison view (see :func:`draw_comparisons`)."""
    paths = getattr(ctx.loaded, "paths", None)  # the run folders, known without loading a run
    if paths is None:
        paths = {n: r.path for n, r in ctx.loaded.items() if r.path is not None}
    draw_comparisons(ctx.runs_dir, ctx.comparisons, {n: Path(p) for n, p in paths.items()})


VIEWS: dict[str, Callable[[Context], None]] = {"Compare": compare, VIEW: saved_comparison}
