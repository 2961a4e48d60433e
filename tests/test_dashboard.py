"""The Streamlit dashboard, driven by AppTest over runs recorded by the real probe on tiny models."""

from __future__ import annotations

import base64
import json
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

import probe  # noqa: E402
from probe.analysis.roofline import BOUNDS  # noqa: E402
from probe.dashboards import APP, cli_runs_dir, data, launch, streamlit_command  # noqa: E402
from probe.reports import figures  # noqa: E402
from tiny import tiny_llama  # noqa: E402
from edits import reseal

VIEWS = ("Overview", "Layers", "Timeline", "Memory", "Roofline", "Serving", "Shapes", "Compare", "Saved comparison",
         "Sweep", "Data")
HIDDEN = 32
LAYERS = 3


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (1, n), generator=g)


def record_runs(root: Path) -> dict[str, Path]:
    """Record three runs with the real probe on a tiny Llama; return name -> run directory.

    ``eager`` and ``sdpa``: two greedy generate calls each (prompts of 5 and 11 tokens, 6 new
    tokens), differing in attention implementation; ``sublayers``: one call at depth
    ``sublayers`` (attention, MLP and norms inside each layer recorded too).
    """
    out = {}
    for name, attn, lens, depth in (("eager", "eager", (5, 11), "blocks"), ("sdpa", "sdpa", (5, 11), "blocks"),
                                    ("sublayers", "sdpa", (7,), "sublayers")):
        model = tiny_llama(layers=LAYERS, hidden=HIDDEN, attn_implementation=attn)
        with probe.attach(model, depth=depth) as p:
            for i, n in enumerate(lens):
                model.generate(_ids(n, i), max_new_tokens=6, do_sample=False, pad_token_id=0)
        out[name] = p.run.save(root / name)
    return out


def add_bad_runs(root: Path, good: Path) -> None:
    """A half-written parquet, a run of an older schema, and an empty folder next to good runs."""
    shutil.copytree(good, root / "truncated")
    f = root / "truncated" / "calls.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.copytree(good, root / "old")
    meta = json.loads((root / "old" / "meta.json").read_text())
    meta["schema_version"] = 0
    (root / "old" / "meta.json").write_text(json.dumps(meta))
    (root / "empty").mkdir()


def store_peaks(run_dir: Path) -> dict:
    """Store the device's peaks in a saved CPU run's ``meta.json``, as ``probe run`` does
    (measured on this machine, where the run was recorded); returns them. Measured now and
    stored as a quiet figure: ``probe run`` stores only figures measured on a quiet machine, which
    this shared test machine may not be at the moment."""
    from probe.analysis.hardware import measure_peaks

    peaks = measure_peaks("cpu", probe.load(run_dir).meta.get("dtype") or "float32").to_dict()
    peaks["wait_pct"] = 0.0
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["peaks"] = peaks
    (run_dir / "meta.json").write_text(json.dumps(meta))
    return peaks


def record_sweep(out: Path) -> Path:
    """A real ``probe.sweep.sweep`` of a tiny 2-layer Llama into ``out``: prompts of 4 and 8
    tokens, batch 1, 2 new tokens, one recorded call each, no warm-up."""
    from probe.routines.sweep import sweep

    sweep(tiny_llama(layers=2, hidden=HIDDEN), None, prompt_lens=(4, 8), batch_sizes=(1,), new_tokens=2, repeat=1,
          warmup=0, out=out)
    return out


def record_ranks(out: Path) -> Path:
    """The same tiny model recorded as rank 0 and rank 1 into ``out/rank0`` and ``out/rank1``
    (what a two-process tensor-parallel run leaves behind); ``probe.load(out)`` merges them."""
    model = tiny_llama(layers=2, hidden=HIDDEN)
    for rank in (0, 1):
        with probe.attach(model, rank=rank) as p:
            model.generate(_ids(6, rank), max_new_tokens=4, do_sample=False, pad_token_id=0)
        probe.save_rank(p.run, out)  # out/rank{rank}, marked as a rank
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return record_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def runs_dir(runs) -> Path:
    return next(iter(runs.values())).parent


@pytest.fixture(scope="module")
def bad_dir(runs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(runs["sdpa"], root / "sdpa")
    add_bad_runs(root, runs["eager"])
    return root


def app(runs_dir: Path | str, *, runs: list[str] | None = None, view: str | None = None) -> AppTest:
    """Run the app over ``runs_dir`` (optionally picking runs and a view) and check it is clean."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.run()
    if runs is not None:
        at.sidebar.multiselect(key="runs").set_value(runs).run()
    if view is not None:
        at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def other_warnings(at: AppTest) -> list[str]:
    """The page's warnings other than the busy-machine one, which depends on this machine's load
    while the test recorded its runs."""
    return [w.value for w in at.warning if "the machine was busy" not in w.value]


def charts(at: AppTest) -> list[dict]:
    """The page's plotly figures, as the JSON Streamlit sends to the browser."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def arr(value) -> list:
    """A plotly JSON array as a list (plotly writes numeric arrays as base64 ``bdata``)."""
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            a = a.reshape([int(n) for n in str(value["shape"]).split(",")])
        return a.tolist()
    return list(value)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def frame(at: AppTest, index: int = 0) -> pd.DataFrame:
    return at.dataframe[index].value


# --------------------------------------------------------------------------- launch
def test_launch_binds_to_localhost_by_default_and_passes_the_runs_dir():
    cmd = streamlit_command("some/runs")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-5:] == ["--", "--runs-dir", "some/runs", "--root", "some/runs"]  # the root defaults to it
    other = streamlit_command("r", host="0.0.0.0", port=9999)
    assert other[other.index("--server.address") + 1] == "0.0.0.0"
    assert other[other.index("--server.port") + 1] == "9999"
    assert launch.__defaults__ == ("127.0.0.1", 8501, None)


def test_app_reads_the_runs_dir_given_after_the_double_dash(monkeypatch):
    assert cli_runs_dir(streamlit_command("/x/y")[streamlit_command("/x/y").index("--") + 1:]) == "/x/y"
    assert cli_runs_dir(["--runs-dir=/a"]) == "/a"
    monkeypatch.setenv("PROBE_RUNS_DIR", "/from/env")
    assert cli_runs_dir([]) == "/from/env"
    monkeypatch.delenv("PROBE_RUNS_DIR")
    assert cli_runs_dir([]) == "probe-runs"


# --------------------------------------------------------------------------- bad input
def test_missing_runs_dir_says_how_to_record_runs(tmp_path):
    at = app(tmp_path / "nowhere")
    (msg,) = [i.value for i in at.info]
    assert "does not exist" in msg and "probe run --out" in msg
    assert not at.error and not at.get("plotly_chart")


