"""Capture core: block discovery, phases and steps, shapes, unchanged outputs, clean detach."""

from __future__ import annotations

import json
import os
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import probe
from probe import schema
from tiny import ARCHITECTURES, VirtualClock, tiny_llama, tiny_model
from edits import reseal


def _ids(n: int = 7, vocab: int = 90, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def _shapes(js: str) -> list[list[int]]:
    return json.loads(js)


# --------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_is_recorded_block_by_block(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(arch)
    blocks = probe.find_blocks(model)
    assert blocks.recognised
    assert blocks.embed and blocks.head and blocks.norm, blocks
    assert len(blocks.layers) == model.config.num_hidden_layers
    ids = _ids(5)
    ref = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with probe.attach(model) as p:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, out)
    steps, calls = p.run.steps, p.run.calls
    assert list(steps["phase"]) == ["prefill", "decode", "decode"]
    assert list(steps["kv_len"]) == [0, 5, 6]
    assert list(steps["q_len"]) == [5, 1, 1]
    for step, sub in calls.groupby("step"):
        roles = list(sub["role"])
        assert roles.count("layer") == len(blocks.layers)
        assert roles.count("norm") == 1 and roles.count("head") == 1
        assert "embed" in roles
        # the hidden state flowing through the layers has the step's [batch, q_len, hidden]
        q = 5 if step == 0 else 1
        hidden = model.config.hidden_size
        for js in sub.loc[sub["role"] == "layer", "in_shapes"]:
            assert _shapes(js)[0] == [1, q, hidden]


def test_unrecognised_model_warns_and_falls_back_to_children():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(probe.UnrecognisedModelWarning, match="direct child"):
        p = probe.attach(model)
    with p:
        y = model(torch.randn(3, 8))
    assert y.shape == (3, 4)
    calls = p.run.calls
    assert list(calls["module"]) == ["0", "1", "2"]
    assert set(calls["phase"]) == {"forward"}
    assert _shapes(calls.iloc[0]["in_shapes"]) == [[3, 8]]
    assert _shapes(calls.iloc[2]["out_shapes"]) == [[3, 4]]


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        probe.attach("gpt2")
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="depth must be one of"):
        probe.attach(model, depth="everything")
    with pytest.raises(ValueError, match="decode_stride"):
        probe.attach(model, decode_stride=0)


@pytest.mark.parametrize("depth,roles", [
    ("blocks", {"embed", "layer", "norm", "head"}),
    ("sublayers", {"embed", "layer", "norm", "head", "attention", "attention_fn", "mlp", "layer_norm"}),
])
def test_depth_selects_blocks_and_sublayers(depth, roles):
    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth) as p:
        model.generate(_ids(4), max_new_tokens=2, do_sample=False)
    calls = p.run.calls
    assert set(calls["role"]) == roles
    if depth == "sublayers":
        names = set(calls["module"])
        assert {"model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.0.input_layernorm"} <= names
        assert calls.loc[calls["module"] == "model.layers.1.mlp", "layer"].eq(1).all()


def test_depth_all_records_every_module_once_per_call():
    model = tiny_llama(layers=2)
    n_modules = sum(1 for name, _ in model.named_modules() if name)
    with probe.attach(model, depth="all") as p:
        model(_ids(4))
    calls = p.run.calls
    n_attention = sum(1 for m in p.modules if m.role == "attention")
    assert len(p.modules) == n_modules + n_attention  # and each attention module's attention function
    assert "model.layers.0.self_attn.q_proj" in set(calls["module"])
    # nesting depth follows the qualified name
    row = calls[calls["module"] == "model.layers.0.self_attn.q_proj"].iloc[0]
    assert row["depth"] == 5 and row["layer"] == 0


