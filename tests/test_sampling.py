"""The sampling step split into stages: processors, stopping checks, remainder = outside_ms."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import probe
from edits import reseal
from probe import schema
from probe.recording.sampling import WRAPPED, stage_means
from tiny import VirtualClock, tiny_llama

BUILDERS = WRAPPED


def _ids(n=6, batch=1, seed=0, vocab=120):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _seqs(x):
    return x if isinstance(x, torch.Tensor) else x.sequences


def _record(model, *args, **kwargs):
    """generate() without and with the probe, same seed: (reference, output, run)."""
    torch.manual_seed(0)
    ref = model.generate(*args, **kwargs)
    with probe.attach(model) as p:
        torch.manual_seed(0)
        out = model.generate(*args, **kwargs)
    assert not set(BUILDERS) & set(model.__dict__), "the list builders were left wrapped"
    return ref, out, p.run


def _assert_adds_up(run):
    """Every generate step has sampling rows, and they add up to its outside_ms."""
    s = run.sampling
    gen = run.runs.loc[run.runs["kind"] == "generate", "run_id"]
    st = run.steps[run.steps["run_id"].isin(gen)].set_index(["run_id", "step"])
    sums = s.groupby(["run_id", "step"])["host_ms"].sum()
    assert sorted(sums.index) == sorted(st.index)
    np.testing.assert_allclose(sums.reindex(st.index).to_numpy(), st["outside_ms"].to_numpy(), rtol=0, atol=1e-9)
    timed = s[s["stage"] != "remainder"]
    assert (timed["host_ms"] >= 0).all() and (s["host_ms"] >= 0).all()
    # one order per stage per step, remainder last
    for _, g in s.groupby(["run_id", "step"]):
        assert list(g["order"]) == list(range(len(g))) and g["stage"].iloc[-1] == "remainder"


METHOD_STAGES = ("update kwargs", "prepare inputs", "probe")


def _stages(run, step=1):
    """The stages of ``step`` in order, without the model-method and probe stages every mode has."""
    s = run.sampling
    return [x for x in s.loc[s["step"] == step, "stage"] if x not in METHOD_STAGES]


class BanToken(LogitsProcessor):
    """A user's processor: token ``k`` is never chosen."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.k] = -float("inf")
        return scores


class StopAfter(StoppingCriteria):
    """A user's stopping criterion: done once ``n`` tokens follow the prompt."""

    def __init__(self, prompt_len: int, n: int) -> None:
        self.end = prompt_len + n
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.end, dtype=torch.bool)


def test_greedy_has_stopping_and_remainder():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(), max_new_tokens=5, do_sample=False)
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    s = run.sampling
    assert list(s.loc[s["step"] == 1, "stage"]) == ["update kwargs", "stopping", "prepare inputs", "probe",
                                                    "remainder"]
    own = s[s["stage"] == "probe"]  # the probe's own step bookkeeping outside the forward, once a step
    assert (own["calls"] == 1).all() and (own["host_ms"] > 0).all()
    stop = s[s["stage"] == "stopping"]
    assert len(stop) == 5 and (stop["calls"] == 1).all() and stop["gpu_ms"].isna().all()
    assert set(s["phase"]) == {"prefill", "decode"}
    # the next forward's inputs are prepared after every step but the last
    prep = s[s["stage"] == "prepare inputs"]
    assert list(prep["calls"]) == [1, 1, 1, 1, 0]
    assert (s.loc[s["stage"] == "update kwargs", "calls"] == 1).all()


def test_sampling_warpers_are_stages_in_order():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(batch=2), max_new_tokens=6, do_sample=True, top_k=10, top_p=0.85,
                            temperature=0.7)
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    assert _stages(run, 0) == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "dispatch",
                               "stopping", "remainder"]
    warpers = run.sampling[run.sampling["stage"].str.endswith("Warper")]
    assert (warpers["calls"] == 1).all() and (warpers["host_ms"] > 0).all()
    summ = run.sampling_summary()
    assert list(summ.columns) == ["phase", "stage", "order", "steps", "calls", "total_ms", "mean_ms",
                                  "gpu_total_ms", "outside_share", "step_share"]
    for phase, g in summ.groupby("phase"):
        assert g["outside_share"].sum() == pytest.approx(1.0, abs=1e-9)
        sub = run.steps[run.steps["phase"] == phase]
        assert g["total_ms"].sum() == pytest.approx(sub["outside_ms"].sum(), abs=1e-9)
        assert (g["steps"] == len(sub)).all()
    assert list(summ.loc[summ["phase"] == "decode", "stage"])[-1] == "remainder"


