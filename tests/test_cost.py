"""The cost model (probe.cost), device peaks (probe.hardware) and bounds (probe.roofline).

Every frame here is recorded by the real probe on a tiny real model; expected values are
computed in the test from the model's own weights and config, never copied from a run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import probe
from probe.analysis import cost, hardware, measured_peaks
from probe.analysis import peaks as peaks_record
from probe.recording import noise
from probe import schema
from probe.analysis import roofline as rl
from probe.schema import BLOCK_ROLES
from tiny import tiny_config, tiny_model


def dense_llama(seed: int = 0) -> LlamaForCausalLM:
    """LLaMA-shaped ratios at a tiny width: head_dim 64, GQA 4:2, intermediate ≈ 8/3·hidden."""
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: every nn.Linear (layers + lm_head), no embedding."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_exact(cfg, batch: int, q: int, kv_total: int) -> int:
    hd = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 4 * batch * cfg.num_attention_heads * q * kv_total * hd


def record_forward(model, ids, depth="blocks"):
    with probe.attach(model, depth=depth) as p, torch.no_grad():
        model(ids)
    return p.run


def record_generate(model, ids, n=4, depth="blocks"):
    with probe.attach(model, depth=depth) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    return p.run


# --------------------------------------------------------------------------- formulas
def test_every_formula_has_a_docstring_and_agrees_with_its_definition():
    for fn in (cost.linear_flops, cost.linear_bytes, cost.embedding_bytes, cost.attention_flops, cost.softmax_flops,
               cost.attention_bytes, cost.norm_flops, cost.norm_bytes, cost.elementwise_flops, cost.elementwise_bytes,
               cost.kv_cache_bytes_per_token, cost.annotate, cost.module_cost):
        assert inspect.getdoc(fn), fn.__name__
    T, i, o = 5, 6, 7
    assert cost.linear_flops(T, i, o) == sum(2 for _ in range(T) for _ in range(i) for _ in range(o))
    assert cost.linear_flops(T, i, o, bias=True) - cost.linear_flops(T, i, o) == T * o
    assert cost.linear_bytes(T, i, o, 2, 4) == i * o * 2 + T * (i + o) * 4
    # QKᵀ: B·heads·q·kv dot products of length hd; AV the same again; 2 FLOPs per multiply-add
    B, H, q, kv, hd = 2, 3, 4, 9, 8
    assert cost.attention_flops(B, q, kv, H, hd) == 2 * (2 * B * H * q * kv * hd)


def test_kv_cache_per_token_of_a_7b_config_is_half_a_mebibyte_in_bf16():
    from probe.models import preset_config

    cfg = preset_config("chinese-llama-2-7b")
    per_token = cost.kv_cache_bytes_per_token(cfg, torch.tensor([], dtype=torch.bfloat16).element_size())
    assert per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    assert per_token == 0.5 * 2**20


# --------------------------------------------------------------------------- the 2·P·T check
def test_dense_llama_forward_is_two_flops_per_matmul_parameter_per_token_plus_exact_attention():
    model = dense_llama()
    B, T = 2, 24
    ids = torch.randint(3, 1000, (B, T), generator=torch.Generator().manual_seed(1))
    run = record_forward(model, ids)
    calls = cost.annotate(run.calls, model)
    blocks = calls[calls["role"].isin(BLOCK_ROLES)]
    assert set(blocks["role"]) == set(BLOCK_ROLES)
    total = blocks["flops"].sum()
    # a plain forward computes logits at every position, so lm_head sees all B·T tokens
    assert calls.loc[calls["role"] == "head", "in_shapes"].iloc[0] == f"[[{B},{T},256]]"
    dense = 2 * matmul_params(model) * B * T
    attn = attention_exact(model.config, B, T, T)
    rest = total - attn - dense  # norms, activations, rope, softmax, residual adds
    assert rest > 0
    assert abs(rest) / dense < 0.02, (total, dense, attn)
    # the embedding gather does no arithmetic
    assert calls.loc[calls["role"] == "embed", "flops"].iloc[0] == 0


def test_decode_layer_cost_grows_with_the_kv_cache_by_the_attention_term_only():
    model = dense_llama()
    cfg = model.config
    B, P, n = 2, 6, 4
    ids = torch.randint(3, 1000, (B, P), generator=torch.Generator().manual_seed(2))
    run = record_generate(model, ids, n=n)
    calls = cost.annotate(run.calls, model)
    lay = calls[(calls["module"] == "model.layers.1") & (calls["phase"] == "decode")].sort_values("step")
    assert list(lay["kv_len"]) == list(range(P, P + n - 1))
    hd = cfg.hidden_size // cfg.num_attention_heads
    step_flops = B * cfg.num_attention_heads * (4 * hd + cost.SOFTMAX_FLOPS_PER_SCORE)
    assert lay["flops"].diff().dropna().tolist() == [step_flops] * (n - 2)
    # one more cached position per sequence is one more K and V row per KV head to read
    kv_row = 2 * cfg.num_key_value_heads * hd * 4  # float32
    assert lay["bytes_moved"].diff().dropna().tolist() == [B * kv_row] * (n - 2)
    # per decode step, a layer reads all of its weights once: bytes >= weight bytes
    layer = model.model.layers[1]
    wbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert (lay["bytes_moved"] >= wbytes).all()
    assert (lay["bytes_moved"] < 1.1 * wbytes).all()
    # and does 2 FLOPs per weight per token, plus attention over the cache
    lin = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    first = lay.iloc[0]
    exact = 2 * lin * B + attention_exact(cfg, B, 1, P + 1) / cfg.num_hidden_layers
    assert abs(first["flops"] - exact) / exact < 0.02
    # lm_head in decode: its weight dominates the traffic, intensity about 2·B/itemsize
    head = calls[(calls["role"] == "head") & (calls["phase"] == "decode")].iloc[0]
    hw = model.lm_head.weight
    assert head["bytes_moved"] == pytest.approx(hw.numel() * 4 + B * (hw.shape[0] + hw.shape[1]) * 4)
    assert head["flops"] == 2 * hw.numel() * B


def test_embedding_bytes_are_the_gathered_rows():
    model = dense_llama()
    B, T = 3, 5
    run = record_forward(model, torch.randint(3, 1000, (B, T)))
    emb = cost.annotate(run.calls, model).query("role == 'embed'").iloc[0]
    H = model.config.hidden_size
    assert emb["bytes_moved"] == cost.embedding_bytes(B * T, H, 4, 4) == B * T * (8 + H * 4 + H * 4)


def test_sublayers_add_up_to_their_layer_plus_the_residual_adds():
    model = dense_llama()
    B, T = 1, 10
    run = record_forward(model, torch.randint(3, 1000, (B, T)), depth="sublayers")
    calls = cost.annotate(run.calls, model)
    layer2 = calls[calls["layer"] == 2]
    whole = layer2.loc[layer2["role"] == "layer", "flops"].iloc[0]
    parts = layer2.loc[~layer2["role"].isin(["layer", "attention_fn"]), "flops"].sum()  # attention_fn: inside attention
    assert set(layer2["role"]) == {"layer", "attention", "attention_fn", "mlp", "layer_norm"}
    assert whole - parts == pytest.approx(2 * model.config.hidden_size * B * T)


def test_annotate_from_the_config_dict_matches_the_model_and_from_a_run_with_config():
    model = dense_llama()
    run = record_generate(model, torch.randint(3, 1000, (1, 5)), n=3)
    from_model = cost.annotate(run.calls, model)
    from_dict = cost.annotate(run.calls, model.config.to_dict(), dtype="float32")
    pd.testing.assert_frame_equal(from_model, from_dict)
    run.meta["config"] = model.config.to_dict()
    pd.testing.assert_frame_equal(from_model, cost.annotate(run.calls, run))
    with pytest.raises(ValueError, match="config"):
        cost.annotate(run.calls, probe.Run(run.calls, run.steps, run.runs, meta={}))


def test_annotate_works_per_module_not_per_row(monkeypatch):
    model = dense_llama()
    run = record_generate(model, torch.randint(3, 1000, (1, 5)), n=3)
    big = pd.concat([run.calls] * 2000, ignore_index=True)  # ~ 100k rows
    seen = []
    real = cost.module_cost

    def counting(module, config, role=None):
        seen.append(role)
        return real(module, config, role)

    monkeypatch.setattr(cost, "module_cost", counting)
    out = cost.annotate(big, model)
    assert len(seen) == run.calls["module"].nunique()
    small = cost.annotate(run.calls, model)
    n = len(run.calls)
    assert out["flops"].to_numpy()[-n:].tolist() == small["flops"].tolist()
    assert out["flops"].dtype == "float64" and out["bytes_moved"].notna().all()


def test_empty_and_unknown_modules():
    model = dense_llama()
    run = record_forward(model, torch.randint(3, 1000, (1, 4)))
    empty = cost.annotate(run.calls.iloc[:0], model)
    assert list(empty.columns[-3:]) == list(schema.COST)
    assert all(str(empty[c].dtype) == d for c, d in schema.COST.items())
    other = dense_llama()
    other.model.layers = other.model.layers[:2]  # layers 2 and 3 no longer exist in "other"
    out = cost.annotate(run.calls, other)
    assert out.loc[out["module"] == "model.layers.3", "flops"].isna().all()
    assert out.loc[out["module"] == "model.layers.1", "flops"].notna().all()


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "mixtral", "gemma2", "opt"])
def test_other_architectures_get_finite_positive_layer_costs(model_type):
    model = tiny_model(model_type)
    T = 24
    run = record_forward(model, torch.randint(3, 96, (1, T)))
    calls = cost.annotate(run.calls, model)
    layers = calls[calls["role"] == "layer"]
    assert len(layers) == 2 and (layers["flops"] > 0).all() and (layers["bytes_moved"] > 0).all()
    head = calls[calls["role"] == "head"]
    assert (head["flops"] > 0).all()
    if model_type == "gemma2":  # layer 0 slides over 16 positions, layer 1 sees all 24
        f0, f1 = layers["flops"].tolist()
        cfg = model.config
        per_score = cfg.num_attention_heads * (4 * cfg.head_dim + cost.SOFTMAX_FLOPS_PER_SCORE)
        assert f1 - f0 == pytest.approx(per_score * T * (T - cfg.sliding_window))
    if model_type == "mixtral":  # each token uses k of E experts
        cfg = model.config
        layer = model.model.layers[0]
        experts = sum(p.numel() for n, p in layer.named_parameters() if "experts" in n)  # banks or lists
        dense_other = sum(p.numel() for n, p in layer.named_parameters() if "experts" not in n and p.dim() == 2)
        hd = cfg.hidden_size // cfg.num_attention_heads
        matmuls = 2 * T * (dense_other + experts * cfg.num_experts_per_tok / cfg.num_local_experts)
        attn = 4 * cfg.num_attention_heads * hd * T * T
        rest = layers["flops"].iloc[0] - matmuls - attn  # norms, activations, rope, softmax at width 32
        assert 0 < rest < 0.1 * matmuls


@pytest.mark.parametrize("batch, T", [(1, 24), (2, 7), (3, 1)])
def test_mixture_of_experts_costs_the_routed_experts_as_flop_counter_counts(batch, T):
    """Top-2-of-4 Mixtral: the cost of each sparse MoE block (router + the experts each token
    is routed to) agrees with torch's own FLOP counter of the same forward, whatever the
    layout of the experts (a list of nn.Linear MLPs on 4.x, fused banks on 5.x)."""
    from torch.utils.flop_counter import FlopCounterMode

    from probe.compat import eager_experts_kwargs

    cfg = tiny_config("mixtral")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, **eager_experts_kwargs()).eval()
    ids = torch.randint(3, 96, (batch, T), generator=torch.Generator().manual_seed(1))
    with probe.attach(model, depth="sublayers") as p, FlopCounterMode(display=False) as fc, torch.no_grad():
        model(ids)
    counted = {name.split(".", 1)[-1]: sum(ops.values()) for name, ops in fc.get_flop_counts().items()}
    calls = cost.annotate(p.run.calls, model)
    moe = calls[calls["module_type"].str.endswith("SparseMoeBlock")]
    assert len(moe) == cfg.num_hidden_layers
    matmuls = 2 * batch * T * cfg.hidden_size * (cfg.num_local_experts + cfg.num_experts_per_tok * 3 * cfg.intermediate_size)
    for row in moe.itertuples():
        assert counted[row.module] == matmuls  # the reference itself: router + k experts per token
        # the estimate adds the activations and gating (about 2.6% here), nothing else
        assert counted[row.module] < row.flops < 1.05 * counted[row.module], row.module


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gemma2", "gpt2"])
def test_a_saved_run_costs_from_its_recorded_facts_and_its_config_as_from_the_model(model_type, tmp_path):
    """``probe.load(dir).cost()`` reads the modules' coefficients recorded with the run (no
    model built); a run saved without them (an older probe) rebuilds a weightless twin from its
    config, in the run's dtype. Both give the costs the live model gives, per call."""
    model = tiny_model(model_type).to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    run = record_generate(model, ids, n=3, depth="sublayers")
    saved = probe.load(run.save(tmp_path / "run"))
    facts = saved.meta["module_costs"]
    assert facts["format"] == cost.COSTS_FORMAT and set(facts["modules"]) == set(run.calls["module"])
    counts = cost.parameter_counts(model, list(facts["modules"]))
    assert [facts["modules"][m]["parameters"] for m in counts["module"]] == counts["parameters"].tolist()
    assert [facts["modules"][m]["weight_bytes"] for m in counts["module"]] == counts["weight_bytes"].tolist()
    from_facts = saved.cost()
    older = probe.Run(calls=saved.calls, steps=saved.steps, runs=saved.runs,
                      meta={k: v for k, v in saved.meta.items() if k != "module_costs"})
    from_config = older.cost()
    from_model = cost.annotate(run.calls, model)
    for got in (from_facts, from_config):
        assert got["flops"].notna().all() and (got["bytes_moved"] > 0).all()
        assert got["flops"].tolist() == pytest.approx(from_model["flops"].tolist())
        assert got["bytes_moved"].tolist() == pytest.approx(from_model["bytes_moved"].tolist())


def test_writing_the_report_of_a_saved_run_imports_neither_transformers_nor_torch(tmp_path):
    """`probe report` reads the run and writes it: the cost view's model facts come from the
    run's meta, so no model is built (the fixed cost that made every report take seconds)."""
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    run = record_generate(model, ids, n=3)
    run.meta["peaks"] = hardware.Peaks("CPU", "float32", 5e10, 1e10, "test", True, wait_pct=0.0).to_dict()
    saved = run.save(tmp_path / "run")
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, probe; from reports import write_reports; "
            "paths = write_reports(probe.load(sys.argv[1]), sys.argv[1], formats=('html', 'csv')); "
            "print(len(paths), 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(saved)], cwd=root, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(root)})
    n, tf, th = out.stdout.split()
    assert int(n) > 2 and tf == "False" and th == "False", out.stdout + out.stderr
    text = (saved / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-roofline"' in text and "No cost estimate" not in text


# --------------------------------------------------------------------------- hardware
def test_known_accelerators_have_dense_peaks_and_a_source():
    cases = {
        ("NVIDIA A100-SXM4-40GB", 40): "A100 40GB", ("NVIDIA A100-SXM4-80GB", 80): "A100 80GB",
        ("NVIDIA H100 80GB HBM3", 80): "H100 SXM", ("NVIDIA H100 PCIe", 80): "H100 PCIe",
        ("NVIDIA H200", 141): "H200", ("NVIDIA L4", 23): "L4", ("NVIDIA A10", 23): "A10",
        ("NVIDIA GeForce RTX 4090", 24): "RTX 4090",
    }
    for (name, gib), expect in cases.items():
        pk = hardware.table_peaks(name, "bfloat16", gib * 2**30)
        assert pk is not None and expect in pk.name, name
        assert not pk.measured and pk.source.startswith("https://")
        assert pk.ridge_flops_per_byte == pk.flops_per_s / pk.bytes_per_s
    a40 = hardware.table_peaks("NVIDIA A100-SXM4-40GB", "bfloat16", 40 * 2**30)
    a80 = hardware.table_peaks("NVIDIA A100-SXM4-80GB", "bfloat16", 80 * 2**30)
    assert a40.flops_per_s == a80.flops_per_s and a40.bytes_per_s < a80.bytes_per_s
    assert hardware.table_peaks("Some Unknown GPU", "bfloat16") is None


def test_measure_peaks_measures_now_and_caches_per_process():
    measured_peaks._measure.cache_clear()
    pk = hardware.measure_peaks("cpu", "float32")
    assert pk.measured and pk.flops_per_s > 0 and pk.bytes_per_s > 0  # how fast is this machine's business
    assert "measured" in pk.source and "matmul" in pk.source and "copy" in pk.source
    assert hardware.measure_peaks("cpu", "float32") is pk  # cached: the same object, not re-measured
    assert hardware.Peaks.from_dict(pk.to_dict()) == pk


def loadavg(tmp_path, runnable: int):
    """A /proc/loadavg as the kernel writes it, with ``runnable`` tasks running or runnable."""
    path = tmp_path / f"loadavg-{runnable}"
    path.write_text(f"0.50 0.40 0.30 {runnable}/300 4242\n")
    return str(path)


@pytest.fixture
def peaks_cache(tmp_path, monkeypatch):
    """An empty user cache; the measurement's own wait check off (this shared machine may be
    busy at any moment: the quiet verdict under test is the injected load figure)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(peaks_record, "QUIET_WAIT_PCT", 100.0)  # the bar Peaks.busy() reads
    return tmp_path / "cache" / "probe" / "peaks"


def test_cpu_peaks_are_measured_once_when_quiet_and_then_read_from_the_cache(cpu_run, peaks_cache, tmp_path,
                                                                            monkeypatch):
    _, run = cpu_run
    monkeypatch.setattr(noise, "LOADAVG", loadavg(tmp_path, 0))  # nothing else runnable
    before = hardware.measurements()
    first = hardware.peaks_for_run(run)
    assert hardware.measurements() == before + 1
    assert first is not None and first.measured and first.wait_pct is not None
    files = list(peaks_cache.glob("*.json"))
    assert len(files) == 1 and "quiet machine" in first.source
    mtime = files[0].stat().st_mtime_ns
    cached = json.loads(files[0].read_text())
    key = cached["key"]
    assert key["threads"] == torch.get_num_threads() and key["dtype"] == "float32"
    assert key["torch_version"] == torch.__version__ and key["cpu_count"] >= 1 and key["cpu_model"]
    # later runs reuse the figure, even on a busy machine: no measurement, the file untouched
    monkeypatch.setattr(noise, "LOADAVG", loadavg(tmp_path, 64))
    again = hardware.peaks_for_run(run)
    assert hardware.measurements() == before + 1 and again == first
    assert files[0].stat().st_mtime_ns == mtime
    assert not list(peaks_cache.glob(".*"))  # written atomically: no temporary file left


def test_a_busy_machine_gets_no_cpu_peaks_and_is_told_why(cpu_run, peaks_cache, tmp_path, monkeypatch, caplog):
    _, run = cpu_run
    monkeypatch.setattr(noise, "LOADAVG", loadavg(tmp_path, 64))  # 64 runnable tasks on this machine
    verdict = noise.quiet_now()
    assert not verdict.quiet and "other runnable tasks" in verdict.why
    before = hardware.measurements()
    with caplog.at_level("WARNING", logger="probe.hardware"):
        assert hardware.peaks_for_run(run) is None
    assert hardware.measurements() == before  # never a busy measurement
    assert not peaks_cache.exists() or not list(peaks_cache.iterdir())
    assert "busy" in caplog.text and "cached in" in caplog.text
    peaks, why = hardware.cpu_peaks("float32")
    assert peaks is None and why.startswith("CPU peaks not measured: the machine is busy")


def test_cached_cpu_peaks_are_keyed_by_dtype_and_threads(peaks_cache, monkeypatch):
    monkeypatch.setattr(peaks_record, "QUIET_WAIT_PCT", 10.0)
    keys = [hardware.cpu_key("float32", 1), hardware.cpu_key("bfloat16", 1), hardware.cpu_key("float32", 2)]
    assert len({hardware.cache_path(k) for k in keys}) == 3
    assert all(hardware.cache_path(k).parent == peaks_cache for k in keys)
    # a figure measured while waiting for a CPU is never read back, even if a file holds it
    key = keys[0]
    busy = hardware.Peaks("CPU", "float32", 5e8, 2e10, "measured busy", True, wait_pct=85.0)
    measured_peaks._write_cached(hardware.cache_path(key), key, busy)
    assert measured_peaks._read_cached(hardware.cache_path(key), key) is None


# --------------------------------------------------------------------------- roofline
def quiet(peaks):
    """``peaks`` as if measured on a quiet machine, as runs store them: the roofline's arithmetic
    is tested here on this shared machine's real figures, busy or not (refusal: further down)."""
    return dataclasses.replace(peaks, wait_pct=0.0)


@pytest.fixture(scope="module")
def cpu_run():
    model = dense_llama()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = record_generate(model, torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(3)), n=5)
    finally:
        torch.set_num_threads(n)
    return model, run


