"""The values a saved run's columns may hold, beyond their types: one table, checked on load.

:mod:`probe.validate` checks that each column has the schema's type; this module checks that its
values are ones a recording can produce — no negative or missing time where a time was measured,
no step beyond its run's count, no layer beyond the model's, no row whose run is not in ``runs``.
Every rule is one vectorised comparison over a column, so a run of a million calls is checked
in milliseconds. ``NaN`` stays legal where it means "not measured" (``gpu_ms`` on CPU,
``outside_ms`` of forwards outside generate, a step without call records): those columns are
listed with ``nan=True``.

Frames are built so that they obey these rules: tiny negative self times and residues that the
probe's calibrated cost can leave are clamped when the frames are built
(:func:`probe.analysis.tree.annotate`), never when they are saved, so a negative value on load
means an edit or damage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .columns import ints, text_codes


@dataclass(frozen=True)
class Rule:
    """What one column may hold: values ``>= low`` (and ``<= high``), missing only if ``nan``."""

    low: float | None = 0.0
    high: float | None = None
    nan: bool = False


MEASURED = Rule()  # a time, count or size that was measured: >= 0, always present
OPTIONAL = Rule(nan=True)  # the same where "not measured" is a legal value
ANY_TIME = Rule(low=None, nan=True)  # a timestamp on a clock whose origin may follow it

RULES: dict[str, dict[str, Rule]] = {
    "calls": {
        "rank": MEASURED, "step": MEASURED, "depth": MEASURED, "layer": OPTIONAL, "q_len": MEASURED,
        "kv_len": MEASURED, "batch": MEASURED, "start_ms": MEASURED, "end_ms": MEASURED, "cpu_ms": MEASURED,
        "gpu_ms": OPTIONAL, "offload_ms": OPTIONAL, "hooks_ms": OPTIONAL, "mem_before_bytes": OPTIONAL,
        "mem_after_bytes": OPTIONAL, "mem_peak_bytes": OPTIONAL, "out_bytes": MEASURED, "call": OPTIONAL, "parent": OPTIONAL,
        "descendants": OPTIONAL, "self_ms": OPTIONAL, "gpu_self_ms": OPTIONAL,
    },
    "steps": {
        "rank": MEASURED, "step": MEASURED, "q_len": MEASURED, "kv_len": MEASURED, "batch": MEASURED,
        "start_ms": MEASURED, "forward_ms": MEASURED, "gpu_ms": OPTIONAL, "outside_ms": OPTIONAL,
        "latency_ms": OPTIONAL, "kv_cache_bytes": OPTIONAL, "mem_peak_bytes": OPTIONAL, "new_tokens": MEASURED,
        "blocks_ms": OPTIONAL, "probe_ms": OPTIONAL, "process_cpu_ms": OPTIONAL, "residue_ms": OPTIONAL,
        "gpu_residue_ms": OPTIONAL, "requests": OPTIONAL, "prefill_tokens": OPTIONAL, "decode_tokens": OPTIONAL,
        "prefill_chunk": OPTIONAL, "paged_cache_bytes": OPTIONAL, "schedule_ms": OPTIONAL, "cache_ms": OPTIONAL,
        "sample_ms": OPTIONAL, "update_ms": OPTIONAL,
    },
    "runs": {
        "rank": MEASURED, "parameters": MEASURED, "prompt_tokens": OPTIONAL, "new_tokens": OPTIONAL,
        "batch": OPTIONAL, "steps": MEASURED, "top_k": OPTIONAL, "top_p": Rule(high=1.0, nan=True),
        "temperature": OPTIONAL, "num_beams": Rule(low=1, nan=True), "max_new_tokens": OPTIONAL,
        "ttft_ms": OPTIONAL, "tpot_ms_mean": OPTIONAL, "prefill_tok_s": OPTIONAL, "decode_tok_s": OPTIONAL,
        "total_ms": OPTIONAL, "probe_start_ms": OPTIONAL, "probe_end_ms": OPTIONAL, "peak_mem_bytes": OPTIONAL, "kv_cache_bytes": OPTIONAL, "process_cpu_ms": OPTIONAL,
        "cpu_wait_ms": OPTIONAL,
    },
    "sampling": {
        "rank": MEASURED, "step": MEASURED, "order": MEASURED, "host_ms": MEASURED, "gpu_ms": OPTIONAL,
        "calls": OPTIONAL,
    },
    "requests": {
        "rank": MEASURED, "prompt_tokens": MEASURED, "generated_tokens": MEASURED, "max_new_tokens": OPTIONAL,
        "arrival_ms": ANY_TIME, "scheduled_ms": ANY_TIME, "first_token_ms": ANY_TIME, "finished_ms": ANY_TIME,
        "queue_ms": OPTIONAL, "ttft_ms": OPTIONAL, "itl_ms_mean": OPTIONAL, "first_step": OPTIONAL,
        "last_step": OPTIONAL, "prefill_chunks": OPTIONAL, "tf_ttft_ms": OPTIONAL, "tf_itl_ms_mean": OPTIONAL,
    },
    "ops": {
        "rank": MEASURED, "step": MEASURED, "q_len": MEASURED, "kv_len": MEASURED, "seq": MEASURED,
        "host_ms": MEASURED, "gpu_ms": OPTIONAL, "flops": OPTIONAL, "bytes_read_est": OPTIONAL, "bytes_written_est": OPTIONAL,
        "alloc_bytes": MEASURED, "live_bytes": Rule(low=None), "start_ms": MEASURED,
    },
    "ledger": {
        "rank": MEASURED, "step": MEASURED, "q_len": MEASURED, "kv_len": MEASURED, "depth": MEASURED,
        "weights_bytes": MEASURED, "kv_cache_bytes": MEASURED, "activations_bytes": MEASURED,
        "temporaries_bytes": MEASURED, "peak_added_bytes": MEASURED, "ops": MEASURED, "ops_ms": MEASURED,
        "flops": OPTIONAL, "start_ms": MEASURED, "end_ms": MEASURED,
    },
    "allocations": {"rank": MEASURED, "step": MEASURED, "seq": MEASURED, "bytes": MEASURED},
}

#: frames whose rows each belong to a run of ``runs`` (by ``run_id``)
RUN_ROWS = ("calls", "steps", "sampling", "requests", "ops", "ledger", "allocations")


def _values(s: pd.Series) -> np.ndarray:
    return s.to_numpy(dtype="float64", na_value=np.nan)


#: rows of a nullable column checked at a time: its copies stay small (a million rows: 1 MB, not 9)
PART_ROWS = 1 << 17


def _int_parts(s: pd.Series):
    """``(first row, values, missing)`` of a nullable integer column in parts of
    :data:`PART_ROWS` rows (values at the column's width, 0 where missing)."""
    arr = s.array
    for i in range(0, len(arr), PART_ROWS):
        part = arr[i:i + PART_ROWS]  # a view
        yield i, part.to_numpy(dtype=s.dtype.numpy_dtype, na_value=0), part.isna()


def _within(s: pd.Series, rule: Rule) -> bool:
    """Whether every value of a numpy-backed ``s`` keeps ``rule`` (missing ones only where it
    allows them), decided on the column's own array; ``False`` where it does not or cannot tell."""
    if not len(s):
        return False
    if isinstance(s.array, pd.arrays.IntegerArray):  # a nullable integer: its values where not missing
        lo = hi = None
        for _, v, missing in _int_parts(s):
            if missing.any():
                if not rule.nan:
                    return False
                v = v[~missing]
            if len(v):
                lo = v.min() if lo is None else min(lo, v.min())
                hi = v.max() if hi is None else max(hi, v.max())
        if lo is None:  # every value missing
            return True
        return (rule.low is None or lo >= rule.low) and (rule.high is None or hi <= rule.high)
    if not isinstance(s.dtype, np.dtype) or s.dtype.kind not in "iuf":
        return False
    v = s.to_numpy()
    if v.dtype.kind == "f":
        if not rule.nan and np.isnan(v).any():
            return False
        lo, hi = np.fmin.reduce(v), np.fmax.reduce(v)  # NaN only when every value is
        if np.isnan(lo):
            return True
    else:
        lo, hi = v.min(), v.max()
    return (rule.low is None or lo >= rule.low) and (rule.high is None or hi <= rule.high)


def _first(mask: np.ndarray, values: np.ndarray | None = None) -> str:
    i = int(np.flatnonzero(mask)[0])
    return f"row {i}" + (f": {values[i]!r}" if values is not None else "")


def column_problems(frames: dict[str, pd.DataFrame]) -> list[str]:
    """Each column of :data:`RULES` against its rule: ``"calls.parquet: column 'cpu_ms' ..."``."""
    out = []
    for key, rules in RULES.items():
        df = frames.get(key)
        if df is None or df.empty:
            continue
        for col, rule in rules.items():
            if col not in df.columns:
                continue
            if _within(df[col], rule):  # the common case, decided without a float copy of the column
                continue
            v = _values(df[col])
            nan = np.isnan(v)
            if not rule.nan and nan.any():
                out.append(f"{key}.parquet: column {col!r} has {int(nan.sum())} missing values where a "
                           f"recording always measures one (first at {_first(nan)})")
            if rule.low is not None:
                low = ~nan & (v < rule.low)
                if low.any():
                    what = "negative" if rule.low == 0 else f"below {rule.low:g}"
                    out.append(f"{key}.parquet: column {col!r} has {int(low.sum())} {what} values, which no "
                               f"recording produces (first at {_first(low, v)})")
            if rule.high is not None:
                high = ~nan & (v > rule.high)
                if high.any():
                    out.append(f"{key}.parquet: column {col!r} has {int(high.sum())} values above {rule.high:g} "
                               f"(first at {_first(high, v)})")
    return out


def _layer_count(meta: dict) -> int | None:
    """Decoder layers of the recorded model: from its recorded modules, else its config."""
    layers = [m.get("layer") for m in meta.get("modules") or [] if isinstance(m, dict)]
    layers = [x for x in layers if isinstance(x, int) and not isinstance(x, bool)]
    if layers:
        return max(layers) + 1
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = cfg.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def link_problems(frames: dict[str, pd.DataFrame], meta: dict) -> list[str]:
    """Rows that point nowhere: a run id not in ``runs``, a call of a step not in ``steps``, a
    step at or beyond its run's step count, a layer beyond the model's."""
    out = []
    runs = frames.get("runs")
    ids = set(runs["run_id"].dropna().astype(str)) if runs is not None else set()
    codes: dict[str, tuple[np.ndarray, list]] = {}  # run ids factorised once per frame
    for key in RUN_ROWS:
        df = frames.get(key)
        if df is None or df.empty or "run_id" not in df.columns:
            continue
        c, u = codes[key] = _run_codes(df)
        orphan = ~np.array([v in ids for v in u] or [False])[c]
        if orphan.any():
            out.append(f"{key}.parquet: {int(orphan.sum())} rows belong to no run of runs.parquet "
                       f"(first at {_first(orphan, df['run_id'].to_numpy())})")
    steps, calls = frames.get("steps"), frames.get("calls")
    if steps is not None and len(steps) and runs is not None and len(runs):
        count = runs.drop_duplicates("run_id").set_index("run_id")["steps"]
        limit = _values(steps["run_id"].map(count))
        beyond = ~np.isnan(limit) & (_values(steps["step"]) >= limit)
        if beyond.any():
            out.append(f"steps.parquet: {int(beyond.sum())} steps lie beyond their run's step count in "
                       f"runs.parquet (first at {_first(beyond, steps['step'].to_numpy())})")
    if calls is not None and len(calls) and steps is not None:
        for k in ("steps", "calls"):
            if k not in codes:
                codes[k] = _run_codes(frames[k])
        runs_ = [*codes["steps"][1], *codes["calls"][1]]
        have = _step_key(steps, *codes["steps"], runs=runs_)
        # a step's calls lie together: each stretch of one (run, step) is looked up once
        c = codes["calls"][0]
        step = ints(calls["step"])
        starts = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (step[1:] != step[:-1])])
        del step
        lost = ~np.isin(_step_key(calls, *codes["calls"], runs=runs_, rows=starts), have)
        if lost.any():
            size = np.diff(np.r_[starts, len(c)])
            out.append(f"calls.parquet: {int(size[lost].sum())} calls belong to no step of steps.parquet "
                       f"(first at row {int(starts[np.flatnonzero(lost)[0]])})")
    n_layers = _layer_count(meta)
    if calls is not None and len(calls) and n_layers is not None and "layer" in calls.columns:
        count, first = 0, ""
        for i, v, missing in _layer_parts(calls["layer"]):
            beyond = (v >= n_layers) & ~missing
            if beyond.any():
                count += int(beyond.sum())
                at = int(np.flatnonzero(beyond)[0])
                first = first or f"row {i + at}: {v[at].item()!r}"
        if count:
            out.append(f"calls.parquet: column 'layer' has {count} values beyond the model's "
                       f"{n_layers} layers (first at {first})")
    return out


