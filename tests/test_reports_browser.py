"""The HTML reports in a real headless Chromium with every network request blocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import probe
from probe.analysis.hardware import Peaks
from probe.reports import write_reports, write_sweep_reports
from probe.reports.compare import write_comparison
from probe.reports.html import FIGURES
from probe.reports.sweep_report import SWEEP_FIGURES
from tiny import tiny_llama

CHROMIUM = "/usr/bin/chromium"
XSS = "<script>alert(1)</script>"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing on CI: install Debian's chromium", pytrace=False)
    pytest.skip(f"{CHROMIUM} is not installed (set CI=1 to make this a failure)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (after the skip: chromium decides)


def _record(attn: str) -> probe.Run:
    model = tiny_llama(layers=3, hidden=32, vocab=96, attn_implementation=attn)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with probe.attach(model, model_id=f"{XSS}-{attn}") as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    run = p.run
    run.meta["prompt"] = XSS
    # stored roofs, as `probe run` keeps them: the report draws the roofline from them
    run.meta["peaks"] = Peaks(name="CPU", dtype="float32", flops_per_s=5e10, bytes_per_s=1e10, source="test",
                              measured=True, wait_pct=0.0).to_dict()
    return run


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser")
    a, b = _record("eager"), _record("sdpa")
    a.save(root / "eager")
    b.save(root / "sdpa")
    report = write_reports(a, root / "eager", formats=("html",))[0]
    compare = write_comparison(a, b, root / "cmp")[0]
    from probe.routines.sweep import sweep

    model = tiny_llama(layers=2, hidden=32, vocab=96)
    sweep(model, None, [4, 8], [1], new_tokens=2, repeat=1, warmup=0, out=root / "sweep", model_id=XSS)
    swept = write_sweep_reports(root / "sweep", formats=("html",))[0]
    return {"report": report, "compare": compare, "sweep": swept}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, path: Path, javascript: bool = True):
    """Load ``path`` with all requests but the file itself aborted; return (page, log)."""
    ctx = browser.new_context(java_script_enabled=javascript)
    page = ctx.new_page()
    url = path.resolve().as_uri()
    log: dict[str, list[str]] = {"blocked": [], "dialogs": [], "errors": [], "console": []}

    def route(r):
        if r.request.url == url:
            r.continue_()
        else:
            log["blocked"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("dialog", lambda d: (log["dialogs"].append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: log["errors"].append(str(e)))
    page.on("console", lambda m: log["console"].append(m.text) if m.type == "error" else None)
    page.goto(url, wait_until="load")
    return ctx, page, log


def test_report_renders_every_figure_offline_and_runs_no_injected_script(browser, pages):
    ctx, page, log = _open(browser, pages["report"])
    try:
        for div_id in [d for d, _, _ in FIGURES] + ["fig-roofline"]:
            page.wait_for_selector(f"#{div_id}.js-plotly-plot svg.main-svg", timeout=15_000)
        assert page.locator(".js-plotly-plot").count() == len(FIGURES) + 1  # + the roofline
        assert page.locator("#fig-roofline .scatterlayer .point").count() > 0  # its markers drew
        heat = page.locator("#fig-layer-heatmap .hm, #fig-layer-heatmap image")
        assert heat.count() >= 1  # the heatmap drew its cells, not just axes
        assert page.locator("#prompt-text").inner_text() == XSS
        assert XSS in page.locator("h1").inner_text()
        page.wait_for_timeout(300)  # give any stray script a moment to fire
        assert log == {"blocked": [], "dialogs": [], "errors": [], "console": []}
    finally:
        ctx.close()


def test_tables_read_without_javascript(browser, pages):
    ctx, page, log = _open(browser, pages["report"], javascript=False)
    try:
        assert page.locator(".js-plotly-plot").count() == 0
        modules = page.locator("#module-table").inner_text()
        assert "model.layers.2" in modules and "(residue)" in modules
        assert "[1, 5, 32]" in page.locator("#shape-table").inner_text()
        assert "ttft_ms" in page.locator("#headline-table").inner_text()
        assert log["blocked"] == [] and log["dialogs"] == []
    finally:
        ctx.close()


def test_sweep_page_renders_offline(browser, pages):
    ctx, page, log = _open(browser, pages["sweep"])
    try:
        for div_id, _, _ in SWEEP_FIGURES:
            page.wait_for_selector(f"#{div_id}.js-plotly-plot svg.main-svg", timeout=15_000)
        assert page.locator(".js-plotly-plot").count() == len(SWEEP_FIGURES)
        assert page.locator("#sweep-prefill .scatterlayer .trace").count() == 1  # one batch size
        assert page.locator("h1").inner_text() == f"probe sweep: {XSS}"
        page.wait_for_timeout(300)
        assert log == {"blocked": [], "dialogs": [], "errors": [], "console": []}
    finally:
        ctx.close()


def test_compare_page_renders(browser, pages):
    ctx, page, log = _open(browser, pages["compare"])
    try:
        page.wait_for_selector("#fig-compare-blocks.js-plotly-plot svg.main-svg", timeout=15_000)
        assert page.locator("#fig-compare-blocks .bars path").count() > 0
        assert page.locator("#fig-compare-blocks .subplot.xy, #fig-compare-blocks .subplot.x2y2").count() == 2
        assert page.locator("#fig-compare-roles").count() == 0  # depth blocks: per role is per block
        assert page.locator("h1").inner_text() == "probe compare: A = eager vs B = sdpa"
        assert f"{XSS}-eager" in page.locator("#facts").inner_text()
        page.wait_for_timeout(300)
        assert log == {"blocked": [], "dialogs": [], "errors": [], "console": []}
    finally:
        ctx.close()


def test_content_security_policy_stops_a_script_that_escaped_escaping(browser, tmp_path):
    from probe.reports.html import Page

    doc = Page()
    doc.add("<p id=x>before</p><script>alert(2)</script><script>document.getElementById('x').textContent='ran'"
            "</script>")
    doc.figure(__import__("probe.reports.figures", fromlist=["empty_figure"]).empty_figure("t"), "fig-t", "t")
    path = tmp_path / "page.html"
    path.write_text(doc.render("csp"), encoding="utf-8")
    ctx, page, log = _open(browser, path)
    try:
        page.wait_for_selector("#fig-t.js-plotly-plot svg.main-svg", timeout=15_000)  # trusted scripts run
        page.wait_for_timeout(300)
        assert page.locator("#x").inner_text() == "before"
        assert log["dialogs"] == [] and log["blocked"] == []
        assert any("Content Security Policy" in m for m in log["console"])
    finally:
        ctx.close()
