"""Throughput and failures over time per integration, as a PNG: for `quo-sync report --plot`
and, small and inline, on each closed Process's materialization in the Dagster UI.

Drawn on matplotlib's Agg canvas through the object API, never pyplot: no display is needed and
no global figure state is shared between the threads of a sensor or a webserver.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd

from quo_sync_dagster.analytics import processes_frame
from quo_sync_dagster.core.process import Process
from quo_sync_dagster.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_METADATA_KEY = "throughput_plot"
RECENT_PROCESSES = 30  # of the integration, on a closed Process's plot
# Metadata is kept in the event log for every closed Process: small is enough to read a trend.
INLINE_SIZE, INLINE_DPI = (6.0, 3.0), 80
MIN_SPAN = pd.Timedelta(hours=1)  # the narrowest time axis drawn
REPORT_SIZE, REPORT_DPI = (10.0, 5.0), 100

log = logging.getLogger(__name__)


def plot_png(
    processes: pd.DataFrame, size: tuple[float, float] = REPORT_SIZE, dpi: int = REPORT_DPI
) -> bytes:
    """A processes_frame drawn as records/s (top) and failed records (bottom) per Process over
    its start time, one line per integration."""
    buffer = io.BytesIO()
    plot_figure(processes, size, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def plot_figure(processes: pd.DataFrame, size: tuple[float, float], dpi: int) -> Figure:
    """The figure plot_png draws."""
    # Imported here: loading the code location (completion.py imports this module) must not
    # pay for matplotlib; only closing a Process or a report draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    throughput, failures = figure.subplots(2, 1, sharex=True)
    for integration, rows in processes.sort_values("started_at").groupby("integration_id"):
        # Matplotlib draws naive times; the axis says they are UTC.
        when = rows["started_at"].dt.tz_localize(None)
        # Unclipped: a point on the zero line (no failure) stays whole.
        style = {"marker": "o", "label": integration, "clip_on": False}
        # A Process that had nobody to sync (a quiet polling cycle) has no throughput: left
        # out, not drawn as a collapse to 0 records/s.
        synced = rows["records"] > 0
        throughput.plot(when[synced], rows["records_per_second"][synced], **style)
        failures.plot(when, rows["failed"], **style)
    throughput.set_ylabel("records/s")
    failures.set_ylabel("failed records")
    failures.set_xlabel("Process start (UTC)")
    locator = AutoDateLocator()
    failures.xaxis.set_major_locator(locator)
    failures.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    starts = processes["started_at"]
    if len(processes) and starts.max() - starts.min() < MIN_SPAN:
        # One Process (or a burst): a window around it, not the years a zero span gets.
        middle = (starts.min() + (starts.max() - starts.min()) / 2).tz_localize(None)
        failures.set_xlim(middle - MIN_SPAN / 2, middle + MIN_SPAN / 2)
    for axes in (throughput, failures):
        axes.margins(y=0.15)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    if len(processes):  # beside the plots, where it hides no point
        figure.legend(
            *throughput.get_legend_handles_labels(),
            loc="outside right upper",
            fontsize="small",
            title="integration",
            title_fontsize="small",
        )
    return figure


def markdown_image(png: bytes, title: str) -> str:
    """Markdown showing `png` inline (a data: URI, which the Dagster UI renders)."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def plot_metadata(store: Store, process: Process) -> dict[str, Any]:
    """The closed Process's metadata entry with its integration's recent Processes plotted."""
    try:
        recent = processes_frame(store, integration=process.integration_id, last=RECENT_PROCESSES)
        png = plot_png(recent, INLINE_SIZE, INLINE_DPI)
    except Exception:
        # The Process is already closed in the store: its event must not be lost to a plot.
        log.exception("no throughput plot for Process %s", process.id)
        return {}
    title = f"{process.integration_id}: throughput and failures"
    return {PLOT_METADATA_KEY: dg.MetadataValue.md(markdown_image(png, title))}
