"""Debian's Chromium and a served dashboard, for the tests that drive the real browser."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def launch(pw):
    """Headless Chromium from a ``sync_playwright()`` context."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard_server(root: Path, log_path: Path) -> Iterator[str]:
    """``python -m probe dashboard ROOT --port P`` for the block; yields its URL once Streamlit
    answers its health check (fails the test, with the server's log, if it does not in 90 s).
    The server and its Streamlit child are stopped together on every path."""
    port = free_port()
    with open(log_path, "w") as log:
        # a session of its own: the teardown can stop `probe dashboard` and its Streamlit child together
        proc = subprocess.Popen([sys.executable, "-m", "probe", "dashboard", str(root), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the dashboard did not come up (exit {proc.poll()}):\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()  # `probe dashboard` forwards SIGTERM to the server and waits for it
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (a server that ignored SIGTERM) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