def test_cpu_roofline_uses_measured_peaks_and_says_so(cpu_run):
    model, run = cpu_run
    calls = cost.annotate(run.calls, model)
    pk = quiet(hardware.measure_peaks("cpu", "float32"))
    assert pk.measured
    roof = rl.roofline(calls, pk, run.steps)
    assert {str(d) for d in roof.dtypes} <= set(rl.ROOFLINE.values())
    assert list(roof.columns) == list(rl.ROOFLINE)
    assert set(roof["phase"]) == {"prefill", "decode"}
    assert set(roof["module"]) == set(BLOCK_ROLES) | {"(forward)"}
    assert (roof["time_source"] == "host").all()
    assert roof["bound"].isin(rl.BOUNDS).all()
    assert roof["peaks"].str.startswith("measured").all()
    assert roof["reason"].str.contains("measured peaks").all()
    # the numbers behind the labels are the frame's own
    lay = roof[(roof["module"] == "layer") & (roof["phase"] == "decode")].iloc[0]
    sub = calls[(calls["role"] == "layer") & (calls["phase"] == "decode")]
    assert lay["flops"] == sub["flops"].sum() and lay["time_ms"] == pytest.approx(sub["cpu_ms"].sum())
    assert lay["achieved_tflop_s"] == pytest.approx(sub["flops"].sum() / (sub["cpu_ms"].sum() / 1e3) / 1e12)
    assert lay["intensity_flops_per_byte"] == pytest.approx(sub["flops"].sum() / sub["bytes_moved"].sum())
    # decode reads every weight for a token per sequence: lower intensity than prefill
    pre = roof[(roof["module"] == "layer") & (roof["phase"] == "prefill")].iloc[0]
    assert lay["intensity_flops_per_byte"] < pre["intensity_flops_per_byte"]
    summ = rl.bound_summary(roof)
    assert summ.groupby("phase")["share"].sum().round(9).eq(1.0).all()


