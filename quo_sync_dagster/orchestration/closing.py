"""The closing pass of a full scan: nobody the page runs missed, nobody the CRM deleted.

A full scan (an initial sync without modified_since, or a poll of a CRM that cannot filter by
modification time) pages the CRM while people are created, changed and deleted. Page runs
fetch their pages at different times, so an offset-paged CRM can shift a person from a page not
yet fetched into one already fetched. Once every page is synced, this pass

1. walks the object type again in an order in which concurrent changes cannot make the walk
   pass over a person who exists from its start to its end, and syncs what it finds (people
   the pages already synced are unchanged and cost no Quo request):
   * keyset-paged CRMs: forward by cursor; a cursor names the last person seen, so deletes
     and creates elsewhere cannot move anyone across it;
   * offset-paged CRMs: oldest first (ascending creation or modification time, so creates and
     updates go to the end and a delete moves everyone after it one place toward the front),
     from the last page back to the first. A person's page index then only decreases while
     the walk's index decreases by exactly one per step: starting at or above the person's
     index and ending at 0, the walk must meet it.
2. sweeps (when asked): the integration's linked people the walk did not see are re-read by
   id; those the CRM no longer has lose their Quo contact (deletes.delete_people), unless that
   is more than the mass-delete guard allows without an operator's confirmation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from quo_sync_dagster.core.external_ids import quo_external_id
from quo_sync_dagster.core.models import InvalidRecord
from quo_sync_dagster.core.process import ErrorDetail, Process
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.deletes import delete_people, still_in_crm
from quo_sync_dagster.orchestration.sync import sync_records
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.store.port import Store

DEFAULT_MAX_DELETE_SHARE = 0.10
DEFAULT_MAX_DELETES = 500


@dataclass
class ClosingReport:
    walked: int = 0  # records the walk read
    pages: int = 0
    created: int = 0  # people the page runs had missed
    updated: int = 0  # people changed since their page was synced
    unchanged: int = 0
    failed: int = 0
    skipped: int = 0
    unseen: int = 0  # linked people the walk did not see
    gone: int = 0  # of those, the ones the CRM no longer has
    deleted: int = 0  # Quo contacts deleted
    held: int = 0  # deletions held back by the guard
    held_reason: str | None = None
    errors: list[ErrorDetail] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors" and v is not None} | {
            "errors": len(self.errors)
        }


@dataclass(frozen=True)
class DeleteGuard:
    max_share: float = DEFAULT_MAX_DELETE_SHARE
    max_count: int = DEFAULT_MAX_DELETES

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> DeleteGuard:
        """From `max_delete_share` (0-1) and `max_deletes`; ValueError naming a bad one."""
        share = settings.get("max_delete_share", DEFAULT_MAX_DELETE_SHARE)
        count = settings.get("max_deletes", DEFAULT_MAX_DELETES)
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
            raise ValueError(f"max_delete_share {share!r} must be a number from 0 to 1")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"max_deletes {count!r} must be an integer >= 0")
        return cls(float(share), count)

    def holds(self, deletes: int, linked: int) -> str | None:
        """Why `deletes` of `linked` contacts need an operator's confirmation (None: they
        do not)."""
        if deletes > self.max_count:
            return f"{deletes} deletions exceed max_deletes {self.max_count}"
        if linked and deletes > self.max_share * linked:
            return (
                f"{deletes} deletions are {deletes / linked:.0%} of {linked} contacts, above "
                f"max_delete_share {self.max_share:.0%}"
            )
        return None


def walk_everyone(
    connector: CRMConnector, object_type: str, page_size: int, known_records: int
) -> Iterator[list[dict[str, Any]]]:
    """Pages of every person who exists throughout the walk (see the module docstring).
    `known_records`: how many the scan counted when it began (where an offset walk starts)."""
    last_page = math.ceil(known_records / page_size)  # one past the last full page
    limit = connector.max_offset
    if connector.stable_paging == "offset" and (limit is None or last_page * page_size < limit):
        for page in range(last_page, -1, -1):
            yield connector.fetch_person_page(object_type, page, page_size, None, False).records
        return
    cursor, page = None, 0
    while True:
        result = connector.fetch_person_page(object_type, page, page_size, None, False, cursor)
        yield result.records
        if not result.has_more:
            return
        cursor, page = result.next_cursor, page + 1


def closing_pass(
    store: Store,
    connector: CRMConnector,
    client: QuoClient,
    upserter: ContactUpserter,
    process: Process,
    *,
    sweep: bool,
    confirm_deletes: bool,
) -> ClosingReport:
    integration = connector.integration
    ctx = process.context
    object_type = ctx["personObjectType"]
    report = ClosingReport()
    seen: set[str] = set()
    pages = walk_everyone(connector, object_type, ctx["pageSize"], ctx.get("totalRecords") or 0)
    for n, records in enumerate(pages):
        report.pages += 1
        report.walked += len(records)
        for record in records:
            with contextlib.suppress(InvalidRecord):  # sync_records reports it as a failure
                seen.add(quo_external_id(integration, connector.record_key(record, object_type)))
        page = f"{process.id}-closing{n}"
        result = sync_records(connector, upserter, records, object_type, page, False, store)
        report.created += result.created
        report.updated += result.updated
        report.unchanged += result.unchanged
        report.failed += result.failed
        report.skipped += result.skipped
        report.errors.extend(result.errors)
    if sweep:
        _sweep(store, connector, client, seen, confirm_deletes, report)
    return report


def _sweep(
    store: Store,
    connector: CRMConnector,
    client: QuoClient,
    seen: set[str],
    confirm_deletes: bool,
    report: ClosingReport,
) -> None:
    integration = connector.integration
    unseen = [ext for ext, _ in store.iter_contact_links(integration.id) if ext not in seen]
    report.unseen = len(unseen)
    gone = sorted(set(unseen) - set(still_in_crm(connector, unseen)))
    report.gone = len(gone)
    guard = DeleteGuard.from_settings(integration.settings)
    reason = guard.holds(len(gone), store.count_contact_links(integration.id))
    if reason and not confirm_deletes:
        report.held, report.held_reason = len(gone), reason
        return
    report.deleted = delete_people(store, client, integration, connector.quo_source, gone)
