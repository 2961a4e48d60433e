"""Hand edits of a saved run, as a user (or an attacker) would make them: the files changed and
the manifest in ``meta.json`` rewritten to match, so that what :func:`probe.load` checks beyond the
manifest (the columns' rules, the nesting) is what decides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def copy_run(src: Path, dst: Path) -> Path:
    """The files of the run folder ``src`` copied into a new folder ``dst`` (subfolders left out)."""
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def reseal(run_dir: Path, forget: tuple[str, ...] = (), **meta_changes) -> None:
    """Rewrite the manifest of ``run_dir`` for its files as they are now, without the files
    named in ``forget`` (as a run saved before they existed), and apply ``meta_changes`` to
    ``meta.json`` (a value of ``None`` removes the key)."""
    f = Path(run_dir) / "meta.json"
    meta = json.loads(f.read_text())
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    files = meta["manifest"]["files"]
    for name in forget:
        files.pop(name, None)
    for name in list(files):
        p = Path(run_dir) / name
        if p.exists():
            data = p.read_bytes()
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    f.write_text(json.dumps(meta, indent=2))
