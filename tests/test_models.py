"""Tests for probe.models: bundled tokenizer, bundled tiny model, presets, dtypes.

The tests are deliberately few and coarse: the shared conftest's per-test leak
guard walks every live Python object, which costs ~0.7 s per test once
transformers is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest
import torch

import probe.models as pm

PROMPT = "我喜欢攀岩"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BYTE_PIECE_IDS = range(3, 3 + 256)  # <0x00>..<0xFF> follow <unk>, <s>, </s>

ROUND_TRIP_TEXTS = [
    "The KV cache grows with the sequence length.",
    "Decode took 7.8 ms per token at batch size 1 (bf16, H100).",
    "我喜欢攀岩, and I like rock climbing on weekends!",
    "def f(x):\n    return x * 2",
    "Rare characters fall back to bytes: 龘 🧗 ☃",
]

PRESET_SHAPES = [
    # name, class, vocab, hidden, intermediate, layers, heads, kv heads, qkv bias
    ("llama-2-7b", "LlamaForCausalLM", 32000, 4096, 11008, 32, 32, 32, False),
    ("mistral-7b", "MistralForCausalLM", 32000, 4096, 14336, 32, 32, 8, False),
    ("qwen2-7b", "Qwen2ForCausalLM", 152064, 3584, 18944, 28, 28, 4, True),
]

DTYPE_SPELLINGS = [
    ("float32", torch.float32),
    ("fp32", torch.float32),
    ("bfloat16", torch.bfloat16),
    ("BF16", torch.bfloat16),
    ("float16", torch.float16),
    ("fp16", torch.float16),
    ("half", torch.float16),
    ("torch.bfloat16", torch.bfloat16),
    (torch.float16, torch.float16),
]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Run the tiny models on one intra-op thread.

    Their matmuls are far too small to gain from threading, and on a busy
    2-core machine a second spinning thread makes them an order of magnitude
    slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return pm.load_tokenizer()


@pytest.fixture(scope="module")
def bundled():
    return pm.load_bundled()


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _llama_param_count(
    vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, qkv_bias: bool = False
) -> int:
    """Analytic parameter count of a LLaMA-style decoder with an untied lm_head."""
    head_dim = hidden // heads
    q = hidden * heads * head_dim + (heads * head_dim if qkv_bias else 0)
    kv = 2 * (hidden * kv_heads * head_dim + (kv_heads * head_dim if qkv_bias else 0))
    o = heads * head_dim * hidden
    mlp = 3 * hidden * inter  # gate, up, down
    norms = 2 * hidden  # input + post-attention RMSNorm
    embed = lm_head = vocab * hidden
    return embed + layers * (q + kv + o + mlp + norms) + hidden + lm_head  # + final norm


# ----------------------------------------------------------------- tokenizer


def test_tokenizer_asset_is_small_and_reproducible():
    path = pm.tokenizer_path()
    assert path.name == "tokenizer.model" and path.is_file()
    assert path.stat().st_size < 300 * 1024
    pytest.importorskip("sentencepiece")
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO_ROOT / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_VOCAB_SIZE == pm.bundled_config().vocab_size
    # Re-training from tools/tokenizer_corpus.txt yields the committed file byte for byte.
    assert module.main(["--check", "--output", str(path)]) == 0


def test_tokenizer_round_trips(tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.shape[0] == 1 and ids.shape[1] >= 2
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    # Every character of the prompt is in the vocabulary: no byte fallback, no <unk>.
    assert not any(i in BYTE_PIECE_IDS or i == tokenizer.unk_token_id for i in ids[0, 1:].tolist())
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == PROMPT

    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id, text
        assert tokenizer.eos_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text

    # The transformers tokenizer segments exactly like the SentencePiece model.
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(pm.tokenizer_path()))
    for text in [PROMPT, "Profiling prefill and decode on a GPU.", "温度 0.7, top_p=0.9 以及 2048 个词元"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


def test_special_tokens_vocab_and_padding(tokenizer):
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == pm.bundled_config().vocab_size

    batch = tokenizer([PROMPT, "A much longer English prompt about profiling."], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0].item() == 0 and mask[0, -1].item() == 1  # short row padded on the left
    assert ids[0, 0].item() == tokenizer.pad_token_id is not None
    assert ids[1, 0].item() == tokenizer.bos_token_id


# ------------------------------------------------------------- bundled model


def test_bundled_config_shape():
    cfg = pm.bundled_config()
    assert type(cfg).__name__ == "LlamaConfig"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (32, 128, 352)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 4)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.max_position_embeddings) == (1, 2, 2048)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-5
    assert pm.bundled_config(num_hidden_layers=2).num_hidden_layers == 2


def test_bundled_generates_greedily(bundled):
    model, tok = bundled
    assert len(model.model.layers) == 32
    assert not model.training
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, tok.pad_token_id)
    assert not gen.do_sample  # greedy unless the caller asks for sampling

    inputs = tok(PROMPT, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.shape == (1, prompt_len + 10)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])


def test_seed_determinism(bundled):
    model, _ = bundled
    again, _ = pm.load_bundled(seed=0)
    other, _ = pm.load_bundled(seed=1)
    assert _state_equal(model, again)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert not torch.equal(model.model.layers[5].mlp.up_proj.weight, other.model.layers[5].mlp.up_proj.weight)
    # The "tiny" preset (and its BUNDLED_ID alias) builds the very same weights on CPU/float32.
    assert _state_equal(model, pm.build_preset(pm.BUNDLED_ID, dtype="float32", device="cpu", seed=0))

    # Fixed seed + greedy decoding: a freshly built model writes the same tokens.
    outs = []
    for _ in range(2):
        small, tok = pm.load_bundled(num_hidden_layers=2)
        with torch.inference_mode():
            outs.append(small.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=8, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_global_rng_untouched():
    state = torch.random.get_rng_state()
    pm.load_bundled(seed=123, num_hidden_layers=2)
    pm.build_preset("tiny", dtype="float32", seed=7, num_hidden_layers=2)
    pm.build_preset("llama-2-7b", meta=True)
    assert torch.equal(state, torch.random.get_rng_state())


def test_bfloat16_load():
    model, tok = pm.load_bundled(dtype="bf16", num_hidden_layers=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_save_bundled_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 4 layers instead of 32 keeps the test fast; the code path is identical.
    model, tok = pm.load_bundled(seed=3, num_hidden_layers=4)
    out = pm.save_bundled(tmp_path / "tiny", seed=3, num_hidden_layers=4)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    inputs = tok(PROMPT, return_tensors="pt")
    assert loaded_tok(PROMPT)["input_ids"] == inputs["input_ids"][0].tolist()
    assert loaded_tok.pad_token_id == tok.pad_token_id and loaded_tok.padding_side == "left"
    assert loaded.config.num_hidden_layers == 4
    assert loaded.generation_config.pad_token_id == tok.pad_token_id
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_import_is_cheap():
    # torch/transformers/sentencepiece must only be imported inside functions, in every module
    # of the package.
    heavy = {"torch", "transformers", "sentencepiece", "tokenizers", "safetensors"}
    files = sorted((REPO_ROOT / "probe" / "models").glob("*.py"))
    assert len(files) > 1
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only (the TYPE_CHECKING block is never executed)
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in heavy for n in names), f"{path.name}: {ast.dump(node)}"


# ------------------------------------------------------------------- presets


def test_chinese_llama_meta_param_count():
    model = pm.build_preset("chinese-llama-2-7b", meta=True)
    assert model.config.vocab_size == 40076
    assert model.get_input_embeddings().weight.shape == (40076, 4096)
    assert model.lm_head.weight.device.type == "meta"
    expected = _llama_param_count(vocab=40076, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_preset_meta_param_counts():
    # Guards the formula itself: LLaMA-2-7B's widely published size.
    assert _llama_param_count(32000, 4096, 11008, 32, 32, 32) == 6_738_415_616
    for name, cls, vocab, hidden, inter, layers, heads, kv, bias in PRESET_SHAPES:
        model = pm.build_preset(name, meta=True)
        assert type(model).__name__ == cls, name
        assert model.dtype == torch.bfloat16, name
        expected = _llama_param_count(vocab, hidden, inter, layers, heads, kv, qkv_bias=bias)
        assert sum(p.numel() for p in model.parameters()) == expected, name


def test_preset_configs():
    assert {"llama-2-7b", "chinese-llama-2-7b", "mistral-7b", "qwen2-7b", "tiny"} <= set(pm.PRESETS)
    for entry in pm.PRESETS.values():
        assert {"model_type", "source", "config"} <= set(entry)
    llama = pm.preset_config("llama-2-7b")
    assert (llama.max_position_embeddings, llama.rms_norm_eps, llama.tie_word_embeddings) == (4096, 1e-5, False)
    mistral = pm.preset_config("mistral-7b")
    assert type(mistral).__name__ == "MistralConfig"
    assert (mistral.num_key_value_heads, mistral.sliding_window) == (8, None)
    qwen = pm.preset_config("Qwen2_7B")  # case/underscore-insensitive
    assert type(qwen).__name__ == "Qwen2Config"
    assert (qwen.num_key_value_heads, qwen.tie_word_embeddings) == (4, False)
    assert pm.preset_config("tiny").to_dict()["hidden_size"] == pm.bundled_config().hidden_size
    assert pm.preset_config("llama-2-7b", num_hidden_layers=2).num_hidden_layers == 2

    # A shrunken preset really runs (non-meta path, config overrides).
    small = pm.build_preset(
        "qwen2-7b",
        dtype="float32",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert next(small.parameters()).device.type == "cpu"
    with torch.inference_mode():
        assert small(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 512)


# -------------------------------------------------------------- dtypes, errors


def test_resolve_dtype():
    for spelling, expected in DTYPE_SPELLINGS:
        assert pm.resolve_dtype(spelling) is expected, spelling
    assert pm.resolve_dtype("auto", device="cpu") is torch.float32
    assert pm.resolve_dtype("auto") in (torch.float32, torch.bfloat16, torch.float16)


def test_helpful_errors():
    with pytest.raises(ValueError, match="Valid presets") as info:
        pm.preset_config("gpt-5")
    assert "gpt-5" in str(info.value)
    assert all(name in str(info.value) for name in ("llama-2-7b", "chinese-llama-2-7b", "qwen2-7b", "tiny"))
    with pytest.raises(ValueError, match="Valid presets"):
        pm.build_preset("llama-3-8b", meta=True)

    for bad in ["int8", "fp8", "", torch.int64, 16]:
        with pytest.raises(ValueError, match="dtype"):
            pm.resolve_dtype(bad)
    with pytest.raises(ValueError, match="bfloat16") as info:
        pm.load_bundled(dtype="float8")
    assert "float8" in str(info.value)
