"""Recording: what runs while ``generate()`` does.

The forward wrappers of the hot path (:mod:`.hotpath`, its C twin ``_hooks.c``) append four
numbers per module call to the :mod:`.recorder`'s columns; observers (:mod:`.observer`) keep what
else a recording holds — sampling stages (:mod:`.sampling`), the serving loop (:mod:`.serving`),
CPU time and run-queue wait (:mod:`.noise`). :mod:`.discovery` finds the blocks to wrap,
:mod:`.distributed` the devices and ranks, :mod:`.generation` what generate was asked to do.
Nothing here imports pandas or any layer above.
"""
