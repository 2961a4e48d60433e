"""Tensor-parallel runs on disk: each rank saves its recording to ``RUN_DIR/rank{r}``, and
:func:`probe.load` of ``RUN_DIR`` merges the ranks into one run (see :mod:`probe.recording.distributed`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..columns import categorical
from ..recording.distributed import world

if TYPE_CHECKING:
    from .lifecycle import Probe
    from ..analysis.run import Run

log = logging.getLogger(__name__)

RANK_DIR = "rank{rank}"


def rank_dir(run_dir: str | os.PathLike, rank: int) -> Path:
    """The sub-directory of ``run_dir`` that holds ``rank``'s frames (``run_dir/rank{rank}``)."""
    return Path(run_dir) / RANK_DIR.format(rank=int(rank))


def save_rank(run: "Run | Probe", run_dir: str | os.PathLike, *, align_run_ids: bool = True) -> Path:
    """Save this rank's recording to ``run_dir/rank{r}``; ``probe.load(run_dir)`` merges the ranks.

    A collective when ``torch.distributed`` is initialized with more than one process: call it on
    every rank. The ranks first exchange their recorded rank and run ids (so a mismatch raises on
    every rank, never leaving one waiting), each rank's i-th run is renamed
    ``<rank 0's i-th id>-r{rank}`` so that one generate call has one id stem across ranks, and a
    final barrier makes every rank's directory complete before any rank returns: rank 0 may load
    the merged run at once. Nothing is written in ``run_dir`` itself (a ``meta.json`` there would
    hide the ranks from :func:`probe.load`).

    Args:
        run: a :class:`probe.Run` or the :class:`probe.Probe` that recorded it.
        run_dir: the run directory shared by all ranks (created if missing).
        align_run_ids: rename runs after rank 0's ids; ``False`` keeps the recorded ids.
    Returns:
        The directory written, ``run_dir/rank{r}``.
    Raises:
        TypeError: ``run`` is neither a Run nor a Probe.
        ValueError: some rank's run was recorded under another rank than its process's (the
            probe was attached before ``init_process_group``); raised on every rank.
    """
    from ..analysis.run import Run

    if not isinstance(run, Run) and isinstance(getattr(type(run), "run", None), property):
        run = run.run  # a Probe
    if not isinstance(run, Run):
        raise TypeError(f"save_rank needs a probe.Run or probe.Probe; got {type(run).__name__}")
    rank, size = world()
    recorded = int(run.meta.get("rank", rank))
    if size > 1:
        import torch.distributed as dist

        ids = [str(v) for v in run.runs["run_id"]]
        everyone: list[Any] = [None] * size
        dist.all_gather_object(everyone, (recorded, ids))
        wrong = [(r, rec) for r, (rec, _) in enumerate(everyone) if rec != r]
        if wrong:
            raise ValueError(
                f"runs recorded under the wrong rank (process rank, recorded rank): {wrong}; attach the "
                "probe after init_process_group (or pass rank=) so that the ranks agree"
            )
        if align_run_ids and rank:
            run = _renamed(run, ids, everyone[0][1], rank)
    meta = dict(run.meta, rank=recorded, world_size=size)
    out = Run(calls=run.calls, steps=run.steps, runs=run.runs, meta=meta,
              sampling=run.sampling).save(rank_dir(run_dir, recorded))
    if size > 1:
        dist.barrier()
    return out


def _renamed(run: "Run", mine: list[str], base: list[str], rank: int) -> "Run":
    """``run`` with its i-th run id replaced by ``base[i]-r{rank}``."""
    from ..analysis.run import Run

    if len(base) != len(mine):
        log.warning("rank %d recorded %d runs, rank 0 %d: run ids left as recorded", rank, len(mine), len(base))
        return run
    names = {m: f"{b}-r{rank}" for m, b in zip(mine, base)}

    def rename(df):
        out = df.copy()
        ids = out["run_id"]
        renamed = ids.astype("string").map(lambda v: names.get(v, v), na_action="ignore").astype("string")
        out["run_id"] = categorical(renamed) if isinstance(ids.dtype, pd.CategoricalDtype) else renamed.astype(ids.dtype)
        return out

    return Run(calls=rename(run.calls), steps=rename(run.steps), runs=rename(run.runs), meta=dict(run.meta),
               sampling=rename(run.sampling))


# --------------------------------------------------------------------------- placements
