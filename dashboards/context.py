"""What every dashboard view draws with: the :class:`Context` of the selected runs, the cache its
views share, and the helpers that show charts, tables and Markdown-safe text.

The views themselves live by page (:mod:`dashboards.views` lists them); each draws a
:class:`Context` and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import probe
from probe import fmt
from probe.reports import figures

from . import data

PLOTLY_CONFIG = {"displaylogo": False}


@dataclass
class Context:
    """What every view draws from.

    Attributes:
        runs_dir: the runs folder.
        selected: names of the runs picked in the sidebar.
        loaded: every readable run by name, unfiltered: a mapping that loads a run when it is
            first read (:class:`data.Loaded`), so listing it costs nothing.
        filters: the sidebar filters.
        run: the selected runs' frames concatenated, with the filters applied.
        signatures: file signature of every loaded run (:func:`data.signature`), by name.
        sweeps: the sweeps found in the runs folder, by name (:attr:`data.Found.sweeps`).
        comparisons: the ``probe compare`` folders found there, by name (:attr:`data.Found.comparisons`).
    """

    runs_dir: Path
    selected: list[str]
    loaded: Mapping[str, probe.Run]
    filters: data.Filters
    run: probe.Run
    signatures: dict[str, tuple]
    sweeps: dict[str, Path] = field(default_factory=dict)
    comparisons: dict[str, Path] = field(default_factory=dict)
    _keys: dict = field(default_factory=dict, repr=False, compare=False)  # key() per run names, this rerun

    def key(self, runs: list[str] | tuple[str, ...] | None = None, *, filtered: bool = True) -> str:
        """Identifies the frames of ``runs`` (default: the selected ones) under the filters
        (with ``filtered=False``, as loaded: the key of no filter): a digest of the folder, each
        run's name and file signature, and the filters, made once per rerun (Streamlit hashes a
        cache key at every lookup, and a view looks up dozens: the full tuple of 20 runs' file
        signatures cost 2.5 ms a lookup)."""
        names = tuple(self.selected if runs is None else runs)
        got = self._keys.get((names, filtered))
        if got is None:
            filters = self.filters if filtered else data.Filters()
            whole = (str(self.runs_dir), tuple((n, self.signatures[n]) for n in names), astuple(filters))
            got = self._keys[(names, filtered)] = hashlib.sha256(
                repr(whole).encode("utf-8", "surrogatepass")).hexdigest()
        return got

    def memo(self, what: str, build: Callable[[], Any], *params: Hashable, runs: tuple[str, ...] | None = None,
             filtered: bool = True):
        """``build()``, cached on :meth:`key`, ``what`` and ``params``.

        Reruns (a click, another view and back) then skip the aggregation over a large run.
        ``runs`` names the loaded runs ``build`` reads when they are not the selected ones;
        ``filtered=False`` says ``build`` reads them as loaded (:attr:`loaded`), never the
        filters: its value is then kept across a change of the filters.
        """
        return _restored(cached(self.key(runs, filtered=filtered), what, params, lambda: _storable(build())))

    def each(self) -> dict[str, probe.Run]:
        """Each selected run on its own, with the filters applied (several runs are shown side
        by side, never added together)."""
        out = {}
        for n in self.selected:
            run = self.loaded[n]
            # a small run's filtered frames are kept across reruns (its tables then are too); a
            # large one's copies are not held on to
            out[n] = (_each_filtered(self.key((n,)), run, self.filters) if len(run.calls) < EACH_KEPT_ROWS
                      else data.apply_filters(run, self.filters))
        return out

    def pick(self, has: Callable[[probe.Run], bool], key: str, missing: str) -> str | None:
        """The selected run a view shows when only some runs have what it needs (``has``): the
        first, or the one chosen in a box keyed ``key`` when several have it; ``None`` (with
        ``missing`` said) when none does."""
        names = [n for n in self.selected if has(self.loaded[n])]
        if not names:
            st.info(missing)
            return None
        if len(names) > 1:
            if st.session_state.get(key) not in names:
                st.session_state[key] = names[0]
            return st.selectbox("Run", names, key=key)
        return names[0]

    def names(self) -> dict[str, str]:
        """Legend name of each run id: its run folder's name (``name · call 2`` for a folder's
        later generate calls)."""
        return self.memo("names", lambda: run_names(self.run.runs))


#: runs with fewer calls than this keep their filtered frames across reruns (:meth:`Context.each`)
EACH_KEPT_ROWS = 200_000


@st.cache_resource(max_entries=64, show_spinner=False)
def _each_filtered(key: str, _run: probe.Run, _filters: data.Filters) -> probe.Run:
    """One selected run under the filters, kept per :meth:`Context.key` of that run alone."""
    return data.apply_filters(_run, _filters)


class _FigureJSON:
    """A figure as the cache holds it: its JSON-able dict, which unpickles without plotly
    validating every property again (a cached figure's validation cost 37 ms a hit)."""

    def __init__(self, fig: go.Figure) -> None:
        self.spec = fig.to_plotly_json()


def _storable(value: Any) -> Any:
    return _FigureJSON(value) if isinstance(value, go.Figure) else value


def _restored(value: Any) -> Any:
    """A cached value as the views use it: a figure made again from its dict without plotly's
    validation (it was a valid figure when cached; the views only retitle it)."""
    if not isinstance(value, _FigureJSON):
        return value
    return go.Figure(value.spec, _validate=False)


# Keyed on the run files' signatures, never on the frames: hashing a 1M-row frame for the
# key would cost as much as the aggregation it saves. The builder (leading underscore) is
# not hashed; results are small (figures, summary tables), so pickling them is cheap.
@st.cache_data(max_entries=256, show_spinner=False)
def cached(key: tuple, what: str, params: tuple, _build: Callable[[], Any]) -> Any:
    """``_build()``, kept per (key, what, params) across reruns (see :meth:`Context.memo`)."""
    return _build()


_MD_SPECIAL = re.compile(r"([\\*_\[\]<>#|~$])")


def md(text: object) -> str:
    """``text`` with Markdown's special characters escaped (backticks kept for code)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def show_chart(fig, key: str) -> None:
    """A plotly figure with the dashboard's chart settings."""
    st.plotly_chart(fig, key=key, theme=None, config=PLOTLY_CONFIG)


def show_table(df: pd.DataFrame, key: str, raw: bool = False) -> None:
    """A table; unless ``raw``, shown in the units of the terminal and the report
    (:func:`probe.fmt.cell`: ``1,418.6`` ms, ``416.0 KiB``, ``98.4%``) while the values stay
    numbers (a Styler: columns still sort by value)."""
    if raw or df.empty:
        st.dataframe(df, key=key, hide_index=True)
        return
    shown = df.reset_index(drop=True)
    # a column with no value at all (the allocator figures of a CPU run) would read "None" on
    # every row: it is left out, as in the report and Jupyter
    shown = shown[[c for c in shown.columns if shown[c].notna().any()]]
    styled = shown.style.format({c: (lambda v, c=str(c): fmt.cell(c, v)) for c in shown.columns}, na_rep="")
    st.dataframe(styled, key=key, hide_index=True)


def run_names(runs: pd.DataFrame) -> dict[str, str]:
    """Run id -> the name of the folder it was loaded from (``run`` column of the dashboard's
    runs frame), with `` · call N`` for a folder's later generate calls; the id itself otherwise."""
    if runs.empty or "run" not in runs.columns:
        return {}
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for rid, name in zip(runs["run_id"].astype(str), runs["run"].astype(str)):
        if rid in out:
            continue
        seen[name] = seen.get(name, 0) + 1
        out[rid] = name if seen[name] == 1 else f"{name} · call {seen[name]}"
    return out


def named_headline(run: probe.Run) -> pd.DataFrame:
    """``figures.headline`` with the run folder's name first, to tell several runs apart."""
    head = figures.headline(run.runs, run.steps, meta=run.meta)
    if "run" in run.runs and len(head):
        names = run.runs.drop_duplicates("run_id").set_index("run_id")["run"]
        head.insert(0, "run", head["run_id"].map(names))
    return head
