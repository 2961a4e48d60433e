"""Reports x cost model x ranks x sweeps: the roofline section, roofline.csv, merged tensor-parallel
runs and the sweep page, on real tiny models recorded by the real probe."""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from plotly.offline import get_plotlyjs

import probe
from probe.cli import main
from probe.analysis.hardware import Peaks, measure_peaks
from probe.analysis.roofline import BOUNDS, bound_summary
from probe.routines.sweep import load_sweep, sweep, sweep_summary
from probe.reports import figures, write_reports
from probe.reports.sweep_report import render_sweep
from probe.reports.cost_view import cost_view
from probe.reports.csv_export import read_csv
from probe.reports.html import render_report
from tiny import tiny_llama, tiny_model

XSS = "<script>alert(1)</script>"
PROMPT, NEW = 5, 4
#: roofs no machine measures: numbers on the page that equal these came from the run's meta
FAKE = Peaks(name="CPU <i>test</i>", dtype="float32", flops_per_s=5.0e10, bytes_per_s=1.0e10,
             source="explicit test peaks", measured=True, wait_pct=0.0)


class _Tables(HTMLParser):
    """The text of every ``<table id=...>`` of a page: {id: [header, row, ...]}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs).get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> dict[str, pd.DataFrame]:
    """Every table of ``page`` with an id, as string frames (HTML entities decoded)."""
    p = _Tables()
    p.feed(page)
    return {k: pd.DataFrame(v[1:], columns=v[0]) for k, v in p.tables.items() if k and v}


def record(model, *, rank: int | None = None, model_id: str = "tiny", depth: str = "blocks",
           new: int = NEW) -> probe.Run:
    """A real probe recording of one greedy generate call (``rank`` as a tensor-parallel rank)."""
    ids = torch.randint(3, 96, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with probe.attach(model, rank=rank, model_id=model_id, depth=depth) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return p.run


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=32, vocab=96)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory) -> dict[str, probe.Run]:
    """The same recording saved three ways: as the Python API saves it (config, no peaks), with
    explicit stored peaks, and with peaks measured on this machine."""
    root = tmp_path_factory.mktemp("integ")
    base = record(model, model_id=f"tiny{XSS}")
    base.meta["prompt"] = XSS
    assert "peaks" not in base.meta and base.meta.get("config")
    out = {"plain": probe.load(base.save(root / "plain"))}
    base.meta["peaks"] = FAKE.to_dict()
    out["fake"] = probe.load(base.save(root / "fake"))
    # as `probe run` stores them: a figure measured on a quiet machine (this shared test machine
    # may be busy now; busy figures are refused, see tests/test_cost.py)
    base.meta["peaks"] = {**measure_peaks("cpu", "float32", budget_s=0.2).to_dict(), "wait_pct": 0.0}
    out["measured"] = probe.load(base.save(root / "measured"))
    return out


@pytest.fixture(scope="module")
def two_ranks(model, tmp_path_factory) -> probe.Run:
    """A two-rank merged run: the same model recorded as rank 0 and rank 1, saved as d/rank{r}."""
    d = tmp_path_factory.mktemp("tp") / "run"
    for r in (0, 1):
        run = record(model, rank=r)
        run.meta["peaks"] = FAKE.to_dict()
        # as recorded on a quiet machine, whatever this one's load: the roofline's verdicts
        # (host-bound, or waiting for a CPU) then do not depend on it
        run.steps["process_cpu_ms"] = run.steps["forward_ms"]
        run.runs["cpu_wait_ms"] = 0.0
        probe.save_rank(run, d)  # d/rank{r}, marked as a rank
    merged = probe.load(d)
    assert merged.path == d and sorted(set(merged.calls["rank"])) == [0, 1]
    return merged


def values(v) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form ``{"dtype", "bdata"}``."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v)


def body(page: str) -> str:
    """The page without plotly.js and the figures' scripts."""
    return re.sub(r"<script.*?</script>", "", page, flags=re.S)


