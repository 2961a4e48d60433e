"""Files and folders written whole or not at all, read with limits, and what killed writes left.

Every write of the project goes through here: saved runs and sweeps (:func:`write_folder`,
:func:`replace_atomically`), the converted-model cache (:func:`build_folder`), and the report
writers (:func:`replace_atomically`). Readers open only regular files, up to a limit
(:func:`read_regular`).

- A folder is replaced by building the new one beside it under a hidden temporary name and
  exchanging the two in one step (``renameat2(RENAME_EXCHANGE)`` on Linux): a reader, a crash or
  a ``kill -9`` finds the old folder or the new one, never neither and never a mix. Where the
  OS has no exchange, the old folder is renamed away first; a load that then finds no folder
  recovers the complete one left beside it (:func:`recover`).
- Leftovers are named ``.NAME.PID.<random>.tmp`` (a build) or ``.trash`` (an old folder being
  removed); those of a dead process are removed by the next write (:func:`remove_leftovers`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import MANIFEST, RunLoadError

META = "meta.json"
#: largest meta.json read (a larger one is not a run's)
MAX_META_BYTES = 64 << 20
TMP = ".tmp"
TRASH = ".trash"


def reason(exc: BaseException) -> str:
    """The human part of an exception: ``No space left on device``, not its repr."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def user_cache_dir() -> Path:
    """probe's folder in the user cache: ``$XDG_CACHE_HOME/probe`` (``~/.cache/probe``); a relative
    ``$XDG_CACHE_HOME`` is ignored, as the XDG spec says."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "probe"


# --------------------------------------------------------------------------- reading
def open_regular(f: Path, what: str | None = None, limit: int | None = None) -> BinaryIO:
    """``f`` opened for reading in binary, which must be a regular file (a FIFO, a device or a
    folder by that name is refused at once, never waited on) of at most ``limit`` bytes.

    Raises:
        RunLoadError: ``f`` is missing, not a regular file, larger than ``limit``, or unreadable.
    """
    label = what or str(f)
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RunLoadError(f"{label} is missing: the run is incomplete (was the recording interrupted?)") from None
    except OSError as exc:
        raise RunLoadError(f"{label} cannot be opened: {reason(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunLoadError(f"{label} is not a regular file (a FIFO, device or folder by that name); "
                               "a run holds only ordinary files")
        if limit is not None and st.st_size > limit:
            raise RunLoadError(f"{label} is {st.st_size:,} bytes, more than a run's {limit:,}: not a probe file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(f: Path, what: str | None = None, limit: int | None = None) -> bytes:
    """The bytes of ``f``, which must be a regular file (see :func:`open_regular`).

    Raises:
        RunLoadError: ``f`` is missing, not a regular file, larger than ``limit``, or unreadable.
    """
    with open_regular(f, what, limit) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise RunLoadError(f"{what or f} cannot be read: {reason(exc)}") from exc


def read_meta(folder: Path) -> dict | None:
    """``folder/meta.json`` as a dict, or ``None`` where it is missing, not a regular file, too
    large or not a JSON object."""
    try:
        meta = json.loads(read_regular(folder / META, limit=MAX_META_BYTES).decode("utf-8"))
    except (RunLoadError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def is_run_meta(meta: dict | None) -> bool:
    """A probe run's ``meta.json``: a schema version and a manifest of its files."""
    return isinstance(meta, dict) and "schema_version" in meta and isinstance(meta.get(MANIFEST), dict)


