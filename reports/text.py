"""User strings as the reports show them: capped, so that a huge module name, model id or
command cannot blow up a page, a CSV or a trace (the saved run keeps them whole).

A capped string keeps its start, then ``…[+N chars #hash]``: strings that differ only past
the cap stay distinct, so tables grouped by module never merge two modules.
"""

from __future__ import annotations

import dataclasses

import hashlib
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from probe.analysis.run import Run

#: longest user string a report shows whole
MAX_TEXT = 300
#: JSON columns: data the CSV gives back whole (cut, they would no longer parse); HTML tables
#: cap them as they show them
JSON_COLUMNS = frozenset({"in_shapes", "out_shapes", "prompt_tokens_real", "generate_kwargs"})


def cap(value: object, limit: int = MAX_TEXT) -> object:
    """``value`` shortened to at most ``limit`` characters if it is a longer string, else as is."""
    if not isinstance(value, str) or len(value) <= limit:
        return value
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    tail = f"…[+{{}} chars #{digest}]"
    keep = max(limit - len(tail.format(len(value))) , 1)
    return value[:keep] + tail.format(len(value) - keep)


def cap_series(s: pd.Series, limit: int = MAX_TEXT) -> pd.Series:
    """``s`` with every string longer than ``limit`` capped (the same series when none is)."""
    if isinstance(s.dtype, pd.CategoricalDtype):  # the categories say whether any value is too long
        if not any(isinstance(v, str) and len(v) > limit for v in s.dtype.categories):
            return s
        s = s.astype("string")
    if len(s) == 0 or not (pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s)):
        return s
    if isinstance(s.dtype, pd.StringDtype) and s.dtype.storage == "pyarrow":
        import pyarrow as pa
        import pyarrow.compute as pc

        # bytes >= characters: the offsets alone say that no value is too long (no value is read)
        longest = pc.max(pc.binary_length(pa.array(s.array))).as_py()
        if longest is None or longest <= limit:
            return s
    uniq = s.dropna().unique()
    long = {v: cap(v, limit) for v in uniq if isinstance(v, str) and len(v) > limit}
    if not long:
        return s
    return s.map(lambda v: long.get(v, v) if isinstance(v, str) else v).astype(s.dtype)


def cap_frame(df: pd.DataFrame, limit: int = MAX_TEXT) -> pd.DataFrame:
    """``df`` with every text column but the JSON ones capped (the same frame when nothing is
    too long)."""
    out = None
    for col in df.columns:
        if col in JSON_COLUMNS:
            continue
        before = df[col]  # a new Series object at each lookup: compare with this one
        s = cap_series(before, limit)
        if s is not before:
            out = df.copy() if out is None else out
            out[col] = s
    return df if out is None else out


def cap_meta(meta: dict, limit: int = MAX_TEXT) -> dict:
    """``meta`` with its top-level strings capped (the prompt is shown elsewhere, with its own cap)."""
    return {k: (v if k == "prompt" else cap(v, limit)) for k, v in meta.items()}


def display_run(run: "Run") -> "Run":
    """``run`` with every user string capped, as every report shows it (``run`` itself untouched)."""
    from probe.analysis.run import Run

    calls, steps, runs = cap_frame(run.calls), cap_frame(run.steps), cap_frame(run.runs)
    meta = cap_meta(run.meta)
    if calls is run.calls and steps is run.steps and runs is run.runs and meta == run.meta:
        return run
    return dataclasses.replace(run, calls=calls, steps=steps, runs=runs, meta=meta)  # other frames as they are


#: longest prompt or generated text a report shows whole
MAX_LONG_TEXT = 4000


def run_prompt(meta: dict) -> tuple[str, str] | None:
    """The prompt to show with a run: ``(how, text)``, where ``how`` says whether it is the exact
    prompt that was run (``meta["text"]["prompt"]``, after the chat template) or the user's own
    (``meta["prompt"]``); None when the run kept neither."""
    exact = (meta.get("text") or {}).get("prompt") if isinstance(meta.get("text"), dict) else None
    if isinstance(exact, str):
        return "exactly as it was run (after the chat template, if any)", exact
    if meta.get("prompt") is not None:
        return "as given", str(meta["prompt"])
    return None