# --------------------------------------------------------------------------- roofline section
def test_roofline_section_with_stored_peaks(runs, tmp_path):
    run = runs["fake"]
    paths = write_reports(run, tmp_path, formats=("html", "csv"))
    assert [p.name for p in paths][-1] == "roofline.csv"
    page = paths[0].read_text(encoding="utf-8")
    text = body(page)
    assert 'id="roofline"' in text and '<div id="fig-roofline"' in text
    assert page.count(get_plotlyjs()) == 1
    # the roofs are the stored ones (no measurement gives exactly 50 GFLOP/s and 10 GB/s), said so
    peaks_note = re.search(r'<p class="note" id="roofline-peaks">(.*?)</p>', text).group(1)
    assert "measured on the machine that recorded this run" in peaks_note
    assert "50.0 GFLOP/s float32, 10.0 GB/s" in peaks_note and "Source: explicit test peaks" in peaks_note
    assert "CPU &lt;i&gt;test&lt;/i&gt;" in peaks_note and "<i>test" not in text
    # the table's rows are Run.roofline() with the stored peaks, row for row
    want = run.roofline(by="role")
    got = tables(page)["roofline-table"]
    assert list(got.columns) == ["block", "phase", "time_ms", "achieved_gflop_s", "achieved_gb_s",
                                 "intensity_flops_per_byte", "roof_fraction", "bound", "reason"]
    assert list(zip(got["block"], got["phase"], got["bound"])) == list(
        zip(want["module"], want["phase"], want["bound"].astype(str)))
    assert {"layer", "head", "(forward)"} <= set(got["block"]) and set(got["phase"]) == {"prefill", "decode"}
    assert set(got["bound"]) <= set(BOUNDS)
    np.testing.assert_allclose(got["intensity_flops_per_byte"].astype(float),
                               want["intensity_flops_per_byte"].fillna(0), rtol=1e-3)
    assert list(got["reason"]) == list(want["reason"].astype(str))
    # roofline.csv is the same frame with a rank column
    csv = read_csv(tmp_path / "csv" / "roofline.csv")
    assert (csv["rank"] == 0).all()
    pd.testing.assert_frame_equal(csv.drop(columns="rank"), want)
    bounds = tables(page)["bound-table"]
    assert set(bounds["phase"]) == {"prefill", "decode"}
    assert bounds["share"].str.rstrip("%").astype(float).groupby(bounds["phase"]).sum().round(0).eq(100).all()
    assert len(bounds) == len(bound_summary(want))


def test_roofline_figure_is_the_cost_figure_of_the_stored_peaks(runs):
    run = runs["measured"]
    page = render_report(run)
    stored = Peaks.from_dict(run.meta["peaks"])
    m = re.search(r'Plotly\.newPlot\(\s*"fig-roofline",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"displaylogo"', page, flags=re.S)
    data, layout = json.loads(m.group(1)), json.loads(m.group(2))
    assert data[0]["name"] == "roof"
    # the compute roof is the stored measurement, in GFLOP/s
    assert values(data[0]["y"]).max() == pytest.approx(stored.flops_per_s / 1e9)
    assert "measured where recorded" in layout["title"]["text"]
    markers = {t for tr in data[1:] for t in values(tr["text"])}
    assert {"layer", "head", "(forward)"} <= markers


def test_datasheet_peaks_for_a_gpu_run_without_stored_peaks(runs):
    run = runs["plain"]
    # the same frames, said to come from an H100: the report looks its peaks up, measures nothing
    gpu_runs = run.runs.assign(device="cuda:0", gpu_name="NVIDIA H100 80GB HBM3", dtype="bfloat16")
    gpu = probe.Run(calls=run.calls, steps=run.steps, runs=gpu_runs, meta=dict(run.meta))
    view = cost_view(gpu)
    assert view.origin == "datasheet" and view.peaks is not None and not view.peaks.measured
    text = body(render_report(gpu, view))
    note = html.unescape(re.search(r'id="roofline-peaks">(.*?)</p>', text).group(1))
    assert "from the datasheet table for NVIDIA H100 SXM" in note and "looked up from the run's GPU name" in note
    assert "989 TFLOP/s bfloat16, 3.35 TB/s" in note and "nvidia-tensor-core-gpu-datasheet" in note
    assert '<div id="fig-roofline"' in text


