"""``probe verify``: every problem of saved runs, not only the first that stops ``probe.load``."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError


def main(args) -> int:
    from ..analysis.run import verify
    from ..store.folders import is_run_dir, rank_dirs

    worst = 0
    for arg in args.run_dirs:
        path = Path(arg)
        if not path.is_dir() or not (is_run_dir(path) or rank_dirs(path) or (path / "meta.json").exists()):
            if len(args.run_dirs) == 1:
                raise CLIError(f"{path} holds no probe run (no meta.json); pass a folder written by probe run")
            print(f"{path}: holds no probe run")
            worst = 2
            continue
        problems = verify(path)
        if problems:
            print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
            for line in problems:
                print(f"  - {line}")
            worst = max(worst, 1)
        else:
            print(f"{path}: ok")
    return worst
