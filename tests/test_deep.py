"""Deep runs (``probe.attach(model, deep=...)``, ``probe.profile(deep=...)``): every op and tensor
storage of sampled steps, checked against independent instruments on the bundled tiny model."""

from __future__ import annotations

import functools
import weakref

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import probe
from probe.analysis.ops import DISPATCH, memory_ledger
from probe.recording.deep import DeepPlan, plan_of
from probe.recording.deep_twin import TWIN_AFTER
from probe.recording.deep_calls import replayable, template
from probe.recording.deep_ops import sdpa_cpu_flops

from tiny import generate_probed, tiny_llama

aten = torch.ops.aten
PROMPT = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8]])


def _model(attn: str = "sdpa"):
    m = tiny_llama(layers=2, hidden=32, vocab=64)
    m.config._attn_implementation = attn
    return m


def test_flops_per_module_equal_flop_counter_mode_with_eager_attention():
    m = _model("eager")
    with probe.attach(m, deep=[0]) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    ledger = p.run.ledger
    pre = ledger[ledger["step"] == 0]
    assert len(pre) > 10 and (pre["phase"] == "prefill").all()
    # the same forward as generate's prefill step (its cache, logits at the last position only)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(PROMPT, use_cache=True, logits_to_keep=1)
    counts = {name: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    root = type(m).__name__
    assert int(pre.loc[pre["module"].isna(), "flops"].iloc[0]) == counts["Global"] > 0
    checked = 0
    for row in pre.dropna(subset=["module"]).itertuples():
        if row.module.endswith(".attention_fn"):
            # the attention function, a call of its own: its module's FLOPs less its projections'
            parent = f"{root}.{row.module.rsplit('.', 1)[0]}"
            want = counts[parent] - sum(v for k, v in counts.items() if k.startswith(parent + "."))
            assert want > 0
        else:
            want = counts.get(f"{root}.{row.module}", 0)
        assert int(row.flops) == want, row.module
        checked += want > 0
    assert checked >= 2 * 8 + 1  # every projection and attention function of both layers, and lm_head


def test_sdpa_cpu_formula_on_its_own():
    b, hq, hkv, sq, sk, d = 2, 4, 2, 5, 9, 8
    q, k, v = torch.zeros(b, hq, sq, d), torch.zeros(b, hkv, sk, d), torch.zeros(b, hkv, sk, d)
    want = 2 * b * hq * sq * sk * d * 2  # scores and the weighted sum
    assert sdpa_cpu_flops(q, k, v) == want
    # the same count torch.utils.flop_counter registers for the CUDA flash kernel
    assert flop_registry[aten._scaled_dot_product_flash_attention](q, k, v, out_val=None) == want
    assert aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry


def test_sdpa_op_recorded_with_its_flops():
    m = _model("sdpa")
    with probe.attach(m, deep=[0, 1]) as p:
        m.generate(PROMPT, max_new_tokens=3, do_sample=False)
    ops = p.run.ops
    sd = ops[ops["op"] == "aten._scaled_dot_product_flash_attention_for_cpu.default"]
    assert len(sd) == 4  # two layers, two sampled steps
    # inside the attention function, named as the probe names it at depth sublayers
    assert sd["module"].str.endswith(".self_attn.attention_fn").all()
    assert not any(isinstance(v, functools.partial) for v in _attention_registry())  # put back after the step
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for row in sd.itertuples():
        want = 2 * 2 * cfg.num_attention_heads * row.q_len * (row.kv_len + row.q_len) * hd
        assert int(row.flops) == want
    # linear arrives as the overloads it dispatches to
    proj = ops[ops["module"] == "model.layers.0.self_attn.q_proj"]
    assert set(proj["op"]) >= {"aten.t.default", "aten.mm.default"}


def test_kv_cache_growth_and_weights_exact():
    m = _model()
    steps = [0, 1, 2, 5]
    with probe.attach(m, deep=steps) as p:
        m.generate(PROMPT, max_new_tokens=7, do_sample=False)
    ledger = p.run.ledger
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_token_layer = 2 * cfg.num_key_value_heads * hd * 4  # keys and values, float32
    assert sorted(ledger["step"].unique()) == steps
    for step, grp in ledger.groupby("step"):
        total = int(grp["kv_len"].iloc[0] + grp["q_len"].iloc[0])
        assert int(grp.loc[grp["module"].isna(), "kv_cache_bytes"].iloc[0]) == cfg.num_hidden_layers * total * per_token_layer
        for i in range(cfg.num_hidden_layers):  # each layer's cache is made anew in its attention
            row = grp[grp["module"] == f"model.layers.{i}"].iloc[0]
            assert int(row["kv_cache_bytes"]) == total * per_token_layer
            assert int(grp.loc[grp["module"] == f"model.layers.{i}.self_attn", "kv_cache_bytes"].iloc[0]) == \
                total * per_token_layer
    named = dict(m.named_modules())
    for row in ledger[ledger["step"] == 0].itertuples():
        if isinstance(row.module, str) and row.module.endswith(".attention_fn"):
            assert row.weights_bytes == 0  # a function: no parameters of its own
            continue
        mod = named[row.module if isinstance(row.module, str) else ""]
        assert row.weights_bytes == sum(t.numel() * t.element_size() for t in mod.parameters()), row.module
    # the live bytes after each op reach the step's peak
    ops = p.run.ops
    for step, grp in ledger[ledger["module"].isna()].groupby("step"):
        assert int(ops.loc[ops["step"] == step, "live_bytes"].max()) == int(grp["peak_added_bytes"].iloc[0])
    # every storage made is one row of allocations; temporaries are those freed inside the call
    alloc = p.run.allocations
    for step, grp in ledger[ledger["module"].isna()].groupby("step"):
        a = alloc[alloc["step"] == step]
        assert int(a["bytes"].sum()) == int(p.run.ops.loc[p.run.ops["step"] == step, "alloc_bytes"].sum())
        assert int(a.loc[a["kv_cache"], "bytes"].sum()) == int(grp["kv_cache_bytes"].iloc[0])


def test_deep_runs_leave_outputs_unchanged_and_timings_alone(tmp_path):
    m = _model()
    p = generate_probed(m, PROMPT, seed=3, attach={"deep": True}, max_new_tokens=TWIN_AFTER + 3, do_sample=True,
                        top_k=20)
    run = p.run
    assert list(run.runs["kind"]) == ["deep"]
    assert run.runs[["ttft_ms", "tpot_ms_mean", "decode_tok_s"]].isna().all().all()
    assert run.calls.empty and run.steps.empty and run.sampling.empty  # in no timing figure
    assert run.headline().empty
    assert sorted(run.ops["step"].unique()) == [0, 1]  # prefill + a decode step with its twin TWIN_AFTER on
    assert not torch.nn.modules.module._global_forward_hooks  # the op-attribution hooks are gone
    assert not torch.nn.modules.module._global_forward_pre_hooks
    # saved and loaded back equal, and valid
    saved = run.save(tmp_path / "run")
    back = probe.load(saved)
    for name in ("ops", "ledger", "allocations", "runs"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(run, name), check_like=False)
    from probe.analysis.run import verify

    assert verify(saved) == []


def _overload(name: str):
    """``aten.mm.default`` -> ``torch.ops.aten.mm.default``."""
    _, packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


def test_op_call_costs_are_calibrated_per_overload_and_taken_out():
    m = _model()
    with probe.attach(m, deep=[0, 1]) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    deep = p.run.meta["deep"]
    cost = deep["op_call_us"]
    ops = p.run.ops
    # every overload of the steps that writes no argument and draws no random numbers was replayed
    seen = {op for op in ops["op"].unique() if replayable(_overload(op))}
    assert {"aten.mm.default", "aten.view.default", "aten.mul.Tensor"} <= seen
    assert set(cost) == seen
    assert all(v >= 0 for v in cost.values()) and deep["op_floor_us"] > 0
    assert (ops["host_ms"] >= 0).all() and ops["host_ms"].sum() > 0


def test_no_calibration_beside_a_running_profiler():
    m = _model()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with probe.attach(m, deep=[0]) as p:
            m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    # two profilers cannot run at once: nothing replayed, the user's profiler undisturbed
    assert p.run.meta["deep"]["op_call_us"] == {}
    assert (p.run.ops["host_ms"] >= 0).all()
    assert any(e.key == "aten::mm" for e in prof.key_averages())


def test_a_users_dispatch_mode_sees_only_the_models_own_ops():
    """A user's FlopCounterMode around a deep generate counts what it counts without the probe:
    no replay and no warming op of the probe's reaches it (and nothing is calibrated)."""
    m = _model()
    with FlopCounterMode(display=False) as plain:
        want = m.generate(PROMPT, max_new_tokens=3, do_sample=False)
    with probe.attach(m, deep=[0, 2]) as p:
        with FlopCounterMode(display=False) as under:
            got = m.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert torch.equal(want, got)
    assert under.get_total_flops() == plain.get_total_flops() > 0
    assert p.run.meta["deep"]["op_call_us"] == {} and len(p.run.ops) > 0


def test_replayed_overloads_and_their_kept_arguments():
    assert replayable(aten.mm.default) and replayable(aten.view.default)
    assert not replayable(aten.add_.Tensor)  # writes to an argument
    assert not replayable(aten.bernoulli.default)  # draws random numbers
    # asserts (a zero tensor fails them: on CUDA a sticky device error) and other namespaces
    # (collectives would talk to other ranks; a custom kernel's schema may not say what it writes)
    assert not replayable(aten._assert_async.default) and not replayable(aten._assert_async.msg)
    assert not replayable(torch.ops._c10d_functional.all_reduce.default)
    t = torch.zeros(4, 3)
    kept = template(((t.t(), [t, 2]), {"x": t}))
    ref = weakref.ref(t)
    del t
    assert ref() is None  # only weak references: the ledger's frees are unchanged
    assert kept[0][0].size == (3, 4) and kept[0][0].stride == (1, 3)


def test_profile_deep_pass_after_the_timed_calls():
    m = _model()
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 6, "do_sample": False}, repeat=2, deep=2)
    kinds = list(run.runs["kind"])
    # the last: one token of the same inputs, whose prefill times the deep prefill's ops (untimed too)
    assert kinds == ["generate", "generate", "deep", "deep twin"]
    deep_id = run.runs.loc[run.runs["kind"] == "deep", "run_id"].iloc[0]
    twin_id = run.runs.loc[run.runs["kind"] == "deep twin", "run_id"].iloc[0]
    for untimed in (deep_id, twin_id):
        assert untimed not in set(run.steps["run_id"]) and untimed not in set(run.calls["run_id"])
    assert set(run.ops["run_id"]) == {deep_id}
    assert len(run.headline_spread()) and int(run.headline_spread()["generates"].max()) == 2
    summ = run.op_summary()
    disp = summ[summ["op"] == DISPATCH]
    layer = disp[(disp["block"] == "model.layers.0") & (disp["phase"] == "decode")]
    assert len(layer) == 1 and layer["block_ms"].notna().all()  # timed steps of the same shapes exist
    # the ops and the dispatch row make up the block's timed time
    part = summ[(summ["block"] == "model.layers.0") & (summ["phase"] == "decode")]
    assert part["host_ms"].sum() == pytest.approx(float(layer["block_ms"].iloc[0]))
    ledger = memory_ledger(run.ledger, run.ops)
    assert {"(step)", "model.layers.0", "lm_head"} <= set(ledger["block"])