def test_cpu_run_without_peaks_shows_costs_but_no_roofline(runs, tmp_path):
    run = runs["plain"]
    paths = write_reports(run, tmp_path, formats=("html", "csv"))
    page = paths[0].read_text(encoding="utf-8")
    text = body(page)
    assert 'id="roofline"' in text and "fig-roofline" not in page
    note = re.search(r'id="roofline-note">(.*?)</p>', text).group(1)
    assert note.startswith("No peaks recorded with this run; `probe run` stores them.")
    got = tables(page)["roofline-table"]
    assert "bound" not in got and "roof_fraction" not in got and "bound-table" not in tables(page)
    # FLOPs and bytes per block are the cost model's, summed per role and phase
    cost = run.cost()
    want = cost[cost["role"].isin(["embed", "layer", "norm", "head"])].groupby(["role", "phase"])[
        ["flops", "bytes_moved"]].sum()
    blocks = got[got["block"] != "(forward)"].set_index(["block", "phase"])
    for key, row in want.iterrows():
        assert float(blocks.loc[key, "flops"].replace(",", "")) == pytest.approx(row["flops"])
        assert float(blocks.loc[key, "bytes_moved"].replace(",", "")) == pytest.approx(row["bytes_moved"])
    csv = read_csv(tmp_path / "csv" / "roofline.csv")
    assert csv["bound"].isna().all() and csv["roof_fraction"].isna().all() and (csv["flops"] > 0).any()


def test_run_without_config_gets_a_note_not_an_error(runs, tmp_path):
    run = runs["plain"]
    bare = probe.Run(calls=run.calls, steps=run.steps, runs=run.runs,
                     meta={k: v for k, v in run.meta.items() if k != "config"})
    paths = write_reports(bare, tmp_path, formats=("html", "csv"))
    assert [p.name for p in paths] == ["report.html", "calls.csv", "steps.csv", "runs.csv", "sampling.csv",
                                       "summary.csv"]
    page = paths[0].read_text(encoding="utf-8")
    assert "No cost estimate: this run's metadata holds no model config" in html.unescape(page)
    assert "roofline-table" not in page and "fig-roofline" not in page
    assert 'id="fig-phase-blocks"' in page  # the rest of the report is there


def test_builds_are_byte_identical_with_and_without_peaks(runs, tmp_path):
    for key in ("plain", "measured"):
        run = runs[key]
        a = write_reports(run, tmp_path / key / "a", formats=("html", "csv"))
        b = write_reports(probe.load(run.path), tmp_path / key / "b", formats=("html", "csv"))
        assert [p.name for p in a] == [p.name for p in b] and a[-1].name == "roofline.csv"
        for pa, pb in zip(a, b):
            assert pa.read_bytes() == pb.read_bytes(), pa.name


# --------------------------------------------------------------------------- ranks
def test_two_rank_merged_run_report_shows_both_ranks(two_ranks):
    run = two_ranks
    paths = write_reports(run, run.path, formats=("html", "csv"))
    assert paths[0] == run.path / "report.html" and (run.path / "csv" / "roofline.csv").exists()
    page = paths[0].read_text(encoding="utf-8")
    tabs = tables(page)
    facts = tabs["facts"].set_index("fact")["value"]
    assert facts["ranks"] == "0, 1"
    head = tabs["headline-table"]
    assert list(head.columns[:2]) == ["run_id", "rank"] and list(head["rank"]) == ["0", "1"]
    assert list(head["run_id"]) == list(run.runs["run_id"])
    walk = tabs["shape-table"]
    assert walk.columns[0] == "rank"
    per_rank = walk.groupby("rank")["module"].apply(list)
    # the two identical layers fold into one row per phase, as the terminal prints them
    assert per_rank["0"] == per_rank["1"] and len(per_rank["0"]) == 2 * (1 + 3)
    assert list(walk["rank"][:2]) == ["0", "1"] and walk["module"][0] == walk["module"][1]  # side by side
    rank_roles = tabs["rank-role-table"]
    assert set(rank_roles["rank"]) == {"0", "1"}
    csv = read_csv(run.path / "csv" / "roofline.csv")
    assert sorted(set(csv["rank"])) == [0, 1]
    for r in (0, 1):  # each rank's rows are that rank's own roofline
        sub = probe.Run(calls=run.calls[run.calls["rank"] == r], steps=run.steps[run.steps["rank"] == r],
                        runs=run.runs, meta=run.meta)
        want = sub.roofline(by="role")
        pd.testing.assert_frame_equal(csv[csv["rank"] == r].drop(columns="rank").reset_index(drop=True), want)
    rl = tabs["roofline-table"]
    assert rl.columns[0] == "rank" and set(rl["rank"]) == {"0", "1"}


