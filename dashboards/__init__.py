"""The Streamlit dashboard over a folder of saved probe runs.

``probe dashboard RUNS_DIR`` calls :func:`launch`, which starts ``streamlit run`` on
``dashboards/app.py``. The app reads runs with :func:`probe.load` and draws them with the
figure builders of ``probe.reports.figures``; it never touches a model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")

DEFAULT_RUNS_DIR = "probe-runs"

__all__ = ["APP", "cli_root", "cli_runs_dir", "launch", "streamlit_command"]


def cli_runs_dir(argv: list[str] | None = None) -> str:
    """The runs folder the app starts on: ``--runs-dir`` after the ``--`` of the command
    :func:`streamlit_command` builds, else ``$PROBE_RUNS_DIR``, else ``probe-runs``.

    Args:
        argv: the script's arguments (default ``sys.argv[1:]``, which Streamlit sets to
            what follows ``--``).
    """
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--runs-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--runs-dir="):
            return arg.split("=", 1)[1]
    return os.environ.get("PROBE_RUNS_DIR", DEFAULT_RUNS_DIR)


def cli_root(argv: list[str] | None = None) -> str:
    """The folder outside which the app's "Runs folder" box refuses to look: ``--root`` after
    the ``--`` of :func:`streamlit_command`, else ``$PROBE_DASHBOARD_ROOT``, else the runs folder
    the app starts on (:func:`cli_runs_dir`)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--root" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--root="):
            return arg.split("=", 1)[1]
    return os.environ.get("PROBE_DASHBOARD_ROOT") or cli_runs_dir(argv)


def within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """``path`` is ``root`` or below it, after ``~``, ``..`` and every symlink are resolved."""
    return _below(Path(path).expanduser().resolve(), Path(root).expanduser().resolve())


def _below(path: Path, root: Path) -> bool:
    """Resolved ``path`` is resolved ``root`` or below it."""
    return path == root or root in path.parents


def escapes(run_dir: str | os.PathLike, root: str | os.PathLike, *, inside: bool = False) -> str | None:
    """The first path a load of ``run_dir`` would read that leads outside ``root`` through a
    symlink — the run folder itself, a file in it, a ``rank<N>`` folder or a file in one — or
    ``None`` when everything stays inside. Only symlinks are resolved (one ``lstat`` per entry).
    ``inside``: the caller found ``run_dir`` itself inside ``root`` already (the dashboard's
    listing, for each of its runs: then only what the folder holds is checked, and ``root`` is
    resolved only where an entry is a symlink)."""
    top = Path(run_dir).expanduser()
    if not inside and not within(top, root):
        return str(top)
    todo = [top]
    held: Path | None = None  # root, resolved once, where a symlink is met
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue  # the load names an unreadable folder itself
        for e in entries:
            if not e.is_symlink():
                continue
            held = held or Path(root).expanduser().resolve()
            if not _below(Path(e.path).resolve(), held):
                return e.path
            if d == top and e.name.startswith("rank") and e.is_dir():
                todo.append(Path(e.path))
    return None


def streamlit_command(runs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8501,
                      root: str | os.PathLike | None = None) -> list[str]:
    """The ``python -m streamlit run`` command line :func:`launch` executes (``root`` defaults
    to ``runs_dir``)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", str(host),
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",  # no "Deploy" button on a local profiling tool
        # the app is not being edited: without this, any change to a file on PYTHONPATH (the
        # repository root in a source checkout) puts a "File change. Rerun" banner on the page
        "--server.fileWatcherType", "none",
        "--", "--runs-dir", str(runs_dir), "--root", str(runs_dir if root is None else root),
    ]


def launch(runs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8501,
           root: str | os.PathLike | None = None) -> int:
    """Serve the dashboard over ``runs_dir`` until interrupted.

    Args:
        runs_dir: folder of run directories (each written by ``probe run --out``), or one run.
        root: the page's "Runs folder" box refuses folders outside this one (symlinks and
            ``..`` resolved); default ``runs_dir``.
        host: address to bind; the default keeps the dashboard on this machine. Pass
            ``0.0.0.0`` only on a trusted network: the app lists and reads folders on disk.
        port: TCP port.

    Returns:
        The Streamlit process's exit code (0 after Ctrl-C).
    """
    from probe import deps

    deps.require("the dashboard", "streamlit", "plotly")
    # the app's own folder goes first on sys.path under `streamlit run`; make the folder that holds
    # the probe package importable too (a source checkout's root; an install's site-packages)
    import probe

    env = dict(os.environ)
    home = str(Path(probe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = home + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(streamlit_command(runs_dir, host, port, root=root), env=env,
                            preexec_fn=_die_with_parent if os.name == "posix" else None)
    got: list[int] = []

    def forward(signum, _frame) -> None:
        # a service manager, `kill` or a test teardown stops this process: stop the server
        # too, or it lives on, reparented to PID 1, holding the port
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    stops = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig is not None]
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        rc = proc.wait()
        return 128 + got[0] if got and rc != 0 else rc
    except KeyboardInterrupt:
        # Streamlit got the same SIGINT from the terminal; give it a moment to shut down
        try:
            proc.wait(timeout=10)
            return 0
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # any other way out of here: never leave the server behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """In the server process before it starts (Linux): have the kernel send it SIGTERM when the
    ``probe dashboard`` process dies, even by SIGKILL, which no handler can forward."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc/musl: forwarding still covers SIGTERM/SIGHUP
        pass
