"""accelerate placements on CPU: offloaded blocks (CPU and disk), execution device, transfer time.

Every variant runs the same tiny Llama: ``from_pretrained(device_map=..., offload_folder=...)``,
``dispatch_model(..., force_hooks=True, offload_dir=...)``, ``cpu_offload`` and ``disk_offload``.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import probe
from probe.recording.distributed import OffloadClock, placements
from tiny import tiny_llama

accelerate = pytest.importorskip("accelerate")

LAYERS = 4
NEW_TOKENS = 4
# layers 1 and 3 on disk, the rest resident: resident and offloaded blocks side by side
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
VARIANTS = ("from_pretrained", "dispatch_model", "cpu_offload", "disk_offload")


def _model():
    return tiny_llama(layers=LAYERS, hidden=64, vocab=128, seed=0)


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (1, 6), generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved with save_pretrained, and its greedy tokens without any hook."""
    path = tmp_path_factory.mktemp("offload") / "model"
    model = _model()
    model.save_pretrained(path)
    return path, model.generate(_ids(), max_new_tokens=NEW_TOKENS, do_sample=False)


def _offloaded(variant: str, saved_path, tmp_path):
    """(model, expected placement per device-map entry) for one accelerate variant."""
    from accelerate import cpu_offload, disk_offload, dispatch_model
    from transformers import AutoModelForCausalLM

    if variant == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(saved_path, device_map=DEVICE_MAP, offload_folder=tmp_path)
        return model.eval(), dict(DEVICE_MAP)
    if variant == "dispatch_model":
        model = dispatch_model(_model(), device_map=DEVICE_MAP, force_hooks=True, offload_dir=tmp_path)
        return model, dict(DEVICE_MAP)
    if variant == "cpu_offload":
        return cpu_offload(_model(), execution_device="cpu"), {k: "cpu" for k in DEVICE_MAP}
    return disk_offload(_model(), tmp_path, execution_device="cpu"), {k: "disk" for k in DEVICE_MAP}


def _offload_expected(variant: str, where: dict[str, str]) -> dict[str, bool]:
    """Which device-map entries accelerate loads per call (on a CPU-only machine, disk ones)."""
    if variant in ("cpu_offload", "disk_offload"):
        return {k: True for k in where}
    return {k: v == "disk" for k, v in where.items()}


def _accelerate_state(model) -> dict:
    """What accelerate put on the modules, by identity: forward, hook, and any instance override
    of the hook's methods (accelerate's own bookkeeping attributes change per call; not ours)."""
    return {
        name: (id(m.forward), id(m._hf_hook), {k: id(m._hf_hook.__dict__[k]) for k in _HOOK_METHODS
                                               if k in m._hf_hook.__dict__})
        for name, m in model.named_modules()
        if hasattr(m, "_hf_hook")
    }


_HOOK_METHODS = ("pre_forward", "post_forward", "init_hook", "detach_hook")


@pytest.mark.parametrize("variant", VARIANTS)
def test_offloaded_model_gives_same_tokens_and_execution_device(variant, saved, tmp_path):
    model, _ = _offloaded(variant, saved[0], tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    before = _accelerate_state(model)
    with probe.attach(model) as p:
        out = model.generate(_ids(), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, saved[1])
    assert _accelerate_state(model) == before
    calls = p.run.calls
    # weights on disk or meta between calls, but every block ran (and is recorded) on the CPU
    assert set(calls["device"]) == {"cpu"}
    blocks = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(LAYERS)], "model.norm", "lm_head"]
    for step, c in calls.groupby("step"):
        assert c["module"].tolist() == blocks, step
    assert len(p.run.steps) == NEW_TOKENS


