"""The deep pass's op clock: each sampled step's ops timed by torch.profiler on a twin step run
without the dispatch mode (``probe/recording/deep_twin.py``), and the steps that keep the mode's
clock, on a tiny real model. Behaviour only: which clock each step has, what was matched, that
outputs never change and that no profiler is left running; no timing is asserted."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import probe
from probe.recording.deep import DeepObserver, plan_of
from probe.recording.deep_calls import replayable
from probe.recording.deep_twin import (MODE_METHOD, NO_TWIN, TWIN_AFTER, TWIN_METHOD, TwinProfiler, align,
                                      outermost, quietly, read_twin)

from tiny import generate_probed, tiny_llama

PROMPT = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8]])


def _model():
    m = tiny_llama(layers=2, hidden=32, vocab=64)
    m.config._attn_implementation = "sdpa"
    return m


def _steps(run) -> dict[int, dict]:
    return {s["step"]: s for s in run.meta["deep"]["op_clock"]["steps"]}


def _replayed(run, steps: list[int]) -> set[str]:
    """The overloads of the ops of ``steps`` whose call cost the deep pass can measure by replaying
    them (deep_calls.replayable: they write no argument and draw no random numbers)."""
    ops = run.ops.loc[run.ops["step"].isin(steps), "op"].unique()
    out = set()
    for op in ops:
        _, packet, overload = op.split(".")
        if replayable(getattr(getattr(torch.ops.aten, packet), overload)):
            out.add(op)
    return out


def _tokens(run, kind: str) -> list:
    """The tokens each generate call of ``kind`` made (prompt excluded), as the runs frame keeps them."""
    return [json.loads(x) for x in run.runs.loc[run.runs["kind"] == kind, "output_ids"]]


def test_profile_times_every_sampled_step_on_a_twin_and_says_how_many_ops_matched():
    m = _model()
    new = TWIN_AFTER + 2  # the shortest run whose decode sample (step 1) has its twin (the last step)
    kw = {"max_new_tokens": new, "do_sample": False}
    run = probe.profile(m, PROMPT, generate_kwargs=kw, deep=True)
    assert not torch.autograd._profiler_enabled()
    clock = run.meta["deep"]["op_clock"]
    steps = _steps(run)
    assert sorted(steps) == sorted(run.ops["step"].unique()) == [0, 1]
    for index, s in steps.items():
        assert s["method"] == TWIN_METHOD, s
        n = int((run.ops["step"] == index).sum())
        assert s["of"] == n and 0.9 * n <= s["matched"] <= n
        assert s["twin"] == (f"step {index + TWIN_AFTER}" if index else
                             "the prefill of a one-token generate call of the same inputs and seed")
    for phase in ("prefill", "decode"):
        assert clock[phase]["method"] == TWIN_METHOD
        assert clock[phase]["matched"] == sum(s["matched"] for s in steps.values() if s["phase"] == phase)
    assert run.ops["host_ms"].notna().all() and (run.ops["host_ms"] >= 0).all() and run.ops["host_ms"].sum() > 0
    # the deep generate (its decode twins among its steps) made the timed call's tokens; the
    # prefill twin its first
    timed, deep, twin = _tokens(run, "generate"), _tokens(run, "deep"), _tokens(run, "deep twin")
    assert timed and timed == deep and len(timed[0][0]) == new
    assert twin == [[timed[0][0][:1]]]
    kinds = dict(zip(run.runs["run_id"], run.runs["kind"]))
    twins = run.meta["deep"]["twin_run_ids"]
    assert len(twins) == 1 and kinds[twins[0]] == "deep twin"
    assert twins[0] not in set(run.steps["run_id"])


def test_attach_keeps_the_mode_clock_on_prefill_and_says_why():
    m = _model()
    p = generate_probed(m, PROMPT, seed=5, attach={"deep": True}, max_new_tokens=TWIN_AFTER + 4, do_sample=True,
                        top_k=20)
    assert not torch.autograd._profiler_enabled()
    steps = _steps(p.run)
    assert steps[0]["method"] == MODE_METHOD and steps[0]["why"] == NO_TWIN["attach"] and steps[0]["matched"] == 0
    decode = [s for s in steps.values() if s["phase"] == "decode"]
    assert decode and all(s["method"] == TWIN_METHOD for s in decode)
    assert p.run.meta["deep"]["op_clock"]["prefill"]["method"] == MODE_METHOD
    assert list(p.run.runs["kind"]) == ["deep"]  # attach runs no generate call of its own


def test_explicit_steps_without_a_twin_keep_the_mode_clock():
    m = _model()
    n = TWIN_AFTER + 6  # steps 0 to TWIN_AFTER + 5
    last = n - 2  # after step 3's twin, too near the end for one of its own
    p = generate_probed(m, PROMPT, attach={"deep": [1, 3, last]}, max_new_tokens=n, do_sample=False)
    steps = _steps(p.run)
    assert steps[1]["method"] == MODE_METHOD and steps[1]["why"] == NO_TWIN["sampled"]  # 3 is sampled
    assert steps[3]["method"] == TWIN_METHOD and steps[3]["twin"] == f"step {3 + TWIN_AFTER}"
    assert steps[last]["method"] == MODE_METHOD and steps[last]["why"] == NO_TWIN["ended"]
    assert p.run.ops["host_ms"].notna().all()


def test_beside_a_users_profiler_no_profiler_is_started_and_no_generate_added():
    m = _model()
    kw = {"max_new_tokens": TWIN_AFTER + 4, "do_sample": False}  # the decode sample has a twin step
    want = m.generate(PROMPT, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run = probe.profile(m, PROMPT, generate_kwargs=kw, warmup=0, deep=True)
    steps = _steps(run)
    assert steps and all(s["method"] == MODE_METHOD and s["why"] == NO_TWIN["others"] for s in steps.values())
    assert "deep twin" not in set(run.runs["kind"])
    made = want[:, PROMPT.shape[1]:].tolist()
    assert _tokens(run, "generate") == _tokens(run, "deep") == [made]
    assert any(e.key == "aten::mm" for e in prof.key_averages())  # the user's profiler saw the model's ops
    assert not torch.autograd._profiler_enabled()


def test_beside_a_users_flop_counter_the_counts_are_those_of_the_calls_made():
    """A FlopCounterMode around profile(deep=...) counts the timed and the deep generate calls,
    as without the probe: no twin generate and no profiler of the probe's runs beside it."""
    m = _model()
    kw = {"max_new_tokens": 4, "do_sample": False}
    with FlopCounterMode(display=False) as plain:
        want = m.generate(PROMPT, **kw)
        m.generate(PROMPT, **kw)
    with FlopCounterMode(display=False) as under:
        run = probe.profile(m, PROMPT, generate_kwargs=kw, warmup=0, deep=True)
    assert under.get_total_flops() == plain.get_total_flops() > 0
    assert all(s["method"] == MODE_METHOD for s in _steps(run).values())
    made = want[:, PROMPT.shape[1]:].tolist()
    assert _tokens(run, "generate") == _tokens(run, "deep") == [made]


