"""``probe dashboard``: the Streamlit app over a folder of runs."""

from __future__ import annotations

import socket

from .common import CLIError, missing


def main(args) -> int:
    try:  # an address this machine cannot bind is a clear error, not Streamlit's traceback
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family[0], socket.SOCK_STREAM) as s:
            s.bind(family[4])
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CLIError(f"--host {args.host} --port {args.port} cannot be served here: {why}; use an address of "
                       "this machine (127.0.0.1 keeps the dashboard local) and a free port") from None
    try:
        from probe.dashboards import launch
    except ImportError as exc:
        raise CLIError(f"cannot start the dashboard: {missing(exc)}") from exc
    return int(launch(args.runs_dir, host=args.host, port=args.port, root=args.root or args.runs_dir) or 0)
