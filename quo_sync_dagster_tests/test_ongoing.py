"""Ongoing sync through the factory's jobs and sensors on a real (temporary) Dagster instance, a
real SQLite store and the Quo sandbox over HTTP, with the ScalingTest CRM changing under it:
polling cycles from a watermark, the closing pass of full scans (nobody missed, deleted people
swept, the mass-delete guard) and webhook changes applied in any order."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from quo_sync_dagster.core.changes import ChangeKind, PersonChange
from quo_sync_dagster.core.external_ids import namespaced
from quo_sync_dagster.core.models import InvalidRecord
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, change
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.change_sync import apply_changes
from quo_sync_dagster.orchestration.sync import now_iso, sync_records
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION, TAG_OBJECT_TYPE
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    close_processes,
    launch_initial_sync,
    poll_everything,
    sync_everything,
    sync_range,
)

CRM = "scalingtest"
OBJECT = "MockPerson"


def _change(p: Pipeline, op: str, *indices: int) -> None:
    integration = p.store.get_integration("it-1")
    settings = integration.settings
    for i in indices:
        settings = change(settings, op, i)
    add_integration(p, CRM, settings)


def _connector(p: Pipeline) -> ScalingTestConnector:
    return ScalingTestConnector(p.store.get_integration("it-1"))


def _expected(p: Pipeline) -> dict[str, tuple[str | None, str | None]]:
    """externalId -> (first, last name) of every person the CRM holds that Quo can take."""
    connector = _connector(p)
    expected = {}
    for record in connector.fetch_person_page(OBJECT, 0, 10**6).records:
        try:
            contact = namespaced(
                connector.transform_person_to_quo(record, OBJECT), connector.integration
            )
        except InvalidRecord:
            continue
        expected[contact.external_id] = (contact.first_name, contact.last_name)
    return expected


def _in_quo(p: Pipeline) -> dict[str, tuple[str | None, str | None]]:
    with QuoClient(p.quo.url, "test-key") as quo:
        contacts = list(quo.iter_contacts(CRM))
    ids = [c["externalId"] for c in contacts]
    assert len(ids) == len(set(ids)), "duplicate contacts in Quo"
    return {
        c["externalId"]: (c["defaultFields"]["firstName"], c["defaultFields"]["lastName"])
        for c in contacts
    }


def _writes(p: Pipeline) -> int:
    kinds = p.quo.stats()["byKind"]
    return sum(n for kind, n in kinds.items() if kind not in ("list", "lookup", "get"))


def test_a_poll_cycle_syncs_what_changed_since_the_watermark_and_nothing_else(
    p: Pipeline,
) -> None:
    add_integration(p, CRM, {"records": 300})
    (initial,) = sync_everything(p, CRM, {"integration_id": "it-1", "page_size": 50})
    assert initial.state is ProcessState.COMPLETED
    assert p.store.get_watermark("it-1", OBJECT) == initial.context["startTime"]

    _change(p, "update", 0, 1, 2, 3, 4)
    _change(p, "create", 300, 301, 302)
    before = _writes(p)
    (cycle,), _ = poll_everything(p, CRM, {"integration_id": "it-1"})
    assert cycle.state is ProcessState.COMPLETED
    assert cycle.context["syncType"] == "ONGOING" and cycle.context["modifiedSince"]
    # Only the 8 changed people were listed, and exactly their contacts written.
    assert cycle.context["totalRecords"] == 8
    assert (cycle.counters["created"], cycle.counters["updated"]) == (3, 5)
    assert _writes(p) - before == 8
    assert _in_quo(p) == _expected(p)
    assert p.store.get_watermark("it-1", OBJECT) == cycle.context["startTime"]
    # The cycle's planning run names the Process it planned and links to its page runs.
    (poll_run,) = p.instance.get_run_records(dg.RunsFilter(job_name=f"{CRM}_poll"))
    assert poll_run.dagster_run.tags[TAG_INTEGRATION] == "it-1"
    assert poll_run.dagster_run.tags[TAG_OBJECT_TYPE] == OBJECT
    (output,) = p.instance.all_logs(
        poll_run.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT
    )
    links = output.dagster_event.step_output_data.metadata["page_runs"].value
    assert f"(/runs?q[]=tag:quo_sync/process={cycle.id})" in links

    # Nothing changed since: the overlap window lists the 8 again, and nothing is written.
    before = _writes(p)
    (quiet,), _ = poll_everything(p, CRM, {"integration_id": "it-1"})
    assert quiet.context["totalRecords"] == quiet.counters["unchanged"] == 8
    assert _writes(p) == before

    # Deletions are invisible to modified-since; a full scan's closing pass sweeps them.
    _change(p, "delete", 5, 6)
    (full,), _ = poll_everything(p, CRM, {"integration_id": "it-1", "full_scan": True})
    assert full.context["closing"]["report"]["deleted"] == 2
    assert _in_quo(p) == _expected(p)


def test_an_initial_sync_misses_nobody_while_people_before_its_pages_are_deleted(
    p: Pipeline,
) -> None:
    add_integration(p, CRM, {"records": 400})
    config = {"integration_id": "it-1", "page_size": 10, "pages_per_run": 1}
    assert launch_initial_sync(p, CRM, config).success
    (process,) = p.store.list_processes()
    assert process.context["totalPages"] == 40
    for page in range(20):
        assert sync_range(p, CRM, process.id, page, page).success
    # 15 of the people already synced are deleted: everyone after them moves 15 places up,
    # so the pages still to come start 15 people later and pass over 15 untouched people.
    _change(p, "delete", *range(15))
    for page in range(20, 40):
        assert sync_range(p, CRM, process.id, page, page).success
    missed = set(_expected(p)) - set(_in_quo(p))
    assert len(missed) == 14  # what the pages alone leave behind (213 has no phone)

    close_processes(p, CRM)
    process = p.store.get_process(process.id)
    assert process.state is ProcessState.COMPLETED
    report = process.context["closing"]["report"]
    assert report["created"] == len(missed)  # the closing walk found exactly them
    assert report["deleted"] == 14  # the deleted ones that were in Quo (13 has no phone)
    assert _in_quo(p) == _expected(p)


def test_the_mass_delete_guard_holds_a_cycle_deleting_half_until_confirmed(p: Pipeline) -> None:
    add_integration(p, CRM, {"records": 100})
    sync_everything(p, CRM, {"integration_id": "it-1"})
    _change(p, "delete", *range(50))
    before = _in_quo(p)
    (held,), closed = poll_everything(p, CRM, {"integration_id": "it-1", "full_scan": True})
    report = held.context["closing"]["report"]
    assert report["held"] == report["gone"] > 0 and report["deleted"] == 0
    assert _in_quo(p) == before  # nothing deleted
    # The completion sensor reported the failing check when it closed the cycle.
    evaluation = _check(closed, "deletions_not_held")
    assert not evaluation.passed
    assert "it-1" in evaluation.metadata["summary"].value
    assert "confirm_deletes" in evaluation.metadata["summary"].value

    config = {"integration_id": "it-1", "full_scan": True, "confirm_deletes": True}
    (confirmed,), closed = poll_everything(p, CRM, config)
    assert confirmed.context["closing"]["report"]["deleted"] == report["gone"]
    assert _in_quo(p) == _expected(p)
    assert _check(closed, "deletions_not_held").passed


def _check(result: Any, name: str) -> dg.AssetCheckEvaluation:
    (evaluation,) = [
        e
        for e in result.asset_events
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == name
    ]
    return evaluation


def test_webhook_changes_apply_the_crm_state_whatever_the_delivery_order(p: Pipeline) -> None:
    add_integration(p, CRM, {"records": 50})
    sync_everything(p, CRM, {"integration_id": "it-1"})
    _change(p, "update", 1)
    _change(p, "delete", 2)
    _change(p, "create", 60)
    upsert, delete = ChangeKind.UPSERT, ChangeKind.DELETE
    deliveries = [  # duplicated, and the delete of 2 arrives before an older update of it
        PersonChange("e1", upsert, OBJECT, "st-0000001"),
        PersonChange("e2", upsert, OBJECT, "st-0000001"),
        PersonChange("e3", delete, OBJECT, "st-0000002"),
        PersonChange("e4", upsert, OBJECT, "st-0000002"),
        PersonChange("e5", upsert, OBJECT, "st-0000060"),
    ]
    for d in deliveries:
        assert p.store.enqueue_webhook("it-1", d.event_id, {"change": d.to_payload()})
    items = p.store.claim_webhooks("it-1", 100)
    connector = _connector(p)
    with QuoClient(p.quo.url, "test-key") as quo:
        upserter = ContactUpserter(quo, p.store, "it-1")
        report = apply_changes(p.store, connector, quo, upserter, items, "run-1")
        again = apply_changes(p.store, connector, quo, upserter, items, "run-2")
    assert (report.events, report.people) == (5, 3)
    assert (report.created, report.updated, report.deleted) == (1, 1, 1)
    assert (again.created, again.updated, again.deleted) == (0, 0, 0)  # a redelivery: no-op
    assert _in_quo(p) == _expected(p)

    # A page read before the deletion cannot bring the deleted person back.
    stale = ScalingTestConnector(replace(p.store.get_integration("it-1"), settings={"records": 50}))
    with QuoClient(p.quo.url, "test-key") as quo:
        result = sync_records(
            stale,
            ContactUpserter(quo, p.store, "it-1"),
            [stale.person(2)],
            OBJECT,
            now_iso(),
            False,
            p.store,
        )
    assert result.skipped == 1 and result.created == 0
    assert "deleted in the CRM" in result.errors[0].error
    assert _in_quo(p) == _expected(p)


def _due(p: Pipeline, at: datetime) -> set[str]:
    """The integrations `scalingtest_ongoing_sync` launches a polling cycle for at `at`."""
    with dg.build_schedule_context(
        instance=p.instance, scheduled_execution_time=at, resources={"store": p.resources["store"]}
    ) as context:
        result = defs.resolve_schedule_def("scalingtest_ongoing_sync")(context)
    return set() if isinstance(result, dg.SkipReason) else {r.tags[TAG_INTEGRATION] for r in result}


def test_the_polling_schedule_waits_for_the_initial_sync_then_for_the_interval(
    p: Pipeline,
) -> None:
    integration = add_integration(p, "scalingtest", {"records": 30, "poll_interval_minutes": 120})
    config = {"integration_id": integration.id}
    assert _due(p, datetime.now(UTC)) == set()  # no sync has completed: the initial one first
    sync_everything(p, "scalingtest", config)
    assert _due(p, datetime.now(UTC)) == {integration.id}  # never polled
    poll_everything(p, "scalingtest", config)
    polled = datetime.now(UTC)
    assert _due(p, polled + timedelta(minutes=60)) == set()
    assert _due(p, polled + timedelta(minutes=121)) == {integration.id}
