"""Routines: whole measurements built on :func:`probe.attach`.

:mod:`.profiling` is the one profiling routine (warm-up, repeats, seed, attach and detach, the
run's metadata) behind ``probe.profile`` and ``probe.profile_serving``; :mod:`.sweep` repeats it
over a grid of prompt lengths and batch sizes, :mod:`.loadgen` drives a serving benchmark, and
:mod:`.shapes` walks a model's tensor shapes from its config alone.
"""