def test_a_twin_step_that_fails_leaves_no_profiler_running():
    m = _model()
    calls = {"n": 0}

    def boom(_module, _args, _out):
        calls["n"] += 1
        if calls["n"] == 1 + 1 + TWIN_AFTER:  # the twin of the sampled step 1
            raise RuntimeError("the user's hook failed")

    h = m.model.norm.register_forward_hook(boom)
    try:
        with probe.attach(m, deep=[1]) as p:
            with pytest.raises(RuntimeError, match="user's hook"):
                m.generate(PROMPT, max_new_tokens=TWIN_AFTER + 4, do_sample=False)
    finally:
        h.remove()
    assert not torch.autograd._profiler_enabled()
    steps = _steps(p.run)
    assert steps[1]["method"] == MODE_METHOD and steps[1]["why"] == NO_TWIN["failed"]
    # its ops keep the mode's clock: the call cost of each overload was measured
    assert set(p.run.meta["deep"]["op_call_us"]) == _replayed(p.run, [1]) != set()


class _RefusingProfiler(TwinProfiler):
    """A profiler that cannot start (another tool holds kineto, a build without it)."""

    def start(self) -> None:
        raise RuntimeError("the profiler could not start")


def test_call_costs_are_measured_only_for_ops_that_keep_the_mode_clock():
    """A twin's time replaces the dispatch mode's for every op it matched, so what calling each
    overload from the mode adds (deep_calls.calibrate: replays) is measured only for the ops left
    without one: none where every op of every step was matched; every overload of a step whose
    twin never came or whose profiler could not start."""
    m = _model()
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": TWIN_AFTER + 2, "do_sample": False}, deep=True)
    steps = _steps(run)
    assert sorted(steps) == [0, 1]
    assert all(s["method"] == TWIN_METHOD and s["matched"] == s["of"] > 0 for s in steps.values())
    assert run.meta["deep"]["op_call_us"] == {}  # not even the prefill's, closed before its twin ran
    # no twin: the run ended first
    with probe.attach(m, deep=[1]) as p:
        m.generate(PROMPT, max_new_tokens=TWIN_AFTER, do_sample=False)
    assert _steps(p.run)[1]["why"] == NO_TWIN["ended"]
    assert set(p.run.meta["deep"]["op_call_us"]) == _replayed(p.run, [1]) != set()
    # the twin's profiler could not start
    obs = DeepObserver(plan_of([1]))
    obs._profiler = _RefusingProfiler()
    want = m.generate(PROMPT, max_new_tokens=TWIN_AFTER + 2, do_sample=False)
    with probe.attach(m, observers=[obs]) as p:
        got = m.generate(PROMPT, max_new_tokens=TWIN_AFTER + 2, do_sample=False)
    assert torch.equal(want, got) and not torch.autograd._profiler_enabled()
    s = _steps(p.run)[1]
    assert s["method"] == MODE_METHOD and s["why"] == NO_TWIN["failed"]
    assert set(p.run.meta["deep"]["op_call_us"]) == _replayed(p.run, [1])
    assert (p.run.ops["host_ms"] >= 0).all() and p.run.ops["host_ms"].sum() > 0