def test_blank_runs_folder_asks_for_one(tmp_path):
    at = app(tmp_path)
    at.sidebar.text_input(key="runs_dir").set_value("  ").run()
    assert "Enter the folder" in at.info[0].value and not at.exception


def test_empty_runs_dir_says_how_to_record_runs(tmp_path):
    at = app(tmp_path)
    (msg,) = [i.value for i in at.info]
    assert "holds no runs" in msg and f"probe run --out {tmp_path}" in msg


def bad_runs(at: AppTest) -> dict[str, str]:
    """The runs the sidebar's one error box names, with each one's reason."""
    (box,) = [e.value for e in at.sidebar.error]
    return {line.split("**")[1]: line for line in box.splitlines()[1:]}


def other_folders(at: AppTest) -> str:
    (line,) = [c.value for c in at.sidebar.caption if c.value.startswith("Other folders")]
    return line


def test_bad_runs_are_named_with_the_reason_and_good_runs_still_shown(bad_dir):
    at = app(bad_dir)
    assert len(at.error) == 1  # one box, in the sidebar: not a banner per run on top of every view
    errors = bad_runs(at)
    assert set(errors) == {"old", "truncated"}
    assert "half-written" in errors["truncated"] and "calls.parquet" in errors["truncated"]
    assert "schema 0" in errors["old"] and "Re-record" in errors["old"]
    assert "empty" in other_folders(at)  # a folder with no run in it is no broken run
    assert at.sidebar.multiselect(key="runs").options == ["sdpa"]
    assert at.sidebar.multiselect(key="runs").value == ["sdpa"]
    assert len(charts(at)) == 3  # the good run's Overview is drawn below the messages


def test_a_folder_of_only_bad_runs_warns_without_a_traceback(tmp_path, runs):
    add_bad_runs(tmp_path, runs["eager"])
    at = app(tmp_path)
    assert set(bad_runs(at)) == {"old", "truncated"} and len(at.error) == 1
    assert "None of the 2 run folder(s)" in at.warning[0].value and "holds a readable run" in at.warning[0].value
    assert not at.get("plotly_chart")


def test_a_run_with_unreadable_values_is_named_with_the_reason(tmp_path, runs):
    shutil.copytree(runs["sdpa"], tmp_path / "good")
    shutil.copytree(runs["eager"], tmp_path / "foreign")
    f = tmp_path / "foreign" / "steps.parquet"
    steps = pd.read_parquet(f)
    steps["step"] = "not a number"  # right columns, values no probe run can hold
    steps.to_parquet(f)
    with pytest.raises(probe.RunLoadError, match="foreign.*two saves"):  # the manifest sees the edit
        data.load_run(tmp_path / "foreign", "foreign")
    reseal(tmp_path / "foreign")  # the manifest edited too: the column check names the problem
    with pytest.raises(probe.RunLoadError, match="steps.parquet: column 'step'"):
        data.load_run(tmp_path / "foreign", "foreign")
    at = app(tmp_path)
    (err,) = [e.value for e in at.error]
    assert "**foreign**" in err and "column 'step'" in err
    assert at.sidebar.multiselect(key="runs").options == ["good"]


def test_the_run_list_loads_no_frames_and_a_run_loads_when_picked(tmp_path, runs, monkeypatch):
    for n in ("eager", "sdpa", "sublayers"):
        shutil.copytree(runs[n], tmp_path / n)
    loaded: list[str] = []
    real = probe.load
    monkeypatch.setattr(probe, "load", lambda p: loaded.append(Path(p).name) or real(p))
    at = app(tmp_path)
    picker = at.sidebar.multiselect(key="runs")
    assert picker.options == ["eager", "sdpa", "sublayers"] and len(picker.value) == 1
    assert loaded == picker.value  # the run shown, and no other
    first = list(loaded)
    at.sidebar.multiselect(key="runs").set_value(["eager", "sdpa"]).run()
    assert not at.exception and set(loaded) == {*first, "eager", "sdpa"} and len(loaded) == len(set(loaded))
    at.run()  # a rerun reads every run from the cache
    assert len(loaded) == len(set(loaded))


def test_a_single_run_folder_is_accepted_as_the_runs_dir(runs):
    at = app(runs["eager"])
    assert at.sidebar.multiselect(key="runs").options == ["."]
    assert metric(at, "Generate calls") == "2"


def test_a_rerecorded_run_is_reloaded(tmp_path, runs):
    shutil.copytree(runs["sublayers"], tmp_path / "r")
    at = app(tmp_path)
    assert metric(at, "Generate calls") == "1"
    shutil.rmtree(tmp_path / "r")
    shutil.copytree(runs["eager"], tmp_path / "r")  # other files, other mtimes and sizes
    at.run()
    assert metric(at, "Generate calls") == "2"


def test_filters_follow_the_runs_picked(runs_dir):
    at = app(runs_dir, runs=["eager"])
    at.sidebar.multiselect(key="phases").set_value(["decode"]).run()
    at.sidebar.multiselect(key="runs").set_value(["sdpa"]).run()  # same options: the choice stays
    assert at.sidebar.multiselect(key="phases").value == ["decode"]
    at.sidebar.multiselect(key="runs").set_value(["sublayers"]).run()
    types = at.sidebar.multiselect(key="module_types")
    assert "LlamaMLP" in types.value  # a type new to the options is shown, not filtered out
    types.set_value([t for t in types.options if t != "LlamaMLP"]).run()
    at.sidebar.multiselect(key="runs").set_value(["sublayers", "eager"]).run()
    assert "LlamaMLP" not in at.sidebar.multiselect(key="module_types").value
    at.sidebar.multiselect(key="runs").set_value([]).run()
    assert "Pick one or more runs" in at.info[0].value and not at.get("plotly_chart")


def test_switching_the_runs_folder_keeps_the_runs_it_still_holds(runs_dir, bad_dir):
    at = app(runs_dir, runs=["eager", "sdpa"])
    at.sidebar.text_input(key="runs_dir").set_value(str(bad_dir)).run()
    assert at.sidebar.multiselect(key="runs").value == ["sdpa"]
    assert set(bad_runs(at)) == {"old", "truncated"} and metric(at, "Generate calls") == "2"
    at.sidebar.text_input(key="runs_dir").set_value(str(runs_dir)).run()
    assert at.sidebar.multiselect(key="runs").options == ["eager", "sdpa", "sublayers"]
    assert not at.error and not at.exception


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    """A run of plain forwards (no generate) and a run that recorded nothing."""
    root = tmp_path_factory.mktemp("odd")
    model = tiny_llama(layers=2, hidden=HIDDEN)
    with probe.attach(model) as p:
        model(_ids(6, 0))
    p.run.save(root / "forward")
    with probe.attach(model) as p:
        pass
    p.run.save(root / "nothing")
    return root


