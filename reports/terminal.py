"""The terminal's text of a run: prefill vs decode, where the time went, sampling stages, the
shape walk, comparisons and serving summaries (numbers by :mod:`probe.fmt`, as in the report).
"""

from __future__ import annotations

import json

from probe import fmt
from probe.analysis.headline import TOKENS_NOTE, headline_cells
from probe.roles import BLOCKS as BLOCK_ROLES
from probe.columns import ranked

from .deep_section import deep_lines

TIME_PHASES = ("prefill", "decode", "extend", "recompute")
#: role-level names that are no deeper than the blocks: the blocks and the forward's other parts
NOT_DEEPER = frozenset({*BLOCK_ROLES, "(residue)", "(probe)"})


def run_summary(run) -> str:
    """The readable summary `probe run` prints: prefill vs decode first, then the generated text,
    then the details (numbers by :mod:`probe.fmt`, as in the report)."""

    lines: list[str] = []
    runs = run.runs[run.runs["kind"] == "generate"]
    if runs.empty:
        return "no generate call was recorded"
    r = runs.iloc[-1]
    lines.extend(headline_lines(run.headline()))
    gen = [g for g in run.generated() if g["text"]]
    if gen:
        lines.append("")
        lines.append(f"generated  {gen[-1]['text'][0]!r}")
    lines.append("")
    lines.append(f"model      {r['model_id']} ({r['model_class']}, {int(r['parameters']) / 1e6:,.1f}M params, "
                 f"{r['dtype']}, {r['device']}, attention={r['attn_implementation']})")
    lines.append(f"status     {r['status']}")
    beams = "" if fmt.is_missing(r["num_beams"]) or int(r["num_beams"]) <= 1 else f" x {int(r['num_beams'])} beams"
    lines.append(f"tokens     prompt {r['prompt_tokens']} x batch {r['batch']}{beams}, new {r['new_tokens']}, "
                 f"steps {r['steps']}")

    def f(text: str, unit: str) -> str:
        return text + unit if text else "n/a"

    spread = run.headline_spread()
    n_gen = int(spread["generates"].max()) if len(spread) else 1
    if n_gen > 1:
        lines.append(f"repeats    {n_gen} recorded generate calls: median [min - max]")
        sp = spread.set_index("metric")

        def m(key: str, unit: str) -> str:
            if key not in sp.index:
                return "n/a"
            row = sp.loc[key]
            show = fmt.tok_s if key.endswith("tok_s") else fmt.ms
            return f"{show(row['median'])}{unit} [{show(row['min'])} - {show(row['max'])}]"

        lines.append(f"TTFT       {m('ttft_ms', ' ms')}    TPOT p50 {m('tpot_ms_p50', ' ms')}")
        lines.append(f"throughput prefill {m('prefill_tok_s', ' tok/s')}   decode {m('decode_tok_s', ' tok/s')}")
        lines.append(f"total      {m('total_ms', ' ms')}")
    else:
        lines.append(f"TTFT       {f(fmt.ms(r['ttft_ms']), ' ms')}    TPOT mean {f(fmt.ms(r['tpot_ms_mean']), ' ms')}  "
                     f"p50 {f(fmt.ms(r['tpot_ms_p50']), ' ms')}  p90 {f(fmt.ms(r['tpot_ms_p90']), ' ms')}")
        lines.append(f"throughput prefill {f(fmt.tok_s(r['prefill_tok_s']), ' tok/s')}   "
                     f"decode {f(fmt.tok_s(r['decode_tok_s']), ' tok/s')}   total {f(fmt.ms(r['total_ms']), ' ms')}")
    mem = []
    if not fmt.is_missing(r["peak_mem_bytes"]):
        mem.append(f"peak {fmt.nbytes(r['peak_mem_bytes'])}")
    if not fmt.is_missing(r["kv_cache_bytes"]):
        mem.append(f"KV cache after the last step {fmt.nbytes(r['kv_cache_bytes'])}")
    if mem:
        lines.append("memory     " + "   ".join(mem))

    lines.extend(level_lines(run, spread=n_gen > 1))
    lines.extend(sampling_lines(run))
    walk = walk_lines(run)
    if walk:
        lines.append("")
        lines.extend(walk)
    lines.extend(deep_lines(run))
    lines.extend(noise_lines(run))
    return "\n".join(lines)