# --------------------------------------------------------------------------- phases and steps
def test_prefill_then_decode_steps_with_growing_kv():
    model = tiny_llama(layers=3)
    ids = _ids(7)
    with probe.attach(model) as p:
        out = model.generate(ids, max_new_tokens=10, do_sample=False, logits_to_keep=0)
    run = p.run
    st = run.steps
    assert len(st) == 10 and out.shape[-1] == 17
    assert st.iloc[0]["phase"] == "prefill" and (st["phase"].iloc[1:] == "decode").all()
    assert list(st["kv_len"]) == [0] + list(range(7, 16))
    assert (st["new_tokens"] == 1).all()
    h, v = model.config.hidden_size, model.config.vocab_size
    pre = run.calls[run.calls["step"] == 0].set_index("module")
    assert _shapes(pre.loc["model.embed_tokens", "in_shapes"]) == [[1, 7]]
    assert _shapes(pre.loc["model.embed_tokens", "out_shapes"]) == [[1, 7, h]]
    assert _shapes(pre.loc["model.norm", "out_shapes"]) == [[1, 7, h]]
    assert _shapes(pre.loc["lm_head", "out_shapes"]) == [[1, 7, v]]
    dec = run.calls[run.calls["phase"] == "decode"]
    assert all(_shapes(js)[0] == [1, 1, h] for js in dec.loc[dec["role"] == "layer", "in_shapes"])
    # KV cache bytes grow by exactly one position per decode step
    kv = st["kv_cache_bytes"].astype("int64").diff().dropna().unique()
    per_token = 2 * 3 * model.config.num_key_value_heads * (h // model.config.num_attention_heads) * 4
    assert list(kv) == [per_token]
    r = run.runs.iloc[0]
    assert r["status"] == "ok" and r["kind"] == "generate"
    assert r["prompt_tokens"] == 7 and r["new_tokens"] == 10 and r["steps"] == 10
    assert r["ttft_ms"] > 0 and r["tpot_ms_p90"] >= r["tpot_ms_p50"] > 0
    assert r["total_ms"] >= st["latency_ms"].sum() * 0.999


def test_generate_default_computes_only_last_logits_position():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(6), max_new_tokens=2, do_sample=False)
    head = p.run.calls[(p.run.calls["role"] == "head") & (p.run.calls["phase"] == "prefill")].iloc[0]
    assert _shapes(head["out_shapes"]) == [[1, 1, model.config.vocab_size]]


def test_forward_outside_generate_is_its_own_phase():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model(_ids(5))
        model(_ids(3))
        model.generate(_ids(4), max_new_tokens=2, do_sample=False)
    runs = p.run.runs
    assert list(runs["kind"]) == ["forward", "generate"]
    st = p.run.steps
    assert list(st["phase"]) == ["forward", "forward", "prefill", "decode"]
    assert list(st.loc[st["phase"] == "forward", "q_len"]) == [5, 3]


def test_use_cache_false_is_labelled_recompute():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        out = model.generate(_ids(4), max_new_tokens=3, do_sample=False, use_cache=False)
    st = p.run.steps
    assert list(st["phase"]) == ["prefill", "recompute", "recompute"]
    assert list(st["q_len"]) == [4, 5, 6] and (st["kv_len"] == 0).all()
    assert p.run.runs.iloc[0]["new_tokens"] == out.shape[-1] - 4 == st["new_tokens"].sum()


def test_batched_padded_prompts_record_real_lengths():
    model = tiny_llama(layers=2)
    ids = _ids(6, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second prompt
    with probe.attach(model) as p:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    r = p.run.runs.iloc[0]
    assert r["batch"] == 2 and r["prompt_tokens"] == 6
    assert json.loads(r["prompt_tokens_real"]) == [6, 4]
    # prefill throughput counts the real prompt tokens, not the pads
    first = p.run.steps.iloc[0]
    assert r["prefill_tok_s"] == pytest.approx(10 / (first["latency_ms"] / 1e3), rel=1e-9)
    assert (p.run.steps["batch"] == 2).all()


# --------------------------------------------------------------------------- outputs unchanged
@pytest.mark.parametrize("depth", ["blocks", "all"])
def test_same_tokens_greedy_and_seeded_sampling(depth):
    model = tiny_llama(layers=3)
    ids = _ids(7)
    sampling = dict(do_sample=True, top_k=10, top_p=0.85, temperature=1.0, max_new_tokens=12)
    ref_greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    torch.manual_seed(1234)
    ref_sample = model.generate(ids, **sampling)
    with probe.attach(model, depth=depth) as p:
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        torch.manual_seed(1234)
        sample = model.generate(ids, **sampling)
    assert torch.equal(greedy, ref_greedy)
    assert torch.equal(sample, ref_sample)
    runs = p.run.runs
    assert list(runs["do_sample"]) == [False, True]
    assert runs.iloc[1]["top_k"] == 10 and runs.iloc[1]["top_p"] == pytest.approx(0.85)


# --------------------------------------------------------------------------- lifecycle
def _model_state(model: nn.Module) -> dict:
    return {
        name: (
            sorted(m.__dict__.keys()),
            dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks_always_called),
            m.forward, m.training,
        )
        for name, m in model.named_modules()
    }


