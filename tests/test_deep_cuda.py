"""The deep pass's CUDA path on a machine without a GPU: what a CPU run keeps exactly as it was
(no ``ops.gpu_ms``, no device keys in the op clock, no allocator columns in the ledger), how the
device-time reader answers real CPU profiler results (no device events), and that frames which do
carry the CUDA figures (given by arithmetic: the analyses only read the columns) load, summarise
and report them. What only a GPU can show (the figures themselves) is benchmarks/gpu_check.py's
section f."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import probe
from probe import schema
from probe.analysis.ops import LEDGER_CUDA, OP_GPU, memory_ledger, op_summary
from probe.recording.deep_twin import (NO_DEVICE, TWIN_AFTER, TwinProfiler, cuda_profilable, device_ns_by_op,
                                      read_twin)
from edits import copy_run, reseal
from tiny import tiny_llama

PROMPT = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8]])


@pytest.fixture(scope="module")
def cpu_deep(tmp_path_factory) -> tuple[probe.Run, probe.Run]:
    """A deep run of a tiny LLaMA on the CPU (timed calls first: the ledger's join has shapes to
    find), and the same saved and loaded back."""
    m = tiny_llama(layers=2, hidden=32, vocab=64)
    m.config._attn_implementation = "sdpa"
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": TWIN_AFTER + 2, "do_sample": False},
                        warmup=0, deep=True)
    return run, probe.load(run.save(tmp_path_factory.mktemp("deep_cuda") / "cpu"))


def test_a_cpu_deep_run_has_no_gpu_column_in_memory_or_on_disk_and_loads_back_equal(cpu_deep):
    run, back = cpu_deep
    assert not run.ops.empty and OP_GPU not in run.ops.columns
    assert list(run.ops.columns) == [c for c in schema.OPS if c not in schema.OPS.absent_when_null]
    assert OP_GPU not in pq.read_schema(back.path / "ops.parquet").names
    pd.testing.assert_frame_equal(back.ops, run.ops)
    got = schema.column(run.ops, OP_GPU, schema.OPS)  # read through the accessor: all null
    assert got.isna().all() and str(got.dtype) == "float64" and len(got) == len(run.ops)
    # nothing of the CUDA path in what the run says of its op clock
    clock = run.meta["deep"]["op_clock"]
    assert not any(k.startswith("gpu") for s in clock["steps"] for k in s)
    assert not any(k.startswith("gpu") for k, v in clock.items() if k != "steps" for k in v)
    assert OP_GPU not in op_summary(run.ops, run.calls).columns
    assert not set(LEDGER_CUDA) & set(memory_ledger(run.ledger, run.ops, None, run.calls).columns)


def test_an_ops_file_saved_with_the_column_all_null_loads_without_it(cpu_deep, tmp_path):
    """As a writer that kept every column (``conform(whole=True)``) would have saved it."""
    _, back = cpu_deep
    old = copy_run(back.path, tmp_path / "old")
    schema.conform(back.ops, schema.OPS, whole=True).to_parquet(old / "ops.parquet", index=False)
    assert OP_GPU in pq.read_schema(old / "ops.parquet").names
    reseal(old)
    pd.testing.assert_frame_equal(probe.load(old).ops, back.ops)


def _with_gpu(run: probe.Run) -> probe.Run:
    """``run`` with device times (a third of each op's host time; views launch nothing: 0; one op
    unmatched: null) and the timed calls' allocator counters, by arithmetic."""
    ops = run.ops.copy()
    gpu = ops["host_ms"].to_numpy() / 3
    gpu[ops["op"].str.startswith("aten.view").to_numpy()] = 0.0
    gpu[0] = np.nan
    ops[OP_GPU] = gpu
    c = run.calls
    n = len(c)
    calls = c.assign(mem_before_bytes=pd.array(np.full(n, 1 << 20), dtype="Int64"),
                     mem_after_bytes=pd.array(np.full(n, (1 << 20) + 512), dtype="Int64"),
                     mem_peak_bytes=pd.array(np.full(n, (1 << 20) + 4096), dtype="Int64"))
    return probe.Run(calls=schema.conform(calls, schema.CALLS), steps=run.steps, runs=run.runs, meta=dict(run.meta),
                     sampling=run.sampling, requests=run.requests, ops=schema.conform(ops, schema.OPS),
                     ledger=run.ledger, allocations=run.allocations)


