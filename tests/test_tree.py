"""The call tree and its accounting: self times, residue and shares add up at every depth."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import probe
from probe.analysis import accounting, grouping, tree
from probe import roles, schema
from tiny import tiny_llama, tiny_model
from edits import reseal

ARCHS = ("llama", "qwen2", "gemma2", "gpt2", "mixtral", "phi")


def _record(arch: str, depth: str, new_tokens: int = 3) -> probe.Run:
    model = tiny_model(arch)
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(0))
    with probe.attach(model, depth=depth) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return p.run


@pytest.fixture(scope="module", params=[(a, d) for a in ARCHS for d in schema.DEPTHS], ids=lambda p: f"{p[0]}-{p[1]}")
def recorded(request) -> tuple[str, str, probe.Run]:
    arch, depth = request.param
    return arch, depth, _record(arch, depth)


# --------------------------------------------------------------------------- the accounting identity
def test_self_plus_residue_is_the_forward_of_every_step(recorded):
    arch, depth, run = recorded
    calls, steps = run.calls, run.steps
    assert calls["self_ms"].notna().all() and steps["residue_ms"].notna().all()
    per_step = calls.groupby("step")["self_ms"].sum()
    probe_ms = steps["probe_ms"] if "probe_ms" in steps else 0.0
    got = per_step.reindex(steps["step"]).to_numpy() + steps["residue_ms"].to_numpy() + np.asarray(probe_ms)
    np.testing.assert_allclose(got, steps["forward_ms"].to_numpy(), rtol=0, atol=1e-9)
    # self time is never negative on the host clock and the residue is what the root forward
    # does outside its recorded top-level calls
    assert (calls["self_ms"] >= -1e-9).all() and (steps["residue_ms"] >= -1e-9).all()
    top = calls[calls["parent"].isna()].groupby("step")["cpu_ms"].sum()
    np.testing.assert_allclose(top.reindex(steps["step"]).to_numpy() + steps["residue_ms"].to_numpy()
                               + np.asarray(probe_ms), steps["forward_ms"].to_numpy(), rtol=0, atol=1e-9)


def test_shares_of_every_level_lie_in_0_1_and_add_up_to_1(recorded):
    arch, depth, run = recorded
    summ = run.summary()
    assert list(summ.columns) == list(schema.SUMMARY)
    assert set(summ["level"]) == {"block", "role", "module"}
    assert summ["share"].between(-1e-12, 1 + 1e-12).all(), summ[~summ["share"].between(0, 1)]
    sums = summ.groupby(["level", "phase"])["share"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=1e-9)
    # and the self times of a level add up to the phase's forward time
    fwd = run.steps.groupby("phase")["forward_ms"].sum()
    for (level, phase), sub in summ.groupby(["level", "phase"]):
        assert sub["self_ms"].sum() == pytest.approx(fwd[phase], rel=1e-9), (level, phase)
    # the block level is the same at every depth: embed, layers, norm, head (+ model-level glue)
    blocks = set(summ.loc[summ["level"] == "block", "name"])
    assert {"embed", "layer", "norm", "head", "(residue)", "(probe)"} <= blocks <= {
        *schema.BLOCK_ROLES, "model", "(residue)", "(probe)"}


def test_parents_enclose_their_children(recorded):
    arch, depth, run = recorded
    c = run.calls
    prow = tree.parent_rows(c)
    child = np.flatnonzero(prow >= 0)
    if depth == "blocks":
        assert len(child) == 0  # the blocks never nest
    if depth != "blocks":
        assert len(child) > 0
    s, e = c["start_ms"].to_numpy(), c["end_ms"].to_numpy()
    assert (s[prow[child]] <= s[child] + 1e-9).all() and (e[child] <= e[prow[child]] + 1e-9).all()
    mods = c["module"].to_numpy()
    # in these models every recorded call runs inside its module-tree ancestor
    assert all(m.startswith(pm + ".") for m, pm in zip(mods[child], mods[prow[child]]))
    # the call index orders a step's calls by start
    for _, g in c.groupby("step"):
        assert sorted(g["call"]) == list(range(len(g)))
        assert g.sort_values("call")["start_ms"].is_monotonic_increasing


def test_tree_table_collapses_without_losing_time(recorded):
    arch, depth, run = recorded
    full = run.tree()
    for d in range(1, int(full["depth"].max()) + 1):
        t = run.tree(depth=d)
        assert t["depth"].max() <= d
        np.testing.assert_allclose(t.groupby("phase")["share"].sum().to_numpy(), 1.0, atol=1e-9)
        # a node at the fold level holds its whole subtree: its self time is its inclusive time
        at = t[(t["depth"] == d) & ~t["node"].isin([accounting.RESIDUE, accounting.PROBE])]
        np.testing.assert_allclose(at["self_ms"].to_numpy(), at["total_ms"].to_numpy(), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- roles
EXPECTED_ROLES = {
    "llama": {"model": "model", "model.rotary_emb": "rotary_emb", "model.layers.0.self_attn.q_proj": "q_proj",
              "model.layers.0.self_attn.k_proj": "k_proj", "model.layers.0.self_attn.v_proj": "v_proj",
              "model.layers.0.self_attn.o_proj": "o_proj", "model.layers.0.mlp.gate_proj": "gate_proj",
              "model.layers.0.mlp.up_proj": "up_proj", "model.layers.0.mlp.down_proj": "down_proj",
              "model.layers.0.mlp.act_fn": "act_fn", "model.layers.0.input_layernorm": "layer_norm"},
    "qwen2": {"model.layers.1.self_attn.q_proj": "q_proj", "model.layers.1.mlp.down_proj": "down_proj",
              "model.rotary_emb": "rotary_emb"},
    "gemma2": {"model.layers.0.pre_feedforward_layernorm": "layer_norm",
               "model.layers.0.post_feedforward_layernorm": "layer_norm", "model.layers.0.mlp.act_fn": "act_fn",
               "model.layers.0.self_attn.o_proj": "o_proj"},
    "gpt2": {"transformer": "model", "transformer.h.0.attn.c_attn": "qkv_proj", "transformer.h.0.attn.c_proj": "o_proj",
             "transformer.h.0.mlp.c_fc": "up_proj", "transformer.h.0.mlp.c_proj": "down_proj",
             "transformer.h.0.mlp.act": "act_fn", "transformer.h.0.ln_1": "layer_norm", "transformer.wpe": "embed",
             "transformer.drop": "dropout"},
    "mixtral": {"model.layers.0.mlp": "mlp", "model.layers.0.mlp.gate": "router",
                "model.layers.0.mlp.experts": "experts", "model.layers.0.self_attn.q_proj": "q_proj"},
    "phi": {"model.layers.0.self_attn.dense": "o_proj", "model.layers.0.mlp.fc1": "up_proj",
            "model.layers.0.mlp.fc2": "down_proj", "model.layers.0.mlp.activation_fn": "act_fn",
            "model.final_layernorm": "norm", "model.layers.0.resid_dropout": "dropout"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_roles_name_the_parts_at_depth_all(arch):
    from probe.recording.discovery import select_modules

    got = {info.name: info.role for _, info in select_modules(tiny_model(arch), depth="all")}
    want = EXPECTED_ROLES[arch]
    if "model.layers.0.block_sparse_moe" in got:  # transformers 4.x: a list of experts, each w1/w3/w2
        moe = "model.layers.0.block_sparse_moe"
        want = {k.replace("model.layers.0.mlp", moe): v for k, v in want.items()}
        want.update({f"{moe}.experts.0": "experts", f"{moe}.experts.0.w1": "gate_proj",
                     f"{moe}.experts.0.w3": "up_proj", f"{moe}.experts.0.w2": "down_proj"})
    assert {k: got.get(k) for k in want} == want
    assert set(got.values()) <= set(schema.ROLES)
    # nothing that runs inside a layer is left unnamed
    inside = [n for n in got if ".layers." in n or ".h." in n]
    assert not [n for n in inside if got[n] == "other"], [n for n in inside if got[n] == "other"]


def test_roles_of_mixtral_on_transformers_4():
    """transformers 4.x names the mixture of experts ``block_sparse_moe`` with a list of experts,
    each with w1 / w3 / w2: the same roles as the fused experts module of 5.x."""
    names = [
        ("", "MixtralForCausalLM"), ("model", "MixtralModel"), ("model.embed_tokens", "Embedding"),
        ("model.layers", "ModuleList"), ("model.layers.0", "MixtralDecoderLayer"),
        ("model.layers.0.self_attn", "MixtralAttention"), ("model.layers.0.self_attn.q_proj", "Linear"),
        ("model.layers.0.self_attn.rotary_emb", "MixtralRotaryEmbedding"),
        ("model.layers.0.block_sparse_moe", "MixtralSparseMoeBlock"),
        ("model.layers.0.block_sparse_moe.gate", "Linear"),
        ("model.layers.0.block_sparse_moe.experts", "ModuleList"),
        ("model.layers.0.block_sparse_moe.experts.0", "MixtralBlockSparseTop2MLP"),
        ("model.layers.0.block_sparse_moe.experts.0.w1", "Linear"),
        ("model.layers.0.block_sparse_moe.experts.0.w2", "Linear"),
        ("model.layers.0.block_sparse_moe.experts.0.w3", "Linear"),
        ("model.layers.0.block_sparse_moe.experts.0.act_fn", "SiLU"),
        ("model.layers.0.input_layernorm", "MixtralRMSNorm"), ("model.norm", "MixtralRMSNorm"),
        ("lm_head", "Linear"),
    ]
    fixed = {"model.embed_tokens": "embed", "model.layers.0": "layer", "model.norm": "norm", "lm_head": "head"}
    got = roles.assign_roles(names, fixed, "model.layers")
    p = "model.layers.0.block_sparse_moe"
    assert got[p] == "mlp" and got[p + ".gate"] == "router" and got[p + ".experts.0"] == "experts"
    assert [got[f"{p}.experts.0.{w}"] for w in ("w1", "w3", "w2", "act_fn")] == [
        "gate_proj", "up_proj", "down_proj", "act_fn"]
    assert got["model.layers.0.self_attn.rotary_emb"] == "rotary_emb" and got["model"] == "model"


def test_unknown_names_fall_back_to_the_type_then_other():
    assert roles.role_of("wq", "Linear", "attention") == "linear"
    assert roles.role_of("mystery", "FancyRMSNorm", "layer") == "layer_norm"
    assert roles.role_of("mystery", "Thing", "attention") == "other"
    assert roles.role_of("gate", "Linear", "mlp") == "gate_proj"  # no experts beside it: a dense gate


# --------------------------------------------------------------------------- attention: function and rest
def test_attention_rest_is_the_attention_self_time_outside_its_function_and_projections():
    deep = _record("llama", "all")
    summ = deep.summary("role")
    core = summ[summ["name"] == accounting.ATTENTION_REST]
    assert len(core) == 2 and "attention" not in set(summ["name"])
    assert len(summ[summ["name"] == "attention_fn"]) == 2
    attn = deep.calls[deep.calls["role"] == "attention"]
    for phase, row in core.set_index("phase").iterrows():
        sub = attn[attn["phase"] == phase]
        assert row["self_ms"] == pytest.approx(sub["self_ms"].sum(), rel=1e-12)
        assert row["total_ms"] == pytest.approx(sub["cpu_ms"].sum(), rel=1e-12)
    # model-level rotary embeddings stay out of the layers
    rot = deep.calls[deep.calls["role"] == "rotary_emb"]
    assert len(rot) and rot["layer"].isna().all()
    blocks = deep.summary("block").set_index(["phase", "name"])
    assert blocks.loc[("decode", "model"), "self_ms"] >= rot.loc[rot["phase"] == "decode", "self_ms"].sum()
    shallow = _record("llama", "sublayers")  # the attention function is recorded at sublayers too
    names = set(shallow.summary("role")["name"])
    assert {accounting.ATTENTION_REST, "attention_fn"} <= names and "attention" not in names


# --------------------------------------------------------------------------- saved runs
def test_runs_saved_without_the_tree_get_it_on_load(tmp_path):
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    path = p.run.save(tmp_path / "run")
    calls = pd.read_parquet(path / "calls.parquet").drop(columns=list(tree.TREE_COLUMNS), errors="ignore")
    calls.to_parquet(path / "calls.parquet", index=False)
    steps = pd.read_parquet(path / "steps.parquet").drop(columns=["residue_ms", "gpu_residue_ms"])
    steps.to_parquet(path / "steps.parquet", index=False)
    reseal(path)
    back = probe.load(path)
    pd.testing.assert_frame_equal(back.calls, p.run.calls)
    pd.testing.assert_frame_equal(back.steps, p.run.steps)
    pd.testing.assert_frame_equal(back.summary(), p.run.summary())


def test_the_probe_cost_is_a_row_of_its_own_and_residue_where_a_run_lacks_it():
    """The probe's own cost (steps.probe_ms) is the (probe) row; a run saved without that
    column counts it in the residue, and the shares still add up."""
    run = _record("llama", "sublayers")
    summ = run.summary()
    own = summ[summ["name"] == accounting.PROBE].set_index(["level", "phase"])
    assert len(own) == 3 * 2  # every level, both phases
    for phase, sub in run.steps.groupby("phase"):
        assert own.loc[("block", phase), "self_ms"] == pytest.approx(sub["probe_ms"].sum())
        assert own.loc[("block", phase), "share"] == pytest.approx(sub["probe_ms"].sum() / sub["forward_ms"].sum())
    older = tree.residues(run.calls, run.steps.drop(columns=["probe_ms"]))
    np.testing.assert_allclose(older["residue_ms"].to_numpy(),
                               (run.steps["residue_ms"] + run.steps["probe_ms"]).to_numpy(), atol=1e-9)
    back = accounting.summary(run.calls, older)
    assert accounting.PROBE not in set(back["name"])
    np.testing.assert_allclose(back.groupby(["level", "phase"])["share"].sum().to_numpy(), 1.0, atol=1e-9)


# --------------------------------------------------------------------------- nesting, generally
@hs.composite
def _forest(draw):
    """Random nested intervals in several groups, with their true parents."""
    rows = []

    def grow(group: int, start: int, end: int, parent: int, depth: int) -> None:
        t = start
        for _ in range(draw(hs.integers(0, 3 if depth < 4 else 0))):
            gap = draw(hs.integers(0, 3))
            length = min(draw(hs.integers(1, 40)), end - start - 1)  # a child is shorter than its parent
            if length < 1 or t + gap + length > end:
                break
            me = len(rows)
            rows.append((group, t + gap, t + gap + length, parent))
            grow(group, t + gap, t + gap + length, me, depth + 1)
            t = t + gap + length + draw(hs.integers(0, 2))

    for g in range(draw(hs.integers(1, 3))):
        grow(g, 0, 400, -1, 0)
    return rows


@settings(max_examples=200, deadline=None)
@given(_forest(), hs.randoms(use_true_random=False))
def test_nest_recovers_the_true_parents(rows, rnd):
    if not rows:
        return
    shuffled = list(range(len(rows)))
    rnd.shuffle(shuffled)
    gid = np.array([rows[i][0] for i in shuffled])
    s = np.array([rows[i][1] for i in shuffled], dtype=np.int64)
    e = np.array([rows[i][2] for i in shuffled], dtype=np.int64)
    order, level, parent = tree.nest(gid, s, e)
    row_of_pos = np.array(shuffled)[order]  # original row at each pre-order position
    got = [int(row_of_pos[p]) if p >= 0 else -1 for p in parent]
    assert got == [rows[r][3] for r in row_of_pos]
    depth_of = {}
    for r, (_, _, _, p) in enumerate(rows):
        depth_of[r] = 0 if p < 0 else depth_of[p] + 1
    assert level.tolist() == [depth_of[int(r)] for r in row_of_pos]


def test_the_cuda_clock_adds_up_the_same_way():
    """Where every recorded step has CUDA times, self times, residue and shares use that clock.

    (The frames are given CUDA columns by arithmetic on a CPU recording: the accounting only
    reads the columns.)"""
    run = _record("llama", "all")
    calls = run.calls.assign(gpu_ms=run.calls["cpu_ms"] * 0.5).drop(columns=list(tree.TREE_COLUMNS), errors="ignore")
    steps = run.steps.assign(gpu_ms=run.steps["forward_ms"] * 0.75)
    calls, steps = tree.annotate(calls, steps)
    per_step = calls.groupby("step")["gpu_self_ms"].sum().reindex(steps["step"]).to_numpy()
    np.testing.assert_allclose(per_step + steps["gpu_residue_ms"].to_numpy(), steps["gpu_ms"].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(calls["gpu_self_ms"].to_numpy(), calls["self_ms"].to_numpy() * 0.5, atol=1e-9)
    summ = accounting.summary(calls, steps)
    np.testing.assert_allclose(summ.groupby(["level", "phase"])["share"].sum().to_numpy(), 1.0, atol=1e-9)
    res = summ[(summ["name"] == accounting.RESIDUE) & (summ["level"] == "block")].set_index("phase")
    for phase, sub in steps.groupby("phase"):
        assert res.loc[phase, "share"] == pytest.approx(sub["gpu_residue_ms"].sum() / sub["gpu_ms"].sum())


# --------------------------------------------------------------------------- nesting from the recorded counts
@pytest.mark.parametrize("impl", ["c", "python"])
def test_each_wrapper_counts_exactly_the_calls_inside_and_the_tree_follows_the_counts(impl, monkeypatch):
    """Ground truth from the module tree: in a Llama forward every module runs once, so a call's
    descendants are the calls of its submodules in the same step, and its parent is its nearest
    recorded ancestor module. A wrapper that miscounts (``inner + 1``) fails here."""
    from probe.recording import hotpath

    if impl == "python":
        monkeypatch.setattr(hotpath, "C", None)
    elif hotpath.C is None:
        pytest.skip("probe/recording/_hooks.c is not built")
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(0))
    with probe.attach(model, depth="all") as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    calls = p.run.calls
    assert calls["descendants"].notna().all()
    for (_, step), c in calls.groupby(["run_id", "step"], observed=True):
        names = list(c["module"])
        assert len(set(names)) == len(names)  # once per forward
        for name, desc in zip(names, c["descendants"]):
            inside = [m for m in names if m.startswith(name + ".") or (name == "" and m)]
            assert desc == len(inside), (step, name)
        by_call = dict(zip(c["call"], names))
        for name, parent in zip(names, c["parent"]):
            ancestors = [m for m in names if name.startswith(m + ".")]
            want = max(ancestors, key=len) if ancestors else None
            assert (by_call[parent] if not pd.isna(parent) else None) == want, name


def test_nest_by_counts_gives_levels_and_parents_and_refuses_damaged_counts():
    # one step:  a( b( c ) d )  e ; then a second step: f( g )
    gid = np.array([0, 0, 0, 0, 0, 1, 1])
    desc = np.array([3, 1, 0, 0, 0, 1, 0])
    level, parent = tree.nest_by_counts(gid, desc)
    assert level.tolist() == [0, 1, 2, 1, 0, 0, 1]
    assert parent.tolist() == [-1, 0, 1, 0, -1, -1, 5]
    for bad in ([5, 1, 0, 0, 0, 1, 0],   # runs past its step
                [2, 2, 0, 0, 0, 1, 0],   # b's subtree runs past a's
                [-1, 1, 0, 0, 0, 1, 0],  # negative
                [0, 0, 0, 0, 0, 0, 9]):  # past the end of the rows
        with pytest.raises(ValueError):
            tree.nest_by_counts(gid, np.array(bad))


@settings(max_examples=60, deadline=None)
@given(hs.recursive(hs.just([]), lambda kids: hs.lists(kids, max_size=3), max_leaves=25))
def test_nest_by_counts_agrees_with_nesting_by_time_on_any_tree(forest):
    """Lay out a random forest as pre-order rows with exact time windows: both nestings agree."""
    rows: list[tuple[int, int, int]] = []  # (start, end, descendants)
    clock = [0]

    def walk(children) -> int:
        i = len(rows)
        rows.append((clock[0], 0, 0))
        clock[0] += 1
        n = 0
        for ch in children:
            n += 1 + walk(ch)
        clock[0] += 1
        rows[i] = (rows[i][0], clock[0], n)
        return n

    for t in forest:
        walk(t)
    if not rows:
        return
    gid = np.zeros(len(rows), np.int64)
    start = np.array([r[0] for r in rows])
    end = np.array([r[1] for r in rows])
    _, by_time_level, by_time_parent = tree.nest(gid, start, end)
    level, parent = tree.nest_by_counts(gid, np.array([r[2] for r in rows]))
    assert level.tolist() == by_time_level.tolist() and parent.tolist() == by_time_parent.tolist()


def test_a_frame_whose_nesting_loops_is_refused_by_every_walk_and_never_hangs():
    """``parent = call`` (a loop) or a parent after its child in frames a user built or edited:
    the tree, the summaries and the role level raise at once instead of walking forever."""
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=2, do_sample=False)
    run = p.run
    for damage in (lambda c: c["call"], lambda c: c["call"] + 1):
        calls = run.calls.copy()
        calls["parent"] = damage(calls).astype(calls["parent"].dtype)
        bad = probe.Run(calls=calls, steps=run.steps, runs=run.runs, meta=run.meta)
        for walk in (bad.tree, lambda: bad.summary("role"), lambda: bad.summary("block")):
            with pytest.raises(ValueError, match="nesting is not a tree"):
                walk()


# --------------------------------------------------------------------------- built once, by arrays
def test_tree_nodes_are_the_module_paths_of_the_calls():
    run = _record("llama", "all")
    calls = run.calls
    prow = tree.parent_rows(calls)
    modules = calls["module"].astype(str).tolist()
    paths: dict[int, str] = {}

    def path(i: int) -> str:  # the plain definition, one call at a time
        if i not in paths:
            paths[i] = (path(int(prow[i])) + accounting.SEP if prow[i] >= 0 else "") + modules[i]
        return paths[i]

    want = pd.Series(1, index=pd.MultiIndex.from_arrays(
        [calls["phase"].astype(str).tolist(), [path(i) for i in range(len(calls))]])).groupby(level=[0, 1]).sum()
    t = run.tree()
    t = t[~t["node"].isin([accounting.RESIDUE, accounting.PROBE])]
    assert dict(zip(zip(t["phase"], t["node"]), t["calls"])) == want.to_dict()
    assert (t["parent_node"].isna() == (t["depth"] == 1)).all()
    inner = t[t["depth"] > 1]
    assert [n.rsplit(accounting.SEP, 1)[0] for n in inner["node"]] == inner["parent_node"].tolist()


def test_a_run_builds_its_summary_and_tree_once_and_again_for_new_frames(monkeypatch):
    run = _record("llama", "blocks")
    built = []
    real = accounting.summary
    monkeypatch.setattr(accounting, "summary", lambda *a, **k: built.append(1) or real(*a, **k))
    first = run.summary("block")
    first["self_ms"] = 0.0  # a caller's edit stays in its own copy
    again = run.summary("block")
    assert len(built) == 1 and (again["self_ms"] > 0).any()
    run.calls = run.calls[run.calls["phase"] == "decode"].reset_index(drop=True)
    blocks = run.summary("block")
    assert set(blocks.loc[~blocks["name"].isin([accounting.RESIDUE, accounting.PROBE]), "phase"]) == {"decode"}
    assert len(built) == 2
    assert run.tree() is not run.tree() and run.tree().equals(run.tree())


@pytest.mark.parametrize("late", [False, True])
def test_codes_in_order_are_pandas_factorize(late):
    """The prefix shortcut of the summary's grouping gives exactly ``pd.factorize``'s codes and
    keys, also where a key first appears near the end (the prefix then grows to the whole)."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 40, 200_000)
    if late:
        keys[-3:] = [41, 45, 41]
    got = grouping.codes_in_order(keys, 50)
    want = pd.factorize(keys)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_codes_in_order_with_a_key_per_row_are_pandas_factorize():
    rng = np.random.default_rng(1)
    keys = np.repeat(np.arange(150_000), 1)[rng.permutation(150_000)] * 2 + rng.integers(0, 2, 150_000)
    got = grouping.codes_in_order(keys, 300_000)
    want = pd.factorize(keys)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("rows", [500, 150_000])