@pytest.mark.parametrize("bad", ["yes", -1, 1.5, [1, "2"], [-3], []])
def test_bad_deep_value_is_refused_before_attaching(bad):
    m = _model()
    with pytest.raises(ValueError, match="deep must be|deep="):
        probe.attach(m, deep=bad)
    assert probe.probe_of(m) is None
    with pytest.raises(ValueError):
        probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 2}, deep=bad)


def test_plan_spreads_decode_samples_within_stride_and_max_steps():
    assert plan_of(True) == DeepPlan()
    assert plan_of(False) is None and plan_of(None) is None
    # each decode sample is timed on a step TWIN_AFTER after it: never on the last TWIN_AFTER
    # steps, never on a step up to another sample's twin
    after = TWIN_AFTER
    assert after >= 1
    full = sorted(DeepPlan().chosen(256))  # steps 0-255
    # the first decode step, the last with a twin (step 255), and one halfway between
    assert full == [0, 1, 1 + round((254 - after) / 2), 255 - after]
    assert all(b - a > after for a, b in zip(full[1:], full[2:]))
    # the second sample would be on or before the first's twin: left out; the third is the last
    # step with a twin
    assert DeepPlan().chosen(2 * after + 4) == {0, 1, after + 3}
    assert DeepPlan().chosen(after + 4) == DeepPlan().chosen(after + 2) == {0, 1}
    # too short for a twin inside the run: the decode samples spread over all of it (each timed
    # on the run again, DeepObserver.twin_rerun, or on the dispatch mode's clock)
    assert DeepPlan().chosen(after + 1) == {0, 1, 1 + round((after - 1) / 2), after}
    assert DeepPlan().chosen(3) == {0, 1, 2} and DeepPlan().chosen(2) == DeepPlan(decode=1).chosen(4) == {0, 1}
    assert DeepPlan().chosen(8, decode_stride=3) == {0, 1, 4, 7}
    assert DeepPlan().chosen(1) == {0}
    assert DeepPlan(decode=0).chosen(256) == {0}
    strided = sorted(DeepPlan().chosen(256, decode_stride=4))
    assert len(strided) == 4 and all((s - 1) % 4 == 0 for s in strided[1:])
    assert all(s <= f and f - s < 4 for s, f in zip(strided, full))
    assert DeepPlan().chosen(256, max_steps=100) == {s for s in full if s < 100} == {0, 1}
    assert DeepPlan(steps=frozenset({3, 7})).chosen(5) == {3, 7}