# --------------------------------------------------------------------------- writing
def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomically(target: Path, write: Callable[[str], None]) -> None:
    """Write ``target`` whole or not at all: ``write(tmp)`` fills a temporary file beside it, which
    then replaces it (a crash leaves the old file, and a ``.tmp`` leftover that is cleaned later)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; written files get ordinary permissions
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file (``\n`` line ends) whole or not at all (see :func:`replace_atomically`)."""
    replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; ``False`` where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def temp_beside(out: Path) -> Path:
    """A new hidden folder beside ``out`` for building its replacement (``OSError`` where the
    parent cannot be written)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP, dir=out.parent))


def write_folder(out: Path, blobs: dict[str, bytes], tmp: Path | None = None) -> None:
    """Make ``out`` hold exactly ``blobs`` (name -> bytes, written in order: put the file that
    marks the folder complete last), replacing what ``out`` held in one step.

    Args:
        out: the folder.
        blobs: its files.
        tmp: a folder from :func:`temp_beside` to build in (made here if not given).
    Raises:
        OSError: the folder cannot be written (nothing of the new one is left behind).
    """
    tmp = tmp or temp_beside(out)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved folder gets ordinary permissions
        for name, data in blobs.items():
            _write(tmp / name, data)
        try:
            os.rename(tmp, out)  # nothing there yet
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
        if exchange(tmp, out):  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TRASH}"
        os.rename(out, trash)  # no exchange here: a load in between recovers one of the two
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(trash, out)  # put the old folder back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_in_place(out: Path, blobs: dict[str, bytes], marker: str = META) -> None:
    """Replace the files inside ``out`` one by one (where no folder can be made beside it): the
    ``marker`` file is removed first and written last, so an interrupted write leaves an
    incomplete folder that readers name, never a mixed one."""
    out.mkdir(exist_ok=True)
    try:
        (out / marker).unlink()
    except FileNotFoundError:
        pass
    for name, data in blobs.items():
        replace_atomically(out / name, lambda tmp, data=data: Path(tmp).write_bytes(data))


def build_folder(final: Path, build: Callable[[Path], None], *, replace: bool = False,
                 complete: Callable[[Path], bool] = lambda p: p.is_dir()) -> Path:
    """Run ``build(tmp)`` into a temporary folder beside ``final`` and move it into place.

    A build that raises (or a process killed mid-way) leaves no ``final`` and no temporary
    folder behind (a dead process's is removed by the next build). If another process finished
    ``final`` first, its folder is kept and ours dropped, unless ``replace`` is true.

    Args:
        final: the folder to create.
        build: writes the folder's files into the path it is given.
        replace: replace an existing ``final`` (in one step where the OS can).
        complete: whether a folder another process finished is whole (its marker file exists).
    Returns:
        ``final``.
    """
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = temp_beside(final)
    try:
        build(tmp)
        if replace and final.exists():
            if exchange(tmp, final):
                return final
            old = root / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TRASH}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- leftovers
def _leftovers_beside(out: Path) -> list[tuple[os.DirEntry, int]]:
    """``(entry, pid)`` of the hidden ``.NAME.PID.*.tmp|.trash`` entries beside ``out``."""
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(f".{out.name}.")]
    except OSError:
        return []
    found = []
    for e in entries:
        pid = e.name[len(out.name) + 2:].split(".", 1)[0]
        if (e.name.endswith(TMP) or e.name.endswith(TRASH)) and pid.isascii() and pid.isdigit():
            found.append((e, int(pid)))
    return found


def remove_leftovers(out: Path, min_age_s: float = 0.0, inside: tuple[str, ...] = ()) -> list[Path]:
    """Remove what killed writes of ``out`` left: hidden ``.NAME.PID.*.tmp`` / ``.trash`` entries
    beside it whose process is gone, and ``.FILE.*.tmp`` files inside it (for the file names in
    ``inside``) older than ``min_age_s``. Errors are ignored (a read-only place stays as it is).
    Returns what was removed."""
    import time

    removed: list[Path] = []
    for e, pid in _leftovers_beside(out):
        if pid_alive(pid):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    if not inside:
        return removed
    now = time.time()
    names = tuple(f".{n}." for n in inside)
    try:
        found = [e for e in os.scandir(out) if e.name.startswith(names) and e.name.endswith(TMP)]
    except OSError:
        found = []
    for e in found:
        try:
            if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime >= min_age_s:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def recover(out: Path) -> Path | None:
    """Where ``out`` is missing because a write was killed between its two renames (a system
    without an exchange), move the complete folder that write left beside it into place: the new
    one if it was finished (its ``meta.json`` written last), else the old one. Returns the folder
    recovered, or ``None``."""
    if os.path.lexists(out):
        return None
    dead = [(e, pid) for e, pid in _leftovers_beside(out) if not pid_alive(pid) and e.is_dir(follow_symlinks=False)]
    new = [e for e, _ in dead if e.name.endswith(TMP) and is_run_meta(read_meta(Path(e.path)))]
    old = [e for e, _ in dead if e.name.endswith(TRASH) and is_run_meta(read_meta(Path(e.path)))]
    for e in new + old:
        try:
            os.rename(e.path, out)
            return out
        except OSError:
            continue
    return None


def leftover_hint(out: Path) -> str:
    """Where an interrupted write left the folder that should be at ``out``, if it did."""
    left = sorted(e.name for e, _ in _leftovers_beside(out) if e.is_dir(follow_symlinks=False))
    if not left:
        return ""
    return (f" (an interrupted save left {', '.join(str(out.parent / n) for n in left)}: the run being replaced "
            "is in the .trash folder, the new one, if complete, in the .tmp folder)")
