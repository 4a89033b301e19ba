"""What operators and analysts see in the Dagster UI: the figures of a page on its partition, of
a Process on `<crm>_sync_processes`, and the owners and tags of assets, events and runs.

Each event carries only its own figures: a page partition holds that page's counts and timing,
never a run's or a Process's totals (a ranged run's MaterializeResult metadata would be copied
onto every partition of the range, so it carries none).
"""

from __future__ import annotations

import re
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from quo_sync_dagster.core.metrics import summarize
from quo_sync_dagster.core.process import PageResult, Process, ProcessState
from quo_sync_dagster.orchestration.tags import (
    TAG_CRM,
    TAG_INTEGRATION,
    TAG_OBJECT_TYPE,
    TAG_PROCESS,
)
from quo_sync_dagster.store.port import Store

OWNERS = ["team:quo-sync"]
# Process context: seconds spent in ERROR before a re-run reopened it (not syncing time).
SECONDS_IN_ERROR_KEY = "secondsInError"
MAX_TABLE_ROWS = 100  # rows of an errors table; the counts beside it are exact
_STRICT_TAG_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


def asset_attributes(crm: str) -> dict[str, Any]:
    """The owners, tags and group every asset of the CRM has."""
    return {"owners": OWNERS, "tags": {TAG_CRM: crm}, "group_name": crm}


def process_run_tags(process: Process) -> dict[str, str]:
    """Tags of a run that works on one Process: filterable by Process, integration, type."""
    return {
        TAG_PROCESS: process.id,
        TAG_INTEGRATION: process.integration_id,
        TAG_OBJECT_TYPE: process.context["personObjectType"],
    }


def shared_tags(processes: Iterable[Process]) -> dict[str, str]:
    """The Process, integration and object type tags every one of `processes` has the same
    value of (a UI backfill's range can mix Processes)."""
    values: dict[str, set[str]] = {}
    for process in processes:
        for key, value in process_run_tags(process).items():
            values.setdefault(key, set()).add(value)
    return {key: next(iter(found)) for key, found in values.items() if len(found) == 1}


def event_tags(crm: str, processes: Iterable[Process]) -> dict[str, str]:
    """Tags of the asset events of a range of pages. Event tag values must be short and plain,
    so other characters become `_` (the metadata holds the exact values)."""
    tags = {TAG_CRM: crm, **shared_tags(processes)}
    return {key: _STRICT_TAG_VALUE.sub("_", value)[:63] for key, value in tags.items()}


@dataclass(frozen=True)
class PageTiming:
    started_at: datetime
    seconds: float


def page_metadata(
    result: PageResult, process: Process, timing: PageTiming | None
) -> dict[str, Any]:
    """A page partition's metadata: that page's figures only. `timing` None: not measured (a
    page reported afterwards from the store)."""
    measured = {}
    if timing is not None:
        measured = {
            "started_at": dg.MetadataValue.timestamp(timing.started_at),
            "finished_at": dg.MetadataValue.timestamp(
                timing.started_at + timedelta(seconds=timing.seconds)
            ),
            "duration_s": dg.MetadataValue.float(round(timing.seconds, 3)),
            "records_per_second": dg.MetadataValue.float(
                round(result.records / max(timing.seconds, 1e-9), 1)
            ),
        }
    errors = [
        {
            "contact": e.external_id,
            "outcome": "skipped" if e.skipped else "failed",
            "reason": e.skipped,
            "detail": e.error,
        }
        for e in result.errors
    ]
    return {
        **identity_metadata(process),
        "records": result.records,
        "synced": result.synced,
        "failed": result.failed,
        "skipped": result.skipped,
        "skipped_unchanged": result.unchanged,
        "created": result.created,
        "updated": result.updated,
        "adopted": result.adopted,
        "adoption_candidates": result.adoption_candidates,
        "unverified_phones": result.unverified_phones,
        **measured,
        **({"errors": rows_table(errors)} if errors else {}),
    }


def failed_page_metadata(reason: str, records: int, process: Process) -> dict[str, Any]:
    """The observation of a page that failed as a whole: why, so its partition shows it."""
    return {**identity_metadata(process), "error": reason, "records": records}


def identity_metadata(process: Process) -> dict[str, Any]:
    return {
        "integration_id": process.integration_id,
        "object_type": process.context["personObjectType"],
        "process_id": process.id,
    }


def rows_table(rows: list[Mapping[str, Any]]) -> dg.TableMetadataValue:
    """Rows of one shape (the first row's keys) as a table of text, at most MAX_TABLE_ROWS."""
    columns = list(rows[0])
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord({c: "" if row[c] is None else str(row[c]) for c in columns})
            for row in rows[:MAX_TABLE_ROWS]
        ],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in columns]),
    )


