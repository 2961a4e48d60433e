"""Every generation mode: phases, steps, shapes and unchanged outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import TextStreamer

import probe
from probe.compat import cache_kwarg, new_dynamic_cache
from probe.models import load_bundled
from tiny import tiny_llama


def _ids(n=6, batch=1, seed=0, vocab=120):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _record(model, *args, **kwargs):
    """generate() without and with the probe; returns (reference, output, run)."""
    seed = kwargs.pop("_seed", 0)
    torch.manual_seed(seed)
    ref = model.generate(*args, **kwargs)
    with probe.attach(model) as p:
        torch.manual_seed(seed)
        out = model.generate(*args, **kwargs)
    return ref, out, p.run


def _sequences(x):
    return x if isinstance(x, torch.Tensor) else x.sequences


def test_beam_search_batches_beams():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(6, batch=2), max_new_tokens=4, num_beams=3, do_sample=False)
    assert torch.equal(ref, out)
    st = run.steps
    assert list(st["phase"]) == ["prefill", "decode", "decode", "decode"]
    assert (st["batch"] == 6).all()  # batch x beams rows per forward
    layer = run.calls[(run.calls["role"] == "layer") & (run.calls["step"] == 1)].iloc[0]
    assert json.loads(layer["in_shapes"])[0] == [6, 1, model.config.hidden_size]
    r = run.runs.iloc[0]
    assert r["num_beams"] == 3 and r["batch"] == 2  # the user's sequences; beams are steps.batch
    # decode throughput counts the delivered sequences, not the beam rows
    later = st.iloc[1:]
    expected = 2 * later["new_tokens"].sum() / (later["latency_ms"].sum() / 1e3)
    assert r["decode_tok_s"] == pytest.approx(expected, rel=1e-9)
    assert r["prefill_tok_s"] == pytest.approx(2 * 6 / (st.iloc[0]["latency_ms"] / 1e3), rel=1e-9)


def test_assisted_decoding_steps_are_labelled_extend():
    model = tiny_llama(layers=2)
    assistant = tiny_llama(layers=1, seed=1)
    ref, out, run = _record(model, _ids(6), max_new_tokens=6, assistant_model=assistant, do_sample=False)
    assert torch.equal(ref, out)
    st = run.steps
    assert st.iloc[0]["phase"] == "prefill"
    multi = st[st["q_len"] > 1].iloc[1:]
    assert len(multi) >= 1 and set(multi["phase"]) == {"extend"}
    assert st["new_tokens"].sum() == run.runs.iloc[0]["new_tokens"] == out.shape[-1] - 6
    assert json.loads(run.runs.iloc[0]["generate_kwargs"])["assisted"] is True
    # the assistant was not attached: only the main model's blocks are recorded
    assert run.calls["module"].str.startswith("model.layers.").sum() == 2 * len(st)


def test_static_cache_kv_len_from_the_mask_without_a_device_read():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(5), max_new_tokens=4, cache_implementation="static", do_sample=False)
    assert torch.equal(ref, out)
    st = run.steps
    assert list(st["kv_len"]) == [0, 5, 6, 7]
    # a static cache is allocated in full up front: its bytes do not grow
    assert st["kv_cache_bytes"].nunique() == 1 and st["kv_cache_bytes"].iloc[0] > 0


def test_user_supplied_cache_prefix_is_an_extend_step():
    model = tiny_llama(layers=2)
    prefix = _ids(6)
    cont = torch.cat([prefix, torch.tensor([[9, 10]])], dim=-1)

    kw = cache_kwarg(model)  # `cache` on 5.x, `past_key_values` on 4.x

    def fresh_cache():
        c = new_dynamic_cache(model.config)
        with torch.no_grad():
            model(prefix, use_cache=True, **{kw: c})
        return c

    ref = model.generate(cont, max_new_tokens=3, do_sample=False, **{kw: fresh_cache()})
    with probe.attach(model) as p:
        cache = fresh_cache()
        out = model.generate(cont, max_new_tokens=3, do_sample=False, **{kw: cache})
    assert torch.equal(ref, out)
    st = p.run.steps
    gen = st[st["phase"] != "forward"]
    assert list(gen["phase"]) == ["extend", "decode", "decode"]
    assert list(gen["kv_len"]) == [6, 8, 9] and gen.iloc[0]["q_len"] == 2
    assert json.loads(p.run.runs.iloc[-1]["generate_kwargs"])["user_cache"] is True


def test_streaming_with_text_streamer(capsys):
    model, tok = load_bundled(num_hidden_layers=2)
    inputs = tok("我喜欢攀岩", return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with probe.attach(model) as p:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, streamer=TextStreamer(tok))
    assert torch.equal(ref, out)
    printed = capsys.readouterr().out
    assert tok.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True).strip() in printed
    assert len(p.run.steps) == 4
    assert json.loads(p.run.runs.iloc[0]["generate_kwargs"])["streamer"] == "TextStreamer"


def test_max_new_tokens_one_is_a_single_prefill_step():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(6), max_new_tokens=1, do_sample=False)
    assert torch.equal(ref, out)
    assert list(run.steps["phase"]) == ["prefill"]
    r = run.runs.iloc[0]
    assert r["new_tokens"] == 1 and r["ttft_ms"] > 0
    assert pd_isna(r["tpot_ms_mean"]) and pd_isna(r["decode_tok_s"])


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def test_generation_stopped_early_by_eos():
    model = tiny_llama(layers=2)
    ids = _ids(6)
    free = model.generate(ids, max_new_tokens=8, do_sample=False)
    eos = int(free[0, 6 + 2])  # the third generated token
    stop_at = next(i for i in range(8) if int(free[0, 6 + i]) == eos)
    ref, out, run = _record(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert torch.equal(ref, out)
    assert out.shape[-1] == 6 + stop_at + 1
    assert len(run.steps) == stop_at + 1
    assert run.runs.iloc[0]["new_tokens"] == stop_at + 1 and run.runs.iloc[0]["max_new_tokens"] == 8


def test_dict_output_with_scores():
    model = tiny_llama(layers=2)
    ref, out, run = _record(model, _ids(6), max_new_tokens=3, do_sample=False,
                            return_dict_in_generate=True, output_scores=True)
    assert torch.equal(ref.sequences, out.sequences) and len(out.scores) == 3
    assert run.runs.iloc[0]["new_tokens"] == 3


def test_torch_compiled_module_is_detected_and_steps_still_timed():
    model = tiny_llama(layers=2)
    ids = _ids(5)
    ref = model(ids).logits
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(probe.CompiledModelWarning, match="wrapped by torch.compile"):
        p = probe.attach(compiled)
    with p:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(ids).logits
            gen = compiled.generate(ids, max_new_tokens=2, do_sample=False)
    torch._dynamo.reset()
    assert torch.allclose(ref, out)
    assert gen.shape[-1] == 7
    st = p.run.steps
    assert list(st["phase"]) == ["forward", "prefill", "decode"]
    assert (st["forward_ms"] > 0).all()
    assert p.run.meta["compiled_model"] is True
    # generate() on the wrapper runs the eager model: its blocks are recorded
    assert set(p.run.calls["phase"]) >= {"prefill", "decode"}


def test_generate_auto_compile_is_detected_per_step():
    from transformers import CompileConfig

    model = tiny_llama(layers=2)
    ids = _ids(5)
    cc = CompileConfig(backend="eager", fullgraph=False)
    cc._compile_all_devices = True  # generate auto-compiles only on accelerators otherwise
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", compile_config=cc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, **kwargs)
    with probe.attach(model) as p:
        with pytest.warns(probe.CompiledModelWarning, match="ran compiled code"):
            out = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    assert torch.equal(ref, out)
    st = p.run.steps
    assert len(st) == 4 and (st["latency_ms"] > 0).all()
    assert p.run.meta["compiled_steps"] >= 1
    # the eager prefill still has its blocks
    assert (p.run.calls["step"] == 0).sum() == 5


def test_generated_ids_are_kept_from_the_output_and_unknown_once_it_is_changed_in_place():
    """The generated ids are copied from generate's output when the run's frames are built (not
    while the caller waits for the output): the same ids as the output; an output changed in
    place before that leaves them unknown rather than wrong; an inference-mode output (no
    version counter) is copied at once."""
    model = tiny_llama(layers=2)
    ids = _ids()
    with probe.attach(model) as p:
        kept = model.generate(ids, max_new_tokens=3, do_sample=False)
        changed = model.generate(ids, max_new_tokens=3, do_sample=False)
        want_changed = changed[:, ids.shape[1]:].tolist()
        changed[0, -1] = 0 if int(changed[0, -1]) != 0 else 1  # the caller edits its output
        with torch.inference_mode():
            inf = model.generate(ids, max_new_tokens=3, do_sample=False)
    runs = p.run.runs
    got = [json.loads(x) if isinstance(x, str) else None for x in runs["output_ids"]]
    assert got[0] == kept[:, ids.shape[1]:].tolist()
    assert got[1] is None and want_changed == got[0]  # greedy: the same ids, but no longer known
    assert got[2] == inf[:, ids.shape[1]:].tolist()
