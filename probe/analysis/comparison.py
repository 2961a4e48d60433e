"""Two runs side by side: does B differ from A beyond the noise, and may they be compared at all.

- :func:`significance`: for each headline metric and each row of the levels asked for (block,
  role, module) × phase, the relative slowdown of B against A with a 95 % **bootstrap confidence
  interval** (percentile method, :data:`BOOTSTRAP_RESAMPLES` resamples of each run's samples with
  replacement, fixed seed so a report is reproducible; past :data:`LARGE_SAMPLE` samples the
  normal approximation of the ratio of means, whose cost does not grow with the samples).
  Samples are per step for rows (a row's time in each step of the phase) and TPOT (each decode
  step's latency per token), per generate call for TTFT, tok/s and total time. A difference is
  **significant** when the interval excludes zero *and* a two-sided Mann–Whitney U test of the two
  samples gives p < 0.05 (:func:`mann_whitney_p`): the percentile bootstrap is too narrow for a
  handful of samples, the rank test is exact there and unmoved by one outlier.
- :func:`gate`: the rows slower by more than a percentage, significantly once every row judged
  at once is accounted for (Holm's correction): ``probe compare --fail-above`` names the module
  that regressed (``model.layers.5``), and :func:`gate_verdict` gives the decision as data.
- :func:`comparability`: why two runs should not be compared (different model, depth, prompt...).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import schema
from .accounting import PROBE
from .labels import same_rows
from .samples import OUTSIDE, clock_of, generate_ids, metric_samples, phase_forward, step_samples
from ..schema import PHASES, SIGNIFICANCE

BOOTSTRAP_RESAMPLES = 2000
#: above this many samples (both runs) the interval comes from the normal approximation
LARGE_SAMPLE = 400
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
#: rows below this share of their phase's forward time in A are shown but not gated
GATE_MIN_SHARE = 0.01

#: headline metrics where a larger value is better (the slowdown is then A / B - 1)
HIGHER_IS_BETTER = frozenset({"prefill_tok_s", "decode_tok_s"})


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
    if len(a) + len(b) > LARGE_SAMPLE:
        return (point * 100, *_delta_interval(a, b, higher_is_better, confidence))
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


def _delta_interval(a: np.ndarray, b: np.ndarray, higher_is_better: bool, confidence: float) -> tuple[float, float]:
    """The interval of a ratio of means from the normal approximation (delta method): for
    samples past :data:`LARGE_SAMPLE`, where the bootstrap's cost grows with every sample and
    the central limit makes it unnecessary."""
    num, den = (a, b) if higher_is_better else (b, a)
    mn, md = num.mean(), den.mean()
    r = mn / md
    se = r * math.sqrt(num.var(ddof=1) / (len(num) * mn**2) + den.var(ddof=1) / (len(den) * md**2))
    z = math.sqrt(2) * _erfinv(confidence)
    return (r - z * se - 1.0) * 100, (r + z * se - 1.0) * 100


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method on :func:`math.erf` (a few steps suffice)."""
    x = 0.0
    for _ in range(50):
        step = (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
        x -= step
        if abs(step) < 1e-12:
            break
    return x


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of ``p_values`` (NaN kept): the family-wise error stays at
    the level of each test although many rows (every module, block, role and headline figure)
    are judged at once."""
    p = np.asarray(p_values, dtype="float64")
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adj
    return out


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
    n = n1 + n2
    # one sort gives the average ranks (pandas' rank(method="average")) and the tie counts
    order = np.argsort(both)  # any order of equal values: a tie's rank is its run's mean either way
    ordered = both[order]
    start = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each run of equal values
    t = np.diff(np.r_[start, n])  # its length
    ranks = np.empty(n)
    ranks[order] = np.repeat(start + (t + 1) / 2, t)  # 1-based ranks, a tie's the mean of its run
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    ties = len(start) < n
    if not ties and n1 * n2 <= 400:
        # counts[k] = arrangements with U = k, by the recurrence over the largest element
        counts = _u_counts(n1, n2)
        total = counts.sum()
        u = min(u1, n1 * n2 - u1)
        p = 2 * counts[: int(math.floor(u)) + 1].sum() / total
        return float(min(1.0, p))
    mu = n1 * n2 / 2
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
    clock = clock_of([run_a.calls, run_b.calls])
    fwd_a = phase_forward(run_a.calls, run_a.steps, run_a.runs)
    tested: set[tuple[str, str]] = set()
    for i, level in enumerate(levels):
        if any(same_rows(run_a.calls, level, seen) and same_rows(run_b.calls, level, seen) for seen in levels[:i]):
            continue  # e.g. roles at depth blocks: the blocks again, not sampled twice
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


#: the verdict of a row whose difference the samples do not establish, however they fall short
NOT_SHOWN = "not shown to differ"


def verdict(row) -> str:
    """A row of :func:`significance` in words."""
    if row["name"] == PROBE:
        return "the probe's own cost (not judged)"
    if not row["a_n"] or not row["b_n"]:
        return "only in B" if row["b_n"] else "only in A"
    if pd.isna(row["significant"]):
        return "too few samples"
    if not row["significant"]:
        return NOT_SHOWN
    return "B slower" if row["slowdown_pct"] > 0 else "B faster"


def gate(sig: pd.DataFrame, fail_above_pct: float, min_share: float = GATE_MIN_SHARE) -> pd.DataFrame:
    """The rows of :func:`significance` that fail ``probe compare --fail-above PCT``.

    Judged: the headline metrics and every row of every level tested — each module by name
    (``model.layers.5``), the roles and the blocks — whose share of A's forward time in its phase
    is at least ``min_share`` (a part of 0.1 % of the step cannot slow the model by much,
    however significant its change), the time outside the model and the residue included;
    never the probe's own calibrated cost. As many rows are judged at once, the rank test's
    p-values are adjusted (Holm, column ``p_holm``) within two families: the headline figures
    (a handful, sampled per generate call) and the rows (dozens to thousands, sampled per step),
    so a regression of TTFT over five repeats is not drowned by the number of modules. A row
    fails when B is slower by more than ``fail_above_pct`` percent, its interval lies wholly
    above zero and its adjusted p is below 0.05.
    """
    if sig.empty:
        return sig.assign(p_holm=pd.Series(dtype="float64"))
    judged = gate_family(sig, min_share)
    p = sig["p_value"].to_numpy(dtype="float64", na_value=np.nan)
    adjusted = np.full(len(sig), np.nan)
    metric = sig["level"].eq("metric").to_numpy(dtype=bool)
    for family in (judged & metric, judged & ~metric):  # the headline figures; the rows
        adjusted[family] = holm(p[family])
    out = sig.assign(p_holm=adjusted)
    slower = (out["slowdown_pct"] > fail_above_pct) & (out["ci_low_pct"] > 0) & (out["p_holm"] < ALPHA)
    return out[judged & slower.fillna(False).to_numpy(dtype=bool)].reset_index(drop=True)


def gate_family(sig: pd.DataFrame, min_share: float = GATE_MIN_SHARE) -> np.ndarray:
    """Which rows of :func:`significance` the gate judges (see :func:`gate`), as a mask."""
    name = sig["name"].astype(str)
    big = sig["a_share"].ge(min_share).fillna(False).astype(bool)
    return (sig["level"].eq("metric") | name.eq(OUTSIDE) | big).to_numpy(dtype=bool) & ~name.eq(PROBE).to_numpy()


def gate_verdict(sig: pd.DataFrame, fail_above_pct: float, min_share: float = GATE_MIN_SHARE) -> dict:
    """The gate's decision as plain data (``compare.json``'s ``gate``): passed or not, the
    threshold, how many rows were judged and each failing row with its interval and p-values."""
    failed = gate(sig, fail_above_pct, min_share)
    rows = [{"level": str(r["level"]), "name": str(r["name"]), "phase": str(r["phase"]),
             "slowdown_pct": _num(r["slowdown_pct"]), "ci_pct": [_num(r["ci_low_pct"]), _num(r["ci_high_pct"])],
             "p_value": _num(r["p_value"]), "p_holm": _num(r["p_holm"]), "a_share": _num(r["a_share"])}
            for _, r in failed.iterrows()]
    return {"fail_above_pct": float(fail_above_pct), "passed": not rows,
            "judged": int(gate_family(sig, min_share).sum()) if len(sig) else 0, "min_share": min_share,
            "correction": "holm, within the headline figures and within the rows", "alpha": ALPHA,
            "failures": rows}


def _num(v) -> float | None:
    return None if v is None or pd.isna(v) else float(v)

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
    na, nb = len(generate_ids(run_a.runs)), len(generate_ids(run_b.runs))
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
