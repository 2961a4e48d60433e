"""Samples of a run for spread and significance: each row's time in each step, each headline
figure per generate call.

Rows are :meth:`probe.Run.summary`'s at a level (self time, so they never overlap) plus the
forward's other parts — ``(residue)``, ``(probe)`` — and ``(outside model)``; only the successful
generate calls count, and of a run merged from tensor-parallel ranks only the lowest rank's (the
ranks record the same calls side by side, not repeats of them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import schema
from . import tree
from .accounting import PROBE, RESIDUE, check_level, factorized, label_codes, labels
from .grouping import codes_in_order, group_sum
from ..schema import Level

OUTSIDE = "(outside model)"


def generate_ids(runs: pd.DataFrame) -> list[str]:
    """The successful generate calls; of a run merged from several ranks (tensor parallel), the
    lowest rank's: the ranks record the same calls side by side, not repeats of them."""
    if runs.empty:
        return []
    gen = runs[(runs["kind"] == "generate") & (runs["status"] == "ok")]
    if "rank" in gen and gen["rank"].nunique() > 1:
        gen = gen[gen["rank"] == gen["rank"].min()]
    return [str(v) for v in gen["run_id"]]


def recorded(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The successful generate calls' calls and steps, with the call tree's columns."""
    ids = generate_ids(runs)
    calls, steps = tree.ensure(calls, steps)
    run = calls["run_id"]
    if isinstance(run.dtype, pd.CategoricalDtype):  # decided per category, looked up by code (-1: a null)
        mine = np.append(run.cat.categories.isin(ids), False)[run.cat.codes.to_numpy()]
    else:
        mine = run.isin(ids).to_numpy(dtype=bool, na_value=False)
    return calls if mine.all() else calls[mine], steps[steps["run_id"].isin(ids)]  # the usual case copies nothing

def per_step(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level,
              clock: str = "host") -> pd.DataFrame:
    """Each row's time in each step of the successful generate calls: ``name, phase, run_id,
    step, ms``. The rows are :meth:`probe.Run.summary`'s at ``level`` (self time, so they never
    overlap), then ``(residue)`` and, on the host clock, ``(probe)`` (the forward's other parts,
    over the steps with call records), then ``(outside model)`` (time in generate between
    forwards). ``clock`` "gpu" reads ``gpu_self_ms`` and ``gpu_residue_ms``."""
    check_level(level)
    c, st = recorded(calls, steps, runs)
    parts = []
    if len(c):
        col = "gpu_self_ms" if clock == "gpu" else "self_ms"
        parts.append(pd.DataFrame({"name": labels(c, level), "phase": c["phase"].to_numpy(), "run_id": c["run_id"].to_numpy(),
                                   "step": c["step"].to_numpy(),
                                   "ms": schema.floats(c, col)}))
    rec = st[st["residue_ms"].notna()]
    extra = [(RESIDUE, "gpu_residue_ms" if clock == "gpu" else "residue_ms")]
    if clock == "host" and "probe_ms" in rec.columns and rec["probe_ms"].notna().any():
        extra.append((PROBE, "probe_ms"))
    out_ = st[st["outside_ms"].notna()]
    for name, col, frame in [(n, c_, rec) for n, c_ in extra] + [(OUTSIDE, "outside_ms", out_)]:
        if len(frame):
            parts.append(frame[["phase", "run_id", "step", col]].rename(columns={col: "ms"}).assign(name=name))
    cols = {"name": "string", "phase": "string", "run_id": "string", "step": "int64", "ms": "float64"}
    if not parts:
        return schema.empty(cols)
    return pd.concat(parts, ignore_index=True)[list(cols)].astype(cols)

def clock_of(run_calls: list[pd.DataFrame]) -> str:
    return "gpu" if all(len(c) and not np.isnan(schema.floats(c, "gpu_ms")).any() for c in run_calls) else "host"


def step_samples(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level = "block",
                 clock: str = "host") -> dict[tuple[str, str], np.ndarray]:
    """Per (row, phase) at ``level``, the row's time in each step of that phase: the rows of
    :func:`per_step` summed per step, in order of first appearance. Built on integer codes: no
    text column of the calls is turned into Python strings."""
    check_level(level)
    c, st = recorded(calls, steps, runs)
    names: dict = {}
    phases: dict = {}
    ids: dict = {}
    parts = []

    def codes(values, vocab: dict, factorized=None) -> np.ndarray:  # codes into ``vocab`` (grown in order), -1: null
        got, uniq = factorized or pd.factorize(values)
        return _mapped(got, [vocab.setdefault(str(v), len(vocab)) for v in uniq])

    if len(c):
        col = "gpu_self_ms" if clock == "gpu" else "self_ms"
        lcodes, lnames = label_codes(c, level)
        parts.append((_mapped(lcodes, [names.setdefault(str(v), len(names)) for v in lnames]),
                      codes(None, phases, factorized(c, "phase")), codes(None, ids, factorized(c, "run_id")),
                      c["step"].to_numpy(dtype="int64"), schema.floats(c, col)))
    rec = st[st["residue_ms"].notna()]
    extra = [(RESIDUE, "gpu_residue_ms" if clock == "gpu" else "residue_ms", rec)]
    if clock == "host" and "probe_ms" in rec.columns and rec["probe_ms"].notna().any():
        extra.append((PROBE, "probe_ms", rec))
    extra.append((OUTSIDE, "outside_ms", st[st["outside_ms"].notna()]))
    for name, col, frame in extra:
        if len(frame):
            parts.append((np.full(len(frame), names.setdefault(name, len(names)), np.int64),
                          codes(frame["phase"], phases), codes(frame["run_id"], ids),
                          frame["step"].to_numpy(dtype="int64"), frame[col].to_numpy(dtype="float64", na_value=np.nan)))
    # each part grouped on its own (the calls' rows and each of the steps' parts have names of
    # their own, so no group spans two parts): nothing of a million rows is concatenated
    n_ph, n_ids = max(len(phases), 1), max(len(ids), 1)
    groups = [g for part in parts for g in _sums(*part, n_names=max(len(names), 1), n_ph=n_ph, n_ids=n_ids)]
    name_of, phase_of = list(names), list(phases)
    return {(name_of[p // n_ph], phase_of[p % n_ph]): v for p, v in groups}


def _mapped(codes: np.ndarray, lut: list[int]) -> np.ndarray:
    """``codes`` (-1: null) through ``lut``; as they are where ``lut`` numbers them in order."""
    if lut == list(range(len(lut))):
        return codes
    return np.array(lut + [-1], dtype=np.int64)[codes]


def _sums(name: np.ndarray, phase: np.ndarray, run: np.ndarray, step: np.ndarray, ms: np.ndarray, *,
          n_names: int, n_ph: int, n_ids: int) -> list[tuple[int, np.ndarray]]:
    """Per (row, phase) pair ``name * n_ph + phase`` in order of first appearance, its sum in each
    (run, step), in order of first appearance (NaN where every value is)."""
    if len(name) and min(int(name.min()), int(phase.min()), int(run.min())) < 0:
        keep = (name >= 0) & (phase >= 0) & (run >= 0)  # a row with a missing key is in no group
        name, phase, run, step, ms = name[keep], phase[keep], run[keep], step[keep], ms[keep]
    if not len(name):
        return []
    span = int(step.max()) + 1
    pair = name.astype(np.int64) * n_ph + phase
    dense = _dense_sums(pair, run.astype(np.int64) * span + step, ms, n_names * n_ph)
    if dense is not None:
        return dense
    group, firsts = codes_in_order((pair * n_ids + run) * span + step,  # (row, phase, run, step)
                                   n_names * n_ph * n_ids * span)
    total = group_sum(group, len(firsts), ms, min_count=1)
    pair_of = firsts // (n_ids * span)  # each group's (row, phase), in the groups' order
    pcode, puniq = codes_in_order(pair_of, n_names * n_ph)
    # a stable sort of small integers: numpy sorts 16-bit ones by radix (the same order)
    order = np.argsort(pcode.astype(np.int16) if len(puniq) < 2**15 else pcode, kind="stable")
    bounds = np.searchsorted(pcode[order], np.arange(len(puniq) + 1))
    return [(p, total[order[bounds[i]:bounds[i + 1]]]) for i, p in enumerate(puniq.tolist())]


def _dense_sums(pair: np.ndarray, run_step: np.ndarray, ms: np.ndarray, n_pairs: int) -> list | None:
    """:func:`_sums` where each (run, step) is one stretch of rows, as a recording writes them:
    the sums per (step, pair) are one table indexed by the stretch, with no hashing of a key per
    row. The same sums, added in the same order; ``None`` where the rows are not so laid out
    (ranks merged one after another) or the table would be far larger than the rows."""
    n = len(pair)
    change = np.empty(n, bool)
    change[0] = True
    np.not_equal(run_step[1:], run_step[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    n_seg = len(starts)
    if n_seg * n_pairs > 4 * n + (1 << 20):
        return None
    firsts = run_step[starts]
    if not (firsts[1:] > firsts[:-1]).all() and len(np.unique(firsts)) != n_seg:  # a (run, step) met twice
        return None
    seg = np.cumsum(change) - 1
    key = pair * n_seg + seg  # pair-major: each pair's steps lie side by side
    size = n_seg * n_pairs
    present = np.bincount(key, minlength=size) > 0
    ok = ~np.isnan(ms)
    if ok.all():
        total = np.bincount(key, weights=ms, minlength=size)
    else:
        total = np.bincount(key[ok], weights=ms[ok], minlength=size)
        total = np.where(np.bincount(key[ok], minlength=size) >= 1, total, np.nan)
    present, total = present.reshape(n_pairs, n_seg), total.reshape(n_pairs, n_seg)
    _, order = codes_in_order(pair, n_pairs)  # (row, phase) pairs in order of first appearance
    return [(p, total[p][present[p]]) for p in np.asarray(order).tolist()]


def metric_samples(steps: pd.DataFrame, runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per headline metric, its samples: TPOT per decode step, the others per generate call."""
    ids = generate_ids(runs)
    gen = runs[runs["run_id"].isin(ids)]
    out: dict[str, np.ndarray] = {}
    for m in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "total_ms"):
        out[m] = pd.to_numeric(gen[m], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    st = steps[steps["run_id"].isin(ids) & (steps["step"] > 0) & (steps["new_tokens"] > 0)]
    out["tpot_ms"] = (st["latency_ms"] / st["new_tokens"]).to_numpy(dtype="float64", na_value=np.nan)
    return out


def phase_forward(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    _, st = recorded(calls, steps, runs)
    return st[st["residue_ms"].notna()].groupby("phase")["forward_ms"].sum()
