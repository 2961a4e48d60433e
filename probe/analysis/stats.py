"""Spread over repeated generate calls, and whether two runs differ by more than their noise.

Pure functions over the frames (pandas and numpy only), so they are tested with numbers made
up for the purpose.

- :func:`block_spread` / :func:`headline_spread`: median and **min–max** over the recorded
  generate calls of a run (``probe run --repeat N``), per block × phase and per headline metric.
  With a handful of repeats min–max is what was seen; a percentile range would interpolate.
- :func:`significance`: for each block × phase and headline metric of two runs, the relative
  slowdown of B against A with a 95 % **bootstrap confidence interval** (percentile method,
  :data:`BOOTSTRAP_RESAMPLES` resamples of each run's samples with replacement, fixed seed so a
  report is reproducible). Samples are per step for blocks (a block's time in each step of the
  phase) and TPOT (each decode step's latency per token), per generate call for TTFT, tok/s and
  total time. A difference is **significant** when the interval excludes zero *and* a two-sided
  Mann–Whitney U test of the two samples gives p < 0.05 (:func:`mann_whitney_p`): the
  percentile bootstrap is too narrow for a handful of samples, the rank test is exact there and
  unmoved by one outlier.
- :func:`gate`: the rows slower by more than a percentage, significantly (``probe compare
  --fail-above``); :func:`comparability` says why two runs should not be compared.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import schema
from . import tree
from .accounting import PROBE, RESIDUE, check_level, labels
from ..schema import HEADLINE_SPREAD, PHASES, SIGNIFICANCE, SPREAD, Level

OUTSIDE = "(outside model)"

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
#: blocks below this share of their phase's forward time in A are shown but not gated
GATE_MIN_SHARE = 0.01

SPREAD_METRICS = ("ttft_ms", "tpot_ms_p50", "tpot_ms_mean", "prefill_tok_s", "decode_tok_s", "total_ms")

#: headline metrics where a larger value is better (the slowdown is then A / B - 1)
HIGHER_IS_BETTER = frozenset({"prefill_tok_s", "decode_tok_s"})


def _generate_ids(runs: pd.DataFrame) -> list[str]:
    """The successful generate calls; of a run merged from several ranks (tensor parallel), the
    lowest rank's: the ranks record the same calls side by side, not repeats of them."""
    if runs.empty:
        return []
    gen = runs[(runs["kind"] == "generate") & (runs["status"] == "ok")]
    if "rank" in gen and gen["rank"].nunique() > 1:
        gen = gen[gen["rank"] == gen["rank"].min()]
    return [str(v) for v in gen["run_id"]]