def headline_lines(table) -> list[str]:
    """:meth:`probe.Run.headline` as aligned text: the parts side by side, one figure a row (the
    cells of :func:`probe.headline.headline_cells`, as the report and the dashboard show them)."""
    cells = headline_cells(table)
    if cells.empty:
        return []
    n = int(table["generates"].iloc[0])
    title = "prefill vs decode" + (f" (sum of {n} generate calls)" if n > 1 else "")
    rows = [[str(label), *row] for label, row in zip(cells.index, cells.itertuples(index=False))]
    return [*fmt.table(rows, [title, *map(str, cells.columns)], gap=3), TOKENS_NOTE]


def sampling_lines(run) -> list[str]:
    """The time outside the model split into the sampling stages, ms per step of each phase."""
    summ = run.sampling_summary()
    phases = [p for p in ("prefill", "decode", "extend", "recompute") if p in set(summ["phase"])]
    if summ.empty or not phases:
        return []
    cells: dict[str, dict[str, tuple[float, float]]] = {}
    for r in summ.itertuples(index=False):
        cells.setdefault(str(r.stage), {})[str(r.phase)] = (r.mean_ms, r.step_share)
    names = [k for k in cells if k != "remainder"] + (["remainder"] if "remainder" in cells else [])
    body = []
    for name in names:
        label = {"remainder": "remainder (token choice, bookkeeping)",
                 "dispatch": "dispatch (processors list)",
                 "probe": "probe (its own step bookkeeping)"}.get(name, name)
        row = [label]
        for p in phases:
            ms_, share = cells[name].get(p, (float("nan"), float("nan")))
            row += [fmt.ms(ms_), fmt.pct(share)]
        body.append(row)
    head = ["sampling step (outside the model)"] + [h for p in phases for h in (f"{p} ms", "of step")]
    return ["", *fmt.table(body, head)]


def noise_lines(run, label: str = "") -> list[str]:
    """The busy-machine warning (or the quiet figure) for the terminal."""
    b = run.noise()
    if b.busy:
        return ["", f"WARNING{label}: {b.message()}"]
    if b.wait_pct == b.wait_pct:  # measured (not NaN)
        return ["", f"machine{label}    quiet: {b.wait_pct:.1f} % of step time waiting for a CPU "
                f"(warning above {b.threshold_pct:.0f} %)"]
    return []


def level_lines(run, spread: bool = False) -> list[str]:
    """Where each phase's forward time went, per level: blocks, then roles where the run recorded
    more than the blocks. Rows hold self time, so each level adds up to 100 % with the residue.
    ``spread``: add each row's self time per generate call, median [min - max] (several calls)."""

    summ = run.summary()
    summ = summ[summ["phase"].isin(TIME_PHASES)]
    if summ.empty:
        return []
    deeper = set(summ.loc[summ["level"] == "role", "name"]) - NOT_DEEPER
    out = ["", "where the forward time went (self time: each instant counted once; share of the phase's forward)"]
    for level in ("block", "role") if deeper else ("block",):
        head = [level, "phase", "calls", "total ms", "self ms", "mean ms", "share"]
        spr = run.spread(level).set_index(["name", "phase"]) if spread else None
        if spr is not None:
            head.append("self ms per generate: median [min - max]")
        body = []
        for _, row in summ[summ["level"] == level].iterrows():
            line = [str(row["name"]), str(row["phase"]), fmt.count(row["calls"]), fmt.ms(row["total_ms"]),
                    fmt.ms(row["self_ms"]), fmt.ms(row["mean_ms"]), fmt.pct(row["share"])]
            key = (row["name"], row["phase"])
            if spr is not None:
                line.append(f"{fmt.ms(spr.loc[key, 'median_ms'])} [{fmt.ms(spr.loc[key, 'min_ms'])} - "
                            f"{fmt.ms(spr.loc[key, 'max_ms'])}]" if key in spr.index else "")
            body.append(line)
        out.extend(fmt.table(body, head, left=2))
        out.append("")
    ph = run.phase_summary().set_index("phase")
    outside = [f"{p} {fmt.ms(ph.loc[p, 'outside_ms'], unit=True)}" for p in TIME_PHASES
               if p in ph.index and not fmt.is_missing(ph.loc[p, "outside_ms"])]
    if outside:
        out.append("outside the model (logits processing, sampling): " + ", ".join(outside))
    if deeper:
        out.append("total ms: inclusive time of the row's calls; a block's self time is its whole subtree; "
                   "attention (rest) = the attention modules' time outside their projections and the attention "
                   "function (RoPE, cache update, reshapes)")
    return out