def _at(iso: str) -> datetime:
    when = datetime.fromisoformat(iso)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def finished_at(process: Process) -> str | None:
    """When the Process stopped syncing: its end, or, while in ERROR, when it entered ERROR."""
    ctx = process.context
    if process.state is ProcessState.ERROR:
        return ctx.get("errorTimestamp") or ctx.get("endTime")
    return ctx.get("endTime")


def process_summary(store: Store, process: Process) -> dict[str, Any]:
    """The Process's metrics. Duration and throughput count syncing time only: a Process in
    ERROR stopped syncing when it entered ERROR, and the time it spent there before a re-run
    reopened it is left out (summarize measures from start to `ended_at`, so that end is moved
    back by the time in ERROR)."""
    now = datetime.now(UTC)
    end = finished_at(process)
    in_error = timedelta(seconds=process.context.get(SECONDS_IN_ERROR_KEY, 0))
    return summarize(
        process,
        store.recent_errors(process.id),
        now=now,
        ended_at=(_at(end) if end else now) - in_error,
    )


def left_error_context(process: Process, now: datetime) -> dict[str, Any]:
    """The context update of a Process leaving ERROR: the time it spent there, added up."""
    ctx = process.context
    entered = ctx.get("errorTimestamp")
    spent = (now - _at(entered)).total_seconds() if entered else 0.0
    return {SECONDS_IN_ERROR_KEY: ctx.get(SECONDS_IN_ERROR_KEY, 0) + max(spent, 0.0)}


def process_description(process: Process) -> str:
    """The first line the UI shows under a closed Process's event: an ERROR is not a success,
    whatever Dagster's green "Materialized" says."""
    if process.state is ProcessState.ERROR:
        return f"ERROR: {process.context.get('error') or 'unknown'}"
    return f"{process.state}: {process.counters.get('synced', 0)} synced"


def process_metadata(summary: dict[str, Any], process: Process) -> dict[str, Any]:
    """A closed Process on `<crm>_sync_processes`: what it synced, its final state and, in
    ERROR, why; what kind of sync it was, and for a polling cycle of an integration with
    webhooks the changes the webhooks missed."""
    agg = summary["aggregateData"]
    ctx = process.context
    end = finished_at(process)
    extra: dict[str, Any] = {}
    if process.state is ProcessState.ERROR:
        extra["error"] = ctx.get("error") or "unknown"
    if ctx.get("syncType") == "ONGOING" and ctx.get("webhooks"):
        extra["changes_missed_by_webhooks"] = agg["created"] + agg["updated"]
    if closing := ctx.get("closing", {}).get("report"):
        extra["closing_pass"] = dg.MetadataValue.json(closing)
    if agg["errors"]:
        extra["errors"] = rows_table(
            [
                {"contact": e["contactId"], "page": e["page"], "error": e["error"]}
                for e in agg["errors"]
            ]
        )
    if agg["skipped"]:
        extra["skipped_records"] = rows_table(
            [
                {"contact": s["contactId"], "page": s["page"], "reason": s["reason"]}
                for s in agg["skipped"]
            ]
        )
    pages = summary["pages"]
    return {
        **identity_metadata(process),
        "state": summary["state"],
        "sync_type": ctx.get("syncType"),
        "full_scan": not ctx.get("modifiedSince"),
        "records": summary["totalRecords"] or 0,
        "processed": summary["processedRecords"],
        "synced": agg["totalSynced"],
        "failed": agg["totalFailed"],
        "skipped": agg["totalSkipped"],
        "skipped_unchanged": agg["skippedUnchanged"],
        "created": agg["created"],
        "updated": agg["updated"],
        "adopted": agg["adopted"],
        "pages": pages["totalPages"] or 0,
        "pages_synced": pages["processedPages"],
        "pages_failed": pages["failedPages"],
        "started_at": dg.MetadataValue.timestamp(_at(ctx["startTime"])),
        **({"finished_at": dg.MetadataValue.timestamp(_at(end))} if end else {}),
        "duration_s": dg.MetadataValue.float(agg["duration"] / 1000),
        "seconds_in_error": dg.MetadataValue.float(
            round(float(ctx.get(SECONDS_IN_ERROR_KEY, 0)), 1)
        ),
        "records_per_second": dg.MetadataValue.float(agg["recordsPerSecond"]),
        **extra,
        "summary": dg.MetadataValue.json(summary),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
