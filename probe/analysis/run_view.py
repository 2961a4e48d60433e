"""How a :class:`probe.analysis.run.Run` shows itself: ``repr``, ``print`` and Jupyter's view."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from .. import fmt
from .headline import headline_text


def generated(run: Any) -> list[dict]:
    """What each generate call produced (:meth:`Run.generated`)."""
    texts = (run.meta.get("text") or {}).get("generated") or {}
    out = []
    gen = run.runs[run.runs["kind"] == "generate"]
    for run_id, output_ids in zip(gen["run_id"].tolist(), gen["output_ids"].tolist()):  # no namedtuple class made
        ids = json.loads(output_ids) if isinstance(output_ids, str) else None
        out.append({"run_id": run_id, "token_ids": ids, "text": texts.get(run_id)})
    return out


def html(run: Any) -> str:
    """Jupyter's view: the generate calls' headline numbers and the per-role summary, in the
    units and formats of the terminal and the report (:mod:`probe.fmt`)."""
    runs = run.runs
    head = "<b>probe run</b>"
    if runs.empty:
        return head + ": no records"
    cols = [c for c in ("run_id", "model_id", "status", "prompt_tokens", "new_tokens", "ttft_ms",
                        "tpot_ms_mean", "prefill_tok_s", "decode_tok_s", "total_ms", "peak_mem_bytes",
                        "kv_cache_bytes") if c in runs]
    table = fmt.frame(runs[cols], drop_empty=True).to_html(index=False, escape=True, na_rep="")
    summ = fmt.frame(run.summary(by="role"), drop_empty=True)
    table2 = summ.to_html(index=False, escape=True, na_rep="")
    return f"{head} {escape(str(run.path or ''))}{table}<br>{table2}"


def short(run: Any) -> str:
    """``repr(run)``: the frames' sizes and the folder."""
    return (
        f"<probe.Run runs={len(run.runs)} steps={len(run.steps)} calls={len(run.calls)}"
        f"{f' requests={len(run.requests)}' if len(run.requests) else ''}"
        f"{' path=' + str(run.path) if run.path else ''}>"
    )


def text(run: Any) -> str:
    """``print(run)``: the headline as aligned text, then what was generated; a run without a
    generate call prints its repr."""
    head = run.headline()
    if head.empty:
        return short(run)
    return headline_text(head, generated(run))
