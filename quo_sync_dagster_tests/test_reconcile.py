"""Reconciliation on a real Dagster instance, a real SQLite store and the Quo sandbox over HTTP:
contacts deleted in Quo are restored by the next sync exactly once, unlinked contacts of the
integration are adopted, and the schedule launches a run only when one is due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from quo_sync_dagster.core.external_ids import namespace
from quo_sync_dagster.core.models import ContactLink, Integration
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector
from quo_sync_dagster.orchestration.reconcile import (
    SAMPLE_IDS,
    build_reconcile_definitions,
    reconcile_run_request,
)
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster_tests.pipeline import Pipeline, add_integration, sync_everything

CRM = "scalingtest"
SOURCE = ScalingTestConnector.quo_source
JOB = f"{CRM}_reconcile"
SCHEDULE = f"{CRM}_reconcile_schedule"
RECONCILE = build_reconcile_definitions(ScalingTestConnector)


def reconcile_defs(p: Pipeline) -> dg.Definitions:
    """The reconcile job and schedule as a CRM's Definitions carry them, with the resources."""
    resources = {name: p.resources[name] for name in ("store", "quo")}
    return dg.Definitions.merge(RECONCILE, dg.Definitions(resources=resources))


def run_reconcile(
    p: Pipeline, integration_id: str, tagged: bool = True, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """A run as the completion sensor requests it; untagged: as launched from the launchpad."""
    request = reconcile_run_request(CRM, integration_id, process_id="p-test")
    assert request.job_name == JOB
    job = reconcile_defs(p).resolve_job_def(JOB)
    return job.execute_in_process(
        run_config=request.run_config,
        instance=p.instance,
        tags=request.tags if tagged else None,
        raise_on_error=raise_on_error,
    )


def report_of(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [output] = [e for e in result.all_node_events if e.is_successful_output]
    return {k: v.value for k, v in output.step_output_data.metadata.items()}


def sync(p: Pipeline, integration: Integration) -> dict[str, int]:
    [process] = sync_everything(p, CRM, {"integration_id": integration.id})
    assert process.state is ProcessState.COMPLETED
    return process.counters


def test_contacts_deleted_in_quo_are_restored_exactly_once(p: Pipeline, quo: QuoClient) -> None:
    integration = add_integration(p, CRM, {"records": 450})
    synced = sync(p, integration)["synced"]
    contacts = list(quo.iter_contacts(SOURCE))
    assert len(contacts) == synced > 400
    deleted = contacts[3::20][:20]
    for contact in deleted:
        quo.delete_contact(contact["id"])
    deleted_ids = sorted(c["externalId"] for c in deleted)
    kept = {c["externalId"]: c for c in contacts if c not in deleted}

    result = run_reconcile(p, integration.id)
    assert result.success
    report = report_of(result)
    assert report == {
        "linked": synced,
        "in_quo": synced - 20,
        "missing_in_quo": 20,
        "restored_links_dropped": 20,
        "strays": 0,
        "adopted": 0,
        "foreign": 0,
        "missing_in_quo_first": deleted_ids[:SAMPLE_IDS],
        "strays_first": [],
    }
    assert p.quo.api_key not in repr(report)
    assert p.store.get_contact_links(integration.id, deleted_ids) == {}
    assert p.store.count_contact_links(integration.id) == synced - 20
    tags = p.instance.get_run_by_id(result.run_id).tags
    assert (tags[TAG_CRM], tags[TAG_INTEGRATION]) == (CRM, integration.id)

    p.quo.reset_stats()
    counters = sync(p, integration)
    assert (counters["created"], counters["updated"]) == (20, 0)
    assert counters["unchanged"] == synced - 20
    stats = p.quo.stats()
    assert (stats["byKind"]["create"], stats["byKind"]["patch"]) == (20, 0)
    assert stats["duplicateExternalIds"] == 0
    assert stats["contactsBySource"] == {SOURCE: synced}
    after = {c["externalId"]: c for c in quo.iter_contacts(SOURCE)}
    assert sorted(set(after) - set(kept)) == deleted_ids
    assert all(after[ext] == contact for ext, contact in kept.items())  # not rewritten
    restored = p.store.get_contact_links(integration.id, deleted_ids)
    assert {ext: link.quo_id for ext, link in restored.items()} == {
        ext: after[ext]["id"] for ext in deleted_ids
    }

    # Nothing is lost any more: a second reconcile finds nothing to do.
    again = report_of(run_reconcile(p, integration.id))
    assert (again["missing_in_quo"], again["strays"], again["in_quo"]) == (0, 0, synced)


def test_unlinked_contact_in_the_namespace_is_adopted_and_patched(
    p: Pipeline, quo: QuoClient
) -> None:
    integration = add_integration(p, CRM, {"records": 60})
    synced = sync(p, integration)["synced"]
    person = next(c for c in quo.iter_contacts(SOURCE) if c["externalId"].endswith("7"))
    ext = person["externalId"]
    # As if the sync never stored this person's link, and Quo holds an older version of them.
    quo.delete_contact(person["id"])
    p.store.delete_contact_links(integration.id, [ext])
    stale = quo.create_contact(
        {"externalId": ext, "source": SOURCE, "defaultFields": {"firstName": "Stale"}}
    )
    # Neither of these belongs to the integration: counted, never adopted.
    quo.create_contact(
        {"externalId": "other-int:7", "source": SOURCE, "defaultFields": {"firstName": "Other"}}
    )
    quo.create_contact({"source": SOURCE, "defaultFields": {"firstName": "No id"}})
    assert ext.startswith(namespace(integration))

    report = report_of(run_reconcile(p, integration.id))
    assert report["strays"] == report["adopted"] == 1
    assert report["strays_first"] == [ext]
    assert (report["foreign"], report["missing_in_quo"]) == (2, 0)
    assert (report["linked"], report["in_quo"]) == (synced - 1, synced)
    assert p.store.get_contact_links(integration.id, [ext]) == {ext: ContactLink(stale["id"], "")}

    p.quo.reset_stats()
    counters = sync(p, integration)
    assert (counters["created"], counters["updated"]) == (0, 1)
    stats = p.quo.stats()
    assert (stats["byKind"]["create"], stats["byKind"]["patch"]) == (0, 1)
    assert stats["duplicateExternalIds"] == 0
    patched = quo.get_contact(stale["id"])
    assert patched["externalId"] == ext
    for name in ("firstName", "lastName", "company"):
        assert patched["defaultFields"][name] == person["defaultFields"][name]

    def phones(contact: dict[str, Any]) -> list[tuple[str, str]]:
        return [(n["name"], n["value"]) for n in contact["defaultFields"]["phoneNumbers"]]

    assert phones(patched) == phones(person) != []


def evaluate_schedule(p: Pipeline, at: datetime) -> list[dg.RunRequest]:
    with dg.build_schedule_context(
        instance=p.instance,
        scheduled_execution_time=at,
        resources={"store": p.resources["store"]},
    ) as context:
        result = reconcile_defs(p).resolve_schedule_def(SCHEDULE)(context)
    return [] if isinstance(result, dg.SkipReason) else list(result)


def test_schedule_launches_a_run_per_integration_when_due(p: Pipeline) -> None:
    add_integration(p, CRM, {}, "daily")  # the default: every 24 hours
    add_integration(p, CRM, {"reconcile_interval_hours": 2}, "two-hourly")
    add_integration(p, CRM, {"reconcile_interval_hours": 0}, "off")
    add_integration(p, CRM, {"reconcile_interval_hours": "soon"}, "bad-setting")
    add_integration(p, "pipedrive", {}, "other-crm")
    broken = Integration("no-key", CRM, "env:QUO_SYNC_TEST_UNSET_KEY", p.quo.url)
    p.store.upsert_integration(broken)

    now = datetime.now(UTC).replace(microsecond=0)
    first = evaluate_schedule(p, now)
    assert {r.tags[TAG_INTEGRATION] for r in first} == {"daily", "two-hourly", "no-key"}
    for request in first:
        integration_id = request.tags[TAG_INTEGRATION]
        assert request.run_key == f"{integration_id}:{now:%Y-%m-%dT%H:%M}"
        assert request.tags[TAG_CRM] == CRM
        op_config = request.run_config["ops"][f"{CRM}_reconcile_contacts"]["config"]
        assert op_config == {"integration_id": integration_id}
        # The daily one as from the launchpad: its run gets the integration tag from the op.
        tagged = integration_id != "daily"
        result = run_reconcile(p, integration_id, tagged, raise_on_error=False)
        assert result.success is (integration_id != "no-key")
        assert p.instance.get_run_by_id(result.run_id).tags[TAG_INTEGRATION] == integration_id

    def due(hours: float) -> set[str]:
        return {r.tags[TAG_INTEGRATION] for r in evaluate_schedule(p, now + timedelta(hours=hours))}

    assert due(1) == {"no-key"}  # its run failed: tried again at the next tick
    assert due(3) == {"two-hourly", "no-key"}
    assert due(25) == {"daily", "two-hourly", "no-key"}


def test_contacts_adopted_under_their_earlier_ids_keep_their_links(
    p: Pipeline, quo: QuoClient
) -> None:
    """With `adopt_rewrites_ids` off, adopted contacts stay under the earlier system's source:
    reconcile must count them as present, not drop their links as deleted in Quo."""
    legacy = "openphone-scalingtest"
    settings = {"records": 120, "legacy_sources": [legacy], "adopt_rewrites_ids": False}
    integration = add_integration(p, CRM, settings)
    connector = ScalingTestConnector(integration)
    bodies = []
    for i in range(0, 120, 4):
        try:
            contact = connector.transform_person_to_quo(connector.person(i), "MockPerson")
        except ValueError:  # a person without a phone: the earlier sync skipped them too
            continue
        bodies.append(contact.to_api_body() | {"source": legacy})  # its id was the CRM's own
    p.quo.prefill_contacts(bodies)
    counters = sync(p, integration)
    assert counters["adopted"] == len(bodies)
    assert p.quo.stats()["contactsBySource"][legacy] == len(bodies)  # ids left as they were

    report = report_of(run_reconcile(p, integration.id))
    assert (report["missing_in_quo"], report["restored_links_dropped"]) == (0, 0)
    assert p.store.count_contact_links(integration.id) == counters["synced"]
    p.quo.reset_stats()
    again = sync(p, integration)
    assert again["unchanged"] == counters["synced"] and p.quo.stats()["byKind"]["patch"] == 0