def test_detach_leaves_the_model_exactly_as_found():
    model = tiny_llama(layers=2)
    model.train()  # the probe must not flip modes either
    before = _model_state(model)
    gen_before = model.generate
    p = probe.attach(model, depth="all")
    assert "generate" in model.__dict__ and model.generate is not gen_before  # the marker while attached
    model.eval()
    model.train()
    p.detach()
    p.detach()  # idempotent
    assert _model_state(model) == before
    assert "generate" not in model.__dict__


def test_attaching_twice_is_refused_and_detach_allows_again():
    model = tiny_llama(layers=2)
    p = probe.attach(model)
    try:
        with pytest.raises(probe.ProbeError, match="already has a probe attached"):
            probe.attach(model)
        with pytest.raises(probe.ProbeError, match="already recorded by another probe"):
            probe.attach(model.model)
    finally:
        p.detach()
    with probe.attach(model):
        pass


class _Boom(RuntimeError):
    pass


def test_generate_that_raises_mid_decode_keeps_a_failed_partial_run():
    model = tiny_llama(layers=2)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill + 2 decode steps succeed, the 3rd decode step fails
            raise _Boom("injected failure")

    user = model.model.layers[1].register_forward_hook(explode)
    before = _model_state(model)
    try:
        with probe.attach(model) as p:
            with pytest.raises(_Boom):
                model.generate(_ids(5), max_new_tokens=8, do_sample=False)
    finally:
        after = _model_state(model)
        user.remove()
    assert after == before
    run = p.run
    r = run.runs.iloc[0]
    assert r["status"].startswith("failed: _Boom: injected failure")
    assert list(run.steps["phase"]) == ["prefill", "decode", "decode", "decode"]
    # the failing step still has the calls that completed before the failure
    last = run.calls[run.calls["step"] == 3]
    assert "model.embed_tokens" in set(last["module"])
    # and the model generates normally afterwards
    assert model.generate(_ids(5), max_new_tokens=2, do_sample=False).shape[-1] == 7


def test_coexists_with_user_hooks():
    model = tiny_llama(layers=2)
    seen = []
    h1 = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append("pre"))
    h2 = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append("post"))
    try:
        ref = model.generate(_ids(5), max_new_tokens=3, do_sample=False)
        seen.clear()
        with probe.attach(model) as p:
            out = model.generate(_ids(5), max_new_tokens=3, do_sample=False)
        assert torch.equal(ref, out)
        assert seen == ["pre", "post"] * 3
        assert len(model.model.layers[0]._forward_hooks) == 1
        assert len(p.run.calls) == 3 * (1 + 2 + 1 + 1)
    finally:
        h1.remove()
        h2.remove()


def test_coexists_with_accelerate_dispatch_hooks():
    accelerate = pytest.importorskip("accelerate")
    from accelerate import dispatch_model

    model = tiny_llama(layers=2)
    ref = model.generate(_ids(5), max_new_tokens=3, do_sample=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.layers[0], "_hf_hook")
    before = _model_state(model)
    with probe.attach(model) as p:
        out = model.generate(_ids(5), max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out)
    assert _model_state(model) == before
    assert len(p.run.steps) == 3 and set(p.run.calls["device"]) == {"cpu"}
    del accelerate


# --------------------------------------------------------------------------- options
def test_decode_stride_and_max_steps_keep_steps_but_drop_block_records():
    model = tiny_llama(layers=2)
    with probe.attach(model, decode_stride=3) as p:
        model.generate(_ids(4), max_new_tokens=8, do_sample=False)
    st, calls = p.run.steps, p.run.calls
    assert len(st) == 8  # every step is still timed
    assert sorted(calls["step"].unique()) == [0, 1, 4, 7]
    assert p.run.meta["decode_stride"] == 3
    with probe.attach(model, max_steps=2) as p2:
        model.generate(_ids(4), max_new_tokens=5, do_sample=False)
    assert sorted(p2.run.calls["step"].unique()) == [0, 1] and len(p2.run.steps) == 5


