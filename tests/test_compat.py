"""probe.compat: the transformers differences between the floor (4.57) and the newest 5.x.

CI runs this suite on both ends, so each test here checks the installed version's side.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

import probe
from probe import compat
from tiny import tiny_config, tiny_model


def test_version_is_the_installed_transformers_and_at_least_the_floor():
    v = compat.transformers_version()
    assert v is not None and v[:2] >= compat.TRANSFORMERS_FLOOR
    assert v == compat._parse_version(transformers.__version__)  # metadata and the imported package agree
    assert compat.is_transformers_5() == (int(transformers.__version__.split(".")[0]) >= 5)
    assert compat._parse_version("4.57.6") == (4, 57, 6)
    assert compat._parse_version("5.0.0rc1") == (5, 0, 0)
    assert compat._parse_version("4.57.0.dev0+abc") == (4, 57, 0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3"])
def test_a_forward_on_the_meta_device_runs_inside_meta_forward(model_type):
    """Rotary embeddings switch autocast off for the input's device type; on 4.x torch refuses
    that for ``meta``. Inside meta_forward the forward runs on every version."""
    with torch.device("meta"):
        model = tiny_model(model_type).eval()
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    cache = compat.new_dynamic_cache(model.config)
    with compat.meta_forward(), torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{compat.cache_kwarg(model): cache})
    assert out.logits.shape == (2, 5, model.config.vocab_size) and out.logits.device.type == "meta"
    assert torch.autocast is torch.amp.autocast_mode.autocast  # restored


def test_meta_forward_keeps_torch_autocast_for_everything_else_and_restores_it_on_errors():
    original = torch.autocast
    with pytest.raises(ZeroDivisionError), compat.meta_forward():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cpu")
            assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
        1 / 0
    assert torch.autocast is original


def test_walking_a_model_outside_meta_forward_is_what_4x_refuses():
    """The reason for meta_forward: without it, 4.x rotary embeddings fail on meta tensors."""
    with torch.device("meta"):
        model = tiny_model("llama").eval()
    ids = torch.zeros(1, 3, dtype=torch.long, device="meta")
    if compat.is_transformers_5():
        assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)
    else:
        with pytest.raises(RuntimeError, match="unsupported scalarType"):
            model(input_ids=ids)


def test_cache_kwarg_names_the_forward_parameter_that_takes_the_cache():
    model = tiny_model("llama")
    params = inspect.signature(model.forward).parameters
    name = compat.cache_kwarg(model)
    assert name in params and name == ("cache" if "cache" in params else "past_key_values")
    ids = torch.randint(3, 96, (1, 4))
    cache = compat.new_dynamic_cache(model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 4  # the forward filled the cache it was given


def test_new_dynamic_cache_lays_out_sliding_window_layers():
    cfg = tiny_config("gemma2")
    cache = compat.new_dynamic_cache(cfg)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert len(kinds) == cfg.num_hidden_layers and "Sliding" in kinds[0] and "Sliding" not in kinds[1]


def test_tensor_parallel_kwargs_are_what_from_pretrained_takes():
    kw = compat.tensor_parallel_kwargs("auto")
    if compat.is_transformers_5():
        assert list(kw) == ["distributed_config"] and kw["distributed_config"].tp_plan == "auto"
    else:
        assert kw == {"tp_plan": "auto"}
        assert "tp_plan" in inspect.getsource(transformers.PreTrainedModel.from_pretrained)


def test_eager_experts_kwargs_build_a_model_whose_experts_loop_over_linears():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"), **compat.eager_experts_kwargs())
    if compat.is_transformers_5():
        assert model.config._experts_implementation == "eager"
    else:
        experts = [m for n, m in model.named_modules() if n.endswith("experts")]
        assert experts and all(isinstance(e, torch.nn.ModuleList) for e in experts)


def test_cb_timestamp_flag_matches_what_continuous_batching_accepts():
    """``has_cb_timestamps`` reads ``generate_batch``; the request manager must agree, since it is
    where ``record_timestamps`` ends up (4.57 has continuous batching without it)."""
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    takes = "record_timestamps" in inspect.signature(ContinuousBatchingManager.add_request).parameters
    assert compat.has_cb_timestamps() == takes
    if compat.transformers_version()[:2] == (4, 57):
        assert not compat.has_cb_timestamps()


def test_import_probe_does_not_import_transformers_for_compat():
    import subprocess
    import sys

    code = "import sys, probe, probe.compat; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(probe.__file__).rsplit("/probe/", 1)[0])
    assert out.stdout.strip() == "False"
