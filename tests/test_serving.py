"""Continuous batching (transformers' ContinuousBatchingManager) under the probe, on tiny real models."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import probe
from edits import reseal
from probe import compat
from probe.schema import REQUESTS

from tiny import tiny_llama

GAP = compat.continuous_batching_gap()
needs_cb = pytest.mark.skipif(GAP is not None, reason=f"continuous batching not profiled here: {GAP}")

PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14], [1] + list(range(20, 40))]


def _configs(max_new: int = 5, budget: int = 16):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # a small paged cache (CPU sizing from free memory is slow) and a token budget that splits the
    # 21-token prompt into two chunks; no prefix sharing, so every prompt token is computed
    cb = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=budget, page_size=16, allow_block_sharing=False)
    return gen, cb


@pytest.fixture(scope="module")
def served():
    """One recorded generate_batch of three prompts, and the tokens of the same call without the probe."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=32)
    gen, cb = _configs()
    if GAP is not None:
        pytest.skip(GAP)
    ref = model.generate_batch(PROMPTS, generation_config=gen, continuous_batching_config=cb)
    with probe.attach(model) as p:
        out = model.generate_batch(PROMPTS, generation_config=gen, continuous_batching_config=cb,
                                   record_timestamps=True)
    return model, ref, out, p.run, cb


@needs_cb
def test_tokens_identical_and_one_serve_run(served):
    model, ref, out, run, cb = served
    assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in ref.items()}
    assert len(out) == 3 and all(len(v.generated_tokens) == 5 for v in out.values())
    serve = run.runs[run.runs["kind"] == "serve"]
    assert len(serve) == 1 and serve["status"].iloc[0] == "ok"
    assert int(serve["batch"].iloc[0]) == 3
    assert int(serve["prompt_tokens"].iloc[0]) == sum(len(p) for p in PROMPTS)
    assert int(serve["new_tokens"].iloc[0]) == 15
    # nothing of the probe left on the model, and the caller's config object untouched
    assert "init_continuous_batching" not in model.__dict__
    assert cb.use_cuda_graph is None


@needs_cb
def test_steps_composition_from_the_manager(served):
    _, _, _, run, _ = served
    st = run.steps[run.steps["run_id"] == run.runs[run.runs["kind"] == "serve"]["run_id"].iloc[0]]
    assert set(st["phase"]) <= {"prefill", "decode", "mixed"}
    assert "mixed" in set(st["phase"]) and "decode" in set(st["phase"]) and "prefill" in set(st["phase"])
    # the packed forward's tokens are exactly its prefill plus decode tokens, within the budget
    assert (st["prefill_tokens"] + st["decode_tokens"] == st["q_len"]).all()
    assert (st["q_len"] <= 16).all()
    for _, row in st.iterrows():
        lay = json.loads(row["layout"])
        assert len(lay) == row["requests"] == row["batch"]
        assert sum(e[2] for e in lay if e[1] == "prefill") == row["prefill_tokens"]
        assert sum(e[2] for e in lay if e[1] == "decode") == row["decode_tokens"]
        kinds = {e[1] for e in lay}
        expect = "mixed" if kinds == {"prefill", "decode"} else kinds.pop()
        assert row["phase"] == expect
    # every prompt token is prefilled once, over one or more chunks
    per_req: dict[str, int] = {}
    for js in st["layout"]:
        for rid, kind, n, _cached, _chunk, _sampled in json.loads(js):
            if kind == "prefill":
                per_req[rid] = per_req.get(rid, 0) + n
    assert sorted(per_req.values()) == sorted(len(p) for p in PROMPTS)
    assert st["prefill_chunk"].max() >= 1  # the 21-token prompt did not fit one 16-token forward
    # tokens sampled per step = requests whose prompt is complete; 15 in all
    assert int(st["new_tokens"].sum()) == 15
    # paged cache in use, and the manager's own work between forwards, measured
    assert (st["paged_cache_bytes"] > 0).all()
    for col in ("schedule_ms", "cache_ms", "sample_ms", "update_ms"):
        assert (st[col] >= 0).all() and st[col].notna().all(), col
    # per phase, the tokens a packed forward processed
    ps = run.phase_summary().set_index("phase")
    assert int(ps["tokens"].sum()) == int(st["q_len"].sum())
    # block records carry the step's phase
    calls = run.calls[run.calls["run_id"].isin(st["run_id"])]
    assert set(calls["phase"]) == set(st["phase"])


