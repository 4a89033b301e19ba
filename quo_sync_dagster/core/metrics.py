"""The seed's process metrics, derived from the stored counters, with an ETA from throughput."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from quo_sync_dagster.core.process import ErrorDetail, Process, ProcessState


def summarize(
    process: Process, errors: list[ErrorDetail], now: datetime, ended_at: datetime | None = None
) -> dict[str, Any]:
    """The seed's `results` shape plus progress: what the UI, the CLI and metadata show."""
    c = process.counters
    ctx = process.context
    started = (
        datetime.fromisoformat(ctx["startTime"])
        if "startTime" in ctx
        else process.created_at or now
    )
    elapsed = max(((ended_at or now) - started).total_seconds(), 1e-9)
    rate = c["processed"] / elapsed
    total = ctx.get("totalRecords")
    eta = None
    if total and rate > 0 and process.state not in (ProcessState.COMPLETED, ProcessState.ERROR):
        # Measured throughput, not the seed's constant "+10 minutes".
        eta = (now + timedelta(seconds=max(total - c["processed"], 0) / rate)).isoformat()
    return {
        "processId": process.id,
        "state": str(process.state),
        "totalRecords": total,
        "processedRecords": c["processed"],
        "estimatedCompletion": eta,
        "aggregateData": {
            "totalSynced": c["synced"],
            "totalFailed": c["failed"],
            "totalSkipped": c["skipped"],
            "created": c["created"],
            "updated": c["updated"],
            "skippedUnchanged": c["unchanged"],
            "adopted": c["adopted"],
            "adoptionCandidates": c["adoption_candidates"],
            "unverifiedPhones": c["unverified_phones"],
            "duration": round(elapsed * 1000),
            "recordsPerSecond": round(rate, 3),
            "errors": [
                {
                    "contactId": e.external_id,
                    "error": e.error,
                    "timestamp": e.timestamp,
                    "page": e.page,
                }
                for e in errors
                if e.skipped is None
            ],
            # The records skipped on purpose, each with its reason (a SkipReason) and details.
            "skipped": [
                {"contactId": e.external_id, "reason": e.skipped, "detail": e.error, "page": e.page}
                for e in errors
                if e.skipped is not None
            ],
        },
        "pages": {
            "totalPages": ctx.get("totalPages"),
            "processedPages": c["pages_processed"],
            "failedPages": c["pages_failed"],
        },
    }