def test_bound_rules_with_gpu_timings(cpu_run):
    """The classification rules on GPU-style rows: the recorded calls with GPU times put in."""
    model, run = cpu_run
    calls = cost.annotate(run.calls, model)
    h100 = hardware.table_peaks("NVIDIA H100 80GB HBM3", "bfloat16")
    slow_gpu = calls.assign(gpu_ms=calls["cpu_ms"] * 3)  # GPU slower than the host: not host-bound
    roof = rl.roofline(slow_gpu, h100)
    assert (roof["time_source"] == "gpu").all()
    dec = roof[roof["phase"] == "decode"].set_index("module")
    ridge = h100.ridge_flops_per_byte
    for m, r in dec.iterrows():
        assert r["bound"] == ("compute" if r["intensity_flops_per_byte"] >= ridge else "memory"), m
        assert "datasheet" in r["reason"]
    fast_gpu = calls.assign(gpu_ms=calls["cpu_ms"] / 3)  # GPU waits for the host
    roof = rl.roofline(fast_gpu, h100)
    assert (roof["bound"] == "host").all()
    assert roof["reason"].str.contains("host").all()
    idle = rl.roofline(slow_gpu, h100, steps=run.steps.assign(gpu_ms=run.steps["forward_ms"] * 20))
    fwd = idle[idle["module"] == "(forward)"]
    assert (fwd["gpu_idle_fraction"] > rl.GPU_IDLE_HOST_FRACTION).all() and (fwd["bound"] == "host").all()


