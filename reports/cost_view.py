"""The cost model of a run as the reports show it: FLOPs, bytes, roofline and bound per block.

Reports are reproducible: two builds from the same run give the same bytes. So the roofs
come from the run itself (``meta["peaks"]``, stored by ``probe run`` on the machine that
recorded it) or from the datasheet table of a known GPU, never from a measurement on the
machine that builds the report. A CPU run saved without peaks (e.g. from the Python API, or
recorded on a busy machine with no cached quiet figure) still gets its FLOPs, bytes and
intensity per block, but no roofs and no bound labels; so do peaks measured on a busy machine
(:func:`probe.hardware.usable`): a CPU has no datasheet to fall back to, and the note says so.

:func:`cost_view` is the one entry; the HTML report and the CSV export both read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .tables import ranks

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from probe.analysis.hardware import Peaks
    from probe.analysis.run import Run

log = logging.getLogger(__name__)

PeaksOrigin = Literal["stored", "datasheet", "none"]


#: what the roofline's numbers are: the note under the report's and the dashboard's roofline
COST_NOTE = ("FLOPs and bytes are estimates from the recorded shapes and the model config (probe.cost: every "
             "weight, activation and KV-cache read once); time is GPU time where every call has it, host time "
             "otherwise. Intensity = FLOPs / bytes; the roof fraction is achieved over the roof at that intensity. "
             "(forward) is the whole forward: the blocks' work over the steps' forward time.")


def roofline_columns() -> dict[str, str]:
    """Columns of ``roofline.csv``: ``rank`` then :data:`probe.roofline.ROOFLINE`."""
    from probe.analysis.roofline import ROOFLINE

    return {"rank": "int64", **ROOFLINE}


@dataclass(frozen=True)
class CostView:
    """What the reports show of the cost model.

    Attributes:
        roof: per rank, block (by role) and phase, the :data:`probe.roofline.ROOFLINE` columns
            after a leading ``rank``; the roof and bound columns are empty without peaks.
            ``None`` when there is no cost estimate (see ``note``).
        peaks: the roofs used, or ``None``.
        origin: ``"stored"`` (``meta["peaks"]``), ``"datasheet"`` (looked up from the run's
            GPU name, not stored) or ``"none"``.
        note: why something is missing (no config, no peaks), else ``""``.
    """

    roof: pd.DataFrame | None
    peaks: "Peaks | None"
    origin: PeaksOrigin
    note: str = ""

    @property
    def has_cost(self) -> bool:
        """FLOPs and bytes per block are known."""
        return self.roof is not None and not self.roof.empty

    @property
    def has_roofs(self) -> bool:
        """The roofline (achieved vs peak, bound labels) is known."""
        return self.has_cost and self.peaks is not None

    def peaks_text(self) -> str:
        """One sentence: where the roofs come from (measured or datasheet) and their source."""
        pk = self.peaks
        if pk is None:
            return ""
        if pk.measured:
            kind = ("measured on the machine that recorded this run (matmul and copy micro-benchmark"
                    + (f", {pk.wait_pct:.1f} % of it waiting for a CPU)" if pk.wait_pct is not None else ")"))
        else:
            kind = f"from the datasheet table for {pk.name}"
        stored = "stored with the run" if self.origin == "stored" else "looked up from the run's GPU name"
        return f"Roofs {kind}, {stored}: {pk.label()}. Source: {pk.source}."


def roofline_figure(view: CostView) -> "go.Figure":
    """The roofline chart of a view with roofs, as the report and the dashboard show it.

    A run merged from several ranks gets one marker per rank and block, named in the hover
    (labels on the chart would pile up).
    """
    from .cost_figures import roofline

    roof = view.roof
    multi = len(ranks(roof)) > 1
    if multi:
        roof = roof.assign(module=roof["module"] + " · rank " + roof["rank"].astype("string"))
    where = "measured where recorded" if view.origin == "stored" else None
    return roofline(roof, view.peaks, where=where, labels=not multi)


def _stored_peaks(meta: dict) -> "Peaks | None":
    from probe.analysis.hardware import Peaks

    raw = meta.get("peaks")
    if not isinstance(raw, dict):
        return None
    try:
        return Peaks.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        log.warning("run meta holds malformed peaks %r; ignoring them", raw)
        return None


#: why a CPU run may have no peaks: there is no CPU datasheet, and a busy measurement is refused
CPU_PEAKS_NOTE = ("A CPU has no datasheet: its peaks are measured once per machine when it is quiet and cached, "
                  "and a run recorded on a busy machine with no cached figure has none.")


def _no_peaks_note(run: "Run", refused: str = "") -> str:
    gpu = None
    if not run.runs.empty and "gpu_name" in run.runs.columns:
        v = run.runs["gpu_name"].iloc[0]
        gpu = None if pd.isna(v) else str(v)
    if refused:
        return (f"No roofline: {refused}, so they are not used. "
                + ("" if gpu else CPU_PEAKS_NOTE + " ")
                + "FLOPs, bytes and intensity per block are shown without roofs or bound labels.")
    if gpu:
        return (f"No peaks recorded with this run and no datasheet entry for {gpu}; `probe run` stores them. "
                "FLOPs, bytes and intensity per block are shown without roofs or bound labels.")
    return ("No peaks recorded with this run; `probe run` stores them. FLOPs, bytes and intensity per block are "
            "shown without roofs or bound labels (measuring the machine that builds this report would make the "
            "report depend on where it is built). " + CPU_PEAKS_NOTE)


def per_rank_roofline(calls: pd.DataFrame, steps: pd.DataFrame, peaks: "Peaks | None",
                      cpu_wait_pct: float | None = None, *, model: Any = None) -> pd.DataFrame:
    """:func:`probe.roofline.roofline` of each rank's calls and steps (by role), with a ``rank`` column.

    Ranks run side by side, so each is set against one device's roofs; rows of the same block
    and phase sit next to each other, rank by rank. ``calls``: calls with the cost columns
    (:func:`probe.cost.annotate`), or bare calls with ``model`` (their run, model or config):
    each row's FLOPs and bytes are then summed per block without a column per call
    (:func:`probe.cost.group_costs`).
    """
    from probe.analysis.cost import group_costs
    from probe.analysis.roofline import roofline

    cols = roofline_columns()
    parts = []
    rank_list = ranks(calls)
    rc = calls["rank"].to_numpy(dtype="int64", na_value=0) if "rank" in calls.columns else None
    rs = steps["rank"].to_numpy(dtype="int64", na_value=0) if "rank" in steps.columns else None
    for r in rank_list:
        c = calls if rc is None or len(rank_list) == 1 else calls[rc == r]
        s = steps if rs is None or len(rank_list) == 1 else steps[rs == r]
        costs = None if model is None else (lambda g, n, c=c: group_costs(c, model, g, n))
        part = roofline(c, peaks, s, by="role", cpu_wait_pct=cpu_wait_pct, costs=costs)
        part.insert(0, "rank", r)
        parts.append(part.assign(_pos=range(len(part))))
    if len(parts) == 1:  # one rank: its rows as they are
        return parts[0].drop(columns="_pos").astype(cols)
    out = pd.concat(parts, ignore_index=True).sort_values(["_pos", "rank"], kind="stable")
    return out.drop(columns="_pos").reset_index(drop=True).astype(cols)


def cost_view(run: "Run") -> CostView:
    """The cost model of ``run`` for the reports; never raises (a missing piece becomes ``note``).

    Args:
        run: a recorded run; its ``meta["config"]`` gives the cost estimate, ``meta["peaks"]``
            (or the datasheet entry of its GPU) the roofs.
    Returns:
        A :class:`CostView`. Nothing is measured here, so the result depends only on the run.
    """
    from probe.analysis.hardware import peaks_for_run, usable

    wait = run.noise().wait_pct
    peaks, refused = usable(_stored_peaks(run.meta), wait)
    origin: PeaksOrigin = "stored"
    if peaks is None:
        try:
            peaks = peaks_for_run(run, measure=False)  # the datasheet only: no measurement here
        except Exception as exc:  # a lookup problem must not cost the user the report
            log.warning("datasheet peaks lookup failed: %s", exc)
            peaks = None
        origin = "datasheet" if peaks is not None else "none"
    if not run.meta.get("config"):
        return CostView(None, peaks, origin, "No cost estimate: this run's metadata holds no model config (it was "
                                             "recorded by an older probe, or built by hand). Re-record it to see "
                                             "FLOPs, bytes and the roofline per block.")
    if run.calls.empty:
        return CostView(None, peaks, origin, "No cost estimate: no block calls were recorded.")
    try:
        roof = per_rank_roofline(run.calls, run.steps, peaks, wait, model=run)
    except Exception as exc:  # the cost model cannot build this architecture: say so, keep the report
        log.warning("cost estimate failed: %s: %s", type(exc).__name__, exc)
        return CostView(None, peaks, origin, f"No cost estimate: the cost model failed on this run's config "
                                             f"({type(exc).__name__}: {exc}).")
    note = "" if peaks is not None else _no_peaks_note(run, refused)
    return CostView(roof, peaks, origin, note)