def test_beam_search_adds_up():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(batch=2), max_new_tokens=4, num_beams=3, do_sample=False,
                            repetition_penalty=1.3)
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    assert _stages(run) == ["RepetitionPenaltyLogitsProcessor", "dispatch", "stopping", "remainder"]
    assert len(run.sampling["step"].unique()) == len(run.steps) == 4


def test_user_processor_and_criterion_are_timed_and_left_as_found():
    model = tiny_llama(layers=2)
    ban = BanToken(7)
    stop = StopAfter(prompt_len=6, n=3)
    procs = LogitsProcessorList([ban])
    crits = StoppingCriteriaList([stop])
    before = (type(procs), list(procs), dict(ban.__dict__), type(crits), list(crits))
    ref, out, run = _record(model, _ids(), max_new_tokens=10, do_sample=True, top_k=20,
                            logits_processor=procs, stopping_criteria=crits)
    assert torch.equal(ref, out)
    assert out.shape[-1] == 6 + 3  # the user's criterion ended generate early
    assert not (out[:, 6:] == 7).any()  # the user's processor ran
    after = (type(procs), list(procs), dict(ban.__dict__), type(crits), list(crits))
    assert after == before and type(procs) is LogitsProcessorList and type(crits) is StoppingCriteriaList
    assert not set(vars(ban)) - {"k"} and not set(vars(stop)) - {"end", "calls"}
    _assert_adds_up(run)
    assert len(run.steps) == 3
    stages = _stages(run, 0)  # where generate puts the user's processors depends on the version
    assert sorted(stages[:2]) == ["BanToken", "TopKLogitsWarper"] and stages[2:] == ["dispatch", "stopping",
                                                                                      "remainder"]
    banned = run.sampling[run.sampling["stage"] == "BanToken"]
    assert list(banned["calls"]) == [1, 1, 1]
    assert stop.calls == 2 * 3  # once per step, without and with the probe: called as before


def test_two_processors_of_one_class_are_two_stages_in_list_order():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(), max_new_tokens=3, do_sample=False,
                            logits_processor=LogitsProcessorList([BanToken(7), BanToken(9)]))
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    assert _stages(run) == ["BanToken", "BanToken (2)", "dispatch", "stopping", "remainder"]


def test_user_processor_of_a_class_generate_also_builds_keeps_its_place():
    model = tiny_llama(layers=2)
    from transformers import TopKLogitsWarper

    mine = TopKLogitsWarper(top_k=5)
    ref, out, run = _record(model, _ids(), max_new_tokens=4, do_sample=True, top_k=50,
                            logits_processor=LogitsProcessorList([mine]))
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    assert _stages(run).count("TopKLogitsWarper") == 1


def test_prompt_lookup_decoding_adds_up():
    model = tiny_llama(layers=2)
    model.generation_config.eos_token_id = 1  # transformers 4.57's prompt lookup needs one
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ref, out, run = _record(model, prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3,
                            repetition_penalty=1.1)
    assert torch.equal(_seqs(ref), _seqs(out))
    _assert_adds_up(run)
    assert _stages(run, 0) == ["RepetitionPenaltyLogitsProcessor", "dispatch", "stopping", "candidates",
                                "remainder"]


def test_assisted_decoding_adds_up():
    model = tiny_llama(layers=2)
    assistant = tiny_llama(layers=1, seed=1)
    ref, out, run = _record(model, _ids(), max_new_tokens=6, assistant_model=assistant, do_sample=False,
                            repetition_penalty=1.2)
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    assert not set(BUILDERS) & set(assistant.__dict__)
    s = run.sampling
    assert _stages(run, 0) == ["RepetitionPenaltyLogitsProcessor", "dispatch", "stopping", "candidates",
                                "remainder"]
    # the assistant's drafting is its own stage, drawn after each verification but the last
    cand = s[s["stage"] == "candidates"]
    assert (cand["calls"] >= 1).sum() >= 1 and cand["host_ms"].max() > 0
    # a verification step applies the processors to each candidate position
    ext = s[(s["phase"] == "extend") & (s["stage"] == "RepetitionPenaltyLogitsProcessor")]
    assert (ext["calls"] > 1).any()


def test_failing_processor_leaves_generate_as_found():
    model = tiny_llama(layers=2)

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise RuntimeError("boom")

    with probe.attach(model) as p:
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(_ids(), max_new_tokens=3, logits_processor=LogitsProcessorList([Boom()]))
        assert not set(BUILDERS) & set(model.__dict__)
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert p.run.runs["status"].str.startswith("failed").sum() == 1
    ok = p.run.runs.loc[p.run.runs["status"] == "ok", "run_id"].iloc[0]
    assert set(p.run.sampling["run_id"]) <= set(p.run.runs["run_id"])
    assert len(p.run.sampling[p.run.sampling["run_id"] == ok]) > 0