def walk_lines(run) -> list[str]:
    """The shape walk of the tutorial: each block's input -> output for prefill and one decode step."""
    from probe.schema import shape_text

    calls = run.calls
    if calls.empty:
        return []
    gen_runs = run.runs.loc[run.runs["kind"] == "generate", "run_id"].tolist()
    # the first generate call's steps (repeats have the same shapes)
    c = calls[calls["run_id"].isin(gen_runs[:1]) & calls["role"].isin(["embed", "layer", "norm", "head"])]
    out = ["shape walk (input -> output)"]
    for phase in ("prefill", "decode"):
        sub = c[c["phase"] == phase]
        if sub.empty:
            continue
        step = sub["step"].min()
        sub = sub[sub["step"] == step]
        out.append(f"  {phase} (step {step}):")
        layers = sub[sub["role"] == "layer"]
        same = layers[["in_shapes", "out_shapes"]].drop_duplicates().shape[0] == 1 and len(layers) > 1
        for _, row in sub.iterrows():
            name = row["module"]
            if row["role"] == "layer" and same:
                if row["layer"] != layers["layer"].min():
                    continue  # identical layers are folded into the first line
                prefix = str(layers["module"].iloc[0]).rsplit(".", 1)[0]
                name = f"{prefix}.{fmt.index_set(layers['layer'])} (each)"
            out.append(f"    {name:<44} {shape_text(row['in_shapes'])} -> {shape_text(row['out_shapes'])}")
    head = c[(c["phase"] == "prefill") & (c["role"] == "head")]
    if not head.empty:
        q = int(head.iloc[0]["q_len"])
        shp = json.loads(head.iloc[0]["out_shapes"])
        if shp and len(shp[0]) >= 2 and shp[0][-2] == 1 and q > 1:
            out.append("  note: generate() computes logits only at the last prompt position (logits_to_keep=1);"
                       " `probe run --full-logits` shows lm_head over all positions.")
    return out


def compare_lines(frame, roles: bool = True) -> list[str]:
    """A (self ms) and B (self ms) per block, then per role where the runs have roles below the
    blocks and ``roles`` (runs of different depths split a block's time differently: blocks only)."""
    frame = frame[frame["phase"].isin(TIME_PHASES)]
    roles = roles and bool(set(frame.loc[frame["level"] == "role", "name"])
                           - NOT_DEEPER)
    out = []


    def signed(v):
        return "" if fmt.is_missing(v) else ("+" if v >= 0 else "") + fmt.ms(v)

    for level in ("block", "role") if roles else ("block",):
        out.append(f"{level:<16}{'phase':<9}{'A self ms':>12}{'B self ms':>12}{'B - A':>11}{'B / A':>8}"
                   f"{'A share':>9}{'B share':>9}")
        for _, r in frame[frame["level"] == level].iterrows():
            ratio = "" if fmt.is_missing(r["ratio"]) else f"{r['ratio']:.2f}"
            out.append(f"{str(r['name']):<16}{r['phase']:<9}{fmt.ms(r['a_ms']):>12}{fmt.ms(r['b_ms']):>12}"
                       f"{signed(r['diff_ms']):>11}{ratio:>8}{fmt.pct(r['a_share']):>9}{fmt.pct(r['b_share']):>9}")
        out.append("")
    return out


