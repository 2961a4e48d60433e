"""The Layers view's table of each layer's mean ms per phase (:func:`dashboards.layer_views.layer_means`):
the same frame as pandas' pivot of the summary rows, exactly, made directly or pivoted by pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("streamlit")

import probe  # noqa: E402
from probe.analysis.run import block_summary  # noqa: E402
from probe.dashboards.layer_views import layer_means  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def _pivot(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.pivot_table(index=["layer", "module"], columns="phase", values="mean_ms", observed=True).reset_index()


@pytest.mark.parametrize("depth", ["blocks", "sublayers", "all"])
def test_layer_means_are_the_pivot_of_the_summary_rows(depth):
    model = tiny_llama(layers=3)
    with probe.attach(model, depth=depth) as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    summ = block_summary(p.run.calls, p.run.steps, by="module")
    rows = summ[summ["role"] == "layer"].rename(columns={"name": "module"})
    for part in (rows, rows[rows["phase"] == "decode"], rows[rows["phase"] == "prefill"], rows.iloc[::-1]):
        pd.testing.assert_frame_equal(layer_means(part), _pivot(part), check_exact=True)
    # where the direct way does not hold (two rows of a cell, a missing value, a null key): pandas pivots
    twice = pd.concat([rows, rows.assign(mean_ms=rows["mean_ms"] * 3)], ignore_index=True)
    gap = rows.assign(mean_ms=rows["mean_ms"].where(np.arange(len(rows)) != 1))
    nokey = rows.assign(layer=rows["layer"].where(np.arange(len(rows)) != 0))
    for odd in (twice, gap, nokey):
        pd.testing.assert_frame_equal(layer_means(odd), _pivot(odd), check_exact=True)


def _pandas_rows(summ: pd.DataFrame, phase: str, order: list[str]):
    from probe.reports.figure_base import floats

    sub = summ[summ["phase"] == phase]
    sub = sub.set_index(sub["name"].astype(str))
    sub = sub.reindex([m for m in order if m in sub.index])
    return list(sub.index), {c: floats(sub[c]) for c in ("self_ms", "calls", "total_ms", "mean_ms", "share")}


@pytest.mark.parametrize("level", ["block", "role", "module"])
def test_a_runs_bars_in_order_are_its_rows_set_by_name_and_reindexed(level):
    """The bars of :func:`figures.phase_blocks_runs` take a run's rows of a phase in the names'
    order from the columns' arrays: the same names and figures as pandas' set_index and reindex,
    and pandas' way where a name is null."""
    from probe.reports.block_figures import _in_order

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    summ = block_summary(p.run.calls, p.run.steps, by=level)
    order = list(dict.fromkeys(summ["name"].astype(str)))[::-1] + ["not there"]
    nameless = summ.assign(name=summ["name"].where(np.arange(len(summ)) != 1))
    for frame in (summ, nameless):
        for phase in ("prefill", "decode"):
            names, cols = _in_order(frame, phase, order)
            want_names, want = _pandas_rows(frame, phase, order)
            assert names == want_names
            for c in want:
                np.testing.assert_array_equal(cols[c], want[c])
        assert _in_order(frame, "no such phase", order) is None


def test_a_phases_rows_by_role_are_the_rows_pandas_looks_up_by_role():
    """The step breakdown reads each phase's block rows by role from the columns' arrays: the same
    values as pandas' row lookup, and pandas' rows where a role comes twice."""
    from probe.reports.breakdown_figures import _by_role

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="blocks") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    summ = block_summary(p.run.calls, p.run.steps, by="block")
    for phase in ("prefill", "decode"):
        rows = summ[summ["phase"] == phase].set_index("role")
        got = _by_role(summ, phase)
        assert list(got) == list(rows.index)
        for role, r in got.items():
            for c in ("self_ms", "gpu_self_ms", "calls"):
                want = rows.loc[role, c]
                assert (pd.isna(want) and pd.isna(r[c])) or r[c] == want
    twice = pd.concat([summ, summ], ignore_index=True)
    got = _by_role(twice, "decode")
    pd.testing.assert_frame_equal(got["layer"], twice[twice["phase"] == "decode"].set_index("role").loc["layer"])
