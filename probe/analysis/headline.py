"""The first answer: prefill vs decode, side by side, adding up to the whole generate call.

:func:`phase_headline` gives one row per phase of the generate calls (prefill, decode, and any
other phase they had), one row ``setup and outside`` (generate's own time before the first
forward and after the last step's token: input preparation, cache set-up, the end-of-generate
work), and one row ``generate`` (the total). Shares are of the generate calls' wall time, so
the parts add up to 100 %. :func:`phase_totals` is the per-phase total of any steps frame.
"""

from __future__ import annotations

import math

import pandas as pd

from .. import fmt

#: the headline's rows besides the phases
SETUP = "setup and outside"
TOTAL = "generate"

HEADLINE: dict[str, str] = {
    "part": "string",  # a phase, SETUP or TOTAL
    "generates": "int64",  # generate calls summed over
    "steps": "Int64",  # forwards (null for SETUP)
    "time_ms": "float64",  # Σ step latency (forward + the sampling after it); SETUP: the rest of generate
    "share": "float64",  # of the generate calls' wall time (total_ms); the parts add up to 1
    "tokens": "Int64",  # prefill: prompt positions x rows; decode: new tokens x rows
    "ms_per_token": "float64",  # time_ms / tokens (prefill: per prompt token)
    "tok_s": "float64",  # tokens / time
    "kv_cache_bytes": "Int64",  # KV cache after the phase's last step (the last generate call)
    "mem_peak_bytes": "Int64",  # CUDA peak during the phase's steps; null where not measured (CPU)
}

PHASE_TOTALS: dict[str, str] = {
    "phase": "string", "steps": "int64", "tokens": "int64", "forward_ms": "float64",
    "outside_ms": "float64", "latency_ms": "float64", "mean_latency_ms": "float64", "tok_s": "float64",
}


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in columns.items()})


def _tokens(st: pd.DataFrame) -> pd.Series:
    """Positions each step processed (prefill-like phases) or tokens it produced (decode), x rows."""
    per_seq = st["q_len"].where(st["phase"] != "decode", st["new_tokens"])
    tokens = per_seq * st["batch"]
    if "requests" in st:  # a packed continuous-batching forward: q_len is all its tokens already
        tokens = tokens.where(st["requests"].isna(), st["q_len"])
    return tokens


