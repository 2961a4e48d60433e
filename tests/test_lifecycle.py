"""The probe's lifecycle: wrappers installed and removed on every path, weak references, threads,
Ctrl-C, accelerate's own forward wrappers in either order, the instrument's cost accounted."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch

import probe
from probe.capture import lifecycle as capture
from probe.recording import hotpath
from tiny import VirtualClock, tiny_llama


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (1, n), generator=g)


# --------------------------------------------------------------------------- the fast path stays
def test_wrapped_modules_keep_pytorchs_fast_call_path():
    """No forward hook is registered on a recorded module: _call_impl stays on its fast path."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        for mod in model.modules():
            assert not mod._forward_hooks and not mod._forward_pre_hooks
            assert "forward" in mod.__dict__
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    assert len(p.run.calls) > 0
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_signature_of_a_wrapped_forward_is_the_original():
    """generate() inspects forward's parameters (logits_to_keep, attention_mask)."""
    import inspect

    model = tiny_llama(layers=2)
    before = inspect.signature(model.forward)
    layer_before = inspect.signature(model.model.layers[0].forward)
    with probe.attach(model, depth="all"):
        assert inspect.signature(model.forward) == before
        assert inspect.signature(model.model.layers[0].forward) == layer_before
        assert model.model.layers[0].forward.__name__ == "forward"


# --------------------------------------------------------------------------- weak references
def test_a_probe_never_detached_does_not_keep_the_model_alive():
    model = tiny_llama(layers=2)
    p = probe.attach(model)
    model.generate(_ids(), max_new_tokens=2, do_sample=False)
    ref = weakref.ref(model)
    del p, model
    gc.collect()
    assert ref() is None
    assert not list(capture._ACTIVE.keys())


def test_an_attached_probe_can_be_found_and_detached_from_the_model():
    model = tiny_llama(layers=2)
    p = probe.attach(model)
    del p
    found = probe.probe_of(model)
    assert isinstance(found, probe.Probe) and found.attached
    with pytest.raises(probe.ProbeError, match=r"probe\.detach\(model\)"):
        probe.attach(model)
    assert probe.detach(model) is True
    assert probe.probe_of(model) is None and probe.detach(model) is False
    with probe.attach(model):
        pass


# --------------------------------------------------------------------------- interrupted forwards
def test_keyboard_interrupt_inside_a_forward_leaves_later_records_right():
    model = tiny_llama(layers=2)
    state = {"armed": True}

    def interrupt(module, args):
        if state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt

    h = model.model.layers[1].register_forward_pre_hook(interrupt)
    try:
        with probe.attach(model) as p:
            with pytest.raises(KeyboardInterrupt):
                model(_ids(5))
            for _ in range(3):
                model(_ids(5))
            model.generate(_ids(5), max_new_tokens=4, do_sample=False)
    finally:
        h.remove()
    run = p.run
    fwd = run.steps[run.steps["phase"] == "forward"]
    assert len(fwd) == 4  # the interrupted forward is a step too, and each later one is its own
    gen = run.runs[run.runs["kind"] == "generate"].iloc[0]
    assert gen["status"] == "ok" and gen["steps"] == 4
    assert gen["ttft_ms"] > 0 and gen["tpot_ms_mean"] > 0
    steps_of_gen = run.steps[run.steps["run_id"] == gen["run_id"]]
    assert list(steps_of_gen["phase"]) == ["prefill", "decode", "decode", "decode"]
    calls = run.calls[run.calls["run_id"] == gen["run_id"]]
    assert len(calls) == 4 * (1 + 2 + 1 + 1)


def test_generate_interrupted_by_keyboard_interrupt_is_a_failed_run():
    model = tiny_llama(layers=2)
    n = {"calls": 0}

    def interrupt(module, args):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt

    h = model.model.norm.register_forward_pre_hook(interrupt)
    try:
        with probe.attach(model) as p:
            with pytest.raises(KeyboardInterrupt):
                model.generate(_ids(5), max_new_tokens=6, do_sample=False)
            h.remove()
            model.generate(_ids(5), max_new_tokens=2, do_sample=False)
    finally:
        h.remove()
    runs = p.run.runs
    assert runs.iloc[0]["status"].startswith("failed: KeyboardInterrupt")
    assert runs.iloc[0]["steps"] == 3
    assert runs.iloc[1]["status"] == "ok" and runs.iloc[1]["steps"] == 2


# --------------------------------------------------------------------------- threads
def test_attach_and_detach_from_several_threads_each_on_its_own_model():
    models = [tiny_llama(layers=1) for _ in range(3)]
    errors: list[BaseException] = []

    def work(m):
        try:
            for _ in range(60):
                p = probe.attach(m, depth="all")
                p.detach()
        except BaseException as exc:  # pragma: no cover - what the test looks for
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for m in models:
        assert probe.probe_of(m) is None
        assert all("forward" not in mod.__dict__ for mod in m.modules())
        with probe.attach(m):
            pass


