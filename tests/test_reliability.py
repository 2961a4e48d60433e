"""Defects an adversarial user found: interrupted saves, foreign folders, corrupt runs, FIFOs,
huge strings, inputs_embeds, and where the commands may write. Each test reproduces one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import probe
from probe.cli import main
from probe.analysis.run import RunLoadError, RunSaveError
from tiny import tiny_llama
from edits import reseal

REPO = Path(probe.__file__).resolve().parents[1]


def _ids(n=6, seed=0):
    return torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def _record(new=3, n=6, seed=0, depth="blocks", **kw) -> probe.Run:
    model = tiny_llama(layers=2)
    with probe.attach(model, depth=depth, **kw) as p:
        model.generate(_ids(n, seed), max_new_tokens=new, do_sample=False)
    return p.run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two different saved runs: A (3 new tokens) and B (5 new tokens, another prompt)."""
    root = tmp_path_factory.mktemp("two")
    return _record(3, 6, 0).save(root / "A"), _record(5, 9, 1).save(root / "B")


def _same(run: probe.Run, ref: probe.Run) -> bool:
    return (run.calls.equals(ref.calls) and run.steps.equals(ref.steps) and run.runs.equals(ref.runs)
            and run.meta.get("manifest", {}).get("run_ids") == ref.meta.get("manifest", {}).get("run_ids"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if e.name.endswith((".tmp", ".trash")))


# --------------------------------------------------------------------------- saving over a run
def test_a_save_killed_at_random_points_leaves_the_old_run_or_the_new_one(two_runs, tmp_path):
    a_dir, b_dir = two_runs
    a, b = probe.load(a_dir), probe.load(b_dir)
    target = tmp_path / "runs" / "target"
    a.save(target)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("save_killer.py")), str(a_dir), str(b_dir),
                               str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    rng = random.Random(16)
    outcomes: dict[str, int] = {"A": 0, "B": 0, "error": 0}
    try:
        for _ in range(20):
            server.stdin.write("go\n")
            server.stdin.flush()
            line = server.stdout.readline().split()
            assert line and line[0] == "ready", line
            time.sleep(rng.uniform(0.0, 0.25))  # a save of these runs takes a few ms: any point of one
            os.kill(int(line[1]), signal.SIGKILL)
            assert server.stdout.readline().strip() == "done"
            try:
                got = probe.load(target)
            except RunLoadError as exc:
                outcomes["error"] += 1
                assert str(target) in str(exc)  # names the folder, says what happened
                continue
            if _same(got, a):
                outcomes["A"] += 1
            else:
                assert _same(got, b), "a run that is neither the old nor the new one loaded"
                outcomes["B"] += 1
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    # the folder is exchanged in one step (renameat2), or recovered by load where the OS cannot:
    # a kill at any point leaves a whole run, never none
    assert outcomes["error"] == 0 and outcomes["A"] + outcomes["B"] == 20, outcomes
    # the next save removes what the killed ones left, beside the run and inside it
    b.save(target)
    assert _leftovers(target.parent) == [] and _leftovers(target) == []
    assert _same(probe.load(target), b)


@pytest.mark.parametrize("left", ["new", "old", "both"])
def test_a_save_killed_between_its_two_renames_is_recovered_by_load(two_runs, tmp_path, left):
    """Without an exchange, a save renames the old run away, then the new one in: a kill between
    the two leaves no run at the target, and load moves the complete one left beside it back."""
    import shutil

    from probe.store import files

    a_dir, b_dir = two_runs
    target = tmp_path / "target"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    if left in ("old", "both"):
        shutil.copytree(a_dir, tmp_path / f".target.{pid}.aaaa{files.TRASH}")
    if left in ("new", "both"):
        shutil.copytree(b_dir, tmp_path / f".target.{pid}.bbbb{files.TMP}")
    got = probe.load(target)
    want = probe.load(b_dir if left != "old" else a_dir)
    assert _same(got, want) and target.is_dir()
    # the next save cleans what is left
    probe.load(a_dir).save(target)
    assert _leftovers(tmp_path) == []


def test_a_folder_mixing_files_of_two_saves_is_refused_by_name(two_runs, tmp_path):
    a_dir, b_dir = two_runs
    mixed = tmp_path / "mixed"
    shutil.copytree(a_dir, mixed)
    shutil.copy(b_dir / "calls.parquet", mixed / "calls.parquet")
    with pytest.raises(RunLoadError, match=r"calls\.parquet does not match .*meta\.json.*two saves"):
        probe.load(mixed)


