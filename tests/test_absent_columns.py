"""Columns absent when all null (``probe.schema.CALLS.absent_when_null``): a CPU run's calls carry
no CUDA or allocator column, in memory or on disk, and every reader takes an absent one as all
null — the analyses, the reports, ``compare``, the CSV export, a part, runs combined with one that
has them, and runs saved before (their all-null columns on disk)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import probe
from probe import schema
from probe.analysis import tree
from probe.analysis.run import merge
from probe.cli import main
from probe.reports.csv_export import read_csv, write_csv
from dashboards.data import block_memory, combine
from edits import copy_run, reseal
from tiny import tiny_llama

CUDA = sorted(schema.CUDA_CALLS)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> probe.Run:
    """Two generate calls of a tiny LLaMA on the CPU, saved and loaded back."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6, 7, 9]]), max_new_tokens=3, do_sample=False)
    return probe.load(p.run.save(tmp_path_factory.mktemp("absent") / "cpu"))


def _with_cuda(run: probe.Run) -> probe.Run:
    """``run`` given CUDA times and allocator counters by arithmetic (the analyses only read the
    columns): GPU time half the host time, 1 KiB allocated before each call, 3 KiB after."""
    c, s = run.calls, run.steps
    n = len(c)
    calls = c.assign(gpu_ms=c["cpu_ms"] * 0.5, mem_before_bytes=pd.array(np.full(n, 1024), dtype="Int64"),
                     mem_after_bytes=pd.array(np.full(n, 3072), dtype="Int64"),
                     mem_peak_bytes=pd.array(np.full(n, 4096), dtype="Int64"))
    calls = calls.drop(columns=list(tree.TREE_COLUMNS), errors="ignore")
    calls, steps = tree.annotate(calls, s.assign(gpu_ms=s["forward_ms"] * 0.75))

    def renamed(df):  # run ids of their own, so that the two runs can be combined
        return df.assign(run_id=df["run_id"].astype("string") + "-gpu")

    return probe.Run(calls=schema.conform(renamed(calls), schema.CALLS),
                     steps=schema.conform(renamed(steps), schema.STEPS), runs=renamed(run.runs),
                     meta=dict(run.meta), sampling=renamed(run.sampling), requests=run.requests)


@pytest.fixture(scope="module")
def gpu_path(cpu_run, tmp_path_factory):
    return _with_cuda(cpu_run).save(tmp_path_factory.mktemp("absent") / "gpu")


def test_a_cpu_runs_cuda_columns_are_absent_on_disk_and_in_memory(cpu_run):
    on_disk = pq.read_schema(cpu_run.path / "calls.parquet").names
    assert not set(CUDA) & set(on_disk) and not set(CUDA) & set(cpu_run.calls.columns)
    assert list(cpu_run.calls.columns) == [c for c in schema.CALLS if c not in schema.CUDA_CALLS]
    for col in CUDA:  # read through the accessor: all null, at the schema's dtype
        got = schema.column(cpu_run.calls, col)
        assert len(got) == len(cpu_run.calls) and got.isna().all() and str(got.dtype) == schema.CALLS[col]
        assert np.isnan(schema.floats(cpu_run.calls, col)).all()


def test_a_run_with_cuda_values_keeps_them(cpu_run, gpu_path):
    back = probe.load(gpu_path)
    assert set(CUDA) - {"offload_ms"} <= set(pq.read_schema(gpu_path / "calls.parquet").names)
    assert "offload_ms" not in back.calls.columns  # nothing offloaded: still all null
    np.testing.assert_allclose(back.calls["gpu_ms"].to_numpy(), cpu_run.calls["cpu_ms"].to_numpy() * 0.5)
    assert (back.calls["mem_peak_bytes"] == 4096).all() and back.calls["gpu_self_ms"].notna().all()
    summ = back.summary("block")
    assert summ.loc[summ["role"] != "probe", "gpu_self_ms"].notna().all()  # the probe's own cost is host time
    np.testing.assert_allclose(summ.groupby("phase")["share"].sum().to_numpy(), 1.0, atol=1e-9)
    mem = block_memory(back.calls)
    assert (mem["mean_alloc_delta_bytes"] == 2048).all() and (mem["max_peak_over_bytes"] == 3072).all()


