"""The ``op`` level of a deep run: the call tree and its icicle opened down to ops, and two deep
runs compared op kind by op kind (API, report, CLI, dashboard), on the bundled tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import probe
from probe.analysis.op_compare import changed, op_comparison
from probe.analysis.op_tree import DISPATCH_ROLE, OP_ROLE, op_tree
from probe.analysis.ops import DISPATCH, dispatch_noise_ms, memory_ledger
from probe.analysis.run import merge
from probe.models import load_bundled
from tiny import as_rank

PROMPT = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8]])
GEN = {"max_new_tokens": 4, "do_sample": False}


def _run(attn: str, *, depth: str = "blocks", deep=True) -> probe.Run:
    model, _ = load_bundled(num_hidden_layers=2, attn_implementation=attn)
    return probe.profile(model, PROMPT, generate_kwargs=GEN, depth=depth, deep=deep)


@pytest.fixture(scope="module")
def sdpa() -> probe.Run:
    return _run("sdpa")


@pytest.fixture(scope="module")
def eager() -> probe.Run:
    return _run("eager")


@pytest.fixture(scope="module")
def sublayers() -> probe.Run:
    return _run("sdpa", depth="sublayers", deep=[0, 2])


def _children_add_up(tree: pd.DataFrame) -> int:
    """Every node with ops: its op rows and dispatch row add up to its self time; returns how many."""
    ops = tree[tree["role"].isin([OP_ROLE, DISPATCH_ROLE])]
    mods = tree[~tree["role"].isin([OP_ROLE, DISPATCH_ROLE])].set_index(["phase", "node"])
    n = 0
    for (phase, parent), grp in ops.groupby(["phase", "parent_node"]):
        assert (grp["role"] == DISPATCH_ROLE).sum() == 1
        assert grp["self_ms"].sum() == pytest.approx(float(mods.loc[(phase, parent), "self_ms"]), rel=1e-9, abs=1e-12)
        n += 1
    return n


def test_tree_opens_each_block_down_to_its_ops(sdpa):
    plain = sdpa.tree()
    tree = sdpa.tree(level="op")
    mods = tree[~tree["role"].isin([OP_ROLE, DISPATCH_ROLE])].reset_index(drop=True)
    pd.testing.assert_frame_equal(mods, plain)  # the module rows are the tree as it was
    ops = tree[tree["role"] == OP_ROLE]
    assert len(ops) and (ops["module"].str.startswith("aten.")).all()
    # each op row sits right under its parent node, one level deeper, with the parent's layer
    parent = tree.set_index(["phase", "node"])
    for r in ops.head(50).itertuples():
        p = parent.loc[(r.phase, r.parent_node)]
        assert r.depth == p["depth"] + 1 and r.node == f"{r.parent_node} > {r.module}"
    layer0 = ops[(ops["phase"] == "decode") & (ops["parent_node"] == "model.layers.0")]
    assert "aten.mm.default" in set(layer0["module"])
    assert any("scaled_dot_product" in m for m in layer0["module"])
    # ops outside every recorded module (rotary embedding, mask) belong to the residue
    assert (ops["parent_node"] == "(residue)").any()
    assert _children_add_up(tree) >= 2 * 6  # embed, 2 layers, norm, head and the residue in both phases
    # an op row is its mean per sampled step times the phase's timed steps
    n_decode = int(plain.loc[(plain["phase"] == "decode") & (plain["node"] == "(residue)"), "calls"].iloc[0])
    sampled = sdpa.ops[sdpa.ops["phase"] == "decode"][["run_id", "step"]].drop_duplicates().shape[0]
    mine = sdpa.ops[(sdpa.ops["phase"] == "decode") & (sdpa.ops["block"] == "model.layers.0")
                    & (sdpa.ops["op"] == "aten.mm.default")]
    row = layer0[layer0["module"] == "aten.mm.default"].iloc[0]
    assert row["self_ms"] == pytest.approx(mine["host_ms"].sum() / sampled * n_decode)
    assert row["calls"] == round(len(mine) / sampled * n_decode)


def test_op_tree_at_sublayers_and_collapsed(sublayers):
    run = sublayers
    tree = run.tree(level="op")
    ops = tree[tree["role"] == OP_ROLE]
    # the SDPA op is under the attention function, the projections' mm under the attention module
    sdp = ops[ops["module"].str.contains("scaled_dot_product")]
    assert len(sdp) and sdp["parent_node"].str.endswith("self_attn.attention_fn").all()
    assert _children_add_up(tree) > 0
    # collapsed at level 1: every op goes to a top-level node
    top = run.tree(depth=1, level="op")
    assert (top.loc[top["role"] == OP_ROLE, "depth"] == 2).all()
    assert _children_add_up(top) > 0


def test_op_tree_of_two_ranks_scales_by_both_ranks_sampled_steps(sdpa):
    """Two ranks under one run id (the same run as rank 0 and rank 1): the tree pools their steps
    (keyed by rank, run id and step), so every row is twice one rank's, its share the same."""
    one = sdpa.tree(level="op")
    two = merge([sdpa, as_rank(sdpa, 1)]).tree(level="op")
    assert two["node"].tolist() == one["node"].tolist() and two["role"].tolist() == one["role"].tolist()
    for col in ("self_ms", "total_ms"):
        assert two[col].to_numpy() == pytest.approx(2 * one[col].to_numpy(), rel=1e-9, abs=1e-12)
    assert two["share"].to_numpy() == pytest.approx(one["share"].to_numpy(), rel=1e-9, abs=1e-12)
    ops = (one["role"] == OP_ROLE).to_numpy()
    assert (abs(two["calls"].to_numpy()[ops] - 2 * one["calls"].to_numpy()[ops]) <= 1).all()
    assert _children_add_up(two) == _children_add_up(one)