def test_roofline_of_nothing_has_typed_columns():
    empty = rl.roofline(probe.schema.empty(probe.schema.CALLS).assign(flops=[], bytes_moved=[]), None)
    assert list(empty.columns) == list(rl.ROOFLINE) and empty.empty
    assert [str(t) for t in empty.dtypes] == list(rl.ROOFLINE.values())
    with pytest.raises(ValueError, match="annotate"):
        rl.roofline(pd.DataFrame({"role": ["layer"], "phase": ["decode"]}), None)


def test_roofline_figure_draws_the_roofs_and_lists_zero_flop_blocks(cpu_run):
    pytest.importorskip("plotly")
    from probe.reports.cost_figures import roofline as roofline_figure

    model, run = cpu_run
    pk = quiet(hardware.measure_peaks("cpu", "float32"))
    roof = rl.roofline(cost.annotate(run.calls, model), pk, run.steps)
    fig = roofline_figure(roof, pk)
    assert fig.data[0].name == "roof"
    assert max(fig.data[0].y) == pytest.approx(pk.flops_per_s / 1e9 if pk.flops_per_s < 1e12 else pk.tflops)
    markers = {n for tr in fig.data[1:] for n in tr.text}
    assert {"layer", "head", "(forward)"} <= markers and "embed" not in markers
    assert "measured on this machine" in fig.layout.title.text
    assert "embed" in fig.layout.annotations[-1].text
    # same figure from the peaks as stored in JSON
    assert roofline_figure(roof, pk.to_dict()).layout.title.text == fig.layout.title.text
    assert math.isfinite(fig.data[1].x[0])


