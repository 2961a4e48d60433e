"""The store: every file and folder the project writes or reads back, and the ``--out`` rules.

- :mod:`probe.store.files`: atomic file and folder writes (one-step exchange where the OS has
  it), regular-file reads with limits, leftovers of killed writes and their recovery.
- :mod:`probe.store.folders`: what a folder is (a run, only if its manifest says so; ranks).
- :mod:`probe.store.outdir`: where the commands may write (``--out``), and saving a recording
  somewhere safe when its target fails.
"""

from __future__ import annotations

from ..errors import RunSaveError
from .files import (
    META,
    build_folder,
    pid_alive,
    read_regular,
    recover,
    remove_leftovers,
    replace_atomically,
    write_folder,
    write_text,
)
from .folders import is_run_dir, rank_dirs

__all__ = [
    "META",
    "RunSaveError",
    "build_folder",
    "is_run_dir",
    "pid_alive",
    "rank_dirs",
    "read_regular",
    "recover",
    "remove_leftovers",
    "replace_atomically",
    "write_folder",
    "write_text",
]
