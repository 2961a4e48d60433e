"""The dashboard's Overview opens with prefill vs decode side by side, then the generated text and
the prompt: AppTest over runs recorded by the real probe (the bundled model with its text, a tiny
Llama without)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

import probe  # noqa: E402
from probe.dashboards import APP  # noqa: E402
from probe.analysis.headline import headline_cells, shown_ids  # noqa: E402
from probe.models import load_bundled  # noqa: E402
from tiny import tiny_llama  # noqa: E402

XSS = "<script>alert(1)</script>"
EXACT = f"<|user|>\n{XSS}\n<|assistant|>\n"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """``texted``: the bundled model (2 layers) with ``meta["text"]`` as ``probe run`` keeps it;
    ``bare``: a tiny Llama with no text at all (token ids only)."""
    root = tmp_path_factory.mktemp("front")
    model, tok = load_bundled(num_hidden_layers=2)
    enc = tok(EXACT, return_tensors="pt")
    with probe.attach(model) as p:
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    run = p.run
    run.meta["prompt"] = XSS
    run.meta["text"] = {"prompt": EXACT, "generated": {run.runs["run_id"].iloc[0]: [
        tok.decode(out[0, enc["input_ids"].shape[1]:]) + " *not bold* <b>x</b>"]}}
    run.save(root / "texted")
    small = tiny_llama(layers=2, hidden=32)
    with probe.attach(small) as p:
        small.generate(torch.tensor([[3, 4, 5, 6]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    p.run.save(root / "bare")
    return root


def table(at: AppTest, index: int = 0) -> pd.DataFrame:
    """A static table of the page as plain text (the dashboard keeps a number and its unit together
    with a no-break space)."""
    return at.table[index].value.astype(str).replace("\u00a0", " ", regex=True)


def app(runs_dir, runs: list[str]) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.run()
    at.sidebar.multiselect(key="runs").set_value(runs).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.header[0].value == "Overview"
    return at


def test_overview_of_one_run_opens_with_the_phases_then_its_text_and_prompt(runs_dir):
    at = app(runs_dir, ["texted"])
    run = probe.load(runs_dir / "texted")
    assert [s.value for s in at.subheader][:2] == ["Prefill vs decode", "Per generate call"]
    panel = table(at)
    want = headline_cells(run.headline())
    assert list(panel.columns) == ["prefill", "decode", "setup and outside", "generate"]
    pd.testing.assert_frame_equal(panel.astype(str), want.astype(str), check_index_type=False,
                                  check_names=False)
    assert sum(float(panel.loc["share", p].rstrip("%")) for p in panel.columns[:3]) == pytest.approx(100, abs=0.15)
    codes = [c.value for c in at.code]
    # shown as code, so nothing in them is markup (Streamlit drops the trailing newline)
    assert codes == [run.generated()[0]["text"][0], EXACT.rstrip("\n")]
    assert any("Exactly as it was run" in m.value or "exactly as it was run" in m.value for m in at.markdown)
    assert not at.error


def test_overview_of_a_run_without_text_shows_its_token_ids(runs_dir):
    at = app(runs_dir, ["bare"])
    run = probe.load(runs_dir / "bare")
    assert table(at).loc["steps", "decode"] == headline_cells(run.headline()).loc["steps", "decode"]
    assert [c.value for c in at.code] == [shown_ids(run.generated()[0]["token_ids"][0])]
    assert any("kept no text" in m.value for m in at.markdown)


def test_overview_of_several_runs_has_a_row_per_run_and_part(runs_dir):
    at = app(runs_dir, ["texted", "bare"])
    rows = table(at)
    assert list(rows["run"]) == ["texted"] * 4 + ["bare"] * 4
    assert list(rows["part"]) == ["prefill", "decode", "setup and outside", "generate"] * 2
    for name in ("texted", "bare"):
        want = headline_cells(probe.load(runs_dir / name).headline())
        mine = rows[rows["run"] == name].set_index("part")
        for label in want.index:
            assert list(mine[label]) == list(want.loc[label]), (name, label)
    assert [e.label for e in at.expander] == ["texted: generated text and prompt", "bare: generated text and prompt"]
    assert not at.error


def test_the_phases_table_is_of_the_whole_calls_under_a_filter_and_kept_across_filters(runs_dir):
    """The table reads the runs as loaded, so it is cached on a key without the filters: a phase
    filter shows the same table (the whole generate calls) without building it again; the key still
    follows the runs' files."""
    from pathlib import Path

    from probe.dashboards import data
    from probe.dashboards.context import Context

    at = app(runs_dir, ["texted", "bare"])
    before = table(at)
    at.sidebar.multiselect(key="phases").set_value(["decode"]).run()
    assert not at.exception
    pd.testing.assert_frame_equal(table(at), before)
    sig = {"texted": ("a", 1), "bare": ("b", 2)}
    ctx = {f: Context(Path(runs_dir), ["texted", "bare"], {}, f, None, dict(sig))
           for f in (data.Filters(), data.Filters(phases=("decode",)))}
    plain, decode = ctx.values()
    assert decode.key(filtered=False) == plain.key(filtered=False) == plain.key()
    assert decode.key() != plain.key()
    assert decode.key(("bare",), filtered=False) == plain.key(("bare",))
    moved = Context(Path(runs_dir), ["texted", "bare"], {}, data.Filters(phases=("decode",)), None,
                    {**sig, "bare": ("b", 3)})  # a run's files changed: another key
    assert moved.key(("bare",), filtered=False) != decode.key(("bare",), filtered=False)
