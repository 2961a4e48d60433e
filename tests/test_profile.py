"""probe.profile: the one profiling routine behind `probe run` and `probe sweep`, from Python."""

from __future__ import annotations

import pytest
import torch

import probe
from probe.models import load_bundled


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


def test_profile_warms_up_attached_records_repeats_and_keeps_the_text(bundled):
    model, tok = bundled
    inputs = tok("我喜欢攀岩", return_tensors="pt")
    said = []
    run = probe.profile(model, inputs, tokenizer=tok, generate_kwargs={"max_new_tokens": 4, "pad_token_id": 0},
                        warmup=1, repeat=2, progress=said.append)
    assert said == ["warm-up 1/1 (not recorded) ...", "recording generate 1/2 ...", "recording generate 2/2 ..."]
    gen = run.runs[run.runs["kind"] == "generate"]
    assert len(gen) == 2 and (gen["status"] == "ok").all()  # the warm-up's records were cleared
    assert run.meta["warmup"]["generates"] == 1 and run.meta["repeat"] == 2 and run.meta["seed"] == 0
    assert "noise" in run.meta
    # the same tokens as a plain generate without the probe
    torch.manual_seed(0)
    ref = model.generate(**inputs, max_new_tokens=4, pad_token_id=0)[0, inputs["input_ids"].shape[-1]:].tolist()
    assert [g["token_ids"] for g in run.generated()] == [[ref], [ref]]
    assert run.meta["text"]["generated"][gen["run_id"].iloc[0]] == [tok.decode(ref, skip_special_tokens=True)]
    assert probe.probe_of(model) is None  # detached


def test_profile_of_a_failing_generate_keeps_the_records_and_leaves_the_model_clean(bundled):
    model, tok = bundled
    inputs = tok("hi", return_tensors="pt")
    before = torch.get_num_threads()

    class Boom(RuntimeError):
        pass

    def stop_after_two(input_ids, scores, **kw):
        if input_ids.shape[-1] >= inputs["input_ids"].shape[-1] + 2:
            raise Boom("stopping criterion failed")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    from transformers import StoppingCriteriaList

    with pytest.raises(probe.ProfileError) as err:
        probe.profile(model, inputs, generate_kwargs={"max_new_tokens": 8, "pad_token_id": 0,
                                                      "stopping_criteria": StoppingCriteriaList([stop_after_two])},
                      warmup=0, threads=1)
    run = err.value.run
    assert isinstance(err.value.__cause__, Boom)
    assert run.runs.iloc[0]["status"].startswith("failed") and len(run.steps) >= 2
    assert probe.probe_of(model) is None and torch.get_num_threads() == before


@pytest.mark.parametrize("kw", [{"warmup": -1}, {"repeat": 0}, {"threads": 0}])
def test_profile_refuses_bad_counts(bundled, kw):
    model, tok = bundled
    with pytest.raises(ValueError):
        probe.profile(model, tok("hi", return_tensors="pt"), **kw)
    assert probe.probe_of(model) is None