def test_an_instance_attribute_builder_is_restored():
    model = tiny_llama(layers=2)
    own = model._get_stopping_criteria  # the user's own per-instance override
    calls = []

    def mine(*a, **k):
        calls.append(1)
        return own(*a, **k)

    model._get_stopping_criteria = mine
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert model.__dict__["_get_stopping_criteria"] is mine and calls == [1]
    assert "stopping" in set(p.run.sampling["stage"])
    del model.__dict__["_get_stopping_criteria"]


def test_a_builder_replaced_between_generates_is_timed_as_replaced():
    """The wrappers are kept from one generate to the next only while each wraps the same
    function of the same object: a user's override installed between two generate calls is
    the one the second call runs (and times), and every generate leaves the instance as found."""
    model = tiny_llama(layers=2)
    own = model._get_stopping_criteria
    calls = []

    def mine(*a, **k):
        calls.append(1)
        return own(*a, **k)

    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
        assert not set(BUILDERS) & set(model.__dict__)
        model._get_stopping_criteria = mine
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
        assert model.__dict__["_get_stopping_criteria"] is mine and calls == [1]
        del model.__dict__["_get_stopping_criteria"]
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
        assert calls == [1] and not set(BUILDERS) & set(model.__dict__)
    s = p.run.sampling
    assert s.groupby("run_id")["stage"].apply(lambda st: "stopping" in set(st)).all()
    assert s["run_id"].nunique() == 3
    _assert_adds_up(p.run)


def test_other_forwards_and_decode_stride_keep_every_step_split():
    model = tiny_llama(layers=2)
    with probe.attach(model, decode_stride=3) as p:
        model(_ids())
        model.generate(_ids(), max_new_tokens=7, do_sample=False)
    run = p.run
    _assert_adds_up(run)
    assert len(run.sampling["step"].unique()) == 7
    assert "forward" not in set(run.sampling["phase"])


def test_saved_run_reloads_the_sampling_frame(tmp_path):
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=4, do_sample=True, top_k=5)
    run = p.run
    path = run.save(tmp_path / "run")
    back = probe.load(path)
    pd.testing.assert_frame_equal(back.sampling, run.sampling)
    assert {c: str(t) for c, t in back.sampling.dtypes.items()} == schema.SAMPLING
    # a run saved before the frame existed loads with it empty
    (path / "sampling.parquet").unlink()
    reseal(path, forget=("sampling.parquet",))
    old = probe.load(path)
    assert old.sampling.empty and list(old.sampling.columns) == list(schema.SAMPLING)
    assert old.sampling_summary().empty
    # merged ranks keep it
    both = probe.merge([run, run])
    assert len(both.sampling) == 2 * len(run.sampling)


def test_clear_forgets_sampling_records():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
        assert len(p.run.sampling)
        p.clear()
        assert p.run.sampling.empty
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
        _assert_adds_up(p.run)


