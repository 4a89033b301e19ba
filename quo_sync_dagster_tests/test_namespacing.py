"""Integrations sharing a Quo workspace, through the Dagster jobs on a real instance, a real
SQLite store and the Quo sandbox over HTTP: externalIds namespaced per integration, links
written before namespacing migrated without twins, and one live initial sync per integration
and object type."""

from __future__ import annotations

from quo_sync_dagster.core.external_ids import crm_id_of, namespace
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, skipped_record_count
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    launch_initial_sync,
    sync_everything,
)

CRM = "scalingtest"
SOURCE = ScalingTestConnector.quo_source
RECORDS = 250


def test_two_integrations_with_overlapping_ids_each_keep_their_own_contacts(
    p: Pipeline, quo: QuoClient
) -> None:
    # Same generator settings: both CRM accounts hold the very same ids.
    first = add_integration(p, CRM, {"records": RECORDS}, integration_id="acct-a")
    second = add_integration(p, CRM, {"records": RECORDS}, integration_id="acct-b")
    good = RECORDS - skipped_record_count(RECORDS)
    for integration in (first, second):
        [process] = sync_everything(p, CRM, {"integration_id": integration.id})
        assert process.state is ProcessState.COMPLETED
        assert process.counters["created"] == process.counters["synced"] == good

    contacts = list(quo.iter_contacts(SOURCE))
    assert len(contacts) == 2 * good
    by_integration = {
        integration.id: sorted(
            crm_id
            for c in contacts
            if (crm_id := crm_id_of(integration, c["externalId"])) is not None
        )
        for integration in (first, second)
    }
    assert by_integration["acct-a"] == by_integration["acct-b"]  # the same people, twice
    assert len(set(by_integration["acct-a"])) == good
    for integration in (first, second):
        assert p.store.count_contact_links(integration.id) == good

    # A second sync of one account finds its own contacts unchanged and touches no other one.
    p.quo.reset_stats()
    [again] = sync_everything(p, CRM, {"integration_id": first.id})
    assert again.counters["unchanged"] == good
    assert p.quo.stats()["byKind"].get("patch", 0) == 0
    assert p.quo.stats()["contactsBySource"] == {SOURCE: 2 * good}


def test_links_from_before_namespacing_are_migrated_and_patched_not_duplicated(
    p: Pipeline, quo: QuoClient
) -> None:
    integration = add_integration(p, CRM, {"records": RECORDS})
    # What the product wrote before externalIds were namespaced: the bare CRM id.
    connector = open_connector(p.store, CRM, integration.id)
    page = connector.fetch_person_page("MockPerson", 0, RECORDS, None, False)
    legacy = []
    for record in page.records:
        try:
            legacy.append(connector.transform_person_to_quo(record, "MockPerson"))
        except Exception:  # the generator's deliberately bad records
            continue
    connector.close()
    assert len(legacy) > 200
    ContactUpserter(quo, p.store, integration.id).upsert(legacy)
    assert not any(link.startswith(namespace(integration)) for link, _ in _links(p))
    quo_ids = sorted(c["id"] for c in quo.iter_contacts(SOURCE))

    [process] = sync_everything(p, CRM, {"integration_id": integration.id})
    assert process.state is ProcessState.COMPLETED
    assert process.counters["updated"] == len(legacy)  # each one PATCHed once, with its new id
    assert process.counters["created"] == 0
    contacts = list(quo.iter_contacts(SOURCE))
    assert sorted(c["id"] for c in contacts) == quo_ids  # the same contacts, no twin
    assert all(c["externalId"].startswith(namespace(integration)) for c in contacts)
    assert all(link.startswith(namespace(integration)) for link, _ in _links(p))
    assert p.quo.stats()["duplicateExternalIds"] == 0


def test_a_second_live_initial_sync_of_one_integration_is_refused_naming_the_live_one(
    p: Pipeline,
) -> None:
    add_integration(p, CRM, {"records": RECORDS})
    config = {"integration_id": "it-1", "page_size": 50}
    assert launch_initial_sync(p, CRM, config).success
    [live] = p.store.list_processes(integration_id="it-1")
    assert live.state is ProcessState.PROCESSING_BATCHES

    refused = launch_initial_sync(p, CRM, config, raise_on_error=False)
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert live.id in message and "still running" in message
    assert [q.id for q in p.store.list_processes(integration_id="it-1")] == [live.id]

    # Once the live one is closed, the next launch plans a new Process.
    p.store.transition(live.id, ProcessState.ERROR, {"error": "closed by the test"})
    assert launch_initial_sync(p, CRM, config).success
    assert len(p.store.list_processes(integration_id="it-1")) == 2


def _links(p: Pipeline) -> list[tuple[str, object]]:
    return list(p.store.iter_contact_links("it-1"))