# --------------------------------------------------------------------------- spread
def _recorded(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The successful generate calls' calls and steps, with the call tree's columns."""
    ids = _generate_ids(runs)
    calls, steps = tree.ensure(calls, steps)
    return calls[calls["run_id"].isin(ids)], steps[steps["run_id"].isin(ids)]


def _per_step(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level,
              clock: str = "host") -> pd.DataFrame:
    """Each row's time in each step of the successful generate calls: ``name, phase, run_id,
    step, ms``. The rows are :meth:`probe.Run.summary`'s at ``level`` (self time, so they never
    overlap), then ``(residue)`` and, on the host clock, ``(probe)`` (the forward's other parts,
    over the steps with call records), then ``(outside model)`` (time in generate between
    forwards). ``clock`` "gpu" reads ``gpu_self_ms`` and ``gpu_residue_ms``."""
    check_level(level)
    c, st = _recorded(calls, steps, runs)
    parts = []
    if len(c):
        col = "gpu_self_ms" if clock == "gpu" else "self_ms"
        parts.append(pd.DataFrame({"name": labels(c, level), "phase": c["phase"].to_numpy(), "run_id": c["run_id"].to_numpy(),
                                   "step": c["step"].to_numpy(),
                                   "ms": c[col].to_numpy(dtype="float64", na_value=np.nan)}))
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


def per_generate_totals(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame,
                        level: Level = "block") -> pd.DataFrame:
    """Each row's self time per phase in each successful generate call (the rows of
    :func:`_per_step` summed over the steps). Columns ``level, name, phase, run_id, total_ms``."""
    per = _per_step(calls, steps, runs, level)
    out = per.groupby(["name", "phase", "run_id"], sort=False)["ms"].sum().rename("total_ms").reset_index()
    cols = {"level": "string", "name": "string", "phase": "string", "run_id": "string", "total_ms": "float64"}
    return out.assign(level=level)[list(cols)].astype(cols)


def _spread_stats(g) -> pd.DataFrame:
    med = g.median()
    lo, hi = g.min(), g.max()
    return pd.DataFrame({"generates": g.size(), "median_ms": med, "min_ms": lo, "max_ms": hi,
                         "spread_pct": ((hi - lo) / med * 100).where(med > 0)})


def block_spread(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level = "block") -> pd.DataFrame:
    """Median and min–max over the generate calls of each row's self time per phase.

    Args:
        calls, steps, runs: the run's frames.
        level: ``"block"`` (embed, layer, norm, head, model), ``"role"`` or ``"module"``, the
            levels of :meth:`probe.Run.summary`.

    Returns:
        Columns of :data:`SPREAD`, one row per name and phase (with ``(residue)``,
        ``(probe)`` and ``(outside model)`` rows), in phase order. One generate call gives
        min = max = median. Joins ``Run.summary(level)`` on ``(level, name, phase)``.
    """
    tot = per_generate_totals(calls, steps, runs, level=level)
    if tot.empty:
        return schema.empty(SPREAD)
    tot["_seq"] = np.arange(len(tot))
    first = tot.groupby(["level", "name", "phase"], sort=False)[["_seq"]].first()
    g = tot.groupby(["level", "name", "phase"], sort=False)["total_ms"]
    out = _spread_stats(g).join(first).reset_index()
    order = {p: i for i, p in enumerate(PHASES)}
    out["_p"] = out["phase"].map(order).fillna(len(order))
    out = out.sort_values(["_p", "_seq"], kind="stable")
    return out[list(SPREAD)].astype(SPREAD).reset_index(drop=True)


def headline_spread(runs: pd.DataFrame, metrics=SPREAD_METRICS) -> pd.DataFrame:
    """Median and min–max of each headline metric over the successful generate calls."""
    ids = _generate_ids(runs)
    if not ids:
        return schema.empty(HEADLINE_SPREAD)
    gen = runs[runs["run_id"].isin(ids)]
    rows = []
    for m in metrics:
        v = pd.to_numeric(gen[m], errors="coerce").astype("float64").dropna()
        if v.empty:
            continue
        med = float(v.median())
        rows.append({"metric": m, "generates": len(v), "median": med, "min": float(v.min()), "max": float(v.max()),
                     "spread_pct": (float(v.max() - v.min()) / med * 100) if med > 0 else math.nan})
    if not rows:
        return schema.empty(HEADLINE_SPREAD)
    return pd.DataFrame(rows).astype(HEADLINE_SPREAD)


# --------------------------------------------------------------------------- significance
def bootstrap_slowdown(a, b, *, higher_is_better: bool = False, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """How much worse ``b`` is than ``a``, percent, with a bootstrap interval.

    The statistic is ``mean(b) / mean(a) - 1`` (times: larger is worse) or ``mean(a) /
    mean(b) - 1`` (``higher_is_better``, e.g. tok/s), times 100. Each sample is resampled with
    replacement ``resamples`` times; the interval is the percentile interval at ``confidence``.

    Returns:
        ``(slowdown_pct, low_pct, high_pct)``; the interval is NaN when a side has fewer than two
        samples, everything NaN when a mean is not positive.
    """
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    ma, mb = a.mean(), b.mean()
    if ma <= 0 or mb <= 0:
        return math.nan, math.nan, math.nan
    point = (ma / mb if higher_is_better else mb / ma) - 1.0
    if len(a) < 2 or len(b) < 2:
        return point * 100, math.nan, math.nan
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    rb = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (ra / rb if higher_is_better else rb / ra) - 1.0
    r = r[np.isfinite(r)]
    if not len(r):
        return point * 100, math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return point * 100, float(lo) * 100, float(hi) * 100


def mann_whitney_p(a, b) -> float:
    """Two-sided p-value of the Mann–Whitney U (Wilcoxon rank-sum) test of ``a`` against ``b``.

    Exact (the distribution of U counted over every arrangement) for small samples without
    ties, the normal approximation with tie and continuity corrections otherwise. It needs no
    assumption about the shape of the distribution and one outlier cannot sway it, which suits
    timings: three against three can never reach p < 0.05 (the smallest possible p is 0.1).
    NaN when a side is empty.
    """
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        return math.nan
    both = np.concatenate([a, b])
    ranks = pd.Series(both).rank(method="average").to_numpy()
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    ties = len(np.unique(both)) < len(both)
    if not ties and n1 * n2 <= 400:
        # counts[k] = arrangements with U = k, by the recurrence over the largest element
        counts = _u_counts(n1, n2)
        total = counts.sum()
        u = min(u1, n1 * n2 - u1)
        p = 2 * counts[: int(math.floor(u)) + 1].sum() / total
        return float(min(1.0, p))
    mu = n1 * n2 / 2
    _, t = np.unique(both, return_counts=True)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - float((t ** 3 - t).sum()) / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (abs(u1 - mu) - 0.5) / math.sqrt(var)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))


def _u_counts(n1: int, n2: int) -> np.ndarray:
    """Number of orderings of n1 + n2 distinct values giving each U (0 .. n1*n2)."""
    # f[i][j] = polynomial in q of U over samples of sizes i, j: f(i,j) = q^j f(i-1,j) + f(i,j-1)
    f = [[None] * (n2 + 1) for _ in range(n1 + 1)]
    for i in range(n1 + 1):
        for j in range(n2 + 1):
            if i == 0 or j == 0:
                arr = np.zeros(i * j + 1, dtype="float64")
                arr[0] = 1.0
            else:
                arr = np.zeros(i * j + 1, dtype="float64")
                prev = f[i - 1][j]
                arr[j:j + len(prev)] += prev
                left = f[i][j - 1]
                arr[:len(left)] += left
            f[i][j] = arr
    return f[n1][n2]


def _clock(run_calls: list[pd.DataFrame]) -> str:
    return "gpu" if all(len(c) and c["gpu_ms"].notna().all() for c in run_calls) else "host"


def step_samples(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame, level: Level = "block",
                 clock: str = "host") -> dict[tuple[str, str], np.ndarray]:
    """Per (row, phase) at ``level``, the row's time in each step of that phase: the rows of
    :func:`_per_step`."""
    per = _per_step(calls, steps, runs, level, clock)
    per = per.groupby(["name", "phase", "run_id", "step"], sort=False)["ms"].sum(min_count=1)
    return {(str(name), str(phase)): s.to_numpy(dtype="float64", na_value=np.nan)
            for (name, phase), s in per.groupby(level=[0, 1], sort=False)}


def metric_samples(steps: pd.DataFrame, runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per headline metric, its samples: TPOT per decode step, the others per generate call."""
    ids = _generate_ids(runs)
    gen = runs[runs["run_id"].isin(ids)]
    out: dict[str, np.ndarray] = {}
    for m in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "total_ms"):
        out[m] = pd.to_numeric(gen[m], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    st = steps[steps["run_id"].isin(ids) & (steps["step"] > 0) & (steps["new_tokens"] > 0)]
    out["tpot_ms"] = (st["latency_ms"] / st["new_tokens"]).to_numpy(dtype="float64", na_value=np.nan)
    return out


def _phase_forward(calls: pd.DataFrame, steps: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    _, st = _recorded(calls, steps, runs)
    return st[st["residue_ms"].notna()].groupby("phase")["forward_ms"].sum()


def significance(run_a, run_b, levels=("block", "role"), seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> pd.DataFrame:
    """Is B slower or faster than A, beyond the noise? Per headline metric and block × phase.

    Args:
        run_a, run_b: :class:`probe.Run` objects (A is the baseline).
        levels: levels of :meth:`probe.Run.summary` to test (``"block"``, ``"role"``,
            ``"module"``); a level is tested on self time, so its rows never overlap.
        seed, resamples: the bootstrap's (see :func:`bootstrap_slowdown`).

    Returns:
        Columns of :data:`SIGNIFICANCE`: headline metrics first, then blocks by level
        and phase. Blocks are timed on the GPU clock where every call of both runs has it.
    """
    rows = []
    ma, mb = metric_samples(run_a.steps, run_a.runs), metric_samples(run_b.steps, run_b.runs)
    for m in ("ttft_ms", "tpot_ms", "prefill_tok_s", "decode_tok_s", "total_ms"):
        a, b = ma[m], mb[m]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if not len(a) and not len(b):
            continue
        p, lo, hi = bootstrap_slowdown(a, b, higher_is_better=m in HIGHER_IS_BETTER, seed=seed, resamples=resamples)
        rows.append(_row("metric", m, "", "tok/s" if m.endswith("tok_s") else "ms", a, b, p, lo, hi, math.nan,
                         mann_whitney_p(a, b)))
    clock = _clock([run_a.calls, run_b.calls])
    fwd_a = _phase_forward(run_a.calls, run_a.steps, run_a.runs)
    tested: set[tuple[str, str]] = set()
    for level in levels:
        sa = step_samples(run_a.calls, run_a.steps, run_a.runs, level=level, clock=clock)
        sb = step_samples(run_b.calls, run_b.steps, run_b.runs, level=level, clock=clock)
        if level != levels[0]:  # the residue, probe and outside rows are the first level's
            sa = {k: v for k, v in sa.items() if not k[0].startswith("(")}
            sb = {k: v for k, v in sb.items() if not k[0].startswith("(")}
        if set(sa) | set(sb) <= tested:  # e.g. roles at depth blocks: the blocks again
            continue
        tested |= set(sa) | set(sb)
        # a part that took no time in either run (the probe's cost under an injected clock)
        sa = {k: v for k, v in sa.items() if np.nansum(v) or np.nansum(sb.get(k, np.zeros(0)))}
        sb = {k: v for k, v in sb.items() if np.nansum(v) or k in sa}
        keys = list(sa) + [k for k in sb if k not in sa]
        order = {p: i for i, p in enumerate(PHASES)}
        keys.sort(key=lambda k: order.get(k[1], len(order)))  # stable: A's block order within a phase
        for name, phase in keys:
            a, b = sa.get((name, phase), np.zeros(0)), sb.get((name, phase), np.zeros(0))
            p, lo, hi = bootstrap_slowdown(a, b, seed=seed, resamples=resamples)
            f = fwd_a.get(phase, math.nan)
            share = float(a.sum() / f) if len(a) and f and not math.isnan(f) and name != OUTSIDE else math.nan
            rows.append(_row(level, name, phase, clock, a, b, p, lo, hi, share, mann_whitney_p(a, b)))
    if not rows:
        return schema.empty(SIGNIFICANCE)
    return pd.DataFrame(rows).astype(SIGNIFICANCE)


def _row(level, name, phase, clock, a, b, p, lo, hi, share, pval) -> dict:
    sig = None if math.isnan(lo) or math.isnan(pval) else bool((lo > 0 or hi < 0) and pval < ALPHA)
    return {"level": level, "name": name, "phase": phase, "clock": clock, "a_n": len(a), "b_n": len(b),
            "a_mean": float(a.mean()) if len(a) else math.nan, "b_mean": float(b.mean()) if len(b) else math.nan,
            "slowdown_pct": p, "ci_low_pct": lo, "ci_high_pct": hi, "p_value": pval, "significant": sig,
            "a_share": share}


def verdict(row) -> str:
    """A row of :func:`significance` in words."""
    if not row["a_n"] or not row["b_n"]:
        return "only in B" if row["b_n"] else "only in A"
    if pd.isna(row["significant"]):
        return "too few samples"
    if not row["significant"]:
        if row["ci_low_pct"] > 0 or row["ci_high_pct"] < 0:
            return "not significant (rank test p >= 0.05)"
        return "within noise"
    return "B slower" if row["slowdown_pct"] > 0 else "B faster"


def gate(sig: pd.DataFrame, fail_above_pct: float, min_share: float = GATE_MIN_SHARE) -> pd.DataFrame:
    """The rows of :func:`significance` that fail ``probe compare --fail-above PCT``.

    A row fails when B is slower than A by more than ``fail_above_pct`` percent and the 95 %
    interval lies wholly above zero. Considered: the headline metrics and the block-level
    rows (the residue and the time outside the model included) whose share of A's forward
    time in the phase is at least ``min_share`` — a block of 0.1 % of the step cannot slow the
    model by much, however significant its change.
    """
    if sig.empty:
        return sig
    outside = sig["name"].eq(OUTSIDE)
    big = sig["a_share"].ge(min_share).fillna(False).astype(bool)
    eligible = sig["level"].eq("metric") | (sig["level"].eq("block") & (outside | big))
    failed = eligible & sig["significant"].fillna(False).astype(bool) & (sig["slowdown_pct"] > fail_above_pct) \
        & (sig["ci_low_pct"] > 0)
    return sig[failed].reset_index(drop=True)


# --------------------------------------------------------------------------- comparability
def fact(run, column: str) -> str:
    """The values of a ``runs`` column over a run's generate calls, as text (``unknown`` if none)."""
    runs = run.runs
    gen = runs[runs["kind"] == "generate"] if len(runs) else runs
    vals = [str(v) for v in (gen if len(gen) else runs)[column].dropna().unique()] if column in runs else []
    if not vals and run.meta.get(column) is not None:  # recorded once per run (depth, torch_threads)
        vals = [str(run.meta[column])]
    return ", ".join(vals) if vals else "unknown"


#: facts two compared runs should share: the ``runs`` column, its name, what a difference means
COMPARED_FACTS = (
    ("model_id", "model", "the blocks are different modules"),
    ("parameters", "parameter count", "the blocks do different work"),
    ("depth", "depth", "rows below the shallower depth exist in one run only, and self times of the "
                       "blocks above them are split differently; compare at the block level"),
    ("prompt_tokens", "prompt length", "prefill work differs with the prompt, and decode attends over "
                                       "a different KV length"),
    ("batch", "batch size", "every block does a different amount of work per step"),
    ("torch_threads", "torch thread count", "every CPU operator ran on a different number of threads, and "
                                            "on a busy machine more threads can be slower"),
)


def _differing(run_a, run_b) -> list[tuple[str, str, str, str]]:
    return [(label, a, b, why) for column, label, why in COMPARED_FACTS
            if (a := fact(run_a, column)) != (b := fact(run_b, column))]


def differences(run_a, run_b) -> list[str]:
    """Sentences naming the facts (model, depth, prompt length, batch) on which two runs differ,
    with what that means for the comparison; empty for like-for-like runs."""
    out = [f"the runs differ in {label} (A: {a}, B: {b}): {why}" for label, a, b, why in _differing(run_a, run_b)]
    na, nb = len(_generate_ids(run_a.runs)), len(_generate_ids(run_b.runs))
    if na != nb:
        out.append(f"the runs hold different numbers of generate calls (A: {na}, B: {nb}): totals (a_ms, b_ms) add "
                   "up over different numbers of calls; compare shares, the significance rows (means per step), "
                   "or record both with the same --repeat")
    return out


def comparability(run_a, run_b) -> list[str]:
    """Reasons two runs do not measure the same work (the facts of :data:`COMPARED_FACTS`), in
    short; empty when they may be compared (and gated)."""
    missing = [n for n, r in (("A", run_a), ("B", run_b))
               if r.runs.empty or not (r.runs["kind"] == "generate").any()]
    if missing:
        return [f"{' and '.join(missing)} holds no generate call"]
    return [f"different {label}: A {a} vs B {b}" for label, a, b, _ in _differing(run_a, run_b)]