@needs_cb
def test_requests_frame_agrees_with_record_timestamps(served):
    """TTFT and ITL from the probe's clock and from transformers' record_timestamps, same events (how closely
    the two clocks agree is measured, not asserted)."""
    _, _, out, run, _ = served
    rq = run.requests
    assert list(rq.columns[: len(REQUESTS)]) == list(REQUESTS)
    assert sorted(rq["request_id"]) == sorted(out)
    assert (rq["status"] == "ok").all()
    assert (rq["generated_tokens"] == 5).all()
    assert sorted(rq["prompt_tokens"]) == sorted(len(p) for p in PROMPTS)
    for _, r in rq.iterrows():
        # two clocks on the same events: both stamped every request. How closely they agree is
        # measured (the OS descheduling the serving thread between the stamps widens it on a busy
        # machine), so it is not asserted here
        assert r["tf_ttft_ms"] > 0 and r["ttft_ms"] > 0
        assert r["tf_itl_ms_mean"] > 0 and r["itl_ms_mean"] > 0
        # times in order: arrival <= scheduled <= first token <= finished
        assert r["arrival_ms"] <= r["scheduled_ms"] <= r["first_token_ms"] <= r["finished_ms"]
        assert math.isclose(r["queue_ms"], r["scheduled_ms"] - r["arrival_ms"], abs_tol=1e-6)
        assert math.isclose(r["e2e_ms"], r["finished_ms"] - r["arrival_ms"], abs_tol=1e-6)
        # TTFT counts from the request's arrival, not from when the scheduler took it
        assert math.isclose(r["ttft_ms"], r["first_token_ms"] - r["arrival_ms"], abs_tol=1e-6)
        assert r["itl_ms_p50"] <= r["itl_ms_p90"]
        assert r["first_step"] <= r["last_step"]
    long = rq[rq["prompt_tokens"] == 21].iloc[0]
    assert long["prefill_chunks"] >= 2  # 21 prompt tokens never fit one 16-token forward


@needs_cb
def test_queue_ends_at_the_pass_of_the_first_prefill_chunk(served):
    """queue_ms is arrival to the scheduling pass that took the request's first prefill chunk; a
    prompt split into chunks waits through the later passes inside TTFT - queue, up to the forward
    of its last chunk (how a queue far shorter than TTFT reads)."""
    _, _, _, run, _ = served
    st = run.steps[run.steps["requests"].notna()].set_index("step")
    chunk_steps: dict[str, list[int]] = {}
    for step, lay in st["layout"].items():
        for rid, kind, *_ in json.loads(lay):
            if kind == "prefill":
                chunk_steps.setdefault(rid, []).append(step)
    for _, r in run.requests.iterrows():
        steps = chunk_steps[r["request_id"]]
        first, last = steps[0], steps[-1]
        assert r["first_step"] == first and r["prefill_chunks"] == len(steps)
        # scheduled in the pass before its first chunk's forward, after the previous forward ended
        start = st.loc[first, "start_ms"]
        assert r["scheduled_ms"] <= start
        if first - 1 in st.index:
            assert r["scheduled_ms"] >= st.loc[first - 1, "start_ms"] + st.loc[first - 1, "forward_ms"]
        # the first token follows the forward of its last chunk
        assert r["first_token_ms"] >= st.loc[last, "start_ms"] + st.loc[last, "forward_ms"]
    long = run.requests[run.requests["prompt_tokens"] == 21].iloc[0]
    steps = chunk_steps[long["request_id"]]
    assert len(steps) >= 2  # TTFT - queue holds both chunk forwards
    spanned = sum(st.loc[k, "forward_ms"] for k in range(steps[0], steps[-1] + 1))
    assert long["ttft_ms"] - long["queue_ms"] >= spanned


@needs_cb
def test_save_load_roundtrip_with_requests(served, tmp_path):
    _, _, _, run, _ = served
    run.save(tmp_path / "r")
    back = probe.load(tmp_path / "r")
    pd.testing.assert_frame_equal(back.requests, run.requests)
    pd.testing.assert_frame_equal(back.steps, run.steps)
    assert back.meta["serving"]["cuda_graphs"].startswith("off")


def test_older_run_without_requests_loads_empty(tmp_path):
    model = tiny_llama(layers=1, hidden=32)
    with probe.attach(model) as p:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    d = p.run.save(tmp_path / "old")
    (d / "requests.parquet").unlink()
    reseal(d, forget=("requests.parquet",))  # as a run saved before the frame existed
    back = probe.load(d)
    assert back.requests.empty and list(back.requests.columns) == list(REQUESTS)
    assert back.steps["requests"].isna().all()


