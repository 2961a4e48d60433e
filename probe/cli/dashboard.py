"""``probe dashboard``: the Streamlit app over a folder of runs."""

from __future__ import annotations


from .common import CLIError, missing


def main(args) -> int:
    try:
        from probe.dashboards import launch
    except ImportError as exc:
        raise CLIError(f"cannot start the dashboard: {missing(exc)}") from exc
    return int(launch(args.runs_dir, host=args.host, port=args.port, root=args.root or args.runs_dir) or 0)