# --------------------------------------------------------------------------- accelerate, both orders
def test_accelerate_hooks_added_after_attach_keep_recording_and_detach_cleanly():
    pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = tiny_llama(layers=2)
    ref = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    layer = model.model.layers[0]
    with probe.attach(model) as p:
        add_hook_to_module(layer, ModelHook())
        out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out)
    assert (p.run.calls["module"] == "model.layers.0").sum() == 3
    # accelerate's wrapper stays and works, now calling the original forward
    assert hasattr(layer, "_hf_hook") and not getattr(layer._old_forward, "__probe_wrapper__", False)
    assert torch.equal(model.generate(_ids(), max_new_tokens=3, do_sample=False), ref)
    remove_hook_from_module(layer)  # leaves the plain bound forward, as it does without the probe
    assert not getattr(layer.forward, "__probe_wrapper__", False)
    assert getattr(layer.forward, "__func__", None) is type(layer).forward


def test_accelerate_hooks_removed_while_attached_are_reported_and_recording_resumes():
    pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = tiny_llama(layers=2)
    layer = model.model.layers[0]
    add_hook_to_module(layer, ModelHook())
    with probe.attach(model) as p:
        remove_hook_from_module(layer)  # puts back the forward accelerate saw: ours is gone
        with pytest.warns(RuntimeWarning, match=r"model\.layers\.0.*re-installed"):
            model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert (p.run.calls["module"] == "model.layers.0").sum() == 3  # recording kept
    assert not getattr(layer.forward, "__probe_wrapper__", False) and not hasattr(layer, "_hf_hook")


def test_accelerate_dispatch_then_attach_then_detach_leaves_accelerate_working():
    pytest.importorskip("accelerate")
    from accelerate import dispatch_model

    model = tiny_llama(layers=2)
    ref = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with probe.attach(model, depth="all") as p:
        out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out) and len(p.run.steps) == 3
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert torch.equal(model.generate(_ids(), max_new_tokens=3, do_sample=False), ref)


# --------------------------------------------------------------------------- leak guard
def test_the_leak_guard_sees_a_wrapper_left_behind():
    from conftest import _probe_hooks_alive

    model = tiny_llama(layers=1)
    p = probe.attach(model)
    wrapper = model.model.layers[0].__dict__["forward"]
    p.detach()
    assert not _probe_hooks_alive()
    model.model.layers[0].__dict__["forward"] = wrapper  # a leak on purpose
    try:
        leaks = _probe_hooks_alive()
        assert any("forward wrapper" in s for s in leaks), leaks
    finally:
        del model.model.layers[0].__dict__["forward"]
    assert not _probe_hooks_alive()


# --------------------------------------------------------------------------- the instrument's own cost
def test_calibration_is_measured_at_attach_and_stated_in_the_run():
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
    cal = p.run.meta["calibration"]
    assert cal["call_ns"] >= 0 and 0 <= cal["inside_ns"] <= cal["call_ns"]  # a loaded machine can hide it
    assert cal["native"] is (hotpath.C is not None)
    st = p.run.steps.set_index("step")
    n_calls = p.run.calls.groupby("step").size()
    rec = p.records
    assert len(rec.post) == n_calls.sum() and 0 <= cal["post_ns"] <= cal["call_ns"]
    # each call's record was read in place (the C wrapper and its Python reference alike); the rest
    # of the wrapper's cost is the calibration's
    assert (rec.post > 0).all()
    rest = cal["call_ns"] - cal["post_ns"]
    assert st["probe_ms"].sum() == pytest.approx((n_calls.sum() * rest + rec.post.sum()) * 1e-6)
    assert (st["probe_ms"].to_numpy() >= n_calls.to_numpy() * rest * 1e-6 - 1e-12).all()


def test_each_call_is_charged_what_its_descendants_records_cost_in_place():
    """A call's host time is its window less the wrapper's cost inside it and, for each call
    recorded inside it, that call's record as read in place plus the rest of the wrapper's
    calibrated cost: checked here from the raw records by window containment (not by the
    ``inner`` counts the frames use), call by call as a multiset, at depth all."""
    import numpy as np

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
    rec, cal = p.records, p.run.meta["calibration"]
    assert (rec.post > 0).all() and 0 <= cal["post_ns"] <= cal["call_ns"]
    cost = (cal["call_ns"] - cal["post_ns"]) + rec.post.astype(np.float64)
    t0, t1 = rec.t0.astype(np.int64), rec.t1.astype(np.int64)
    inside = (t0[None, :] > t0[:, None]) & (t1[None, :] < t1[:, None])  # [i, j]: call j ran inside call i
    assert inside.sum(axis=1).tolist() == rec.inner.tolist()
    want = ((t1 - t0) - cal["inside_ns"] - inside.astype(np.float64) @ cost) * 1e-6
    got = p.run.calls["cpu_ms"].to_numpy()
    assert np.sort(got) == pytest.approx(np.sort(want), abs=1e-9)
    # and the step's probe row holds every call's cost
    assert p.run.steps["probe_ms"].sum() == pytest.approx(cost.sum() * 1e-6)


