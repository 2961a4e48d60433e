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
import sys as _sys
from importlib import abc as _abc, util as _util
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
    from . import fmt, models
    from .routines import shapes
    from .routines.profiling import ProfileError, profile
    from .analysis.run import Run, RunLoadError, RunSaveError, load, merge
    from .capture.lifecycle import CompiledModelWarning, Probe, ProbeError, attach, detach, probe_of
    from .recording.discovery import UnrecognisedModelWarning, find_blocks
    from .capture.ranks import save_rank
    from .recording.serving import ServingWarning

_LAZY = {
    # the read side (pandas, pyarrow): imported on first use, so `probe --help` starts at once
    "Run": "analysis.run",
    "RunLoadError": "analysis.run",
    "RunSaveError": "analysis.run",
    "load": "analysis.run",
    "merge": "analysis.run",
    "profile": "routines.profiling",
    "profile_serving": "routines.profiling",
    "ProfileError": "routines.profiling",
    "attach": "capture.lifecycle",
    "detach": "capture.lifecycle",
    "probe_of": "capture.lifecycle",
    "Probe": "capture.lifecycle",
    "ProbeError": "capture.lifecycle",
    "CompiledModelWarning": "capture.lifecycle",
    "find_blocks": "recording.discovery",
    "UnrecognisedModelWarning": "recording.discovery",
    "save_rank": "capture.ranks",
    "ServingWarning": "recording.serving",
}
#: submodules reachable as attributes (``probe.models.load_bundled()``) without importing
#: them (and torch/transformers) at ``import probe``
_LAZY_MODULES = {"models": "models", "fmt": "fmt", "shapes": "routines.shapes"}

#: Where each module of the flat layout went when the package took its layer folders. The old
#: dotted paths (``import probe.hardware``, ``from probe.run import load``) keep working: they
#: resolve to the very same module object, imported on first use.
MOVED = {
    "pretrained": "models.pretrained", "model_folder": "models.model_folder", "loading": "models.loading",
    "hotpath": "recording.hotpath", "observer": "recording.observer", "recorder": "recording.recorder",
    "extras": "recording.extras", "cache": "recording.cache", "noise": "recording.noise",
    "sampling": "recording.sampling", "serving": "recording.serving", "discovery": "recording.discovery",
    "distributed": "recording.distributed", "generation": "recording.generation", "_hooks": "recording._hooks",
    "frames": "analysis.frames", "tree": "analysis.tree", "accounting": "analysis.accounting",
    "headline": "analysis.headline", "stats": "analysis.stats", "apportion": "analysis.apportion",
    "cost": "analysis.cost", "hardware": "analysis.hardware", "roofline": "analysis.roofline", "run": "analysis.run",
    "ranks": "capture.ranks", "profiling": "routines.profiling", "sweep": "routines.sweep",
    "loadgen": "routines.loadgen", "shapes": "routines.shapes",
}


class _MovedFinder(_abc.MetaPathFinder, _abc.Loader):
    """Resolves ``probe.<old name>`` to the module at its layer folder's path (no second copy)."""

    def __init__(self) -> None:
        self.real_specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, leaf = fullname.rpartition(".")
        if package != __name__ or leaf not in MOVED:
            return None
        return _util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        import importlib

        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self.real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        # the import system has set the alias's spec on the module: put its own back, so that
        # __spec__.parent stays __package__ and a later relative import resolves as before
        module.__spec__ = self.real_specs.pop(module.__spec__.name)


if not any(isinstance(f, _MovedFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedFinder())


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY_MODULES:
        module = importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
        globals()[name] = module
        return module
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