# --------------------------------------------------------------------------- roofline honesty
@pytest.fixture(scope="module")
def bundled_run():
    """The bundled model (4 of its layers) generating on CPU, as `probe run` records it."""
    model, tok = probe.models.load_bundled(num_hidden_layers=4)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with probe.attach(model, model_id=probe.models.BUNDLED_ID) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    return p.run


def with_meta(run, **meta):
    return probe.Run(calls=run.calls, steps=run.steps, runs=run.runs, meta={**run.meta, **meta})


def busy_copy(run, wait_share: float = 0.85):
    """``run`` with its generate calls' run-queue wait set so the noise figure is ``wait_share``
    (the run-queue measure is what `probe run` reads on a busy Linux machine)."""
    runs = run.runs.copy()
    cpu = runs["process_cpu_ms"].astype("float64").fillna(10.0)
    runs["process_cpu_ms"] = cpu
    runs["cpu_wait_ms"] = cpu * wait_share / (1 - wait_share)
    return probe.Run(calls=run.calls, steps=run.steps, runs=runs, meta=dict(run.meta))


#: peaks as a busy machine measured them (the issue's figures: 0.5 GFLOP/s, a ridge of 0.025)
BUSY = hardware.Peaks("CPU (x86_64, 2 threads)", "float32", 5e8, 2e10, "measured on this machine", True, wait_pct=86.0)