def serve_summary(run) -> str:
    """What `probe serve-bench` prints: requests, latency, throughput, batch composition."""
    serve = run.runs[run.runs["kind"] == "serve"]
    if serve.empty:
        return "no serving loop was recorded"
    r = serve.iloc[-1]
    rq = run.requests[run.requests["run_id"] == r["run_id"]]
    st = run.steps[run.steps["run_id"] == r["run_id"]]

    def q(col, fn):
        v = rq[col].dropna()
        return "n/a" if v.empty else f"{fn(v):,.1f}"

    counts = rq["status"].str.split(":").str[0].value_counts().to_dict()
    lines = [
        f"model      {r['model_id']} ({r['model_class']}, {r['dtype']}, {r['device']}, "
        f"attention={r['attn_implementation']})",
        f"status     {r['status']}; requests " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"tokens     prompt {r['prompt_tokens']}, generated {r['new_tokens']}, forwards {len(st)} "
        f"({', '.join(f'{k} {v}' for k, v in st['phase'].value_counts().items())})",
        f"TTFT ms    mean {q('ttft_ms', lambda v: v.mean())}  p50 {q('ttft_ms', lambda v: v.quantile(.5))}  "
        f"p90 {q('ttft_ms', lambda v: v.quantile(.9))}    queue mean {q('queue_ms', lambda v: v.mean())}",
        f"ITL ms     mean {q('itl_ms_mean', lambda v: v.mean())}  p50 {_num(r['tpot_ms_p50'])}  "
        f"p90 {_num(r['tpot_ms_p90'])}    end-to-end mean {q('e2e_ms', lambda v: v.mean())}",
        f"throughput {_num(r['decode_tok_s'])} generated tok/s over {_num(r['total_ms'] / 1e3)} s; "
        f"mean {st['requests'].mean():.1f} requests and {st['q_len'].mean():.1f} tokens per forward",
    ]
    parts = {c: st[c].sum() for c in ("forward_ms", "schedule_ms", "cache_ms", "sample_ms", "update_ms")}
    lines.append("loop ms    " + "  ".join(f"{k.removesuffix('_ms')} {v:,.0f}" for k, v in parts.items()))
    tf = rq[["ttft_ms", "tf_ttft_ms"]].dropna()
    if not tf.empty:
        dev = ((tf["ttft_ms"] - tf["tf_ttft_ms"]).abs() / tf["tf_ttft_ms"]).max()
        lines.append(f"check      TTFT vs transformers' record_timestamps: largest difference {dev:.2%}")
    return "\n".join(lines)


def _num(v) -> str:
    return "n/a" if fmt.is_missing(v) else f"{v:,.1f}"


def significance_lines(sig) -> list[str]:
    """B against A per headline metric and block: samples, slowdown, its 95 % interval, the verdict."""
    from probe.analysis.stats import verdict

    rows = []
    for _, row in sig[sig["level"].isin(["metric", "block"])].iterrows():
        iv = "" if fmt.is_missing(row["ci_low_pct"]) else f"[{row['ci_low_pct']:+.1f}%, {row['ci_high_pct']:+.1f}%]"
        sd = "" if fmt.is_missing(row["slowdown_pct"]) else f"{row['slowdown_pct']:+.1f}%"
        rows.append([str(row["name"]), str(row["phase"]), f"{row['a_n']}/{row['b_n']}", sd, iv, verdict(row)])
    return fmt.table(rows, ["B against A", "phase", "samples", "B slower by", "95% interval", "verdict"], left=2) \
        if rows else []


def op_compare_lines(frame, top: int = 15) -> list[str]:
    """What ``probe compare`` prints for two deep runs: the op kinds that changed per block
    (:func:`probe.analysis.op_compare.op_comparison`), the largest moves first, ``top`` at most."""
    from probe.analysis.op_compare import changed
    from probe.analysis.op_tree import short_op

    if frame is None:
        return []
    moved = changed(frame)
    out = ["", f"inside each block, A vs B (deep passes, ms per sampled step): {len(moved)} of {len(frame)} op rows "
               "changed" + (f"; {top} of them, op kinds that ran differently first:" if len(moved) > top
                            else (":" if len(moved) else ""))]
    # what ran differently first (robust to noise), then the largest moves in time
    kind = ranked(moved["change"], {"only in A": 0, "only in B": 0, "calls": 1}, 2)
    moved = moved.assign(_k=kind, _m=-moved["diff_ms"].abs().fillna(moved[["a_ms", "b_ms"]].max(axis=1)))
    for r in moved.sort_values(["_k", "_m"], kind="stable").head(top).itertuples():
        calls = "" if fmt.is_missing(r.a_calls) or fmt.is_missing(r.b_calls) or r.a_calls == r.b_calls \
            else f", calls {r.a_calls:g} -> {r.b_calls:g}"
        op = short_op(str(r.op))
        op = op if len(op) <= 40 else op[:39] + "…"
        out.append(f"  {r.phase:<8} {str(r.block)[:26]:<27} {op:<41} {r.change:<10} "
                   f"A {fmt.ms(r.a_ms) if not fmt.is_missing(r.a_ms) else '-':>9}  "
                   f"B {fmt.ms(r.b_ms) if not fmt.is_missing(r.b_ms) else '-':>9}{calls}")
    out.append("  (compare_ops.csv has every row; op times are each deep pass's, from one call: the blocks above say "
               "whether a block as a whole changed)")
    return out
