"""What ``probe.load(path, columns=..., steps=...)`` reads of a run: the selection, checked before
any file is opened, and the Arrow filter and column list it becomes.

Parquet files are read with the selection pushed down: only the asked columns of ``calls`` are
decoded, and rows of other steps are dropped in Arrow, before anything becomes a pandas frame.
A run read in part is marked so in its ``meta`` (:data:`MARK`): :meth:`probe.Run.save` refuses
it, so a part never replaces the whole run it came from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .. import schema
from ..vocab import PHASES

#: the key of ``Run.meta`` that marks a run read in part (what was asked for)
MARK = "loaded_part"
#: calls columns read whatever ``columns`` says: which call it is (run, rank, step, phase, module)
#: and the call tree (its nesting and self times), which the load checks and every analysis walks
KEY_COLUMNS: tuple[str, ...] = ("run_id", "rank", "step", "phase", "module", "call", "parent", "self_ms",
                                "gpu_self_ms")
#: calls columns the tree of a run saved without one (schema v1) is derived from
TREE_INPUTS: tuple[str, ...] = ("start_ms", "end_ms", "cpu_ms", "gpu_ms", "descendants")
#: frames whose rows belong to one step each: ``steps`` selects their rows
STEP_FRAMES = frozenset({"calls", "steps", "sampling"})
#: columns ``summary()`` and ``tree()`` read beyond :data:`KEY_COLUMNS`
ANALYSIS_COLUMNS: tuple[str, ...] = ("role", "layer", "cpu_ms", "gpu_ms", "out_bytes")


@dataclass(frozen=True)
class Part:
    """A selection of a run: ``columns`` of ``calls`` (``None``: all) and an Arrow filter on the
    rows of the step frames (``None``: all), with the JSON-able record of what was asked."""

    columns: tuple[str, ...] | None
    rows: object | None  # a pyarrow.compute.Expression
    asked: dict

    def calls_columns(self, extra: Iterable[str] = ()) -> tuple[str, ...] | None:
        """The calls columns to read, in schema order (``extra`` added), or ``None`` for all."""
        if self.columns is None:
            return None
        want = set(self.columns) | set(KEY_COLUMNS) | set(extra)
        return tuple(c for c in schema.CALLS if c in want)


def select(columns: Iterable[str] | str | None = None, steps: object = None) -> Part | None:
    """The :class:`Part` that ``columns`` and ``steps`` ask for; ``None`` when they ask for all.

    Args:
        columns: calls columns to read (a name or an iterable of names); :data:`KEY_COLUMNS` are
            read too.
        steps: a step number, a ``range`` or iterable of step numbers, or a phase name
            (``"prefill"``, ``"decode"``, ...). A step number selects that step of every generate
            call of the run (each numbers its forwards from 0).
    Raises:
        ValueError: an unknown column or phase, or a step that is not a whole number >= 0; the
            message names what is known.
    """
    if columns is None and steps is None:
        return None
    cols = None
    if columns is not None:
        cols = (columns,) if isinstance(columns, str) else tuple(columns)
        unknown = [c for c in cols if not isinstance(c, str) or c not in schema.CALLS]
        if unknown:
            raise ValueError(f"columns: {', '.join(map(repr, unknown))} not a column of the calls frame; "
                             f"known: {', '.join(schema.CALLS)}")
        cols = tuple(c for c in schema.CALLS if c in set(cols) | set(KEY_COLUMNS))
    rows, shown = (None, None) if steps is None else _rows(steps)
    return Part(columns=cols, rows=rows, asked={"columns": list(cols) if cols is not None else None,
                                                "steps": shown})


def _rows(steps: object) -> tuple[object, object]:
    """The Arrow filter selecting ``steps`` and its JSON-able record."""
    import pyarrow.compute as pc

    step = pc.field("step")
    if isinstance(steps, str):
        if steps not in PHASES:
            raise ValueError(f"steps={steps!r} is not a phase; give a step number, a range of them or a "
                             f"phase: {', '.join(PHASES)}")
        return pc.field("phase") == steps, steps
    if _is_int(steps):
        n = _step_number(steps)
        return step == n, n
    if isinstance(steps, range) and steps.step == 1:
        if steps.start < 0:
            raise ValueError(f"steps={steps!r}: step numbers start at 0")
        return (step >= steps.start) & (step < steps.stop), {"start": steps.start, "stop": steps.stop}
    if isinstance(steps, (bytes, dict)) or not isinstance(steps, Iterable):
        raise ValueError(f"steps={steps!r}: give a step number, a range or list of step numbers, or a phase "
                         f"({', '.join(PHASES)})")
    picked = sorted({_step_number(s) for s in steps})
    return step.isin(picked), picked


def _is_int(v: object) -> bool:
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _step_number(v: object) -> int:
    if not _is_int(v) or int(v) < 0:
        raise ValueError(f"steps: {v!r} is not a step number (a whole number >= 0)")
    return int(v)


def schema_of(frame_schema: dict[str, str], columns: Iterable[str]) -> dict[str, str]:
    """``frame_schema`` narrowed to ``columns`` (schema order kept, its absent-when-null flags too)."""
    if isinstance(frame_schema, schema.Schema):
        return frame_schema.narrowed(columns)
    keep = set(columns)
    return {c: t for c, t in frame_schema.items() if c in keep}


def need(calls, what: str, asked: dict | None = None) -> None:
    """Raise a clear ``ValueError`` where ``calls`` lacks a column ``what`` (an analysis) reads.

    A column absent because all its values are null (:data:`probe.schema.CUDA_CALLS`) counts as
    there, unless the run was read in part (``asked``, :attr:`probe.Run.part`) without asking for it."""
    cols = (asked or {}).get("columns")
    sparse = schema.CALLS.absent_when_null
    lost = [c for c in ANALYSIS_COLUMNS
            if c not in calls.columns and not (c in sparse and (cols is None or c in cols))]
    if lost:
        raise ValueError(f"{what} reads the calls columns {', '.join(lost)}, which this run was loaded without; "
                         f"load them too: probe.load(path, columns=[..., {', '.join(map(repr, lost))}])")


def calls_schema(asked: dict | None) -> dict[str, str]:
    """The schema of the calls frame of a run read as ``asked`` (``Run.part``; ``None``: whole)."""
    cols = (asked or {}).get("columns")
    return schema.CALLS if cols is None else schema_of(schema.CALLS, cols)


def describe(asked: dict) -> str:
    """What a part holds, in words: ``columns=[...], steps='decode'``."""
    shown = []
    for k in ("columns", "steps"):
        if asked.get(k) is not None:
            shown.append(f"{k}={asked[k]!r}")
    return ", ".join(shown) or "a part"
