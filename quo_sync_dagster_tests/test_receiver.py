"""The CRM webhook receiver on real uvicorn (127.0.0.1, port 0) and a real SQLite store: per
signing CRM, what is stored before the 2xx and everything refused with nothing stored; the SQS
inbox and its drain against moto; `quo-sync receiver` as a process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.sandbox.attio_server import PEOPLE_OBJECT_ID
from quo_sync_dagster.secrets import store_secret
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.store.port import InboxItem
from quo_sync_dagster.webhooks.app import ReceiverServer, ReceiverSettings, create_app
from quo_sync_dagster.webhooks.inbox import Inbox, InboxEntry, StoreInbox
from quo_sync_dagster.webhooks.sqs import SqsInbox, drain_sqs

PD_TOKEN = "pd-api-token-4d1c8e77b2"
ZOHO_TOKEN = "zoho-channel-token-91f0aa3c"
ZOHO_CHANNEL = "1000000068001"
ATTIO_SECRET = "attio-signing-secret-5be2f09d6c1a"
CAP = 4096  # a small body cap keeps the oversized bodies small
Sent = tuple[bytes, dict[str, Any]]  # body, headers


def _json(payload: Any, pad_to: int | None = None) -> bytes:
    body = json.dumps(payload).encode()
    return body.ljust(pad_to) if pad_to else body  # JSON allows trailing whitespace


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _pd_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Case:
    """One signing CRM: its integration, and deliveries in its documented shape (crm-apis.md)."""

    crm: str
    integration_id: str
    secrets: list[str] = field(default_factory=list)  # what must never be logged

    def delivery(self, **kw: Any) -> Sent:
        raise NotImplementedError

    def expected(self) -> dict[str, Any]:
        """The stored change of `delivery()` (person "1234", an update), without occurredAt."""
        raise NotImplementedError

    def forgeries(self) -> list[Sent]:
        raise NotImplementedError

    def stale(self) -> list[Sent]:
        return []

    def malformed(self) -> list[Sent]:
        raise NotImplementedError

    def other_object(self) -> Sent:
        raise NotImplementedError


class PipedriveCase(Case):
    def __init__(self, password: str) -> None:
        super().__init__("pipedrive", "pd-1", [PD_TOKEN, password])
        self.password = password

    def body(self, at: datetime | None = None, pad_to: int | None = None, **meta: Any) -> bytes:
        meta = {
            "action": "change",
            "entity": "person",
            "entity_id": "1234",
            "id": str(uuid.uuid4()),
            "timestamp": _pd_time(at or datetime.now(UTC)),
            "version": "2.0",
            "attempt": 1,
            **meta,
        }
        data = None if meta["action"] == "delete" else {"id": int(meta["entity_id"])}
        return _json({"meta": meta, "data": data, "previous": None}, pad_to)

    def headers(self, password: str | None = None) -> dict[str, Any]:
        auth = _basic("quo-sync", password or self.password)
        return {"Authorization": auth, "Content-Type": "application/json"}

    def delivery(self, **kw: Any) -> Sent:
        return self.body(**kw), self.headers()

    def expected(self) -> dict[str, Any]:
        return {"kind": "upsert", "objectType": "Person", "personId": "1234", "mergedIds": []}

    def forgeries(self) -> list[Sent]:
        body = self.body()
        garbage = base64.b64encode(b"\xff\xfe:\x00").decode()
        last = "1" if self.password.endswith("0") else "0"  # one character off
        return [
            (body, {}),
            (body, self.headers(password=self.password[:-1] + last)),
            (body, {"Authorization": _basic("someone", self.password)}),
            (body, {"Authorization": _basic("quo-sync", "")}),
            (body, {"Authorization": f"Bearer {self.password}"}),
            (body, {"Authorization": "Basic !!!not-base64"}),
            (body, {"Authorization": f"Basic {garbage}"}),
            (body, {"Authorization": b"Basic \xe9\xe9"}),  # not ASCII
        ]

    def stale(self) -> list[Sent]:
        now = datetime.now(UTC)
        return [
            self.delivery(at=now - timedelta(minutes=6)),
            self.delivery(at=now + timedelta(minutes=6)),
        ]

    def malformed(self) -> list[Sent]:
        h = self.headers()
        ok = json.loads(self.body())

        def meta(**changes: Any) -> bytes:
            return _json({**ok, "meta": {**ok["meta"], **changes}})

        without_id = {k: v for k, v in ok["meta"].items() if k != "id"}
        return [
            (b"{not json", h),
            (b"\xff\xfe", h),
            (b"[" * (CAP - 1), h),  # nesting deeper than the parser goes
            (b"[]", h),
            (_json({"meta": "x"}), h),
            (meta(version="1.0"), h),
            (meta(timestamp="yesterday"), h),
            (meta(timestamp=1718117126473), h),
            (meta(entity_id=["1"]), h),
            (meta(entity_id=True), h),
            (meta(entity=None), h),
            (_json({**ok, "meta": without_id}), h),
        ]

    def other_object(self) -> Sent:
        return self.delivery(entity="deal")


class ZohoCase(Case):
    def __init__(self) -> None:
        super().__init__("zoho", "zo-1", [ZOHO_TOKEN])
        self.sent = 0

    def payload(self, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
        return {
            "server_time": _ms(at or datetime.now(UTC)),
            "query_params": {},
            "module": "Contacts",
            "resource_uri": "https://www.zohoapis.com/crm/v2/Contacts",
            "ids": ["1234"],
            "affected_fields": [{"1234": ["Phone"]}],
            "operation": "update",
            "channel_id": ZOHO_CHANNEL,
            "token": ZOHO_TOKEN,
            **fields,
        }

    def delivery(self, pad_to: int | None = None, **kw: Any) -> Sent:
        # Each call is another callback: one ms apart, as Zoho's server_time tells them apart.
        self.sent += 1
        kw.setdefault("at", datetime.now(UTC) - timedelta(milliseconds=self.sent))
        return _json(self.payload(**kw), pad_to), {"Content-Type": "application/json"}

    def expected(self) -> dict[str, Any]:
        return {"kind": "upsert", "objectType": "Contacts", "personId": "1234", "mergedIds": []}

    def forgeries(self) -> list[Sent]:
        h = {"Content-Type": "application/json"}
        return [
            (_json(self.payload(token="zoho-channel-token-91f0aa3d")), h),
            (_json(self.payload(token=None)), h),
            (_json({k: v for k, v in self.payload().items() if k != "token"}), h),
            (_json(self.payload(token="")), h),
            (_json(self.payload(token="zoho-channel-tökén")), h),
            (_json(self.payload(token=[ZOHO_TOKEN])), h),
            (_json(self.payload(channel_id="1000000068002")), h),  # another channel's token
            (_json(self.payload(channel_id=None)), h),
        ]

    def stale(self) -> list[Sent]:
        now = datetime.now(UTC)
        return [
            self.delivery(at=now - timedelta(minutes=6)),
            self.delivery(at=now + timedelta(minutes=6)),
        ]

    def malformed(self) -> list[Sent]:
        h = {"Content-Type": "application/json"}
        return [
            (b"{not json", h),
            (b"\xff\xfe", h),
            (b"[]", h),
            (_json(self.payload(server_time="now")), h),
            (_json(self.payload(server_time=10**30)), h),
            (_json(self.payload(ids="1234")), h),
            (_json(self.payload(ids=[{"id": "1"}])), h),
            (_json(self.payload(ids=[""])), h),
            (_json(self.payload(module=None)), h),
        ]

    def other_object(self) -> Sent:
        return self.delivery(module="Deals")


class AttioCase(Case):
    def __init__(self) -> None:
        super().__init__("attio", "at-1", [ATTIO_SECRET])

    @staticmethod
    def event(event_type: str = "record.updated", record: str = "1234", **extra: Any) -> dict:
        ids = {"workspace_id": "ws", "object_id": PEOPLE_OBJECT_ID, "record_id": record}
        actor = {"type": "workspace-member", "id": "m"}
        return {"event_type": event_type, "id": ids, "actor": actor, **extra}

    @staticmethod
    def signed(body: bytes, secret: str = ATTIO_SECRET, key: str | None = None) -> Sent:
        signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "Attio-Signature": signature}
        headers["X-Attio-Signature"] = signature
        headers["Idempotency-Key"] = key or str(uuid.uuid4())
        return body, headers

    def delivery(self, pad_to: int | None = None, events: list | None = None) -> Sent:
        body = {"webhook_id": "wh-1", "events": events or [self.event()]}
        return self.signed(_json(body, pad_to))

    def expected(self) -> dict[str, Any]:
        return {"kind": "upsert", "objectType": "people", "personId": "1234", "mergedIds": []}

    def forgeries(self) -> list[Sent]:
        body, headers = self.delivery()
        other, _ = self.delivery(events=[self.event(record="9999")])
        return [
            (body, {"Content-Type": "application/json"}),
            self.signed(body, secret="attio-signing-secret-5be2f09d6c1b"),
            (body, {**headers, "Attio-Signature": self.signed(other)[1]["Attio-Signature"]}),
            (body + b" ", headers),  # the body changed after signing
            (body, {**headers, "Attio-Signature": "", "X-Attio-Signature": ""}),
            (body, {**headers, "Attio-Signature": b"\xe9" * 64}),
        ]

    def malformed(self) -> list[Sent]:
        return [
            self.signed(b"{not json"),
            self.signed(b"\xff\xfe"),
            self.signed(b"[]"),
            self.signed(_json({"events": "record.updated"})),
            self.signed(_json({"events": ["record.updated"]})),
            self.signed(_json({"events": [{"event_type": "record.updated", "id": "1234"}]})),
            self.signed(_json({"events": [self.event(record=None)]})),
            self.signed(_json({"events": [self.event("record.merged")]})),  # no duplicate id
        ]

    def other_object(self) -> Sent:
        event = self.event()
        event["id"]["object_id"] = "companies-object-id"
        return self.delivery(events=[event, self.event("note.created")])


def _pair(credential: str, integration_id: str) -> str:
    integration = Integration(integration_id, "pipedrive", "env:Q")
    return connector_class("pipedrive")(integration, credential).webhook_basic_auth()[1]


@dataclass
class World:
    store: Store
    url: str
    cases: dict[str, Case]

    def post(self, case: Case, sent: Sent, integration_id: str | None = None) -> httpx.Response:
        body, headers = sent
        target = f"{self.url}/webhooks/crm/{case.crm}/{integration_id or case.integration_id}"
        return httpx.post(target, content=body, headers=headers, timeout=10)

    def inbox(self, integration_id: str) -> list[InboxItem]:
        return self.store.claim_webhooks(integration_id, 10_000, lease_seconds=0)


def _subscription(crm: str, secret_ref: str | None, details: dict[str, Any]) -> dict[str, Any]:
    created = datetime.now(UTC).isoformat()
    return {
        "crm": crm,
        "receiverUrl": "https://receiver.example/webhooks",
        "createdAt": created,
        "expiresAt": None,
        "secretRef": secret_ref,
        "details": details,
    }


def _setup(store: Store) -> dict[str, Case]:
    """The three signing integrations, subscribed; a Pipedrive one subscribed without a
    credential; one unsubscribed; an AxisCare one (no webhooks)."""
    for iid, crm, ref in (
        ("pd-1", "pipedrive", "env:QUO_TEST_PD_TOKEN"),
        ("zo-1", "zoho", "env:QUO_TEST_ZOHO_TOKEN"),
        ("at-1", "attio", None),
        ("pd-unsubscribed", "pipedrive", "env:QUO_TEST_PD_TOKEN"),
        ("pd-no-credential", "pipedrive", None),
        ("ax-1", "axiscare", None),
    ):
        store.upsert_integration(Integration(iid, crm, "env:QUO_KEY", crm_credential_ref=ref))
    for iid in ("pd-1", "pd-no-credential"):
        details = {"webhookIds": [1, 2, 3], "httpAuthUser": "quo-sync"}
        store.put_webhook_subscription(iid, _subscription("pipedrive", None, details))
    zoho_ref = store_secret("zoho/zo-1/channel-token", ZOHO_TOKEN)
    store.put_webhook_subscription(
        "zo-1", _subscription("zoho", zoho_ref, {"channel_id": ZOHO_CHANNEL})
    )
    attio_ref = store_secret("attio/at-1/webhook-secret", ATTIO_SECRET)
    attio_details = {"webhook_id": "wh-1", "peopleObjectId": PEOPLE_OBJECT_ID}
    store.put_webhook_subscription("at-1", _subscription("attio", attio_ref, attio_details))
    return {
        "pipedrive": PipedriveCase(_pair(PD_TOKEN, "pd-1")),
        "zoho": ZohoCase(),
        "attio": AttioCase(),
    }


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.setenv("QUO_TEST_PD_TOKEN", PD_TOKEN)
    monkeypatch.setenv("QUO_TEST_ZOHO_TOKEN", "zoho-oauth-access-token")


def _serve(tmp_path: Path, inbox: Inbox | None = None) -> Iterator[World]:
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    cases = _setup(store)
    app = create_app(store, inbox, ReceiverSettings(max_body_bytes=CAP))
    try:
        with ReceiverServer(app) as server:
            yield World(store, server.url, cases)
    finally:
        store.close()


@pytest.fixture
def world(tmp_path: Path, env: None) -> Iterator[World]:
    yield from _serve(tmp_path)


CRMS = ["pipedrive", "zoho", "attio"]


# ---- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("crm", CRMS)
def test_a_verified_delivery_is_stored_before_the_answer(
    world: World, crm: str, tmp_path: Path
) -> None:
    case = world.cases[crm]
    before = datetime.now(UTC)
    answer = world.post(case, case.delivery())
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "enqueued", "stored": 1, "duplicates": 0}
    # Read through another store, on its own connection: the write was committed.
    other = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    try:
        (item,) = other.claim_webhooks(case.integration_id, 10, lease_seconds=0)
    finally:
        other.close()
    change = dict(item.payload["change"])
    occurred = change.pop("occurredAt")
    assert change == case.expected()
    received = datetime.fromisoformat(item.payload["receivedAt"])
    assert before - timedelta(seconds=1) <= received <= datetime.now(UTC)
    if crm == "attio":
        assert occurred is None  # Attio sends no time
    else:
        assert abs(datetime.fromisoformat(occurred) - before) < timedelta(seconds=5)
    assert item.event_id.endswith(":1234") or crm == "attio"
    for other_crm in CRMS:  # nothing went to another integration
        if other_crm != crm:
            assert world.inbox(world.cases[other_crm].integration_id) == []


@pytest.mark.parametrize("crm", CRMS)
def test_a_body_at_the_cap_is_accepted(world: World, crm: str) -> None:
    case = world.cases[crm]
    sent = case.delivery(pad_to=CAP)
    assert len(sent[0]) == CAP
    assert world.post(case, sent).status_code == 200
    assert len(world.inbox(case.integration_id)) == 1


@pytest.mark.parametrize("crm", CRMS)
def test_a_replayed_delivery_stores_nothing_new(world: World, crm: str) -> None:
    case = world.cases[crm]
    sent = case.delivery()
    assert world.post(case, sent).json()["status"] == "enqueued"
    assert world.post(case, sent).json() == {"status": "duplicate"}
    with ThreadPoolExecutor(8) as pool:  # concurrent copies of another delivery: one is stored
        again = case.delivery()
        answers = list(pool.map(lambda _: world.post(case, again), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] * 7 + ["enqueued"]
    assert len(world.inbox(case.integration_id)) == 2


def test_merges_and_multi_person_callbacks_become_one_change_each(world: World) -> None:
    pd, zoho, attio = (world.cases[c] for c in CRMS)
    assert isinstance(pd, PipedriveCase) and isinstance(attio, AttioCase)
    # Pipedrive: the loser's delete names the survivor, the survivor's change the loser.
    world.post(pd, (pd.body(action="delete", entity_id="7", merged_to_id="1234"), pd.headers()))
    world.post(pd, (pd.body(action="change", entity_id="1234", merged_from_id="7"), pd.headers()))
    world.post(pd, (pd.body(action="delete", entity_id="8"), pd.headers()))
    changes = [i.payload["change"] for i in world.inbox("pd-1")]
    assert [(c["kind"], c["personId"], c["mergedIds"]) for c in changes] == [
        ("merge", "1234", ["7"]),
        ("merge", "1234", ["7"]),
        ("delete", "8", []),
    ]
    # Zoho: one callback, several people (a repeated id once), and a Leads delete.
    world.post(zoho, zoho.delivery(ids=["1", "2", "1"], operation="insert"))
    world.post(zoho, zoho.delivery(ids=["3"], operation="delete", module="Leads"))
    changes = [i.payload["change"] for i in world.inbox("zo-1")]
    assert [(c["kind"], c["objectType"], c["personId"]) for c in changes] == [
        ("upsert", "Contacts", "1"),
        ("upsert", "Contacts", "2"),
        ("delete", "Leads", "3"),
    ]
    # Attio: both events of a merge (new record, one original each), then a deletion.
    events = [
        attio.event("record.merged", "new", duplicate_record_id="a", duplicate_object_id="p"),
        attio.event("record.merged", "new", duplicate_record_id="b", duplicate_object_id="p"),
        attio.event("record.deleted", "gone"),
    ]
    answer = world.post(attio, attio.delivery(events=events))
    assert answer.json()["stored"] == 3
    changes = [i.payload["change"] for i in world.inbox("at-1")]
    assert [(c["kind"], c["personId"], c["mergedIds"]) for c in changes] == [
        ("merge", "new", ["a"]),
        ("merge", "new", ["b"]),
        ("delete", "gone", []),
    ]


@pytest.mark.parametrize("crm", CRMS)
def test_events_about_other_objects_are_answered_and_ignored(world: World, crm: str) -> None:
    case = world.cases[crm]
    answer = world.post(case, case.other_object())
    assert (answer.status_code, answer.json()) == (200, {"status": "ignored"})
    assert world.inbox(case.integration_id) == []


# ---- refused, with nothing stored ------------------------------------------------------------


def _refused(world: World, case: Case, sent: list[Sent], status: int) -> None:
    assert sent
    for index, delivery in enumerate(sent):
        answer = world.post(case, delivery)
        assert answer.status_code == status, (index, answer.text)
        assert set(answer.json()) == {"error"}
    assert world.inbox(case.integration_id) == []


@pytest.mark.parametrize("crm", CRMS)
def test_forged_deliveries_are_refused(world: World, crm: str) -> None:
    _refused(world, world.cases[crm], world.cases[crm].forgeries(), 401)


def test_pipedrive_without_a_credential_refuses_the_pair_anyone_could_derive(world: World) -> None:
    pd = world.cases["pipedrive"]
    assert isinstance(pd, PipedriveCase)
    sent = (pd.body(), pd.headers(password=_pair("", "pd-no-credential")))
    answer = world.post(pd, sent, "pd-no-credential")
    assert answer.status_code == 401
    assert world.inbox("pd-no-credential") == []


@pytest.mark.parametrize("crm", ["pipedrive", "zoho"])
def test_stale_or_future_deliveries_are_refused(world: World, crm: str) -> None:
    _refused(world, world.cases[crm], world.cases[crm].stale(), 403)


@pytest.mark.parametrize("crm", CRMS)
def test_malformed_deliveries_are_refused(world: World, crm: str) -> None:
    _refused(world, world.cases[crm], world.cases[crm].malformed(), 400)


@pytest.mark.parametrize("crm", CRMS)
def test_oversized_deliveries_are_refused_streamed_or_declared(world: World, crm: str) -> None:
    case = world.cases[crm]
    body, headers = case.delivery(pad_to=CAP + 1)
    _refused(world, case, [(body, headers)], 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    target = f"{world.url}/webhooks/crm/{crm}/{case.integration_id}"
    answer = httpx.post(target, content=chunks(), headers=headers, timeout=10)
    assert answer.status_code == 413
    # A declared length over the cap is refused before a byte of the body is read.
    host, port = world.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        path = f"/webhooks/crm/{crm}/{case.integration_id}"
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode())
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert world.inbox(case.integration_id) == []


@pytest.mark.parametrize(
    ("crm", "integration_id", "reason"),
    [
        ("hubspot", "pd-1", "unknown CRM"),
        ("axiscare", "ax-1", "unknown CRM"),  # no webhook handler
        ("pipedrive", "nobody", "unknown integration"),
        ("zoho", "pd-1", "unknown integration"),  # an integration of another CRM
        ("pipedrive", "pd-unsubscribed", "no webhook subscription for this integration"),
    ],
)
def test_unknown_targets_are_404(world: World, crm: str, integration_id: str, reason: str) -> None:
    pd = world.cases["pipedrive"]
    answer = world.post(Case(crm, integration_id), pd.delivery(), integration_id)
    assert (answer.status_code, answer.json()) == (404, {"error": reason})
    for iid in ("pd-1", "zo-1", "at-1", "pd-unsubscribed", "ax-1"):
        assert world.inbox(iid) == []


def test_a_delivery_that_cannot_be_stored_answers_503_and_its_retry_is_stored(
    tmp_path: Path, env: None
) -> None:
    class FlakyInbox(StoreInbox):
        failures = 1

        def enqueue(self, entries: Any) -> list[bool]:
            if self.failures:
                self.failures -= 1
                raise OSError("disk full")
            return super().enqueue(entries)

    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    cases = _setup(store)
    with ReceiverServer(create_app(store, FlakyInbox(store))) as server:
        world = World(store, server.url, cases)
        sent = cases["attio"].delivery()
        answer = world.post(cases["attio"], sent)
        assert (answer.status_code, answer.json()) == (503, {"error": "inbox unavailable"})
        assert world.inbox("at-1") == []
        assert world.post(cases["attio"], sent).json()["status"] == "enqueued"
        assert len(world.inbox("at-1")) == 1
    store.close()


def test_a_secret_that_cannot_be_resolved_answers_503_naming_no_secret(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("QUO_TEST_PD_TOKEN")
    pd = world.cases["pipedrive"]
    answer = world.post(pd, pd.delivery())
    assert (answer.status_code, answer.json()) == (
        503,
        {"error": "verification secret unavailable"},
    )
    assert "QUO_TEST_PD_TOKEN" in caplog.text  # the reference is named, so it can be fixed
    monkeypatch.setenv("QUO_TEST_PD_TOKEN", PD_TOKEN)  # an outage is not cached
    assert world.post(pd, pd.delivery()).status_code == 200


@pytest.mark.parametrize("ttl", [30.0, 0.0])
def test_subscriptions_are_cached_for_the_ttl_only(tmp_path: Path, env: None, ttl: float) -> None:
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    cases = _setup(store)
    app = create_app(store, settings=ReceiverSettings(cache_ttl_seconds=ttl))
    with ReceiverServer(app) as server:
        world, attio = World(store, server.url, cases), cases["attio"]
        assert world.post(attio, attio.delivery()).status_code == 200
        store.delete_webhook_subscription("at-1")  # torn down
        answer = world.post(attio, attio.delivery())
        assert answer.status_code == (200 if ttl else 404)
    store.close()


def test_no_secret_reaches_logs_or_output(
    world: World, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("DEBUG")
    for case in world.cases.values():
        for sent in [case.delivery(), *case.forgeries(), *case.stale(), *case.malformed()]:
            world.post(case, sent)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "refused: 401" in logged and "refused: 400" in logged  # the check sees the logs
    for case in world.cases.values():
        for secret in case.secrets:
            assert secret not in logged
    assert "{not json" not in logged  # nor bodies


# ---- the SQS inbox ------------------------------------------------------------------------------


@pytest.mark.parametrize("fifo", [True, False])
def test_the_sqs_inbox_is_drained_into_the_store(
    tmp_path: Path, env: None, aws: None, fifo: bool
) -> None:
    sqs = boto3.client("sqs")
    attributes = {"FifoQueue": "true"} if fifo else {}
    queue_url = sqs.create_queue(
        QueueName="hooks.fifo" if fifo else "hooks", Attributes=attributes
    )["QueueUrl"]
    inbox = SqsInbox(queue_url)
    worlds = _serve(tmp_path, inbox)
    world = next(worlds)
    try:
        attio, pd = world.cases["attio"], world.cases["pipedrive"]
        replayed = attio.delivery()
        for sent in (replayed, replayed):
            assert world.post(attio, sent).status_code == 200
        many = [attio.event(record=f"r{i}") for i in range(12)]  # over one SQS batch
        assert world.post(attio, attio.delivery(events=many)).json()["stored"] == 12
        assert world.post(pd, pd.delivery()).status_code == 200
        assert world.inbox("at-1") == [] and world.inbox("pd-1") == []  # all in SQS so far
        sqs.send_message(QueueUrl=queue_url, MessageBody="not ours", **_group(fifo))

        moved = drain_sqs(queue_url, world.store)
        assert moved == (14 if fifo else 15)  # FIFO dropped the replay; the store dedupes the rest
        stored = world.inbox("at-1")
        assert len(stored) == 13
        assert {i.payload["change"]["personId"] for i in stored} == {"1234"} | {
            f"r{i}" for i in range(12)
        }
        assert len(world.inbox("pd-1")) == 1
        # Only the foreign message is left (back once its visibility timeout is over).
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        left = int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )
        assert left == 1
    finally:
        worlds.close()
        inbox.close()


def test_a_refused_sqs_batch_raises_naming_no_payload(aws: None) -> None:
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="q.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    inbox = SqsInbox(url.removesuffix(".fifo"))  # not FIFO-shaped: SQS refuses the messages
    with pytest.raises(Exception) as raised:
        inbox.enqueue([InboxEntry("i", "e", {"change": {"personId": "secret-ish"}})])
    assert "secret-ish" not in str(raised.value)


def _group(fifo: bool) -> dict[str, str]:
    return {"MessageGroupId": "x", "MessageDeduplicationId": "x"} if fifo else {}


# ---- the command -------------------------------------------------------------------------------


def test_quo_sync_receiver_serves_the_configured_store(tmp_path: Path, env: None) -> None:
    uri = f"sqlite:///{tmp_path}/store.sqlite"
    store = open_store(uri)
    cases = _setup(store)
    environ = {**os.environ, "QUO_SYNC_STORE_URI": uri}
    argv = [sys.executable, "-m", "quo_sync_dagster", "receiver", "--port", "0"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, env=environ, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("RECEIVER_READY http://127.0.0.1:"), line
        url = line.split()[1]
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        world = World(store, url, cases)
        assert world.post(cases["zoho"], cases["zoho"].delivery()).status_code == 200
        assert len(world.inbox("zo-1")) == 1
    finally:
        process.terminate()
        process.wait(timeout=20)
        store.close()
    assert process.returncode == 0