def test_attention_module_opened_down_to_its_own_ops_in_the_text():
    from reports.deep_section import deep_lines

    m = _model()
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 4, "do_sample": False}, deep=1)
    own = run.op_summary(by="module")
    attn = own[own["block"] == "model.layers.0.self_attn"]
    fn = own[own["block"] == "model.layers.0.self_attn.attention_fn"]
    # the attention module's own code: the cache update and RoPE, its projections and its function apart
    assert "aten.cat.default" in set(attn["op"]) and "aten.mm.default" not in set(attn["op"])
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in set(fn["op"])
    text = "\n".join(deep_lines(run))
    for want in ("prefill", "decode", "model.layers.* (mean of 2)", "dispatch and Python",
                 "model.layers.*.self_attn (mean of 2): its own ops", "model.layers.*.self_attn.attention_fn (mean of 2): the function",
                 "memory: weights"):
        assert want in text
    with pytest.raises(ValueError, match="by must be"):
        run.op_summary(by="op")


def test_runs_without_a_deep_pass_keep_their_files_and_csv_exports_the_deep_frames(tmp_path):
    from reports.csv_export import read_csv, write_csv

    m = _model()
    with probe.attach(m) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    plain = p.run.save(tmp_path / "plain")
    assert not any((plain / f).exists() for f in ("ops.parquet", "ledger.parquet", "allocations.parquet"))
    assert probe.load(plain).ops.empty
    with probe.attach(m, deep=[1]) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    paths = {x.name: x for x in write_csv(p.run, tmp_path / "csv")}
    assert {"ops.csv", "ledger.csv", "allocations.csv"} <= set(paths)
    pd.testing.assert_frame_equal(read_csv(paths["ops.csv"]), p.run.ops)