def test_phase_blocks_has_a_series_per_phase_and_rank(two_ranks):
    run = two_ranks
    fig = figures.phase_blocks(run.calls, run.steps, by="role")
    names = [t.name for t in fig.data]
    assert names == ["prefill · rank 0", "prefill · rank 1", "decode · rank 0", "decode · rank 1"]
    for tr in fig.data:
        phase, rank = tr.name.split(" · rank ")
        r = int(rank)
        own = probe.Run(calls=run.calls[run.calls["rank"] == r], steps=run.steps[run.steps["rank"] == r],
                        runs=run.runs).summary("role")
        want = own[own["phase"] == phase].set_index("name")["self_ms"]
        np.testing.assert_allclose(np.asarray(tr.y, dtype=float), want[list(tr.x)].to_numpy())
    assert fig.data[0].marker.pattern.shape != fig.data[1].marker.pattern.shape


def test_single_rank_report_has_no_rank_columns(runs):
    run = runs["fake"]
    tabs = tables(render_report(run))
    for key in ("headline-table", "shape-table", "roofline-table"):
        assert "rank" not in tabs[key].columns, key
    assert "rank-role-table" not in tabs and "ranks" not in set(tabs["facts"]["fact"])
    fig = figures.phase_blocks(run.calls, run.steps)
    assert [t.name for t in fig.data] == ["prefill", "decode"] and fig.data[0].marker.pattern.shape is None


def test_a_sharded_rank_shows_its_own_width(tmp_path):
    """Rank 1 holds half of each MLP (as a tensor-parallel shard would): its rows show the half width."""
    d = tmp_path / "tp"
    for r, inter in ((0, 64), (1, 32)):
        m = tiny_model("llama", intermediate_size=inter)
        assert m.config.intermediate_size == inter
        probe.save_rank(record(m, rank=r, depth="all", new=2), d)
    walk = figures.shape_walkthrough(probe.load(d).calls)
    gate = walk[(walk["module"] == "model.layers.{0..1}.mlp.gate_proj") & (walk["phase"] == "prefill")]
    assert dict(zip(gate["rank"], gate["out_shapes"])) == {0: f"[1, {PROMPT}, 64]", 1: f"[1, {PROMPT}, 32]"}


# --------------------------------------------------------------------------- sweep
def test_sweep_folder_report_via_the_cli(model, tmp_path, capsys):
    out = tmp_path / "sw"
    df = sweep(model, None, [4, 8], [1], new_tokens=2, repeat=1, warmup=0, out=out, model_id=f"sweep{XSS}")
    assert not (out / "meta.json").exists() and len(df) == 4
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "sweep.html"), str(out / "csv" / "sweep.csv"), str(out / "csv" / "sweep_summary.csv")]
    page = (out / "sweep.html").read_text(encoding="utf-8")
    js = get_plotlyjs()
    assert page.count(js) == 1 and "Content-Security-Policy" in page
    rest = page.replace(js, "")
    assert not re.search(r"https?://|<link|@import|url\(|\ssrc=", rest)
    assert XSS not in rest and "sweep&lt;script&gt;alert(1)&lt;/script&gt;" in rest
    for div_id in ("sweep-prefill", "sweep-decode", "sweep-throughput"):
        assert f'<div id="{div_id}"' in rest
    # the same page as `probe sweep` writes (render_sweep), and a rebuild gives the same bytes
    loaded, meta = load_sweep(out)
    assert page == render_sweep(loaded, meta) == render_sweep(df, meta)
    assert main(["report", str(out), "--format", "html", "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text(encoding="utf-8") == page
    summ = tables(page)["sweep-summary-table"]
    want = sweep_summary(df)
    assert list(summ["prompt_len"]) == [str(v) for v in want["prompt_len"]]
    # the page shows ms to about four significant digits (probe.fmt.ms)
    np.testing.assert_allclose(summ["prefill_ms"].str.replace(",", "").astype(float), want["prefill_ms"],
                               rtol=5e-4, atol=5e-4)
    assert set(tables(page)["runs-table"]["run directory"]) == {"runs/p4-b1", "runs/p8-b1"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "csv" / "sweep.csv")[["prompt_len", "step", "kv_len"]],
                                  df[["prompt_len", "step", "kv_len"]].astype("int64"))
    assert main(["report", str(out), "--format", "trace"]) == 2
    assert "is a sweep" in capsys.readouterr().err
    # a config's run inside the sweep is an ordinary run directory
    assert main(["report", str(out / "runs" / "p4-b1"), "--format", "html"]) == 0
