"""The closed sets every layer speaks of: phases, depths, accounting levels (standard library only).

:mod:`probe.schema` re-exports them beside the frames' columns; this module exists so that
``import probe`` and ``probe --help`` need neither pandas nor torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Phase = Literal["prefill", "decode", "extend", "recompute", "forward", "mixed"]
#: prefill   - step 0 of a generate call over an empty cache (q_len = prompt length)
#: decode    - a later step with one new position per sequence (q_len = 1)
#: extend    - several new positions on top of a non-empty cache (assisted/speculative
#:             verification, a prompt continued from a user-supplied cache)
#: recompute - a later step that reprocesses the whole sequence (use_cache=False)
#: forward   - a forward of the model outside generate()
#: mixed     - (continuous batching) one packed forward holding prompt tokens of some requests
#:             (prefill, possibly one chunk of a prompt) and one new token of others (decode);
#:             a packed forward of prompt chunks only is "prefill", of decode tokens only "decode"
PHASES: tuple[str, ...] = get_args(Phase)

Depth = Literal["blocks", "sublayers", "all"]
DEPTHS: tuple[str, ...] = get_args(Depth)

Level = Literal["block", "role", "module"]
#: levels of :func:`probe.tree.summary`, coarse to fine
LEVELS: tuple[str, ...] = get_args(Level)
