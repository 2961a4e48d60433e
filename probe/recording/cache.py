"""Read a KV cache's length and size from tensor metadata only (never a device sync).

Covers transformers' ``Cache`` objects across versions (``cache.layers[i].keys`` in 4.56+/5.x,
``cache.key_cache`` lists before), and legacy tuples of ``(key, value)`` pairs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _layer_tensors(cache: Any):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, Tensor):
                yield keys
                values = getattr(layer, "values", None)
                if isinstance(values, Tensor):
                    yield values
                continue
            # quantized, linear-attention and state-space layers keep other tensors
            for attr in ("_quantized_keys", "_quantized_values", "conv_states", "recurrent_states"):
                t = getattr(layer, attr, None)
                if isinstance(t, Tensor):
                    yield t
        return
    for attr in ("key_cache", "value_cache"):
        lst = getattr(cache, attr, None)
        if isinstance(lst, (list, tuple)):
            for t in lst:
                if isinstance(t, Tensor):
                    yield t
    # encoder-decoder caches hold two caches
    for attr in ("self_attention_cache", "cross_attention_cache"):
        sub = getattr(cache, attr, None)
        if sub is not None:
            yield from _layer_tensors(sub)
    if isinstance(cache, (tuple, list)):
        for item in cache:
            if isinstance(item, Tensor):
                yield item
            elif isinstance(item, (tuple, list)):
                for t in item:
                    if isinstance(t, Tensor):
                        yield t


def cache_tensors(cache: Any) -> list:
    """The tensors a cache holds (keys and values per layer, or what a layer keeps instead)."""
    return list(_layer_tensors(cache)) if cache is not None else []


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by the cache's tensors (allocated size: a static cache counts in full)."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if type(layers) is list and layers:
        # the common case, read once per step: every layer holds a keys and a values tensor
        try:
            return sum([layer.keys.nbytes + layer.values.nbytes for layer in layers])
        except AttributeError:  # a layer not yet filled, or one that keeps other tensors
            pass
    total = 0
    found = False
    for t in _layer_tensors(cache):
        found = True
        total += t.nbytes  # one property read; no device access
    return total if found else None


def cache_seq_len(cache: Any) -> int | None:
    """Cached positions, from shapes alone; ``None`` where only a device read could tell.

    A static cache's tensors are preallocated to their maximum length, so their shape says
    nothing about how much is filled: those return ``None`` (the caller falls back to the
    attention mask or its own count).
    """
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            name = type(layer).__name__
            if "Static" in name:
                return None
            cum = getattr(layer, "cumulative_length", None)
            if isinstance(cum, int):
                return cum
            keys = getattr(layer, "keys", None)
            if isinstance(keys, Tensor) and keys.dim() >= 2:
                if keys.numel() == 0:
                    return 0
                return int(keys.shape[-2])
            if getattr(layer, "is_initialized", True) is False:
                return 0
        return 0 if len(layers) else None
    key_cache = getattr(cache, "key_cache", None)
    if isinstance(key_cache, (list, tuple)):
        if "Static" in type(cache).__name__:
            return None
        for t in key_cache:
            if isinstance(t, Tensor) and t.dim() >= 2:
                return 0 if t.numel() == 0 else int(t.shape[-2])
        return 0
    if isinstance(cache, (tuple, list)) and cache:
        first = cache[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], Tensor):
            return int(first[0].shape[-2])
    return None


def find_cache(kwargs: dict, out: Any = None) -> Any:
    """The cache object of a forward: from its output if returned, else from its inputs."""
    if out is not None:
        getter = getattr(out, "get", None)
        if getter is not None and isinstance(out, dict):
            for key in ("cache", "past_key_values"):
                c = out.get(key)
                if c is not None:
                    return c
    for key in ("cache", "past_key_values", "past"):
        c = kwargs.get(key)
        if c is not None:
            return c
    return None



def cached_len(kwargs: dict, q_len: int, after_last: int | None = None) -> int:
    """Tokens already cached before a forward of ``q_len`` new ones, from its keyword arguments:
    the attention mask, the cache, host-side cache positions; else ``after_last`` (the previous
    step's context plus its tokens) when there is a cache, else 0. Never reads a device tensor."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[-1] >= q_len:
        return int(mask.shape[-1]) - q_len
    cache = find_cache(kwargs)
    try:
        n = cache_seq_len(cache)
    except Exception:  # an exotic cache must never break the user's forward
        n = None
    if n is not None:
        return n
    pos = kwargs.get("cache_position")
    if isinstance(pos, Tensor) and pos.numel() and pos.device.type == "cpu":
        return int(pos.reshape(-1)[0])
    if after_last is not None and cache is not None:
        return after_last
    return 0
