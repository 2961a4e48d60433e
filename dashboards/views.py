"""The dashboard's run views: one function per sidebar entry, each drawing a :class:`Context`.

Each page lives in its own module: Overview (:mod:`dashboards.overview_view`), Layers and Tree
(:mod:`dashboards.layer_views`), Timeline and Memory (:mod:`dashboards.step_views`), Shapes and
Data (:mod:`dashboards.table_views`); Compare sits with the saved comparisons
(:mod:`dashboards.compare_views`), the Roofline and Sweep with the cost views. What they all draw
with (the :class:`Context`, its cache, ``md``, ``show_chart``, ``show_table``) is
:mod:`dashboards.context`.

Figures come from ``reports.figures`` (shared with the HTML report), which aggregate with
pandas and cap their points, so a view draws a million-call run as fast as a small one.
Tables are paged and downloads are built only when clicked.
"""

from __future__ import annotations

from typing import Callable

# the names below are this module's API, imported by the app and the tests
from .context import (  # noqa: F401
    PLOTLY_CONFIG, Context, cached, md, named_headline, run_names, show_chart, show_table)
from .layer_views import layers, tree_view
from .overview_view import model_lines, overview, phases_long  # noqa: F401
from .step_views import memory, timeline
from .table_views import data_view, shapes

VIEWS: dict[str, Callable[[Context], None]] = {
    "Overview": overview,
    "Layers": layers,
    "Tree": tree_view,
    "Timeline": timeline,
    "Memory": memory,
    "Shapes": shapes,
    "Data": data_view,
}
