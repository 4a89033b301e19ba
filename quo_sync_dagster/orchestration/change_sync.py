"""Applying webhook changes to Quo, free of Dagster: the work of a `<crm>_webhook_sync` run.

A delivery only says which people changed. Every person a batch of changes touches is re-read
by id and Quo is made equal to what the CRM holds *now*: found people are upserted (unchanged
ones cost nothing), people the CRM no longer has are deleted. So the outcome does not depend on
deliveries arriving once or in order: a duplicate is a no-op, and a delete delivered before the
update it followed still ends with the person deleted (or, if it was restored, present).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from quo_sync_dagster.core.changes import PersonChange
from quo_sync_dagster.core.external_ids import quo_external_id
from quo_sync_dagster.core.models import InvalidRecord
from quo_sync_dagster.core.process import ErrorDetail
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.deletes import delete_people, still_in_crm
from quo_sync_dagster.orchestration.sync import now_iso, sync_records
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.store.port import InboxItem, Store


@dataclass
class ChangeReport:
    events: int = 0
    people: int = 0  # distinct people the events touched
    created: int = 0
    updated: int = 0
    unchanged: int = 0  # a duplicate or stale delivery: nothing to write
    deleted: int = 0  # Quo contacts deleted
    failed: int = 0
    skipped: int = 0
    unreadable: int = 0  # inbox items that hold no change this version understands
    latencies: list[float] = field(default_factory=list)  # receipt -> Quo written, seconds
    errors: list[ErrorDetail] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "events": self.events,
            "people": self.people,
            "upserted": self.created + self.updated,
            "created": self.created,
            "updated": self.updated,
            "skipped_unchanged": self.unchanged,
            "deleted": self.deleted,
            "failed": self.failed,
            "skipped": self.skipped,
            "unreadable": self.unreadable,
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_max_s": round(lat[-1], 3) if lat else None,
        }


def apply_changes(
    store: Store,
    connector: CRMConnector,
    client: QuoClient,
    upserter: ContactUpserter,
    items: list[InboxItem],
    run: str,
) -> ChangeReport:
    """Make Quo equal to the CRM for every person `items` touch. CRM and Quo faults propagate
    (the caller leaves the items unacknowledged, so they are delivered again); a person that
    cannot be synced fails only itself. `run` names the batch in errors."""
    integration = connector.integration
    report = ChangeReport(events=len(items))
    wanted: dict[str, dict[str, None]] = defaultdict(dict)  # object type -> externalIds
    for item in items:
        try:
            change = PersonChange.from_payload(item.event_id, item.payload["change"])
            for person in change.touched_ids():
                key = connector.change_key(change.object_type, person)
                wanted[change.object_type][quo_external_id(integration, key)] = None
        except (KeyError, TypeError, ValueError, InvalidRecord) as exc:
            report.unreadable += 1  # acknowledged with the rest: it can never be applied
            report.errors.append(
                ErrorDetail(item.event_id, f"unreadable change: {exc!r}"[:500], now_iso(), run)
            )
    for object_type, ids in wanted.items():
        report.people += len(ids)
        found = still_in_crm(connector, ids, [object_type])
        store.delete_tombstones(integration.id, found)  # restored people may sync again
        records = [record for _, record in found.values()]
        result = sync_records(connector, upserter, records, object_type, run, False, store)
        report.created += result.created
        report.updated += result.updated
        report.unchanged += result.unchanged
        report.failed += result.failed
        report.skipped += result.skipped
        report.errors.extend(result.errors)
        gone = [ext for ext in ids if ext not in found]
        report.deleted += delete_people(store, client, integration, connector.quo_source, gone)
    written = datetime.now(UTC)
    report.latencies = [
        (written - datetime.fromisoformat(item.received_at)).total_seconds() for item in items
    ]
    return report
