"""`probe sweep` and `probe shapes`: the Python APIs, the CLI commands, and their charts."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from torch import nn

import probe
from probe import cli
from probe.models import load_tokenizer, preset_config
from probe.routines.shapes import walkthrough
from probe.routines.sweep import SWEEP, load_sweep, sweep, sweep_summary
from tiny import tiny_llama, tiny_model


def architecture_parameters(cfg) -> int:
    """A LLaMA's parameter count from its config alone."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = H // cfg.num_attention_heads
    attn = H * cfg.num_attention_heads * hd + 2 * H * cfg.num_key_value_heads * hd + cfg.num_attention_heads * hd * H
    per_layer = attn + 3 * H * I + 2 * H
    return V * H * (1 if cfg.tie_word_embeddings else 2) + L * per_layer + H


# --------------------------------------------------------------------------- sweep
def test_sweep_api_records_every_config_and_reloads_equal(tmp_path):
    model = tiny_llama(layers=2, hidden=64)
    lens, batches, n, rep = [4, 16], [1, 2], 3, 2
    df = sweep(model, None, lens, batches, new_tokens=n, repeat=rep, warmup=1, out=tmp_path)
    assert list(df.columns) == list(SWEEP) and [str(t) for t in df.dtypes] == list(SWEEP.values())
    assert len(df) == len(lens) * len(batches) * rep * n  # prefill + (n-1) decode steps per call
    for (P, B, r), g in df.groupby(["prompt_len", "batch", "repeat"]):
        assert g["phase"].tolist() == ["prefill"] + ["decode"] * (n - 1)
        assert g["kv_len"].tolist() == [0] + list(range(P, P + n - 1))
        assert g["q_len"].iloc[0] == P and (g["q_len"].iloc[1:] == 1).all()
        assert g["new_tokens"].sum() == n  # EOS cannot stop a call early
    # FLOPs of prefill rise with the prompt and with the batch
    pre = df[df["phase"] == "prefill"].groupby(["batch", "prompt_len"])["flops"].first()
    assert pre[(1, 16)] > pre[(1, 4)] and pre[(2, 4)] == pytest.approx(2 * pre[(1, 4)])
    back, meta = load_sweep(tmp_path)
    pd.testing.assert_frame_equal(back, df)
    assert meta["prompt_lens"] == lens and meta["batch_sizes"] == batches and meta["failures"] == []
    run = probe.load(tmp_path / meta["runs"]["p16-b2"])
    assert len(run.runs) == rep and set(run.steps["batch"]) == {2}
    summ = sweep_summary(df)
    assert len(summ) == 4 and (summ["repeats"] == rep).all()
    assert (summ["decode_ms_per_token"] > 0).all()


def test_sweep_keeps_going_past_a_failing_config(tmp_path):
    model = tiny_model("gpt2")  # learned positions: 128 of them, so a 200-token prompt cannot run
    df = sweep(model, None, [8, 200], [1], new_tokens=2, repeat=1, warmup=0, out=tmp_path)
    assert set(df["prompt_len"]) == {8} and len(df) == 2
    fails = df.attrs["failures"]
    assert [f["prompt_len"] for f in fails] == [200] and "Error" in fails[0]["error"]
    assert json.loads((tmp_path / "sweep.json").read_text())["failures"] == fails


def test_sweep_rejects_an_empty_or_bad_grid():
    model = tiny_llama(layers=1, hidden=32)
    with pytest.raises(ValueError, match="prompt lengths"):
        sweep(model, None, [], [1])
    with pytest.raises(ValueError, match="repeat"):
        sweep(model, None, [4], [1], repeat=0)


