"""A large file is read one column at a time and its rows checked in parts (``probe.parquet_read``,
``probe.analysis.tree.PART_ROWS``, ``probe.rules.PART_ROWS``), so that a load's peak stays near the
frames it makes: the frames and the verdicts are the same as when everything is read and checked
whole. The thresholds are lowered here so that a tiny run takes the large-file path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe import rules, schema
from probe.analysis import tree
from probe import parquet_read as reading
from tiny import tiny_llama

FRAMES = ("calls", "steps", "runs", "sampling", "requests", "ops", "ledger", "allocations")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two recorded generate calls at depth all with a deep pass (every frame has rows), saved."""
    model = tiny_llama(layers=2)
    run = probe.profile(model, torch.tensor([[1, 5, 6, 7, 9]]), generate_kwargs={"max_new_tokens": 4, "do_sample": False},
                        depth="all", warmup=0, repeat=2, deep=True)
    return run.save(tmp_path_factory.mktemp("parts") / "run")


def in_parts(monkeypatch, rows: int = 3) -> None:
    monkeypatch.setattr(reading, "COLUMNWISE_ROWS", 0)
    monkeypatch.setattr(tree, "PART_ROWS", rows)
    monkeypatch.setattr(rules, "PART_ROWS", rows)


def test_every_frame_read_column_by_column_equals_the_one_read(saved, monkeypatch):
    whole = probe.load(saved)
    assert all(len(getattr(whole, k)) for k in ("calls", "steps", "runs", "ops", "ledger", "allocations"))
    in_parts(monkeypatch)
    parts = probe.load(saved)
    for key in FRAMES:
        pd.testing.assert_frame_equal(getattr(parts, key), getattr(whole, key), check_exact=True, obj=key)
    assert parts.summary().equals(whole.summary())


def test_a_part_of_a_run_read_column_by_column_equals_the_one_read(saved, monkeypatch):
    ask = dict(columns=["cpu_ms", "in_shapes"], steps=[0, 2])
    whole = probe.load(saved, **ask)
    in_parts(monkeypatch)
    parts = probe.load(saved, **ask)
    pd.testing.assert_frame_equal(parts.calls, whole.calls, check_exact=True)
    pd.testing.assert_frame_equal(parts.steps, whole.steps, check_exact=True)


def test_nullable_counters_with_and_without_values_read_column_by_column(saved, tmp_path, monkeypatch):
    """The allocator counters (nullable integers, absent when all null): values, nulls among them,
    and a column all null read the same both ways, and as they were saved."""
    run = probe.load(saved)
    n = len(run.calls)
    peak = pd.array([None if i % 3 else 4096 * i for i in range(n)], dtype="Int64")
    calls = run.calls.assign(mem_peak_bytes=peak, gpu_ms=run.calls["cpu_ms"] / 2,
                             layer=run.calls["layer"].astype("Int32"))
    edited = probe.Run(calls=schema.conform(calls, schema.CALLS), steps=run.steps, runs=run.runs, meta=dict(run.meta),
                       sampling=run.sampling, requests=run.requests).save(tmp_path / "counters")
    whole = probe.load(edited)
    in_parts(monkeypatch)
    parts = probe.load(edited)
    pd.testing.assert_frame_equal(parts.calls, whole.calls, check_exact=True)
    assert str(parts.calls["mem_peak_bytes"].dtype) == "Int64"
    assert parts.calls["mem_peak_bytes"].isna().sum() == sum(1 for i in range(n) if i % 3)
    assert parts.calls["mem_peak_bytes"].dropna().tolist() == [4096 * i for i in range(0, n, 3)]
    assert "mem_before_bytes" not in parts.calls.columns  # all null: absent, as read whole


def test_the_nesting_checked_in_parts_gives_the_rows_it_gives_whole(saved, monkeypatch):
    calls = probe.load(saved).calls
    whole = tree._parent_rows(calls)
    monkeypatch.setattr(tree, "PART_ROWS", 3)
    assert np.array_equal(tree._parent_rows(calls), whole)
    assert tree._parent_rows(calls, answer=False) is None
    # a step's rows out of their call order: not the usual layout, answered by the general path
    first = calls[(calls["step"] == calls["step"].iloc[0]) & (calls["run_id"] == calls["run_id"].iloc[0])]
    shuffled = first.iloc[::-1].reset_index(drop=True)
    got = tree._parent_rows(shuffled)
    call = shuffled["call"].to_numpy(dtype="int64")
    parent = shuffled["parent"].to_numpy(dtype="int64", na_value=-1)
    row_of = {c: i for i, c in enumerate(call)}
    assert got.tolist() == [row_of[p] if p >= 0 else -1 for p in parent]


def test_a_bad_parent_in_a_later_part_is_found(saved, monkeypatch):
    calls = probe.load(saved).calls
    late = len(calls) - 2
    bad = calls.copy()
    bad.loc[late, "parent"] = bad.loc[late, "call"]
    monkeypatch.setattr(tree, "PART_ROWS", 3)
    with pytest.raises(ValueError, match="nesting is not a tree") as info:
        tree.check_nesting(bad)
    monkeypatch.setattr(tree, "PART_ROWS", 1 << 17)
    with pytest.raises(ValueError) as whole:
        tree.check_nesting(bad)
    assert str(info.value) == str(whole.value)


def test_layers_beyond_the_model_are_named_in_parts_whatever_their_dtype(monkeypatch):
    """The layer rule, checked in parts of rows: a nullable integer column and a float one (an
    infinity included) name the same count and the first row, and never raise."""
    meta = {"config": {"num_hidden_layers": 30}}
    monkeypatch.setattr(rules, "PART_ROWS", 2)
    ints = pd.DataFrame({"layer": pd.array([0, None, 3, 99, 31], dtype="Int32")})
    assert rules.link_problems({"calls": ints}, meta) == [
        "calls.parquet: column 'layer' has 2 values beyond the model's 30 layers (first at row 3: 99)"]
    floats_ = pd.DataFrame({"layer": [0.0, np.nan, np.inf, 30.5]})
    assert rules.link_problems({"calls": floats_}, meta) == [
        "calls.parquet: column 'layer' has 2 values beyond the model's 30 layers (first at row 2: inf)"]
