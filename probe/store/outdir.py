"""Where the commands write: one rule for every ``--out``.

- Before any model is loaded, the target is checked by creating and removing a real file in it
  (folders that had to be made for the check are removed again), so ``/proc/x``, a read-only
  place or a path that is not UTF-8 text is refused before minutes of profiling.
- A folder that exists and holds files is written only if it is what the command writes (a
  probe run for ``probe run``, a sweep for ``probe sweep``, a report or comparison for
  ``probe report`` / ``probe compare``). An existing run or sweep is replaced only with
  ``--force``, and the command says so.
- A save that fails after profiling (disk full, the folder gone) keeps the recording in a new
  folder under the system's temporary directory and names it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..errors import RunSaveError
from .folders import SWEEP_FILE, is_run_dir

#: what each kind of output folder may already hold without being refused
REPORT_FILES = frozenset({"report.html", "trace.json", "csv"})
#: written by ``probe compare`` beside its report: which runs it compared, and when (the dashboard lists it)
COMPARE_META = "compare.json"
COMPARE_FILES = frozenset({"compare.html", "compare.csv", "significance.csv", "gate.json", COMPARE_META})


#: what marks a file as written by probe (an existing one may be replaced without --force): the
#: HTML pages' generator meta tag, the Chrome trace's producer
GENERATOR_META = '<meta name="generator" content="probe">'
_MARKERS = (GENERATOR_META.encode(), b'"producer":"probe"', b'"producer": "probe"')


def written_by_probe(path: Path) -> bool:
    """Whether the regular file ``path`` carries probe's marker in its first 64 KiB."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 << 10)
    except OSError:
        return False
    return any(m in head for m in _MARKERS)


class OutError(ValueError):
    """An ``--out`` that cannot be used, with what to do instead."""


def shown(path: os.PathLike | str) -> str:
    """``path`` as printable text (a byte that is not UTF-8 shown as ``\\xNN``)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def _entries(d: Path) -> list[str]:
    try:
        return sorted(e for e in os.listdir(d) if not (e.startswith(".") and e.endswith((".tmp", ".trash"))))
    except OSError as exc:
        raise OutError(f"--out {shown(d)}: cannot read the folder: {exc.strerror or exc}") from exc


def _list(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_out(path: Path, kind: str, *, force: bool = False, is_file: bool = False) -> str | None:
    """Check ``path`` as the ``--out`` of a command before any work is done.

    Args:
        path: the target folder (or file, with ``is_file``).
        kind: ``"run"``, ``"sweep"``, ``"report"`` or ``"compare"``: what will be written.
        force: replace an existing run or sweep.
        is_file: ``path`` is a file to write (``probe report --format html --out F``).
    Returns:
        A note to print (an existing output being replaced), or None.
    Raises:
        OutError: the target cannot be used; the message says why and what to do.
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutError(f"--out {shown(path)} is not valid UTF-8 text; choose a path of UTF-8 characters") from None
    note = None
    folder = path.parent if is_file else path
    if is_file and path.is_symlink():
        raise OutError(f"--out {shown(path)} is a symbolic link; give the file itself (probe never writes "
                       "through a link onto a file it did not make)")
    if is_file and path.exists():
        if path.is_dir():
            raise OutError(f"--out {shown(path)} is a folder; give the file to write, e.g. {shown(path / 'report.html')}")
        if not path.is_file():
            raise OutError(f"--out {shown(path)} is not a regular file; choose another path")
        if not written_by_probe(path) and not force:
            raise OutError(f"--out {shown(path)} is an existing file that probe did not write; choose another "
                           "path, or pass --force to replace it")
        note = f"replacing {shown(path)}" + ("" if written_by_probe(path) else " (--force)")
    elif not is_file and path.exists():
        if not path.is_dir():
            raise OutError(f"--out {shown(path)} is a file, not a folder; choose a folder")
        note = _check_existing(path, kind, force)
    _probe_write(folder, path)
    return note


def _check_existing(path: Path, kind: str, force: bool) -> str | None:
    names = _entries(path)
    if not names:
        return None

    if kind == "run" and is_run_dir(path):
        if not force:
            raise OutError(f"--out {shown(path)} already holds a probe run; pass --force to replace it (its "
                           "reports too), or choose another --out")
        return f"replacing the run in {shown(path)} (--force)"
    if kind == "sweep" and (path / SWEEP_FILE).is_file():
        if not force:
            raise OutError(f"--out {shown(path)} already holds a probe sweep; pass --force to replace it, or "
                           "choose another --out")
        return f"replacing the sweep in {shown(path)} (--force)"
    if kind == "report" and (set(names) <= REPORT_FILES or is_run_dir(path)):
        return None
    if kind == "compare" and set(names) <= COMPARE_FILES:
        return f"replacing the comparison in {shown(path)}"
    what = {"run": "a probe run", "sweep": "a probe sweep", "report": "a probe report folder",
            "compare": "a probe comparison"}[kind]
    if kind == "run" and (path / SWEEP_FILE).is_file():
        what += " (it holds a sweep)"
    raise OutError(f"--out {shown(path)} exists and is not {what} (it holds {_list(names)}); choose a new or empty "
                   "folder")


def _probe_write(folder: Path, out: Path) -> None:
    """Create (and remove) a real file in ``folder``, making the folders it needs and removing
    those again."""
    made: list[Path] = []
    d = folder
    missing = []
    while not d.exists() and not d.is_symlink():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if d.exists() and not d.is_dir():
        raise OutError(f"--out {shown(out)}: {shown(d)} is a file, not a folder; choose a folder")
    try:
        for m in reversed(missing):
            m.mkdir()
            made.append(m)
        fd, tmp = tempfile.mkstemp(prefix=".probe-write-check.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        where = f" ({shown(exc.filename)})" if getattr(exc, "filename", None) else ""
        raise OutError(f"--out {shown(out)} cannot be written: {exc.strerror or exc}{where}; choose a writable "
                       "place") from exc
    finally:
        for m in reversed(made):
            try:
                m.rmdir()
            except OSError:
                pass


def fallback_dir(kind: str = "run") -> Path:
    """A new folder name under the system's temporary directory for a recording that could not
    be saved where asked."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"probe-unsaved-{kind}-{stamp}-{os.getpid()}"


def save_run(run, out: Path):
    """Save ``run`` to ``out``; when that fails, to :func:`fallback_dir`.

    Returns:
        ``(saved folder, None)``, or ``(fallback folder or None, message)`` when ``out`` failed:
        the message names the reason and where the recording is (or that it is lost).
    """
    try:
        return run.save(out), None
    except (OSError, RunSaveError) as exc:
        reason = _why(exc)
    spare = fallback_dir()
    try:
        run.save(spare)
    except Exception as exc2:  # noqa: BLE001 - nothing more can be done: say so
        return None, (f"cannot save the run to {shown(out)}: {reason}; saving it to {shown(spare)} failed too "
                      f"({_why(exc2)}): the recording is lost")
    return spare, (f"cannot save the run to {shown(out)}: {reason}. The recording is kept in {shown(spare)} "
                   f"(move it with `mv {shown(spare)} NEW_PLACE`; `probe report {shown(spare)}` writes its reports)")


def _why(exc: BaseException) -> str:
    """The reason a save failed, once (a RunSaveError's message already names the folder)."""
    if isinstance(exc, RunSaveError):
        return getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({shown(exc.filename)})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


__all__ = ["OutError", "check_out", "fallback_dir", "save_run", "shown"]
