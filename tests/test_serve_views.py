"""Views of continuous-batching runs: figure builders, the report's Serving section, the
dashboard's Serving view (AppTest and a real headless Chromium)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import probe
from probe import compat

from browser import CHROMIUM, dashboard_server, launch
from tiny import tiny_llama

pytest.importorskip("plotly")
GAP = compat.continuous_batching_gap()
if GAP is not None:
    pytest.skip(f"continuous batching not profiled here: {GAP}", allow_module_level=True)

SHOT = Path("/tmp/dashboard_serving.png")  # kept for a person to look at


def record_serve(out: Path) -> Path:
    """A served workload on a tiny Llama: six requests of 4 and 20 tokens, all at once, through the
    load generator (a 16-token budget: chunked prompts and mixed steps), saved to ``out``."""
    from transformers import GenerationConfig

    from probe.routines.loadgen import cache_config, plan, serve

    model = tiny_llama(layers=2, hidden=32)
    work = plan(6, float("inf"), [4, 20], 4, vocab_size=128, seed=1)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with probe.attach(model) as p:
        serve(model, work, gen, cache_config(work, max_batch_tokens=16, allow_block_sharing=False))
    p.run.save(out)
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-runs")
    model = tiny_llama(layers=2, hidden=32)
    with probe.attach(model) as p:
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    p.run.save(root / "plain")
    record_serve(root / "serve")  # saved last: the dashboard opens on the newest run
    return root


@pytest.fixture(scope="module")
def run(runs_root):
    return probe.load(runs_root / "serve")


def _arr(v):
    import base64

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def test_figures_show_the_recorded_numbers(run):
    from probe.reports import serve_figures as sf

    st = sf.serve_steps(run.steps)
    assert len(st) == len(run.steps) and len(run.requests) == 6
    fig = sf.batch_composition(run.steps)
    bars = {t.name: t for t in fig.data}
    assert sum(_arr(bars["prefill tokens"].y)) == st["prefill_tokens"].sum()
    assert sum(_arr(bars["decode tokens"].y)) == st["decode_tokens"].sum() == 6 * 4 - 6
    tl = sf.request_timeline(run.requests)
    assert [t.name for t in tl.data] == ["queue", "prefill", "decode"]
    # the prefill segment's hover says how many chunks it spans (the queue ends at the first)
    assert all("prefill chunk" in str(row[2]) for row in tl.data[1].customdata)
    rq = run.requests.sort_values(["arrival_ms", "request_id"])
    total = sum(np.array(_arr(t.x)) for t in tl.data)  # queue + prefill + decode = end to end
    assert np.allclose(total, (rq["finished_ms"] - rq["arrival_ms"]).to_numpy())
    lat = sf.latency_distributions(run.requests)
    assert sorted(_arr(lat.data[0].x)) == sorted(run.requests["ttft_ms"])
    thr = sf.throughput_over_time(run.steps)
    width = thr.data[0].x[1] - thr.data[0].x[0]
    assert np.isclose(sum(_arr(thr.data[0].y)) * width, st["new_tokens"].sum())
    table = sf.serve_table(run.requests)
    assert table["requests"].sum() == 6 and table["status"].tolist() == ["ok"]
    split = sf.mixed_split(__import__("probe.apportion", fromlist=["step_split"]).step_split(run.apportion()))
    assert {t.name for t in split.data} >= {"prefill part", "decode part"}


def test_figures_on_empty_frames_say_no_data():
    from probe.schema import REQUESTS, STEPS, empty
    from probe.reports import serve_figures as sf

    for fig in (sf.request_timeline(empty(REQUESTS)), sf.batch_composition(empty(STEPS)),
                sf.latency_distributions(empty(REQUESTS)), sf.throughput_over_time(empty(STEPS))):
        assert not fig.data and fig.layout.annotations
    assert sf.serve_table(empty(REQUESTS)).empty


def test_report_has_a_serving_section_and_requests_csv(run, tmp_path):
    from probe.reports import write_reports
    from probe.reports.csv_export import read_csv
    from probe.reports.html import render_report

    html = render_report(run)
    for element in ("serving", "serve-table", "fig-serve-timeline", "fig-serve-batches", "fig-serve-latency",
                    "fig-serve-throughput", "fig-serve-split", "headline-note"):
        assert f'id="{element}' in html, element
    assert html == render_report(probe.load(run.path))  # reproducible
    paths = write_reports(run, tmp_path, formats=("csv",))
    req = next(p for p in paths if p.name == "requests.csv")
    back = read_csv(req)
    assert back["request_id"].tolist() == run.requests["request_id"].tolist()


def test_plain_run_report_has_no_serving_section(runs_root):
    from probe.reports.html import render_report

    html = render_report(probe.load(runs_root / "plain"))
    assert 'id="serving"' not in html and 'id="headline-table"' in html


def test_dashboard_serving_view(runs_root):
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(runs_root)
    at.run()
    at.sidebar.multiselect(key="runs").set_value(["serve"]).run()
    at.sidebar.radio(key="view").set_value("Serving").run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 5
    assert at.dataframe[0].value["requests"].sum() == 6
    at.sidebar.multiselect(key="runs").set_value(["plain"]).run()
    assert not at.exception
    assert not at.get("plotly_chart") and any("continuous-batching" in i.value for i in at.info)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_dashboard_serving_view_in_chromium(runs_root, tmp_path):
    from playwright.sync_api import sync_playwright

    with dashboard_server(runs_root, tmp_path / "server.log") as url:
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 2000})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.wait_for_selector('[data-testid="stSidebar"]', timeout=60_000)
                # the dashboard opens on the newest run: the serving one
                page.locator('[data-testid="stSidebar"] [role="radiogroup"] label').get_by_text(
                    "Serving", exact=True).click()
                page.wait_for_function(
                    "() => { const p = [...document.querySelectorAll('.js-plotly-plot')];"
                    " return p.length === 5 && p.every(e => e.querySelector('.trace')); }", timeout=90_000)
                assert page.locator('[data-testid="stException"]').count() == 0
                page.screenshot(path=str(SHOT), full_page=True)
            finally:
                browser.close()
        assert not errors, errors
