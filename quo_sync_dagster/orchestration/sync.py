"""The sync steps themselves, free of Dagster: plan a process, turn a page into Quo contacts.

The Dagster assets call these, and so does the benchmark's bare loop, so both do the same work.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from quo_sync_dagster.core.adoption import AdoptionRules
from quo_sync_dagster.core.external_ids import namespaced, quo_external_id
from quo_sync_dagster.core.models import (
    Excluded,
    Integration,
    InvalidRecord,
    NoPhone,
    PersonPage,
    QuoContact,
    UpsertAction,
)
from quo_sync_dagster.core.phones import is_valid
from quo_sync_dagster.core.process import (
    ErrorDetail,
    PageResult,
    Process,
    ProcessState,
    SkipReason,
    cap_text,
)
from quo_sync_dagster.core.sanitize import clean
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.secrets import resolve_secret
from quo_sync_dagster.store.port import NotFound, Store

_PAGE_MARK = "-p"
MAX_PAGES = 99_999  # page keys have five digits; Dagster advises < 100k partitions per asset
WALK_KEY = "walk"  # the checkpoint of a walk in progress, in the Process context
WALK_CHECKPOINT_PAGES = 5


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


def plan_sync(
    store: Store,
    connector: CRMConnector,
    quo: QuoClient,
    object_type: str,
    page_size: int,
    pages_per_run: int,
    modified_since: datetime | None = None,
    plan_run_id: str | None = None,
    last_attempt: bool = True,
    sync_type: str = "INITIAL",
    context: dict[str, Any] | None = None,
) -> Process:
    """INITIALIZING -> FETCHING_TOTAL (page 0 gives the total) -> QUEUING_PAGES. The caller adds
    the partitions and then moves the process to PROCESSING_BATCHES. `sync_type` is INITIAL or
    ONGOING (a polling cycle); `context` is added to the new Process's context.

    One live Process per sync type, integration and object type: a second one raises
    AlreadyRunning naming the live one. A failed attempt of run `plan_run_id` leaves its Process in
    FETCHING_TOTAL with the walk's last checkpoint, and the next attempt of the same run resumes
    it; the last attempt's failure closes the Process as ERROR."""
    integration = connector.integration
    process = _planned_by(store, integration.id, object_type, plan_run_id)
    if process is not None and process.state is not ProcessState.FETCHING_TOTAL:
        return process  # an earlier attempt of this run planned it
    if process is None:
        process = _new_process(store, connector, object_type, page_size, pages_per_run)
        process.context.update(
            **(context or {}),
            syncType=sync_type,
            modifiedSince=modified_since.isoformat() if modified_since else None,
            planRunId=plan_run_id,
        )
        process = store.create_process(
            process, exclusive_key=f"{sync_type.lower()}:{integration.id}:{object_type}"
        )
        process = store.transition(process.id, ProcessState.FETCHING_TOTAL)
    try:
        return store.transition(
            process.id,
            ProcessState.QUEUING_PAGES,
            {
                **_count_pages(store, connector, process, modified_since),
                # Nobody else writes this source, so unmapped contacts can skip the lookup,
                # unless an earlier system's contacts are to be adopted. A polling cycle
                # follows a completed sync: no request to ask.
                "quoSourceEmptyAtStart": sync_type == "INITIAL"
                and not AdoptionRules.from_settings(integration.settings).configured
                and not quo.has_contacts_from(connector.quo_source),
            },
        )
    except Exception as exc:
        if last_attempt:
            store.transition(
                process.id,
                ProcessState.ERROR,
                {"error": cap_text(str(exc)), "errorTimestamp": now_iso()},
            )
        raise


def _new_process(
    store: Store, connector: CRMConnector, object_type: str, page_size: int, pages_per_run: int
) -> Process:
    sync_config = connector.crm_config.sync_config
    return Process(
        id=f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
        integration_id=connector.integration.id,
        name=f"{connector.integration.id}-{object_type}-sync",
        type="CRM_SYNC",
        state=ProcessState.INITIALIZING,
        context={
            "crm": connector.name,
            "personObjectType": object_type,
            "pageSize": page_size,
            "pagesPerRun": pages_per_run,
            "sortDesc": sync_config.reverse_chronological,
            "launchLastPageFirst": (
                sync_config.reverse_chronological and sync_config.lists_oldest_first
            ),
            "startTime": now_iso(),
        },
    )


