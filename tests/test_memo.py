"""Tables kept per pair of frames (:mod:`probe.analysis.memo`): the same as built afresh, built
once while the frames live, built anew for other frames, and gone with their frames."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe.analysis import accounting, levels, memo, tree
from probe.analysis.samples import per_step, step_samples
from tiny import tiny_llama


@pytest.fixture(scope="module")
def run() -> probe.Run:
    """Two generate calls of a tiny LLaMA at depth all."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6, 7, 9]]), max_new_tokens=3, do_sample=False)
    return p.run


def test_each_level_from_the_one_build_equals_that_level_built_alone(run):
    whole = accounting.summary(run.calls, run.steps)
    for level in ("block", "role", "module"):
        memo.clear()  # nothing kept: this level is built on its own
        alone = accounting._summary(run.calls, run.steps, level)
        pd.testing.assert_frame_equal(accounting.summary(run.calls, run.steps, level), alone)
        want = whole[whole["level"] == level].reset_index(drop=True)
        pd.testing.assert_frame_equal(alone, want)


@pytest.mark.parametrize("depth", ["blocks", "sublayers", "all"])
@pytest.mark.parametrize("phases", [None, ("decode",)])
def test_a_level_asked_for_alone_is_the_whole_summarys_rows_of_it_to_the_bit(depth, phases, monkeypatch):
    """``summary(level)`` before the whole summary builds only that level's frame (kept under its
    level), summed the one way the whole summary sums it: the whole's rows of that level, exactly,
    whichever level comes first; once the whole is kept, a level is read from it."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth) as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)
    calls, steps = p.run.calls, p.run.steps
    if phases:  # the dashboard's phase filter: fewer rows
        calls = calls[calls["phase"].isin(phases).to_numpy()].reset_index(drop=True)
        steps = steps[steps["phase"].isin(phases).to_numpy()].reset_index(drop=True)
    memo.clear()
    whole = accounting.summary(calls, steps)
    for first in ("block", "role", "module"):
        memo.clear()
        order = [first, *[lv for lv in ("module", "block", "role") if lv != first]]
        for level in order:
            got = accounting.summary(calls, steps, level)
            assert memo.peek("summary", level, calls, steps) is not None
            assert memo.peek("summary", None, calls, steps) is None  # the whole was not built
            want = whole[whole["level"] == level].reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want, check_exact=True)
        # the whole built after the levels alone is the same whole
        pd.testing.assert_frame_equal(accounting.summary(calls, steps), whole, check_exact=True)
        got = accounting.summary(calls, steps, first)  # now read from the whole
        pd.testing.assert_frame_equal(got, whole[whole["level"] == first].reset_index(drop=True), check_exact=True)
    # a tree at depth blocks is read from the module level (built for it, built alone before, or
    # among the others): the same tree, to the bit, as summed call by call, the way of a nested
    # recording (forced here by telling the tree that a call lacks a key)
    memo.clear()
    with monkeypatch.context() as mp:
        mp.setattr(accounting, "keyed", lambda c: False)
        by_calls = accounting.tree_table(calls, steps)
    for built in (lambda: None, lambda: accounting.summary(calls, steps, "module"),
                  lambda: accounting.summary(calls, steps)):
        memo.clear()
        built()
        pd.testing.assert_frame_equal(accounting.tree_table(calls, steps), by_calls, check_exact=True)


def _with_a_null(col: str):
    """The calls and steps of a short run at depth blocks, one call (model.norm's of step 1)
    with a null ``col``."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="blocks") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    calls = p.run.calls.copy()
    at = int(np.flatnonzero((calls["module"] == "model.norm").to_numpy() & (calls["step"] == 1).to_numpy())[0])
    calls[col] = calls[col].astype(object).where(np.arange(len(calls)) != at, None).astype(calls[col].dtype)
    return calls, p.run.steps


@pytest.mark.parametrize("col", ["role", "phase", "module"])
def test_a_level_alone_of_calls_without_a_key_is_the_whole_summarys_rows_of_it(col):
    """A call with a null module, phase or role is a row of its own: the level built alone still
    equals the whole summary's rows of it, exactly."""
    calls, steps = _with_a_null(col)
    memo.clear()
    whole = accounting.summary(calls, steps)
    for level in ("module", "block", "role"):
        memo.clear()
        want = whole[whole["level"] == level].reset_index(drop=True)
        pd.testing.assert_frame_equal(accounting.summary(calls, steps, level), want, check_exact=True)


def test_a_level_built_alone_is_built_anew_for_other_frames(run):
    memo.clear()
    block = accounting.summary(run.calls, run.steps, "block")
    slower = run.calls.assign(self_ms=run.calls["self_ms"] * 2)
    assert memo.peek("summary", "block", slower, run.steps) is None
    assert accounting.summary(slower, run.steps, "block")["self_ms"].sum() > block["self_ms"].sum()
    block.loc[0, "self_ms"] = -1.0  # a caller's edit of what it was handed stays its own
    assert accounting.summary(run.calls, run.steps, "block").loc[0, "self_ms"] != -1.0


def test_a_table_is_built_once_per_pair_of_frames_and_anew_for_other_frames(run):
    memo.clear()
    first = accounting.summary(run.calls, run.steps)
    assert memo.peek("summary", None, run.calls, run.steps) is not None
    again = accounting.summary(run.calls, run.steps)
    pd.testing.assert_frame_equal(first, again)
    again["self_ms"] = 0.0  # a caller's edit of what it was handed stays its own
    pd.testing.assert_frame_equal(accounting.summary(run.calls, run.steps), first)
    # other frames (a copy, a frame with a column more) are other tables
    other = run.calls.copy()
    assert memo.peek("summary", None, other, run.steps) is None
    slower = other.assign(self_ms=other["self_ms"] * 2)
    got = accounting.summary(slower, run.steps)
    assert got["self_ms"].sum() > first["self_ms"].sum()
    assert memo.peek("summary", None, run.calls, run.steps) is not None  # the first one still kept


def test_tables_go_with_their_frames(run, monkeypatch):
    import weakref

    monkeypatch.setattr(memo, "SMALL_ROWS", 0)  # every frame large: Phases keep only the last few
    memo.clear()
    calls = run.calls.copy()
    accounting.summary(calls, run.steps)
    accounting.tree_table(calls, run.steps)
    gone = weakref.ref(calls)
    del calls
    for _ in range(memo.LIMITS["phases"]):  # Phases hold their frames: only the last few are kept
        accounting.summary(run.calls.copy(), run.steps)
    gc.collect()
    assert gone() is None  # nothing kept holds the frame
    accounting.summary(run.calls.copy(), run.steps)  # the next table kept drops those of frames gone
    for store in memo._STORE.values():
        assert all(e[0]() is not None and e[1]() is not None for e in store.values())


def test_shared_arrays_are_read_only(run):
    rows = tree.parent_rows(run.calls)
    codes, _ = accounting.factorized(run.calls, "module")
    for a in (rows, codes):
        with pytest.raises(ValueError):
            a[0] = 1


def _samples_by_pandas(calls, steps, runs, level, clock):
    """The samples as a groupby over per_step's frame defines them."""
    per = per_step(calls, steps, runs, level, clock)
    per = per.groupby(["name", "phase", "run_id", "step"], sort=False)["ms"].sum(min_count=1)
    return {(str(n), str(p)): s.to_numpy(dtype="float64", na_value=np.nan)
            for (n, p), s in per.groupby(level=[0, 1], sort=False)}


@pytest.mark.parametrize("level", ["block", "role", "module"])
@pytest.mark.parametrize("clock", ["host", "gpu"])
def test_step_samples_on_codes_are_the_groupby_of_per_step(run, level, clock):
    got = step_samples(run.calls, run.steps, run.runs, level, clock)
    want = _samples_by_pandas(run.calls, run.steps, run.runs, level, clock)
    assert list(got) == list(want)  # the same rows, in the same order
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=str(k))


