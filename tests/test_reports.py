"""Reports: figure builders, CSV, HTML, Chrome trace, compare and the CLI, on real tiny runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import probe
from probe import fmt, schema
from probe.reports import figures, write_reports
from probe.reports.compare import comparison_frame, write_comparison
from probe.reports.csv_export import EXACT_FLOATS, read_csv, write_csv
from probe.reports.html import render_report
from probe.reports.trace import build_trace
from tiny import tiny_llama

XSS = "<script>alert(1)</script>"
LAYERS, PROMPT, NEW = 3, 6, 8
ROOT = Path(__file__).resolve().parents[1]


def record(attn: str | None = None, *, model_id: str = "tiny<b>llama</b>", prompt: str = XSS, new: int = NEW,
           depth: str = "blocks") -> probe.Run:
    """A real probe recording of one greedy generate call of a tiny LLaMA on CPU."""
    kw = {"attn_implementation": attn} if attn else {}
    model = tiny_llama(layers=LAYERS, hidden=32, vocab=96, **kw)
    ids = torch.randint(3, 96, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with probe.attach(model, depth=depth, model_id=model_id) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    run = p.run
    run.meta["prompt"] = prompt
    return run


def stretch_module():
    spec = importlib.util.spec_from_file_location("report_size", ROOT / "benchmarks" / "report_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> probe.Run:
    r = record()
    r.save(tmp_path_factory.mktemp("run") / "tiny")
    return probe.load(r.path)


@pytest.fixture(scope="module")
def attn_runs(tmp_path_factory) -> tuple[probe.Run, probe.Run]:
    root = tmp_path_factory.mktemp("attn")
    out = []
    for attn in ("eager", "sdpa"):
        r = record(attn)
        out.append(probe.load(r.save(root / attn)))
    return out[0], out[1]


def empty_frames():
    return schema.empty(schema.CALLS), schema.empty(schema.STEPS), schema.empty(schema.RUNS)


def ys(fig: go.Figure, name: str) -> np.ndarray:
    tr = [t for t in fig.data if t.name == name]
    assert tr, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return np.asarray(tr[0].y, dtype="float64")


# --------------------------------------------------------------------------- figures
def test_phase_blocks_bars_are_the_summary_self_times(run):
    fig = figures.phase_blocks(run.calls, run.steps, by="block")
    summ = run.summary("block")
    for phase in ("prefill", "decode"):
        tr = next(t for t in fig.data if t.name == phase)
        want = summ[summ["phase"] == phase].set_index("name")["self_ms"]
        got = pd.Series(np.asarray(tr.y, dtype="float64"), index=list(tr.x))
        assert set(got.index) == {"embed", "layer", "norm", "head", "(residue)", "(probe)"}
        np.testing.assert_allclose(got[want.index].to_numpy(), want.to_numpy())
        share = summ[summ["phase"] == phase].set_index("name")["share"]
        assert list(tr.text) == [fmt.pct(share[m]) for m in tr.x]  # the shared format (probe.fmt)
        # the bars of a phase are the whole forward of its recorded steps, nothing twice
        fwd = run.steps.loc[run.steps["phase"] == phase, "forward_ms"].sum()
        assert got.sum() == pytest.approx(fwd, rel=1e-9)
    by_module = figures.phase_blocks(run.calls, run.steps, by="module")
    assert {f"model.layers.{i}" for i in range(LAYERS)} <= set(by_module.data[0].x)


def test_step_breakdown_parts_add_up_to_the_step(run):
    fig = figures.step_breakdown(run.calls, run.steps)
    st = run.steps
    for i, phase in enumerate(["prefill", "decode"]):
        sub = st[st["phase"] == phase]
        total = sum(float(np.asarray(t.x, dtype="float64")[i]) for t in fig.data)
        want = (sub["forward_ms"].sum() + sub["outside_ms"].sum()) / len(sub)
        assert total == pytest.approx(want, rel=1e-9)
        assert fig.data[0].y[i].startswith(phase)
    names = [t.name for t in fig.data]
    assert names == ["embedding", "layers", "final norm", "lm_head", "residue (in forward, in no recorded call)",
                     "the probe's own cost", "outside model (logits, sampling)"]


def test_step_breakdown_splits_outside_into_sampling_stages(run):
    fig = figures.step_breakdown(run.calls, run.steps, run.sampling)
    names = [t.name for t in fig.data]
    assert names[:6] == ["embedding", "layers", "final norm", "lm_head", "residue (in forward, in no recorded call)",
                         "the probe's own cost"]  # inside the forward; its step bookkeeping is a stage outside
    assert names[6:] == ["outside: update kwargs (cache, mask, positions)", "outside: stopping",
                         "outside: prepare inputs (of the next forward)", "outside: probe (its own step bookkeeping)",
                         "outside: remainder (token choice, bookkeeping)"]
    plain = figures.step_breakdown(run.calls, run.steps)
    st = run.steps
    for i, phase in enumerate(["prefill", "decode"]):
        total = sum(float(np.asarray(t.x, dtype="float64")[i]) for t in fig.data)
        assert total == pytest.approx(sum(float(np.asarray(t.x, dtype="float64")[i]) for t in plain.data), rel=1e-9)
        outside = sum(float(np.asarray(t.x, dtype="float64")[i]) for t in fig.data[6:])
        assert outside == pytest.approx(st.loc[st["phase"] == phase, "outside_ms"].mean(), rel=1e-9)


def test_sampling_stages_figure_adds_up_to_the_time_outside_the_model():
    model = tiny_llama(layers=2, hidden=32, vocab=96)
    ids = torch.randint(3, 96, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    with probe.attach(model) as p:
        model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, top_p=0.85, temperature=0.8)
    run = p.run
    fig = figures.sampling_stages(run.sampling, run.steps)
    assert [t.name for t in fig.data] == ["update kwargs (cache, mask, positions)", "TemperatureLogitsWarper",
                                          "TopKLogitsWarper", "TopPLogitsWarper",
                                          "dispatch (the processors list around its processors)", "stopping",
                                          "prepare inputs (of the next forward)", "probe (its own step bookkeeping)",
                                          "remainder (token choice, bookkeeping)"]
    st = run.steps
    for i, phase in enumerate(["prefill", "decode"]):
        assert fig.data[0].y[i].startswith(phase)
        total = sum(float(np.asarray(t.x, dtype="float64")[i]) for t in fig.data)
        assert total == pytest.approx(st.loc[st["phase"] == phase, "outside_ms"].mean(), rel=1e-9)
        # the hover's share of the step is the stage over the phase's mean latency
        lat = st.loc[st["phase"] == phase, "latency_ms"].mean()
        assert fig.data[2].customdata[i] == pytest.approx(fig.data[2].x[i] / lat * 100, rel=1e-9)
    assert figures.sampling_stages(schema.empty(schema.SAMPLING), st).layout.annotations[0].text == \
        "no sampling stages recorded"


def test_layer_heatmap_cells_are_layer_call_times(run):
    fig = figures.layer_heatmap(run.calls, phase="decode")
    hm = fig.data[0]
    z = np.asarray(hm.z, dtype="float64")
    dec = run.calls[(run.calls["role"] == "layer") & (run.calls["phase"] == "decode")]
    assert z.shape == (LAYERS, dec["step"].nunique())
    assert list(hm.y) == list(range(LAYERS)) and list(hm.x) == sorted(dec["step"].unique())
    row = dec.iloc[5]
    assert z[int(row["layer"]), list(hm.x).index(row["step"])] == pytest.approx(row["cpu_ms"])
    assert "host ms" in fig.layout.title.text
    prefill = figures.layer_heatmap(run.calls, phase="prefill")
    assert np.asarray(prefill.data[0].z).shape == (LAYERS, 1)


def test_token_latency_marks_ttft_and_follows_decode_steps(run):
    fig = figures.token_latency(run.steps, run.runs)
    dec = run.steps[run.steps["phase"] == "decode"].sort_values("step")
    np.testing.assert_allclose(ys(fig, "decode step"), dec["latency_ms"].to_numpy())
    assert ys(fig, "TTFT")[0] == pytest.approx(float(run.runs["ttft_ms"].iloc[0]))
    assert ys(fig, "TPOT p50")[0] == pytest.approx(float(run.runs["tpot_ms_p50"].iloc[0]))


def test_latency_vs_kv_and_memory(run):
    fig = figures.latency_vs_kv(run.steps)
    dec = run.steps[run.steps["phase"] == "decode"].sort_values("kv_len")
    np.testing.assert_array_equal(np.asarray(fig.data[0].x, dtype="float64"), dec["kv_len"].to_numpy(dtype="float64"))
    mem = figures.memory_over_steps(run.steps, run.calls)
    kv = run.steps.sort_values("step")["kv_cache_bytes"].to_numpy(dtype="float64") / 2**20
    np.testing.assert_allclose(ys(mem, "KV cache"), kv)
    assert np.all(np.diff(ys(mem, "KV cache")) > 0)  # the cache grows every step
    assert "CUDA peak" not in [t.name for t in mem.data]  # CPU run: no CUDA figures invented


def test_shape_walkthrough_prefill_and_first_decode(run):
    walk = figures.shape_walkthrough(run.calls)
    assert list(walk.columns) == ["phase", "step", "module", "role", "in_shapes", "out_shapes"]
    assert list(walk["phase"].unique()) == ["prefill", "decode"]
    assert set(walk["step"]) == {0, 1}
    assert len(walk) == 2 * (1 + 3)  # identical layers fold into one row, as the terminal prints them
    pre = walk[walk["phase"] == "prefill"].set_index("module")
    assert pre.loc["model.embed_tokens", "in_shapes"] == f"[1, {PROMPT}]"
    assert pre.loc["model.embed_tokens", "out_shapes"] == f"[1, {PROMPT}, 32]"
    dec = walk[walk["phase"] == "decode"].set_index("module")
    assert dec.loc[f"model.layers.{{0..{LAYERS - 1}}}", "out_shapes"] == "[1, 1, 32]"
    assert walk["module"].iloc[0] == "model.embed_tokens"  # call order
    full = figures.shape_walkthrough(run.calls, collapse=False)
    assert len(full) == 2 * (LAYERS + 3) and "model.layers.1" in set(full["module"])


def test_headline_matches_runs_and_carries_overhead(run):
    head = figures.headline(run.runs, run.steps, meta={"overhead_pct": 3.5, "overhead": {"ms": 1.25, "how": "x"}})
    assert len(head) == 1
    for col in ("ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "prefill_tok_s", "decode_tok_s"):
        assert head[col].iloc[0] == pytest.approx(float(run.runs[col].iloc[0]))
    assert head["overhead_pct"].iloc[0] == 3.5 and head["overhead_ms"].iloc[0] == 1.25
    assert "overhead_how" not in head


def test_builders_handle_empty_frames_without_raising():
    calls, steps, runs = empty_frames()
    figs = [figures.phase_blocks(calls, steps), figures.phase_blocks(calls, steps, by="module"),
            figures.layer_heatmap(calls), figures.token_latency(steps, runs), figures.latency_vs_kv(steps),
            figures.memory_over_steps(steps, calls), figures.step_breakdown(calls, steps),
            figures.step_breakdown(calls, steps, schema.empty(schema.SAMPLING)),
            figures.sampling_stages(schema.empty(schema.SAMPLING), steps),
            figures.compare_blocks(schema.empty(schema.SUMMARY), schema.empty(schema.SUMMARY), "a", "b")]
    for fig in figs:
        assert isinstance(fig, go.Figure) and not fig.data
        assert fig.layout.title.text and "no" in fig.layout.annotations[0].text
    walk = figures.shape_walkthrough(calls)
    assert walk.empty and list(walk.columns)[:2] == ["phase", "step"]
    head = figures.headline(runs, steps, meta={"overhead_pct": 1.0})
    assert head.empty and "ttft_ms" in head and "overhead_pct" in head


def test_builders_are_deterministic(run):
    build = [lambda: figures.phase_blocks(run.calls, run.steps), lambda: figures.layer_heatmap(run.calls),
             lambda: figures.token_latency(run.steps, run.runs), lambda: figures.memory_over_steps(run.steps, run.calls)]
    for b in build:
        assert b().to_json() == b().to_json()


def test_long_runs_are_binned_not_plotted_per_row(run):
    long = stretch_module().stretch(run, 60_000)
    assert len(long.calls) == 60_000
    heat = figures.layer_heatmap(long.calls)
    z = np.asarray(heat.data[0].z, dtype="float64")
    assert z.shape[0] == LAYERS and z.shape[1] <= figures.MAX_HEAT_COLS
    assert "mean of" in heat.layout.title.text
    # binning averages: the overall mean survives (bins differ in size by at most one step)
    dec = long.calls[(long.calls["role"] == "layer") & (long.calls["phase"] == "decode")]
    assert np.nanmean(z) == pytest.approx(dec["cpu_ms"].mean(), rel=0.05)
    lat = figures.token_latency(long.steps, long.runs)
    assert len(ys(lat, "decode step")) <= figures.MAX_POINTS
    assert len(figures.latency_vs_kv(long.steps).data[0].x) <= figures.MAX_POINTS


def test_user_text_in_figures_is_shown_literally():
    summ = pd.DataFrame({"level": ["module"], "name": ["<b>x</b>"], "role": ["layer"], "phase": ["decode"],
                         "calls": [1], "total_ms": [1.0], "self_ms": [1.0], "mean_ms": [1.0], "share": [0.5]})
    fig = figures.compare_blocks(summ, summ, "<img src=x onerror=alert(1)>", "b")
    assert "<img" not in fig.layout.title.text and "&lt;img" in fig.layout.title.text
    assert fig.data[0].x[0] == "&lt;b&gt;x&lt;/b&gt;" and fig.layout.annotations[0].text == "decode"


def test_figures_render_inline_in_notebooks(run):
    import plotly.io as pio

    old = pio.renderers.default
    pio.renderers.default = "plotly_mimetype"
    try:
        bundle = figures.layer_heatmap(run.calls)._repr_mimebundle_()
    finally:
        pio.renderers.default = old
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "heatmap"


def test_run_repr_html_is_escaped(run):
    text = run._repr_html_()
    assert "tiny&lt;b&gt;llama&lt;/b&gt;" in text and "<b>llama" not in text
    assert "<table" in text


# --------------------------------------------------------------------------- CSV
def test_csv_round_trip_equals_frames(run, tmp_path):
    paths = write_csv(run, tmp_path)
    # the run's meta holds its config, so the cost estimate (roofline.csv) is there too
    assert [p.name for p in paths] == ["calls.csv", "steps.csv", "runs.csv", "sampling.csv", "summary.csv",
                                       "roofline.csv"]
    pd.testing.assert_frame_equal(read_csv(tmp_path / "calls.csv"), run.calls)
    pd.testing.assert_frame_equal(read_csv(tmp_path / "sampling.csv"), run.sampling)
    assert len(run.sampling)
    pd.testing.assert_frame_equal(read_csv(tmp_path / "steps.csv"), run.steps)
    pd.testing.assert_frame_equal(read_csv(tmp_path / "runs.csv"), run.runs)
    pd.testing.assert_frame_equal(read_csv(tmp_path / "summary.csv"), run.summary())
    # plain pandas, no helper: shapes are JSON strings, numbers exact
    plain = pd.read_csv(tmp_path / "calls.csv", **EXACT_FLOATS)
    assert json.loads(plain["out_shapes"].iloc[0]) == json.loads(run.calls["out_shapes"].iloc[0])
    np.testing.assert_array_equal(plain["cpu_ms"].to_numpy(), run.calls["cpu_ms"].to_numpy())
    summ = pd.read_csv(tmp_path / "summary.csv", **EXACT_FLOATS)
    assert list(summ.columns) == list(schema.SUMMARY)
    assert set(summ["level"]) == {"block", "role", "module"} and "(residue)" in set(summ["name"])
    assert summ.groupby(["level", "phase"])["share"].sum().round(9).eq(1.0).all()


# --------------------------------------------------------------------------- HTML
def test_html_is_offline_escaped_and_byte_identical(run, tmp_path):
    from plotly.offline import get_plotlyjs

    a = write_reports(run, tmp_path / "one", formats=("html",))[0].read_bytes()
    b = write_reports(probe.load(run.path), tmp_path / "two", formats=("html",))[0].read_bytes()
    assert a == b
    text = a.decode("utf-8")
    js = get_plotlyjs()
    assert text.count(js) == 1
    rest = text.replace(js, "")
    assert XSS not in rest and "&lt;script&gt;alert(1)&lt;/script&gt;" in rest
    assert "<b>llama" not in rest and "tiny&lt;b&gt;llama&lt;/b&gt;" in rest
    assert not re.search(r"https?://|<link|@import|url\(|\ssrc=", rest)
    for div_id, _, _ in __import__("probe.reports.html", fromlist=["FIGURES"]).FIGURES:
        assert f'id="{div_id}"' in rest
    # the tables carry the numbers without any script
    no_js = re.sub(r"<script.*?</script>", "", text, flags=re.S)
    assert "model.layers.2" in no_js and f"[1, {PROMPT}, 32]" in no_js and "(residue)" in no_js


def test_html_size_is_bounded_by_aggregates(run):
    from plotly.offline import get_plotlyjs

    small = len(render_report(run).encode())
    big_run = stretch_module().stretch(run, 100_000)
    big = len(render_report(big_run).encode())
    assert big <= 6_000_000
    assert big - small < 1_000_000  # 100k rows add well under 1 MB: nothing per row is embedded
    assert big > len(get_plotlyjs())


# --------------------------------------------------------------------------- trace
def test_trace_structure_and_durations(run):
    trace = json.loads(json.dumps(build_trace(run), allow_nan=False))
    assert trace["displayTimeUnit"] == "ms"
    ev = trace["traceEvents"]
    names = {(e["tid"], e["args"]["name"]) for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {n for _, n in names} == {"prefill (host)", "decode (host)"}
    spans = [e for e in ev if e["ph"] == "X" and e["cat"] in ("embed", "layer", "norm", "head")]
    assert len(spans) == len(run.calls)
    np.testing.assert_allclose([e["dur"] for e in spans], run.calls["cpu_ms"].to_numpy() * 1000, atol=1e-3)
    assert spans[0]["args"]["in_shapes"] == json.loads(run.calls["in_shapes"].iloc[0])
    steps = {(e["args"]["step"]): e for e in ev if e["ph"] == "X" and e["cat"] == "step"}
    assert len(steps) == len(run.steps)
    for e in spans:  # every module span nests inside its step's span on the same track
        s = steps[e["args"]["step"]]
        assert s["tid"] == e["tid"] and s["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1e-3
    outside = [e for e in ev if e["ph"] == "X" and e["cat"] == "outside"]
    assert len(outside) == len(run.steps)
    assert not any(e["tid"] % 2 == 0 and e["ph"] == "X" for e in ev)  # no GPU track on CPU


def test_trace_gpu_track_is_serial_and_keeps_durations(run):
    # A CPU run has no GPU time; give every call a GPU duration of a third of its host time so
    # the GPU layout logic runs on real structure.
    calls = run.calls.assign(gpu_ms=run.calls["cpu_ms"] / 3)
    gpu_run = probe.Run(calls=calls, steps=run.steps, runs=run.runs, meta=run.meta)
    ev = build_trace(gpu_run)["traceEvents"]
    gpu = [e for e in ev if e["ph"] == "X" and e["cat"].startswith("gpu ")]
    assert len(gpu) == len(calls)
    assert {e["args"]["name"] for e in ev if e.get("name") == "thread_name"} >= {"prefill (GPU)", "decode (GPU)"}
    np.testing.assert_allclose(sorted(e["dur"] for e in gpu), np.sort(calls["gpu_ms"].to_numpy() * 1000), atol=1e-3)
    gpu.sort(key=lambda e: e["ts"])
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(gpu, gpu[1:]))


# --------------------------------------------------------------------------- write_reports
def test_write_reports_locations(run, tmp_path):
    paths = write_reports(run, tmp_path, formats=("html", "csv", "trace"))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "report.html", "csv/calls.csv", "csv/steps.csv", "csv/runs.csv", "csv/sampling.csv", "csv/summary.csv",
        "csv/roofline.csv",
        "trace.json"]
    one = write_reports(run, tmp_path, formats=("trace",), out=tmp_path / "x" / "t.json")
    assert one == [tmp_path / "x" / "t.json"] and json.loads(one[0].read_text())["traceEvents"]
    csvs = write_reports(run, tmp_path, formats=("csv",), out=tmp_path / "flat")
    assert {p.parent for p in csvs} == {tmp_path / "flat"}
    with pytest.raises(ValueError, match="subset"):
        write_reports(run, tmp_path, formats=("pdf",))


# --------------------------------------------------------------------------- compare
def test_compare_numbers_are_each_runs_own_summary(attn_runs, tmp_path):
    a, b = attn_runs
    assert a.runs["attn_implementation"].iloc[0] == "eager" and b.runs["attn_implementation"].iloc[0] == "sdpa"
    html_path, csv_path, sig_path, meta_path = write_comparison(a, b, tmp_path / "cmp")
    got = pd.read_csv(csv_path, keep_default_na=False, na_values=[""], **EXACT_FLOATS)
    assert list(got.columns) == ["level", "name", "role", "phase", "a_calls", "b_calls", "a_ms", "b_ms", "diff_ms",
                                 "ratio", "a_mean_ms", "b_mean_ms", "a_total_ms", "b_total_ms", "a_share", "b_share"]
    for level in ("block", "role", "module"):
        rows = got[got["level"] == level].set_index(["name", "phase"])
        for side, r in (("a", a), ("b", b)):
            own = r.summary(level).set_index(["name", "phase"])
            assert set(rows.index) == set(own.index)
            np.testing.assert_array_equal(rows.loc[own.index, f"{side}_ms"].to_numpy(), own["self_ms"].to_numpy())
            np.testing.assert_array_equal(rows.loc[own.index, f"{side}_total_ms"].to_numpy(),
                                          own["total_ms"].to_numpy())
            np.testing.assert_array_equal(rows.loc[own.index, f"{side}_calls"].to_numpy(), own["calls"].to_numpy())
        np.testing.assert_allclose(rows["diff_ms"], rows["b_ms"] - rows["a_ms"])
        pos = rows["a_ms"] > 0  # a part A spent no time in (the probe's cost, calibrated 0 on a busy machine)
        np.testing.assert_allclose(rows.loc[pos, "ratio"], rows.loc[pos, "b_ms"] / rows.loc[pos, "a_ms"])
        assert rows.loc[~pos, "ratio"].isna().all()
    text = html_path.read_text(encoding="utf-8")
    assert "eager" in text and "sdpa" in text and 'id="fig-compare-blocks"' in text
    # at depth blocks the role level holds the block level's rows: one chart and table, said once
    assert 'id="fig-compare-roles"' not in text and 'id="role-table"' not in text and 'id="roles-as-blocks"' in text
    assert 'id="differences"' not in text  # same model, depth and prompt: nothing to warn about
    assert write_comparison(a, b, tmp_path / "cmp2")[0].read_bytes() == html_path.read_bytes()


def test_compare_figure_puts_each_phase_on_its_own_axis_and_names_its_level(attn_runs):
    a, b = attn_runs
    for level in ("block", "role", "module"):
        fig = figures.compare_blocks(a.summary(level), b.summary(level), "eager", "sdpa")
        assert fig.layout.title.text.startswith(f"Self time per {level}: A vs B")
        assert [t.text for t in fig.layout.annotations] == ["prefill", "decode"]
        by_axis = {}
        for t in fig.data:
            by_axis.setdefault(t.yaxis, []).append(t)
        assert sorted(by_axis) == ["y", "y2"]  # two panels, two independent y axes
        assert fig.layout.yaxis2.matches is None
        for axis, phase in (("y", "prefill"), ("y2", "decode")):
            want = comparison_frame(a, b)
            want = want[(want["level"] == level) & (want["phase"] == phase)]
            (ta, tb) = by_axis[axis]
            assert list(ta.x) == list(want["name"]) and list(ta.y) == pytest.approx(list(want["a_ms"]))
            assert list(tb.y) == pytest.approx(list(want["b_ms"]))
        assert [t.showlegend for t in fig.data] == [True, True, False, False]  # each run once in the legend


def test_compare_page_shows_roles_where_a_run_recorded_inside_its_blocks(run, tmp_path):
    from probe.reports.compare import roles_add

    deeper = record(depth="sublayers")
    assert not roles_add(comparison_frame(run, run)) and roles_add(comparison_frame(run, deeper))
    text = write_comparison(run, deeper, tmp_path / "cmp")[0].read_text(encoding="utf-8")
    assert 'id="fig-compare-roles"' in text and 'id="role-table"' in text and 'id="roles-as-blocks"' not in text
    assert "Self time per role: A vs B" in text and "Per block and phase<br>" not in text


def test_compare_keeps_blocks_only_one_side_has(run):
    deeper = record(depth="sublayers")
    frame = comparison_frame(run, deeper)
    assert not frame[["a_ms", "b_ms"]].isna().all(axis=1).any()
    only_b = frame[frame["a_ms"].isna()]
    assert {"attention", "mlp"} <= set(only_b["role"]) and only_b["b_ms"].notna().all()
    both = frame[(frame["level"] == "module") & (frame["name"] == "model.layers.0")]
    assert len(both) == 2 and both[["a_ms", "b_ms"]].notna().all().all()
    one_sided = schema.empty(schema.SUMMARY)
    from probe.reports.diff import block_diff

    d = block_diff(run.summary(), one_sided)
    assert len(d) == len(run.summary()) and d["b_ms"].isna().all() and d["ratio"].isna().all()


# --------------------------------------------------------------------------- CLI
def test_cli_report_and_compare(run, attn_runs, tmp_path, capsys):
    from probe.cli import main

    assert main(["report", str(run.path), "--format", "all", "--out", str(tmp_path / "all")]) == 0
    assert {p.name for p in (tmp_path / "all").rglob("*") if p.is_file()} == {
        "report.html", "trace.json", "calls.csv", "steps.csv", "runs.csv", "sampling.csv", "summary.csv",
        "roofline.csv"}
    assert main(["report", str(run.path), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_bytes() == (tmp_path / "all" / "report.html").read_bytes()
    a, b = attn_runs
    assert main(["compare", str(a.path), str(b.path), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "compare.html" in out and "compare.csv" in out
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_cli_run_writes_report_and_compare_matches_bundled_runs(tmp_path):
    import probe.models  # noqa: F401  (the project's own module: a broken import must fail, not skip)
    from probe.cli import main

    dirs = []
    for attn in ("eager", "sdpa"):
        d = tmp_path / attn
        assert main(["run", "--max-new-tokens", "3", "--attn-implementation", attn, "--out", str(d),
                     "--prompt", XSS]) == 0
        assert (d / "report.html").exists() and (d / "csv" / "summary.csv").exists()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (d / "report.html").read_text(encoding="utf-8")
        dirs.append(d)
    assert main(["compare", str(dirs[0]), str(dirs[1]), "--out", str(tmp_path / "cmp")]) == 0
    got = pd.read_csv(tmp_path / "cmp" / "compare.csv", keep_default_na=False, na_values=[""],
                      **EXACT_FLOATS)
    roles = got[got["level"] == "role"].set_index(["name", "phase"])
    for side, d in zip("ab", dirs):
        own = probe.load(d).summary("role").set_index(["name", "phase"])
        np.testing.assert_array_equal(roles.loc[own.index, f"{side}_ms"].to_numpy(), own["self_ms"].to_numpy())


def test_two_generate_calls_in_one_recording():
    model = tiny_llama(layers=2, hidden=32, vocab=96)
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(2))
    with probe.attach(model, model_id="two") as p:
        for n in (3, 5):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    run = p.run
    ids_ = list(run.runs["run_id"])
    assert len(ids_) == 2
    lat = figures.token_latency(run.steps, run.runs)
    assert [t.name for t in lat.data if t.name.startswith("TTFT")] == [f"TTFT {i}" for i in ids_]
    assert [len(t.y) for t in lat.data if t.name in ids_] == [2, 4]
    assert len(figures.headline(run.runs, run.steps)) == 2
    heat = figures.layer_heatmap(run.calls)
    dec = run.calls[(run.calls["role"] == "layer") & (run.calls["phase"] == "decode")]
    want = dec.groupby(["layer", "step"])["cpu_ms"].mean()  # steps 1-2 are averaged over both calls
    z = np.asarray(heat.data[0].z, dtype="float64")
    assert z[1, list(heat.data[0].x).index(2)] == pytest.approx(want[(1, 2)])
    pids = {e["pid"] for e in build_trace(run)["traceEvents"]}
    assert pids == {1, 2}


@pytest.mark.parametrize("depth", ["blocks", "all"])
def test_the_html_report_command_reads_a_part_and_writes_the_whole_runs_page(depth, tmp_path):
    """`probe report --format html` leaves the calls columns the page never reads undecoded; its
    page is the whole run's, to the byte (a deep run at depth all included)."""
    from probe.cli import main
    from probe.reports.html import UNREAD_CALLS_COLUMNS, render_report

    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth, deep=depth == "all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    p.run.save(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    whole = probe.load(tmp_path / "run")
    part = probe.load(tmp_path / "run", columns=[c for c in schema.CALLS if c not in UNREAD_CALLS_COLUMNS])
    assert not set(UNREAD_CALLS_COLUMNS) & set(part.calls.columns)
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_report(whole)
