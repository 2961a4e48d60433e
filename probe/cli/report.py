"""``probe report``: CSV, HTML and Chrome-trace reports of a saved run or sweep."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError, check_out, load_run, missing


def main(args) -> int:
    from ..analysis.run import META
    from ..routines.sweep import SWEEP_FILE

    root = Path(args.run_dir)
    if (root / SWEEP_FILE).exists() and not (root / META).exists():
        # a `probe sweep` folder: its own page (sweep.html) and CSV tables
        if args.format == "trace":
            raise CLIError(f"{root} is a sweep: it has no single trace; report one of its runs, e.g. "
                           f"`probe report {root / 'runs' / '<config>'} --format trace`")
        try:
            from probe.reports import write_sweep_reports
        except ImportError as exc:
            raise CLIError(f"cannot write the report: {missing(exc)}") from exc
        formats = ("html", "csv") if args.format == "all" else (args.format,)
        if args.out:
            check_out(Path(args.out), "report", is_file=args.format == "html", force=args.force)
        try:
            paths = write_sweep_reports(root, formats=formats, out=args.out)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        except OSError as exc:
            raise CLIError(f"cannot write the sweep report: {exc.strerror or exc}; choose another --out") from exc
        for pth in paths:
            print(pth)
        return 0
    try:
        from probe.reports import write_reports
        from probe.reports.html import UNREAD_CALLS_COLUMNS
    except ImportError as exc:
        raise CLIError(f"cannot write the report: {missing(exc)}") from exc
    formats = ("html", "csv", "trace") if args.format == "all" else (args.format,)
    from ..schema import CALLS

    # the HTML page alone reads every calls column but a few: those are not decoded
    run = load_run(args.run_dir, [c for c in CALLS if c not in UNREAD_CALLS_COLUMNS] if formats == ("html",) else None)
    if args.out:
        check_out(Path(args.out), "report", is_file=args.format in ("html", "trace"), force=args.force)
    from ..store.outdir import shown

    try:
        paths = write_reports(run, Path(args.run_dir), formats=formats, out=args.out)
    except OSError as exc:
        raise CLIError(f"cannot write the report: {exc.strerror or exc}"
                       + (f" ({shown(exc.filename)})" if exc.filename else "") + "; choose another --out") from exc
    for pth in paths:
        print(shown(pth))
    return 0