def _planned_by(
    store: Store, integration_id: str, object_type: str, plan_run_id: str | None
) -> Process | None:
    if plan_run_id is None:
        return None
    for process in store.list_processes(integration_id=integration_id):
        ctx = process.context
        if ctx.get("planRunId") == plan_run_id and ctx.get("personObjectType") == object_type:
            return process
    return None


def _count_pages(
    store: Store, connector: CRMConnector, process: Process, modified_since: datetime | None
) -> dict[str, Any]:
    ctx = process.context
    first = None
    if WALK_KEY not in ctx:
        first = connector.fetch_person_page(
            ctx["personObjectType"], 0, ctx["pageSize"], modified_since, ctx["sortDesc"]
        )
        if first.total is not None:  # pages can be fetched by index: fan out in parallel
            pages = math.ceil(first.total / ctx["pageSize"])
            return {"totalRecords": first.total, "totalPages": pages, "pageCursors": None}
    # No total (and maybe cursor paging): walk the pages once, noting each cursor.
    total, cursors = _walk_pages(store, connector, process, first, modified_since)
    return {
        "totalRecords": total,
        "totalPages": len(cursors) if total else 0,
        "pageCursors": cursors,
    }


def _walk_pages(
    store: Store,
    connector: CRMConnector,
    process: Process,
    first: PersonPage | None,
    modified_since: datetime | None,
) -> tuple[int, list[str | None]]:
    """(records, the cursor that fetches each page). Costs one extra read of every page, cheap
    next to the Quo writes, so that the pages can then be synced by parallel runs. Every
    WALK_CHECKPOINT_PAGES pages the walk is checkpointed in the Process context, so a walk
    that fails resumes from its last good cursor instead of page 0."""
    ctx = process.context
    walk = ctx.get(WALK_KEY) or {"cursors": [None], "records": 0}
    # cursors[-1] fetches the next page; records counts the pages before it.
    cursors: list[str | None] = list(walk["cursors"])
    records: int = walk["records"]
    page = first
    while True:
        if page is None:
            page = connector.fetch_person_page(
                ctx["personObjectType"],
                len(cursors) - 1,
                ctx["pageSize"],
                modified_since,
                ctx["sortDesc"],
                cursor=cursors[-1],
            )
        records += len(page.records)
        if not page.has_more:
            return records, cursors
        if len(cursors) >= MAX_PAGES:
            raise ValueError(f"{connector.name} still had more pages after {MAX_PAGES}")
        cursors.append(page.next_cursor)
        page = None
        if len(cursors) % WALK_CHECKPOINT_PAGES == 0:
            store.update_context(process.id, {WALK_KEY: {"cursors": cursors, "records": records}})


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
    store: Store | None = None,
    match_phones: bool = False,
) -> PageResult:
    """Transform and upsert one page, each record on its own: whatever a record holds fails
    only that record, with an error naming the person (and, from the transform, the field).
    Records not sent on purpose are skipped with a SkipReason: a person without a phone
    (NoPhone), one a connector's filter leaves out (Excluded), the earlier occurrences of a
    person repeated in the page (its last one is synced, as the upserter would) and, with
    `store`, people with a tombstone (deleted in the CRM after this page was fetched, so a
    stale page cannot bring them back). A skipped person whose contact Quo holds from an
    earlier sync is withdrawn from Quo. records == synced + failed + skipped.
    `match_phones`: an initial sync's page, whose people may match an earlier system's
    contacts by phone number (quo/upsert.py).
    The connector's prepare_page runs first; its failure, like QuoUnavailable, propagates so
    the caller can fail the page as a whole."""
    errors: list[ErrorDetail] = []

    def note(person: str, message: str, skipped: SkipReason | None = None) -> None:
        # Errors quote CRM data, which may hold lone surrogates that no store can encode.
        errors.append(
            ErrorDetail(clean(person, None), clean(message, None), now_iso(), page, skipped)
        )

    connector.prepare_page(records, object_type)
    latest: dict[str, QuoContact] = {}  # Quo externalId -> the contact of its last occurrence
    names: dict[str, str] = {}  # Quo externalId -> how errors name that occurrence
    # (Quo externalId or None when unreadable, person, why, reason) of people left out of Quo
    left_out: list[tuple[str | None, str, str, SkipReason]] = []
    failed = skipped = 0
    for n, record in enumerate(records):
        try:
            person = connector.person_id(record)
        except Exception:  # a name for errors only: it must not be a failure of its own
            person = f"record {n} of page {page}"
        try:
            contact = namespaced(
                connector.transform_person_to_quo(record, object_type), connector.integration
            )
            # The write's own encoding (httpx: no NaN, UTF-8) and the hash, done now: a contact
            # either fails here, as this record's failure, or is one Quo can be sent.
            json.dumps(contact.to_api_body(), ensure_ascii=False, allow_nan=False).encode()
            contact.content_hash()
        except (NoPhone, Excluded) as exc:
            skipped += 1
            ext_id = None
            with contextlib.suppress(InvalidRecord):
                key = connector.record_key(record, object_type)
                ext_id = quo_external_id(connector.integration, key)
            why = SkipReason.NO_PHONE if isinstance(exc, NoPhone) else SkipReason.FILTERED
            left_out.append((ext_id, person, str(exc), why))
            continue
        except Exception as exc:  # one odd record must not fail the page of good ones
            message = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
            note(person, message)
            failed += 1
            continue
        if (ext_id := contact.external_id) in latest:
            note(names[ext_id], "its last occurrence in the page is synced", SkipReason.DUPLICATE)
            skipped += 1
        latest[ext_id], names[ext_id] = contact, person
    if store is not None:
        for ext_id in store.get_tombstones(connector.integration.id, list(latest)):
            note(names[ext_id], "deleted in the CRM after this page was read", SkipReason.DELETED)
            skipped += 1
            del latest[ext_id]
    outcomes = upserter.upsert(
        list(latest.values()), assume_absent=assume_absent, match_phones=match_phones
    )
    # A person who lost their last number, or whom a filter now leaves out, leaves Quo too
    # (unless an earlier occurrence in this page was just synced).
    leaving = [e for e, _, _, _ in left_out if e is not None and e not in latest]
    gone = set(upserter.withdraw(leaving)) if store else set()
    for ext_id, person, why, reason in left_out:
        withdrawn = "; their Quo contact was deleted" if ext_id in gone else ""
        note(person, why + withdrawn, reason)
    counts = Counter(outcome.action for outcome in outcomes)
    for outcome in outcomes:
        if outcome.action is UpsertAction.FAILED:
            note(names.get(outcome.external_id, outcome.external_id), outcome.error or "failed")
    kept = [latest[o.external_id] for o in outcomes if o.action is not UpsertAction.FAILED]
    return PageResult(
        records=len(records),
        synced=len(outcomes) - counts[UpsertAction.FAILED],
        failed=failed + counts[UpsertAction.FAILED],
        created=counts[UpsertAction.CREATED],
        updated=counts[UpsertAction.UPDATED],
        unchanged=counts[UpsertAction.UNCHANGED],
        skipped=skipped,
        adopted=counts[UpsertAction.ADOPTED],
        adoption_candidates=sum(o.candidate is not None for o in outcomes),
        # Kept as possible, not valid today: a warning, never part of the hash.
        unverified_phones=sum(not is_valid(p.value) for c in kept for p in c.phone_numbers),
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


LISTED_IDS = 20  # ids a message or the launchpad names; past it, "and N more"


def listed(ids: Sequence[str], limit: int = LISTED_IDS) -> str:
    """`a, b, c` (the first `limit`, then "and N more"); "none" for no id."""
    if not ids:
        return "none"
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


def integration_of(store: Store, crm: str, integration_id: str) -> Integration:
    """The `crm` integration `integration_id`. An unknown id (NotFound) or another CRM's
    integration (ValueError) names the ids registered for `crm` (ids only: no secret)."""
    try:
        integration = store.get_integration(integration_id)
    except NotFound:
        raise NotFound(
            f"integration {integration_id!r} is not registered for {crm}; "
            f"{_registered_hint(store, crm)}"
        ) from None
    if integration.crm != crm:
        raise ValueError(
            f"integration {integration_id!r} is a {integration.crm} integration, not {crm}; "
            f"{_registered_hint(store, crm)}"
        )
    return integration


def _registered_hint(store: Store, crm: str) -> str:
    ids = [i.id for i in store.list_integrations(crm=crm)]
    return f"registered: {listed(ids)}; add one with `quo-sync integrations add --crm {crm}`"


def open_connector(store: Store, crm: str, integration_id: str) -> CRMConnector:
    """The integration's connector with its CRM credential and the governor shared by every
    run that uses that credential."""
    integration = integration_of(store, crm, integration_id)
    cls = connector_class(crm)
    credential = (
        resolve_secret(integration.crm_credential_ref) if integration.crm_credential_ref else None
    )
    rps = cls.crm_config.requests_per_second
    throttle = RateGovernor(store, credential, rps, api=crm) if credential and rps else None
    return cls(integration, credential, throttle)
