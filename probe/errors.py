"""The errors a saved run can raise, and the manifest's key (standard library only)."""

from __future__ import annotations

#: the meta.json key of the files' sizes and checksums (Run.save)
MANIFEST = "manifest"


class RunLoadError(ValueError):
    """A run directory that cannot be read, with the reason and what to do."""


class RunSaveError(OSError):
    """A run that cannot be saved where asked, with the reason and what to do."""
