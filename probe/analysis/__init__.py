"""Frames and analysis: from frozen records to a :class:`~probe.analysis.run.Run`.

:mod:`.frames` builds the ``calls`` / ``steps`` / ``runs`` frames from a recording and
:mod:`.observed` adds each observer's declared part; :mod:`.facts` is what a run records about
its model and software. :mod:`.tree` nests calls by their recorded descendant counts,
:mod:`.accounting` and :mod:`.stats` turn them into self time and per-level shares (with
:mod:`.samples` and :mod:`.comparison`: spread, significance, the gate), :mod:`.headline` into
the prefill-vs-decode headline; :mod:`.cost` (over :mod:`.cost_formulas` and
:mod:`.coefficients`), :mod:`.apportion`, :mod:`.hardware` (over :mod:`.peaks`,
:mod:`.datasheets` and :mod:`.measured_peaks`) and :mod:`.roofline` add FLOPs, bytes and machine
peaks. :mod:`.run` is the facade users hold (``probe.load``, ``Run.summary()``).
"""