def test_op_summary_and_memory_ledger_of_two_ranks_per_sampled_step(sdpa):
    """The same two ranks: per sampled step (each rank's steps its own) every figure is one rank's."""
    both = merge([sdpa, as_rank(sdpa, 1)])
    for by in ("block", "module"):
        one, two = sdpa.op_summary(by=by), both.op_summary(by=by)
        pd.testing.assert_frame_equal(two.drop(columns="steps"), one.drop(columns="steps"))
        assert (two["steps"] == 2 * one["steps"]).all()
    one, two = (memory_ledger(r.ledger, r.ops) for r in (sdpa, both))
    pd.testing.assert_frame_equal(two.drop(columns="steps"), one.drop(columns="steps"))
    assert (two["steps"] == 2 * one["steps"]).all()


def test_op_tree_of_a_phase_without_residue_or_top_level_rows(sublayers):
    """A tree filtered to its deeper rows in decode has no step count there: decode's rows stay as
    they are (no op rows under them), prefill opens as before."""
    tree = sublayers.tree()
    kept = tree[(tree["phase"] == "prefill") | (tree["depth"] > 1)].reset_index(drop=True)
    got = op_tree(kept, sublayers.ops)
    dec = got[got["phase"] == "decode"].reset_index(drop=True)
    pd.testing.assert_frame_equal(dec, kept[kept["phase"] == "decode"].reset_index(drop=True))
    pre = got[got["phase"] == "prefill"].reset_index(drop=True)
    pd.testing.assert_frame_equal(pre, op_tree(tree[tree["phase"] == "prefill"], sublayers.ops))
    assert (pre["role"] == OP_ROLE).any()


def test_tree_level_bad_input(sdpa):
    with pytest.raises(ValueError, match="level must be 'module'"):
        sdpa.tree(level="ops")
    plain = _run("sdpa", deep=None)
    with pytest.raises(ValueError, match="needs a deep run"):
        plain.tree(level="op")
    model, _ = load_bundled(num_hidden_layers=2)
    with probe.attach(model, deep=[0]) as p:  # a deep run alone: no timed step to open
        model.generate(PROMPT, **GEN)
    with pytest.raises(ValueError, match="needs a deep run's ops and timed calls"):
        p.run.tree(level="op")


