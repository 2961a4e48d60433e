"""Grouping on integer codes: sums per group and factorisations that give ``pd.factorize``'s
codes (in order of first appearance) with less hashing where the keys allow it.

The summary, the call tree and the per-step samples of a comparison group a million calls by
small integer keys (row x phase, row x phase x run x step); these helpers keep every result the
same as pandas' own, bit for bit, and do less work on the usual shapes of those keys.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def group_sum(groups: np.ndarray, n: int, values: np.ndarray | None, min_count: int = 0) -> np.ndarray:
    """Per group: the sum of the non-NaN values (NaN where fewer than ``min_count`` of them).
    ``values`` ``None`` stands for all NaN (a column absent from the frame)."""
    if values is None:
        return np.full(n, np.nan) if min_count else np.zeros(n)
    ok = ~np.isnan(values)
    if ok.all():  # the common case: nothing to drop (the sums add the same values in the same order)
        total = np.bincount(groups, weights=values, minlength=n)
        if min_count:
            total = np.where(np.bincount(groups, minlength=n) >= min_count, total, np.nan)
        return total
    if not ok.any():
        return np.full(n, np.nan) if min_count else np.zeros(n)
    total = np.bincount(groups[ok], weights=values[ok], minlength=n)
    if min_count:
        total = np.where(np.bincount(groups[ok], minlength=n) >= min_count, total, np.nan)
    return total


def codes_in_order(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize(keys)`` of integer keys in ``[0, size)``: codes in order of first appearance
    and the distinct keys, exactly, with less hashing where the keys allow it.

    A few distinct keys (rows x phases of a million calls) that all appear in the first steps are
    factorised from that prefix and the rest looked up in a table; nearly one key per row (one per
    module and step) is numbered from a table of each key's first row; otherwise pandas hashes."""
    n = len(keys)
    if n < 65536 or size > 4 * n or int(keys.min()) < 0:
        return pd.factorize(keys)
    want = int(np.count_nonzero(np.bincount(keys, minlength=size)))
    if want <= 4096:
        for m in (16384, 65536):
            _, uniq = pd.factorize(keys[:m])
            if len(uniq) == want:
                lut = np.full(size, -1, np.int64)
                lut[uniq] = np.arange(len(uniq))
                return lut[keys], uniq
    if want <= n // 4:
        return pd.factorize(keys)
    first = np.full(size, n, np.int64)
    np.minimum.at(first, keys, np.arange(n))
    at = first[keys]  # each row's key's first row
    new = at == np.arange(n)
    rank = np.cumsum(new) - 1
    return rank[at], keys[new]


def first_rows(codes: np.ndarray, m: int) -> np.ndarray:
    """The row where each of ``m`` codes numbered in order of first appearance first appears
    (looked for in the first rows, where a summary's rows all start, before the whole)."""
    for head in (codes[:65536], codes):
        top = np.maximum.accumulate(head)
        first = np.flatnonzero(np.r_[True, top[1:] > top[:-1]]) if len(head) else np.zeros(0, np.int64)
        if len(first) == m:
            break
    return first
