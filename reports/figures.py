"""Figure builders: pure functions from the probe's frames to plotly figures (or tables).

Defined once and shared by the HTML report and the Streamlit dashboard. Every builder

- aggregates with pandas first (a run may hold a million call rows) and caps the points it
  plots (long runs are binned into at most a few hundred/thousand points), so a figure stays
  small and fast whatever the run's size;
- returns an empty figure with a "no data" annotation instead of raising on empty frames;
- is deterministic: the same frames give the same figure JSON (no uids, no random colours);
- passes every string that came from the recorded data (module names, labels) through
  :func:`plot_text`, because plotly interprets a small HTML subset in text.

This module gathers them; each subject has its own module:

- :mod:`reports.figure_base`: the shared look, :func:`plot_text`, :func:`empty_figure`, binning;
- :mod:`reports.block_figures`: time per block (prefill vs decode, per run, A vs B), layer x step;
- :mod:`reports.breakdown_figures`: one step split into its parts, the sampling stages;
- :mod:`reports.timeline_figures`: latency and memory over the steps;
- :mod:`reports.tree_figures`: the module tree and the layer x role heatmap;
- :mod:`reports.tables`: the table builders :func:`shape_walkthrough` and :func:`headline`.
"""

from __future__ import annotations

# the names below are this module's API, imported by the report, the dashboard and the tests
from .block_figures import (  # noqa: F401
    LEVEL_LABELS, MAX_HEAT_COLS, RANK_PATTERNS, compare_blocks, layer_heatmap, phase_blocks, phase_blocks_runs)
from .breakdown_figures import (  # noqa: F401
    PARTS, STAGE_COLORS, STAGE_FIXED, STAGE_LABELS, sampling_stages, step_breakdown, step_breakdown_runs)
from .figure_base import (  # noqa: F401
    HEIGHT, MAX_POINTS, PHASE_COLORS, RUN_COLORS, TEMPLATE, base_figure, empty_figure, floats, plot_text)
from .tables import headline, ranks, shape_walkthrough  # noqa: F401
from .timeline_figures import MAX_RUNS, latency_vs_kv, memory_over_steps, token_latency  # noqa: F401
from .tree_figures import icicle, layer_roles  # noqa: F401
