"""``python -m probe`` is the ``probe`` command."""

from .cli import main

raise SystemExit(main())