def test_frames_with_device_times_keep_them_and_show_them(cpu_deep, tmp_path):
    from probe.reports.deep_section import deep_lines

    run, _ = cpu_deep
    gpu = _with_gpu(run)
    back = probe.load(gpu.save(tmp_path / "gpu"))
    assert OP_GPU in pq.read_schema(back.path / "ops.parquet").names
    pd.testing.assert_frame_equal(back.ops, gpu.ops)
    summ = op_summary(back.ops, back.calls)
    assert OP_GPU in summ.columns
    real = summ[summ["op"] != "(dispatch and Python)"]
    # per sampled step, the kinds' device time adds up to the ops' (the one null op left out)
    steps = back.ops.groupby("phase")["step"].nunique()
    for phase, grp in real.groupby("phase"):
        want = back.ops.loc[back.ops["phase"] == phase, OP_GPU].sum() / steps[phase]
        assert grp[OP_GPU].sum() == pytest.approx(want)
    assert summ.loc[summ["op"] == "(dispatch and Python)", OP_GPU].isna().all()
    ledger = memory_ledger(back.ledger, back.ops, None, back.calls)
    blocks = ledger[ledger["block"] != "(step)"]
    assert (blocks["allocator_added_bytes"] == 512).all() and (blocks["allocator_peak_added_bytes"] == 4096).all()
    assert ledger.loc[ledger["block"] == "(step)", "allocator_added_bytes"].isna().all()
    text = "\n".join(deep_lines(back))
    assert "GPU " in text and "CUDA allocator (timed calls) +512 B" in text
    assert "GPU " not in "\n".join(deep_lines(run))


def test_report_table_has_the_gpu_column_only_where_the_ops_have_it(cpu_deep, tmp_path):
    from probe.cli import main

    run, back = cpu_deep
    gpu = _with_gpu(run).save(tmp_path / "gpu")
    assert main(["report", str(back.path), "--format", "html", "--out", str(tmp_path / "cpu.html")]) == 0
    assert main(["report", str(gpu), "--format", "html", "--out", str(tmp_path / "gpu.html")]) == 0
    cpu_html = (tmp_path / "cpu.html").read_text(encoding="utf-8")
    gpu_html = (tmp_path / "gpu.html").read_text(encoding="utf-8")

    def table(html: str, table_id: str) -> str:
        at = html.index(f'id="{table_id}"')
        return html[at:html.index("</table>", at)]

    header = "gpu_<wbr>ms"
    for phase in ("prefill", "decode"):
        assert header not in table(cpu_html, f"deep-ops-{phase}") and header in table(gpu_html, f"deep-ops-{phase}")
    alloc = "allocator_<wbr>added_<wbr>bytes"
    assert alloc not in table(cpu_html, "deep-ledger") and alloc in table(gpu_html, "deep-ledger")


def test_device_times_of_real_cpu_profiler_results_are_none_with_a_reason():
    x = torch.randn(8, 16)
    tp = TwinProfiler()
    tp.start()
    try:
        y = x.mean(-1, keepdim=True)
        z = (x - y).t()
    finally:
        results = tp.stop()
    assert tp.device is False and z.shape == (16, 8) and not torch.autograd._profiler_enabled()
    assert device_ns_by_op(results) == ({}, 0)
    names = ["aten::mean", "aten::view", "aten::sub", "aten::t"]
    got = read_twin(names, results, 0.0, device=True)
    plain = read_twin(names, results, 0.0, device=False)
    host, matched = plain.host_ns, plain.matched
    assert got.host_ns == host and got.matched == matched == 3  # the host side as without device=True
    assert got.device_ns is None and got.device == {"total_ns": 0, "matched_ns": 0, "ops": 0, "why": NO_DEVICE["none"]}
    assert plain.device_ns is None and plain.device is None
    if not torch.cuda.is_available():
        assert not cuda_profilable()  # the deep pass then never asks the profiler for CUDA activity


def test_a_step_on_cuda_says_why_it_has_no_device_times_and_keeps_its_host_times(monkeypatch):
    """The observer's CUDA branch, driven on this CPU: the model taken as on CUDA (``_cuda``), first
    with a build whose kineto records no CUDA activity (the twin's profiler as on CPU: ``gpu_why``),
    then as if it did (the profiler asked for CUDA activity, which a CPU build turns off: the twin
    records no device work, and says so). Host times are matched as on CPU either way; no op gets
    a device time it did not get measured."""
    import warnings

    from probe.recording import deep as deep_mod
    from probe.recording.deep import DeepObserver, plan_of

    m = tiny_llama(layers=2, hidden=32, vocab=64)
    kw = {"max_new_tokens": TWIN_AFTER + 2, "do_sample": False}
    want = m.generate(PROMPT, **kw)
    for profilable, why in ((False, NO_DEVICE["cupti"]), (True, NO_DEVICE["none"])):
        monkeypatch.setattr(deep_mod, "cuda_profilable", lambda p=profilable: p)
        obs = DeepObserver(plan_of([1]))
        with probe.attach(m, observers=[obs]) as p:
            obs._cuda = True  # set after install, which finds no CUDA tensor here
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: "CUDA is not available, disabling CUDA profiling"
                got = m.generate(PROMPT, **kw)
        assert torch.equal(want, got) and not torch.autograd._profiler_enabled()
        step = {s["step"]: s for s in p.run.meta["deep"]["op_clock"]["steps"]}[1]
        assert step["method"] == "profiler twin" and step["matched"] == step["of"] > 0
        assert step["gpu_matched"] == 0 and step["gpu_why"] == why
        assert p.run.meta["deep"]["op_clock"]["decode"]["gpu_matched"] == 0
        assert OP_GPU not in p.run.ops.columns and "gpu_times" in p.run.meta["deep"]
        assert (p.run.ops["host_ms"] >= 0).all()
