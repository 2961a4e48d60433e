"""probe: where did the time and memory of ``model.generate()`` go, prefill vs decode.

>>> import probe
>>> with probe.attach(model) as p:
...     model.generate(**inputs, max_new_tokens=32)
>>> p.run.summary()        # per block, prefill vs decode
>>> p.save("runs/first")   # parquet + meta.json; probe.load("runs/first") reads it back

``import probe`` needs only torch, pandas and the standard library.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .capture import CompiledModelWarning, Probe, ProbeError, attach
from .discovery import UnrecognisedModelWarning, find_blocks
from .distributed import save_rank
from .run import Run, RunLoadError, load, merge
from .schema import DEPTHS, PHASES

__all__ = [
    "CompiledModelWarning",
    "DEPTHS",
    "PHASES",
    "Probe",
    "ProbeError",
    "Run",
    "RunLoadError",
    "UnrecognisedModelWarning",
    "__version__",
    "attach",
    "find_blocks",
    "load",
    "merge",
    "save_rank",
]
