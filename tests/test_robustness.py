"""Bad input, odd models, hardened outputs, and property tests over shapes and sums."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from torch import nn

import probe
from probe.cli import main
from probe.models import save_bundled
from tiny import tiny_llama


def _ids(n=6, batch=1, vocab=120, seed=0):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- odd models
def test_dynamically_quantized_model_is_profiled_unchanged():
    model = tiny_llama(layers=2)
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    ref = q.generate(_ids(), max_new_tokens=3, do_sample=False)
    with probe.attach(q, depth="sublayers") as p:
        out = q.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out)
    calls = p.run.calls
    assert len(p.run.steps) == 3 and "head" in set(calls["role"])
    assert "quantized" in type(q.lm_head).__module__  # the head really is a quantized module
    assert calls.loc[calls["role"] == "head", "out_shapes"].astype(str).map(json.loads).iloc[0] == [[1, 1, 128]]


def test_frozen_half_precision_model():
    model = tiny_llama(layers=2).to(torch.bfloat16)
    for prm in model.parameters():
        prm.requires_grad_(False)
    ref = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    with probe.attach(model) as p:
        out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out)
    assert set(p.run.calls["dtype"]) == {"bfloat16"} and p.run.runs.iloc[0]["dtype"] == "bfloat16"
    # bf16 output bytes are two per element
    head = p.run.calls[p.run.calls["role"] == "head"].iloc[0]
    assert head["out_bytes"] == model.config.vocab_size * 2


def test_plain_forward_with_keyword_only_inputs():
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model(input_ids=_ids(4), attention_mask=torch.ones(1, 4, dtype=torch.long))
    attn = p.run.calls[p.run.calls["role"] == "attention"].iloc[0]
    # attention is called with hidden_states= only: its input shape still shows
    assert json.loads(attn["in_shapes"]) == [[1, 4, model.config.hidden_size]]


# --------------------------------------------------------------------------- bad CLI input
def test_tokenizer_that_does_not_match_the_model(tmp_path, capsys):
    model_dir = save_bundled(tmp_path / "m", num_hidden_layers=2)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["vocab_size"] = 500  # the bundled tokenizer has 3000 pieces
    (model_dir / "config.json").write_text(json.dumps(cfg))
    code = main(["run", str(model_dir), "--out", str(tmp_path / "r"), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and ("do not belong together" in err or "cannot load the model" in err)


def test_empty_and_too_long_prompts(tmp_path, capsys):
    code = main(["run", "--prompt", "", "--max-new-tokens", "2", "--out", str(tmp_path / "e"), "--no-report"])
    # an empty prompt would profile the BOS token alone: refused up front, nothing written
    assert code == 2 and "prompt is empty" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    code = main(["run", "--prompt", "climb " * 3000, "--max-new-tokens", "2", "--out", str(tmp_path / "l")])
    err = capsys.readouterr().err
    assert code == 2 and "context is 2048 positions" in err
    assert not (tmp_path / "l" / "meta.json").exists()


# --------------------------------------------------------------------------- saved files
def test_a_failed_save_leaves_the_previous_files_intact(tmp_path):
    model = tiny_llama(layers=2)
    with probe.attach(model) as p:
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    run = p.run
    path = run.save(tmp_path / "run")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    bad = probe.Run(calls=run.calls.assign(extra=[object()] * len(run.calls)), steps=run.steps, runs=run.runs,
                    meta=run.meta)
    with pytest.raises(Exception):
        bad.save(path)
    after = {f.name: f.read_bytes() for f in path.iterdir()}
    assert after == before  # nothing half-written, no temporary file left
    pd.testing.assert_frame_equal(probe.load(path).calls, run.calls)


def test_saved_runs_hold_only_parquet_and_json_and_paths_are_data(tmp_path):
    model = tiny_llama(layers=2)
    with probe.attach(model, model_id="../../etc/passwd") as p:
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    path = p.run.save(tmp_path / "run")
    assert {f.suffix for f in path.iterdir()} == {".parquet", ".json"}
    for f in path.glob("*.parquet"):
        assert f.read_bytes()[:4] == b"PAR1"
    back = probe.load(path)
    assert back.runs.iloc[0]["model_id"] == "../../etc/passwd"  # stored as text, never opened


# --------------------------------------------------------------------------- properties
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=hst.integers(1, 3),
    heads=hst.sampled_from([2, 4]),
    head_dim=hst.sampled_from([4, 8]),
    batch=hst.integers(1, 3),
    prompt=hst.integers(1, 9),
    new=hst.integers(1, 5),
    depth=hst.sampled_from(["blocks", "sublayers"]),
)
def test_steps_shapes_phases_and_sums_always_agree(layers, heads, head_dim, batch, prompt, new, depth):
    hidden = heads * head_dim
    model = tiny_llama(layers=layers, hidden=hidden, vocab=64)
    ids = _ids(prompt, batch=batch, vocab=64)
    ref = model.generate(ids, max_new_tokens=new, do_sample=False)
    with probe.attach(model, depth=depth) as p:
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    assert torch.equal(ref, out)
    run = p.run
    st, calls, r = run.steps, run.calls, run.runs.iloc[0]
    assert len(st) == new == r["steps"] == r["new_tokens"]
    assert list(st["phase"]) == ["prefill"] + ["decode"] * (new - 1)
    assert list(st["q_len"]) == [prompt] + [1] * (new - 1)
    assert list(st["kv_len"]) == [0] + list(range(prompt, prompt + new - 1))
    assert (st["batch"] == batch).all() and st["new_tokens"].sum() == new
    for step, sub in calls.groupby("step"):
        q = prompt if step == 0 else 1
        layer_in = sub.loc[sub["role"] == "layer", "in_shapes"].astype(str).map(lambda s: json.loads(s)[0])
        assert len(layer_in) == layers and all(s == [batch, q, hidden] for s in layer_in)
    # the blocks never take more host time than the forward that contains them
    assert (st["blocks_ms"] <= st["forward_ms"] + 1e-9).all()
    summ = run.summary()
    for phase, fwd in st.groupby("phase")["forward_ms"].sum().items():
        for level in ("block", "role", "module"):  # self times never overlap: each level tiles the forward
            rows = summ[(summ["phase"] == phase) & (summ["level"] == level)]
            assert rows["self_ms"].sum() == pytest.approx(fwd, rel=1e-9)
            assert rows["share"].sum() == pytest.approx(1.0, abs=1e-9)
    assert r["total_ms"] >= st["latency_ms"].sum() * 0.999
    assert r["ttft_ms"] >= st.iloc[0]["forward_ms"]


def test_no_network_is_needed(monkeypatch, tmp_path, capsys):
    # HF_HUB_OFFLINE is set for the whole suite; the bundled run must not need it unset
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert main(["run", "--max-new-tokens", "1", "--out", str(tmp_path / "r"), "--no-report"]) == 0
