"""``probe.load(path, columns=..., steps=...)``: a part of a real recorded run, equal to the same
part of the whole run, marked so that it is never saved over it, and bad selections refused
before any file is read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import probe
from probe.analysis import tree
from probe.analysis.part import ANALYSIS_COLUMNS, KEY_COLUMNS
from probe.analysis.run import RunLoadError, RunSaveError
from probe.schema import CALLS, CUDA_CALLS  # a CPU run: the CUDA columns are absent
from edits import copy_run, reseal
from tiny import tiny_llama, used_categories


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Two generate calls of a tiny LLaMA at depth all (prefill and decode steps, sampling rows)."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6, 7, 9]]), max_new_tokens=3, do_sample=False)
    return p.run.save(tmp_path_factory.mktemp("part") / "run")


@pytest.fixture(scope="module")
def whole(saved) -> probe.Run:
    return probe.load(saved)


def _rows(df: pd.DataFrame, keep) -> pd.DataFrame:
    """The rows ``keep`` selects, with the categories they use (a part read from the file may keep
    the file's whole dictionary, or only what its rows use)."""
    return used_categories(df[keep].reset_index(drop=True))


def test_columns_reads_those_and_the_key_columns_equal_to_the_whole_runs(saved, whole):
    part = probe.load(saved, columns=["cpu_ms", "in_shapes"])
    want = [c for c in CALLS if c not in CUDA_CALLS and c in {"cpu_ms", "in_shapes", *KEY_COLUMNS}]
    assert list(part.calls.columns) == want
    pd.testing.assert_frame_equal(part.calls, whole.calls[want])
    pd.testing.assert_frame_equal(part.steps, whole.steps)  # the other frames are whole
    pd.testing.assert_frame_equal(part.runs, whole.runs)
    asked = [c for c in CALLS if c in {"cpu_ms", "in_shapes", *KEY_COLUMNS}]  # gpu_self_ms asked, absent
    assert part.part == {"columns": asked, "steps": None} and whole.part is None
    # one name is a list of one; no name at all reads the key columns
    assert list(probe.load(saved, columns="layer").calls.columns) == [c for c in CALLS if c not in CUDA_CALLS and c in {"layer", *KEY_COLUMNS}]
    assert list(probe.load(saved, columns=[]).calls.columns) == [c for c in CALLS if c not in CUDA_CALLS and c in KEY_COLUMNS]


@pytest.mark.parametrize("steps, keep", [
    ("decode", lambda df: df["phase"] == "decode"),
    ("prefill", lambda df: df["phase"] == "prefill"),
    (0, lambda df: df["step"] == 0),
    (range(1, 3), lambda df: df["step"].between(1, 2)),
    ([3, 1], lambda df: df["step"].isin([1, 3])),
    (range(0, 10, 2), lambda df: df["step"] % 2 == 0),
    (iter([2]), lambda df: df["step"] == 2),
    ([], lambda df: df["step"] < 0),
])
def test_steps_selects_the_rows_of_those_steps_in_every_step_frame(saved, whole, steps, keep):
    part = probe.load(saved, steps=steps)
    for key in ("calls", "steps", "sampling"):
        full = getattr(whole, key)
        pd.testing.assert_frame_equal(used_categories(getattr(part, key)), _rows(full, keep(full)), obj=key)
    pd.testing.assert_frame_equal(part.runs, whole.runs)  # runs are read whole
    assert part.part is not None and part.part["columns"] is None


def test_step_zero_is_the_prefill_of_every_generate_call(saved, whole):
    part = probe.load(saved, steps=0)
    assert sorted(part.steps["run_id"]) == sorted(whole.runs["run_id"])
    assert set(part.steps["phase"]) == {"prefill"}


def test_a_phase_part_summarises_as_that_phase_of_the_whole_run(saved, whole):
    part = probe.load(saved, columns=list(ANALYSIS_COLUMNS), steps="decode")
    got = part.summary()
    want = whole.summary()
    pd.testing.assert_frame_equal(got, _rows(want, want["phase"] == "decode"))
    tw = whole.tree()
    pd.testing.assert_frame_equal(part.tree(), _rows(tw, tw["phase"] == "decode"))


def test_an_analysis_that_needs_a_column_not_loaded_says_which(saved):
    part = probe.load(saved, columns=["cpu_ms"])
    for fn in (part.summary, part.tree):
        with pytest.raises(ValueError, match=r"role, layer, gpu_ms, out_bytes.*probe\.load\(path, columns="):
            fn()


def test_a_part_is_never_saved_so_never_replaces_the_whole_run(saved, whole, tmp_path):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    for part in (probe.load(saved, columns=["cpu_ms"]), probe.load(saved, steps="decode")):
        for target in (saved, tmp_path / "elsewhere"):
            with pytest.raises(RunSaveError, match=r"loaded in part .*probe\.load\(path\)"):
                part.save(target)
        assert not (tmp_path / "elsewhere").exists()
        # a Run built from a part's frames and meta is a part still
        with pytest.raises(RunSaveError, match="loaded in part"):
            probe.Run(calls=part.calls, steps=part.steps, runs=part.runs, meta=part.meta).save(tmp_path / "x")
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    assert "loaded_part" not in json.loads((saved / "meta.json").read_text())
    whole.save(tmp_path / "copy")  # the whole run saves as before
    pd.testing.assert_frame_equal(probe.load(tmp_path / "copy").calls, whole.calls)


@pytest.mark.parametrize("kw, message", [
    (dict(columns=["cpu_ms", "cpu_time"]), r"'cpu_time' not a column of the calls frame; known: run_id, rank, step"),
    (dict(columns=[3]), r"3 not a column"),
    (dict(steps="warmup"), r"not a phase; .* prefill, decode"),
    (dict(steps=-1), r"-1 is not a step number"),
    (dict(steps=True), r"give a step number"),
    (dict(steps=1.5), r"give a step number"),
    (dict(steps=[1, "2"]), r"'2' is not a step number"),
    (dict(steps=range(-2, 3)), r"step numbers start at 0"),
    (dict(steps={"decode": 1}), r"give a step number"),
])
def test_a_bad_selection_is_a_value_error_before_any_file_is_read(kw, message, saved, tmp_path):
    for path in (saved, tmp_path / "no-such-run"):  # checked first: the folder is never looked at
        with pytest.raises(ValueError, match=message):
            probe.load(path, **kw)


def test_a_part_is_checked_as_a_whole_load_is(saved, tmp_path):
    """The manifest covers every file whole, so a file edited outside the part read is refused."""
    d = copy_run(saved, tmp_path / "run")
    calls = pd.read_parquet(d / "calls.parquet")
    calls["out_shapes"] = "[[1, 2]]"
    calls.to_parquet(d / "calls.parquet", index=False)
    with pytest.raises(RunLoadError, match=r"calls.parquet .*meta.json"):
        probe.load(d, columns=["cpu_ms"], steps="decode")
    calls["cpu_ms"] = -1.0  # a value no recording makes, in a column that is read
    calls.to_parquet(d / "calls.parquet", index=False)
    reseal(d)
    with pytest.raises(RunLoadError, match="cpu_ms"):
        probe.load(d, columns=["cpu_ms"], steps=1)


def test_a_run_saved_without_its_tree_gets_it_in_a_part(saved, whole, tmp_path):
    d = copy_run(saved, tmp_path / "old")
    pd.read_parquet(d / "calls.parquet").drop(columns=list(tree.TREE_COLUMNS), errors="ignore").to_parquet(d / "calls.parquet",
                                                                                          index=False)
    reseal(d)
    part = probe.load(d, columns=["role"], steps="decode")
    want = [c for c in CALLS if c not in CUDA_CALLS and c in {"role", *KEY_COLUMNS}]
    assert list(part.calls.columns) == want  # the columns the tree was derived from are not kept
    pd.testing.assert_frame_equal(used_categories(part.calls), _rows(whole.calls[want], whole.calls["phase"] == "decode"))


def test_the_ranks_of_a_tensor_parallel_run_load_in_part(whole, tmp_path):
    from probe.capture.ranks import save_rank

    root = tmp_path / "tp"
    for r in (0, 1):
        save_rank(probe.Run(calls=whole.calls, steps=whole.steps, runs=whole.runs, meta=dict(whole.meta, rank=r)),
                  root)
    part = probe.load(root, columns=["cpu_ms"], steps="prefill")
    one = whole.calls[whole.calls["phase"] == "prefill"]
    assert part.meta["ranks"] == [0, 1] and len(part.calls) == 2 * len(one)
    assert list(part.calls.columns) == [c for c in CALLS if c not in CUDA_CALLS and c in {"cpu_ms", *KEY_COLUMNS}]
    with pytest.raises(RunSaveError, match="loaded in part"):
        part.save(tmp_path / "merged")