def test_stage_means_add_up_to_the_mean_outside_time():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=5, do_sample=True, top_p=0.9)
    run = p.run
    for phase in ("prefill", "decode"):
        parts = stage_means(run.sampling, run.steps, phase)
        mean_outside = run.steps.loc[run.steps["phase"] == phase, "outside_ms"].mean()
        assert sum(v for _, v in parts) == pytest.approx(mean_outside, abs=1e-9)
        assert [k for k, _ in parts][-1] == "remainder"
    # without sampling rows the time outside the model is one part, not split
    parts = stage_means(run.sampling.iloc[0:0], run.steps, "decode")
    assert [k for k, _ in parts] == ["outside (not split)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_event_time_for_processors():
    model = tiny_llama(layers=2).cuda()
    ids = _ids().cuda()
    ref, out, run = _record(model, ids, max_new_tokens=5, do_sample=True, top_k=10, top_p=0.85)
    assert torch.equal(ref, out)
    _assert_adds_up(run)
    s = run.sampling
    timed = s[s["stage"].str.endswith("Warper") | (s["stage"] == "stopping")]
    assert len(timed) and timed["gpu_ms"].notna().all() and (timed["gpu_ms"] >= 0).all()
    # host-only stages: the list's dispatch, the model methods, the probe's own work, the remainder
    assert s.loc[~s.index.isin(timed.index), "gpu_ms"].isna().all()


def test_timed_list_copies_and_pickles():
    from probe.recording.sampling import SamplingRecorder, _RunRec, _timed_types

    timed_procs, timed_crit = _timed_types()
    rec = SamplingRecorder(model=None)
    run = _RunRec("r")
    lst = timed_procs([BanToken(3)], rec, run)
    c = copy.deepcopy(lst)
    assert type(c) is timed_procs and c._probe[0] is rec and c[0] is not lst[0] and c[0].k == 3
    assert type(copy.copy(lst)) is timed_procs
    back = pickle.loads(pickle.dumps(lst))
    assert type(back) is LogitsProcessorList and back[0].k == 3
    crit = timed_crit([StopAfter(1, 1)], rec, run)
    assert type(pickle.loads(pickle.dumps(crit))) is StoppingCriteriaList
    # outside its generate call a timed list is the plain list: it applies and records nothing
    scores = torch.zeros(1, 8)
    assert torch.isinf(lst(torch.zeros(1, 2, dtype=torch.long), scores)[0, 3])
    assert len(run.c_ns) == 0


def test_stages_read_the_probes_clock_exactly():
    model = tiny_llama(layers=2)
    clock = VirtualClock()

    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            clock.spend(500_000)
            return scores

    class SlowStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            clock.spend(200_000)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with probe.attach(model, clock=clock) as p:
        model.generate(_ids(), max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([Slow()]),
                       stopping_criteria=StoppingCriteriaList([SlowStop()]))
    run = p.run
    _assert_adds_up(run)
    s = run.sampling.set_index(["step", "stage"])
    for step in range(4):
        assert s.loc[(step, "Slow"), "host_ms"] == pytest.approx(0.500001, abs=1e-12)  # spend + closing read
        assert s.loc[(step, "stopping"), "host_ms"] == pytest.approx(0.200001, abs=1e-12)
        assert 0 <= s.loc[(step, "remainder"), "host_ms"] < 0.001  # a few reads of the clock
        assert 0 < s.loc[(step, "probe"), "host_ms"] < 0.001
        # the list call less its processor's own: the window's two reads around the processor's two
        assert s.loc[(step, "dispatch"), "host_ms"] == pytest.approx(0.000002, abs=1e-12)
    # outside the model is the two spends and a few clock reads: nothing else ran on this clock
    assert (run.steps["outside_ms"] - 0.7).abs().max() < 0.001


class NeedsStep(LogitsProcessor):
    """A processor that takes a keyword argument beyond (input_ids, scores)."""

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, input_ids, scores, step):
        self.seen.append(step)
        return scores + step


def test_the_timed_list_applies_processors_by_their_own_signature():
    from probe.recording.sampling import SamplingRecorder, _RunRec, _timed_types

    timed_procs, _ = _timed_types()
    rec = SamplingRecorder(model=None)
    run = rec._cur = _RunRec("r")
    run.step = 0
    needs, ban = NeedsStep(), BanToken(3)
    lst = timed_procs([ban, needs], rec, run)
    ids, scores = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 8)
    out = lst(ids, scores, step=2)  # transformers passes `step` to the processor that names it, only
    assert needs.seen == [2] and out[0, 0] == 2 and torch.isinf(out[0, 3])
    assert list(lst) == [ban, needs]  # the list holds the processors themselves
    shadow = lst._shadowed
    import inspect

    for proxy, proc in zip(shadow, lst):  # what transformers' loop reads of each item
        assert inspect.signature(proxy.__call__) == inspect.signature(proc.__call__)
        assert isinstance(proxy, type(proc)) and proxy.__class__ is type(proc)
    names = [run.stages[i][2] for i in run.c_stage]
    assert names == ["BanToken", "NeedsStep", "dispatch"]
    # a missing keyword fails as transformers fails it, naming the processor's class
    with pytest.raises(ValueError) as plain:
        LogitsProcessorList([needs])(ids, scores)
    with pytest.raises(ValueError) as timed:
        lst(ids, scores)
    assert str(timed.value) == str(plain.value) and "NeedsStep" in str(timed.value)


def test_a_processor_generate_cannot_feed_fails_generate_as_without_the_probe():
    model = tiny_llama(layers=2)
    procs = LogitsProcessorList([NeedsStep()])
    with pytest.raises(ValueError) as plain:
        model.generate(_ids(), max_new_tokens=2, do_sample=False, logits_processor=procs)
    with probe.attach(model) as p:
        with pytest.raises(ValueError) as timed:
            model.generate(_ids(), max_new_tokens=2, do_sample=False, logits_processor=procs)
    assert str(timed.value) == str(plain.value)
    assert p.run.runs["status"].str.startswith("failed: ValueError").all()
