"""The front door: prefill vs decode side by side first in the HTML report and in ``print(run)``,
then the generated text and the prompt as it was run; on real runs of the bundled model."""

from __future__ import annotations

import html
import json
import re

import pandas as pd
import pytest
import torch

import probe
from probe import fmt
from probe.analysis.headline import TOKENS_NOTE, headline_cells, headline_text, share_text, shown_ids
from probe.models import load_bundled
from probe.reports.html import render_report
from probe.reports.text import MAX_LONG_TEXT, cap
from test_reports_integration import tables

XSS = "<script>alert(1)</script>"
EXACT = f"<|user|>\n{XSS} & more\n<|assistant|>\n"  # what a chat template makes of the user's prompt
PARTS = ["prefill", "decode", "setup and outside", "generate"]


def expected(head, label: str, part: str) -> str:
    """The cell the headline should show for ``label`` of ``part``, formatted by probe.fmt directly."""
    row = head.set_index("part").loc[part]
    col = {"steps": "steps", "time": "time_ms", "share": "share", "time per token": "ms_per_token",
           "tokens/s": "tok_s", "KV cache after": "kv_cache_bytes", "peak memory": "mem_peak_bytes"}[label]
    v = row[col]
    if fmt.is_missing(v):
        return ""
    return {"steps": fmt.count, "share": fmt.pct, "tokens/s": fmt.tok_s, "KV cache after": fmt.nbytes,
            "peak memory": fmt.nbytes}.get(label, lambda x: fmt.ms(x, unit=True))(v)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> probe.Run:
    """The bundled model (2 layers) run on a templated prompt holding a script tag, its text kept as
    ``probe run`` keeps it (``meta["text"]``), saved and loaded back."""
    model, tok = load_bundled(num_hidden_layers=2)
    enc = tok(EXACT, return_tensors="pt")
    with probe.attach(model, model_id="bundled") as p:
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    run = p.run
    rid = run.runs["run_id"].iloc[0]
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    run.meta["prompt"] = XSS
    run.meta["text"] = {"prompt": EXACT, "generated": {rid: [text + " <b>x</b>"]}}
    return probe.load(run.save(tmp_path_factory.mktemp("bundled") / "run"))


def test_report_opens_with_the_phases_side_by_side(bundled):
    page = render_report(bundled)
    assert page.index('<table id="phases-table">') == page.index("<table")  # before any other table
    assert re.search(r"<nav><a href=\"#phases\">", page)
    head = bundled.headline()
    panel = tables(page)["phases-table"].set_index("")
    assert list(panel.columns) == PARTS
    assert list(panel.index) == ["steps", "time", "share", "time per token", "tokens/s", "KV cache after"]  # CPU
    for label in panel.index:
        for part in PARTS:
            assert panel.loc[label, part] == expected(head, label, part), (label, part)
    assert panel.loc["time", "prefill"] and panel.loc["time per token", "decode"] and panel.loc["tokens/s", "prefill"]
    # the parts add up to the generate call: exactly in the frame, to the rounding on the page
    parts = head[head["part"] != "generate"]
    assert parts["share"].sum() == pytest.approx(1.0)
    assert sum(float(panel.loc["share", p].rstrip("%")) for p in PARTS[:3]) == pytest.approx(100.0, abs=0.15)
    assert panel.loc["share", "generate"] == "100.0%"
    assert html.escape(TOKENS_NOTE[0].upper() + TOKENS_NOTE[1:], quote=True) in page
    assert "not measured on the CPU" in page


def test_report_shows_the_generated_text_and_the_exact_prompt_escaped(bundled):
    page = render_report(bundled)
    gen = bundled.generated()[0]["text"][0]
    assert f'<pre id="generated-text-0">{html.escape(gen, quote=True)}</pre>' in page
    assert f'<pre id="prompt-text">{html.escape(EXACT, quote=True)}</pre>' in page
    assert "Exactly as it was run" in page
    assert XSS not in page and "<b>x</b>" not in page
    # the answer, then what was generated, then the prompt, then the facts
    assert (page.index('id="phases-table"') < page.index('id="generated-text-0"') < page.index('id="prompt-text"')
            < page.index('id="facts"') < page.index('id="headline-table"'))
    assert render_report(bundled) == page  # deterministic


