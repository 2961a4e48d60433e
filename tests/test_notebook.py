"""examples/seed_walkthrough.ipynb runs top to bottom in a real Jupyter kernel, without an error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import transformers

try:  # the test extras install them; CI must run the notebook, never skip it
    import ipykernel  # noqa: F401
    import nbclient
    import nbformat
    import plotly  # noqa: F401
except ImportError as exc:
    if os.environ.get("CI"):
        pytest.fail(f"the notebook test needs the test extras on CI: {exc}", pytrace=False)
    pytest.skip(f"{exc} (pip install -e '.[test]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "seed_walkthrough.ipynb"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        out.extend(str(v) for k, v in o.get("data", {}).items() if k in ("text/plain", "text/html"))
    return "\n".join(out)


#: the sampling stages of section 5's settings, in the order generate runs them
STAGES = ("update kwargs", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "dispatch",
          "stopping", "prepare inputs", "probe", "remainder", "= outside_ms")


def _cell(nb, marker: str):
    """The one code cell whose source contains ``marker``."""
    found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {marker!r}"
    return found[0]


def _stage_table(text: str) -> dict[str, list[float]]:
    """The sampling-stage table's text (stage, then ms/step and share of each phase) -> stage: the ms/step values."""
    rows = {}
    for line in text.splitlines():
        stage = next((s for s in STAGES if line.startswith(s + " ")), None)
        if stage is not None:
            cells = line[len(stage):].split()  # prefill ms, share, decode ms, share
            assert len(cells) == 4 and all(c.endswith("%") for c in cells[1::2]), line
            rows[stage] = [float(c.replace(",", "")) for c in cells[0::2]]
    return rows


def _check_sampling_stages(nb) -> None:
    """Section 5's walk as generate ran it: every stage of each phase, adding up to outside_ms."""
    text = _text(_cell(nb, "run.sampling_summary()"))
    assert "prefill (1 step)" in text and "decode (9 steps)" in text, text
    rows = _stage_table(text)
    assert list(rows) == list(STAGES), text  # every stage, in generate's order
    *stages, total = rows.values()
    for phase in (0, 1):  # the shown ms/step (4 significant digits each) add up to the shown outside_ms
        shown = sum(r[phase] for r in stages)
        assert total[phase] > 0 and abs(shown - total[phase]) <= 0.005 * total[phase] + 0.01, (phase, rows)
    assert re.search(r"^= outside_ms .*100\.0% .*100\.0%$", text, re.M), text
    check = _text(_cell(nb, "remainder >= 0"))
    m = re.search(r"stages add up to outside_ms in (\d+) of (\d+) steps", check)
    assert m and m.group(1) == m.group(2) == "10", check
    assert "remainder >= 0 in 10 of 10 steps" in check, check


def test_seed_walkthrough_notebook_executes_and_shows_the_walk():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # cwd = the repository root, so the kernel imports this checkout's probe
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    # the kernel runs this interpreter's transformers (4.57 when run from the floor venv)
    assert f"| transformers {transformers.__version__}" in _text(nb.cells[1]), _text(nb.cells[1])
    # the tutorial's prefill on the 7B architecture, then the last position, then one decode step
    for want in ("embed    [1, 7] -> [1, 7, 4096]", "lm_head  [1, 7, 4096] -> [1, 7, 40076]",
                 "logits [1, 7, 40076] | last position [1, 40076]", "model.layers.{0..31}",
                 "32 decoder-layer calls", "vocabulary 40,076", "[1, 1, 40076]"):
        assert want in text, want
    assert "chose within the kept set in 5 of 5 draws" in text
    _check_sampling_stages(nb)
    # section 7: one decode layer opened down to its ops (the attention function a call of its own), its ledger
    deep = _text(_cell(nb, "deep=[0, 5]"))
    for want in ("model.layers.0.self_attn.attention_fn", "model.layers.0.mlp.down_proj", "mm "):
        assert want in deep, deep
    assert "model.layers.0" in _text(_cell(nb, "memory_ledger(deep.run.ledger"))
    figs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "application/vnd.plotly.v1+json" in o.get("data", {}) or "text/html" in o.get("data", {})]
    assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in figs) == 3
    _check_figures_render_in_an_html_export(nb)


def _check_figures_render_in_an_html_export(nb) -> None:
    """Each figure cell's output holds the figure for JupyterLab (plotly's mimetype) and as HTML that
    draws it with the plotly.js inlined once, in the first figure's output: an nbconvert HTML export
    shows the figures, with no network."""
    figure_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("figures.")]
    assert len(figure_cells) == 3
    for cell in figure_cells:
        (out,) = [o for o in cell.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        data = out["data"]
        assert data["application/vnd.plotly.v1+json"]["data"], cell.source  # traces, not an empty figure
        assert "Plotly.newPlot(" in data["text/html"], cell.source
    html = [str(o.get("data", {}).get("text/html", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    library = [i for i, h in enumerate(html) if "plotly.js v" in h and len(h) > 1_000_000]
    first_figure = next(i for i, h in enumerate(html) if "Plotly.newPlot(" in h)
    assert len(library) == 1 and library[0] < first_figure  # the library itself, inlined once, before use
    # no plotly from elsewhere; plotly's notebook renderer always adds MathJax from its CDN, for LaTeX
    # labels only: offline it fails to load and the figures draw all the same
    fetched = {m for h in html for m in re.findall(r"<script[^>]*\ssrc=\"([^\"]*)\"", h)}
    assert all("mathjax" in src.lower() for src in fetched), fetched