def test_a_run_of_this_schema_without_its_manifest_is_refused(two_runs, tmp_path):
    """Every save of schema 2 writes a manifest: one without it was edited, and removing it must
    not switch the checks off (``cpu_ms`` x 1000 would then load)."""
    bare = tmp_path / "bare"
    shutil.copytree(two_runs[0], bare)
    meta = json.loads((bare / "meta.json").read_text())
    del meta["manifest"]
    (bare / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunLoadError, match="has no 'manifest'.*schema 2"):
        probe.load(bare)


def test_saving_replaces_the_whole_run_folder_and_never_a_foreign_one(two_runs, tmp_path):
    a = probe.load(two_runs[0])
    target = tmp_path / "run"
    a.save(target)
    (target / "report.html").write_text("old report")
    (target / ".calls.parquet.x1y2.tmp").write_bytes(b"left by a killed save of an older probe")
    probe.load(two_runs[1]).save(target)
    assert sorted(f.name for f in target.iterdir()) == ["calls.parquet", "meta.json", "requests.parquet", "runs.parquet",
                                                        "sampling.parquet", "steps.parquet"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunSaveError, match="not a probe run"):
        a.save(foreign)
    assert sorted(f.name for f in foreign.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- rank folders
def test_folders_named_like_ranks_are_not_tensor_parallel_ranks(two_runs, tmp_path):
    from probe.dashboards import data

    root = tmp_path / "runs"
    for name in ("baseline", "other", "ranking-test", "rank1x"):
        shutil.copytree(two_runs[0], root / name)
    with pytest.raises(RunLoadError, match="holds no probe run"):
        probe.load(root)
    found = data.discover(root)
    assert sorted(found.runs) == ["baseline", "other", "rank1x", "ranking-test"]
    # named exactly like a rank but an ordinary run (no world size in its meta): a run of its own
    shutil.copytree(two_runs[0], root / "rank3")
    with pytest.raises(RunLoadError, match="holds no probe run"):
        probe.load(root)
    assert "rank3" in data.discover(root).runs


def test_a_rank_folder_must_hold_that_rank(two_runs, tmp_path):
    from probe.capture.ranks import save_rank

    run = probe.load(two_runs[0])
    root = tmp_path / "tp"
    for r in (0, 1):
        save_rank(probe.Run(calls=run.calls, steps=run.steps, runs=run.runs, meta=dict(run.meta, rank=r)), root)
    merged = probe.load(root)
    assert merged.meta["ranks"] == [0, 1] and len(merged.calls) == 2 * len(run.calls)
    shutil.copytree(root / "rank0", root / "rank2")  # says rank 0, sits in rank2
    with pytest.raises(RunLoadError, match=r"says rank 0 but its folder is rank2"):
        probe.load(root)


# --------------------------------------------------------------------------- corrupt runs
def _rewrite(run_dir: Path, name: str, edit) -> None:
    """Replace frame file ``name`` with ``edit(table)`` and rewrite the manifest to match (as a
    deliberate hand edit would): the column checks, not the checksums, must catch it."""
    f = run_dir / name
    pq.write_table(edit(pq.read_table(f)), f)
    reseal(run_dir)


def _set(col: str, values, type_=None):
    def edit(t: pa.Table) -> pa.Table:
        vals = values(t.num_rows) if callable(values) else [values] * t.num_rows
        arr = pa.array(vals, type=type_)
        return t.set_column(t.column_names.index(col), col, arr)
    return edit


def _with(col: str, make):
    """Replace column ``col`` by ``make(table)`` (an Arrow array of the same length)."""
    def edit(t: pa.Table) -> pa.Table:
        return t.set_column(t.column_names.index(col), col, make(t).cast(t.schema.field(col).type))
    return edit


def _meta(edit):
    def apply(run_dir: Path) -> None:
        meta = json.loads((run_dir / "meta.json").read_text())
        edit(meta)
        (run_dir / "meta.json").write_text(json.dumps(meta))
    return apply


def _frame(name, edit):
    return lambda d: _rewrite(d, name, edit)


def _deep_meta(d: Path) -> None:
    (d / "meta.json").write_text("[" * 100_000 + "]" * 100_000)


def _deep_meta_object(d: Path) -> None:
    text = (d / "meta.json").read_text()
    (d / "meta.json").write_text(text[:-2] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")


CORRUPTIONS = {
    # name: (corrupt the run folder, file and column the error must name, or None: loads and reports)
    "meta nested 100,000 deep": (_deep_meta, "meta.json"),
    "a key nested 100,000 deep": (_deep_meta_object, "meta.json"),
    "meta rank is text": (_meta(lambda m: m.update(rank="abc")), "meta.json"),
    "meta prompt is a list": (_meta(lambda m: m.update(prompt=["a"])), "meta.json"),
    "meta peaks is a number": (_meta(lambda m: m.update(peaks=3)), "meta.json"),
    "meta config is text": (_meta(lambda m: m.update(config="llama")), "meta.json"),
    "rank column is text": (_frame("calls.parquet", _set("rank", "abc")), "'rank'"),
    "NaN in step": (_frame("steps.parquet", _set("step", lambda n: [float("nan")] * n)), "'step'"),
    "strings in cpu_ms": (_frame("calls.parquet", _set("cpu_ms", "fast")), "'cpu_ms'"),
    "inf start_ms": (_frame("calls.parquet", _set("start_ms", lambda n: [float("inf")] * n)), "'start_ms'"),
    "-inf forward_ms": (_frame("steps.parquet", _set("forward_ms", lambda n: [-float("inf")] * n)), "'forward_ms'"),
    "in_shapes not JSON": (_frame("calls.parquet", _set("in_shapes", "[[1, 7")), "'in_shapes'"),
    "an int in out_shapes": (_frame("calls.parquet", _set("out_shapes", "5")), "'out_shapes'"),
    "shapes of text": (_frame("calls.parquet", _set("out_shapes", '[["a"]]')), "'out_shapes'"),
    "list-typed module": (_frame("calls.parquet", _set("module", lambda n: [["a"]] * n)), "'module'"),
    "list-typed step": (_frame("steps.parquet", _set("step", lambda n: [[1]] * n)), "'step'"),
    "unknown phase": (_frame("steps.parquet", _set("phase", "warp")), "'phase'"),
    "unknown role": (_frame("calls.parquet", _set("role", "boss")), "'role'"),
    "null step": (_frame("calls.parquet", _set("step", lambda n: [None] * n, pa.int64())), "'step'"),
    "bool in batch": (_frame("steps.parquet", _set("batch", True)), "'batch'"),
    "prompt_tokens_real not a list": (_frame("runs.parquet", _set("prompt_tokens_real", '{"a": 1}')),
                                      "'prompt_tokens_real'"),
    "generate_kwargs not JSON": (_frame("runs.parquet", _set("generate_kwargs", "{")), "'generate_kwargs'"),
    "a column twice": (_frame("calls.parquet", lambda t: t.append_column("step", t.column("step"))), "calls.parquet"),
    "bytes in model_id": (_frame("runs.parquet", _set("model_id", b"\xff")), "'model_id'"),
    "meta.json is a folder": (lambda d: ((d / "meta.json").unlink(), (d / "meta.json").mkdir()), "meta.json"),
    "calls.parquet truncated": (lambda d: (d / "calls.parquet").write_bytes(
        (d / "calls.parquet").read_bytes()[:100]), "calls.parquet"),
    # the nesting: every walk over it must end, so a loop or a forward parent is refused
    "parent = call (a loop)": (_frame("calls.parquet", _with("parent", lambda t: t.column("call"))), "nesting is not a tree"),
    "a parent after its child": (_frame("calls.parquet", _with("parent", lambda t: pa.compute.add(t.column("call"), 1))),
                                 "nesting is not a tree"),
    "two calls numbered alike": (_frame("calls.parquet", _with("call", lambda t: pa.array([0] * t.num_rows, pa.int64()))),
                                 "nesting is not a tree"),
    "call number 2^62": (_frame("calls.parquet", _set("call", lambda n: [2**62] * n, pa.int64())), "beyond Int32"),
    "call number 2^31 - 1": (_frame("calls.parquet", _set("call", lambda n: [2**31 - 1] * n, pa.int64())),
                             "nesting is not a tree"),
    # values no recording produces, in files whose manifest was rewritten to match (the rules)
    "negative cpu_ms": (_frame("calls.parquet", _set("cpu_ms", lambda n: [-1.0] * n)), "'cpu_ms' has"),
    "negative self_ms": (_frame("calls.parquet", _set("self_ms", lambda n: [-0.5] * n)), "'self_ms' has"),
    "NaN in cpu_ms": (_frame("calls.parquet", _set("cpu_ms", lambda n: [float("nan")] * n)), "'cpu_ms' has"),
    "NaN forward_ms": (_frame("steps.parquet", _set("forward_ms", lambda n: [float("nan")] * n)), "'forward_ms' has"),
    "negative ttft_ms": (_frame("runs.parquet", _set("ttft_ms", lambda n: [-3.0] * n)), "'ttft_ms' has"),
    "negative total_ms": (_frame("runs.parquet", _set("total_ms", lambda n: [-3.0] * n)), "'total_ms' has"),
    "huge layer index": (_frame("calls.parquet", _set("layer", lambda n: [10**6] * n, pa.int64())), "beyond the model's"),
    "layer 2^62": (_frame("calls.parquet", _set("layer", lambda n: [2**62] * n, pa.int64())), "beyond Int32"),
    "step 2^40 of a call": (_frame("calls.parquet", _set("step", lambda n: [2**40] * n, pa.int64())), "beyond int32"),
    "layer -7": (_frame("calls.parquet", _set("layer", lambda n: [-7] * n, pa.int64())), "'layer' has"),
    "step 2^62": (_frame("steps.parquet", _set("step", lambda n: [2**62] * n, pa.int64())), "beyond their run's step count"),
    "calls of an unknown run": (_frame("calls.parquet", _set("run_id", "nobody")), "belong to no run"),
    "calls of an unknown step": (_frame("calls.parquet", _set("step", lambda n: [99] * n, pa.int64())), "belong to no step"),
    "a listed sampling.parquet deleted": (lambda d: (d / "sampling.parquet").unlink(), "sampling.parquet is missing"),
    # these load: the report must then be written without a traceback
    "empty module names": (_frame("calls.parquet", _set("module", "")), None),
    "meta prompt missing": (_meta(lambda m: m.pop("prompt", None)), None),
    "meta with extra keys": (_meta(lambda m: m.update(extra={"a": [1, {"b": None}]})), None),
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A run recorded by `probe run` (prompt, peaks and config in its meta, as users have them)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "--max-new-tokens", "3", "--out", str(out), "--no-report"]) == 0
    return out


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_run_is_one_clear_error_and_a_run_that_loads_can_be_reported(name, cli_run, tmp_path, capsys):
    corrupt, needle = CORRUPTIONS[name]
    d = tmp_path / "run"
    shutil.copytree(cli_run, d)
    corrupt(d)
    if needle is not None:
        with pytest.raises(RunLoadError) as info:
            probe.load(d)
        assert needle in str(info.value) and str(d) in str(info.value)
        code = main(["report", str(d), "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err
    else:
        probe.load(d)
        code = main(["report", str(d), "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err
        assert code == 0, err
        assert (tmp_path / "rep" / "report.html").stat().st_size > 0


# --------------------------------------------------------------------------- FIFOs
def _finishes(fn, timeout=30.0):
    """Run ``fn`` in a thread; return its result or exception, failing if it is still blocked."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        # unblock the reader so that the thread ends, then fail
        for fifo in _FIFOS:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
        pytest.fail(f"still blocked after {timeout} s")
    return box


_FIFOS: list[Path] = []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["meta.json", "calls.parquet"])
def test_a_fifo_in_a_run_folder_never_hangs_load_report_or_dashboard(name, two_runs, tmp_path, capsys):
    from probe.dashboards import data

    root = tmp_path / "runs"
    d = root / "fifo"
    shutil.copytree(two_runs[0], d)
    (d / name).unlink()
    os.mkfifo(d / name)
    _FIFOS.append(d / name)
    got = _finishes(lambda: probe.load(d))
    assert isinstance(got.get("error"), RunLoadError) and "not a regular file" in str(got["error"])
    got = _finishes(lambda: main(["report", str(d), "--out", str(tmp_path / "rep")]))
    assert got.get("value") == 2 and "not a regular file" in capsys.readouterr().err
    found = data.discover(root)
    got = _finishes(lambda: [data.signature(p) for p in found.runs.values()] + [data.load_run(d, "fifo")])
    assert isinstance(got.get("error"), RunLoadError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_a_sweep_file_never_hangs(tmp_path):
    from probe.routines.sweep import load_sweep

    os.mkfifo(tmp_path / "sweep.parquet")
    _FIFOS.append(tmp_path / "sweep.parquet")
    got = _finishes(lambda: load_sweep(tmp_path))
    assert isinstance(got.get("error"), ValueError) and "not a regular file" in str(got["error"])


# --------------------------------------------------------------------------- inputs_embeds
def test_generate_from_inputs_embeds_counts_the_new_tokens():
    model = tiny_llama(layers=2)
    ids = _ids(8)
    emb = model.get_input_embeddings()(ids)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=emb, max_new_tokens=6, do_sample=False)
    with probe.attach(model) as p:
        with torch.no_grad():
            out = model.generate(inputs_embeds=emb, max_new_tokens=6, do_sample=False)
            both = model.generate(input_ids=ids, inputs_embeds=emb, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, out) and out.shape[-1] == 6  # only the new tokens come back
    assert both.shape[-1] == 8 + 6  # the prompt ids, then the new tokens
    runs = p.run.runs
    assert list(runs["new_tokens"]) == [6, 6] and list(runs["prompt_tokens"]) == [8, 8]
    for rid in runs["run_id"]:
        st = p.run.steps[p.run.steps["run_id"] == rid]
        assert (st["new_tokens"] >= 1).all() and st["new_tokens"].sum() == 6


# --------------------------------------------------------------------------- huge strings
def test_a_megabyte_model_and_module_name_keep_the_reports_small(tmp_path):
    from probe.reports import write_reports

    long_module = "m" * 1_000_000
    model = tiny_llama(layers=2)
    model.model.norm = nn.Sequential(OrderedDict([(long_module, model.model.norm)]))
    with probe.attach(model, depth="all", model_id="x" * 1_000_000) as p:
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
    run = p.run
    assert run.calls["module"].str.len().max() > 1_000_000  # recorded whole
    run.meta["prompt"] = "p" * 1_000_000
    saved = run.save(tmp_path / "run")
    assert probe.load(saved).runs["model_id"].iloc[0] == "x" * 1_000_000  # and saved whole
    paths = write_reports(run, saved, formats=("html", "csv", "trace"))
    sizes = {p.name: p.stat().st_size for p in paths}
    assert sizes["report.html"] < 5_000_000  # plotly.js (~4.6 MB) plus the page
    assert all(v < 200_000 for k, v in sizes.items() if k != "report.html"), sizes
    html = (saved / "report.html").read_text()
    assert "x" * 300 not in html and "m" * 300 not in html and "…[+" in html
    # two modules that differ past the cap stay two rows
    from probe.reports.text import cap

    assert cap("a" * 400 + "1") != cap("a" * 400 + "2") and len(cap("a" * 10_000)) <= 300


# --------------------------------------------------------------------------- --out
def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_out_an_existing_run_needs_force_and_says_so(cli_run, tmp_path, capsys):
    target = tmp_path / "r"
    shutil.copytree(cli_run, target)
    before = (target / "meta.json").read_bytes()
    code, _, err = _cli(["run", "--max-new-tokens", "2", "--out", str(target), "--no-report"], capsys)
    assert code == 2 and "already holds a probe run" in err and "--force" in err and "loading" not in err
    assert (target / "meta.json").read_bytes() == before
    code, _, err = _cli(["run", "--max-new-tokens", "2", "--out", str(target), "--no-report", "--force"], capsys)
    assert code == 0 and f"replacing the run in {target} (--force)" in err
    assert probe.load(target).runs.iloc[0]["max_new_tokens"] == 2


def test_run_out_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "csv").mkdir(parents=True)
    (mine / "calls.parquet").write_bytes(b"my own file")
    (mine / "report.html").write_text("my page")
    for force in ([], ["--force"]):
        code, _, err = _cli(["run", "--out", str(mine), "--no-report", *force], capsys)
        assert code == 2 and "is not a probe run" in err and "loading" not in err
    assert (mine / "calls.parquet").read_bytes() == b"my own file" and (mine / "report.html").read_text() == "my page"


@pytest.mark.parametrize("out", ["/proc/probe-x", "/sys/probe-x", b"/tmp/probe-\xff\xfe".decode("utf-8", "surrogateescape")])
def test_run_out_that_cannot_be_written_fails_before_the_model_loads(out, capsys):
    if out.startswith(("/proc", "/sys")) and not Path(out).parent.is_dir():
        pytest.skip("no /proc or /sys here")
    code, _, err = _cli(["run", "--out", out, "--no-report"], capsys)
    assert code == 2 and "--out" in err and "loading" not in err and "Traceback" not in err
    assert not os.path.lexists(out)


def test_a_save_that_fails_after_profiling_keeps_the_recording_and_names_where(tmp_path):
    """The out folder's parent turns into a file while the model is profiled: the save fails for
    real; the run is kept under the temp dir, exit 2, no traceback."""
    from probe.models import save_bundled

    model_dir = save_bundled(tmp_path / "model", num_hidden_layers=2)
    base = tmp_path / "base"
    out = base / "sub" / "run"
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"),
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "probe", "run", str(model_dir), "--max-new-tokens", "12",
                             "--out", str(out), "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stderr.readline()  # "loading ..." comes after the --out check
    assert first.startswith("loading"), first
    assert not base.exists()  # the check removed the folders it made
    base.mkdir()
    (base / "sub").write_text("now a file")
    stdout, rest = proc.communicate(timeout=300)
    assert proc.returncode == 2, rest
    assert "Traceback" not in rest and "cannot save the run to" in rest and "The recording is kept in" in rest
    assert rest.count("cannot save the run to") == 1  # the reason once, not "cannot save ...: cannot save ..."
    kept = [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("probe-unsaved-run-")]
    assert len(kept) == 1 and str(kept[0]) in rest
    assert probe.load(kept[0]).runs.iloc[0]["max_new_tokens"] == 12
    assert "TTFT" in stdout  # the summary is still printed


def test_report_and_compare_out_follow_the_same_rule(cli_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = _cli(["report", str(cli_run), "--out", str(mine)], capsys)
    assert code == 2 and "not a probe report folder" in err
    code, _, err = _cli(["compare", str(cli_run), str(cli_run), "--out", str(mine)], capsys)
    assert code == 2 and "not a probe comparison" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    code, _, err = _cli(["report", str(cli_run), "--format", "html", "--out", "/proc/probe-x/r.html"], capsys)
    assert code == 2 and "cannot be written" in err
    code, _, err = _cli(["report", str(cli_run), "--format", "html", "--out", str(mine)], capsys)
    assert code == 2 and "is a folder" in err
    rep = tmp_path / "rep"
    assert _cli(["report", str(cli_run), "--out", str(rep)], capsys)[0] == 0
    assert _cli(["report", str(cli_run), "--out", str(rep)], capsys)[0] == 0  # its own output: rewritten
    cmp_dir = tmp_path / "cmp"
    assert _cli(["compare", str(cli_run), str(cli_run), "--out", str(cmp_dir)], capsys)[0] == 0
    code, _, err = _cli(["compare", str(cli_run), str(cli_run), "--out", str(cmp_dir)], capsys)
    assert code == 0 and "replacing the comparison" in err


@pytest.mark.parametrize("fmt_", ["html", "trace"])
def test_report_out_never_overwrites_a_users_file_without_force(cli_run, tmp_path, capsys, fmt_):
    """`probe report RUN --format html --out precious.txt` once overwrote any file."""
    precious = tmp_path / "precious.txt"
    precious.write_text("my notes")
    code, _, err = _cli(["report", str(cli_run), "--format", fmt_, "--out", str(precious)], capsys)
    assert code == 2 and "probe did not write" in err and "--force" in err
    assert precious.read_text() == "my notes"
    # through a link to it: refused too, --force or not
    link = tmp_path / "link.html"
    link.symlink_to(precious)
    code, _, err = _cli(["report", str(cli_run), "--format", fmt_, "--out", str(link), "--force"], capsys)
    assert code == 2 and "symbolic link" in err and precious.read_text() == "my notes"
    # a report probe wrote is replaced without --force; a user's file only with it
    mine = tmp_path / f"r.{fmt_}"
    assert _cli(["report", str(cli_run), "--format", fmt_, "--out", str(mine)], capsys)[0] == 0
    code, _, err = _cli(["report", str(cli_run), "--format", fmt_, "--out", str(mine)], capsys)
    assert code == 0 and f"replacing {mine}" in err and "(--force)" not in err
    code, _, err = _cli(["report", str(cli_run), "--format", fmt_, "--out", str(precious), "--force"], capsys)
    assert code == 0 and "(--force)" in err and precious.read_text() != "my notes"


def test_force_never_deletes_a_folder_whose_meta_json_is_not_a_runs(tmp_path, capsys):
    """A folder with some meta.json is not a run: --force does not replace it (and its files stay)."""
    album = tmp_path / "u"
    album.mkdir()
    (album / "meta.json").write_text('{"title": "album"}')
    (album / "photo.jpg").write_bytes(b"img")
    code, _, err = _cli(["run", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--out", str(album), "--force",
                         "--no-report"], capsys)
    assert code == 2 and "not a probe run" in err
    assert sorted(p.name for p in album.iterdir()) == ["meta.json", "photo.jpg"]


def test_sweep_out_refuses_other_folders_and_replaces_a_sweep_only_with_force(tmp_path, capsys):
    args = ["sweep", "--prompt-lens", "4", "--batch-sizes", "1", "--new-tokens", "2", "--repeat", "1", "--warmup", "0"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = _cli([*args, "--out", str(mine)], capsys)
    assert code == 2 and "not a probe sweep" in err and "loading" not in err
    sw = tmp_path / "sw"
    assert _cli([*args, "--out", str(sw)], capsys)[0] == 0
    code, _, err = _cli([*args, "--out", str(sw)], capsys)
    assert code == 2 and "already holds a probe sweep" in err
    code, _, err = _cli([*args, "--out", str(sw), "--force"], capsys)
    assert code == 0 and "replacing the sweep" in err
    assert (sw / "sweep.parquet").is_file()


# --------------------------------------------------------------------------- dashboard root
def test_the_dashboard_box_refuses_folders_outside_its_root(two_runs, tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP, cli_root, streamlit_command

    root = tmp_path / "root"
    shutil.copytree(two_runs[0], root / "a")
    outside = tmp_path / "outside"
    shutil.copytree(two_runs[1], outside / "b")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "runlink").symlink_to(outside / "b", target_is_directory=True)
    monkeypatch.setenv("PROBE_DASHBOARD_ROOT", str(root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["runs_dir"] = str(root)
    at.run()
    assert not at.exception and not at.error
    assert at.sidebar.multiselect(key="runs").options == ["a"]  # the symlinked run leads outside: not read
    for bad in ("/etc", str(root / ".." / "outside"), str(root / "link"), str(root / "a" / ".." / "..")):
        at.sidebar.text_input(key="runs_dir").set_value(bad).run()
        assert not at.exception
        assert any("outside the folder this dashboard may read" in e.value for e in at.error), bad
        assert not at.get("plotly_chart")
    at.sidebar.text_input(key="runs_dir").set_value(str(root / "a")).run()
    assert not at.error and at.get("plotly_chart")
    # `probe dashboard DIR` passes DIR as the root unless --root says otherwise
    cmd = streamlit_command("/x/runs")
    assert cli_root(cmd[cmd.index("--") + 1:]) == "/x/runs"
    cmd = streamlit_command("/x/runs", root="/x")
    assert cli_root(cmd[cmd.index("--") + 1:]) == "/x"


def test_the_dashboard_reads_nothing_a_symlink_inside_a_run_leads_to_outside_its_root(two_runs, tmp_path,
                                                                                      monkeypatch):
    """A run folder inside the root whose rank folder, or one of whose files, is a symlink to
    a place outside it: named with the reason, never read (however deep the link sits)."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from probe.capture.ranks import save_rank
    from probe.dashboards import APP, escapes

    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(two_runs[0], root / "good")
    run = probe.load(two_runs[0])
    save_rank(run, outside / "tp")  # outside/tp/rank0
    (root / "tp").mkdir(parents=True)
    (root / "tp" / "rank0").symlink_to(outside / "tp" / "rank0", target_is_directory=True)
    shutil.copytree(two_runs[1], root / "filelink")
    shutil.copy(root / "filelink" / "calls.parquet", outside / "calls.parquet")
    (root / "filelink" / "calls.parquet").unlink()
    (root / "filelink" / "calls.parquet").symlink_to(outside / "calls.parquet")
    assert escapes(root / "good", root) is None
    assert escapes(root / "tp", root) == str(root / "tp" / "rank0")
    assert escapes(root / "filelink", root) == str(root / "filelink" / "calls.parquet")
    assert escapes(root / "filelink", tmp_path) is None  # a wider root reads it
    # the listing's check, for a folder it found inside the root: what the folder holds still counts
    assert escapes(root / "filelink", root, inside=True) == str(root / "filelink" / "calls.parquet")
    assert escapes(root / "tp", root, inside=True) == str(root / "tp" / "rank0")
    assert escapes(root / "good", root, inside=True) is None
    monkeypatch.setenv("PROBE_DASHBOARD_ROOT", str(root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["runs_dir"] = str(root)
    at.run()
    assert not at.exception
    assert at.sidebar.multiselect(key="runs").options == ["good"]
    errors = " ".join(e.value for e in at.error)
    for name in ("filelink", "tp"):
        assert f"**{name}**" in errors
    assert errors.count("links outside the folder this dashboard may read") == 2



def test_probe_verify_lists_every_problem_where_load_stops_at_the_first(cli_run, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(cli_run, d)
    assert main(["verify", str(d)]) == 0
    assert capsys.readouterr().out.strip() == f"{d}: ok"

    def damage(t: pa.Table) -> pa.Table:
        t = _set("cpu_ms", lambda n: [-1.0] * n)(t)
        t = _with("parent", lambda t: t.column("call"))(t)
        return _set("layer", lambda n: [10**6] * n, pa.int64())(t)

    _rewrite(d, "calls.parquet", damage)
    _rewrite(d, "runs.parquet", _set("total_ms", lambda n: [-5.0] * n))
    with pytest.raises(RunLoadError, match=r"'cpu_ms' has .*\(and 3 more problems\).*probe verify"):
        probe.load(d)
    assert main(["verify", str(d), str(cli_run)]) == 1
    out = capsys.readouterr().out
    assert f"{d}: 4 problems" in out and f"{cli_run}: ok" in out
    for needle in ("'cpu_ms' has", "'total_ms' has", "beyond the model's", "nesting is not a tree"):
        assert needle in out
    assert main(["verify", str(tmp_path / "nothing")]) == 2


def test_calls_of_unknown_steps_are_counted_and_located_exactly():
    """The load looks each stretch of one step's calls up once: the message still counts every
    call of a missing step and names the first of them."""
    import numpy as np
    import pandas as pd

    from probe import rules

    steps = pd.DataFrame({"run_id": ["r"] * 3, "step": [0, 1, 2]})
    calls = pd.DataFrame({"run_id": pd.Categorical(["r"] * 9),  # steps 5, 7 and 5 again are not recorded
                          "step": np.array([0, 0, 5, 5, 5, 1, 7, 2, 5], np.int32)})
    found = rules.link_problems({"calls": calls, "steps": steps, "runs": pd.DataFrame({"run_id": ["r"], "steps": [3]})},
                                {})
    assert found == ["calls.parquet: 5 calls belong to no step of steps.parquet (first at row 2)"]


@pytest.mark.parametrize("name", [n for n, (_, needle) in CORRUPTIONS.items() if needle is not None])
def test_a_large_file_read_in_parts_meets_the_same_error(name, cli_run, tmp_path, monkeypatch):
    """Read one column at a time, the nesting and the rules checked in parts of rows (as a large
    file is: ``probe.parquet_read``), each corruption gives the very error one read gives."""
    from probe import rules
    from probe.analysis import tree
    from probe import parquet_read as reading

    corrupt, needle = CORRUPTIONS[name]
    d = tmp_path / "run"
    shutil.copytree(cli_run, d)
    corrupt(d)
    with pytest.raises(RunLoadError) as whole:
        probe.load(d)
    monkeypatch.setattr(reading, "COLUMNWISE_ROWS", 0)
    monkeypatch.setattr(tree, "PART_ROWS", 2)
    monkeypatch.setattr(rules, "PART_ROWS", 2)
    with pytest.raises(RunLoadError) as parts:
        probe.load(d)
    assert str(parts.value) == str(whole.value)
