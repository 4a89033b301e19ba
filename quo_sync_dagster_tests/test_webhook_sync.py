"""CRM webhooks through the whole path on a temporary Dagster instance: the Pipedrive simulator
sends signed deliveries (duplicated and reordered) to the real receiver, which stores them in the
inbox; `pipedrive_webhook_sensor` claims them and its `pipedrive_webhook_sync` runs make Quo equal
to the CRM. A run that fails has its items released and applied by a later run; a lingering run
applies what arrives while it runs. The integration lingers 0 s unless a test says otherwise, so
each run ends with its items."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest

from quo_sync_dagster.core.changes import ChangeKind, PersonChange
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms.pipedrive import PipedriveConnector
from quo_sync_dagster.differential import Differential, differential
from quo_sync_dagster.orchestration.sync import now_iso
from quo_sync_dagster.orchestration.webhook_sync import QUEUE_URL_ENV
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.pipedrive_server import DEFAULT_TOKEN, PipedriveSandbox
from quo_sync_dagster.webhooks.app import ReceiverServer, create_app
from quo_sync_dagster.webhooks.inbox import InboxEntry
from quo_sync_dagster.webhooks.sqs import SqsInbox
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    evaluate_sensor,
    pipeline,
    poll_everything,
    run_request,
    sync_everything,
)

CRM = "pipedrive"
SENSOR = f"{CRM}_webhook_sensor"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    monkeypatch.setenv("PIPEDRIVE_TEST_TOKEN", DEFAULT_TOKEN)
    with (
        PipedriveSandbox(tmp_path / "pipedrive", records=60, rate_limit=None) as sim,
        pipeline(tmp_path, monkeypatch) as p,
        ReceiverServer(create_app(p.store)) as receiver,
    ):
        integration = add_integration(
            p,
            CRM,
            {"base_url": sim.url, "webhook_linger_seconds": 0},
            crm_credential_ref="env:PIPEDRIVE_TEST_TOKEN",
        )
        sync_everything(p, CRM, {"integration_id": integration.id})
        connector = PipedriveConnector(integration, DEFAULT_TOKEN)
        url = f"{receiver.url}/webhooks/crm/{CRM}/{integration.id}"
        p.store.put_webhook_subscription(
            integration.id,
            {
                "crm": CRM,
                "receiverUrl": receiver.url,
                "createdAt": now_iso(),
                "expiresAt": None,
                "secretRef": None,
                "details": connector.setup_webhooks(url),
            },
        )
        yield p, sim, integration
        connector.close()


def _diff(p: Pipeline, sim: PipedriveSandbox, integration: Integration) -> Differential:
    with QuoClient(p.quo.url, "test-key") as quo:
        contacts = list(quo.iter_contacts(CRM))
    people = [("Person", person) for person in sim.people()]
    with closing(PipedriveConnector(integration, DEFAULT_TOKEN)) as connector:
        return differential(connector, people, contacts)


def _delivered(sim: PipedriveSandbox, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = sim.deliveries()
        if stats["sent"] + stats["failed"] >= count and not stats["pending"]:
            assert stats["failed"] == 0
            return
        time.sleep(0.1)
    pytest.fail(f"deliveries did not arrive: {sim.deliveries()}")


def _config(request: dg.RunRequest) -> dict[str, Any]:
    return request.run_config["ops"][f"{CRM}_apply_webhook_changes"]["config"]


def test_crm_changes_reach_quo_once_whatever_the_deliveries_do(setup: tuple[Any, ...]) -> None:
    p, sim, integration = setup
    initial = _diff(p, sim, integration)
    assert initial.exact
    ids = [str(person["id"]) for person in sim.people()[:4]]
    sim.webhook_faults(duplicate=5, reorder=4)  # every delivery twice, the first four reversed
    sim.create_person({"first_name": "Nova", "last_name": "Quinn"})
    sim.update_person(ids[0], {"first_name": "Renamed"})
    sim.delete_person(ids[1])
    sim.merge_people(ids[2], into=ids[3])
    _delivered(sim, 10)  # 5 events (a merge is two), each sent twice

    result = evaluate_sensor(p, SENSOR)
    (request,) = result.run_requests
    assert request.tags["quo_sync/integration"] == integration.id
    assert _config(request)["linger_seconds"] == 0  # the integration's setting
    assert run_request(p, request).success
    diff = _diff(p, sim, integration)
    assert diff.exact, diff.result()
    assert diff.crm_people == initial.crm_people + 1 - 2  # created; deleted and merged away
    # Everything was acknowledged: the next tick has nothing to launch.
    again = evaluate_sensor(p, SENSOR, cursor=result.cursor)
    assert not again.run_requests


def test_a_failed_webhook_run_is_applied_again_by_a_later_run(setup: tuple[Any, ...]) -> None:
    p, sim, integration = setup
    person = str(sim.people()[0]["id"])
    sim.update_person(person, {"last_name": "Afterfault"})
    _delivered(sim, 1)
    first = evaluate_sensor(p, SENSOR)
    (request,) = first.run_requests
    p.quo.inject_fault(status=503, count=10_000)  # Quo down for the whole run
    assert not run_request(p, request).success
    p.quo.clear_faults()
    assert _diff(p, sim, integration).stale  # the change is not in Quo yet

    second = evaluate_sensor(p, SENSOR, cursor=first.cursor)  # releases the failed run's items
    (retry,) = second.run_requests
    assert retry.run_key != request.run_key
    assert run_request(p, retry).success
    assert _diff(p, sim, integration).exact


def test_deliveries_a_separate_receiver_put_in_sqs_reach_quo(
    setup: tuple[Any, ...], aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, sim, integration = setup
    queue = boto3.client("sqs").create_queue(QueueName="hooks")["QueueUrl"]
    monkeypatch.setenv(QUEUE_URL_ENV, queue)
    person = str(sim.people()[0]["id"])
    sim.update_person(person, {"last_name": "ViaSqs"})
    change = PersonChange("ev-sqs-1", ChangeKind.UPSERT, "Person", person)
    inbox = SqsInbox(queue)  # what a receiver deployed apart from Dagster writes
    assert inbox.enqueue(
        [InboxEntry(integration.id, change.event_id, {"change": change.to_payload()})]
    ) == [True]
    inbox.close()
    result = evaluate_sensor(p, SENSOR)  # drains the queue into the store, then claims
    (request,) = result.run_requests
    assert run_request(p, request).success
    assert _diff(p, sim, integration).exact


def test_a_lost_delivery_is_found_by_the_gap_fill_poll_and_counted(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    people = sim.people()
    sim.webhook_faults(drop=2)  # both deliveries are lost
    sim.update_person(str(people[0]["id"]), {"last_name": "NeverDelivered"})
    sim.delete_person(str(people[1]["id"]))
    _delivered(sim, 0)
    assert not evaluate_sensor(p, SENSOR).run_requests  # nothing arrived
    # With webhooks the poll is a full scan: the change is synced, the deletion swept.
    (cycle,), closed = poll_everything(p, CRM, {"integration_id": integration.id})
    assert cycle.context["syncType"] == "ONGOING" and not cycle.context["modifiedSince"]
    (event,) = [e for e in closed.asset_events if isinstance(e, dg.AssetMaterialization)]
    assert event.metadata["changes_missed_by_webhooks"].value == 1
    assert cycle.context["closing"]["report"]["deleted"] == 1
    assert _diff(p, sim, integration).exact


def test_a_lingering_run_applies_changes_that_arrive_while_it_runs(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    first, second = (str(person["id"]) for person in sim.people()[:2])
    sim.update_person(first, {"last_name": "BeforeTheRun"})
    _delivered(sim, 1)
    (request,) = evaluate_sensor(p, SENSOR).run_requests
    lingering = copy.deepcopy(request)
    _config(lingering)["linger_seconds"] = 30  # far longer than a loopback delivery takes

    def change_once_the_first_is_applied() -> None:
        deadline = time.monotonic() + 120
        while p.store.webhook_backlog(integration.id) and time.monotonic() < deadline:
            time.sleep(0.1)
        sim.update_person(second, {"last_name": "WhileItRuns"})

    changer = threading.Thread(target=change_once_the_first_is_applied)
    changer.start()
    result = run_request(p, lingering)
    changer.join()
    assert result.success
    batches = [
        m.metadata["events"].value
        for m in result.asset_materializations_for_node(f"{CRM}_apply_webhook_changes")
    ]
    assert batches == [1, 1]  # the second change, claimed and applied by the same run
    assert p.store.webhook_backlog(integration.id) == 0
    assert _diff(p, sim, integration).exact


def test_a_person_who_loses_every_phone_leaves_quo_and_comes_back_with_one(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    person = str(sim.people()[0]["id"])
    before = _diff(p, sim, integration).quo_contacts
    sim.update_person(person, {"phones": []})
    _delivered(sim, 1)
    (request,) = evaluate_sensor(p, SENSOR).run_requests
    assert run_request(p, request).success
    diff = _diff(p, sim, integration)
    assert diff.exact, diff.result()  # no stale contact left behind under the old number
    assert diff.quo_contacts == before - 1
    sim.update_person(person, {"phones": [{"value": "+1 415 555 0134", "primary": True}]})
    _delivered(sim, 2)
    (request,) = evaluate_sensor(p, SENSOR).run_requests
    assert run_request(p, request).success
    assert _diff(p, sim, integration).quo_contacts == before
    assert _diff(p, sim, integration).exact
