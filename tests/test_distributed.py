"""Tensor parallel: two ranks under torchrun on CPU (gloo), one merged run, per-rank shard shapes.

The two-process run is launched once per module (``tests/tp_worker.py``) and checked against
the same tiny Llama recorded in this process, unsharded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

import probe
from probe.capture.ranks import rank_dir, save_rank
from tiny import tiny_llama, used_categories
from tp_worker import PROMPT

WORLD = 2
NEW_TOKENS = 4
TIMEOUT_S = 120
WORKER = Path(__file__).with_name("tp_worker.py")

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)


def _prompt() -> torch.Tensor:
    return torch.tensor([PROMPT])


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """Launch the two-rank run once; return its output folder and the unsharded reference."""
    root = tmp_path_factory.mktemp("tp")
    model = tiny_llama(layers=2, hidden=64, vocab=128, seed=0)
    model.save_pretrained(root / "model")
    with probe.attach(model, depth="all") as ref:
        ref_tokens = model.generate(_prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
    repo = Path(probe.__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), str(WORKER.parent), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # --standalone: a local rendezvous on a free port chosen by torchrun (no port races in CI)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(WORKER), str(root / "model"), str(root / "out"), "--new-tokens", str(NEW_TOKENS)]
    # own session: on a timeout the launcher and both workers are killed together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{log[-3000:]}")
    if proc.returncode:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{log[-3000:]}")
    return {"out": root / "out", "model": model, "ref": ref.run, "ref_tokens": ref_tokens[0].tolist()}


def _shapes(text: str) -> tuple[list[int], ...]:
    """A shapes cell (JSON list of shapes) as a tuple of shapes."""
    return tuple(json.loads(text))


def _tp_styles(model) -> dict[re.Pattern, str]:
    """The tensor-parallel plan transformers applies to ``model``: module-name pattern -> style."""
    plan = getattr(model, "_tp_plan", None) or {
        f"{model.base_model_prefix}.{k}": v for k, v in (model.config.base_model_tp_plan or {}).items()
    }
    return {re.compile(re.escape(k).replace(r"\*", r"\d+")): v for k, v in plan.items()}


def _style(styles: dict[re.Pattern, str], module: str) -> str | None:
    return next((style for pattern, style in styles.items() if pattern.fullmatch(module)), None)


# --------------------------------------------------------------------------- torchrun, two ranks
@needs_gloo
def test_torchrun_two_rank_tensor_parallel_cpu_merges_into_one_run(tp):
    run = probe.load(tp["out"] / "hf")
    assert run.meta["ranks"] == [0, 1] and run.meta["world_size"] == WORLD
    for frame in (run.calls, run.steps, run.runs, run.sampling):
        assert sorted(frame["rank"].unique().tolist()) == [0, 1]
    # one generate call per rank, with one id stem across the ranks
    ids = dict(zip(run.runs["rank"], run.runs["run_id"]))
    assert len(run.runs) == WORLD and ids[1] == f"{ids[0]}-r1"
    for r in (0, 1):
        c = run.calls[run.calls["rank"] == r]
        assert set(c["run_id"]) == {ids[r]}
        assert set(run.sampling.loc[run.sampling["rank"] == r, "run_id"]) == {ids[r]}  # renamed alike
        # each rank walks the same steps as the unsharded model
        st = run.steps[run.steps["rank"] == r][["phase", "q_len", "kv_len"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(st, tp["ref"].steps[["phase", "q_len", "kv_len"]])
        assert len(c) == len(tp["ref"].calls)
        assert set(c["module"]) == set(tp["ref"].calls["module"])


@needs_gloo
def test_torchrun_sharded_projections_record_each_ranks_half(tp):
    run = probe.load(tp["out"] / "hf")
    ref = tp["ref"].calls.set_index(["step", "module"])
    assert ref.index.is_unique
    styles = _tp_styles(tp["model"])
    seen = {"colwise": 0, "rowwise": 0, "between": 0, "heads": 0, None: 0}
    for r in (0, 1):
        c = run.calls[run.calls["rank"] == r]
        for row in c.itertuples():
            want = ref.loc[(row.step, row.module)]
            ins, outs = _shapes(row.in_shapes), _shapes(row.out_shapes)
            ref_ins, ref_outs = _shapes(want["in_shapes"]), _shapes(want["out_shapes"])
            style = _style(styles, row.module)
            if style is None and row.module.endswith(".mlp.act_fn"):
                style = "between"  # acts on the colwise gate_proj's shard, before the rowwise down_proj
            if row.module.endswith(".attention_fn"):
                style = "heads"  # the attention function runs on this rank's heads: q, k, v [B, heads, T, d]
            if style == "heads":
                assert [s[1] * WORLD for s in ins[:3]] == [s[1] for s in ref_ins[:3]], (row.module, ins, ref_ins)
                assert outs[0][2] * WORLD == ref_outs[0][2], (row.module, outs, ref_outs)  # [B, T, heads, d]
            elif style == "between":
                assert ins[0][-1] * WORLD == ref_ins[0][-1] and outs[0][-1] * WORLD == ref_outs[0][-1], row.module
            elif style == "colwise":  # weight split by output features: half the output width
                assert ins == ref_ins and outs[0][:-1] == ref_outs[0][:-1], row.module
                assert outs[0][-1] * WORLD == ref_outs[0][-1], (row.module, outs, ref_outs)
            elif style == "rowwise":  # split by input features, partial sums all-reduced
                assert ins[0][-1] * WORLD == ref_ins[0][-1], (row.module, ins, ref_ins)
                assert outs == ref_outs, row.module
            else:  # replicated (embeddings, norms, layers, attention and MLP blocks, gathered head)
                assert (ins, outs) == (ref_ins, ref_outs), (row.module, style)
            seen[style if style in seen else None] += 1
    # the plan really sharded q/k/v/gate/up (colwise) and o/down (rowwise) of every layer
    cfg = tp["model"].config
    q = run.calls[(run.calls["module"] == "model.layers.0.self_attn.q_proj") & (run.calls["step"] == 0)]
    assert q["rank"].tolist() == [0, 1]
    assert [_shapes(v) for v in q["out_shapes"]] == [([1, len(PROMPT), cfg.hidden_size // WORLD],)] * WORLD
    layers = cfg.num_hidden_layers
    steps = len(tp["ref"].steps)
    assert seen["colwise"] == WORLD * steps * layers * 5
    assert seen["rowwise"] == WORLD * steps * layers * 2
    assert seen["between"] == WORLD * steps * layers
    assert seen["heads"] == WORLD * steps * layers


@needs_gloo
def test_torchrun_ranks_generate_the_unsharded_models_tokens(tp):
    tokens = [json.loads((tp["out"] / "tokens" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert tokens[0] == tokens[1] == tp["ref_tokens"]
    run = probe.load(tp["out"] / "hf")
    assert run.runs["new_tokens"].tolist() == [NEW_TOKENS] * WORLD


@needs_gloo
def test_torchrun_dtensor_outputs_are_recorded_by_local_shard(tp):
    run = probe.load(tp["out"] / "dtensor")
    assert sorted(run.calls["rank"].unique().tolist()) == [0, 1]
    for r in (0, 1):
        c = run.calls[run.calls["rank"] == r].set_index("module")
        # Linear(16, 32) colwise: each rank holds 32 / 2 output features
        assert _shapes(c.loc["0", "out_shapes"]) == ([3, 32 // WORLD],)
        # Linear(32, 16) rowwise: each rank reads its 16 of the 32 input features
        assert _shapes(c.loc["1", "in_shapes"]) == ([3, 32 // WORLD],)


@needs_gloo
def test_torchrun_save_rank_refuses_a_run_recorded_under_another_rank_on_every_rank(tp):
    for r in range(WORLD):
        msg = (tp["out"] / "refused" / f"rank{r}.txt").read_text()
        assert "wrong rank" in msg and "init_process_group" in msg
    assert not (tp["out"] / "wrong").exists()


# --------------------------------------------------------------------------- in one process
def _record(rank: int):
    model = tiny_llama(layers=2, hidden=32, vocab=96)
    with probe.attach(model, rank=rank) as p:
        model.generate(_prompt(), max_new_tokens=3, do_sample=False)
    return p


def test_save_rank_writes_only_rank_directories_that_load_merges(tmp_path):
    p0, p1 = _record(0), _record(1)
    assert save_rank(p0, tmp_path) == rank_dir(tmp_path, 0) == tmp_path / "rank0"
    assert save_rank(p1.run, tmp_path) == tmp_path / "rank1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["rank0", "rank1"]
    merged = probe.load(tmp_path)
    assert merged.meta["ranks"] == [0, 1]
    for r, p in ((0, p0), (1, p1)):
        for name in ("calls", "steps", "runs", "sampling"):
            got = getattr(merged, name)
            got = got[got["rank"] == r].reset_index(drop=True)
            pd.testing.assert_frame_equal(used_categories(got), used_categories(getattr(p.run, name)))
    # without a process group nothing is renamed: rank 1 keeps the capture's -r1 id
    assert merged.runs["run_id"].iloc[1].endswith("-r1")


def test_save_rank_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(TypeError, match="probe.Run or probe.Probe"):
        save_rank({"calls": []}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_load_merges_ranks_in_numeric_order(tmp_path):
    save_rank(_record(10), tmp_path)
    save_rank(_record(2), tmp_path)
    merged = probe.load(tmp_path)
    assert merged.meta["ranks"] == [2, 10]
    assert merged.runs["rank"].tolist() == [2, 10]


@needs_gloo
def test_the_html_report_of_two_ranks_read_without_its_unread_columns_is_the_whole_runs(tp, tmp_path):
    """`probe report --format html` reads every calls column but those the page never shows; the
    page is the one of the whole run, to the byte."""
    from probe.cli import main
    from probe.reports.html import UNREAD_CALLS_COLUMNS, render_report

    assert main(["report", str(tp["out"] / "hf"), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    whole = probe.load(tp["out"] / "hf")
    assert set(UNREAD_CALLS_COLUMNS) <= set(whole.calls.columns)
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_report(whole)
