"""Runs that explain themselves: a line per page in page runs, links from the run that planned
Processes to their page runs, and a failure message naming the failed partitions."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from quo_sync_dagster.core.process import PageResult, Process
from quo_sync_dagster.orchestration.tags import TAG_PEAK_RSS, TAG_PROCESS

FAILED_PAGES_NAMED = 10  # partitions a failure message names; its metadata lists them all


def page_runs_url(process_id: str) -> str:
    """The webserver's runs list filtered to the Process's page runs (relative to its root)."""
    return f"/runs?q[]=tag:{TAG_PROCESS}={process_id}"


def page_line(key: str, result: PageResult, seconds: float) -> str:
    if not result.ok:
        return f"page {key}: failed ({result.errors[0].error}), {seconds:.2f} s"
    return (
        f"page {key}: fetched {result.records}, synced {result.synced} ({result.created} "
        f"created, {result.updated} updated, {result.unchanged} unchanged, {result.adopted} "
        f"adopted), failed {result.failed}, skipped {result.skipped}, {seconds:.2f} s"
    )


def partitions_url(asset: str) -> str:
    """The webserver's partitions view of a page asset (relative to its root)."""
    return f"/assets/{asset}?view=partitions"


def failed_pages_message(failures: Mapping[str, str], pages: int, asset: str) -> str:
    named = "; ".join(f"{key}: {why}" for key, why in list(failures.items())[:FAILED_PAGES_NAMED])
    more = len(failures) - FAILED_PAGES_NAMED
    return (
        f"{len(failures)} of {pages} pages failed: {named}"
        + (f"; and {more} more (metadata failed_pages)" if more > 0 else "")
        + ". They are re-run automatically after a backoff (nothing is written twice). "
        + f"The failed partitions, with why: {partitions_url(asset)}"
    )


def run_figures(
    pages: int, failed_pages: int, totals: Mapping[str, int], seconds: float, peak_rss_mb: float
) -> tuple[str, dict[str, str]]:
    """A page run's own figures: its closing log line and the run tags that keep them."""
    line = (
        f"run: {pages} pages ({failed_pages} failed), synced {totals['synced']}, failed "
        f"{totals['failed']}, skipped {totals['skipped']} in {seconds:.1f} s"
    )
    tags = {
        "quo_sync/pages": str(pages),
        "quo_sync/pages_failed": str(failed_pages),
        "quo_sync/synced": str(totals["synced"]),
        "quo_sync/failed": str(totals["failed"]),
        "quo_sync/skipped": str(totals["skipped"]),
        "quo_sync/seconds": f"{seconds:.1f}",
        TAG_PEAK_RSS: str(peak_rss_mb),
    }
    return line, tags


def log_planned(context: dg.OpExecutionContext, planned: list[Process]) -> None:
    """Log each planned Process with a link to its page runs, and record the links."""
    links = []
    for process in planned:
        ctx = process.context
        url = page_runs_url(process.id)
        context.log.info(
            f"Process {process.id}: {ctx['personObjectType']} of {process.integration_id}, "
            f"{ctx['totalRecords']} people in {ctx['totalPages']} pages; its page runs: {url}"
        )
        links.append(
            f"- [{process.id}]({url}): {ctx['personObjectType']}, {ctx['totalPages']} pages"
        )
    if links:
        context.add_output_metadata({"page_runs": dg.MetadataValue.md("\n".join(links))})
