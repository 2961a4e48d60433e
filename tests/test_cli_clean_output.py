"""Every subcommand, run as a user runs it (a real process), prints no traceback.

A thread that dies inside ``probe run`` (the progress display once read a private attribute
that had moved) prints ``Exception in thread ...`` to stderr and the command still exits 0:
only reading the whole output catches it. Each command here runs on the bundled model in a
subprocess, piped and under a pseudo-terminal, and its output is read for ``Traceback`` and
``Exception in thread``.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe.cli import PROGRESS_ENV
from probe import compat

ROOT = Path(__file__).resolve().parents[1]
BAD = ("Traceback", "Exception in thread", "Error in sys.excepthook")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PROBE_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                PROGRESS_ENV: "0.001"}, **extra)
    return env


def _clean(text: str, what: str) -> None:
    for bad in BAD:
        assert bad not in text, f"{what} printed {bad!r}:\n{text}"


def _in_pty(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; (exit status, everything it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=_env(),
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_probe_run_in_a_terminal_shows_step_progress_and_no_traceback(tmp_path):
    code, text = _in_pty([sys.executable, "-m", "probe", "run", "--prompt", "我喜欢攀岩", "--max-new-tokens", "24",
                          "--out", str(tmp_path / "r"), "--no-report"])
    assert code == 0, text
    _clean(text, "probe run (terminal)")
    # the progress line is redrawn in place with the step count read from the probe
    assert "\rgenerating: step " in text, text
    steps = [int(part.split("/")[0]) for part in text.split("generating: step ")[1:]]
    assert steps and max(steps) <= 24 and all(b >= a for a, b in zip(steps, steps[1:]))


GAP = compat.continuous_batching_gap()


def test_every_subcommand_piped_prints_no_traceback(tmp_path):
    """run, report, compare, sweep, serve-bench, shapes, verify and dashboard, one process each, output piped."""
    a, b = tmp_path / "a", tmp_path / "b"
    commands = [
        ["run", "--prompt", "hi there", "--max-new-tokens", "12", "--out", str(a)],
        ["run", "--prompt", "hi there", "--max-new-tokens", "12", "--out", str(b), "--depth", "all", "--no-report"],
        ["report", str(b), "--format", "all"],
        ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")],
        ["sweep", "--prompt-lens", "4,8", "--batch-sizes", "1", "--new-tokens", "3", "--repeat", "1",
         "--out", str(tmp_path / "sweep")],
        ["serve-bench", "--requests", "3", "--rate", "inf", "--prompt-lens", "4", "--max-new-tokens", "3",
         "--out", str(tmp_path / "serve"), "--no-report"],
        ["shapes", "--preset", "llama-2-7b", "--prompt-tokens", "7"],
        ["verify", str(a), str(b)],
        ["--help"],
    ]
    for args in commands:
        proc = subprocess.run([sys.executable, "-m", "probe", *args], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=600)
        text = proc.stdout + proc.stderr
        if args[0] == "serve-bench" and GAP is not None:  # a transformers without the manager: a clear refusal
            assert proc.returncode == 2 and "continuous batching" in text, text
            _clean(text, "probe serve-bench")
            continue
        assert proc.returncode == 0, f"probe {' '.join(args)} exited {proc.returncode}:\n{text}"
        _clean(text, f"probe {' '.join(args)}")
        if args[0] == "run":
            # piped, the progress prints whole lines (no carriage returns in a log file)
            assert "generating: step " in proc.stderr and "\r" not in proc.stderr


def test_probe_run_deep_prints_none_of_the_profilers_own_lines(tmp_path):
    """The deep pass profiles twin steps with torch.profiler, whose C++ prints a line at each start
    and stop in this build: none reaches the output, and the steps say they were timed so."""
    import json

    from probe.recording.deep_twin import TWIN_AFTER

    out = tmp_path / "r"
    new = str(TWIN_AFTER + 2)  # the decode sample (step 1) has its twin, the last step
    proc = subprocess.run([sys.executable, "-m", "probe", "run", "--prompt", "hi there", "--max-new-tokens", new,
                           "--deep", "--out", str(out), "--no-report"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    _clean(text, "probe run --deep")
    for line in ("USDT", "profiler_start", "profiler_stop", "SyncActivityProfilerHandler"):
        assert line not in text, text
    clock = json.loads((out / "meta.json").read_text())["deep"]["op_clock"]
    assert clock["prefill"]["method"] == clock["decode"]["method"] == "profiler twin"


def test_probe_dashboard_serves_and_stops_without_a_traceback(tmp_path):
    from browser import dashboard_server

    log = tmp_path / "dashboard.log"
    subprocess.run([sys.executable, "-m", "probe", "run", "--max-new-tokens", "3", "--out", str(tmp_path / "runs" / "r"),
                    "--no-report"], cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    import urllib.request

    with dashboard_server(tmp_path / "runs", log) as url:
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200
    _clean(log.read_text(), "probe dashboard")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["report", "--help"], ["compare", "--help"],
                                  ["dashboard", "--help"], ["sweep", "--help"], ["serve-bench", "--help"],
                                  ["shapes", "--help"], ["verify", "--help"]])
def test_help_imports_no_torch(args):
    """``probe --help`` answers in well under a second: no torch, transformers or pandas behind it."""
    code = ("import sys; from probe.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'pandas', 'pyarrow', 'plotly', 'streamlit') "
            "if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert "usage: probe" in proc.stdout, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr
