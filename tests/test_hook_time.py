"""A recorded module's forward hooks are part of its call (probe.recording.hooktime)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules import module as torch_module

import probe
from tiny import VirtualClock, tiny_llama

MS = 1_000_000  # ns


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (1, n), generator=g)


def _adds_up(run) -> None:
    """Σ self_ms + residue_ms + probe_ms = forward_ms in every step."""
    st = run.steps.set_index(["run_id", "step"])
    self_ms = run.calls.groupby(["run_id", "step"])["self_ms"].sum()
    total = self_ms.reindex(st.index) + st["residue_ms"] + st["probe_ms"]
    assert total.to_numpy() == pytest.approx(st["forward_ms"].to_numpy(), rel=1e-9, abs=1e-9)


def test_a_forward_hook_is_charged_to_its_layer_not_to_the_residue():
    model = tiny_llama(layers=6)
    clock = VirtualClock()
    with probe.attach(model, clock=clock) as p:
        # added after attach: checked again at each generate
        h = model.model.layers[5].register_forward_hook(lambda m, a, o: clock.spend(4 * MS))
        try:
            model.generate(_ids(), max_new_tokens=4, do_sample=False)
        finally:
            h.remove()
    run = p.run
    calls = run.calls
    hooked = calls[calls["module"] == "model.layers.5"]
    assert len(hooked) == 4
    assert (hooked["cpu_ms"] >= 4.0).all() and (hooked["cpu_ms"] < 4.0 + 1e-4).all()
    assert hooked["hooks_ms"].to_numpy() == pytest.approx(4.0, abs=1e-4)
    others = calls[calls["module"] != "model.layers.5"]
    assert (others["hooks_ms"] == 0).all() and (others["cpu_ms"] < 1e-4).all()
    assert (run.steps["residue_ms"] < 1e-3).all()  # the hook is no longer left in the residue
    _adds_up(run)


def test_pre_hooks_and_global_hooks_count_and_all_is_put_back_at_detach():
    model = tiny_llama(layers=2)
    clock = VirtualClock()
    norm = model.model.norm
    pre = norm.register_forward_pre_hook(lambda m, a: clock.spend(2 * MS))
    dicts = {n: (m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for n, m in model.named_modules()}
    try:
        with probe.attach(model, clock=clock) as p:
            assert "_call_impl" in norm.__dict__  # hooks at attach: timed from the start
            assert "_call_impl" not in model.model.layers[0].__dict__  # no hooks: the fast path stays
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
            g = torch_module.register_module_forward_hook(lambda m, a, o: clock.spend(MS)
                                                          if isinstance(m, type(model.model.layers[0])) else None)
            try:
                model.generate(_ids(), max_new_tokens=2, do_sample=False)
            finally:
                g.remove()
            assert "_call_impl" in model.model.layers[0].__dict__  # stays until the next generate
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
            assert "_call_impl" not in model.model.layers[0].__dict__
        assert not torch_module._global_forward_hooks
        assert all("_call_impl" not in m.__dict__ for m in model.modules())
        assert {n: (m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for n, m in model.named_modules()} == dicts
    finally:
        pre.remove()
    calls = p.run.calls
    runs = list(p.run.runs["run_id"])
    norm_rows = calls[calls["module"] == "model.norm"]
    assert norm_rows["hooks_ms"].to_numpy() == pytest.approx(2.0, abs=1e-4)
    layers = calls[calls["role"] == "layer"]
    by_run = layers.groupby("run_id")["hooks_ms"]
    assert by_run.min()[runs[1]] == pytest.approx(1.0, abs=1e-4)  # the global hook, in every layer
    assert by_run.max()[runs[0]] == 0 and by_run.max()[runs[2]] == 0
    _adds_up(p.run)


def test_calls_a_hook_makes_are_inside_the_hooked_call():
    """A post-hook that runs a recorded module: that call nests inside the hooked one."""
    model = tiny_llama(layers=2)
    clock = VirtualClock()
    mlp = model.model.layers[0].mlp
    h = mlp.register_forward_hook(lambda m, a, o: m.act_fn(o))
    try:
        with probe.attach(model, depth="all", clock=clock) as p:
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        h.remove()
    calls = p.run.calls
    step0 = calls[(calls["step"] == 0)].set_index("call")
    row = step0[step0["module"] == "model.layers.0.mlp"].iloc[0]
    inside = step0[step0["parent"] == row.name]
    assert list(inside["module"]).count("model.layers.0.mlp.act_fn") == 2  # the forward's and the hook's
    assert row["descendants"] == 5  # gate, up, down, act_fn twice
    assert row["hooks_ms"] > 0
    _adds_up(p.run)


def test_time_hooks_false_times_forward_alone():
    model = tiny_llama(layers=2)
    clock = VirtualClock()
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: clock.spend(4 * MS))
    try:
        with probe.attach(model, clock=clock, time_hooks=False) as p:
            assert all("_call_impl" not in m.__dict__ for m in model.modules())
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        h.remove()
    calls, steps = p.run.calls, p.run.steps
    assert calls["hooks_ms"].isna().all()
    assert (calls["cpu_ms"] < 1e-4).all()
    assert steps["residue_ms"].to_numpy() == pytest.approx(4.0, abs=1e-3)


def test_hooks_that_change_outputs_give_the_same_tokens_with_the_probe():
    model = tiny_llama(layers=2)

    def scale(m, a, o):
        return (o[0] * 1.5,) + tuple(o[1:]) if isinstance(o, tuple) else o * 1.5

    def shift(m, args):
        return (args[0] + 0.25,) + tuple(args[1:])

    hs = [model.model.layers[0].register_forward_hook(scale),
          model.model.norm.register_forward_pre_hook(shift)]
    try:
        want = model.generate(_ids(), max_new_tokens=5, do_sample=False)
        with probe.attach(model, depth="all") as p:
            got = model.generate(_ids(), max_new_tokens=5, do_sample=False)
    finally:
        for h in hs:
            h.remove()
    assert torch.equal(want, got)
    calls = p.run.calls
    assert (calls.loc[calls["module"] == "model.layers.0", "hooks_ms"] > 0).all()
    assert all("_call_impl" not in m.__dict__ for m in model.modules())


def test_a_saved_run_keeps_hooks_ms_and_older_runs_load_without_it(tmp_path):
    model = tiny_llama(layers=2)
    clock = VirtualClock()
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: clock.spend(MS))
    try:
        with probe.attach(model, clock=clock) as p:
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        h.remove()
    p.save(tmp_path / "run")
    back = probe.load(tmp_path / "run")
    assert back.calls["hooks_ms"].tolist() == p.run.calls["hooks_ms"].tolist()


def test_a_hooked_call_is_charged_the_records_of_every_call_inside_it_read_in_place():
    """On the probe's own clock: a hooked call's window is the whole call, and each call recorded
    inside it (its hook's included, recorded after its forward's row) costs its record as read in
    place plus the rest of the calibrated cost. Checked in sum, from the raw records by window
    containment with the hooked call's window widened."""
    import numpy as np

    model = tiny_llama(layers=2)
    mlp = model.model.layers[0].mlp
    h = mlp.register_forward_hook(lambda m, a, o: m.act_fn(o))
    try:
        with probe.attach(model, depth="all") as p:
            model.generate(_ids(), max_new_tokens=2, do_sample=False)
    finally:
        h.remove()
    rec, cal = p.records, p.run.meta["calibration"]
    assert rec.hooked is not None and len(rec.hooked) and (rec.post > 0).all()
    t0, t1 = rec.t0.astype(np.int64).copy(), rec.t1.astype(np.int64).copy()
    mod = np.array(rec.msigs, dtype=np.int64).reshape(-1, 2)[rec.msig, 0]
    for idx, n0, n1, h0, h1 in rec.hooked:
        row = n0 + np.flatnonzero(mod[n0:n1] == idx)[-1]  # the module's own forward: its last row inside
        t0[row], t1[row] = h0, h1
    cost = (cal["call_ns"] - cal["post_ns"]) + rec.post.astype(np.float64)
    inside = (t0[None, :] > t0[:, None]) & (t1[None, :] < t1[:, None])
    want = ((t1 - t0) - cal["inside_ns"] - inside.astype(np.float64) @ cost).sum() * 1e-6
    assert p.run.calls["cpu_ms"].sum() == pytest.approx(want, abs=1e-9)
    _adds_up(p.run)
