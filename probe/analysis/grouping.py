"""Grouping on integer codes: sums per group and factorisations that give ``pd.factorize``'s
codes (in order of first appearance) with less hashing where the keys allow it.

The summary, the call tree and the per-step samples of a comparison group a million calls by
small integer keys (row x phase, row x phase x run x step); these helpers keep every result the
same as pandas' own, bit for bit, and do less work on the usual shapes of those keys.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def group_sum(groups: np.ndarray, n: int, values: np.ndarray | None, min_count: int = 0,
              counts: np.ndarray | None = None) -> np.ndarray:
    """Per group: the sum of the non-NaN values (NaN where fewer than ``min_count`` of them).
    ``values`` ``None`` stands for all NaN (a column absent from the frame); ``counts``, each
    group's rows where the caller has them already."""
    if values is None:
        return np.full(n, np.nan) if min_count else np.zeros(n)
    with np.errstate(invalid="ignore", over="ignore"):
        clean = not np.isnan(values.sum())  # one pass: a NaN (or inf - inf) makes the sum NaN
    if clean:  # the common case: no NaN to drop (the sums add the same values in the same order)
        total = np.bincount(groups, weights=values, minlength=n)
        if min_count:
            counts = np.bincount(groups, minlength=n) if counts is None else counts
            total = np.where(counts >= min_count, total, np.nan)
        return total
    ok = ~np.isnan(values)
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


def key_codes(frame: pd.DataFrame, keys: list[str], codes_of=None) -> tuple[np.ndarray, pd.DataFrame]:
    """Each row's group of ``frame.groupby(keys, sort=False, dropna=False, observed=True)``:
    codes numbered in order of first appearance, and a frame of the groups' key values (a null
    its own group); a categorical key is read from its codes, with no recoding or hashing of
    its rows.

    Args:
        codes_of: ``codes_of(column)`` gives a text column's codes (-1: a null) and values where
            the caller keeps them (:func:`probe.analysis.labels.factorized`).

    Returns:
        ``(codes, groups)``: int64 codes over ``frame``'s rows; ``groups`` with the ``keys``
        columns (text keys as text), one row per group.
    """
    combined = np.zeros(len(frame), np.int64)
    size = 1
    values = []
    for key in keys:  # combined = combined * width + code, in place
        s = frame[key]
        if codes_of is not None and not pd.api.types.is_numeric_dtype(s.dtype):  # the kept codes, 0 for a null
            codes, kept = codes_of(key)
            shift, uniq = 1, pd.Index([None, *(str(v) for v in kept)], dtype="string")
        elif isinstance(s.dtype, pd.CategoricalDtype):  # code 0 for a null, category i at i + 1
            codes, shift = s.cat.codes.to_numpy(), 1
            uniq = pd.Index([None, *(str(v) for v in s.dtype.categories)], dtype="string")
        else:
            (codes, uniq), shift = pd.factorize(s, use_na_sentinel=False), 0
        combined *= max(len(uniq), 1)
        combined += codes
        if shift:
            combined += shift
        size *= max(len(uniq), 1)
        values.append(uniq)
    slot, firsts = codes_in_order(combined, size)
    rest = np.asarray(firsts, np.int64)
    out = {}
    for key, uniq in zip(reversed(keys), reversed(values)):
        rest, at = np.divmod(rest, max(len(uniq), 1))
        out[key] = pd.Series(uniq.take(at), name=key).reset_index(drop=True)
    return np.asarray(slot, np.int64), pd.DataFrame({k: out[k] for k in keys})
