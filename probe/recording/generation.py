"""What a ``generate()`` call was asked for: its input tensors' shapes and its settings."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def inputs_of(args: tuple, kwargs: dict) -> tuple[int | None, int | None, Any, bool]:
    """(batch, prompt length, attention mask, prompt in the output) of a generate() call, from its
    tensors' shapes. generate() returns the prompt ids followed by the new tokens, but only the new
    tokens when it is given ``inputs_embeds`` without ids: the last item says which."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor):
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs")
    emb = kwargs.get("inputs_embeds")
    x = ids if isinstance(ids, Tensor) else emb if isinstance(emb, Tensor) else None
    if x is None or x.dim() < 1:
        return None, None, None, True
    batch = int(x.shape[0]) if x.dim() >= 2 else 1
    length = int(x.shape[1]) if x.dim() >= 2 else int(x.shape[0])
    return batch, length, kwargs.get("attention_mask"), isinstance(ids, Tensor)


_GEN_KEYS = (
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "min_p", "repetition_penalty", "use_cache", "cache_implementation",
    "num_return_sequences", "num_assistant_tokens", "prompt_lookup_num_tokens", "eos_token_id",
    "pad_token_id",
)


def generation_settings(model: nn.Module, kwargs: dict) -> dict:
    """The generation settings in effect: kwargs over the generation config, JSON-able."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    out: dict = {}
    for k in _GEN_KEYS:
        v = kwargs[k] if k in kwargs else getattr(cfg, k, None)
        if isinstance(v, Tensor):
            v = v.tolist() if v.numel() < 64 else f"tensor{list(v.shape)}"
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
        else:
            out[k] = repr(v)
    out["assisted"] = any(kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens"))
    out["streamer"] = type(kwargs["streamer"]).__name__ if kwargs.get("streamer") is not None else None
    out["user_cache"] = (kwargs.get("past_key_values") or kwargs.get("cache")) is not None
    return out


def hold_generated(seqs: Tensor, start: int, rows: int) -> tuple[Any, tuple | None]:
    """``(ids copied now, None)``, or ``(None, what to copy them from later)``: a CPU tensor whose
    in-place changes its version counter tracks is kept as it is, with that version, and copied
    when the run's frames are built (:func:`copy_held`). Its copy, made at once, cost ~14 µs after
    a forward, cold, between generate's clock stopping and the caller getting the output: on a
    3 ms one-token call, half of what a stopwatch around the call read beyond TTFT. The ids held
    are as small as the copy would be (a few ints a token). An inference tensor (no version
    counter) or one on a device is copied at once."""
    if seqs.device.type == "cpu" and not seqs.requires_grad:
        try:
            return None, (seqs, seqs._version, start, rows)
        except RuntimeError:  # an inference tensor: "Inference tensors do not track version counter"
            pass
    return generated_on_host(seqs, start, rows), None


def copy_held(held: tuple) -> Any:
    """The generated ids of :func:`hold_generated`'s held tensor, or ``None`` where it was
    changed in place since (its version moved: the ids it held then are gone). A change made
    through another view that torch does not count (a numpy array of it) is not seen."""
    seqs, version, start, rows = held
    if seqs._version != version:
        return None
    return generated_on_host(seqs, start, rows)


def generated_on_host(seqs: Tensor, start: int, rows: int) -> Any:
    """The generated tokens (from ``start`` on) as ``rows`` rows, copied to the host: through
    numpy for CPU ids (one array copy: the torch route's slice, reshape and copy cost ~16 µs
    after generate returned, between its clock stopping and the caller getting the output),
    through torch otherwise."""
    if seqs.device.type == "cpu" and not seqs.requires_grad:
        try:
            return seqs.numpy()[..., start:].reshape(rows, -1).copy()
        except (TypeError, RuntimeError):  # a dtype numpy lacks: the torch route
            pass
    return seqs.detach()[..., start:].reshape(rows, -1).to("cpu", copy=True)