def test_long_text_is_capped_as_the_reports_cap_it(bundled):
    long = "word " * 3000
    meta = {**bundled.meta, "text": {"prompt": long, "generated": {bundled.runs["run_id"].iloc[0]: [long + "<i>"]}}}
    run = probe.Run(bundled.calls, bundled.steps, bundled.runs, meta=meta, sampling=bundled.sampling)
    page = render_report(run)
    assert long not in page
    assert f'<pre id="prompt-text">{html.escape(cap(long, MAX_LONG_TEXT))}</pre>' in page
    assert f'<pre id="generated-text-0">{html.escape(cap(long + "<i>", MAX_LONG_TEXT))}</pre>' in page


def test_a_run_without_text_shows_its_token_ids_or_nothing(bundled):
    meta = {k: v for k, v in bundled.meta.items() if k != "text"}
    run = probe.Run(bundled.calls, bundled.steps, bundled.runs, meta=meta, sampling=bundled.sampling)
    page = render_report(run)
    ids = bundled.generated()[0]["token_ids"][0]
    assert f'<pre id="generated-text-0">{html.escape(shown_ids(ids))}</pre>' in page
    assert "kept no text" in page
    assert f'<pre id="prompt-text">{html.escape(XSS)}</pre>' in page and "As given" in page  # the raw prompt
    # a run saved before token ids were kept (v1), with no prompt either: no section, no error
    runs = bundled.runs.assign(output_ids=pd.Series([None] * len(bundled.runs), dtype="string"))
    bare = probe.Run(bundled.calls, bundled.steps, runs, meta={k: v for k, v in meta.items() if k != "prompt"})
    page = render_report(bare)
    assert 'id="generated"' not in page and 'id="prompt"' not in page and 'id="phases-table"' in page
    assert "kept no text" in str(run) and shown_ids(ids) in str(run)


def test_print_run_is_the_headline_as_aligned_text_then_the_text(bundled):
    text = str(bundled)
    head = bundled.headline()
    lines = text.splitlines()
    assert lines[0] == "prefill vs decode (1 generate call)"
    header = lines[1]
    assert header.split() == ["prefill", "decode", "setup", "and", "outside", "generate"]
    rows = {ln.split("  ")[0]: ln for ln in lines[2:8]}
    cells = headline_cells(head)
    # right-aligned under their part: each value ends where its part's name ends
    ends = [header.index(p) + len(p) for p in PARTS]
    for label in cells.index:
        line = rows[label]
        for part, end in zip(PARTS, ends):
            want = expected(head, label, part)
            assert cells.loc[label, part] == want
            if want:
                assert line[end - len(want):end] == want, (label, part, line)
    for part in ("prefill", "decode"):
        assert fmt.ms(head.set_index("part").loc[part, "time_ms"], unit=True) in rows["time"]
    assert bundled.generated()[0]["text"][0] in text and "generated:" in text
    assert not re.search(r"\d[eE][-+]?\d", text) and "nan" not in text and "<NA>" not in text
    assert repr(bundled).startswith("<probe.Run runs=1 ") and "\n" not in repr(bundled)


def test_tiny_shares_read_as_less_than_a_hundredth_of_a_percent(bundled):
    assert [share_text(v) for v in (0.5, 0.984, 0.0, 1e-7, 2e-5, 2e-4, None)] == [
        "50.0%", "98.4%", "0.0%", "< 0.01%", "< 0.01%", "0.02%", ""]
    head = bundled.headline()
    total = head.loc[head["part"] == "generate", "time_ms"].iloc[0]
    head.loc[head["part"] == "setup and outside", ["time_ms", "share"]] = [total * 1e-7, 1e-7]
    text = headline_text(head)
    assert "< 0.01%" in text and not re.search(r"\d[eE][-+]?\d", text)


def test_meta_text_survives_save_and_load(bundled):
    assert json.loads(json.dumps(bundled.meta["text"]))["prompt"] == EXACT
    assert bundled.generated()[0]["text"][0].endswith(" <b>x</b>")


def test_a_run_without_a_generate_call_prints_its_repr():
    from tiny import tiny_llama

    model = tiny_llama(layers=1, hidden=32, vocab=96)
    with probe.attach(model) as p:
        model(torch.tensor([[3, 4, 5]]))
    assert str(p.run) == repr(p.run)
    assert 'id="phases-note"' in render_report(p.run)