def test_later_runs_with_new_op_signatures_are_matched_on_their_twins():
    """The profiler's name of each op signature is made once, as signatures are added: a second
    deep run of other shapes (new signatures) matches its ops on its twins as the first did."""
    m = _model()
    kw = {"max_new_tokens": TWIN_AFTER + 2, "do_sample": False}
    with probe.attach(m, deep=[1]) as p:
        m.generate(PROMPT, **kw)
        m.generate(PROMPT[:, :5], **kw)
        m.generate(PROMPT, **kw)
    steps = p.run.meta["deep"]["op_clock"]["steps"]
    assert len(steps) == 3 and len({s["run_id"] for s in steps}) == 3
    assert all(s["method"] == TWIN_METHOD and s["matched"] == s["of"] > 0 for s in steps)


def test_outermost_events_carry_their_nested_ones_and_align_with_the_modes_ops():
    x = torch.randn(8, 16)
    tp = TwinProfiler()
    tp.start()
    try:
        y = x.mean(-1, keepdim=True)  # aten::mean holds sum, fill_, div_ ... as events of its own
        z = (x - y).t()  # aten::sub, then aten::t holding transpose and as_strided
    finally:
        results = tp.stop()
    assert not tp.running and not torch.autograd._profiler_enabled() and z.shape == (16, 8)
    names, ns, nested = outermost(results, {"aten::mean", "aten::sub", "aten::t", "aten::transpose"})
    assert names == ["aten::mean", "aten::sub", "aten::t"]  # the transpose inside t is t's
    assert nested[0] >= 2 and nested[2] >= 2 and all(v > 0 for v in ns)
    got = read_twin(["aten::mean", "aten::view", "aten::sub", "aten::t"], results, event_ns=0.0, device=False)
    times, matched = got.host_ns, got.matched
    assert matched == 3 and times[1] == -1 and times[0] == ns[0] and times[3] == ns[2]


def test_align_skips_what_only_one_sequence_has():
    a = ["mm", "view", "add", "view", "mul", "cat", "mm", "t", "mm", "view"]
    b = ["mm", "add", "view", "mul", "cat", "mm", "neg", "t", "mm", "view"]
    pairs = align(a, b)
    assert all(a[i] == b[j] for i, j in pairs)
    assert [i for i, _ in pairs] == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert all(j0 < j1 for (_, j0), (_, j1) in zip(pairs, pairs[1:]))
    assert align(a, a) == [(i, i) for i in range(len(a))] and align([], a) == []


def test_quietly_drops_the_profilers_lines_and_keeps_every_other(capfd):
    def noisy():
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a line of the user's\n")
        return 7

    assert quietly(noisy) == 7
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "a line of the user's" in err
    tp = TwinProfiler()
    tp.start()
    tp.stop()
    assert "USDT" not in capfd.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "mixtral", "bloom"])
def test_twins_match_the_ops_of_other_architectures(arch):
    """Conv1D products, sliding windows, routed experts, ALiBi: the twin's events line up with
    nearly every op the mode saw (a few only one side sees keep the mode's clock)."""
    from tiny import tiny_model

    m = tiny_model(arch)
    run = probe.profile(m, PROMPT[:, :6], generate_kwargs={"max_new_tokens": TWIN_AFTER + 3, "do_sample": False},
                        warmup=0, deep=True)
    clock = run.meta["deep"]["op_clock"]
    for phase in ("prefill", "decode"):
        assert clock[phase]["method"] == TWIN_METHOD
        assert clock[phase]["matched"] >= 0.95 * clock[phase]["of"] > 0
    assert _tokens(run, "generate") == _tokens(run, "deep")
    # a call cost is measured for an overload only where one of its ops was left unmatched
    unmatched = sum(clock[ph]["of"] - clock[ph]["matched"] for ph in ("prefill", "decode"))
    assert len(run.meta["deep"]["op_call_us"]) <= unmatched


