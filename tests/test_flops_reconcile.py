"""A deep run's FLOPs (torch's formulas, op by op) reconciled with the cost model's: equal to its
matrix products block by block, the rest explained by category; on tiny real models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import probe
from probe.analysis.cost import FLOP_CATEGORIES, annotate, flops_by_category
from probe.analysis.flops_check import STEP, reconcile_flops
from probe.analysis.run import merge
from probe.recording.deep_ops import grouped_mm_flops

from tiny import as_rank, tiny_llama, tiny_model

PROMPT = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8]])  # 8 tokens
CATS = [f"{c}_flops" for c in FLOP_CATEGORIES]


def _deep_run(model, attn: str, prompt=PROMPT, depth: str = "blocks", steps=(0, 2)):
    model.config._attn_implementation = attn
    with probe.attach(model, deep=list(steps), depth=depth) as p:
        model.generate(prompt, max_new_tokens=3, do_sample=False)
    return p.run


def test_cost_categories_add_up_to_the_cost_models_flops():
    """The split is the cost model's own: per call its categories sum to ``flops`` exactly, and a
    biased projection's matrix part is 2·T·in·out with T·out beside it."""
    for m in (tiny_llama(layers=1, hidden=32, vocab=64), tiny_model("qwen2"), tiny_model("gpt2")):
        with probe.attach(m, depth="all") as p:
            m.generate(PROMPT, max_new_tokens=2, do_sample=False)
        calls = p.run.calls
        flops = annotate(calls, m)["flops"]
        parts = flops_by_category(calls, m)
        assert list(parts.columns) == CATS and parts.index.equals(calls.index)
        assert (parts.sum(axis=1) == flops).all()
    m = tiny_model("qwen2")
    with probe.attach(m, depth="all") as p:
        m.generate(PROMPT, max_new_tokens=1, do_sample=False)
    calls = p.run.calls
    row = calls.index[calls["module"].eq("model.layers.0.self_attn.q_proj")][0]
    parts = flops_by_category(calls.loc[[row]], m)
    lin = m.model.layers[0].self_attn.q_proj
    t = 8  # prefill tokens
    assert parts.at[row, "matrix_flops"] == 2 * t * lin.in_features * lin.out_features
    assert parts.at[row, "bias_flops"] == t * lin.out_features
    assert flops_by_category(calls.iloc[:0], m).columns.tolist() == CATS


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_deep_flops_equal_the_cost_models_matrix_products(attn):
    m = tiny_llama(layers=2, hidden=32, vocab=64)
    run = _deep_run(m, attn, depth="sublayers")
    rec = reconcile_flops(run, m)
    assert set(rec["phase"]) == {"prefill", "decode"} and set(rec["step"]) == {0, 2}
    assert set(rec["module"]) == {"model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head",
                                  STEP}
    cfg = m.config
    h, i, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // heads
    outside = rec["outside_flops"].fillna(0)
    assert (rec["verdict"] == "equal").all() and (rec["deep_flops"] - outside == rec["matrix_flops"]).all()
    assert (rec["gap_flops"] == rec["rest_flops"]).all()  # what the deep pass lacks is the rest
    assert (rec[CATS].sum(axis=1) == rec["cost_flops"]).all()
    # outside the blocks: nothing on transformers 5; on 4.x the rotary frequencies' product of the
    # positions (inv_freq [hd/2, 1] x positions [1, q]) before the first layer
    steps = rec[rec["module"] == STEP]
    q = steps["q_len"].to_numpy()
    got = steps["outside_flops"].to_numpy()
    assert ((got == 0) | (got == 2 * (hd // 2) * q)).all(), got
    assert (rec.loc[rec["module"] != STEP, "outside_flops"].isna()).all()
    pre = rec[(rec["step"] == 0) & (rec["module"] == "model.layers.0")].iloc[0]
    t = 8
    matrix = 2 * t * h * (h + 2 * kv * hd + h) + 2 * t * h * i * 3 + 4 * heads * t * t * hd
    assert pre["deep_flops"] == matrix == 155_648  # the hand check of the issue
    assert pre["cost_flops"] == 163_200
    assert (pre["norm_flops"], pre["activation_flops"], pre["gating_flops"], pre["softmax_flops"],
            pre["rope_flops"], pre["residual_flops"], pre["bias_flops"]) == (
        2 * 4 * t * h, 4 * t * i, t * i, 5 * heads * t * t, 3 * t * (heads + kv) * hd, 2 * t * h, 0)
    assert pre["explained_by"].startswith("norm 2,048 + activation 2,048 + softmax 1,280")
    # the output head runs on the last position only in prefill (logits_to_keep=1): costed so
    head = rec[(rec["module"] == "lm_head")]
    assert (head["deep_flops"] == 2 * h * cfg.vocab_size).all() and (head["gap_flops"] == 0).all()
    # decode: one token against the 10 positions held after it
    dec = rec[(rec["step"] == 2) & (rec["module"] == "model.layers.1")].iloc[0]
    assert dec["deep_flops"] == 2 * h * (2 * h + 2 * kv * hd) + 6 * h * i + 4 * heads * 10 * hd
    step = rec[rec["module"] == STEP].set_index("step")
    blocks = rec[rec["module"] != STEP].groupby("step")
    # the products outside the blocks (4.x's rotary frequencies) are kept apart: the rest is the blocks'
    assert (step["deep_flops"] - step["outside_flops"] == blocks["deep_flops"].sum()).all()
    # at the recorded depth: attention, its function, MLP and norms reconcile as well
    mod = run.flops_reconciled(m, by="module")
    assert {"model.layers.0.self_attn", "model.layers.0.self_attn.attention_fn", "model.layers.0.mlp",
            "model.layers.0.input_layernorm"} <= set(mod["module"])
    assert (mod["verdict"] == "equal").all()
    fn = mod[(mod["step"] == 0) & (mod["module"] == "model.layers.0.self_attn.attention_fn")].iloc[0]
    assert fn["deep_flops"] == 4 * heads * t * t * hd and fn["explained_by"] == f"softmax {5 * heads * t * t:,}"
    assert "model.layers.0.self_attn.q_proj" not in set(mod["module"])  # below the recorded depth


def test_each_rank_is_reconciled_on_its_own():
    """Two ranks under one run id (the same run as rank 0 and rank 1): each rank's rows are the
    single run's, its (step) rows set against its own blocks."""
    m = tiny_llama(layers=2, hidden=32, vocab=64)
    run = _deep_run(m, "sdpa")
    one = reconcile_flops(run, m)
    both = reconcile_flops(merge([run, as_rank(run, 1)]), m)
    assert both["rank"].tolist() == [0] * len(one) + [1] * len(one)
    for r in (0, 1):
        got = both[both["rank"] == r].reset_index(drop=True)
        pd.testing.assert_frame_equal(got.drop(columns="rank"), one.drop(columns="rank"))
    assert (one["rank"] == 0).all() and (one.loc[one["module"] == STEP, "verdict"] == "equal").all()


def test_a_saved_run_reconciles_from_its_own_config(tmp_path):
    m = tiny_llama(layers=1, hidden=32, vocab=64)
    run = _deep_run(m, "sdpa", steps=(0, 1))
    back = probe.load(run.save(tmp_path / "run"))
    got = back.flops_reconciled()
    pd.testing.assert_frame_equal(got, reconcile_flops(run, m))
    assert (got["verdict"] == "equal").all()


@pytest.mark.parametrize("arch, name", [("qwen2", "model.layers.0"), ("gpt2", "transformer.h.0")])
def test_architectures_from_config_equal_with_their_biases_explained(arch, name):
    """Architectures built from their config: Qwen2's q/k/v and GPT-2's every projection carry
    biases, which the cost model counts (T·out) and torch's addmm formula does not: they are the
    ``bias`` category of the gap, not a difference."""
    m = tiny_model(arch)
    run = _deep_run(m, "sdpa", prompt=torch.cat([PROMPT, PROMPT + 1]))  # batch 2
    rec = reconcile_flops(run, m)
    assert (rec["verdict"] == "equal").all() and len(rec) == 2 * (len(set(rec["module"])))
    # the biased projections' outputs (GPT-2's Conv1D keeps its weight as [in, out])
    outs = sum(int(mod.weight.shape[0] if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1])
               for mod in m.get_submodule(name).modules()
               # (4.x's GPT2Attention has a "bias" buffer, its causal mask, and no weight)
               if isinstance(getattr(mod, "bias", None), torch.nn.Parameter)
               and isinstance(getattr(mod, "weight", None), torch.nn.Parameter) and mod.weight.dim() == 2)
    assert outs > 0
    layer = rec[rec["module"] == name].set_index("step")
    assert layer.at[0, "bias_flops"] == 2 * 8 * outs and layer.at[2, "bias_flops"] == 2 * 1 * outs
    assert "bias" in layer.at[0, "explained_by"]


def test_mixture_of_experts_fused_banks_counted():
    """transformers 5's fused expert banks run as ``aten._grouped_mm``: the deep pass's formula
    for it makes a Mixtral layer's deep FLOPs the cost model's (each token runs k experts)."""
    m = tiny_model("mixtral")
    rec = reconcile_flops(_deep_run(m, "sdpa"), m)
    assert (rec["verdict"] == "equal").all()


def test_grouped_mm_formula_against_the_products_it_stands_for():
    a, b, offs = torch.randn(6, 8), torch.randn(3, 8, 8), torch.tensor([2, 4, 6], dtype=torch.int32)
    assert grouped_mm_flops(a, b, offs, out_val=torch.empty(6, 8)) == 2 * 6 * 8 * 8  # rows split by offsets
    a, b = torch.randn(3, 4, 8), torch.randn(3, 8, 4)
    assert grouped_mm_flops(a, b, out_val=torch.empty(3, 4, 4)) == 3 * 2 * 4 * 8 * 4  # batched
    a, b = torch.randn(4, 12), torch.randn(12, 4)
    assert grouped_mm_flops(a, b, offs, out_val=torch.empty(3, 4, 4)) == 2 * 4 * 12 * 4  # K split


def test_eager_sliding_window_computes_the_masked_scores():
    """Gemma2's sliding layers (window 16) under eager attention on a 20-token prompt: the eager
    kernel multiplies every (query, key) pair and masks, the cost model counts the window; the
    difference is exactly the masked products. In decode the sliding cache holds the window only."""
    m = tiny_model("gemma2")
    window = m.config.sliding_window
    prompt = torch.arange(3, 23).unsqueeze(0)
    rec = reconcile_flops(_deep_run(m, "eager", prompt=prompt), m).set_index(["step", "module"])
    heads, hd, q = m.config.num_attention_heads, m.config.head_dim, 20
    sliding = [i for i, t in enumerate(m.config.layer_types) if "sliding" in t]
    assert sliding
    for i in range(m.config.num_hidden_layers):
        row = rec.loc[(0, f"model.layers.{i}")]
        want = 4 * heads * q * (q - window) * hd if i in sliding else 0
        assert row["diff_flops"] == want
        assert row["verdict"] == ("equal" if not want else f"differs by {100 * want / row['matrix_flops']:+.1f} %")
        assert rec.loc[(2, f"model.layers.{i}"), "verdict"] == "equal"


def test_bad_input_says_what_to_do():
    m = tiny_llama(layers=1, hidden=32, vocab=64)
    with probe.attach(m) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=r"no deep pass.*deep=True"):
        reconcile_flops(p.run, m)
    run = _deep_run(m, "sdpa", steps=(0,))
    other = tiny_llama(layers=1, hidden=64, vocab=64)
    with pytest.raises(ValueError, match=r"not the one this run recorded.*hidden.*pass the recorded model"):
        reconcile_flops(run, other)
    with pytest.raises(ValueError, match=r"not the one this run recorded.*modules"):
        reconcile_flops(run, tiny_model("gpt2"))
    with pytest.raises(ValueError, match=r"not the one this run recorded"):
        reconcile_flops(run, other.config)
    wider_mlp = {**m.config.to_dict(), "intermediate_size": 96}  # same names and attention dims
    with pytest.raises(ValueError, match=r"not the one this run recorded.*intermediate_size"):
        reconcile_flops(run, wider_mlp)
    with pytest.raises(ValueError, match="by must be"):
        reconcile_flops(run, m, by="op")
    run.meta.pop("config")
    with pytest.raises(ValueError, match="no 'config'.*pass the recorded model"):
        reconcile_flops(run)
    assert (reconcile_flops(run, m)["verdict"] == "equal").all()


def test_a_ledger_without_shapes_costs_batch_times_q_len():
    """A run saved before the ledger kept its calls' input shapes: every call is costed over
    batch × q_len tokens, so in prefill the output head (run on the last position only) is
    costed over the whole prompt, and says so; the layers still reconcile."""
    m = tiny_llama(layers=1, hidden=32, vocab=64)
    run = _deep_run(m, "sdpa", prompt=torch.cat([PROMPT, PROMPT + 1]), steps=(0, 1))
    run.ledger = run.ledger.assign(in_shapes=pd.Series(pd.NA, index=run.ledger.index, dtype="string"))
    rec = reconcile_flops(run, m).set_index(["step", "module"])
    assert rec.loc[(0, "model.layers.0"), "verdict"] == "equal"
    assert rec.loc[(1, "lm_head"), "verdict"] == "equal"
    head = rec.loc[(0, "lm_head")]
    assert head["matrix_flops"] == 8 * head["deep_flops"]  # 8 prompt positions costed, 1 run
    assert head["verdict"] == "differs by -87.5 %"


def test_the_deep_text_says_how_the_flops_reconcile_per_phase():
    """``probe run --deep`` prints, per phase, how many block rows equal the cost model's matrix
    products and how much elementwise work the cost model counts beside them; a run that cannot
    be costed (no config in its meta) prints the rest of the section without that line."""
    from probe.reports.deep_section import deep_lines

    m = tiny_llama(layers=2, hidden=32, vocab=64)
    run = _deep_run(m, "sdpa")
    rec = reconcile_flops(run, m)
    lines = [ln for ln in deep_lines(run) if "FLOPs vs the cost model" in ln]
    assert len(lines) == 2  # prefill, decode
    for phase, line in zip(("prefill", "decode"), lines):
        blocks = rec[(rec["phase"] == phase) & (rec["module"] != STEP)]
        assert f"{len(blocks)} of {len(blocks)} block rows equal its matrix products" in line
        assert "elementwise work" in line
    run.meta = {k: v for k, v in run.meta.items() if k != "config"}
    text = deep_lines(run)
    assert text and not any("FLOPs vs the cost model" in ln for ln in text)