@pytest.mark.parametrize("view", VIEWS)
def test_runs_without_generate_or_without_calls_draw_every_view(odd_dir, view):
    for picked in (["forward"], ["nothing"], ["forward", "nothing"]):
        at = app(odd_dir, runs=picked, view=view)
        assert not at.error and not other_warnings(at), (picked, view)
    if view == "Shapes":
        assert "recorded no calls" not in " ".join(i.value for i in at.info)
        at.sidebar.multiselect(key="runs").set_value(["nothing"]).run()
        assert "recorded no calls" in at.info[0].value


# --------------------------------------------------------------------------- views
@pytest.mark.parametrize("view,n_charts,n_tables", [
    # Overview: the headline, and the spread of the runs' four generate calls (metrics, blocks);
    # Compare: both headlines, the per-block difference and the significance table
    ("Overview", 2, 3), ("Layers", 3, 1), ("Tree", 1, 1), ("Timeline", 2, 0), ("Memory", 2, 2), ("Roofline", 0, 1),
    ("Shapes", 0, 1), ("Compare", 3, 4), ("Saved comparison", 0, 0), ("Sweep", 0, 0), ("Data", 0, 1),
])
def test_every_view_draws_without_errors(runs_dir, view, n_charts, n_tables):
    at = app(runs_dir, runs=["eager", "sdpa"], view=view)
    assert at.header[0].value == view
    assert not at.error and not other_warnings(at)
    figs = charts(at)
    assert len(figs) == n_charts
    for fig in figs:  # every chart holds data, none is an empty "no data" figure
        assert fig["data"], fig["layout"].get("title")
    assert len(at.dataframe) == n_tables


def test_overview_headline_and_blocks_match_the_runs(runs, runs_dir):
    at = app(runs_dir, runs=["eager", "sdpa"])
    both = [probe.load(runs[n]) for n in ("eager", "sdpa")]
    assert metric(at, "Generate calls") == "4"
    assert metric(at, "Steps") == str(sum(len(r.steps) for r in both))
    assert metric(at, "Call rows") == str(sum(len(r.calls) for r in both))
    head = frame(at)
    assert sorted(head["run_id"]) == sorted(pd.concat([r.runs["run_id"] for r in both]))
    # each generate call is labelled with the run folder it came from
    assert dict(zip(head["run_id"], head["run"])) == {
        rid: name for name, r in zip(("eager", "sdpa"), both) for rid in r.runs["run_id"]}
    blocks, breakdown = charts(at)
    # two runs are shown side by side, one bar per run folder in a panel per phase, never summed
    assert [t["name"] for t in blocks["data"]] == ["eager", "eager", "sdpa", "sdpa"]
    assert [t["showlegend"] for t in blocks["data"]] == [True, False, True, False]
    assert {"embed", "layer", "norm", "head", "(residue)", "(probe)"} == set(arr(blocks["data"][0]["x"]))
    for trace, (name, phase) in zip(blocks["data"], [(n, p) for n in ("eager", "sdpa") for p in ("prefill", "decode")]):
        own = probe.load(runs[name]).summary("block")
        want = own[own["phase"] == phase].set_index("name")["self_ms"]
        np.testing.assert_allclose(arr(trace["y"]), want[arr(trace["x"])].to_numpy())
    assert breakdown["layout"]["barmode"] == "stack"
    assert {y.split(" · ")[0] for t in breakdown["data"] for y in arr(t["y"])} == {"eager", "sdpa"}
    at.radio(key="overview_by").set_value("module").run()
    modules = set(arr(charts(at)[0]["data"][0]["x"]))
    assert {f"model.layers.{i}" for i in range(LAYERS)} | {"lm_head", "model.norm"} <= modules


def test_overview_of_one_run_splits_the_time_outside_the_model_into_sampling_stages(runs, runs_dir):
    at = app(runs_dir, runs=["eager"])
    run = probe.load(runs["eager"])
    blocks, breakdown, stages = charts(at)
    assert [t["name"] for t in blocks["data"]] == ["prefill", "decode"]
    # the time outside the model is split into the sampling stages, which add up to it
    assert [t["name"] for t in breakdown["data"]][-4:] == ["outside: stopping",
                                                           "outside: prepare inputs (of the next forward)",
                                                           "outside: probe (its own step bookkeeping)",
                                                           "outside: remainder (token choice, bookkeeping)"]
    steps = run.steps
    for i, phase in enumerate(("prefill", "decode")):
        total = sum(arr(t["x"])[i] for t in stages["data"])
        assert total == pytest.approx(steps.loc[steps["phase"] == phase, "outside_ms"].mean(), rel=1e-9)
    summ = frame(at, 1)
    assert list(summ["stage"]) == ["update kwargs", "stopping", "prepare inputs", "probe", "remainder"] * 2
    assert list(summ["phase"]) == ["prefill"] * 5 + ["decode"] * 5


def test_phase_filter_narrows_every_view(runs, runs_dir):
    at = app(runs_dir, runs=["eager"])
    at.sidebar.multiselect(key="phases").set_value(["decode"]).run()
    run = probe.load(runs["eager"])
    assert metric(at, "Steps") == str(int((run.steps["phase"] == "decode").sum()))
    assert [t["name"] for t in charts(at)[0]["data"]] == ["decode"]
    at.sidebar.radio(key="view").set_value("Data").run()
    calls = frame(at)
    assert set(calls["phase"]) == {"decode"}
    assert len(calls) == int((run.calls["phase"] == "decode").sum())


def test_depth_and_module_type_filters(runs, runs_dir):
    run = probe.load(runs["sublayers"])
    at = app(runs_dir, runs=["sublayers"], view="Data")
    depths = at.sidebar.multiselect(key="depths")
    assert depths.options == [str(d) for d in sorted(run.calls["depth"].unique())]
    types = at.sidebar.multiselect(key="module_types")
    assert "LlamaMLP" in types.options and "LlamaAttention" in types.options
    types.set_value(["LlamaMLP"]).run()
    calls = frame(at)
    assert set(calls["module_type"]) == {"LlamaMLP"}
    assert len(calls) == int((run.calls["module_type"] == "LlamaMLP").sum())
    deepest = int(run.calls["depth"].max())
    at.sidebar.multiselect(key="module_types").set_value(sorted(run.calls["module_type"].unique())).run()
    at.sidebar.multiselect(key="depths").set_value([deepest]).run()
    calls = frame(at)
    assert set(calls["depth"]) == {deepest} and len(calls) == int((run.calls["depth"] == deepest).sum())


