"""Quo calls and messages logged on CRM people through the whole path on a temporary Dagster
instance: the Quo sandbox sends signed events (duplicated and reordered) to the real receiver,
which stores them in the inbox; `quo_activity_sensor` claims them and `pipedrive_log_activities`
runs log one activity per call or message on every person holding the number, enriched in place
by the recording, summary and transcript. A CRM outage leaves the events for a later run."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.activity_check import ActivityCheck, check_activities, phone_holders
from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.pipedrive_server import DEFAULT_TOKEN, PipedriveSandbox
from quo_sync_dagster.secrets import resolve_secret
from quo_sync_dagster.webhooks import quo_subscriptions
from quo_sync_dagster.webhooks.app import ReceiverServer, create_app
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
SENSOR = "quo_activity_sensor"
UNKNOWN = "+12125550199"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    monkeypatch.setenv("PIPEDRIVE_TEST_TOKEN", DEFAULT_TOKEN)
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "secrets"))
    with (
        PipedriveSandbox(tmp_path / "pipedrive", records=20, rate_limit=None) as sim,
        pipeline(tmp_path, monkeypatch) as p,
        ReceiverServer(create_app(p.store)) as receiver,
    ):
        integration = add_integration(
            p,
            CRM,
            {"base_url": sim.url, "webhook_linger_seconds": 0},  # each run ends with its items
            crm_credential_ref="env:PIPEDRIVE_TEST_TOKEN",
        )
        sync_everything(p, CRM, {"integration_id": integration.id})
        with QuoClient(p.quo.url, "test-key") as quo:
            quo_subscriptions.subscribe(p.store, integration, quo, receiver.url)
        yield p, sim, integration


def _holders(p: Pipeline, integration: Any) -> dict[str, list[str]]:
    return phone_holders(p.store, integration)


def _delivered(p: Pipeline, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = p.quo.deliveries()
        if stats["sent"] + stats["failed"] >= count and not stats["pending"]:
            assert stats["failed"] == 0
            return
        time.sleep(0.1)
    pytest.fail(f"deliveries did not arrive: {p.quo.deliveries()}")


def _run_all(p: Pipeline, cursor: str | None = None) -> tuple[list[Any], str | None]:
    """Tick the sensor and run what it asks for, until it asks for nothing."""
    results = []
    while True:
        tick = evaluate_sensor(p, SENSOR, cursor=cursor)
        cursor = tick.cursor
        if not tick.run_requests:
            return results, cursor
        results += [run_request(p, request) for request in tick.run_requests]


def _check(p: Pipeline, sim: PipedriveSandbox, integration: Any) -> ActivityCheck:
    return check_activities(
        p.quo.simulated_calls(),
        p.quo.simulated_messages(),
        _holders(p, integration),
        sim.activities(),
    )


def test_calls_and_messages_are_logged_once_and_enriched_whatever_the_deliveries_do(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    holders = _holders(p, integration)
    number = next(iter(holders))
    p.quo.webhook_faults(duplicate=6, reorder=5)
    p.quo.simulate_call(number, recording=True, summary=True, transcript=True)
    p.quo.simulate_call(number, outcome="missed", duration=31)
    p.quo.simulate_call(number, outcome="voicemail")
    p.quo.simulate_call(number, direction="outgoing", empty_participants=True)
    p.quo.simulate_message(number, "Running late, there in 10")
    p.quo.simulate_message(number, "See you", direction="outgoing")
    p.quo.simulate_call(UNKNOWN)
    sent = sum(len(c["eventIds"]) for c in p.quo.simulated_calls()) + 2
    _delivered(p, sent + 6)  # six of them twice

    results, cursor = _run_all(p)
    assert results and all(r.success for r in results)
    check = _check(p, sim, integration)
    assert check.exact, check.result()
    assert check.expected == 6 * len(holders[number]) and check.unmatched == 1
    events = [
        e for r in results for e in r.asset_materializations_for_node(f"{CRM}_log_quo_activities")
    ]
    assert sum(e.metadata["unmatched"].value for e in events) == 1
    # Each event was applied once: the receiver kept the duplicates out of the inbox.
    assert p.quo.deliveries()["duplicated"] == 6
    assert sum(e.metadata["events"].value for e in events) == sent
    assert p.store.webhook_backlog(activity_queue(integration.id)) == 0

    # Nothing is left: the next tick launches nothing and the CRM stays as it is.
    before = sim.activities()
    again, _ = _run_all(p, cursor)
    assert again == [] and sim.activities() == before


def test_a_crm_outage_leaves_the_events_for_a_later_run_with_the_reason(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    number = next(iter(_holders(p, integration)))
    p.quo.simulate_message(number, "Are you open on Sunday?")
    _delivered(p, 1)
    sim.inject_fault(status=500, count=10_000)
    results, cursor = _run_all(p)
    assert [r.success for r in results] == [True]  # the run reports, it does not fail
    (event,) = results[0].asset_materializations_for_node(f"{CRM}_log_quo_activities")
    assert event.metadata["retrying"].value == 1
    (failure,) = event.metadata["failures"].value.records
    assert "500" in failure.data["reason"]
    config = results[0].dagster_run.run_config["ops"][f"{CRM}_log_quo_activities"]["config"]
    (item,) = p.store.get_webhooks(config["item_ids"])
    assert item.attempts == 1 and "500" in (item.last_error or "")
    assert not _run_all(p, cursor)[0]  # it waits out its back-off
    sim.clear_faults()
    p.store.release_webhooks([item.id])  # instead of waiting out the back-off
    results, _ = _run_all(p, cursor)
    assert all(r.success for r in results)
    assert _check(p, sim, integration).exact


def _post_signed(p: Pipeline, integration: Any, kind: str, envelope: dict[str, Any]) -> int:
    """Deliver `envelope` as Quo would: signed with the key of the integration's `kind`
    webhook, to the URL Quo was given."""
    subscription = p.store.get_webhook_subscription(activity_queue(integration.id))
    assert subscription is not None
    (hook,) = [w for w in subscription["details"]["webhooks"] if w["kind"] == kind]
    body = json.dumps(envelope, separators=(",", ":")).encode()
    stamp = str(int(time.time() * 1000))
    digest = hmac.new(
        base64.b64decode(resolve_secret(hook["keyRef"])), stamp.encode() + b"." + body, "sha256"
    ).digest()
    signature = f"hmac;1;{stamp};{base64.b64encode(digest).decode()}"
    response = httpx.post(
        subscription["receiverUrl"],
        content=body,
        headers={"openphone-signature": signature, "content-type": "application/json"},
    )
    return response.status_code


def test_a_summary_arriving_after_the_call_was_logged_enriches_the_same_activity(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    number = next(iter(_holders(p, integration)))
    call_id = p.quo.simulate_call(number, duration=95)["callId"]
    _delivered(p, 2)
    results, cursor = _run_all(p)
    assert all(r.success for r in results)
    (logged,) = [a for a in sim.activities() if call_id in json.dumps(a)]
    assert "Summary:" not in logged["body"]

    summary = {
        "callId": call_id,
        "object": "callSummary",
        "status": "completed",
        "summary": ["Asked for a visit on Friday"],
        "nextSteps": ["Book Friday 10am"],
    }
    envelope = {
        "id": "EVlate-summary-1",
        "object": "event",
        "apiVersion": "v4",
        "createdAt": "2026-03-01T10:00:00Z",
        "type": "call.summary.completed",
        "data": {"object": summary},
    }
    assert _post_signed(p, integration, "call-summaries", envelope) == 200
    results, cursor = _run_all(p, cursor)
    (event,) = results[0].asset_materializations_for_node(f"{CRM}_log_quo_activities")
    assert (event.metadata["created"].value, event.metadata["enriched"].value) == (0, 1)
    (enriched,) = [a for a in sim.activities() if call_id in json.dumps(a)]
    assert enriched["id"] == logged["id"]  # the same activity, rewritten
    assert "Asked for a visit on Friday" in enriched["body"]
    assert "Book Friday 10am" in enriched["body"]
    # The same delivery again (Quo retries): stored once, nothing more to do.
    assert _post_signed(p, integration, "call-summaries", envelope) == 200
    assert _run_all(p, cursor)[0] == []


def test_a_shared_number_is_logged_on_every_holder_or_only_the_latest(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    holders = _holders(p, integration)
    number, (first, *_) = next((n, keys) for n, keys in holders.items() if len(keys) == 1)
    second = next(str(person["id"]) for person in sim.people() if str(person["id"]) != first)
    sim.update_person(second, {"phones": [{"value": number, "primary": True}]})
    poll_everything(p, CRM, {"integration_id": integration.id})  # the sync re-indexes them
    assert sorted(_holders(p, integration)[number]) == sorted([first, second])

    p.quo.simulate_message(number, "Hello both")
    _delivered(p, 1)
    assert all(r.success for r in _run_all(p)[0])
    logged = [a["person"] for a in sim.activities() if "Hello both" in a["body"]]
    assert sorted(logged) == sorted([first, second])

    settings = {**integration.settings, "activity_people": "latest"}
    p.store.upsert_integration(dataclasses.replace(integration, settings=settings))
    p.quo.simulate_message(number, "Hello latest")
    _delivered(p, 2)
    assert all(r.success for r in _run_all(p)[0])
    logged = [a["person"] for a in sim.activities() if "Hello latest" in a["body"]]
    assert logged == [second]  # linked last: its number changed most recently


def test_an_unknown_caller_becomes_one_crm_person_when_the_integration_asks(
    setup: tuple[Any, ...],
) -> None:
    p, sim, integration = setup
    settings = {**integration.settings, "create_unknown_callers": True}
    p.store.upsert_integration(dataclasses.replace(integration, settings=settings))
    before = {str(person["id"]) for person in sim.people()}
    p.quo.simulate_call(UNKNOWN, summary=True)
    p.quo.simulate_message(UNKNOWN, "It's me again")
    _delivered(p, 4)  # ringing, completed, summary; the message
    results, _ = _run_all(p)
    assert all(r.success for r in results)
    (created,) = [person for person in sim.people() if str(person["id"]) not in before]
    assert UNKNOWN in json.dumps(created)  # the caller's number is on the new person
    logged = [a for a in sim.activities() if a["person"] == str(created["id"])]
    assert len(logged) == 2  # the call and the message, both on that one person
    events = [
        e for r in results for e in r.asset_materializations_for_node(f"{CRM}_log_quo_activities")
    ]
    assert sum(e.metadata["callers_created"].value for e in events) == 1
    # The next sync takes the new person to Quo; from then on the phone index finds them.
    poll_everything(p, CRM, {"integration_id": integration.id, "full_scan": True})
    assert _holders(p, integration)[UNKNOWN] == [str(created["id"])]
    assert _check(p, sim, integration).exact