def test_icicle_opens_down_to_ops_and_keeps_the_forward(sdpa):
    from reports.tree_figures import icicle

    plain = icicle(sdpa.calls, sdpa.steps, "decode")
    fig = icicle(sdpa.calls, sdpa.steps, "decode", ops=sdpa.ops)
    ids = list(fig.data[0].ids)
    # ids as plotly gets them (plot_text escapes ">")
    assert f"model.layers.0 &gt; {DISPATCH}" in ids and "model.layers.0 &gt; aten.mm.default" in ids
    assert "mm" in list(fig.data[0].labels)  # ops by their short name
    assert fig.data[0].labels[0] == plain.data[0].labels[0]  # the root is the same forward
    assert "down to its ops" in fig.layout.title.text and "sampled step" in fig.layout.title.text
    # a node whose ops hold its self time adds nothing of its own
    vals = dict(zip(ids, fig.data[0].values))
    assert vals["model.layers.0"] == 0.0 and all(v >= 0 for v in vals.values())
    # an empty ops frame, or one without the phase: the plain icicle
    assert list(icicle(sdpa.calls, sdpa.steps, "decode", ops=sdpa.ops.iloc[:0]).data[0].ids) == list(plain.data[0].ids)


def test_report_icicles_open_down_to_ops_for_a_deep_run(sdpa):
    from reports.html import render_report

    page = render_report(sdpa)
    assert "Module tree, decode down to its ops" in page and "Module tree, prefill down to its ops" in page
    assert "model.layers.0 &amp;gt; aten.mm.default" in page or "model.layers.0 &gt; aten.mm.default" in page


def test_op_comparison_flags_what_changed(sdpa, eager):
    from probe.reports.compare import op_comparison_frame

    frame = op_comparison_frame(sdpa, eager)
    assert list(frame.columns) == list(probe.schema.OP_DIFF)
    moved = changed(frame)
    layers = moved[moved["block"] == "model.layers.*"]
    only_a = set(layers.loc[layers["change"] == "only in A", "op"])
    only_b = set(layers.loc[layers["change"] == "only in B", "op"])
    assert any("scaled_dot_product" in o for o in only_a)  # sdpa's fused kernel
    assert {"aten.bmm.default", "aten._softmax.default"} <= only_b  # eager's matmuls and softmax
    # per block apart, the same op kinds change in each layer
    each = op_comparison_frame(sdpa, eager, fold=False)
    assert {"model.layers.0", "model.layers.1"} <= set(changed(each)["block"])
    # a run against itself: nothing ran differently
    same = op_comparison(sdpa.op_summary(), sdpa.op_summary())
    assert changed(same).empty and (same["diff_ms"].fillna(0) == 0).all()
    assert op_comparison_frame(sdpa, _run("sdpa", deep=None)) is None