def test_step_range_filter(runs, runs_dir):
    run = probe.load(runs["eager"])
    at = app(runs_dir, runs=["eager"])
    slider = at.sidebar.slider(key="steps")
    assert slider.value == (0, int(run.steps["step"].max()))
    slider.set_value((2, 4)).run()
    assert metric(at, "Steps") == str(int(run.steps["step"].between(2, 4).sum()))
    at.sidebar.radio(key="view").set_value("Timeline").run()
    tokens = charts(at)[0]
    steps_drawn = {x for t in tokens["data"] if t["mode"] == "lines+markers" for x in arr(t["x"])}
    assert steps_drawn and min(steps_drawn) >= 2 and max(steps_drawn) <= 4


def test_layers_view_switches_phase_and_lists_each_layer(runs, runs_dir):
    at = app(runs_dir, runs=["eager"], view="Layers")
    heat = charts(at)[0]
    assert "decode" in heat["layout"]["title"]["text"]
    assert arr(heat["data"][0]["y"]) == list(range(LAYERS))
    table = frame(at)
    assert list(table["module"]) == [f"model.layers.{i}" for i in range(LAYERS)]
    assert (table["prefill mean ms"] > 0).all() and (table["decode mean ms"] > 0).all()
    at.radio(key="layers_phase").set_value("prefill").run()
    assert "prefill" in charts(at)[0]["layout"]["title"]["text"]


def test_layers_view_splits_layers_by_role_where_the_run_recorded_inside_them(runs, runs_dir):
    at = app(runs_dir, runs=["sublayers"], view="Layers")
    heat = charts(at)[1]
    assert [t["type"] for t in heat["data"]] == ["heatmap", "heatmap"]  # prefill | decode
    assert arr(heat["data"][0]["x"]) == ["layer (self)", "attention (rest)", "attention_fn", "mlp", "layer_norm"]
    assert arr(heat["data"][0]["y"]) == list(range(LAYERS))
    # a row adds up to the layer's inclusive time per step
    run = probe.load(runs["sublayers"])
    dec = run.calls[(run.calls["role"] == "layer") & (run.calls["phase"] == "decode")]
    per_step = dec.groupby("layer")["cpu_ms"].sum() / int((run.steps["phase"] == "decode").sum())
    z = np.asarray(arr(heat["data"][1]["z"]), dtype="float64")
    np.testing.assert_allclose(z.sum(axis=1), per_step.to_numpy(), rtol=1e-9)


def test_tree_view_draws_the_icicle_and_folds_the_table(runs, runs_dir):
    at = app(runs_dir, runs=["sublayers"], view="Tree")
    icicle = charts(at)[0]
    assert icicle["data"][0]["type"] == "icicle" and icicle["data"][0]["branchvalues"] == "remainder"
    table = frame(at)
    # layer > attention > its attention function
    assert table["depth"].max() == 3 and table["share"].sum() == pytest.approx(1.0, abs=1e-9)
    at.slider(key="tree_depth").set_value(1).run()
    top = frame(at)
    assert top["depth"].max() == 1 and top["share"].sum() == pytest.approx(1.0, abs=1e-9)
    assert len(top) == LAYERS + 5  # embed, each layer, norm, lm_head, the residue and the probe's cost
    at.radio(key="tree_phase").set_value("prefill").run()
    assert "prefill" in charts(at)[0]["layout"]["title"]["text"]


