"""An integration's Quo webhooks against the Quo sandbox (127.0.0.1): registered with their keys
kept as secrets, verified end to end by the receiver, replaced, removed, and cleaned up when a
step fails part way."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.quo.client import QuoClient, QuoOutcomeUnknown, QuoUnavailable
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.secrets import MissingSecret, resolve_secret, secrets_dir
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.webhooks import quo_subscriptions
from quo_sync_dagster.webhooks.app import ReceiverServer, ReceiverSettings, create_app
from quo_sync_dagster.webhooks.quo_subscriptions import (
    WEBHOOKS,
    quo_receiver_url,
    subscribe,
    unsubscribe,
)

CALLER = "+14155550123"
BASE = "https://receiver.example/hooks/"
INTEGRATION = Integration("acme corp", "pipedrive", "env:QUO_KEY")
EXPECTED_EVENTS = {
    "messages": ["message.received", "message.delivered"],
    "calls": ["call.completed", "call.ringing", "call.recording.completed"],
    "call-summaries": ["call.summary.completed"],
    "call-transcripts": ["call.transcript.completed"],
}


@dataclass
class World:
    store: Store
    sandbox: QuoSandbox
    quo: QuoClient

    def record(self) -> dict[str, Any] | None:
        return self.store.get_webhook_subscription(activity_queue(INTEGRATION.id))

    def at_quo(self) -> dict[str, dict[str, Any]]:
        return {w["id"]: w for w in self.quo.list_webhooks()}


def _secret_files() -> list[Path]:
    return [p for p in secrets_dir().glob("*") if p.is_file()] if secrets_dir().exists() else []


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "secrets"))
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    store.upsert_integration(INTEGRATION)
    with (
        QuoSandbox(tmp_path / "quo", rate_limit=None) as sandbox,
        QuoClient(sandbox.url, sandbox.api_key, max_attempts=2) as quo,
    ):
        yield World(store, sandbox, quo)
    store.close()


def _settled(sandbox: QuoSandbox, queued: int, timeout: float = 30.0) -> dict[str, Any]:
    """The delivery stats once `queued` deliveries were queued and none is pending."""
    deadline = time.monotonic() + timeout
    while True:
        stats = sandbox.deliveries()
        if stats["queued"] >= queued and stats["pending"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


# ---- subscribe / unsubscribe -------------------------------------------------------------------


def test_subscribe_registers_the_four_webhooks_and_keeps_their_keys_as_secrets(
    world: World,
) -> None:
    returned = subscribe(world.store, INTEGRATION, world.quo, BASE)
    url = "https://receiver.example/hooks/webhooks/quo/acme%20corp"
    record = world.record()
    assert record == returned
    assert record is not None
    assert (record["crm"], record["receiverUrl"]) == ("quo", url)
    assert (record["expiresAt"], record["secretRef"]) == (None, None)
    stored = record["details"]["webhooks"]
    assert {w["kind"]: w["events"] for w in stored} == EXPECTED_EVENTS
    at_quo = world.at_quo()
    assert set(at_quo) == {w["id"] for w in stored}
    for webhook in stored:
        remote = at_quo[webhook["id"]]
        assert (remote["url"], remote["events"]) == (url, webhook["events"])
        assert remote["status"] == "enabled"
        assert resolve_secret(webhook["keyRef"]) == remote["key"]
        assert remote["key"] not in json.dumps(record)  # only the reference is stored
    assert len({w["keyRef"] for w in stored}) == 4
    assert len(_secret_files()) == 4


def test_subscribing_again_replaces_the_webhooks_and_their_keys(world: World) -> None:
    first = subscribe(world.store, INTEGRATION, world.quo, BASE)
    second = subscribe(world.store, INTEGRATION, world.quo, BASE)
    old, new = first["details"]["webhooks"], second["details"]["webhooks"]
    assert world.record() == second
    assert set(world.at_quo()) == {w["id"] for w in new}
    assert not {w["id"] for w in old} & {w["id"] for w in new}
    for webhook in old:
        with pytest.raises(MissingSecret):
            resolve_secret(webhook["keyRef"])
    assert len(_secret_files()) == 4


def test_unsubscribe_deletes_the_webhooks_their_record_and_keys(world: World) -> None:
    subscribe(world.store, INTEGRATION, world.quo, BASE)
    other = Integration("other", "zoho", "env:QUO_KEY")
    world.store.upsert_integration(other)
    kept = subscribe(world.store, other, world.quo, BASE)
    mine = world.record()
    assert mine is not None
    # One is already gone at Quo (deleted by hand): that is fine.
    world.quo.delete_webhook(mine["details"]["webhooks"][0]["id"])

    assert unsubscribe(world.store, INTEGRATION, world.quo) is True
    assert world.record() is None
    assert set(world.at_quo()) == {w["id"] for w in kept["details"]["webhooks"]}
    for webhook in mine["details"]["webhooks"]:
        with pytest.raises(MissingSecret):
            resolve_secret(webhook["keyRef"])
    assert len(_secret_files()) == 4  # the other integration's
    assert unsubscribe(world.store, INTEGRATION, world.quo) is False


def test_unsubscribe_keeps_the_record_when_quo_fails_so_it_can_be_retried(world: World) -> None:
    subscribe(world.store, INTEGRATION, world.quo, BASE)
    world.sandbox.inject_fault(503, count=10, kinds=["webhook_delete"])
    with pytest.raises(QuoUnavailable):
        unsubscribe(world.store, INTEGRATION, world.quo)
    record = world.record()
    assert record is not None
    for webhook in record["details"]["webhooks"]:
        resolve_secret(webhook["keyRef"])  # still readable
    world.sandbox.clear_faults()
    assert unsubscribe(world.store, INTEGRATION, world.quo) is True
    assert world.at_quo() == {} and world.record() is None and _secret_files() == []


# ---- a step failing part way -----------------------------------------------------------------


class FailOnKind:
    """The real client, but the sandbox gets a fault queued just before the create of
    `kind`: the failure comes from the sandbox through the client, part way through."""

    def __init__(self, world: World, kind: str, after_write: bool) -> None:
        self.world, self.kind, self.after_write = world, kind, after_write

    def create_webhook(self, kind: str, url: str, events: Any, label: Any = None) -> Any:
        if kind == self.kind:
            self.world.sandbox.inject_fault(
                500, kinds=["webhook_create"], after_write=self.after_write
            )
        return self.world.quo.create_webhook(kind, url, events, label=label)

    def list_webhooks(self) -> list[dict[str, Any]]:
        return self.world.quo.list_webhooks()

    def delete_webhook(self, webhook_id: str) -> bool:
        return self.world.quo.delete_webhook(webhook_id)


@pytest.mark.parametrize("after_write", [False, True], ids=["refused", "answer-lost"])
@pytest.mark.parametrize("kind", ["messages", "call-summaries", "call-transcripts"])
def test_a_failed_create_leaves_nothing_behind(world: World, kind: str, after_write: bool) -> None:
    failing = FailOnKind(world, kind, after_write)
    with pytest.raises(QuoOutcomeUnknown):  # a create's 500: Quo may have made it
        subscribe(world.store, INTEGRATION, failing, BASE)
    # after_write: Quo made the webhook whose answer was lost; it is found and deleted too.
    assert world.sandbox.stats()["activityByKind"]["webhook_create"] >= 1
    assert world.at_quo() == {}
    assert world.record() is None
    assert _secret_files() == []


def test_a_failed_resubscribe_keeps_the_old_subscription_working(world: World) -> None:
    old = subscribe(world.store, INTEGRATION, world.quo, BASE)
    with pytest.raises(QuoOutcomeUnknown):
        subscribe(world.store, INTEGRATION, FailOnKind(world, "calls", True), BASE)
    assert world.record() == old
    assert set(world.at_quo()) == {w["id"] for w in old["details"]["webhooks"]}
    for webhook in old["details"]["webhooks"]:
        resolve_secret(webhook["keyRef"])
    assert len(_secret_files()) == 4


def test_a_failed_key_or_store_write_leaves_nothing_behind(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_store_secret = quo_subscriptions.store_secret
    written: list[str] = []

    def store_secret(name: str, value: str) -> str:
        if len(written) == 2:
            raise OSError("disk full")
        written.append(name)
        return real_store_secret(name, value)

    monkeypatch.setattr(quo_subscriptions, "store_secret", store_secret)
    with pytest.raises(OSError):
        subscribe(world.store, INTEGRATION, world.quo, BASE)
    assert (world.at_quo(), world.record(), _secret_files()) == ({}, None, [])
    monkeypatch.undo()

    def refuse(*args: Any) -> None:
        raise RuntimeError("store down")

    monkeypatch.setattr(world.store, "put_webhook_subscription", refuse)
    with pytest.raises(RuntimeError):
        subscribe(world.store, INTEGRATION, world.quo, BASE)
    assert (world.at_quo(), _secret_files()) == ({}, [])


def test_receiver_urls_quote_the_integration_id() -> None:
    assert quo_receiver_url("a b?c", "http://h:1/") == "http://h:1/webhooks/quo/a%20b%3Fc"
    with pytest.raises(ValueError):
        quo_receiver_url("a/b", "http://h:1")
    assert [kind for kind, _ in WEBHOOKS] == list(EXPECTED_EVENTS)


# ---- end to end: the sandbox signs, the receiver verifies ---------------------------------------


def test_simulated_calls_and_messages_reach_the_activity_queue(world: World) -> None:
    app = create_app(world.store, settings=ReceiverSettings(cache_ttl_seconds=0))
    with ReceiverServer(app) as receiver:
        subscribe(world.store, INTEGRATION, world.quo, receiver.url)
        call = world.sandbox.simulate_call(CALLER, recording=True, summary=True, transcript=True)
        missed = world.sandbox.simulate_call(CALLER, outcome="missed")
        world.sandbox.webhook_faults(duplicate=2)  # the message events arrive twice each
        incoming = world.sandbox.simulate_message(CALLER, "hello")
        outgoing = world.sandbox.simulate_message(CALLER, "hi back", direction="outgoing")
        expected = [*call["eventIds"], *missed["eventIds"]]
        expected += [*incoming["eventIds"], *outgoing["eventIds"]]
        stats = _settled(world.sandbox, len(expected))
        assert (stats["sent"], stats["failed"]) == (len(expected) + 2, 0)  # none refused

        # Subscribing again: the sandbox signs with the new keys, and they verify.
        subscribe(world.store, INTEGRATION, world.quo, receiver.url)
        later = world.sandbox.simulate_message(CALLER, "after the new keys")
        expected += later["eventIds"]
        stats = _settled(world.sandbox, len(expected))  # queued counts each event once
        assert (stats["sent"], stats["failed"]) == (len(expected) + 2, 0)

        items = world.store.claim_webhooks(activity_queue(INTEGRATION.id), 100, lease_seconds=0)
    assert [i.event_id for i in items] == expected
    types = [i.payload["event"]["type"] for i in items[:5]]
    assert types == [
        "call.ringing",
        "call.completed",
        "call.recording.completed",
        "call.summary.completed",
        "call.transcript.completed",
    ]
    assert {i.payload["event"]["data"]["object"].get("id") for i in items[:3]} == {call["callId"]}
    assert world.store.claim_webhooks(INTEGRATION.id, 100, lease_seconds=0) == []  # CRM queue