def test_peaks_measured_on_a_busy_machine_draw_no_roofline_and_say_why(bundled_run, tmp_path):
    from probe.reports.cost_view import cost_view
    from probe.reports.html import write_html

    run = with_meta(bundled_run, peaks=BUSY.to_dict())
    view = cost_view(run)
    assert view.peaks is None and view.has_cost and not view.has_roofs
    assert "86 % of the measurement was spent waiting for a CPU" in view.note
    assert "A CPU has no datasheet" in view.note
    assert view.roof["bound"].isna().all() and view.roof["ridge_flops_per_byte"].isna().all()
    assert rl.roofline(run.cost(), BUSY, run.steps)["bound"].isna().all()  # never used, even when passed
    text = write_html(run, tmp_path / "r.html").read_text()
    assert 'id="fig-roofline"' not in text and "waiting for a CPU" in text
    # peaks stored before they carried their wait: refused when the run itself was busy
    legacy = hardware.Peaks(**{**BUSY.to_dict(), "wait_pct": None})
    busy = busy_copy(with_meta(bundled_run, peaks=legacy.to_dict()))
    assert busy.noise().busy
    view = cost_view(busy)
    assert view.peaks is None and "measured while recording on a busy machine (85 %" in view.note
    quiet = cost_view(with_meta(bundled_run, peaks=legacy.to_dict()))
    assert bundled_run.noise().busy or quiet.has_roofs


def test_a_point_above_its_roof_is_a_measurement_error_not_a_bound(bundled_run):
    from probe.reports.cost_figures import roofline as roofline_figure

    low = hardware.Peaks("CPU", "float32", 1e5, 1e5, "too low on purpose", True, wait_pct=0.0)
    roof = rl.roofline(bundled_run.cost(), low, bundled_run.steps, cpu_wait_pct=0.0)
    on_axes = roof[roof["flops"] > 0]
    assert (on_axes["roof_fraction"] > 1).all() and (on_axes["bound"] == "error").all()
    assert on_axes["reason"].str.startswith("measurement error, not a bound").all()
    assert not on_axes["bound"].isin(["compute", "memory", "host"]).any()
    fig = roofline_figure(roof, low)
    labels = [a.text for a in fig.layout.annotations]
    assert any("head (" in t and "of roof: measurement error" in t for t in labels)
    assert "measurement error, not a bound" in labels[-1]
    assert set(rl.bound_summary(roof)["bound"]) <= set(rl.BOUNDS)


def test_host_overhead_is_only_said_when_the_cpu_was_not_waiting(bundled_run):
    huge = hardware.Peaks("CPU", "float32", 1e16, 1e14, "far above anything", True, wait_pct=0.0)
    calls = bundled_run.cost()
    quiet = rl.roofline(calls, huge, bundled_run.steps, cpu_wait_pct=0.0)
    blocks = quiet[quiet["flops"] > 0]
    assert (blocks["bound"] == "host").all() and blocks["reason"].str.contains("per-call overhead").all()
    busy = rl.roofline(calls, huge, bundled_run.steps, cpu_wait_pct=86.0)
    blocks = busy[busy["flops"] > 0]
    assert (blocks["bound"] == "wait").all()
    assert blocks["reason"].str.contains("86 % of the step time was spent waiting for a CPU").all()
    assert not blocks["reason"].str.contains("per-call overhead, not").any()
    # without the run's figure: per phase from the steps' wall time beyond their CPU time
    steps = bundled_run.steps.assign(process_cpu_ms=bundled_run.steps["forward_ms"] * 0.1)
    per_step = rl.roofline(calls, huge, steps)
    assert (per_step[per_step["flops"] > 0]["bound"] == "wait").all()
    # the run's own noise figure reaches the labels through Run.roofline and the cost view
    from probe.reports.cost_view import cost_view

    view = cost_view(busy_copy(with_meta(bundled_run, peaks=huge.to_dict())))
    assert (view.roof[view.roof["flops"] > 0]["bound"] == "wait").all()


