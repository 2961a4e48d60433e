"""Tiny real Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "gpt2", "gpt_neox", "opt",
    "bloom", "mixtral", "olmo2", "starcoder2",
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=None,  # random weights must not stop early by chance
    pad_token_id=0,
)

_EXTRA: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=16),
    "phi": dict(num_key_value_heads=4),
    "gpt2": dict(n_positions=128, n_inner=64),
    "gpt_neox": dict(),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "bloom": dict(),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "olmo2": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2),
}


def tiny_config(model_type: str, **overrides):
    kw = {**_COMMON, **_EXTRA.get(model_type, {}), **overrides}
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.pad_token_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    return cfg


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny causal LM of ``model_type`` with deterministic random weights, in eval mode."""
    cfg = tiny_config(model_type, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def tiny_llama(layers: int = 4, hidden: int = 64, vocab: int = 128, seed: int = 0, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=None, **kw,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


class VirtualClock:
    """An injectable clock (``probe.attach(model, clock=...)``) that advances 1 ns per read, plus
    whatever a test's own work spends: timings on it are exact."""

    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        self.t += 1
        return self.t

    def spend(self, ns: int) -> None:
        self.t += ns


def used_categories(df):
    """``df`` with each categorical column's unused categories dropped: a slice of a frame keeps the
    categories of the whole, a part read from a file or one rank's rows only those its rows use."""
    import pandas as pd

    cats = [c for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)]
    return df.assign(**{c: df[c].cat.remove_unused_categories() for c in cats}) if cats else df


def as_rank(run, rank: int):
    """``run`` with every frame's rows tagged ``rank`` (run ids kept): merged with ``run``
    (:func:`probe.analysis.run.merge`), two ranks that walked the same steps under one run id."""
    import dataclasses

    import pandas as pd

    def tagged(df):
        return df.assign(rank=pd.Series(rank, index=df.index, dtype=df["rank"].dtype)) if "rank" in df else df

    frames = ("calls", "steps", "runs", "sampling", "requests", "ops", "ledger", "allocations")
    return dataclasses.replace(run, meta={**run.meta, "rank": rank}, path=None,
                               **{k: tagged(getattr(run, k)) for k in frames})


def generate_probed(model, prompt: torch.Tensor, *, seed: int | None = None, attach: dict | None = None, **kw):
    """``model.generate(prompt, **kw)`` once alone and once under ``probe.attach(model, **attach)``
    (the same seed before each, where given): checks the probe left the tokens as they were and
    returns the attached probe."""
    import probe

    if seed is not None:
        torch.manual_seed(seed)
    want = model.generate(prompt, **kw)
    with probe.attach(model, **(attach or {})) as p:
        if seed is not None:
            torch.manual_seed(seed)
        got = model.generate(prompt, **kw)
    assert torch.equal(want, got)
    return p