def test_dispatch_rows_within_their_noise_of_zero_are_no_change(sdpa):
    """A block's (dispatch and Python) is its timed time less its ops', timed on other steps: a
    few microseconds either side of 0 is noise, never "faster" or "slower"; a side below 0 by more
    than that is no time to judge (shown as it is, never flagged); a real move still is."""
    a = sdpa.op_summary()
    at = a.index[(a["op"] == DISPATCH) & (a["phase"] == "decode") & a["block_ms"].notna()][0]
    phase, block, block_ms = a.at[at, "phase"], a.at[at, "block"], float(a.at[at, "block_ms"])
    noise = float(dispatch_noise_ms(block_ms))
    assert noise == max(0.001, 0.05 * block_ms)
    # the block's op rows set small (the same in both runs), whatever this machine timed: moves of
    # the sizes below then pass the op rows' floor, and only the noise holds them
    ops = ((a["phase"] == phase) & (a["block"] == block) & (a["op"] != DISPATCH)).to_numpy()
    a.loc[ops, "host_ms"] = 0.1 * noise / int(ops.sum())
    assert 0.05 * float(a.loc[ops, "host_ms"].sum()) < 1.8 * noise

    def compared(a_ms: float, b_ms: float) -> pd.Series:
        x, y = a.copy(), a.copy()
        x.at[at, "host_ms"], y.at[at, "host_ms"] = a_ms, b_ms
        got = op_comparison(x, y)
        rows = got[(got["phase"] == phase) & (got["block"] == block) & (got["op"] == DISPATCH)]
        assert len(rows) == 1 and changed(got[got["op"] != DISPATCH]).empty
        return rows.iloc[0]

    r = compared(0.9 * noise, -0.9 * noise)  # both within the noise: no change, the numbers as they are
    assert r["change"] == "" and r["b_ms"] == -0.9 * noise and r["diff_ms"] == pytest.approx(-1.8 * noise)
    r = compared(0.9 * noise, -3 * noise)  # below 0 beyond the noise: shown, not judged
    assert r["change"] == "" and r["b_ms"] == -3 * noise
    assert compared(-3 * noise, 20 * noise)["change"] == ""
    assert compared(20 * noise, -0.9 * noise)["change"] == "faster"  # B's dispatch and Python went away
    assert compared(0.9 * noise, 20 * noise)["change"] == "slower"
    assert compared(20 * noise, 10 * noise)["change"] == "faster"
    assert compared(20 * noise, 19 * noise)["change"] == ""  # under the 25 % a time flag needs
    assert float(dispatch_noise_ms(float("nan"))) == 0.001  # a block without a timed time: a microsecond


def test_op_comparison_bad_input(sdpa):
    with pytest.raises(ValueError, match="lacks host_ms"):
        op_comparison(sdpa.op_summary().drop(columns="host_ms"), sdpa.op_summary())
    empty = op_comparison(sdpa.op_summary().iloc[:0], sdpa.op_summary().iloc[:0])
    assert empty.empty and list(empty.columns) == list(probe.schema.OP_DIFF)


def test_cli_compare_of_two_deep_runs(tmp_path, capsys, sdpa, eager):
    from probe.cli import main

    sdpa.save(tmp_path / "sdpa")
    eager.save(tmp_path / "eager")
    _run("sdpa", deep=None).save(tmp_path / "plain")
    assert main(["compare", str(tmp_path / "sdpa"), str(tmp_path / "eager"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "inside each block, A vs B" in out and "only in B" in out and "bmm" in out
    ops = pd.read_csv(tmp_path / "cmp" / "compare_ops.csv", keep_default_na=False, na_values=[""])
    assert set(ops.columns) == set(probe.schema.OP_DIFF) and (ops["change"] == "only in A").any()
    page = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    assert 'id="ops-changed"' in page and "only in B" in page
    assert main(["compare", str(tmp_path / "sdpa"), str(tmp_path / "plain"), "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "only A has a deep pass" in out and not (tmp_path / "one" / "compare_ops.csv").exists()
    assert 'id="ops-none"' in (tmp_path / "one" / "compare.html").read_text(encoding="utf-8")


def test_dashboard_tree_and_compare_at_the_op_level(tmp_path, sdpa, eager):
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP

    sdpa.save(tmp_path / "sdpa")
    eager.save(tmp_path / "eager")
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["runs_dir"] = str(tmp_path)
    at.run()
    at.sidebar.multiselect(key="runs").set_value(["sdpa"]).run()
    at.sidebar.radio(key="view").set_value("Tree").run()
    assert not at.exception, [e.value for e in at.exception]
    at.checkbox(key="tree_ops").check().run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert table["role"].isin([OP_ROLE, DISPATCH_ROLE]).any()
    at.sidebar.radio(key="view").set_value("Compare").run()
    at.radio(key="compare_level").set_value("op").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = at.dataframe[-2].value if len(at.dataframe) >= 2 else at.dataframe[0].value
    assert "change" in shown.columns
