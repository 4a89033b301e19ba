"""Every record of a page ends synced, skipped with a reason, or failed (issue 9): through the
page path (sync_records) against the Quo sandbox over loopback, then as the Process reports it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.metrics import summarize
from quo_sync_dagster.core.models import Excluded, Integration, QuoContact
from quo_sync_dagster.core.process import ErrorDetail, Process, ProcessState, SkipReason
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector
from quo_sync_dagster.orchestration.sync import sync_records
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.store import open_store

OBJ = "MockPerson"


def _filtering(connector: ScalingTestConnector, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter, as a connector leaves out records the CRM marks deleted."""
    transform = connector.transform_person_to_quo

    def filtered(person: dict[str, Any], object_type: str) -> QuoContact:
        if person.get("deleted"):
            raise Excluded("marked deleted in the CRM")
        return transform(person, object_type)

    monkeypatch.setattr(connector, "transform_person_to_quo", filtered)


def _page(connector: ScalingTestConnector) -> list[dict[str, Any]]:
    people = [connector.person(i) for i in (1, 2, 3, 13, 47, 81)]  # 13, 47: no phone kept
    fictional = {**connector.person(4), "phones": [{"type": "work", "number": "(555) 123-4567"}]}
    return [*people, fictional, {**connector.person(5), "deleted": True}, connector.person(2)]


def test_a_page_counts_synced_skipped_with_reasons_and_failed(
    sandbox: QuoSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connector = ScalingTestConnector(Integration("outcomes", "scalingtest", "env:X"))
    _filtering(connector, monkeypatch)
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    records = _page(connector)
    records[0] = {**records[0], "id": ["not", "an", "id"]}  # malformed: fails alone
    try:
        with QuoClient(sandbox.url, sandbox.api_key) as client:
            upserter = ContactUpserter(client, store, "outcomes")
            result = sync_records(connector, upserter, records, OBJ, "p0", False, store)
    finally:
        store.close()
    skips = {(e.external_id, e.skipped) for e in result.errors if e.skipped}
    assert skips == {
        ("st-0000013", SkipReason.NO_PHONE),
        ("st-0000047", SkipReason.NO_PHONE),
        ("st-0000005", SkipReason.FILTERED),
        ("st-0000002", SkipReason.DUPLICATE),  # its first occurrence; the last is synced
    }
    (failure,) = [e for e in result.errors if e.skipped is None]
    assert "id must be" in failure.error
    # 2 (its last occurrence), 3, 81 (a name from its e-mail), 4 (a fictional number, kept)
    assert (result.records, result.synced, result.skipped, result.failed) == (9, 4, 4, 1)
    assert result.unverified_phones == 1  # (555) 123-4567: possible, not valid


def test_people_without_a_phone_are_contacts_when_the_setting_says_so(
    sandbox: QuoSandbox, tmp_path: Path
) -> None:
    settings = {"sync_people_without_phone": True}
    integration = Integration("phoneless", "scalingtest", "env:X", settings=settings)
    connector = ScalingTestConnector(integration)
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    try:
        with QuoClient(sandbox.url, sandbox.api_key) as client:
            upserter = ContactUpserter(client, store, integration.id)
            result = sync_records(
                connector, upserter, [connector.person(13)], OBJ, "p0", False, store
            )
            (contact,) = client.find_by_external_ids(
                ["phoneless:st-0000013"], "scalingtest"
            ).values()
    finally:
        store.close()
    assert (result.synced, result.skipped) == (1, 0)
    assert contact["defaultFields"]["phoneNumbers"] == []


def test_a_bad_phone_policy_setting_is_refused_naming_it() -> None:
    integration = Integration("x", "scalingtest", "env:X", settings={"phone_policy": "strict"})
    with pytest.raises(ValueError, match="phone_policy must be one of"):
        ScalingTestConnector(integration)


def test_the_summary_reports_skips_apart_from_failures() -> None:
    process = Process("p", "i", "n", "CRM_SYNC", ProcessState.COMPLETED)
    process.counters.update(processed=5, synced=2, skipped=2, failed=1, adopted=1)
    errors = [
        ErrorDetail("a", "no phone number", "t", "p0", SkipReason.NO_PHONE),
        ErrorDetail("b", "Quo 400 bad", "t", "p0"),
    ]
    agg = summarize(process, errors, datetime.now(UTC))["aggregateData"]
    assert (agg["totalSynced"], agg["totalSkipped"], agg["totalFailed"]) == (2, 2, 1)
    assert agg["adopted"] == 1
    assert [e["contactId"] for e in agg["errors"]] == ["b"]
    assert agg["skipped"] == [
        {"contactId": "a", "reason": "no phone", "detail": "no phone number", "page": "p0"}
    ]
