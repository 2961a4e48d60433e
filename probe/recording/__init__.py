"""Recording: what runs while ``generate()`` does.

The forward wrappers of the hot path (:mod:`.hotpath`, its C twin ``_hooks.c``) append four
numbers per module call to the :mod:`.recorder`'s columns; a module with forward hooks is timed
around its whole call (:mod:`.hooktime`), and the attention function inside each recorded
attention module as a call of its own (:mod:`.attnfn`); observers (the interface:
:mod:`.observer`) keep what else a recording holds, each with its own records and frames —
sampling stages (:mod:`.sampling`, its frame in :mod:`.stages`), the serving loop
(:mod:`.serving`, the manager's wrappers in :mod:`.serving_watch`, its frames in
:mod:`.serving_frames`), CPU time and run-queue wait (:mod:`.noise`); :mod:`.defaults` lists the
ones every probe registers. :mod:`.discovery` finds the blocks to wrap, :mod:`.distributed` the
devices and ranks, :mod:`.generation` what generate was asked to do. Nothing here imports a layer
above; torch is imported only by the modules that touch a model, pandas only where frames are
built or read (the observers' frame builders, :mod:`.noise`'s detector), so the read side
imports without torch.
"""