# --------------------------------------------------------------------------- frames and saved runs
def test_empty_frames_are_typed():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        pass
    run = p.run
    for key, sch in schema.FRAMES.items():
        df = getattr(run, key)
        want = {c: t for c, t in sch.items() if c not in schema.absent_when_null(sch)}  # all null: absent
        assert df.empty and list(df.columns) == list(want)
        assert {c: str(t) for c, t in df.dtypes.items()} == want
    assert list(run.summary().columns) == list(schema.SUMMARY)


def test_save_and_load_give_equal_frames(tmp_path):
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model(_ids(3))
        model.generate(_ids(5), max_new_tokens=4, do_sample=False)
    run = p.run
    path = run.save(tmp_path / "run")
    assert sorted(f.name for f in path.iterdir()) == ["calls.parquet", "meta.json", "requests.parquet", "runs.parquet",
                                                      "sampling.parquet", "steps.parquet"]
    back = probe.load(path)
    for key in ("calls", "steps", "runs", "sampling", "requests"):
        pd.testing.assert_frame_equal(getattr(run, key), getattr(back, key))
    assert back.meta["depth"] == "sublayers"
    pd.testing.assert_frame_equal(run.summary(), back.summary())


def test_load_reports_bad_run_directories(tmp_path):
    with pytest.raises(probe.RunLoadError, match="does not exist"):
        probe.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(probe.RunLoadError, match="holds no probe run"):
        probe.load(tmp_path / "empty")
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(4), max_new_tokens=2, do_sample=False)
    good = p.run.save(tmp_path / "good")
    bad = p.run.save(tmp_path / "corrupt")
    (bad / "calls.parquet").write_bytes((good / "calls.parquet").read_bytes()[:100])
    with pytest.raises(probe.RunLoadError, match="calls.parquet is corrupt"):
        probe.load(bad)
    old = p.run.save(tmp_path / "old")
    meta = json.loads((old / "meta.json").read_text())
    meta["schema_version"] = 0
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(probe.RunLoadError, match="schema 0"):
        probe.load(old)
    # a run saved before a nullable column was added still loads, with nulls there
    older = p.run.save(tmp_path / "older")
    calls = pd.read_parquet(older / "calls.parquet").drop(columns=["hooks_ms", "placement"])
    calls.to_parquet(older / "calls.parquet", index=False)
    reseal(older)
    back = probe.load(older)
    assert back.calls["hooks_ms"].isna().all() and back.calls["placement"].isna().all()
    # but a required column cannot be invented
    calls.drop(columns=["step"]).to_parquet(older / "calls.parquet", index=False)
    reseal(older)
    with pytest.raises(probe.RunLoadError, match="lacks columns \\['step'\\]"):
        probe.load(older)


def test_summary_tiles_the_forward_time():
    model = tiny_llama(layers=3)
    with probe.attach(model) as p:
        model.generate(_ids(6), max_new_tokens=5, do_sample=False)
    run = p.run
    summ = run.summary(by="role")
    for phase, fwd in run.steps.groupby("phase")["forward_ms"].sum().items():
        sub = summ[summ["phase"] == phase]
        assert sub["self_ms"].sum() == pytest.approx(fwd, rel=1e-9)
        assert sub["share"].sum() == pytest.approx(1.0, rel=1e-9)
    by_module = run.summary("module")
    assert by_module.loc[by_module["role"] == "layer", "calls"].sum() == 3 * 5
    # steps.blocks_ms equals the block calls' time per step
    per_step = run.calls.groupby("step")["cpu_ms"].sum()
    assert run.steps.set_index("step")["blocks_ms"].to_numpy() == pytest.approx(per_step.to_numpy())
    ph = run.phase_summary().set_index("phase")
    assert ph.loc["prefill", "tokens"] == 6 and ph.loc["decode", "tokens"] == 4