def phase_totals(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per phase: steps, tokens, forward/outside/latency totals and means, tok/s."""
    if steps.empty:
        return _empty(PHASE_TOTALS)
    st = steps.assign(_tokens=_tokens(steps))
    g = st.groupby("phase", sort=False)
    out = pd.DataFrame(
        {
            "steps": g.size(),
            "tokens": g["_tokens"].sum(),
            "forward_ms": g["forward_ms"].sum(),
            "outside_ms": g["outside_ms"].sum(min_count=1),
            "latency_ms": g["latency_ms"].sum(min_count=1),
            "mean_latency_ms": g["latency_ms"].mean(),
        }
    ).reset_index()
    t = out["latency_ms"].where(out["latency_ms"].notna(), out["forward_ms"])
    out["tok_s"] = out["tokens"] / (t / 1e3)
    out["phase"] = out["phase"].astype("string")
    return out


def phase_headline(runs: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Prefill vs decode of the generate calls in ``runs`` (see the module's docstring).

    Args:
        runs, steps: a run's frames (:attr:`probe.Run.runs`, :attr:`probe.Run.steps`).
    Returns:
        One row per part (columns :data:`HEADLINE`); empty (typed) without a generate call.
    """
    gen = runs[runs["kind"] == "generate"]
    if gen.empty:
        return _empty(HEADLINE)
    ids = list(gen["run_id"])
    st = steps[steps["run_id"].isin(ids)]
    total = float(gen["total_ms"].sum(min_count=1))
    last = st[st["run_id"] == ids[-1]]
    rows = []
    stepped = 0.0
    for tot in phase_totals(st).itertuples(index=False):
        sub = st[st["phase"] == tot.phase]
        t = tot.latency_ms if not fmt.is_missing(tot.latency_ms) else tot.forward_ms
        stepped += t
        kv = last.loc[last["phase"] == tot.phase, "kv_cache_bytes"].dropna()
        peak = sub["mem_peak_bytes"].dropna()
        rows.append({
            "part": str(tot.phase), "steps": int(tot.steps), "time_ms": t, "tokens": int(tot.tokens),
            "kv_cache_bytes": int(kv.iloc[-1]) if len(kv) else None,
            "mem_peak_bytes": int(peak.max()) if len(peak) else None,
        })
    order = {"prefill": 0, "decode": 1}
    rows.sort(key=lambda r: order.get(r["part"], 2))
    rows.append({"part": SETUP, "steps": None, "time_ms": max(total - stepped, 0.0) if not math.isnan(total) else math.nan,
                 "tokens": None, "kv_cache_bytes": None, "mem_peak_bytes": None})
    peaks = gen["peak_mem_bytes"].dropna()
    rows.append({"part": TOTAL, "steps": int(len(st)), "time_ms": total, "tokens": None,
                 "kv_cache_bytes": int(gen["kv_cache_bytes"].dropna().iloc[-1]) if gen["kv_cache_bytes"].notna().any() else None,
                 "mem_peak_bytes": int(peaks.max()) if len(peaks) else None})
    out = pd.DataFrame(rows)
    out["generates"] = len(gen)
    out["share"] = out["time_ms"] / total if total and not math.isnan(total) else math.nan
    tokens = out["tokens"].astype("Float64")
    out["ms_per_token"] = (out["time_ms"] / tokens).astype("float64")
    out["tok_s"] = (tokens / (out["time_ms"] / 1e3)).astype("float64")
    return pd.DataFrame({c: out[c].astype(d) for c, d in HEADLINE.items()})


# --------------------------------------------------------------------------- display
#: the headline's figures as shown side by side, in order (label, column of :data:`HEADLINE`)
FIGURES: tuple[tuple[str, str], ...] = (
    ("steps", "steps"), ("time", "time_ms"), ("share", "share"), ("time per token", "ms_per_token"),
    ("tokens/s", "tok_s"), ("KV cache after", "kv_cache_bytes"), ("peak memory", "mem_peak_bytes"),
)


def share_text(fraction: object) -> str:
    """A share as a plain percentage (:func:`probe.fmt.pct`), ``< 0.01%`` where tiny and not zero."""
    return fmt.pct(fraction)


#: what the per-token figures count, said under every rendering of the headline
TOKENS_NOTE = ("time per token and tokens/s: prefill per prompt token (prompt length x batch), "
               "decode per new token")


def _cell(label: str, value: object) -> str:
    if fmt.is_missing(value):
        return ""
    if label == "steps":
        return fmt.count(value)
    if label == "share":
        return share_text(value)
    if label == "time":
        return fmt.ms(value, unit=True)
    if label == "time per token":
        return fmt.ms(value, unit=True)
    if label == "tokens/s":
        return fmt.tok_s(value)
    return fmt.nbytes(value)


def headline_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The headline as text, the parts side by side: one column per part (prefill, decode, ...,
    ``setup and outside``, ``generate``), one row per figure (:data:`FIGURES`), formatted by
    :mod:`probe.fmt` as the terminal, the report and the dashboard show it.

    Args:
        table: :func:`phase_headline` (:meth:`probe.Run.headline`).
    Returns:
        A frame of strings indexed by the figures' labels (``""`` where a part has no such
        figure); the ``peak memory`` row only where some part measured it (CUDA). Empty
        without a generate call.
    """
    if table.empty:
        return pd.DataFrame(dtype="string")
    rows = [(label, col) for label, col in FIGURES if col != "mem_peak_bytes" or table[col].notna().any()]
    parts = [str(p) for p in table["part"]]
    data = {part: [_cell(label, rec[col]) for label, col in rows]
            for part, rec in zip(parts, table.to_dict("records"))}
    return pd.DataFrame(data, index=pd.Index([label for label, _ in rows], name="figure"), dtype="string")


def shown_ids(ids: list, head: int = 12, tail: int = 4) -> str:
    """Token ids shortened for display: ``[5, 17, 9, …, 41]`` (the first ``head`` and last ``tail``)."""
    if len(ids) <= head + tail + 1:
        return "[" + ", ".join(str(i) for i in ids) + "]"
    return "[" + ", ".join(str(i) for i in ids[:head]) + ", …, " + ", ".join(str(i) for i in ids[-tail:]) + "]"


def sequences(generated: list[dict] | None) -> list[tuple[str, str, bool]]:
    """What the generate calls produced, one entry per distinct output, in order.

    Args:
        generated: :meth:`probe.Run.generated`.
    Returns:
        ``(label, content, is_text)``: ``label`` names the calls (and sequences) it came from
        (``""`` for a single call of one sequence; ``call 1, 2, 3`` where repeats produced the
        same output); ``content`` the text, or where the run kept none (``--no-text``, no
        tokenizer) the token ids shortened by :func:`shown_ids`, ``is_text`` telling which.
    """
    if not generated:
        return []
    many_calls = len(generated) > 1
    order: dict[tuple[str, bool], list[str]] = {}
    for n, g in enumerate(generated, 1):
        texts, ids = g.get("text"), g.get("token_ids")
        texts = [texts] if isinstance(texts, str) else texts
        items = [(t, True) for t in texts] if texts else [(shown_ids(i), False) for i in (ids or [])]
        for k, item in enumerate(items):
            where = (f"{n}" if many_calls else "") + (f" sequence {k}" if len(items) > 1 else "")
            order.setdefault(item, []).append(where.strip())
    out = []
    for (content, is_text), wheres in order.items():
        label = ", ".join(wheres)
        if many_calls:
            label = ("calls " if len(wheres) > 1 else "call ") + label
        out.append((label, content, is_text))
    return out


def headline_text(table: pd.DataFrame, generated: list[dict] | None = None, limit: int = 2000) -> str:
    """The headline as aligned plain text (the parts side by side), then what was generated.

    Args:
        table: :func:`phase_headline` (:meth:`probe.Run.headline`).
        generated: :meth:`probe.Run.generated`; its text (or, without text, its token ids) is
            printed below the table.
        limit: longest generated text printed whole; a longer one keeps its start and says
            how much is left out.
    Returns:
        Lines joined by newlines, no trailing newline.
    """
    cells = headline_cells(table)
    if cells.empty:
        lines = ["prefill vs decode: no generate call recorded"]
    else:
        n = int(table["generates"].iloc[0])
        lines = [f"prefill vs decode ({n} generate call{'s' if n != 1 else ''})"]
        labels = [str(i) for i in cells.index]
        first = max(len(s) for s in labels)
        widths = [max(len(str(c)), *(len(v) for v in cells[c])) for c in cells.columns]
        lines.append(" " * first + "".join(f"  {str(c):>{w}}" for c, w in zip(cells.columns, widths)))
        for label, row in zip(labels, cells.itertuples(index=False)):
            lines.append(f"{label:<{first}}" + "".join(f"  {v:>{w}}" for v, w in zip(row, widths)).rstrip())
        lines.append(TOKENS_NOTE)
    for label, content, is_text in sequences(generated):
        head = ("generated" if is_text else "generated token ids") + (f" ({label})" if label else "") \
            + ("" if is_text else ", the run kept no text")
        if len(content) > limit:
            content = content[:limit] + f"… [{len(content) - limit:,} more characters]"
        lines.append(f"{head}:")
        lines.extend("  " + line for line in content.splitlines() or [""])
    return "\n".join(lines)
