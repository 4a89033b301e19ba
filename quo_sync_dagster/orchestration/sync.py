"""The sync steps themselves, free of Dagster: plan a process, turn a page into Quo contacts.

The Dagster assets call these, and so does the benchmark's bare loop, so both do the same work.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from quo_sync_dagster.core.models import InvalidRecord, PersonPage, UpsertAction
from quo_sync_dagster.core.process import ErrorDetail, PageResult, Process, ProcessState
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.secrets import resolve_secret
from quo_sync_dagster.store.port import Store

_PAGE_MARK = "-p"
MAX_PAGES = 99_999  # page keys have five digits; Dagster advises < 100k partitions per asset


def page_key(process_id: str, page: int) -> str:
    """Partition key of a page: sorts in page order and never contains `...`, `|` or `,`."""
    return f"{process_id}{_PAGE_MARK}{page:05d}"


def parse_page_key(key: str) -> tuple[str, int]:
    process_id, mark, page = key.rpartition(_PAGE_MARK)
    if not mark or not page.isdigit():
        raise ValueError(f"not a page partition key: {key!r}")
    return process_id, int(page)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def plan_initial_sync(
    store: Store,
    connector: CRMConnector,
    quo: QuoClient,
    object_type: str,
    page_size: int,
    pages_per_run: int,
    modified_since: datetime | None = None,
) -> Process:
    """INITIALIZING -> FETCHING_TOTAL (page 0 gives the total) -> QUEUING_PAGES. The caller adds
    the partitions and then moves the process to PROCESSING_BATCHES."""
    integration = connector.integration
    sync_config = connector.crm_config.sync_config
    process_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    process = store.create_process(
        Process(
            id=process_id,
            integration_id=integration.id,
            name=f"{integration.id}-{object_type}-sync",
            type="CRM_SYNC",
            state=ProcessState.INITIALIZING,
            context={
                "crm": connector.name,
                "syncType": "INITIAL",
                "personObjectType": object_type,
                "pageSize": page_size,
                "pagesPerRun": pages_per_run,
                "sortDesc": sync_config.reverse_chronological,
                "launchLastPageFirst": (
                    sync_config.reverse_chronological and sync_config.lists_oldest_first
                ),
                "modifiedSince": modified_since.isoformat() if modified_since else None,
                "startTime": now_iso(),
            },
        )
    )
    try:
        store.transition(process_id, ProcessState.FETCHING_TOTAL)
        first = connector.fetch_person_page(
            object_type, 0, page_size, modified_since, process.context["sortDesc"]
        )
        if first.total is not None:  # pages can be fetched by index: fan out in parallel
            total, total_pages, cursors = first.total, math.ceil(first.total / page_size), None
        else:  # no total (and maybe cursor paging): walk the pages once, noting each cursor
            total, cursors = _walk_pages(connector, process.context, first, modified_since)
            total_pages = len(cursors) if total else 0
        return store.transition(
            process_id,
            ProcessState.QUEUING_PAGES,
            {
                "totalRecords": total,
                "totalPages": total_pages,
                "pageCursors": cursors,
                # Nobody else writes this source, so unmapped contacts can skip the lookup.
                "quoSourceEmptyAtStart": not quo.has_contacts_from(connector.quo_source),
            },
        )
    except Exception as exc:
        store.transition(
            process_id, ProcessState.ERROR, {"error": str(exc), "errorTimestamp": now_iso()}
        )
        raise


def _walk_pages(
    connector: CRMConnector,
    ctx: dict[str, Any],
    first: PersonPage,
    modified_since: datetime | None,
) -> tuple[int, list[str | None]]:
    """(records, the cursor that fetches each page). Costs one extra read of every page, cheap
    next to the Quo writes, so that the pages can then be synced by parallel runs."""
    cursors: list[str | None] = [None]
    total, page = len(first.records), first
    while page.has_more:
        if len(cursors) >= MAX_PAGES:
            raise ValueError(f"{connector.name} still had more pages after {MAX_PAGES}")
        cursors.append(page.next_cursor)
        page = connector.fetch_person_page(
            ctx["personObjectType"],
            len(cursors) - 1,
            ctx["pageSize"],
            modified_since,
            ctx["sortDesc"],
            cursor=page.next_cursor,
        )
        total += len(page.records)
    return total, cursors


def fetch_page_frame(connector: CRMConnector, process: Process, page: int) -> pd.DataFrame:
    ctx = process.context
    since = datetime.fromisoformat(ctx["modifiedSince"]) if ctx.get("modifiedSince") else None
    cursors = ctx.get("pageCursors")
    result = connector.fetch_person_page(
        ctx["personObjectType"],
        page,
        ctx["pageSize"],
        since,
        ctx["sortDesc"],
        cursor=cursors[page] if cursors else None,
    )
    # dtype=object keeps values as the CRM sent them (no None -> NaN, no int -> float).
    return pd.DataFrame(result.records, dtype=object)


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The CRM's records again: a field a record lacked comes back absent, not as NaN (JSON has
    no NaN, so a NaN can only be pandas filling a column)."""
    return [
        {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        for row in frame.to_dict("records")
    ]


def sync_records(
    connector: CRMConnector,
    upserter: ContactUpserter,
    records: Sequence[dict[str, Any]],
    object_type: str,
    page: str,
    assume_absent: bool,
) -> PageResult:
    """Transform and upsert one page. Bad records become per-record errors; QuoUnavailable
    propagates so the caller can fail the page as a whole."""
    contacts, errors = [], []
    for record in records:
        try:
            contacts.append(connector.transform_person_to_quo(record, object_type))
        except Exception as exc:  # one odd record must not fail the page of good ones
            message = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
            errors.append(ErrorDetail(connector.person_id(record), message, now_iso(), page))
    outcomes = upserter.upsert(contacts, assume_absent=assume_absent)
    counts = dict.fromkeys(UpsertAction, 0)
    for outcome in outcomes:
        counts[outcome.action] += 1
        if outcome.error:
            errors.append(ErrorDetail(outcome.external_id, outcome.error, now_iso(), page))
    return PageResult(
        records=len(records),
        synced=len(records) - len(errors),  # an id repeated inside a page counts as synced
        failed=len(errors),
        created=counts[UpsertAction.CREATED],
        updated=counts[UpsertAction.UPDATED],
        unchanged=counts[UpsertAction.UNCHANGED],
        errors=tuple(errors),
    )


def failed_page(records: int, page: str, error: str) -> PageResult:
    return PageResult(
        records=records,
        synced=0,
        failed=0,
        ok=False,
        errors=(ErrorDetail(None, f"page failed: {error}", now_iso(), page),),
    )


def open_connector(store: Store, crm: str, integration_id: str) -> CRMConnector:
    """The integration's connector with its CRM credential and the governor shared by every
    run that uses that credential."""
    integration = store.get_integration(integration_id)
    if integration.crm != crm:
        raise ValueError(
            f"integration {integration_id!r} is a {integration.crm} integration, not {crm}"
        )
    cls = connector_class(crm)
    credential = (
        resolve_secret(integration.crm_credential_ref) if integration.crm_credential_ref else None
    )
    rps = cls.crm_config.requests_per_second
    throttle = RateGovernor(store, credential, rps, api=crm) if credential and rps else None
    return cls(integration, credential, throttle)