@pytest.mark.parametrize("variant", VARIANTS)
def test_placements_follow_the_device_map(variant, saved, tmp_path):
    model, where = _offloaded(variant, saved[0], tmp_path)
    offloaded = _offload_expected(variant, where)
    mods = dict(model.named_modules())
    names = [n for n in where if n != "model.rotary_emb"]  # rotary_emb has buffers only
    got = placements(model, [(n, mods[n]) for n in names])
    assert [g.where for g in got] == [where[n] for n in names]
    assert [g.offloaded for g in got] == [offloaded[n] for n in names]
    # a module over both kinds of blocks is "mixed"; one without parameters has no placement
    (root,) = placements(model, [("model", mods["model"])])
    (rot,) = placements(model, [("model.rotary_emb", mods["model.rotary_emb"])])
    assert root.where == ("mixed" if len(set(where.values())) > 1 else next(iter(where.values())))
    assert rot == (None, False)


def test_offload_clock_times_only_offloaded_calls_and_removes_cleanly(saved, tmp_path):
    model, _ = _offloaded("dispatch_model", saved[0], tmp_path)
    before = _accelerate_state(model)
    clock = OffloadClock.install(model)
    try:
        # one hook per offloaded leaf: 7 linears + 2 norms in each of the two disk layers
        assert clock.hooks == 2 * 9
        hidden = torch.randn(1, 3, 64)
        pos = model.model.rotary_emb(hidden, torch.arange(3)[None])
        model.model.layers[0](hidden, position_embeddings=pos)  # resident
        assert clock.total_ns[0] == 0
        model.model.layers[1](hidden, position_embeddings=pos)  # on disk
        after_one = clock.total_ns[0]
        assert after_one > 0
        model.model.layers[2](hidden, position_embeddings=pos)
        assert clock.total_ns[0] == after_one
    finally:
        clock.remove()
    clock.remove()
    assert _accelerate_state(model) == before
    assert OffloadClock.install(_model()) is None  # nothing offloaded, nothing wrapped


def test_block_host_time_already_includes_the_weight_transfer(saved, tmp_path):
    """accelerate's transfer runs inside module.forward, inside the probe's pre/post window."""
    model, where = _offloaded("from_pretrained", saved[0], tmp_path)
    clock = OffloadClock.install(model)
    try:
        with probe.attach(model) as p:
            model.generate(_ids(), max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        clock.remove()
    calls = p.run.calls
    disk = calls[calls["module"].map(where) == "disk"]
    assert len(disk) == 2 * NEW_TOKENS
    # every transfer interval lies inside one disk block's call: their host times hold it all
    assert disk["cpu_ms"].sum() * 1e6 >= clock.total_ns[0] > 0


# ------------------------------------------------------------- once the capture records them


@pytest.mark.parametrize("variant", ["from_pretrained", "disk_offload"])
def test_calls_carry_placement_and_offload_time(variant, saved, tmp_path):
    model, where = _offloaded(variant, saved[0], tmp_path)
    offloaded = _offload_expected(variant, where)
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=NEW_TOKENS, do_sample=False)
    calls = p.run.calls
    assert calls["placement"].tolist() == [where[m] for m in calls["module"]]
    off = calls["module"].map(offloaded).astype(bool)
    assert calls.loc[~off, "offload_ms"].isna().all()
    moved = calls.loc[off]
    assert len(moved) and (moved["offload_ms"] > 0).all()
    assert (moved["offload_ms"] <= moved["cpu_ms"]).all()  # the transfer is part of the call


def test_offload_time_nests_like_the_calls(saved, tmp_path):
    model, _ = _offloaded("dispatch_model", saved[0], tmp_path)
    before = _accelerate_state(model)
    with probe.attach(model, depth="all") as p:
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    assert _accelerate_state(model) == before  # the capture's clock is gone after detach
    c = p.run.calls
    c = c[c["step"] == 0].set_index("module")
    leaves = [n for n, m in model.named_modules() if n.startswith("model.layers.1.") and not any(m.children())]
    # accelerate's offload hooks sit on the leaves: a layer's transfer is the sum of theirs
    assert c.loc["model.layers.1", "offload_ms"] == pytest.approx(c.loc[leaves, "offload_ms"].sum(), abs=1e-6)
    assert c.loc["model.layers.1", "offload_ms"] > 0
    assert pd.isna(c.loc["model.layers.0", "offload_ms"])