def _attention_registry() -> list:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return [*AttentionInterface._global_mapping.values(), *ALL_ATTENTION_FUNCTIONS._local_mapping.values()]


def test_deep_pass_beside_a_probe_that_records_the_attention_function():
    m = _model()
    with probe.attach(m, depth="sublayers", deep=[1]) as p:
        m.generate(PROMPT, max_new_tokens=3, do_sample=False)
    ops = p.run.ops
    assert (ops.loc[ops["op"].str.contains("scaled_dot_product"), "module"]
            .str.endswith(".self_attn.attention_fn").all())
    assert not any(isinstance(v, functools.partial) for v in _attention_registry())  # every wrapper gone


def test_report_has_the_inside_each_block_section_only_with_a_deep_pass():
    from reports.html import render_report

    m = _model()
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 3, "do_sample": False}, deep=[0, 2])
    page = render_report(run)
    for want in ('id="deep"', 'href="#deep"', 'id="deep-ops-prefill"', 'id="deep-ops-decode"', 'id="deep-ledger"',
                 'id="fig-deep-live-prefill"', 'id="fig-deep-live-decode"', "(dispatch and Python)"):
        assert want in page
    plain = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 3, "do_sample": False})
    assert 'id="deep"' not in render_report(plain)


def test_dashboard_inside_each_block_view(tmp_path):
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    m = _model()
    probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 3, "do_sample": False}, deep=True).save(tmp_path / "deep")
    probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 3, "do_sample": False}).save(tmp_path / "plain")
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(tmp_path)
    at.run()
    at.sidebar.multiselect(key="runs").set_value(["deep"]).run()
    at.sidebar.radio(key="view").set_value("Inside each block").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.dataframe) == 3  # prefill ops, decode ops, the ledger
    assert len(at.get("plotly_chart")) == 2  # live bytes, a figure per phase
    folded = at.dataframe[0].value
    assert (folded["block"] == "model.layers.*").any() and (folded["layers"] > 1).any()
    at.checkbox(key="deep_each").check().run()
    each = at.dataframe[0].value
    assert not (each["block"] == "model.layers.*").any() and len(each) > len(folded)
    at.radio(key="deep_by").set_value("module").run()
    assert not at.exception, [e.value for e in at.exception]
    at.sidebar.multiselect(key="runs").set_value(["plain"]).run()
    assert not at.exception and any("deep pass" in i.value for i in at.info)