def test_the_analyses_read_an_absent_column_as_all_null(cpu_run):
    summ = cpu_run.summary()
    assert summ["gpu_total_ms"].isna().all() and summ["gpu_self_ms"].isna().all()
    np.testing.assert_allclose(summ.groupby(["level", "phase"])["share"].sum().to_numpy(), 1.0, atol=1e-9)
    assert len(cpu_run.tree()) and cpu_run.tree()["gpu_self_ms"].isna().all()
    assert block_memory(cpu_run.calls)["mean_alloc_delta_bytes"].isna().all()
    # a part that asked for the absent columns reads them as null; one that did not is told to
    part = probe.load(cpu_run.path, columns=["role", "layer", "cpu_ms", "gpu_ms", "out_bytes"])
    pd.testing.assert_frame_equal(part.summary(), summ)
    with pytest.raises(ValueError, match="gpu_ms"):
        probe.load(cpu_run.path, columns=["role", "layer", "cpu_ms", "out_bytes"]).summary()


def test_the_csv_export_writes_every_column_and_reads_back_equal(cpu_run, tmp_path):
    write_csv(cpu_run, tmp_path)
    header = (tmp_path / "calls.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == list(schema.CALLS)
    back = read_csv(tmp_path / "calls.csv")
    assert list(back.columns) == list(cpu_run.calls.columns)


def test_combining_a_run_with_them_and_one_without(cpu_run, gpu_path):
    gpu = probe.load(gpu_path)
    for both in (merge([cpu_run, gpu]), combine([cpu_run, gpu]), combine([gpu, cpu_run])):
        n = len(cpu_run.calls)
        assert len(both.calls) == 2 * n and str(both.calls["gpu_ms"].dtype) == "float64"
        assert str(both.calls["mem_peak_bytes"].dtype) == "Int64"
        mine = (both.calls["run_id"].astype(str).str.endswith("-gpu")).to_numpy()
        assert both.calls.loc[~mine, "gpu_ms"].isna().all() and both.calls.loc[mine, "gpu_ms"].notna().all()
        assert both.calls.loc[~mine, "mem_peak_bytes"].isna().all()
        assert len(both.summary())


def test_report_and_compare_of_runs_with_and_without(cpu_run, gpu_path, tmp_path):
    assert main(["report", str(cpu_run.path), "--format", "all", "--out", str(tmp_path / "cpu")]) == 0
    assert main(["report", str(gpu_path), "--format", "html", "--out", str(tmp_path / "gpu.html")]) == 0
    trace = json.loads((tmp_path / "cpu" / "trace.json").read_text())
    assert not any(str(e.get("cat", "")).startswith("gpu ") for e in trace["traceEvents"])
    assert main(["compare", str(cpu_run.path), str(gpu_path), "--out", str(tmp_path / "cmp")]) == 0
    assert main(["verify", str(cpu_run.path)]) == 0 and main(["verify", str(gpu_path)]) == 0


def test_a_run_saved_with_its_null_columns_loads_and_reports_the_same(cpu_run, tmp_path):
    old = copy_run(cpu_run.path, tmp_path / "old")
    # as a run was saved before the columns could be absent: every column, the CUDA ones null
    schema.conform(cpu_run.calls, schema.CALLS, whole=True).to_parquet(old / "calls.parquet", index=False)
    assert set(CUDA) <= set(pq.read_schema(old / "calls.parquet").names)
    reseal(old)
    back = probe.load(old)
    pd.testing.assert_frame_equal(back.calls, cpu_run.calls)
    for run_dir, out in ((cpu_run.path, "new"), (old, "old")):
        assert main(["report", str(run_dir), "--format", "csv", "--out", str(tmp_path / out)]) == 0
    for f in sorted((tmp_path / "new").iterdir()):
        assert f.read_bytes() == (tmp_path / "old" / f.name).read_bytes(), f.name
