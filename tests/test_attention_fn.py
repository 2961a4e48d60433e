"""The attention function is recorded as its own call inside each attention module (probe.recording.attnfn)."""

from __future__ import annotations

import importlib

import pytest
import torch

import probe
from probe.analysis import accounting
from probe.recording import attnfn
from tiny import VirtualClock, tiny_llama

MS = 1_000_000  # ns


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (1, n), generator=g)


def _registry():
    mu = importlib.import_module("transformers.modeling_utils")
    ml = importlib.import_module("transformers.models.llama.modeling_llama")
    return dict(mu.AttentionInterface._global_mapping), ml.eager_attention_forward


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_attention_function_is_a_row_inside_its_attention_module(impl, monkeypatch):
    model = tiny_llama(layers=2, attn_implementation=impl)
    clock = VirtualClock()
    before = _registry()
    want = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    # 2 ms of "work" inside every attention function call (the softmax of eager, the SDPA kernel
    # of sdpa, each looked up at call time): it must land in the attention_fn rows
    name = "softmax" if impl == "eager" else "scaled_dot_product_attention"
    real = getattr(torch.nn.functional, name)

    def spending(*a, **k):
        clock.spend(2 * MS)
        return real(*a, **k)

    with probe.attach(model, depth="sublayers", clock=clock) as p:
        assert attnfn.wrapped() > 0
        monkeypatch.setattr(torch.nn.functional, name, spending)
        got = model.generate(_ids(), max_new_tokens=3, do_sample=False)
        monkeypatch.undo()
    assert torch.equal(want, got)
    assert _registry() == before and attnfn.wrapped() == 0  # every entry put back
    calls = p.run.calls
    fns = calls[calls["role"] == "attention_fn"]
    assert len(fns) == 3 * 2 and set(fns["module"]) == {f"model.layers.{i}.self_attn.attention_fn" for i in (0, 1)}
    assert (fns["module_type"] == "AttentionFunction").all()
    assert fns["cpu_ms"].to_numpy() == pytest.approx(2.0, abs=1e-4)
    attn = calls[calls["role"] == "attention"].set_index(["step", "call"])
    parents = calls.loc[fns.index, ["step", "parent"]]
    assert all((s, c) in attn.index for s, c in zip(parents["step"], parents["parent"]))
    assert (attn["self_ms"] < 1e-4).all()  # the 2 ms are the function's, not the module's rest
    summ = p.run.summary("role")
    assert {"attention_fn", accounting.ATTENTION_REST} <= set(summ["name"])
    st = p.run.steps.set_index(["run_id", "step"])
    total = calls.groupby(["run_id", "step"])["self_ms"].sum().reindex(st.index) + st["residue_ms"] + st["probe_ms"]
    assert total.to_numpy() == pytest.approx(st["forward_ms"].to_numpy(), rel=1e-9)


def test_blocks_depth_records_no_attention_function_and_wraps_nothing():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        assert attnfn.wrapped() == 0
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    assert "attention_fn" not in set(p.run.calls["role"])


def test_two_probes_share_the_wrapping_and_only_attached_models_are_recorded():
    a, b, c = (tiny_llama(layers=1, seed=s) for s in (0, 1, 2))
    before = _registry()
    pa = probe.attach(a, depth="sublayers")
    try:
        with probe.attach(b, depth="all") as pb:
            n = attnfn.wrapped()
            assert n > 0
            b.generate(_ids(), max_new_tokens=2, do_sample=False)
            c.generate(_ids(), max_new_tokens=2, do_sample=False)  # no probe: goes straight through
        assert attnfn.wrapped() == n  # still held by the other probe
        a.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        pa.detach()
    assert attnfn.wrapped() == 0 and _registry() == before
    assert (pa.run.calls["role"] == "attention_fn").sum() == 2
    assert (pb.run.calls["role"] == "attention_fn").sum() == 2


def test_a_probe_never_detached_lets_go_of_the_model_and_the_attention_functions():
    import gc
    import weakref

    model = tiny_llama(layers=1)
    before = _registry()
    p = probe.attach(model, depth="sublayers")
    model.generate(_ids(), max_new_tokens=2, do_sample=False)
    ref = weakref.ref(model)
    del p, model
    gc.collect()
    assert ref() is None
    assert attnfn.wrapped() == 0 and _registry() == before


def test_the_attention_function_is_costed_as_scores_softmax_and_weighted_sum():
    from probe.analysis import cost

    model = tiny_llama(layers=1)
    with probe.attach(model, depth="sublayers") as p:
        model.generate(_ids(8), max_new_tokens=2, do_sample=False)
    calls = cost.annotate(p.run.calls, model)
    fn = calls[calls["role"] == "attention_fn"].reset_index(drop=True)
    attn = calls[calls["role"] == "attention"].reset_index(drop=True)
    assert len(fn) == len(attn) == 2
    assert ((fn["flops"] > 0) & (fn["flops"] < attn["flops"])).all()  # no projections in it
    assert (p.run.meta["module_costs"]["modules"]["model.layers.0.self_attn.attention_fn"]["parameters"] == 0)


def _flex_gap() -> str | None:
    try:
        tiny_llama(layers=1, attn_implementation="flex_attention")
    except Exception as exc:  # this torch/transformers pair cannot build flex attention here
        return f"{type(exc).__name__}: {exc}"
    return None


def test_flex_attention_is_recorded_as_the_attention_function():
    gap = _flex_gap()
    if gap is not None:
        pytest.skip(f"flex attention unavailable: {gap}")
    model = tiny_llama(layers=2, attn_implementation="flex_attention")
    before = _registry()
    want = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    with probe.attach(model, depth="sublayers") as p:
        got = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert torch.equal(want, got)
    assert _registry() == before and attnfn.wrapped() == 0
    calls = p.run.calls
    fns = calls[calls["role"] == "attention_fn"]
    assert len(fns) == 3 * 2 and (fns["cpu_ms"] > 0).all()
    assert set(fns["phase"]) == {"prefill", "decode"}
    attn = calls[calls["role"] == "attention"].set_index(["step", "call"])
    assert all((s, c) in attn.index for s, c in zip(fns["step"], fns["parent"]))
    # the function's time lies inside its attention module's
    inner = calls.loc[fns.index].set_index(["step", "parent"])["cpu_ms"]
    assert (attn.loc[inner.index, "cpu_ms"].to_numpy() >= inner.to_numpy()).all()


def test_paged_attention_of_continuous_batching_is_recorded_as_the_attention_function():
    from probe import compat

    gap = compat.continuous_batching_gap()
    if gap is not None:
        pytest.skip(f"continuous batching not profiled here: {gap}")
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14]]
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=16, page_size=16, allow_block_sharing=False)
    model = tiny_llama(layers=2, hidden=32)
    before = _registry()
    ref = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    with probe.attach(model, depth="sublayers") as p:
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in ref.items()}
    assert _registry() == before and attnfn.wrapped() == 0
    calls = p.run.calls
    fns = calls[calls["role"] == "attention_fn"]
    assert len(fns) == (calls["role"] == "attention").sum() > 0  # one per attention call
    assert set(fns["module"]) == {f"model.layers.{i}.self_attn.attention_fn" for i in (0, 1)}
    assert (fns["cpu_ms"] > 0).all()
