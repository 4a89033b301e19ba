"""What analysts see in the Dagster UI: per-page and per-process metadata."""

from __future__ import annotations

import resource
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from quo_sync_dagster.core.metrics import summarize
from quo_sync_dagster.core.process import PageResult, Process
from quo_sync_dagster.store.port import Store


def page_metadata(result: PageResult, duration_s: float | None) -> dict[str, Any]:
    """A page partition's metadata; `duration_s` None: not measured (reported afterwards)."""
    timing = (
        {} if duration_s is None else {"duration_s": dg.MetadataValue.float(round(duration_s, 3))}
    )
    return {
        "records": result.records,
        "synced": result.synced,
        "failed": result.failed,
        "created": result.created,
        "updated": result.updated,
        "skipped_unchanged": result.unchanged,
        "skipped": result.skipped,
        "adopted": result.adopted,
        "adoption_candidates": result.adoption_candidates,
        "unverified_phones": result.unverified_phones,
        "page_ok": result.ok,
        **timing,
    }


def process_summary(store: Store, process: Process) -> dict[str, Any]:
    end = process.context.get("endTime")
    return summarize(
        process,
        store.recent_errors(process.id),
        now=datetime.now(UTC),
        ended_at=datetime.fromisoformat(end) if end else None,
    )


def process_metadata(summary: dict[str, Any], process: Process | None = None) -> dict[str, Any]:
    """A closed Process on `<crm>_sync_processes`; with the Process, what kind of sync it was,
    and for a polling cycle of an integration with webhooks the changes the webhooks missed."""
    agg = summary["aggregateData"]
    ctx = process.context if process else {}
    kind = (
        {
            "integration_id": process.integration_id,
            "sync_type": ctx.get("syncType"),
            "full_scan": not ctx.get("modifiedSince"),
        }
        if process
        else {}
    )
    if ctx.get("syncType") == "ONGOING" and ctx.get("webhooks"):
        kind["changes_missed_by_webhooks"] = agg["created"] + agg["updated"]
    if closing := ctx.get("closing", {}).get("report"):
        kind["closing_pass"] = dg.MetadataValue.json(closing)
    return {
        **kind,
        "process_id": summary["processId"],
        "process_state": summary["state"],
        "process_total_records": summary["totalRecords"] or 0,
        "process_total_synced": agg["totalSynced"],
        "process_total_failed": agg["totalFailed"],
        "process_total_skipped": agg["totalSkipped"],
        "process_adopted": agg["adopted"],
        "process_records_per_second": dg.MetadataValue.float(agg["recordsPerSecond"]),
        "process_pages": dg.MetadataValue.json(summary["pages"]),
        "process_summary": dg.MetadataValue.json(summary),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