def test_shares_with_decode_stride_use_only_steps_with_block_records():
    model = tiny_llama(layers=3)
    clock = VirtualClock()
    # 1 ms of "work" inside every layer (a user hook on a child runs inside the layer's forward)
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: clock.spend(1_000_000)) for layer in model.model.layers]
    try:
        with probe.attach(model, decode_stride=4, clock=clock) as p:
            model.generate(_ids(6), max_new_tokens=12, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    run = p.run
    assert run.steps["blocks_ms"].notna().sum() < len(run.steps)  # some steps kept no blocks
    layers = run.calls[run.calls["role"] == "layer"]
    assert layers["cpu_ms"].to_numpy() == pytest.approx(1.0, abs=1e-4)  # exact on the injected clock
    summ = run.summary(by="role").set_index(["phase", "role"])
    residue = summ.loc[("decode", "residue")]
    assert residue["calls"] == run.steps["blocks_ms"].notna().sum() - 1  # recorded decode steps
    # the blocks time is set against the forward time of the same steps: the residue is the
    # few ticks between blocks, not the time of every unrecorded step
    assert 0 <= residue["share"] < 0.01 < summ.loc[("decode", "layer"), "share"]
    kept = run.steps[run.steps["blocks_ms"].notna() & (run.steps["phase"] == "decode")]
    assert summ.loc[("decode", "layer"), "total_ms"] + residue["total_ms"] + summ.loc[("decode", "embed"), "total_ms"] \
        + summ.loc[("decode", "norm"), "total_ms"] + summ.loc[("decode", "head"), "total_ms"] == pytest.approx(
            kept["forward_ms"].sum(), rel=1e-9)


# --------------------------------------------------------------------------- C and Python wrappers
def test_c_wrappers_and_python_wrappers_record_the_same_calls(monkeypatch):
    """The C hot path (probe/recording/_hooks.c) and its Python reference record identical frames."""
    from probe.recording import hotpath

    assert hotpath.C is not None, "probe/recording/_hooks.c is not built (pip install builds it; PROBE_PURE_PYTHON=1 skips it)"
    model = tiny_llama(layers=2)
    frames = {}
    for impl in ("c", "python"):
        if impl == "python":
            monkeypatch.setattr(hotpath, "C", None)
        with probe.attach(model, depth="all") as p:
            model(_ids(3))
            model.generate(_ids(5), max_new_tokens=3, do_sample=False)
        assert p.calibration["native"] is (impl == "c")
        assert "forward" not in model.model.layers[0].__dict__  # detached either way
        frames[impl] = p.run.calls.drop(columns=["run_id", "start_ms", "cpu_ms", "end_ms", "self_ms"])  # timings differ
    pd.testing.assert_frame_equal(frames["c"], frames["python"])


def test_c_and_python_wrappers_give_the_same_times_under_a_nonzero_calibration(monkeypatch):
    """On one injected clock both wrappers read the same instants; with the instrument's cost
    taken out (a non-zero calibration, charged per call and per recorded call inside), their
    cpu_ms and self_ms agree exactly: a wrapper that miscounts the calls inside it does not."""
    import dataclasses

    from probe.recording import hotpath
    from probe.analysis.frames import build_run
    from tiny import VirtualClock

    if hotpath.C is None:
        pytest.skip("probe/recording/_hooks.c is not built")
    model = tiny_llama(layers=2)
    got = {}
    for impl in ("c", "python"):
        if impl == "python":
            monkeypatch.setattr(hotpath, "C", None)
        clock = VirtualClock()
        with probe.attach(model, depth="all", clock=clock) as p:
            model.generate(_ids(5), max_new_tokens=3, do_sample=False)
        records = dataclasses.replace(p.records, calibration={"call_ns": 700, "inside_ns": 300, "native": impl == "c"})
        got[impl] = build_run(records).calls[["module", "step", "descendants", "cpu_ms", "self_ms"]]
    pd.testing.assert_frame_equal(got["c"], got["python"])
    c = got["c"]
    assert (c["descendants"] > 0).any() and c["cpu_ms"].notna().all()


def test_c_wrapper_gives_every_shape_change_its_signature():
    """The C wrapper compares each call's shapes with the last call's before looking them up:
    alternating shapes, dims past Python's small-int cache, a new output shape for the same
    input, and an output that is the input itself all record what the Python wrapper records."""
    from probe.recording import hotpath
    from probe.recording.recorder import Recorder

    assert hotpath.C is not None, "probe/recording/_hooks.c is not built"

    class Keep(nn.Module):  # like lm_head with logits_to_keep: same input, output of varying length
        def forward(self, x, keep=0):
            return x[:, -keep:] * 2 if keep else x

    big, small = torch.zeros(1, 5, 300), torch.zeros(1, 1, 300)
    calls = [(big, {}), (small, {}), (big, {"keep": 1}), (big, {"keep": 2}), (big, {}), (small, {}),
             (small, {}), (big, {"keep": 1}), (torch.zeros(2, 5, 300), {})]
    recorded = {}
    for native in (True, False):
        rec = Recorder(rank=0, decode_stride=1, max_steps=None, native=native)
        mod = Keep()
        wrapper = hotpath.cpu_wrapper(mod.forward, rec.cols, rec.intern_for(0), None)
        assert (type(wrapper) is hotpath.C.Wrapper) is native
        for x, kw in calls:
            wrapper(x, **kw)
        r = rec.records(depth="all", compiled=False, calibration={})
        recorded[native] = [r.sigs[r.msigs[i][1]][:2] for i in r.msig]
    assert recorded[True] == recorded[False]
    outs = [tuple(tuple(s) for s in out[0]) for _, out in recorded[True]]
    assert outs == [((1, 5, 300),), ((1, 1, 300),), ((1, 1, 300),), ((1, 2, 300),), ((1, 5, 300),),
                    ((1, 1, 300),), ((1, 1, 300),), ((1, 1, 300),), ((2, 5, 300),)]


def test_c_wrapper_builds_on_a_miss_the_signature_python_would_intern():
    """On a miss whose key it built from exact tensors with positional inputs, the C wrapper
    builds the signature itself and appends it to the recorder's list; every signature, dtype
    and device included, equals what the Python side interns from the call: tuple outputs led
    by None, outputs of another dtype, non-tensor arguments between tensors, keyword-only inputs
    (which go through ``intern``), no output at all."""
    from probe.recording import hotpath
    from probe.recording.recorder import Recorder

    assert hotpath.C is not None, "probe/recording/_hooks.c is not built"

    def attention(module, q, k, v, mask=None, scaling=1.0):  # the attention function's calling form
        return (q @ k.transpose(-1, -2) * scaling).softmax(-1).to(torch.float64) @ v.double(), None

    def lead_none(x):
        return None, x.half()

    def nothing(x):
        return None

    def kw_only(*, hidden_states, other=None):
        return hidden_states * 2

    q = torch.zeros(1, 2, 1, 8)
    calls = [(attention, (nn.Identity(), q, torch.zeros(1, 2, n, 8), torch.zeros(1, 2, n, 8)), {"scaling": 0.5})
             for n in (1, 2, 3, 2)]
    calls += [(lead_none, (torch.zeros(2, 3),), {}), (nothing, (torch.zeros(4),), {}),
              (kw_only, (), {"hidden_states": torch.zeros(3, 1), "other": torch.zeros(7)}),
              (kw_only, (), {"hidden_states": torch.zeros(5, 1)})]
    sigs, from_call = {}, {}
    for native in (True, False):
        rec = Recorder(rank=0, decode_stride=1, max_steps=None, native=native)
        from_call[native] = []

        def intern_for(i, rec=rec, seen=from_call[native]):
            intern = rec.intern_for(i)
            return lambda *call: seen.append(i) or intern(*call)

        wrappers = {fn: hotpath.cpu_wrapper(fn, rec.cols, intern_for(i), None, interned=rec.interned, index=i)
                    for i, fn in enumerate(dict.fromkeys(fn for fn, _, _ in calls))}
        for fn, args, kwargs in calls:
            wrappers[fn](*args, **kwargs)
        r = rec.records(depth="all", compiled=False, calibration={})
        sigs[native] = [(r.msigs[i][0], r.sigs[r.msigs[i][1]]) for i in r.msig]
    assert sigs[True] == sigs[False]
    assert from_call[True] == [3, 3]  # C built every miss's signature but the keyword-only calls'
    assert len(from_call[False]) == 7  # the Python wrapper interns every miss from the call
    got = [sig for _, sig in sigs[True]]
    assert got[0] == (((1, 2, 1, 8), (1, 2, 1, 8), (1, 2, 1, 8)), (((1, 2, 1, 8),), torch.float64, torch.device("cpu")))
    assert got[2][0][1] == (1, 2, 3, 8) and got[3] == got[1]
    assert got[4] == (((2, 3),), (((2, 3),), torch.float16, torch.device("cpu")))
    assert got[5] == (((4,),), ((), None, None))
    assert got[6] == (((3, 1),), (((3, 1),), torch.float32, torch.device("cpu")))  # the main keyword input only


def test_the_c_extension_is_built():
    """Installing the package builds the C hot path; only PROBE_PURE_PYTHON=1 opts out."""
    from probe.recording import hotpath

    if os.environ.get("PROBE_PURE_PYTHON", "") not in ("", "0"):
        assert hotpath.C is None
    else:
        assert hotpath.C is not None, "probe/recording/_hooks.c did not build: install a C compiler or set PROBE_PURE_PYTHON=1"