def test_key_codes_are_pandas_groupby_groups(rows):
    """The roofline's groups on integer codes: the groups and row assignment pandas' groupby
    (sort=False, dropna=False, observed=True) makes, nulls and unused categories included."""
    rng = np.random.default_rng(2)
    role = pd.Categorical(rng.choice(["layer", "embed", "head", None], rows), categories=["embed", "head", "layer", "norm"])
    phase = pd.array(rng.choice(["decode", "prefill"], rows), dtype="string")
    layer = pd.array(np.where(rng.random(rows) < 0.2, None, rng.integers(0, 4, rows)), dtype="Int32")
    frame = pd.DataFrame({"role": role, "phase": phase, "layer": layer, "x": rng.random(rows)})
    keys = ["role", "phase", "layer"]
    g = frame.groupby(keys, sort=False, dropna=False, observed=True)
    want = g.size().reset_index()[keys]
    from probe.analysis.labels import factorized

    for codes_of in (None, lambda col: factorized(frame, col)):  # the columns' own codes, or the kept ones
        codes, groups = grouping.key_codes(frame, keys, codes_of)
        np.testing.assert_array_equal(codes, g.ngroup().to_numpy())
        for k in keys:
            assert groups[k].astype(object).where(groups[k].notna(), None).tolist() == \
                want[k].astype(object).where(want[k].notna(), None).tolist(), k
    sums = grouping.group_sum(codes, len(groups), frame["x"].to_numpy())
    np.testing.assert_allclose(sums, g["x"].sum().to_numpy(), rtol=1e-12)


