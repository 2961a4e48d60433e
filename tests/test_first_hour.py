"""What a new user meets in the first hour: the README's snippet, ``--help``, bad input at the
command line, the same numbers in the same units everywhere, the dashboard's server lifecycle,
the package's contents."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

import probe
from probe import cli, fmt
from tiny import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def _probe(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python -m probe ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "probe", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **kw)


def _record(model, n_prompt: int = 5, new: int = 4, depth: str = "blocks", model_id: str | None = None) -> probe.Run:
    ids = torch.randint(3, 90, (1, n_prompt), generator=torch.Generator().manual_seed(1))
    with probe.attach(model, depth=depth, model_id=model_id) as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return p.run


# --------------------------------------------------------------------------- README, import probe
def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python\n"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "probe.models.load_bundled()" in snippet and "probe.attach(model)" in snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    run = scope["p"].run
    assert (run.runs["status"] == "ok").all() and int(run.runs["new_tokens"].iloc[0]) >= 1
    back = probe.load(tmp_path / "probe-runs" / "python")
    pd.testing.assert_frame_equal(back.steps, run.steps)


def test_probe_models_is_an_attribute_of_probe_without_importing_transformers():
    code = ("import sys, probe; assert 'transformers' not in sys.modules and 'probe.models' not in sys.modules; "
            "m = probe.models; assert callable(m.load_bundled) and m.BUNDLED_ID == 'probe-tiny-llama-32l'; "
            "assert 'transformers' not in sys.modules; assert callable(probe.fmt.ms); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe.nope  # noqa: B018


def test_bundled_model_has_the_same_model_id_from_python_as_from_the_cli():
    model, _ = probe.models.load_bundled(num_hidden_layers=2)
    run = _record(model)
    assert run.runs["model_id"].iloc[0] == probe.models.BUNDLED_ID == "probe-tiny-llama-32l"
    preset = probe.models.build_preset("tiny", dtype="float32", num_hidden_layers=1)
    assert preset.config.name_or_path == "preset:tiny"  # as `probe run --preset tiny` names it


# --------------------------------------------------------------------------- --help
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    parser = cli.build_parser()
    subs = _subcommands(parser)
    assert set(subs) >= {"run", "report", "compare", "dashboard", "sweep", "shapes", "verify"}
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            label = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and len(action.help) > 10, f"probe {name} {label} has no help"
            default = action.default
            if default is None or default is False:
                continue
            # argparse wraps lines: compare with whitespace collapsed
            flat = " ".join(text.split())
            assert f"default: {default}" in flat or f"default: {default!r}" in flat, (name, label, default)


def test_help_shows_the_defaults_a_user_asked_about():
    flat = {n: " ".join(s.format_help().split()) for n, s in _subcommands(cli.build_parser()).items()}
    assert "(default: 32)" in flat["run"] and "--top-k TOP_K sample from the K most likely" in flat["run"]
    assert "(default: 8501)" in flat["dashboard"] and "(default: all)" in flat["report"]
    assert "(default: 16,64,256,1024)" in flat["sweep"] and "(default: 3)" in flat["sweep"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_dashboard_port_out_of_range_is_a_clear_error(port):
    out = _probe("dashboard", "/nonexistent", "--port", port)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "1-65535" in out.stderr and "--port" in out.stderr


@pytest.mark.parametrize("args", [["--prompt", ""], ["--prompt", " \n\t "]])
def test_an_empty_prompt_is_refused_before_loading_anything(args):
    out = _probe("run", *args, "--out", "/nonexistent/never-written")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "prompt is empty" in out.stderr and "--prompt" in out.stderr
    assert "loading" not in out.stderr  # refused up front: no model was built


def test_an_empty_prompt_file_and_an_empty_shapes_prompt_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    out = _probe("run", "--prompt-file", str(empty))
    assert out.returncode == 2 and str(empty) in out.stderr and "is empty" in out.stderr
    out = _probe("shapes", "--prompt", "")
    assert out.returncode == 2 and "is empty" in out.stderr and "Traceback" not in out.stderr


def test_shapes_states_the_presets_vocabulary_and_where_it_comes_from(capsys):
    assert cli.main(["shapes", "--preset", "chinese-llama-2-7b", "--prompt-tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 40,076" in out and "Linly-AI/Chinese-LLaMA-2-7B-hf" in out
    assert "[1, 7, 40076]" in out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "40,076" in readme and "Linly-AI/Chinese-LLaMA-2-7B-hf" in readme


# --------------------------------------------------------------------------- one format everywhere
def test_formats():
    assert [fmt.ms(v) for v in (1418.6, 14.912, 4.2347, 0.69, 0.0515)] == ["1,418.6", "14.91", "4.235", "0.690",
                                                                          "0.0515"]
    assert fmt.ms(2.5, unit=True) == "2.500 ms" and fmt.ms(None) == fmt.ms(float("nan")) == fmt.ms(pd.NA) == ""
    assert [fmt.nbytes(v) for v in (512, 2048, 425_984, 13.6e9)] == ["512 B", "2.00 KiB", "416.0 KiB", "12.7 GiB"]
    assert fmt.pct(0.984) == "98.4%" and fmt.pct(2e-4) == "0.02%" and fmt.pct(7.2e-7) == "< 0.01%"
    assert fmt.pct(0) == "0.0%" and "e" not in fmt.pct(1e-12)
    assert fmt.table([["a", "1"], ["long name", "22"]], ["x", "n"]) == ["x           n", "a           1", "long name  22"]
    assert [fmt.tok_s(v) for v in (0.62, 8.017, 37.51, 1234.4)] == ["0.62", "8.02", "37.5", "1,234"]
    assert fmt.index_set(range(32)) == "{0..31}" and fmt.index_set([0, 1, 2, 4, 6, 7]) == "{0..2,4,6..7}"
    assert fmt.cell("kv_cache_bytes", 425_984) == "416.0 KiB" and fmt.cell("layer", pd.NA) == ""
    assert fmt.cell("share", 0.5) == "50.0%" and fmt.cell("prefill_tok_s", 0.6) == "0.60"


def test_jupyter_view_has_units_and_no_na_or_nan():
    run = _record(tiny_llama(layers=2))
    page = run._repr_html_()
    for bad in ("&lt;NA&gt;", "<NA>", "NaN", "nan<", "2,048.000"):
        assert bad not in page, bad
    assert "%</td>" in page and "KiB</td>" in page or " B</td>" in page
    assert "gpu_total_ms" not in page  # a CPU run has no GPU time: the empty column is left out
    summ = run.summary(by="role")
    assert f"<td>{fmt.pct(summ['share'].iloc[0])}</td>" in page


def test_terminal_and_report_print_the_same_throughput_and_kv_cache():
    from probe.reports.html import render_report

    run = _record(tiny_llama(layers=2))
    r = run.runs.iloc[0]
    from probe.reports.terminal import run_summary

    text = run_summary(run)
    page = render_report(run)
    for value in (fmt.tok_s(r["prefill_tok_s"]), fmt.tok_s(r["decode_tok_s"]), fmt.nbytes(r["kv_cache_bytes"]),
                  fmt.ms(r["ttft_ms"])):
        assert value and value in text and f">{value}<" in page, value
    # a CPU run: the blank peak memory is explained next to the headline
    assert "blank for a run on the CPU" in page


def test_terminal_says_the_bundled_models_text_is_meaningless(tmp_path, capsys):
    code = cli.main(["run", "tiny", "--prompt", "我喜欢攀岩", "--max-new-tokens", "2", "--out", str(tmp_path / "r"),
                     "--no-report"])
    out = capsys.readouterr().out
    assert code == 0
    generated = out.index("generated  ")
    note = out.index("random weights: its text is meaningless")
    assert generated < note < out.index("run saved to")  # said right below the text it is about


def test_shape_walkthrough_folds_identical_layers_at_every_depth():
    from probe.reports import figures

    run = _record(tiny_llama(layers=3), depth="all")
    walk = figures.shape_walkthrough(run.calls)
    mods = list(walk["module"])
    assert "model.layers.{0..2}" in mods and "model.layers.{0..2}.self_attn.q_proj" in mods
    assert not any(re.search(r"\.layers\.\d", m) for m in mods)
    full = figures.shape_walkthrough(run.calls, collapse=False)
    assert len(full) > len(walk) and "model.layers.1.mlp" in set(full["module"])
    # every folded row stands for layers of identical shapes
    for _, row in walk[walk["module"].str.contains(r"\{0\.\.2\}", regex=True)].iterrows():
        pattern = re.escape(row["module"]).replace(r"\{0\.\.2\}", r"\d+")
        same = full[(full["phase"] == row["phase"]) & full["module"].str.fullmatch(pattern)]
        assert len(same) == 3 and set(same["in_shapes"]) == {row["in_shapes"]}


# --------------------------------------------------------------------------- dashboard server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_sigterm_to_probe_dashboard_stops_the_streamlit_server(tmp_path):
    pytest.importorskip("streamlit")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "probe", "dashboard", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    server: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.3)
        server = _children(proc.pid)
        assert server and all(_alive(c) for c in server)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(c) for c in server), "the Streamlit server outlived `probe dashboard`"
    finally:  # never leave a server behind, whatever the assertions said
        for pid in [proc.pid, *server]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


def test_dashboard_opens_on_the_newest_top_level_run_not_a_sweeps_config(tmp_path):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from probe.dashboards import APP, data
    from test_dashboard import record_sweep

    model = tiny_llama(layers=2)
    for name, when in (("older", 1_000_000), ("newer", 2_000_000)):
        run_dir = _record(model).save(tmp_path / name)
        os.utime(run_dir / "meta.json", (when, when))
    record_sweep(tmp_path / "zz-sweep")  # written last, and its configs sort after every run
    found = data.discover(tmp_path)
    names = list(found.runs)
    assert names[-1].startswith("zz-sweep/runs/")
    assert data.newest(found, names) == "newer"
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["runs_dir"] = str(tmp_path)
    at.run()
    assert not at.exception and at.sidebar.multiselect(key="runs").value == ["newer"]


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_dashboard_bad_host_is_an_exit_2_message(host, tmp_path, capsys):
    code = cli.main(["dashboard", str(tmp_path), "--host", host, "--port", "8501"])
    err = capsys.readouterr().err
    assert code == 2 and f"--host {host}" in err and "Traceback" not in err
