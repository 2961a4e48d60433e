"""Capture: attaching a probe to a model and taking it off again.

:mod:`.lifecycle` holds :class:`Probe` and :func:`attach` (the lifecycle: wrappers installed and
removed on every path, steps opened and closed, observers registered); :mod:`.install` is what
goes on the model (block wrappers, the generate marker, their calibration); :mod:`.ranks` saves
one rank's run of a distributed job.
"""

from .lifecycle import CompiledModelWarning, Probe, ProbeError, attach, detach, probe_of

__all__ = ["CompiledModelWarning", "Probe", "ProbeError", "attach", "detach", "probe_of"]