def test_the_deep_text_says_how_the_op_times_were_taken():
    """`probe run --deep` names the op clock of its sampled steps, with the names the deep pass
    records (the report keeps its own copy of them, so that it imports nothing of torch)."""
    from probe.recording import deep_twin
    from probe.reports.deep_section import MODE_METHOD as mode, TWIN_METHOD as twin, op_clock_text

    assert (twin, mode) == (deep_twin.TWIN_METHOD, deep_twin.MODE_METHOD)
    both = {"prefill": {"method": twin, "matched": 3, "of": 3}, "decode": {"method": twin, "matched": 2, "of": 4}}
    assert op_clock_text({"op_clock": {**both, "steps": []}}).endswith("5 of 7 ops matched")
    mixed = {**both, "decode": {"method": f"{mode} and {twin}", "matched": 1, "of": 4}}
    assert op_clock_text({"op_clock": mixed}).endswith("where a step has one, else of the dispatch mode")
    # the steps on the mode's clock, and why, where the run says
    steps = [{"step": 0, "method": twin}, {"step": 3, "method": mode, "why": "the run ended first"},
             {"step": 7, "method": mode, "why": "the run ended first"}, {"step": 3, "method": mode, "why": "the run ended first"},
             {"step": 9, "method": mode, "why": "it failed"}]
    assert op_clock_text({"op_clock": {**mixed, "steps": steps}}).endswith(
        "else of the dispatch mode (steps 3, 7: the run ended first; step 9: it failed)")
    assert op_clock_text({}) == op_clock_text({"op_clock": {"prefill": {"method": mode}}}) == "op times of the dispatch mode"


def test_a_run_too_short_for_decode_twins_times_its_samples_on_the_run_again():
    """A run with fewer new tokens than a decode twin needs samples decode steps spread over it,
    and probe.profile runs the generate call again for as many tokens: each sampled step, prefill
    included, is timed on the step of the same index there (one extra call, not one per step)."""
    m = _model()
    new = 6  # decode steps 1-5: samples 1, 3 and 5, no twin inside the run
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": new, "do_sample": False}, deep=True)
    assert not torch.autograd._profiler_enabled()
    steps = _steps(run)
    assert sorted(steps) == [0, 1, 3, 5]
    for index, s in steps.items():
        assert s["method"] == TWIN_METHOD and s["matched"] == s["of"] > 0, s
        where = "the prefill" if index == 0 else f"step {index}"
        assert s["twin"] == f"{where} of the generate call run again for {new} new tokens, the same inputs and seed"
    assert run.meta["deep"]["op_clock"]["decode"]["method"] == TWIN_METHOD
    assert run.meta["deep"]["op_call_us"] == {}  # every op matched: no call cost measured
    timed, deep, twin = _tokens(run, "generate"), _tokens(run, "deep"), _tokens(run, "deep twin")
    assert timed == deep == twin and len(twin[0][0]) == new  # greedy: the same tokens again
    assert len(run.meta["deep"]["twin_run_ids"]) == 1
    assert run.ops["host_ms"].notna().all() and (run.ops["host_ms"] >= 0).all()


def test_samples_without_a_twin_in_the_run_share_one_run_again():
    """Explicit steps: one with another sample up to its twin step and one too near the end are
    timed on the run again, for as many tokens as the last of them needs; the sample between
    keeps its twin inside the run."""
    m = _model()
    n = TWIN_AFTER + 6
    last = n - 2
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": n, "do_sample": False}, deep=[1, 3, last])
    steps = _steps(run)
    assert all(s["method"] == TWIN_METHOD for s in steps.values())
    assert sorted(steps) == [1, 3, last] and steps[3]["twin"] == f"step {3 + TWIN_AFTER}"
    for index in (1, last):
        assert steps[index]["twin"] == (f"step {index} of the generate call run again for {last + 1} new tokens, "
                                        "the same inputs and seed")
    assert len(run.meta["deep"]["twin_run_ids"]) == 1


def test_a_run_again_that_fails_leaves_its_steps_on_the_mode_clock_and_no_profiler_running():
    m = _model()
    obs = DeepObserver(plan_of(True))
    with probe.attach(m, observers=[obs]) as p:
        m.generate(PROMPT, max_new_tokens=4, do_sample=False)  # samples 0, 1, 2, 3: none has a twin in it
        asked = []

        def again(n):
            asked.append(n)
            m.generate(PROMPT, max_new_tokens=2, do_sample=False)  # stops before steps 2 and 3
            raise RuntimeError("the call failed")

        with pytest.raises(RuntimeError, match="the call failed"):
            obs.twin_rerun(again)
    assert asked == [4] and not torch.autograd._profiler_enabled()
    steps = _steps(p.run)
    assert steps[0]["method"] == steps[1]["method"] == TWIN_METHOD
    for index in (2, 3):
        assert steps[index]["method"] == MODE_METHOD and steps[index]["why"] == NO_TWIN["failed"]
    assert (p.run.ops["host_ms"] >= 0).all() and p.run.ops["host_ms"].notna().all()
