"""A phase filter's cut of a run (:func:`probe.analysis.phase_cut.phase_subset`): its summary is read
from the whole run's kept summary where that is provably the same, and equals the summary of the
same rows built afresh, to the bit, in every case (read or summed again)."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe.analysis import accounting, memo
from probe.analysis.phase_cut import phase_subset
from tiny import tiny_llama

LEVELS = ("module", "block", "role")


def _record(depth: str, calls: int) -> probe.Run:
    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth) as p:
        for k in range(calls):
            model.generate(torch.tensor([[1, 5, 6, 7][: 4 - k]]), max_new_tokens=4 - k, do_sample=False)
    return p.run


@pytest.fixture(scope="module", params=[("blocks", 1), ("blocks", 2), ("sublayers", 1), ("all", 2)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request) -> probe.Run:
    return _record(*request.param)


def _summed(calls: pd.DataFrame, steps: pd.DataFrame) -> bool:
    """Whether some level of these frames was summed from their calls (its sums kept)."""
    return any(memo.peek("level_sums", level, calls, steps) is not None for level in LEVELS)


def _fresh(calls: pd.DataFrame, steps: pd.DataFrame, level: str) -> pd.DataFrame:
    """The level's summary of copies of the frames: nothing noted, nothing kept."""
    return accounting.summary(calls.copy(), steps.copy(), level)


@pytest.mark.parametrize("kept", [("decode",), ("prefill",)])
@pytest.mark.parametrize("whole_first", [False, True])
def test_a_cuts_summary_equals_the_same_rows_summed_afresh(run, kept, whole_first):
    memo.clear()
    if whole_first:
        accounting.summary(run.calls, run.steps)
    for level in LEVELS:
        accounting.summary(run.calls, run.steps, level)
    calls, steps = phase_subset(run.calls, run.steps, kept)
    for level in LEVELS:
        got = accounting.summary(calls, steps, level)
        pd.testing.assert_frame_equal(got, _fresh(calls, steps, level), check_exact=True)
        assert set(got["phase"]) == set(kept)


def test_the_cut_is_the_rows_of_those_phases_and_its_rows_are_read_at_depth_blocks():
    run = _record("blocks", 1)
    memo.clear()
    calls, steps = phase_subset(run.calls, run.steps, ("decode",))
    keep = (run.calls["phase"] == "decode").to_numpy()
    pd.testing.assert_frame_equal(calls, run.calls[keep].reset_index(drop=True))
    pd.testing.assert_frame_equal(steps, run.steps[(run.steps["phase"] == "decode").to_numpy()].reset_index(drop=True))
    assert phase_subset(run.calls, run.steps, ("prefill", "decode")) == (run.calls, run.steps)  # nothing cut
    for level in LEVELS:
        accounting.summary(run.calls, run.steps, level)
        accounting.summary(calls, steps, level)
        assert not _summed(calls, steps)  # read from the whole run's, not summed
    for level in LEVELS:  # the whole run's summary not kept: summed
        memo.clear()
        calls, steps = phase_subset(run.calls, run.steps, ("decode",))
        accounting.summary(calls, steps, level)
        assert _summed(calls, steps)
        pd.testing.assert_frame_equal(accounting.summary(calls, steps, level), _fresh(calls, steps, level),
                                      check_exact=True)
    memo.clear()
    calls, steps = phase_subset(run.calls, run.steps, ("decode",))
    accounting.summary(calls, steps, "block")
    assert _summed(calls, steps)


def test_the_cut_is_summed_again_where_the_whole_frames_are_gone_or_a_step_is_of_another_phase():
    run = _record("blocks", 1)
    whole_c, whole_s = run.calls.copy(), run.steps.copy()
    memo.clear()
    accounting.summary(whole_c, whole_s, "block")
    calls, steps = phase_subset(whole_c, whole_s, ("decode",))
    del whole_c, whole_s
    gc.collect()
    pd.testing.assert_frame_equal(accounting.summary(calls, steps, "block"), _fresh(calls, steps, "block"),
                                  check_exact=True)
    assert _summed(calls, steps)  # summed again
    # a decode call whose step row says prefill: the cut leaves that step (and so the call) out
    odd = run.steps.copy()
    at = int(np.flatnonzero((odd["phase"] == "decode").to_numpy())[1])
    odd["phase"] = odd["phase"].astype(object).where(np.arange(len(odd)) != at, "prefill").astype(odd["phase"].dtype)
    memo.clear()
    accounting.summary(run.calls, odd, "block")
    calls, steps = phase_subset(run.calls, odd, ("decode",))
    pd.testing.assert_frame_equal(accounting.summary(calls, steps, "block"), _fresh(calls, steps, "block"),
                                  check_exact=True)
    assert _summed(calls, steps)


def test_the_dashboards_phase_filter_cuts_with_phase_subset_and_other_filters_do_not():
    from probe.dashboards import data

    run = _record("blocks", 1)
    memo.clear()
    accounting.summary(run.calls, run.steps, "module")
    cut = data.apply_filters(run, data.Filters(phases=("decode",)))
    assert memo.peek("phase_subset", None, cut.calls, cut.steps) is not None
    pd.testing.assert_frame_equal(accounting.summary(cut.calls, cut.steps, "module"),
                                  _fresh(cut.calls, cut.steps, "module"), check_exact=True)
    both = data.apply_filters(run, data.Filters(phases=("decode",), steps=(0, 2)))
    assert memo.peek("phase_subset", None, both.calls, both.steps) is None
    assert (both.calls["step"] <= 2).all() and (both.calls["phase"] == "decode").all()