def test_calls_are_timed_without_the_instrument_cost_exactly_on_an_injected_clock():
    """Each wrapper reads the clock twice; a parent's window holds its children's reads.
    With an injected clock the calibration is zero, so the figures are the clock's own."""
    model = tiny_llama(layers=2)
    clock = VirtualClock()
    hooks = [layer.mlp.act_fn.register_forward_pre_hook(lambda m, a: clock.spend(500_000))
             for layer in model.model.layers]
    try:
        with probe.attach(model, depth="all", clock=clock) as p:
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    calls = p.run.calls
    assert p.run.meta["calibration"]["call_ns"] == 0
    act = calls[calls["module"].str.endswith("mlp.act_fn")]
    # the hook is part of act_fn's call (its window is the whole call: 3 ticks and the hook)
    assert act["cpu_ms"].to_numpy() == pytest.approx(0.5 + 3e-6, abs=1e-9)
    assert act["hooks_ms"].to_numpy() == pytest.approx(0.5 + 2e-6, abs=1e-9)
    mlp = calls[calls["module"].str.endswith(".mlp")]
    assert (mlp["cpu_ms"] > 0.5).all() and (mlp["cpu_ms"] < 0.5 + 1e-4).all()


def test_the_wrapper_of_a_failing_call_records_nothing_and_breaks_nothing():
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        with pytest.raises(RuntimeError):
            model.model.layers[0](torch.zeros(1, 3, 7))  # wrong hidden size
        out = model.generate(_ids(), max_new_tokens=2, do_sample=False)
    assert out.shape[-1] == 8
    assert "model.layers.0" in set(p.run.calls["module"])


def test_probe_options_are_checked():
    model = tiny_llama(layers=1)
    with pytest.raises(TypeError, match="clock"):
        probe.attach(model, clock=5)
    with pytest.raises(ValueError, match="decode_stride"):
        probe.attach(model, decode_stride=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with probe.attach(model):
            pass


def test_instance_level_forward_and_generate_set_before_attach_are_kept_and_put_back():
    """A user's own per-instance ``forward`` and ``generate`` (a patch, a wrapper) run while
    attached, are recorded through, and are exactly what detach leaves on the instance."""
    model = tiny_llama(layers=2)
    seen: list[str] = []
    plain_generate = model.generate

    def my_generate(*args, **kwargs):
        seen.append("generate")
        return plain_generate(*args, **kwargs)

    def my_forward(*args, **kwargs):
        seen.append("forward")
        return type(model).forward(model, *args, **kwargs)

    model.generate = my_generate
    model.forward = my_forward
    with probe.attach(model) as p:
        out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert model.__dict__["generate"] is my_generate and model.__dict__["forward"] is my_forward
    assert seen.count("generate") == 1 and seen.count("forward") == 3
    gen = p.run.runs[p.run.runs["kind"] == "generate"]
    assert len(gen) == 1 and gen.iloc[0]["new_tokens"] == 3 and len(p.run.steps) == 3
    assert out.shape[-1] == _ids().shape[-1] + 3
    # and they keep working after detach, with nothing of the probe left
    seen.clear()
    model.generate(_ids(), max_new_tokens=2, do_sample=False)
    assert seen == ["generate", "forward", "forward"]


@pytest.mark.parametrize("native", [True, False])
def test_copying_or_pickling_an_attached_model_says_to_detach_first(native, monkeypatch):
    """deepcopy and pickle of an attached model fail with a message that says what to do (the C
    wrapper raised "function missing required argument 'columns'", pickle named a local
    function); every instance-level patch — block wrappers, the root forward, the generate
    marker — says so. Detached, the model copies and pickles as before, and the copy generates
    what the original does."""
    import copy
    import pickle

    from probe.recording import hotpath

    if not native:
        monkeypatch.setattr(hotpath, "C", None)
    elif hotpath.C is None:
        pytest.skip("probe/recording/_hooks.c is not built")
    model = tiny_llama(layers=2)
    ids = torch.tensor([[1, 5, 6]])
    with probe.attach(model, depth="all"):
        for what in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"while a probe is attached.*detach first"):
                what(model)
        for patched in (model.forward, model.generate, model.model.layers[0].forward):
            with pytest.raises(TypeError, match="detach first"):
                pickle.dumps(patched)
        want = model.generate(ids, max_new_tokens=3, do_sample=False)
    twin = copy.deepcopy(model)
    back = pickle.loads(pickle.dumps(model))
    for m in (twin, back):
        assert torch.equal(m.generate(ids, max_new_tokens=3, do_sample=False), want)
