"""probe: where did the time and memory of ``model.generate()`` go, prefill vs decode.

>>> import probe
>>> with probe.attach(model) as p:
...     model.generate(**inputs, max_new_tokens=32)
>>> p.run.summary()        # per block, role and module, prefill vs decode: self time, shares adding up to 100 %
>>> p.save("runs/first")   # parquet + meta.json; probe.load("runs/first") reads it back

``import probe`` needs only the standard library up front; pandas comes with the read side
(``probe.load``, ``probe.Run``) and torch with the capture side (``probe.attach`` and friends) on
first use, so ``probe --help`` answers at once and tools that only read saved runs start fast.
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

from .version import __version__

# In a source checkout reports/ and dashboards/ sit beside probe/ (an install puts them inside it):
# the checkout's root joins this package's path, so probe.reports and probe.dashboards import the
# same way from the checkout, an editable install and a wheel.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_root, "reports", "__init__.py"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "reports"))):
    __path__.append(_root)  # noqa: F821 - a package's own __path__
del _root

from .vocab import DEPTHS, PHASES

if TYPE_CHECKING:  # pragma: no cover
    from . import fmt, models, shapes
    from .profiling import ProfileError, profile
    from .run import Run, RunLoadError, RunSaveError, load, merge
    from .capture import CompiledModelWarning, Probe, ProbeError, attach, detach, probe_of
    from .discovery import UnrecognisedModelWarning, find_blocks
    from .ranks import save_rank
    from .serving import ServingWarning

_LAZY = {
    # the read side (pandas, pyarrow): imported on first use, so `probe --help` starts at once
    "Run": "run",
    "RunLoadError": "run",
    "RunSaveError": "run",
    "load": "run",
    "merge": "run",
    "profile": "profiling",
    "ProfileError": "profiling",
    "attach": "capture",
    "detach": "capture",
    "probe_of": "capture",
    "Probe": "capture",
    "ProbeError": "capture",
    "CompiledModelWarning": "capture",
    "find_blocks": "discovery",
    "UnrecognisedModelWarning": "discovery",
    "save_rank": "ranks",
    "ServingWarning": "serving",
}
#: submodules reachable as attributes (``probe.models.load_bundled()``) without importing
#: them (and torch/transformers) at ``import probe``
_LAZY_MODULES = ("models", "fmt", "shapes")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it in globals()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__all__ = [
    "DEPTHS",
    "PHASES",
    "CompiledModelWarning",
    "Probe",
    "ProbeError",
    "Run",
    "RunLoadError",
    "RunSaveError",
    "ServingWarning",
    "UnrecognisedModelWarning",
    "__version__",
    "attach",
    "detach",
    "find_blocks",
    "load",
    "merge",
    "profile",
    "ProfileError",
    "probe_of",
    "save_rank",
]