def _layer_parts(s: pd.Series):
    """The ``layer`` column in parts as :func:`_int_parts` gives them (any other dtype whole)."""
    if isinstance(s.array, pd.arrays.IntegerArray):
        yield from _int_parts(s)
        return
    v = _values(s)
    missing = np.isnan(v)
    yield 0, np.where(missing, -1, v), missing


def _run_codes(df: pd.DataFrame) -> tuple[np.ndarray, list]:
    """The run id of each row as codes into its distinct values (text, or None for a null)."""
    if "run_id" not in df.columns:
        return np.zeros(len(df), np.int64), [None]
    s = df["run_id"]
    if isinstance(s.dtype, pd.CategoricalDtype):  # its categories, and a null after them: nothing hashed
        cats = [str(v) for v in s.cat.categories]
        c = s.cat.codes.to_numpy()  # as narrow as the categories allow (a million rows: 1 MB, not 8)
        if c.dtype.itemsize < 8 and len(cats) >= np.iinfo(c.dtype).max:
            c = c.astype(np.int64)
        return np.where(c < 0, c.dtype.type(len(cats)), c), [*cats, None]
    c, u = text_codes(s, na_sentinel=False)
    return c, [None if v is pd.NA else str(v) for v in u]


def _step_key(df: pd.DataFrame, codes: np.ndarray, uniq: list, runs: list, rows: np.ndarray | None = None) -> np.ndarray:
    """One integer per row (of ``rows``, default all) naming its (run id, step), comparable between
    frames whose run ids are numbered by their position in ``runs`` (``codes`` into ``uniq``: this
    frame's own factorisation)."""
    number = {}
    for v in runs:
        number.setdefault(v, len(number))
    lut = np.array([number[v] for v in uniq] or [0], dtype=np.int64)
    step = ints(df["step"])  # no copy of a numpy column: only the rows asked are taken
    if rows is not None:
        codes, step = codes[rows], step[rows]
    return lut[codes] * (1 << 40) + step.astype(np.int64) + 1


def problems(frames: dict[str, pd.DataFrame], meta: dict) -> list[str]:
    """Every rule a run's frames break, as lines naming file, column and first row; empty if none."""
    return column_problems(frames) + link_problems(frames, meta)