def test_sweep_cli_on_the_bundled_model(tmp_path, capsys):
    pytest.importorskip("plotly")
    from probe.reports.cost_figures import sweep_decode, sweep_prefill, sweep_throughput

    out = tmp_path / "sw"
    rc = cli.main(["sweep", "--prompt-lens", "8,256", "--batch-sizes", "1,2", "--new-tokens", "3", "--repeat", "3",
                   "--warmup", "1", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "sweep: 100%" in cap.err and "16/16" in cap.err  # tqdm bar: 4 configs x (1 + 3) calls
    assert "prefill ms" in cap.out and str(out) in cap.out
    df, meta = load_sweep(out)
    assert meta["model_id"] == "probe-tiny-llama-32l" and len(df) == 2 * 2 * 3 * 3
    prefill = sweep_prefill(df)
    by_batch = {tr.name: dict(zip(tr.x, tr.y)) for tr in prefill.data}
    for name, curve in by_batch.items():
        assert curve[256] > curve[8], (name, curve)  # prefill time rises with prompt length
    expected = df[df["phase"] == "prefill"].groupby(["batch", "prompt_len"])["latency_ms"].median()
    assert by_batch["batch 1"][8] == pytest.approx(expected[(1, 8)])
    dec = sweep_decode(df)
    assert {tr.name for tr in dec.data} == {"batch 1", "batch 2"}
    assert sorted(x for tr in dec.data for x in tr.x) == sorted(df.loc[df["phase"] == "decode", "kv_len"].unique().tolist() * 2)
    thr = sweep_throughput(df)
    assert {tr.name for tr in thr.data} == {"prompt 8", "prompt 256"} and list(thr.data[0].x) == [1, 2]
    page = (out / "sweep.html").read_text(encoding="utf-8")
    # offline: plotly.js inlined once, no external script, three charts with fixed ids
    assert page.count("Plotly.newPlot") == 3 and 'id="sweep-prefill"' in page
    assert "<script src=" not in page and len(re.findall(r"plotly\.js v\d", page)) == 1


def test_sweep_cli_rejects_bad_lists(capsys):
    assert cli.main(["sweep", "--prompt-lens", "8,x"]) == 2
    assert "--prompt-lens" in capsys.readouterr().err
    assert cli.main(["sweep", "--batch-sizes", "0"]) == 2


# --------------------------------------------------------------------------- shapes
@pytest.fixture(scope="module")
def walk7b():
    return walkthrough("chinese-llama-2-7b", 7)


def _row(df, phase, role):
    r = df[(df["phase"] == phase) & (df["role"] == role)]
    return r.iloc[0]


def test_7b_walkthrough_shapes(walk7b):
    df = walk7b
    cfg = preset_config("chinese-llama-2-7b")
    H, V = cfg.hidden_size, cfg.vocab_size
    assert _row(df, "prefill", "embed")["in_shapes"] == "[[1,7]]"
    assert _row(df, "prefill", "embed")["out_shapes"] == f"[[1,7,{H}]]"
    assert _row(df, "prefill", "head")["out_shapes"] == f"[[1,7,{V}]]"  # full logits
    assert _row(df, "decode", "embed")["out_shapes"] == f"[[1,1,{H}]]"
    assert _row(df, "decode", "head")["out_shapes"] == f"[[1,1,{V}]]"
    assert _row(df, "decode", "layer")["kv_len"] == 7
    assert len(df[(df["phase"] == "prefill") & (df["role"] == "layer")]) == cfg.num_hidden_layers


def test_7b_walkthrough_parameters_weights_and_kv_cache(walk7b):
    a = walk7b.attrs
    cfg = preset_config("chinese-llama-2-7b")
    assert a["parameters"] == architecture_parameters(cfg)
    assert a["dtype"] == "bfloat16" and a["weight_bytes"] == 2 * a["parameters"]
    assert a["weight_bytes"] / 1e9 == pytest.approx(13.5, rel=0.02)
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * 2
    assert a["kv_cache_bytes_per_token"] == per_token == 2**19  # 0.5 MiB
    # the meta cache's own tensors agree: 7 positions after prefill, 8 after one decode step
    assert a["kv_cache_bytes_prefill"] == 7 * per_token and a["kv_cache_bytes_decode"] == 8 * per_token
    # per-block parameters add up to the model's
    blocks = walk7b[walk7b["phase"] == "prefill"]
    assert blocks["parameters"].sum() == a["parameters"]


def test_7b_walkthrough_flops_and_bytes(walk7b):
    lay = _row(walk7b, "decode", "layer")
    assert lay["flops"] == pytest.approx(2 * lay["parameters"], rel=0.01)  # one token: 2 FLOPs per weight
    assert lay["bytes_moved"] == pytest.approx(lay["weight_bytes"], rel=0.01)  # decode reads its weights
    pre = _row(walk7b, "prefill", "layer")
    assert pre["flops"] == pytest.approx(7 * 2 * pre["parameters"], rel=0.01)
    assert pre["intensity_flops_per_byte"] > lay["intensity_flops_per_byte"]


def test_walkthrough_of_a_real_model_leaves_it_alone():
    model = tiny_llama(layers=2, hidden=32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    df = walkthrough(model, [5, 6, 7, 8], batch=2, depth="sublayers")
    assert _row(df, "prefill", "head")["out_shapes"] == f"[[2,4,{model.config.vocab_size}]]"
    assert set(df["role"]) >= {"attention", "mlp", "layer_norm"}
    assert all(p.device.type == "cpu" and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert df.attrs["parameters"] == sum(p.numel() for p in model.parameters())
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_shapes_cli_on_the_preset(tmp_path, capsys):
    csv = tmp_path / "walk.csv"
    rc = cli.main(["shapes", "--preset", "chinese-llama-2-7b", "--prompt", "我喜欢攀岩", "--prompt-tokens", "7",
                   "--out", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "-> 7 tokens" in out
    assert "[1, 7] -> [1, 7, 4096]" in out and "[1, 7, 4096] -> [1, 7, 40076]" in out
    assert "[1, 1] -> [1, 1, 4096]" in out and "[1, 1, 4096] -> [1, 1, 40076]" in out
    assert "0.500 MiB per token" in out and "full logits" in out
    back = pd.read_csv(csv)
    assert set(back["phase"]) == {"prefill", "decode"} and back["flops"].notna().all()


def test_shapes_cli_counts_the_prompt_with_the_bundled_tokenizer(capsys):
    prompt = "我喜欢攀岩"
    n = len(load_tokenizer()(prompt)["input_ids"])
    assert cli.main(["shapes", "--prompt", prompt]) == 0
    out = capsys.readouterr().out
    assert f"-> {n} tokens" in out and f"[1, {n}] -> [1, {n}, 128]" in out


def test_shapes_cli_errors(tmp_path, capsys):
    assert cli.main(["shapes", "--preset", "no-such-model"]) == 2
    assert "Unknown preset" in capsys.readouterr().err
    assert cli.main(["shapes", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_shapes_cli_takes_a_preset_name_as_model(capsys):
    assert cli.main(["shapes", "Llama-2-7B", "--prompt-tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert "preset      Llama-2-7B: vocabulary 32,000, hidden 4,096, 32 layers" in out
    assert "[1, 7] -> [1, 7, 4096]" in out and "[1, 7, 4096] -> [1, 7, 32000]" in out
    # the same table as --preset gives
    assert cli.main(["shapes", "--preset", "llama-2-7b", "--prompt-tokens", "7"]) == 0
    assert capsys.readouterr().out.split("\n", 2)[2] == out.split("\n", 2)[2].replace("Llama-2-7B", "llama-2-7b")
    # a model name still means the model, not the preset of the same name
    assert cli.main(["shapes", "tiny", "--prompt-tokens", "3"]) == 0
    assert "the bundled model" in capsys.readouterr().out


def test_shapes_cli_unknown_name_lists_the_presets(capsys):
    from probe.models import PRESETS

    assert cli.main(["shapes", "llama-9"]) == 2
    err = capsys.readouterr().err
    assert "neither a model folder nor a known model name" in err and "or a preset" in err
    assert all(name in err for name in PRESETS)
