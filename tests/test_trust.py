"""Numbers one can trust: the busy-machine detector, spread over repeats, significance, the CI gate.

Timings here come from injected clocks and numbers written into real frames: nothing asserts on
how fast this machine is (benchmarks/busy_machine.py runs the real thing beside CPU hogs).
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe.cli import main
from probe.models import save_bundled
from probe.recording.noise import BUSY_THRESHOLD_PCT, busy, step_wait_ms
from probe.analysis.stats import (
    block_spread,
    bootstrap_slowdown,
    comparability,
    differences,
    gate,
    headline_spread,
    mann_whitney_p,
    significance,
    verdict,
)
from tests.tiny import tiny_llama


class Clock:
    """An integer-ns clock that advances ``tick`` ns (times a seeded jitter) per read."""

    def __init__(self, tick: int = 1000, jitter: float = 0.0, seed: int = 0) -> None:
        self.t, self.tick, self.jitter = 0, tick, jitter
        self.rng = random.Random(seed)

    def __call__(self) -> int:
        f = 1.0 + (self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        self.t += int(self.tick * f)
        return self.t


def _ids(n: int = 5) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


def record(clock=None, repeats: int = 1, prompt: int = 5, new: int = 4, ticks=None, depth: str = "blocks") -> probe.Run:
    """A tiny Llama's generate calls under ``clock``; ``ticks`` sets the clock's tick per call."""
    model = tiny_llama(layers=2, hidden=32)
    with probe.attach(model, clock=clock, depth=depth) as p:
        for i in range(repeats):
            if ticks is not None:
                clock.tick = ticks[i]
            model.generate(_ids(prompt), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return p.run


def with_cpu(run: probe.Run, forward_ms: float, cpu_ms: float, wait_ms=None, run_cpu_ms=None) -> probe.Run:
    """``run`` with its steps' wall and CPU times (and the runs' run-queue wait) set to these numbers."""
    steps = run.steps.assign(forward_ms=forward_ms, process_cpu_ms=cpu_ms)
    runs = run.runs.copy()
    if wait_ms is not None:
        runs["cpu_wait_ms"] = float(wait_ms)
        runs["process_cpu_ms"] = float(run_cpu_ms)
    return probe.Run(calls=run.calls, steps=steps, runs=runs, meta={**run.meta, "torch_threads": 2, "cpu_cores": 2})


# --------------------------------------------------------------------------- detector
def test_step_wait_is_wall_time_beyond_cpu_time_never_negative():
    got = step_wait_ms(pd.Series([10.0, 5.0, 8.0, np.nan]), pd.Series([2.0, 6.0, 8.0, 1.0]))
    assert got.iloc[:3].tolist() == [8.0, 0.0, 0.0] and math.isnan(got.iloc[3])


def test_an_injected_clock_records_no_cpu_time_so_nothing_is_judged():
    run = record(Clock())
    assert run.steps["process_cpu_ms"].isna().all() and run.runs["cpu_wait_ms"].isna().all()
    b = run.noise()
    assert math.isnan(b.wait_pct) and not b.busy and b.message() == ""


def test_the_real_clock_records_cpu_time_and_run_queue_wait():
    run = record()
    assert run.steps["process_cpu_ms"].notna().all() and (run.steps["process_cpu_ms"] >= 0).all()
    gen = run.runs[run.runs["kind"] == "generate"]
    assert gen["process_cpu_ms"].notna().all()
    if os.path.exists("/proc/self/task/%d/schedstat" % os.getpid()):
        assert gen["cpu_wait_ms"].notna().all() and (gen["cpu_wait_ms"] >= 0).all()
    assert run.meta["torch_threads"] == torch.get_num_threads() and run.meta["cpu_cores"] >= 1
    # the closing reads are inside the run's window, stated as probe_end_ms, inside the last
    # step's time outside the model as its stage "probe"
    assert (gen["probe_end_ms"] > 0).all()
    for rid, ms in gen.set_index("run_id")["probe_end_ms"].items():
        steps = run.steps[run.steps["run_id"] == rid]
        last = steps["step"].max()
        samp = run.sampling[(run.sampling["run_id"] == rid) & (run.sampling["step"] == last)].set_index("stage")
        assert samp.loc["probe", "host_ms"] >= ms
        assert ms < float(steps.loc[steps["step"] == last, "outside_ms"].iloc[0])


@pytest.mark.skipif(not os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat"), reason="no schedstat here")
def test_run_queue_reads_follow_threads_that_start_and_end_and_a_fork():
    """The per-thread schedstat descriptors are kept between reads: a thread started since is
    read from zero, one that ended is dropped with its descriptor, and a forked child reads its
    own threads, never the parent's through inherited descriptors."""
    import threading

    from probe.recording.noise import _SCHEDSTAT, read_run_delay

    before = read_run_delay()
    go = threading.Event()
    worker = threading.Thread(target=go.wait)
    worker.start()
    # the read that closes a run looks at the threads it knew only: the new one is not there yet
    assert set(read_run_delay(known=True)) == set(before)
    during = read_run_delay()
    new = set(during) - set(before)
    assert len(new) == 1 and str(worker.native_id) in new
    assert all(during[t] >= before[t] for t in before if t in during)  # a wait only grows
    go.set()
    worker.join()  # returns before the kernel's task is gone: read until it is
    import time
    for _ in range(500):
        after = read_run_delay()
        if str(worker.native_id) not in after:
            break
        time.sleep(0.01)
    assert str(worker.native_id) not in after and str(worker.native_id) not in _SCHEDSTAT["fds"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one thread, its own id
        os.write(w, json.dumps(sorted(read_run_delay())).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads(os.read(r, 4096)) == [str(pid)]


def test_descheduled_steps_make_a_busy_run_and_the_warning_says_how_busy():
    base = record(Clock())
    quiet = busy(with_cpu(base, 10.0, 9.6).steps)
    assert quiet.steps_pct == pytest.approx(4.0) and not quiet.busy and quiet.steps_descheduled == 0
    loud = with_cpu(base, 10.0, 2.0).noise()
    assert loud.steps_pct == pytest.approx(80.0) and loud.busy and loud.steps_descheduled == len(base.steps)
    assert loud.threads == 2 and loud.cores == 2 and loud.parallel == 2
    assert loud.message() == ("the machine was busy: 80 % of step time was spent waiting for a CPU; rerun on a "
                              "quiet machine or with `--repeat`")
    # a multi-threaded step uses more CPU time than wall time: no waiting, whatever the ratio
    assert with_cpu(base, 10.0, 19.0).noise().steps_pct == 0.0


def test_run_queue_wait_is_a_share_of_the_time_the_process_was_ready_to_run():
    base = record(Clock())
    b = with_cpu(base, 10.0, 10.0, wait_ms=30.0, run_cpu_ms=70.0).noise()
    assert b.runqueue_pct == pytest.approx(30.0) and b.steps_pct == 0.0
    assert b.wait_pct == pytest.approx(30.0) and b.busy  # the larger of the two measures
    edge = with_cpu(base, 10.0, 10.0, wait_ms=BUSY_THRESHOLD_PCT, run_cpu_ms=100 - BUSY_THRESHOLD_PCT).noise()
    assert not edge.busy  # at the threshold: not above it


def test_on_cuda_only_the_run_queue_counts_and_gpu_times_are_named_unaffected():
    base = with_cpu(record(Clock()), 10.0, 1.0, wait_ms=40.0, run_cpu_ms=60.0)
    cuda = probe.Run(calls=base.calls, steps=base.steps.assign(gpu_ms=9.0), runs=base.runs, meta=base.meta)
    b = cuda.noise()
    assert b.cuda and math.isnan(b.steps_pct)  # the host may sleep in a sync: wall > CPU is no evidence
    assert b.wait_pct == pytest.approx(40.0) and "gpu_ms" in b.message() and "TTFT" in b.message()


# --------------------------------------------------------------------------- spread
def test_spread_over_repeats_is_median_and_min_max_of_each_generate_total():
    clock = Clock(tick=1000)
    run = record(clock, repeats=3, ticks=[1000, 3000, 2000])
    per_gen = run.calls.groupby(["run_id", "role", "phase"])["self_ms"].sum()
    sp = block_spread(run.calls, run.steps, run.runs, level="block").set_index(["name", "phase"])
    layer = per_gen.xs(("layer", "decode"), level=("role", "phase"))
    assert layer.nunique() == 3
    row = sp.loc[("layer", "decode")]
    assert row["generates"] == 3
    assert row["min_ms"] == pytest.approx(layer.min()) and row["max_ms"] == pytest.approx(layer.max())
    assert row["median_ms"] == pytest.approx(layer.median())
    assert row["spread_pct"] == pytest.approx((layer.max() - layer.min()) / layer.median() * 100)
    assert ("(outside model)", "decode") in sp.index and ("(residue)", "prefill") in sp.index
    # it joins the summary on (level, name, phase)
    summ = run.summary("block").merge(run.spread("block"), on=["level", "name", "phase"], how="left")
    assert summ.loc[summ["name"] == "layer", "generates"].eq(3).all()
    head = headline_spread(run.runs).set_index("metric")
    ttft = run.runs["ttft_ms"]
    assert head.loc["ttft_ms", "median"] == pytest.approx(ttft.median())
    assert head.loc["ttft_ms", "min"] == pytest.approx(ttft.min()) and head.loc["ttft_ms", "max"] == pytest.approx(ttft.max())


def test_one_generate_call_has_no_spread():
    run = record(Clock())
    sp = run.spread()
    assert (sp["generates"] == 1).all() and (sp["min_ms"] == sp["max_ms"]).all()


@pytest.mark.parametrize("level", ["block", "role", "module"])
def test_spread_of_one_call_is_the_summary_self_time_at_every_level(level):
    """Nested modules (depth all) are counted once: the spread reads self time, like the summary."""
    run = record(Clock(tick=1000), depth="all")
    summ = run.summary(level).set_index(["name", "phase"])["self_ms"]
    sp = run.spread(level)
    assert (sp["level"] == level).all()
    sp = sp.set_index(["name", "phase"])["median_ms"]
    assert sp.drop(index="(outside model)", level=0).sort_index().to_dict() == pytest.approx(summ.sort_index().to_dict())
    with pytest.raises(ValueError, match="level must be one of"):
        run.spread("layer")


# --------------------------------------------------------------------------- significance
def test_mann_whitney_matches_its_exact_distribution():
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)  # 2 of 20 arrangements
    assert mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert mann_whitney_p([1, 2, 3], [1.5, 2.5, 3.5]) == pytest.approx(0.7)
    assert mann_whitney_p([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert math.isnan(mann_whitney_p([], [1.0]))


def test_bootstrap_interval_covers_a_known_slowdown_and_straddles_none():
    rng = np.random.default_rng(1)
    a = 10 + rng.normal(0, 0.3, 40)
    p, lo, hi = bootstrap_slowdown(a, a * 1.2)
    assert p == pytest.approx(20.0) and lo < 20 < hi and lo > 10
    p, lo, hi = bootstrap_slowdown(a, 10 + rng.normal(0, 0.3, 40))
    assert lo < 0 < hi
    # throughput: fewer tokens per second is a slowdown
    p, _, _ = bootstrap_slowdown([100.0, 100.0], [80.0, 80.0], higher_is_better=True)
    assert p == pytest.approx(25.0)
    assert math.isnan(bootstrap_slowdown([1.0], [2.0])[1])  # one sample: no interval


def test_significance_and_gate_find_the_slower_run_and_nothing_else():
    a = record(Clock(tick=1000, jitter=0.05, seed=1), repeats=5)
    b = record(Clock(tick=1300, jitter=0.05, seed=2), repeats=5)
    a2 = record(Clock(tick=1000, jitter=0.05, seed=3), repeats=5)
    sig = significance(a, b).set_index(["level", "name", "phase"])
    layer = sig.loc[("block", "layer", "decode")]
    assert layer["slowdown_pct"] == pytest.approx(30.0, abs=3) and layer["significant"]
    assert layer["ci_low_pct"] > 20 and layer["ci_high_pct"] < 40 and layer["p_value"] < 0.05
    assert sig.loc[("metric", "ttft_ms", "")]["significant"]
    # one sample per step for a block, per generate call for TTFT: 5 calls of 4 new tokens
    for run, col in ((a, "a_n"), (b, "b_n")):
        per_phase = run.steps.groupby("phase").size()
        assert per_phase["decode"] == 5 * 3 and per_phase["prefill"] == 5
        assert layer[col] == per_phase["decode"]
        assert sig.loc[("block", "layer", "prefill")][col] == per_phase["prefill"]
        assert sig.loc[("metric", "ttft_ms", "")][col] == 5
        assert sig.loc[("metric", "tpot_ms", "")][col] == per_phase["decode"]
    assert sig.loc[("metric", "decode_tok_s", "")]["slowdown_pct"] == pytest.approx(30.0, abs=3)
    failed = gate(significance(a, b), 10)
    assert {"layer", "ttft_ms", "tpot_ms"} <= set(failed["name"])
    assert gate(significance(a, b), 50).empty  # slower, but not by 50 %
    assert gate(significance(b, a), 10).empty  # faster is never a failure
    same = significance(a, a2)  # the same speed, other jitter: every change is small, none gated
    assert gate(same, 5).empty
    assert (same["slowdown_pct"].abs() < 5).all()


def test_three_against_three_is_never_significant():
    a = record(Clock(tick=1000, jitter=0.05, seed=1), repeats=3)
    b = record(Clock(tick=2000, jitter=0.05, seed=2), repeats=3)
    ttft = significance(a, b).set_index("name").loc["ttft_ms"]
    assert ttft["slowdown_pct"] > 50 and ttft["p_value"] == pytest.approx(0.1) and not ttft["significant"]


def test_runs_of_different_work_are_not_comparable():
    a = record(Clock(), prompt=5)
    assert comparability(a, record(Clock(), prompt=5)) == []
    problems = comparability(a, record(Clock(), prompt=9))
    assert problems == ["different prompt length: A 5 vs B 9"]


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_bundled(tmp_path_factory.mktemp("model") / "m", num_hidden_layers=2)


def test_run_warms_up_by_default_and_records_repeats(model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", str(model_dir), "--max-new-tokens", "2", "--repeat", "2", "--out", str(out), "--no-report"])
    text = capsys.readouterr().out
    assert code == 0
    run = probe.load(out)
    gen = run.runs[run.runs["kind"] == "generate"]
    assert len(gen) == 2  # the warm-up left nothing behind
    assert run.meta["warmup"]["generates"] == 1 and run.meta["warmup"]["cold_run_ids"] == []
    assert run.meta["repeat"] == 2 and "wait_pct" in run.meta["noise"]
    assert "repeats    2 recorded generate calls: median [min - max]" in text
    assert "self ms per generate: median [min - max]" in text
    assert ("WARNING: the machine was busy" in text) == run.noise().busy


def test_warmup_zero_records_the_cold_call_and_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "cold"
    assert main(["run", str(model_dir), "--max-new-tokens", "2", "--warmup", "0", "--out", str(out),
                 "--no-report"]) == 0
    run = probe.load(out)
    assert run.meta["warmup"]["generates"] == 0
    assert run.meta["warmup"]["cold_run_ids"] == [run.runs["run_id"].iloc[0]]


@pytest.mark.parametrize("flag,value", [("--repeat", "0"), ("--warmup", "-1")])
def test_bad_repeat_or_warmup_is_exit_2(flag, value, tmp_path, capsys):
    assert main(["run", "--max-new-tokens", "2", flag, value, "--out", str(tmp_path / "x")]) == 2
    assert flag in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    runs = {
        "a": record(Clock(tick=1000, jitter=0.05, seed=1), repeats=5),
        "b": record(Clock(tick=1300, jitter=0.05, seed=2), repeats=5),
        "a2": record(Clock(tick=1000, jitter=0.05, seed=3), repeats=5),
        "long": record(Clock(tick=1000, jitter=0.05, seed=4), repeats=5, prompt=9),
    }
    return {k: r.save(root / k) for k, r in runs.items()}


def test_fail_above_exits_1_naming_what_got_slower(saved, tmp_path, capsys):
    code = main(["compare", str(saved["a"]), str(saved["b"]), "--out", str(tmp_path / "c"), "--fail-above", "10"])
    out = capsys.readouterr().out
    assert code == 1
    fail = out[out.index("FAIL"):]
    assert "layer (decode, block): +" in fail and "ttft_ms: +" in fail
    assert "model.layers.0 (decode, module): +" in fail  # and each module by name
    sig = pd.read_csv(tmp_path / "c" / "significance.csv")
    assert {"slowdown_pct", "ci_low_pct", "ci_high_pct", "p_value", "significant"} <= set(sig.columns)


def test_fail_above_exits_0_within_the_threshold_or_the_noise(saved, tmp_path, capsys):
    assert main(["compare", str(saved["a"]), str(saved["b"]), "--out", str(tmp_path / "c1"), "--fail-above", "50"]) == 0
    assert main(["compare", str(saved["b"]), str(saved["a"]), "--out", str(tmp_path / "c2"), "--fail-above", "5"]) == 0
    assert main(["compare", str(saved["a"]), str(saved["a2"]), "--out", str(tmp_path / "c3"), "--fail-above", "5"]) == 0
    assert "OK: nothing is slower than A by more than 5%" in capsys.readouterr().out


def test_fail_above_refuses_runs_of_different_work_and_bad_input(saved, tmp_path, capsys):
    code = main(["compare", str(saved["a"]), str(saved["long"]), "--out", str(tmp_path / "c"), "--fail-above", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "not comparable" in err and "different prompt length: A 5 vs B 9" in err
    assert not (tmp_path / "c").exists()
    assert main(["compare", str(saved["a"]), str(saved["b"]), "--fail-above", "-1"]) == 2
    assert "--fail-above takes a percentage" in capsys.readouterr().err
    assert main(["compare", str(saved["a"]), str(tmp_path / "missing"), "--fail-above", "5"]) == 2
    # without the gate, different work is still shown side by side, with a note
    assert main(["compare", str(saved["a"]), str(saved["long"]), "--out", str(tmp_path / "c4")]) == 0
    assert "note: the runs differ in prompt length (A: 5, B: 9)" in capsys.readouterr().out


# --------------------------------------------------------------------------- report and dashboard
def test_report_and_compare_page_carry_the_busy_warning_and_the_spread(tmp_path):
    from probe.reports.compare import render_comparison
    from probe.reports.html import render_report

    base = record(Clock(tick=1000, jitter=0.05), repeats=3)
    loud = with_cpu(base, 10.0, 2.0)
    page = render_report(loud)
    assert 'id="busy-warning"' in page
    assert "The machine was busy: 80 % of step time was spent waiting for a CPU; rerun on a quiet machine " \
           "or with <code>--repeat</code>" in page
    assert 'id="spread"' in page and "Spread over 3 generate calls" in page and 'id="spread-table"' in page
    quiet = render_report(with_cpu(base, 10.0, 9.8))
    assert 'id="busy-warning"' not in quiet
    assert "Machine: 2.0 % of step time waiting for a CPU" in quiet
    cmp_page = render_comparison(with_cpu(base, 10.0, 9.8), loud)
    assert 'id="busy-b"' in cmp_page and 'class="warn" id="busy-b"' in cmp_page
    assert 'id="significance-table"' in cmp_page and "95% interval" in cmp_page


def test_dashboard_overview_warns_of_a_busy_run_only(tmp_path):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    base = record(Clock(tick=1000, jitter=0.05), repeats=2)
    with_cpu(base, 10.0, 2.0).save(tmp_path / "busy")
    with_cpu(base, 10.0, 9.9).save(tmp_path / "quiet")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["runs_dir"] = str(tmp_path)
    at.run()
    at.sidebar.multiselect(key="runs").set_value(["busy", "quiet"]).run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and "Run **busy**: the machine was busy: 80 %" in warnings[0]
    assert any("quiet 1.0 %" in c.value for c in at.caption)
    assert any("Spread over the 4 generate() calls" in c.value for c in at.caption)


def test_sweep_shows_the_spread_of_its_repeats(tmp_path):
    from probe.routines.sweep import format_summary, load_sweep, sweep, sweep_summary

    model = tiny_llama(layers=2, hidden=32)
    sweep(model, None, prompt_lens=(4,), batch_sizes=(1,), new_tokens=2, repeat=3, warmup=0, out=tmp_path / "s")
    df, meta = load_sweep(tmp_path / "s")
    s = sweep_summary(df).iloc[0]
    per = df[df["phase"] == "prefill"].groupby("repeat")["latency_ms"].sum()
    assert s["repeats"] == 3
    assert (s["prefill_ms_min"], s["prefill_ms"], s["prefill_ms_max"]) == pytest.approx(
        (per.min(), per.median(), per.max()))
    assert s["decode_ms_per_token_min"] <= s["decode_ms_per_token"] <= s["decode_ms_per_token_max"]
    assert df["wait_pct"].notna().all()
    text = format_summary(sweep_summary(df))
    assert "prefill ms [min - max]" in text and "(medians over 3 repeat(s), min - max in brackets)" in text
    assert ("WARNING: the machine was busy" in text) == bool(s["wait_pct"] > 10)
    run = probe.load(tmp_path / "s" / "runs" / "p4-b1")
    assert run.meta["warmup"]["generates"] == 0 and len(run.meta["warmup"]["cold_run_ids"]) == 1


def test_ranks_of_one_call_are_not_repeats():
    model = tiny_llama(layers=2, hidden=32)
    parts = []
    for rank in (0, 1):
        with probe.attach(model, rank=rank, clock=Clock()) as p:
            model.generate(_ids(), max_new_tokens=3, do_sample=False, pad_token_id=0)
        parts.append(p.run)
    merged = probe.merge(parts)
    assert (headline_spread(merged.runs)["generates"] == 1).all()
    assert (merged.spread()["generates"] == 1).all()


def test_compare_notes_different_repeats_and_rows_of_one_run():
    a = record(Clock(tick=1000), repeats=3)
    b = record(Clock(tick=1000), repeats=1, depth="all")
    notes = differences(a, b)
    assert any("different numbers of generate calls (A: 3, B: 1)" in n for n in notes)
    assert any("differ in depth (A: blocks, B: all)" in n for n in notes)
    assert not any("generate calls" in n for n in differences(a, record(Clock(tick=1000), repeats=3)))
    sig = significance(a, b)
    model = sig[(sig["level"] == "block") & (sig["name"] == "model")]
    assert len(model) and (model["a_n"] == 0).all() and {verdict(r) for _, r in model.iterrows()} == {"only in B"}


def _bundled_run(slow_layer: int | None, seed: int, repeats: int = 3) -> probe.Run:
    """The bundled model (8 layers) on a jittered injected clock; ``slow_layer``'s forward spends
    4 ms more on that clock in every call (a regression inside one layer)."""
    from probe.models import load_bundled

    model, tok = load_bundled(num_hidden_layers=8)
    clock = Clock(tick=20_000, jitter=0.3, seed=seed)
    if slow_layer is not None:
        layer = model.model.layers[slow_layer]
        inner = layer.forward

        def slower(*args, **kwargs):
            clock.t += 4_000_000
            return inner(*args, **kwargs)

        layer.forward = slower  # the user's own instance-level forward: the probe records it
    ids = tok("the quick brown fox", return_tensors="pt")
    with probe.attach(model, clock=clock) as p:
        for _ in range(repeats):
            model.generate(**ids, max_new_tokens=8, do_sample=False)
    return p.run


def test_the_gate_names_the_layer_that_regressed(tmp_path, capsys):
    """One slow layer among eight: the block level only says "layer"; the gate judges every module
    by name (with Holm's correction for judging them all) and names ``model.layers.5``, in the
    text and in gate.json. The probe's own constant cost is never judged."""
    a, b = _bundled_run(None, seed=1).save(tmp_path / "a"), _bundled_run(5, seed=2).save(tmp_path / "b")
    code = main(["compare", str(a), str(b), "--out", str(tmp_path / "c"), "--fail-above", "10"])
    out = capsys.readouterr().out
    assert code == 1
    fail = out[out.index("FAIL"):]
    assert "model.layers.5 (decode, module): +" in fail  # prefill: 3 calls against 3 cannot be shown to differ
    assert "model.layers.4" not in fail and "model.layers.6" not in fail and "(probe)" not in fail
    decision = json.loads((tmp_path / "c" / "gate.json").read_text())
    assert decision["passed"] is False and decision["correction"].startswith("holm") and decision["judged"] > 20
    names = {(f["name"], f["phase"]) for f in decision["failures"]}
    assert ("model.layers.5", "decode") in names and not any(n.startswith("model.layers.") and n != "model.layers.5"
                                                               for n, _ in names)
    assert all(f["p_holm"] < 0.05 and f["ci_pct"][0] > 0 for f in decision["failures"])
    # the same two runs the other way round, into the same folder: nothing is slower, and the
    # decision says so (the comparison and its gate.json are replaced)
    assert main(["compare", str(b), str(a), "--out", str(tmp_path / "c"), "--fail-above", "10"]) == 0
    assert json.loads((tmp_path / "c" / "gate.json").read_text())["passed"] is True


def test_holm_adjusts_the_smallest_p_by_the_family_size_and_keeps_order():
    from probe.analysis.stats import holm

    got = holm([0.01, 0.04, float("nan"), 0.03, 0.5])
    assert got[0] == pytest.approx(0.04) and got[3] == pytest.approx(0.09) and got[1] == pytest.approx(0.09)
    assert got[4] == pytest.approx(0.5) and math.isnan(got[2])


def test_large_samples_get_an_interval_without_resampling_each_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 5000), rng.normal(11, 1, 5000)
    p, lo, hi = bootstrap_slowdown(a, b)
    assert lo < p < hi and lo > 8 and hi < 12  # about +10 %, a narrow interval
    small = bootstrap_slowdown(a[:100], b[:100])
    assert small[1] < small[0] < small[2]


def test_the_probe_row_and_undecided_rows_read_alike():
    run_a, run_b = record(Clock(tick=1000, jitter=0.05, seed=1), repeats=3), record(Clock(tick=1000, jitter=0.05, seed=2), repeats=3)
    sig = significance(run_a, run_b)
    words = {verdict(r) for _, r in sig.iterrows()}
    assert "within noise" not in words and not any("rank test" in w for w in words)
    probe_rows = sig[sig["name"] == "(probe)"]
    assert all(verdict(r) == "the probe's own cost (not judged)" for _, r in probe_rows.iterrows())
    assert gate(sig, 0.0)["name"].ne("(probe)").all()