@needs_cb
def test_manager_api_cancelled_and_failed_requests_keep_rows():
    """A cancelled request and a failed one keep their rows with a status; nothing stays on the manager."""
    model = tiny_llama(layers=2, hidden=32)
    gen, cb = _configs(max_new=4, budget=32)
    with probe.attach(model) as p:
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        assert manager.continuous_batching_config.use_cuda_graph == (False, False)
        ok = manager.add_request([1, 5, 6, 7], request_id="ok", max_new_tokens=4)
        gone = manager.add_request([1, 8, 9], request_id="gone", max_new_tokens=4)
        manager.cancel_request(gone)  # before the loop starts: dropped at its first pass
        bad = manager.add_request([1, 2, 3], request_id="bad", max_new_tokens=4, no_such_processor_arg=1)
        manager.start()
        results = {}
        while len(results) < 2:
            r = manager.get_result(timeout=10)
            assert r is not None, "the manager stopped delivering"
            results[r.request_id] = r
        bp = manager.batch_processor
        manager.stop(block=True, timeout=10)
        objs = [manager, manager.output_router, bp, bp.scheduler, bp.inputs_and_outputs]
        for obj in objs:
            left = [k for k, v in vars(obj).items() if getattr(v, "__probe_wrapper__", False)]
            assert not left, (type(obj).__name__, left)
    rq = p.run.requests.set_index("request_id")
    assert rq.loc[ok, "status"] == "ok" and rq.loc[ok, "generated_tokens"] == 4
    assert rq.loc[gone, "status"] == "cancelled" and rq.loc[gone, "generated_tokens"] == 0
    assert rq.loc[bad, "status"].startswith("failed: ") and "no_such_processor_arg" in rq.loc[bad, "status"]
    assert results[bad].error is not None
    assert p.run.runs["kind"].tolist() == ["serve"]


@needs_cb
def test_cuda_graphs_option_is_stated():
    model = tiny_llama(layers=1, hidden=32)
    gen, cb = _configs(max_new=2)
    with probe.attach(model, cuda_graphs=True) as p:
        model.generate_batch([[1, 2, 3]], generation_config=gen, continuous_batching_config=cb)
    assert p.run.meta["serving"]["cuda_graphs"].startswith("kept")
    with probe.attach(model) as p:
        model.generate_batch([[1, 2, 3]], generation_config=gen, continuous_batching_config=cb)
    assert p.run.meta["serving"]["cuda_graphs"].startswith("off")
    kw = json.loads(p.run.runs["generate_kwargs"].iloc[0])
    assert kw["use_cuda_graph"] == [False, False]


def test_version_gate_names_what_is_needed():
    gap = compat.continuous_batching_gap()
    if compat.has_cb_timestamps():
        assert gap is None
    else:
        assert gap is not None and "transformers>=5" in gap


@pytest.mark.skipif(GAP is None, reason="continuous batching is profiled on this transformers")
def test_unsupported_version_warns_and_keeps_tokens():
    """Where the manager's layout is missing (transformers 4.57), a clear warning naming what to
    install; the forwards are still recorded as plain forwards and the tokens do not change."""
    from transformers import GenerationConfig

    model = tiny_llama(layers=1, hidden=32)
    gen = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generation_config = gen
    ref = model.generate_batch([[1, 2, 3]], generation_config=gen)
    with probe.attach(model) as p:
        with pytest.warns(probe.ServingWarning, match="transformers>=5"):
            out = model.generate_batch([[1, 2, 3]], generation_config=gen)
    assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in ref.items()}
    assert "serve" not in set(p.run.runs["kind"]) and p.run.requests.empty


@needs_cb
def test_mixed_step_time_apportioned_to_prefill_and_decode(served):
    """Every call's prefill and decode parts add up to its measured time; pure steps stay whole;
    a mixed step's decode tokens get a part, its prefill tokens the rest."""
    from probe.analysis.apportion import APPORTION, step_split

    _, _, _, run, _ = served
    a = run.apportion()
    assert list(a.columns) == list(APPORTION)
    assert len(a) == len(run.calls)
    assert ((a["prefill_ms"] + a["decode_ms"] - a["measured_ms"]).abs() < 1e-9).all()
    assert a["prefill_share"].between(0, 1).all()
    assert (a.loc[a["phase"] == "prefill", "prefill_share"] == 1).all()
    assert (a.loc[a["phase"] == "decode", "prefill_share"] == 0).all()
    mixed = a[a["phase"] == "mixed"]
    assert not mixed.empty and set(mixed["method"]) <= {"fitted line", "work share"}
    layers = mixed[mixed["role"] == "layer"]
    assert (layers["work_prefill"] > 0).all() and (layers["work_decode"] > 0).all()
    assert ((layers["prefill_share"] > 0) & (layers["prefill_share"] < 1)).all()
    # fitted on this run's pure steps: a line for every block of the model
    assert (mixed["method"] == "fitted line").all() and mixed["predicted_ms"].gt(0).all()
    per_step = step_split(a)
    st = run.steps.set_index(["run_id", "step"])
    for _, r in per_step.iterrows():
        assert math.isclose(r["measured_ms"], st.loc[(r["run_id"], r["step"]), "blocks_ms"], rel_tol=1e-9)