@pytest.mark.parametrize("bad", ["abc", "-2", "1,x"])
def test_cli_bad_deep_value_fails_before_loading(tmp_path, capsys, bad):
    from probe.cli import main

    code = main(["run", "--preset", "tiny", "--deep", bad, "--out", str(tmp_path / "r"), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "--deep takes" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_chrome_trace_opens_the_sampled_steps_down_to_their_ops():
    import json as _json

    from reports.trace import build_trace

    m = _model()
    run = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 3, "do_sample": False}, deep=[0, 2])
    trace = build_trace(run)
    _json.dumps(trace, allow_nan=False)  # writable as the export writes it
    names = [e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"]
    assert sum("deep pass" in n and "not timed" in n for n in names) == 2
    ops = [e for e in trace["traceEvents"] if e.get("cat") == "op"]
    mods = [e for e in trace["traceEvents"] if e.get("cat") == "module"]
    assert len(ops) == len(run.ops) and len(mods) == len(run.ledger)
    # an op lies inside the span of the module call it is attributed to: the first SDPA in layer 0's function
    span = {(e["pid"], e["name"]): (e["ts"], e["ts"] + e["dur"]) for e in mods}
    first = next(e for e in ops if "scaled_dot_product" in e["name"])
    lo, hi = span[(first["pid"], "model.layers.0.self_attn.attention_fn")]
    assert lo <= first["ts"] and first["ts"] + first["dur"] <= hi + 1e-3


def test_folded_layers_are_the_mean_over_every_layer_and_top_is_taken_after_folding():
    """An op only some layers run counts as 0 in the others; the block's time is the mean of the
    layers' own; ``top`` picks from the folded rows (a per-layer top would mix different ops)."""
    import pandas as pd

    from reports.deep_section import folded

    rows = pd.DataFrame({
        "phase": ["decode"] * 6,
        "block": ["model.layers.0"] * 3 + ["model.layers.1"] * 2 + ["lm_head"],
        "op": ["aten.mm.default", "aten.view.default", "(dispatch and Python)",
               "aten.mm.default", "(dispatch and Python)", "aten.mm.default"],
        "calls": [7.0, 2.0, float("nan"), 7.0, float("nan"), 1.0],
        "host_ms": [2.0, 1.0, 0.5, 4.0, 0.25, 8.0],
        "flops": [10.0, 0.0, 0.0, 10.0, 0.0, 5.0],
        "block_ms": [3.5, 3.5, 3.5, 4.25, 4.25, 8.0],
    })
    out = folded(rows, ["calls", "host_ms", "flops", "block_ms"], ["op"])
    layers = out[out["block"] == "model.layers.*"].set_index("op")
    assert (layers["layers"] == 2).all()
    assert layers.loc["aten.mm.default", "host_ms"] == 3.0 and layers.loc["aten.view.default", "host_ms"] == 0.5
    assert layers.loc["aten.view.default", "calls"] == 1.0 and (layers["block_ms"] == 3.875).all()
    top = folded(rows, ["calls", "host_ms", "flops", "block_ms"], ["op"], top=1)
    kept = top[top["block"] == "model.layers.*"]["op"].tolist()
    assert kept == ["aten.mm.default", "(dispatch and Python)"]  # the dispatch row stays, last
    assert top[top["block"] == "lm_head"]["layers"].tolist() == [1]


def test_tied_weights_are_said_shared_in_each_block_and_counted_once_in_the_step():
    """An embedding tied to lm_head: each block's ledger row shows the tensor in full and says how
    much of it is shared (and with whom, in the text); the (step) row counts it once."""
    from probe.models import load_bundled
    from reports.deep_section import deep_lines

    m, _ = load_bundled(num_hidden_layers=2, tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    run = probe.profile(m, PROMPT[:, :4], generate_kwargs={"max_new_tokens": 2, "do_sample": False}, deep=[0])
    tied = run.meta["deep"]["tied_weights"]
    size = m.lm_head.weight.numel() * m.lm_head.weight.element_size()
    assert tied["lm_head"] == {"bytes": size, "with": ["model.embed_tokens"]}
    assert tied["model.embed_tokens"]["with"] == ["lm_head"] and "model.layers.0" not in tied
    ledger = memory_ledger(run.ledger, run.ops, tied).set_index("block")
    for block in ("model.embed_tokens", "lm_head"):
        assert ledger.loc[block, "weights_bytes"] == ledger.loc[block, "shared_weights_bytes"] == size
    assert ledger.loc["model.layers.0", "shared_weights_bytes"] == 0 and ledger.loc["(step)", "shared_weights_bytes"] == 0
    assert ledger.loc["(step)", "weights_bytes"] == sum(p.numel() * p.element_size() for p in m.parameters())
    text = "\n".join(deep_lines(run))
    assert "shared with lm_head" in text and "shared with model.embed_tokens" in text
    # without the meta (an older run): no share known, 0
    assert (memory_ledger(run.ledger, run.ops)["shared_weights_bytes"] == 0).all()


def test_deep_pass_alone_says_why_dispatch_and_python_is_unknown():
    """attach(deep=...) alone makes every generate call deep: no timed step to subtract the ops
    from. The NaN stays NaN in the frame and is said in words in the text and the report."""
    from probe.analysis.ops import dispatch_unknown
    from reports.deep_section import deep_lines
    from reports.html import render_report

    m = _model()
    with probe.attach(m, deep=[0, 1]) as p:
        m.generate(PROMPT, max_new_tokens=2, do_sample=False)
    run = p.run
    summ = run.op_summary()
    assert summ.loc[summ["op"] == DISPATCH, "host_ms"].isna().all()
    why = dispatch_unknown(summ)
    assert why.startswith("dispatch and Python is unknown for every block") and "probe run --deep" in why
    text = "\n".join(deep_lines(run))
    assert "dispatch and Python unknown" in text and "a deep pass alone" in text
    assert 'id="deep-dispatch-unknown"' in render_report(run)
    timed = probe.profile(m, PROMPT, generate_kwargs={"max_new_tokens": 2, "do_sample": False}, deep=[0, 1])
    assert dispatch_unknown(timed.op_summary()) is None


def test_steplog_reads_what_runs_now_from_its_open_calls_and_hands_peaks_outwards():
    """where() (innermost module and block) through a foreign module's call, each call's depth, and
    a peak reached inside a call counted in every call enclosing it, on exit and on close."""
    from probe.recording.deep_ops import StepLog

    log = StepLog({}, frozenset({1}))
    assert log.where() == (0, -1)  # the model's own forward
    log.enter_code(1)  # a block
    log.enter_code(None)  # a module outside the model: what runs stays the block's
    assert log.where() == (1, 1)
    log.enter_code(2)  # a module inside the block
    assert log.where() == (2, 1)
    log._grow(100)
    log.exit()  # module 2 returns: its peak is the block's too
    root, block, inner = log.calls
    assert (block[0], block[1], inner[0], inner[1]) == (1, 1, 2, 2)
    assert inner[5] == 100 and block[5] == 100 and root[5] == 0
    log.exit()  # the foreign module
    assert log.where() == (1, 1)
    log._grow(50)
    log.close({})  # the block is still open: closed here, its peak handed to the step
    assert block[5] == 150 and root[5] == 150 and block[3] is not None and log.where() == (0, -1)