def test_memory_view_shows_block_output_bytes_and_kv_growth(runs, runs_dir):
    at = app(runs_dir, runs=["eager"], view="Memory")
    mem, kv = frame(at, 0), frame(at, 1)
    layer_decode = mem[(mem["role"] == "layer") & (mem["phase"] == "decode")]
    # a decoder layer's output in decode is the hidden state [1, 1, hidden] in float32
    assert float(layer_decode["mean_out_bytes"].iloc[0]) == 1 * 1 * HIDDEN * 4
    run = probe.load(runs["eager"])
    assert sorted(kv["run_id"]) == sorted(run.runs["run_id"])
    for _, row in kv.iterrows():
        last = run.steps[run.steps["run_id"] == row["run_id"]].iloc[-1]
        assert row["kv_cache_bytes"] == last["kv_cache_bytes"]
        # K and V, per layer, per KV head, per position: 2 x layers x kv_heads x head_dim x 4 bytes
        assert row["bytes per position"] == 2 * LAYERS * 2 * (HIDDEN // 4) * 4
    names = [t["name"] for t in charts(at)[1]["data"]]
    assert any(n.startswith("KV cache") for n in names)


def test_shapes_view_walks_one_generate_call(runs, runs_dir):
    run = probe.load(runs["eager"])
    at = app(runs_dir, runs=["eager"], view="Shapes")
    pick = at.selectbox(key="shapes_run")
    ids = list(run.runs["run_id"])
    # each generate call is named by its run folder (and its id)
    assert pick.options == [f"eager ({rid})" if i == 0 else f"eager · call {i + 1} ({rid})" for i, rid in enumerate(ids)]
    for label, rid in zip(pick.options, ids):
        at.selectbox(key="shapes_run").set_value(label).run()
        walk = frame(at)
        prompt = int(run.runs.loc[run.runs["run_id"] == rid, "prompt_tokens"].iloc[0])
        # identical decoder layers are one row, as the terminal prints them
        layer0 = walk[walk["module"] == f"model.layers.{{0..{LAYERS - 1}}}"].set_index("phase")
        assert layer0.loc["prefill", "out_shapes"] == f"[1, {prompt}, {HIDDEN}]"
        assert layer0.loc["decode", "out_shapes"] == f"[1, 1, {HIDDEN}]"


def test_compare_puts_two_runs_side_by_side(runs, runs_dir):
    at = app(runs_dir, runs=["eager", "sdpa"], view="Compare")
    assert at.selectbox(key="compare_a").value == "eager" and at.selectbox(key="compare_b").value == "sdpa"
    assert [s.value for s in at.main.subheader] == ["eager", "sdpa", "Is the difference larger than the noise?"]
    diff_fig = charts(at)[2]
    assert [t["name"] for t in diff_fig["data"]] == ["eager", "sdpa"] * 2  # a panel per phase, each its own scale
    assert [t.get("yaxis", "y") for t in diff_fig["data"]] == ["y", "y", "y2", "y2"]
    diff = frame(at, 2)
    a = probe.load(runs["eager"]).summary("block")
    row = diff[(diff["name"] == "layer") & (diff["phase"] == "decode")].iloc[0]
    expect = a[(a["name"] == "layer") & (a["phase"] == "decode")]["self_ms"].iloc[0]
    assert row["a_ms"] == pytest.approx(expect)
    assert not at.info  # the same model, depth and prompt: nothing to point out
    at.radio(key="compare_level").set_value("module").run()
    assert "model.layers.0" in set(frame(at, 2)["name"])
    at.selectbox(key="compare_a").set_value("sublayers").run()
    assert not at.exception and at.main.subheader[0].value == "sublayers"
    assert any("differ in depth" in i.value for i in at.info)
    at.selectbox(key="compare_b").set_value("sublayers").run()
    assert "two different runs" in at.warning[0].value


def test_compare_with_one_run_explains_what_it_needs(runs):
    at = app(runs["eager"], view="Compare")
    assert "needs two readable runs" in at.info[0].value


def test_data_view_tables_pages_and_downloads(runs, runs_dir, monkeypatch):
    monkeypatch.setattr(data, "PAGE_ROWS", 50)  # AppTest runs the script in this process
    run = probe.load(runs["sublayers"])
    at = app(runs_dir, runs=["sublayers"], view="Data")
    pages = -(-len(run.calls) // 50)
    assert at.number_input(key="data_page").max == pages
    first = frame(at)
    assert len(first) == 50 and list(first["start_ms"]) == list(run.calls["start_ms"].iloc[:50])
    at.number_input(key="data_page").set_value(pages).run()
    last = frame(at)
    assert len(last) == len(run.calls) - 50 * (pages - 1)
    assert f"of {len(run.calls):,}" in at.caption[0].value
    labels = [b.label for b in at.get("download_button")]
    assert labels == [f"Download calls as CSV ({len(run.calls):,} rows)", "Download the HTML report"]
    assert all(b.proto.deferred_file_id for b in at.get("download_button"))  # built only on click
    for table in ("steps", "runs", "summary by module", "summary by role", "phase summary", "block memory"):
        at.selectbox(key="data_table").set_value(table).run()
        assert not at.exception and len(frame(at)) > 0, table
    assert len(frame(at)) == len(data.block_memory(run.calls))


def test_csv_download_and_html_report_content(runs):
    run = data.load_run(runs["eager"], "eager")
    back = pd.read_csv(StringIO(data.csv_bytes(run.calls).decode()))
    assert list(back.columns) == list(run.calls.columns)
    assert len(back) == len(run.calls) and list(back["module"]) == list(run.calls["module"])
    assert json.loads(back["out_shapes"].iloc[0]) == json.loads(run.calls["out_shapes"].iloc[0])
    assert len(pd.read_csv(StringIO(data.csv_bytes(run.calls, max_rows=5).decode()))) == 5
    html = data.report_html(run).decode()
    assert html.startswith("<!DOCTYPE html>") and "fig-phase-blocks" in html
    assert sorted(p.name for p in runs["eager"].iterdir()) == ["calls.parquet", "meta.json", "requests.parquet",
                                                               "runs.parquet", "sampling.parquet", "steps.parquet"]


# --------------------------------------------------------------------------- data helpers
def test_filters_apply_to_calls_and_steps(runs):
    run = probe.load(runs["sublayers"])
    assert data.apply_filters(run, data.Filters()).calls is run.calls  # nothing copied
    f = data.Filters(phases=("decode",), depths=(3,), module_types=None, steps=(1, 2))
    out = data.apply_filters(run, f)
    c = run.calls
    expect = c[(c["phase"] == "decode") & (c["depth"] == 3) & c["step"].between(1, 2)]
    assert list(out.calls["start_ms"]) == list(expect["start_ms"])
    assert list(out.steps["step"]) == [1, 2]
    opts = data.options(run)
    assert opts["phases"] == ["prefill", "decode"] and opts["steps"] == (0, 5)


def test_discover_lists_runs_and_nested_sweeps(tmp_path, runs):
    shutil.copytree(runs["eager"], tmp_path / "a")
    shutil.copytree(runs["sdpa"], tmp_path / "sweep" / "p16")
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    found = data.discover(tmp_path)
    assert found.message is None
    assert list(found.runs) == ["a", "sweep/p16"] and found.others == ("empty",)
    assert data.discover(tmp_path / "a").runs == {".": tmp_path / "a"}
    sig = data.signature(tmp_path / "a")
    assert sorted(f for f, *_ in sig) == ["calls.parquet", "meta.json", "requests.parquet", "runs.parquet",
                                         "sampling.parquet", "steps.parquet"]
    (tmp_path / "a" / "report.html").write_text("a report is not part of the run")
    assert data.signature(tmp_path / "a") == sig
    (tmp_path / "a" / "meta.json").write_text((tmp_path / "a" / "meta.json").read_text() + " ")
    assert data.signature(tmp_path / "a") != sig


def test_a_meta_json_is_read_once_per_version_of_the_file(tmp_path, runs):
    """The scan decides whether a ``meta.json`` is a run's once per version of the file: the same
    answer as reading it, and read again when the file is written again (or replaced, or goes)."""
    from probe.dashboards import discovery

    shutil.copytree(runs["eager"], tmp_path / "a")
    meta = tmp_path / "a" / "meta.json"
    text = meta.read_text()
    assert list(data.discover(tmp_path).runs) == ["a"]
    assert any(k[0] == str(meta) for k in discovery._SEEN)
    meta.write_text('{"tool": "not a probe run"}')  # another tool's JSON: no run (listed as a folder)
    assert not data.discover(tmp_path).runs and data.discover(tmp_path).others == ("a",)
    meta.write_text(text)
    assert list(data.discover(tmp_path).runs) == ["a"]
    same_size = text.replace('"schema_version"', '"schema_versio_"')  # same length, no schema version
    assert len(same_size) == len(text)
    meta.write_text(same_size)
    assert not data.discover(tmp_path).runs
    meta.unlink()
    assert not data.discover(tmp_path).runs
    meta.write_text(text)
    assert list(data.discover(tmp_path).runs) == ["a"]
    discovery._SEEN.clear()
    assert list(data.discover(tmp_path).runs) == ["a"]


def test_figures_of_combined_runs_match_each_run(runs):
    a, b = probe.load(runs["eager"]), probe.load(runs["sdpa"])
    both = data.combine([a, b])
    assert len(both.calls) == len(a.calls) + len(b.calls)
    head = figures.headline(both.runs, both.steps)
    assert list(head["run_id"]) == list(a.runs["run_id"]) + list(b.runs["run_id"])


def test_apply_filters_by_rank(ranks_dir):
    run = probe.load(ranks_dir)
    assert data.options(run)["ranks"] == [0, 1]
    one = data.apply_filters(run, data.Filters(ranks=(1,)))
    for full, cut in ((run.calls, one.calls), (run.steps, one.steps), (run.runs, one.runs)):
        assert set(cut["rank"]) == {1} and len(cut) == int((full["rank"] == 1).sum()) > 0
    assert data.options(probe.load(ranks_dir / "rank0"))["ranks"] == [0]


# --------------------------------------------------------------------------- roofline
@pytest.fixture(scope="module")
def peaks_dir(runs, tmp_path_factory) -> Path:
    """A runs folder of one recorded run with its (measured) peaks stored, as `probe run` leaves it."""
    root = tmp_path_factory.mktemp("peaks")
    shutil.copytree(runs["eager"], root / "stored")
    store_peaks(root / "stored")
    return root


def _rows(table: pd.DataFrame) -> list[tuple]:
    return [(str(b), str(p)) for b, p in zip(table["block"], table["phase"])]


def test_roofline_with_stored_peaks_draws_every_block_under_the_roofs(peaks_dir):
    at = app(peaks_dir, view="Roofline")
    run = probe.load(peaks_dir / "stored")
    pk = run.meta["peaks"]
    expect = run.roofline()  # the probe's own API, on the peaks stored with the run
    assert not at.error and not at.info
    (fig,) = charts(at)
    assert pk["name"] in fig["layout"]["title"]["text"] and "measured where recorded" in fig["layout"]["title"]["text"]
    roof = next(t for t in fig["data"] if t["name"] == "roof")
    x, y = np.array(arr(roof["x"])), np.array(arr(roof["y"]))
    # the drawn roofs are the stored peaks (in GFLOP/s): flat at the compute peak, slope = bandwidth
    assert y.max() == pytest.approx(pk["flops_per_s"] / 1e9)
    assert y[0] / x[0] == pytest.approx(pk["bytes_per_s"] / 1e9)
    assert {t["name"] for t in fig["data"]} == {"roof", "prefill", "decode"}
    assert "stored with the run" in " ".join(c.value for c in at.caption)
    table, bounds = frame(at, 0), frame(at, 1)
    assert _rows(table) == [(str(m), str(p)) for m, p in zip(expect["module"], expect["phase"])]
    assert list(table["bound"]) == list(expect["bound"])
    assert set(table["bound"]) <= set(BOUNDS) and table["reason"].str.len().min() > 20
    assert list(table["intensity_flops_per_byte"]) == pytest.approx(list(expect["intensity_flops_per_byte"]))
    assert bounds.groupby("phase")["share"].sum().tolist() == pytest.approx([1.0, 1.0])
    # the filters apply: decode only
    at.sidebar.multiselect(key="phases").set_value(["decode"]).run()
    assert set(frame(at, 0)["phase"]) == {"decode"}
    assert {t["name"] for t in charts(at)[0]["data"]} == {"roof", "decode"}


def test_roofline_without_peaks_shows_the_cost_and_never_measures(runs, monkeypatch):
    from probe.analysis import hardware

    measured = []
    real = hardware.measure_peaks
    monkeypatch.setattr(hardware, "measure_peaks", lambda *a, **k: measured.append(a) or real(*a, **k))
    at = app(runs["sublayers"], view="Roofline")
    assert measured == []  # the dashboard machine is not the one that recorded the run
    assert not charts(at) and not at.error
    assert "No peaks recorded" in at.info[0].value
    table = frame(at)
    assert {"flops", "bytes_moved", "intensity_flops_per_byte"} <= set(table.columns)
    assert "bound" not in table.columns and "rank" not in table.columns
    run = probe.load(runs["sublayers"])
    from probe.analysis.roofline import roofline

    expect = roofline(run.cost(), None, run.steps)
    assert _rows(table) == [(str(m), str(p)) for m, p in zip(expect["module"], expect["phase"])]
    assert list(table["flops"]) == pytest.approx(list(expect["flops"]))
    assert (table["flops"] > 0).any() and (table["bytes_moved"] > 0).all()


def test_roofline_of_a_gpu_run_uses_its_datasheet(peaks_dir, tmp_path):
    from probe.analysis.hardware import table_peaks

    shutil.copytree(peaks_dir / "stored", tmp_path / "h100")
    f = tmp_path / "h100" / "runs.parquet"
    runs = pd.read_parquet(f)
    runs["device"], runs["gpu_name"] = "cuda:0", "NVIDIA H100 80GB HBM3"  # a run read away from its GPU
    runs.to_parquet(f)
    reseal(tmp_path / "h100", peaks=None)
    at = app(tmp_path, view="Roofline")
    pk = table_peaks("NVIDIA H100 80GB HBM3", "float32")
    (fig,) = charts(at)
    assert f"{pk.name}, {pk.dtype} (datasheet" in fig["layout"]["title"]["text"]
    assert "looked up from the run's GPU name" in " ".join(c.value for c in at.caption)
    assert set(frame(at)["bound"]) <= set(BOUNDS)


# --------------------------------------------------------------------------- sweep
@pytest.fixture(scope="module")
def sweep_root(runs, tmp_path_factory) -> Path:
    """A runs folder holding one ordinary run and a real sweep (with its CSV report beside it)."""
    from probe.reports import write_sweep_reports

    root = tmp_path_factory.mktemp("with-sweep")
    shutil.copytree(runs["eager"], root / "eager")
    record_sweep(root / "my-sweep")
    write_sweep_reports(root / "my-sweep", formats=("csv",))  # its csv/ folder is no run
    return root


def test_discover_lists_a_sweeps_runs_and_not_the_sweep_as_a_bad_run(sweep_root):
    found = data.discover(sweep_root)
    assert list(found.runs) == ["eager", "my-sweep/runs/p4-b1", "my-sweep/runs/p8-b1"]
    assert found.sweeps == {"my-sweep": sweep_root / "my-sweep"}
    inside = data.discover(sweep_root / "my-sweep")  # the sweep folder itself as the runs folder
    assert list(inside.runs) == ["runs/p4-b1", "runs/p8-b1"] and list(inside.sweeps) == ["."]
    at = app(sweep_root)
    assert not at.error and not other_warnings(at)
    assert at.sidebar.multiselect(key="runs").options == list(found.runs)


def test_sweep_view_draws_the_three_charts_and_the_summary(sweep_root):
    from probe.routines.sweep import load_sweep, sweep_summary

    at = app(sweep_root, view="Sweep")
    df, _ = load_sweep(sweep_root / "my-sweep")
    assert not at.error and not other_warnings(at) and not at.info
    prefill, decode, throughput = charts(at)
    assert "Prefill" in prefill["layout"]["title"]["text"]
    (line,) = prefill["data"]
    assert arr(line["x"]) == [4, 8] and line["name"] == "batch 1"
    per_run = df[df["phase"] == "prefill"].groupby("prompt_len")["latency_ms"].sum()
    assert arr(line["y"]) == pytest.approx(list(per_run))
    # decode steps sit at the KV lengths the prompts left: 4 and 8 cached positions
    assert sorted(x for t in decode["data"] for x in arr(t["x"])) == sorted(
        df.loc[df["phase"] == "decode", "kv_len"].tolist())
    assert sorted(t["name"] for t in throughput["data"]) == ["prompt 4", "prompt 8"]
    summary, configs = frame(at, 0), frame(at, 1)
    pd.testing.assert_frame_equal(summary.reset_index(drop=True), sweep_summary(df), check_dtype=False)
    names = list(configs["run in the dashboard"])
    assert names == ["my-sweep/runs/p4-b1", "my-sweep/runs/p8-b1"]
    # each named run is in the sidebar: pick one and it is that config's recording
    at.sidebar.multiselect(key="runs").set_value([names[1]]).run()
    at.sidebar.radio(key="view").set_value("Overview").run()
    head = frame(at)
    assert head["prompt_tokens"].tolist() == [8] and head["new_tokens"].tolist() == [2]


def test_sweep_view_of_the_sweep_folder_itself_and_of_a_broken_sweep(sweep_root, tmp_path):
    at = app(sweep_root / "my-sweep", view="Sweep")
    assert len(charts(at)) == 3 and not at.error
    assert list(frame(at, 1)["run in the dashboard"]) == ["runs/p4-b1", "runs/p8-b1"]
    shutil.copytree(sweep_root / "my-sweep", tmp_path / "broken")
    f = tmp_path / "broken" / "sweep.parquet"
    f.write_bytes(f.read_bytes()[:100])
    at = app(tmp_path, view="Sweep")
    (err,) = [e.value for e in at.error]
    assert "**broken**" in err and "cannot read the sweep" in err
    assert at.sidebar.multiselect(key="runs").options == ["broken/runs/p4-b1", "broken/runs/p8-b1"]
    # a sweep whose every config failed has no runs: its view is still shown, and no "bad run"
    shutil.copytree(sweep_root / "my-sweep", tmp_path / "only" / "s", ignore=shutil.ignore_patterns("runs"))
    at = app(tmp_path / "only")
    assert at.header[0].value == "Sweep" and len(charts(at)) == 3
    assert not at.error and not other_warnings(at) and not at.sidebar.multiselect


def test_sweep_view_without_a_sweep_says_how_to_make_one(runs_dir):
    at = app(runs_dir, view="Sweep")
    assert f"probe sweep --out {runs_dir}/my-sweep" in at.info[0].value
    assert not charts(at) and not at.error


# --------------------------------------------------------------------------- ranks
@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory) -> Path:
    return record_ranks(tmp_path_factory.mktemp("tp") / "tp")


def test_two_ranks_get_a_rank_filter_and_per_rank_overview_and_shapes(ranks_dir, runs_dir):
    run = probe.load(ranks_dir)
    at = app(ranks_dir.parent)
    assert at.sidebar.multiselect(key="runs").options == ["tp"]
    assert at.sidebar.multiselect(key="ranks").options == ["0", "1"]
    head = frame(at, 0)
    assert head["rank"].tolist() == [0, 1]
    assert metric(at, "Generate calls") == "1"  # one call, recorded by both ranks
    blocks = charts(at)[0]
    assert [t["name"] for t in blocks["data"]] == ["prefill · rank 0", "prefill · rank 1", "decode · rank 0",
                                                   "decode · rank 1"]
    per_rank = frame(at, 1)
    layer = per_rank[(per_rank["name"] == "layer") & (per_rank["phase"] == "decode")]
    expect = run.calls[(run.calls["role"] == "layer") & (run.calls["phase"] == "decode")].groupby("rank")["cpu_ms"]
    assert layer["rank"].tolist() == [0, 1]
    assert layer["total_ms"].tolist() == pytest.approx(expect.sum().tolist())
    at.sidebar.radio(key="view").set_value("Shapes").run()
    walk = frame(at)
    assert walk["rank"].tolist()[:4] == [0, 1, 0, 1]  # the same call of each rank side by side
    assert walk.groupby("rank").size().tolist() == [len(walk) // 2] * 2
    at.sidebar.radio(key="view").set_value("Roofline").run()
    assert set(frame(at)["rank"]) == {0, 1}
    # one rank picked: it looks like a single-process run
    at.sidebar.multiselect(key="ranks").set_value([1]).run()
    assert "rank" not in frame(at).columns
    at.sidebar.radio(key="view").set_value("Overview").run()
    assert metric(at, "Steps") == str(int((run.steps["rank"] == 1).sum()))
    assert "rank" not in frame(at).columns and len(frame(at)) == 1
    assert [t["name"] for t in charts(at)[0]["data"]] == ["prefill", "decode"]
    # a single-process run has no rank filter at all
    single = app(runs_dir, runs=["eager"])
    assert "ranks" not in [m.key for m in single.sidebar.multiselect]
    # the headline, the spread of its two generate calls (metrics, blocks), the sampling stages
    assert "rank" not in frame(single).columns and len(single.dataframe) == 4


def test_overview_names_the_model_its_size_and_weights(runs, runs_dir):
    at = app(runs_dir, runs=["eager"])
    r = probe.load(runs["eager"]).runs.iloc[0]
    lines = [m.value for m in at.markdown if m.value.startswith("**Model**")]
    assert len(lines) == 1
    assert str(r["model_id"]) in lines[0].replace("\\", "") and f"{r['parameters'] / 1e6:,.1f}M parameters" in lines[0]
    from probe.dashboards.views import model_lines

    runs = pd.DataFrame({"model_id": ["SmolLM2-135M-Instruct"] * 2, "parameters": pd.array([134515008] * 2, "Int64"),
                         "weights_source": ["GGUF Q4_1, de-quantized to float32"] * 2})
    assert model_lines(runs) == ["SmolLM2-135M-Instruct · 134.5M parameters · weights: GGUF Q4_1, de-quantized to float32"]


# --------------------------------------------------------------------------- folder listing
@pytest.fixture(scope="module")
def listing_dir(runs, tmp_path_factory) -> Path:
    """Two runs, the folder `probe compare` wrote of them, a run of an old schema, a user's
    folder of notes and an empty folder."""
    from probe.cli import main

    root = tmp_path_factory.mktemp("listing")
    for name in ("eager", "sdpa"):
        shutil.copytree(runs[name], root / name)
    assert main(["compare", str(root / "eager"), str(root / "sdpa"), "--out", str(root / "eager-vs-sdpa")]) == 0
    add_bad_runs(root, runs["eager"])
    shutil.rmtree(root / "truncated")
    (root / "notes" / "drafts").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "notes" / "meta.json").write_text('{"author": "someone else"}')  # another tool's meta.json
    return root


def test_compare_writes_what_it_compared(listing_dir, runs):
    meta = json.loads((listing_dir / "eager-vs-sdpa" / "compare.json").read_text())
    for side, name in (("a", "eager"), ("b", "sdpa")):
        assert meta[side]["path"] == str(listing_dir / name)
        assert meta[side]["resolved"] == str((listing_dir / name).resolve())
        assert meta[side]["run_ids"] == sorted(probe.load(runs[name]).runs["run_id"].astype(str))
    assert meta["written"][:2] == "20" and meta["written"].endswith("+00:00")


def test_a_comparison_and_other_folders_are_listed_never_as_broken_runs(listing_dir):
    found = data.discover(listing_dir)
    assert list(found.runs) == ["eager", "old", "sdpa"]
    assert found.comparisons == {"eager-vs-sdpa": listing_dir / "eager-vs-sdpa"}
    assert found.others == ("empty", "notes")
    at = app(listing_dir)
    assert set(bad_runs(at)) == {"old"} and len(at.error) == 1  # the one real run that fails, once
    assert other_folders(at) == "Other folders (no run in them): empty, notes"
    assert at.sidebar.multiselect(key="runs").options == ["eager", "sdpa"]
    pick = at.sidebar.selectbox(key="comparison")
    assert pick.options == ["eager-vs-sdpa (eager vs sdpa)"] and pick.value is None
    for view in ("Overview", "Layers"):  # no view carries a banner about the other folders
        at.sidebar.radio(key="view").set_value(view).run()
        assert len(at.error) == 1 and len(at.main.error) == 0 and not other_warnings(at)


def test_picking_a_comparison_opens_its_significance_table_and_page(listing_dir):
    from probe.schema import SIGNIFICANCE
    from probe.reports.compare import significance_table

    at = app(listing_dir, view="Layers")
    at.sidebar.selectbox(key="comparison").set_value("eager-vs-sdpa").run()
    assert not at.exception and at.sidebar.radio(key="view").value == "Saved comparison"
    assert at.header[0].value == "Saved comparison"
    text = " ".join(m.value for m in at.markdown)
    assert f"`{listing_dir / 'eager'}` — listed here as run **eager**" in text and "run **sdpa**" in text
    sig = pd.read_csv(listing_dir / "eager-vs-sdpa" / "significance.csv", keep_default_na=False, na_values=[""])
    sig = sig.astype({c: t for c, t in SIGNIFICANCE.items() if c != "phase"}).fillna({"phase": ""})
    want = significance_table(sig[sig["level"].isin(["metric", "block"])])
    got = frame(at)
    assert list(got.columns) == list(want.columns)
    assert got["metric / block"].tolist() == want["metric / block"].tolist()
    assert got["verdict"].tolist() == want["verdict"].tolist()
    (button,) = at.get("download_button")
    assert "compare.html" in button.proto.label
    assert any((listing_dir / "eager-vs-sdpa" / "compare.html").resolve().as_uri() in c.value for c in at.caption)


def test_a_comparison_written_before_compare_json_and_a_folder_of_comparisons_only(listing_dir, tmp_path):
    shutil.copytree(listing_dir / "eager-vs-sdpa", tmp_path / "old-cmp")
    (tmp_path / "old-cmp" / "compare.json").unlink()
    (tmp_path / "junk").mkdir()
    found = data.discover(tmp_path)
    assert found.comparisons == {"old-cmp": tmp_path / "old-cmp"} and not found.runs and found.others == ("junk",)
    at = app(tmp_path)  # no run at all: the comparison is shown, and nothing is red
    assert not at.error and not at.warning and at.header[0].value == "Saved comparison"
    assert "unknown" in at.markdown[0].value and len(frame(at)) > 0


def test_keep_selection_adds_no_new_run_to_the_picks():
    assert data.keep_selection(None, None, ["a", "b"], ["b"]) == ["b"]  # first time: the default
    assert data.keep_selection(["a"], ["a"], ["a", "b"], ["b"]) == ["a"]  # b landed: listed, not picked
    assert data.keep_selection(["a", "b"], ["a", "b"], ["b", "c"], ["c"]) == ["b"]  # a deleted
    assert data.keep_selection(["a"], ["a"], ["x", "y"], ["y"]) == ["y"]  # another folder: its default
    assert data.keep_selection([], ["a"], ["a", "b"], ["b"]) == []  # cleared by the user: stays so


def test_a_run_that_lands_while_the_page_is_open_joins_the_list_not_the_selection(runs, tmp_path):
    import os

    shutil.copytree(runs["eager"], tmp_path / "first")
    at = app(tmp_path)
    assert at.sidebar.multiselect(key="runs").value == ["first"]
    shutil.copytree(runs["sdpa"], tmp_path / "second")  # newer, and it sorts last
    os.utime(tmp_path / "second" / "meta.json")
    at.run()
    assert at.sidebar.multiselect(key="runs").options == ["first", "second"]
    assert at.sidebar.multiselect(key="runs").value == ["first"]
    at.sidebar.multiselect(key="runs").set_value(["first", "second"]).run()
    shutil.copytree(runs["sublayers"], tmp_path / "third")
    at.run()
    assert at.sidebar.multiselect(key="runs").value == ["first", "second"] and not at.exception


def test_an_empty_folder_opens_on_the_first_run_that_lands(runs, tmp_path):
    at = app(tmp_path)
    assert "holds no runs" in at.info[0].value
    shutil.copytree(runs["eager"], tmp_path / "first")
    at.run()
    assert at.sidebar.multiselect(key="runs").value == ["first"]


def test_a_cached_figure_comes_back_as_it_was_built_and_can_be_retitled():
    """The views' cache holds a figure as its dict (unpickled without plotly validating it
    again): it comes back with the same data and layout, and a view can still retitle it."""
    import pickle

    from probe.dashboards import context

    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    built = figures.layer_heatmap(p.run.calls, phase="decode")
    back = context._restored(pickle.loads(pickle.dumps(context._storable(built))))
    assert back is not built and json.loads(back.to_json()) == json.loads(built.to_json())
    back.update_layout(title={"text": "run: " + back.layout.title.text})
    assert back.layout.title.text.startswith("run: Layer x step")
    assert context._restored(context._storable(3)) == 3  # anything else as it is