def test_ridge_and_peaks_never_read_zero(bundled_run):
    from probe.reports.cost_figures import roofline as roofline_figure
    from probe.reports.cost_view import cost_view

    slow = hardware.Peaks("CPU", "float32", 5e8, 2e10, "a slow machine, quiet", True, wait_pct=1.0)
    view = cost_view(with_meta(bundled_run, peaks=slow.to_dict()))
    assert view.has_roofs
    fig = roofline_figure(view.roof, slow)
    texts = [a.text for a in fig.layout.annotations] + [fig.layout.title.text, view.peaks_text()]
    texts += view.roof["reason"].dropna().tolist()
    assert "ridge 0.0250 FLOP/B" in texts
    assert "500 MFLOP/s" in fig.layout.title.text and "20.0 GB/s" in fig.layout.title.text
    assert not any("0.0 FLOP/B" in t or " 0.0 GFLOP/s" in t for t in texts)
    assert "ridge 0.0250 FLOP/B" in view.roof["reason"].iloc[0]


@pytest.mark.parametrize("model_type, depth, overrides", [
    ("llama", "blocks", {}),
    ("llama", "all", {}),
    ("mistral", "blocks", {"sliding_window": 4}),  # a window: the per-call path
    ("gpt2", "sublayers", {}),
])
def test_group_costs_are_the_sums_of_annotate_per_block(model_type, depth, overrides, monkeypatch):
    """The roofline's FLOPs and bytes per (role, phase), summed by signature, equal the sums of
    annotate's per-call figures, on the fast path and on the per-call one alike."""
    import numpy as np
    from probe.analysis.grouping import group_sum, key_codes

    model = tiny_model(model_type, **overrides)
    with probe.attach(model, depth=depth) as p:
        model.generate(torch.tensor([[1, 5, 6, 7, 8, 9]]), max_new_tokens=6, do_sample=False)
    run = p.run
    groups, frame = key_codes(run.calls, ["role", "phase"])
    costed = cost.annotate(run.calls, model)
    paths = []
    by_signature = cost._group_sums
    monkeypatch.setattr(cost, "_group_sums", lambda *a: paths.append(by_signature(*a) is not None) or by_signature(*a))
    got_f, got_b = cost.group_costs(run.calls, model, groups, len(frame))
    # by signature at depth blocks without a window; per call with a window or the attention function
    assert paths == [model_type == "llama" and depth == "blocks"]
    want_f = group_sum(groups, len(frame), costed["flops"].to_numpy(), 1)
    want_b = group_sum(groups, len(frame), costed["bytes_moved"].to_numpy(), 1)
    assert np.isfinite(want_f).any()
    np.testing.assert_allclose(got_f, want_f, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-12, equal_nan=True)
    # the report's roofline from group sums equals the one from annotated calls
    pd.testing.assert_frame_equal(
        rl.roofline(run.calls, None, run.steps, costs=lambda g, n: cost.group_costs(run.calls, model, g, n)),
        rl.roofline(costed, None, run.steps), rtol=1e-12)


def test_a_call_without_a_role_stays_among_the_blocks_in_the_roofline():
    """The whole-forward row is each phase's last; a call with a null role is a block row."""
    model = tiny_model("llama")
    with probe.attach(model, depth="sublayers") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    costed = cost.annotate(p.run.calls, model)
    first = int(np.flatnonzero((costed["role"] == "attention").to_numpy())[0])
    named = costed.assign(role=costed["role"].astype(object).where(costed.index != first, "unnamed"))
    unnamed = costed.assign(role=costed["role"].astype(object).where(costed.index != first, None))
    want = rl.roofline(named, None, p.run.steps)["module"].tolist()
    got = rl.roofline(unnamed, None, p.run.steps)["module"].astype(object).fillna("unnamed").tolist()
    assert got == want  # the null role's row where a role of no block's name would be, not after the blocks