@pytest.mark.parametrize("level", ["block", "module"])
def test_step_samples_of_rows_not_laid_out_step_by_step_are_the_groupby_too(run, level):
    """Two ranks' calls one after another (each step met twice) and rows shuffled: the samples
    are still the groupby's, whichever way they are summed."""
    calls = run.calls
    two = pd.concat([calls, calls.assign(rank=np.int32(1))], ignore_index=True)
    shuffled = calls.sample(frac=1.0, random_state=3).reset_index(drop=True)
    for frame in (two, shuffled):
        got = step_samples(frame, run.steps, run.runs, level)
        want = _samples_by_pandas(frame, run.steps, run.runs, level, "host")
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(np.sort(got[k]), np.sort(want[k]), rtol=1e-12, atol=1e-12, err_msg=str(k))


def test_a_tree_without_nested_calls_read_from_the_summary_equals_the_tree_built_alone():
    """At depth blocks no call is inside another: the tree is taken from the summary's module
    level when that is kept, and equals the tree built on its own, to the bit."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="blocks") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)
    run = p.run
    memo.clear()
    alone = {d: accounting.tree_table(run.calls, run.steps, d) for d in (None, 1, 2)}
    memo.clear()
    accounting.summary(run.calls, run.steps)
    assert memo.peek("summary", None, run.calls, run.steps) is not None
    for d, want in alone.items():
        memo.clear()
        accounting.summary(run.calls, run.steps)  # kept: the tree is read from it
        pd.testing.assert_frame_equal(accounting.tree_table(run.calls, run.steps, d), want, check_exact=True)


@pytest.mark.parametrize("depth", ["blocks", "all"])
def test_block_rows_summed_from_modules_equal_the_blocks_summed_from_calls(depth):
    """At depth blocks the summary adds each block's modules instead of its calls again: the same
    rows and figures (up to rounding); at depth all it sums the calls."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth) as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
    run = p.run
    memo.clear()
    ph = accounting.phases(run.calls, run.steps)
    from_calls = levels.level_frame(ph, "block", levels.level_sums(ph, "block"))
    from_modules = levels.blocks_from_modules(ph, levels.level_sums(ph, "module"))
    assert (from_modules is None) == (depth == "all")
    summ = accounting.summary(run.calls, run.steps, "block")
    want = from_calls.sort_values(["phase", "_o"], key=lambda s: s.map({"prefill": 0, "decode": 1}) if s.name == "phase" else s,
                                  kind="stable").drop(columns=["level", "_o"]).reset_index(drop=True)
    got = summ[~summ["name"].isin([accounting.RESIDUE, accounting.PROBE])].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False, rtol=1e-12)