def test_blocks_output_bytes_per_step_are_the_groupby():
    """The memory figure's per-step sum of the blocks' output bytes, on codes, equals pandas'."""
    from reports.figure_base import per_step_sum
    from probe.schema import BLOCK_ROLES

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="all") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)
    calls = p.run.calls
    got = per_step_sum(calls, "out_bytes", BLOCK_ROLES)
    blocks = calls[calls["role"].isin(BLOCK_ROLES)]
    want = blocks.groupby(["run_id", "step"], sort=False, observed=True)["out_bytes"].sum()
    assert set(got) == set(calls["run_id"].astype(str))
    for rid, series in got.items():
        w = want.xs(rid, level=0)
        assert series.index.tolist() == sorted(w.index.tolist())
        np.testing.assert_array_equal(series.to_numpy(), w.sort_index().to_numpy(dtype="float64"))


def test_blocks_output_bytes_per_step_on_sparse_steps_are_the_groupby():
    """Steps numbered far apart (a table of every step would be large): summed on the steps met."""
    from reports.figure_base import per_step_sum
    from probe.schema import BLOCK_ROLES

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="blocks") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    calls = p.run.calls.assign(step=lambda f: f["step"] * 10_000_000)
    got = per_step_sum(calls, "out_bytes", BLOCK_ROLES)
    want = calls[calls["role"].isin(BLOCK_ROLES)].groupby("step")["out_bytes"].sum()
    (series,) = got.values()
    assert series.index.tolist() == want.index.tolist()
    np.testing.assert_array_equal(series.to_numpy(), want.to_numpy(dtype="float64"))