@pytest.mark.parametrize("col", ["role", "phase", "module"])
def test_a_call_without_a_key_is_its_own_tree_row_whether_or_not_the_summary_was_built(col):
    """A call with a null module, phase or role: the tree is the same built alone and after the
    summary (which it is then not read from)."""
    calls, steps = _with_a_null(col)
    memo.clear()
    alone = accounting.tree_table(calls, steps)
    memo.clear()
    accounting.summary(calls, steps)
    pd.testing.assert_frame_equal(accounting.tree_table(calls, steps), alone, check_exact=True)


def test_groundwork_that_holds_its_frames_keeps_few_large_and_many_small(run, monkeypatch):
    """A kind whose results hold the frames (``phases``) keeps two results, and more (up to the
    default limit) while their frames are small in all: the next chart of 20 small runs finds each
    run's groundwork again; the same groundwork as built afresh."""
    memo.clear()
    frames = [(run.calls.copy(), run.steps.copy()) for _ in range(5)]
    built = [accounting.phases(c, s) for c, s in frames]
    assert all(memo.peek("phases", None, c, s) is b for (c, s), b in zip(frames, built))  # small: all kept
    fresh = accounting.Phases(*frames[0])
    pd.testing.assert_frame_equal(built[0].calls, fresh.calls)
    np.testing.assert_array_equal(built[0].prow, fresh.prow)
    memo.clear()
    monkeypatch.setattr(memo, "SMALL_ROWS", 2 * len(run.calls))  # these frames count as large: two kept
    for c, s in frames:
        accounting.phases(c, s)
    kept = [memo.peek("phases", None, c, s) is not None for c, s in frames]
    assert kept == [False, False, False, True, True]
