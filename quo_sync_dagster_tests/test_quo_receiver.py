"""The Quo webhook route on real uvicorn (127.0.0.1, port 0) and a real SQLite store: a signed
event is stored in the integration's activity queue before the 200; forged, stale, replayed,
oversized and malformed deliveries are refused with nothing stored. Deliveries are signed here
by the test's own signer (quo-api.md §3.4), not by the sandbox's code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.secrets import secrets_dir, store_secret
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.store.port import InboxItem
from quo_sync_dagster.webhooks.app import ReceiverServer, ReceiverSettings, create_app
from quo_sync_dagster.webhooks.handler import Rejected
from quo_sync_dagster.webhooks.inbox import StoreInbox
from quo_sync_dagster.webhooks.quo_signature import MAX_SIGNATURES, parse, verify

CAP = 8192
# Two of the integration's webhooks (calls, call-summaries), each with its own key.
CALLS_KEY = base64.b64encode(b"calls-webhook-signing-key-7f3a9c").decode()
SUMMARIES_KEY = base64.b64encode(b"summaries-webhook-key-0be41d22").decode()
OTHER_KEY = base64.b64encode(b"another-integrations-key-55aa01").decode()
IID = "acme corp"  # a space: the URL quotes it, the route gets it decoded


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def signature(key: str, body: bytes, ms: int | None = None) -> str:
    """One `hmac;1;<ms>;<base64>` signature: HMAC-SHA256 with the base64-decoded key over the
    millisecond timestamp, a dot and the raw body."""
    ms = _ms(datetime.now(UTC)) if ms is None else ms
    mac = hmac.new(base64.b64decode(key), f"{ms}.".encode() + body, hashlib.sha256).digest()
    return f"hmac;1;{ms};{base64.b64encode(mac).decode()}"


def envelope(event_type: str = "message.received", **overrides: Any) -> dict[str, Any]:
    """A v4 event envelope (quo-api.md §3.3) with a fresh id."""
    objects: dict[str, dict[str, Any]] = {
        "message.received": {
            "id": "AC" + "1" * 32,
            "object": "message",
            "from": "+14155550123",
            "to": "+14155550100",
            "direction": "incoming",
            "text": "Can you send more info?",
            "status": "received",
            "createdAt": "2025-01-15T10:20:12.445Z",
            "userId": "USabc",
            "phoneNumberId": "PNabc",
        },
        "call.completed": {
            "id": "AC" + "2" * 32,
            "object": "call",
            "direction": "incoming",
            "status": "completed",
            "answeredAt": None,
            "duration": 0,
            "participants": [],
            "recordings": None,
        },
        "call.summary.completed": {
            "callId": "AC" + "2" * 32,
            "object": "callSummary",
            "status": "completed",
            "summary": ["Asked for a quote."],
            "nextSteps": ["Send the quote."],
        },
    }
    event = {
        "id": "EV" + _fresh_hex(),
        "object": "event",
        "apiVersion": "v4",
        "createdAt": "2025-01-15T10:20:15.342Z",
        "type": event_type,
        "data": {"object": objects[event_type], "deepLink": "https://my.quo.com/inbox/PNabc"},
    }
    return {**event, **overrides}


_counter = iter(range(10**9))


def _fresh_hex() -> str:
    return f"{next(_counter):032x}"


def _body(event: Any) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()  # Quo sends compact JSON


@dataclass
class World:
    store: Store
    url: str
    tmp: Path

    def post(
        self,
        body: bytes,
        headers: Any = None,
        integration_id: str = IID,
        key: str | None = CALLS_KEY,
    ) -> httpx.Response:
        if headers is None:
            headers = {"openphone-signature": signature(key, body)} if key else {}
        target = f"{self.url}/webhooks/quo/{quote(integration_id, safe='')}"
        return httpx.post(target, content=body, headers=headers, timeout=10)

    def inbox(self, integration_id: str = IID) -> list[InboxItem]:
        return self.store.claim_webhooks(activity_queue(integration_id), 1000, lease_seconds=0)


def _quo_subscription(*keys: tuple[str, str]) -> dict[str, Any]:
    """The stored record of an integration's Quo webhooks: (webhook id, key) pairs."""
    webhooks = [
        {"id": wid, "events": ["call.completed"], "keyRef": store_secret(f"test/{wid}", key)}
        for wid, key in keys
    ]
    return {
        "crm": "quo",
        "receiverUrl": "https://receiver.example",
        "createdAt": datetime.now(UTC).isoformat(),
        "expiresAt": None,
        "secretRef": None,
        "details": {"webhooks": webhooks},
    }


def _setup(store: Store) -> None:
    """IID subscribed with two keys; "other" with its own key; "bare" without a Quo
    subscription but with a CRM one; "wrong-key-place" with a Quo-shaped record stored under
    its bare id (the CRM subscription's place); "not-quo" with another CRM's record under its
    Quo key."""
    for iid in (IID, "other", "bare", "wrong-key-place", "not-quo"):
        store.upsert_integration(Integration(iid, "pipedrive", "env:QUO_KEY"))
    store.put_webhook_subscription(
        activity_queue(IID), _quo_subscription(("WHcalls", CALLS_KEY), ("WHsum", SUMMARIES_KEY))
    )
    store.put_webhook_subscription(activity_queue("other"), _quo_subscription(("WHo", OTHER_KEY)))
    crm_record = {**_quo_subscription(), "crm": "pipedrive", "details": {"webhookIds": [1]}}
    store.put_webhook_subscription("bare", crm_record)
    store.put_webhook_subscription("wrong-key-place", _quo_subscription(("WHw", CALLS_KEY)))
    not_quo = {**_quo_subscription(("WHn", CALLS_KEY)), "crm": "pipedrive"}
    store.put_webhook_subscription(activity_queue("not-quo"), not_quo)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "secrets"))


def _serve(tmp_path: Path, **settings: Any) -> Iterator[World]:
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    _setup(store)
    inbox = settings.pop("inbox", None)
    app = create_app(store, inbox, ReceiverSettings(quo_max_body_bytes=CAP, **settings))
    try:
        with ReceiverServer(app) as server:
            yield World(store, server.url, tmp_path)
    finally:
        store.close()


@pytest.fixture
def world(tmp_path: Path, env: None) -> Iterator[World]:
    yield from _serve(tmp_path)


def _refused(world: World, sent: list[tuple[bytes, Any]], status: int) -> None:
    assert sent
    for index, (body, headers) in enumerate(sent):
        answer = world.post(body, headers)
        assert answer.status_code == status, (index, answer.text)
        assert set(answer.json()) == {"error"}
    assert world.inbox() == []


# ---- accepted ---------------------------------------------------------------------------------


def _legacy_v2_message() -> dict[str, Any]:
    """2022 app-webhook shape: `body` instead of `text`, `to` an array, `conversationId`."""
    event = envelope(apiVersion="v2")
    message = {k: v for k, v in event["data"]["object"].items() if k != "text"}
    message.update(body="Hi", to=["+14155550100"], conversationId="CN1", media=[])
    return {**event, "data": {"object": message}}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(envelope(), id="v4-message"),
        pytest.param(envelope("call.completed"), id="v4-call"),
        pytest.param(envelope("call.summary.completed", type="callSummary"), id="v4-summary"),
        pytest.param(envelope(apiVersion="v3"), id="v3"),
        pytest.param(_legacy_v2_message(), id="v2-message"),
        pytest.param({k: v for k, v in envelope().items() if k != "apiVersion"}, id="no-version"),
    ],
)
def test_a_verified_event_is_stored_before_the_answer(
    world: World, event: dict[str, Any], tmp_path: Path
) -> None:
    before = datetime.now(UTC)
    answer = world.post(_body(event))
    assert (answer.status_code, answer.json()) == (200, {"status": "enqueued"})
    # Read through another store, on its own connection: the write was committed.
    other = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    try:
        (item,) = other.claim_webhooks(activity_queue(IID), 10, lease_seconds=0)
    finally:
        other.close()
    assert item.event_id == event["id"]
    assert item.payload["event"] == event
    received = datetime.fromisoformat(item.payload["receivedAt"])
    assert before - timedelta(seconds=1) <= received <= datetime.now(UTC)
    # Nothing went to the CRM changes of the integration or to another integration.
    assert world.store.claim_webhooks(IID, 10, lease_seconds=0) == []
    assert world.inbox("other") == []


def test_each_webhook_key_of_the_integration_verifies(world: World) -> None:
    for key in (CALLS_KEY, SUMMARIES_KEY):
        assert world.post(_body(envelope()), key=key).status_code == 200
    assert world.post(_body(envelope()), integration_id="other", key=OTHER_KEY).status_code == 200
    assert len(world.inbox()) == 2
    assert len(world.inbox("other")) == 1


def test_any_of_several_signatures_may_verify(world: World) -> None:
    def several(body: bytes) -> str:
        forged = signature(OTHER_KEY, body)
        future = signature(CALLS_KEY, body).replace("hmac;1;", "hmac;2;")  # unknown version
        return f"{forged}, {future},{signature(CALLS_KEY, body)}"

    body = _body(envelope())
    assert world.post(body, {"openphone-signature": several(body)}).status_code == 200
    # Repeated header lines count as one comma-separated list; the name is case-insensitive.
    body = _body(envelope())
    lines = [
        ("OpenPhone-Signature", signature(OTHER_KEY, body)),
        ("openphone-signature", signature(SUMMARIES_KEY, body)),
    ]
    assert world.post(body, lines).status_code == 200
    assert len(world.inbox()) == 2


def test_a_body_at_the_cap_is_accepted(world: World) -> None:
    body = _body(envelope()).ljust(CAP)  # JSON allows trailing whitespace
    assert world.post(body).status_code == 200
    assert len(world.inbox()) == 1


def test_a_replayed_event_stores_nothing_new(world: World) -> None:
    event = envelope("call.completed")
    body = _body(event)
    headers = {"openphone-signature": signature(CALLS_KEY, body)}
    assert world.post(body, headers).json() == {"status": "enqueued"}
    assert world.post(body, headers).json() == {"status": "duplicate"}  # the same delivery
    # Quo's retry: the same event id, signed again later, by the same or another key.
    assert world.post(body, key=SUMMARIES_KEY).json() == {"status": "duplicate"}
    # Concurrent copies of another event: one is stored.
    again = _body(envelope())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: world.post(again), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] * 7 + ["enqueued"]
    assert [i.event_id for i in world.inbox()] == [event["id"], json.loads(again)["id"]]
    # Acknowledged (processed) events stay known: a replay after processing is still dropped.
    world.store.ack_webhooks([i.id for i in world.inbox()])
    assert world.post(body).json() == {"status": "duplicate"}
    assert world.store.webhook_backlog(activity_queue(IID)) == 0


# ---- refused, with nothing stored --------------------------------------------------------------


def test_forged_signatures_are_401(world: World) -> None:
    body = _body(envelope())
    now = _ms(datetime.now(UTC))
    good = signature(CALLS_KEY, body, now)
    _, _, ts, sig = good.split(";")
    raw_key = base64.b64decode(CALLS_KEY)

    def mac(key: bytes, signed: bytes) -> str:
        return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()

    forged_headers = [
        {},
        {"openphone-signature": ""},
        {"x-openphone-signature": good},  # the wrong header name some code bases use
        {"openphone-signature": signature(OTHER_KEY, body)},  # another integration's key
        {"openphone-signature": signature(CALLS_KEY, body + b" ")},  # another body
        {"openphone-signature": f"hmac;1;{now + 1};{sig}"},  # another timestamp
        {"openphone-signature": f"hmac;1;{ts};{mac(raw_key, ts.encode() + body)}"},  # no dot
        {"openphone-signature": f"hmac;1;{ts};{mac(CALLS_KEY.encode(), f'{ts}.'.encode() + body)}"},
        {"openphone-signature": f"hmac;1;{ts};" + hmac.new(raw_key, body, "sha256").hexdigest()},
        {"openphone-signature": good.replace("hmac;", "sha256;")},
        {"openphone-signature": good.replace(";1;", ";2;")},
        {"openphone-signature": f"{good};extra"},
        {"openphone-signature": f"hmac;1;{ts};{sig[:-4]}"},  # truncated
        {"openphone-signature": f"hmac;1;{ts};!!{sig[2:]}"},  # not base64
        {"openphone-signature": f"hmac;1;-{ts};{sig}"},
        {"openphone-signature": f"hmac;1;{'9' * 40};{sig}"},
        {"openphone-signature": f"hmac;1;{'é' * 13};{sig}".encode()},  # not ASCII
        {"openphone-signature": b"hmac;1;\xff\xfe;" + sig.encode()},
        {"openphone-signature": ",".join([signature(OTHER_KEY, body)] * 50)},
    ]
    _refused(world, [(body, h) for h in forged_headers], 401)


def test_only_the_first_signatures_of_a_long_header_are_tried(world: World) -> None:
    body = _body(envelope())
    junk = [signature(OTHER_KEY, body)] * MAX_SIGNATURES
    header = ",".join([*junk, signature(CALLS_KEY, body)])
    _refused(world, [(body, {"openphone-signature": header})], 401)


def test_stale_or_future_timestamps_are_403(world: World) -> None:
    now = datetime.now(UTC)
    sent = []
    for moment in (now - timedelta(minutes=6), now + timedelta(minutes=6)):
        body = _body(envelope())
        sent.append((body, {"openphone-signature": signature(CALLS_KEY, body, _ms(moment))}))
    # A stale valid signature beside a fresh forged one is still stale, not forged.
    body = _body(envelope())
    stale = signature(CALLS_KEY, body, _ms(now - timedelta(hours=1)))
    sent.append((body, {"openphone-signature": f"{signature(OTHER_KEY, body)},{stale}"}))
    _refused(world, sent, 403)
    # ...and a fresh valid one beside it is accepted.
    header = f"{stale},{signature(CALLS_KEY, body)}"
    assert world.post(body, {"openphone-signature": header}).status_code == 200


def test_malformed_envelopes_are_400(world: World) -> None:
    ok = envelope()
    bodies = [
        b"{not json",
        b"\xff\xfe",
        b"[" * (CAP - 1),  # nesting deeper than the parser goes
        b"[]",
        b'"event"',
        _body({k: v for k, v in ok.items() if k != "id"}),
        _body({**ok, "id": 12345}),
        _body({**ok, "id": " "}),
        _body({**ok, "id": "EV" + "x" * 300}),
        _body({k: v for k, v in ok.items() if k != "type"}),
        _body({**ok, "type": ["message.received"]}),
        _body({**ok, "type": ""}),
        _body({**ok, "apiVersion": "v9"}),
        _body({**ok, "apiVersion": 4}),
        _body({k: v for k, v in ok.items() if k != "data"}),
        _body({**ok, "data": []}),
        _body({**ok, "data": {"deepLink": "x"}}),
        _body({**ok, "data": {"object": [ok["data"]["object"]]}}),
        _body({**ok, "data": {"object": None}}),
    ]
    _refused(world, [(b, {"openphone-signature": signature(CALLS_KEY, b)}) for b in bodies], 400)


def test_oversized_bodies_are_413_streamed_or_declared(world: World) -> None:
    body = _body(envelope()).ljust(CAP + 1)
    _refused(world, [(body, {"openphone-signature": signature(CALLS_KEY, body)})], 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    target = f"{world.url}/webhooks/quo/{quote(IID)}"
    headers = {"openphone-signature": signature(CALLS_KEY, body)}
    answer = httpx.post(target, content=chunks(), headers=headers, timeout=10)
    assert answer.status_code == 413
    # A declared length over the cap is refused before a byte of the body is read.
    host, port = world.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        path = f"/webhooks/quo/{quote(IID)}"
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode())
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert world.inbox() == []


@pytest.mark.parametrize(
    ("integration_id", "reason"),
    [
        ("nobody", "unknown integration"),
        ("bare", "no Quo webhook subscription for this integration"),
        ("wrong-key-place", "no Quo webhook subscription for this integration"),
        ("not-quo", "no Quo webhook subscription for this integration"),
        ("quo:acme corp", "unknown integration"),  # the queue key is no integration
    ],
)
def test_unknown_targets_are_404(world: World, integration_id: str, reason: str) -> None:
    answer = world.post(_body(envelope()), integration_id=integration_id)
    assert (answer.status_code, answer.json()) == (404, {"error": reason})
    for iid in (IID, "bare", "wrong-key-place", "not-quo", "nobody"):
        assert world.inbox(iid) == []
        assert world.store.claim_webhooks(iid, 10, lease_seconds=0) == []


def test_an_event_that_cannot_be_stored_answers_503_and_its_retry_is_stored(
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
    _setup(store)
    app = create_app(store, FlakyInbox(store))
    with ReceiverServer(app) as server:
        world = World(store, server.url, tmp_path)
        body = _body(envelope())
        answer = world.post(body)
        assert (answer.status_code, answer.json()) == (503, {"error": "inbox unavailable"})
        assert world.inbox() == []
        assert world.post(body).json() == {"status": "enqueued"}
        assert len(world.inbox()) == 1
    store.close()


def test_a_key_that_cannot_be_resolved_answers_503_naming_no_secret(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    (key_file,) = [p for p in secrets_dir().rglob("*WHsum*") if p.is_file()]
    saved = key_file.read_bytes()
    key_file.unlink()
    answer = world.post(_body(envelope()))
    assert (answer.status_code, answer.json()) == (
        503,
        {"error": "verification secret unavailable"},
    )
    assert "WHsum" in caplog.text  # the reference is named, so it can be fixed
    key_file.write_bytes(saved)  # an outage is not cached
    assert world.post(_body(envelope())).status_code == 200
    assert SUMMARIES_KEY not in caplog.text and CALLS_KEY not in caplog.text


def test_a_stored_key_that_is_not_base64_answers_503(world: World) -> None:
    subscription = _quo_subscription(("WHbad", "not base64 at all!"))
    world.store.put_webhook_subscription(activity_queue("bare"), subscription)
    answer = world.post(_body(envelope()), integration_id="bare")
    assert (answer.status_code, answer.json()) == (
        503,
        {"error": "verification secret unavailable"},
    )
    assert world.inbox("bare") == []


@pytest.mark.parametrize("ttl", [30.0, 0.0])
def test_keys_are_cached_for_the_ttl_only(tmp_path: Path, env: None, ttl: float) -> None:
    worlds = _serve(tmp_path, cache_ttl_seconds=ttl)
    world = next(worlds)
    try:
        assert world.post(_body(envelope())).status_code == 200
        world.store.delete_webhook_subscription(activity_queue(IID))  # unsubscribed
        assert world.post(_body(envelope())).status_code == (200 if ttl else 404)
        # A new subscription with a new key: verifies once the cache entry has gone.
        subscription = _quo_subscription(("WHnew", OTHER_KEY))
        world.store.put_webhook_subscription(activity_queue(IID), subscription)
        assert world.post(_body(envelope()), key=OTHER_KEY).status_code == (401 if ttl else 200)
    finally:
        worlds.close()


def test_no_key_header_or_body_reaches_logs_or_output(
    world: World, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("DEBUG")
    marker = "private-text-4e1f"
    good = _body(envelope(data={"object": {"text": marker}}))
    good_signature = signature(CALLS_KEY, good)
    world.post(good, {"openphone-signature": good_signature})
    forged = _body(envelope(data={"object": {"text": marker + "-forged"}}))
    forged_signature = signature(OTHER_KEY, forged)
    world.post(forged, {"openphone-signature": forged_signature})
    stale = signature(CALLS_KEY, forged, _ms(datetime.now(UTC) - timedelta(hours=1)))
    world.post(forged, {"openphone-signature": stale})
    malformed = b'{"id": "' + marker.encode() + b'"'
    world.post(malformed)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "refused: 401" in logged and "refused: 400" in logged  # the check sees the logs
    for secret in (CALLS_KEY, SUMMARIES_KEY, OTHER_KEY, good_signature, forged_signature, stale):
        assert secret not in logged
    for key in (CALLS_KEY, SUMMARIES_KEY, OTHER_KEY):
        assert base64.b64decode(key).decode() not in logged
    assert marker not in logged


def test_the_crm_route_and_health_check_still_answer(world: World) -> None:
    assert httpx.get(f"{world.url}/healthz").json() == {"status": "ok"}
    answer = httpx.post(f"{world.url}/webhooks/crm/nocrm/{IID}", content=b"{}")
    assert (answer.status_code, answer.json()) == (404, {"error": "unknown CRM"})


# ---- the verifier on its own -------------------------------------------------------------------

KEY = base64.b64decode(CALLS_KEY)
AT = datetime(2025, 1, 15, 10, 20, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset_ms", "verdict"),
    [(0, None), (300_000, None), (-300_000, None), (300_001, 403), (-300_001, 403)],
)
def test_the_tolerance_is_inclusive_both_ways(offset_ms: int, verdict: int | None) -> None:
    body = b'{"id":"EV1"}'
    header = signature(CALLS_KEY, body, _ms(AT) + offset_ms)
    if verdict is None:
        verify(header, body, [KEY], AT, 300.0)
    else:
        with pytest.raises(Rejected) as raised:
            verify(header, body, [KEY], AT, 300.0)
        assert raised.value.status == verdict


def test_no_keys_verify_nothing() -> None:
    body = b"{}"
    with pytest.raises(Rejected) as raised:
        verify(signature(CALLS_KEY, body, _ms(AT)), body, [], AT, 300.0)
    assert raised.value.status == 401


def test_parse_keeps_the_timestamp_digits_as_sent() -> None:
    body = b"{}"
    padded = "0" + str(_ms(AT))  # signed with the leading zero: verifies only verbatim
    mac = hmac.new(KEY, f"{padded}.".encode() + body, hashlib.sha256).digest()
    header = f" HMAC ; 1 ; {padded} ; {base64.b64encode(mac).decode()} "
    (parsed,) = parse(header)
    assert parsed.timestamp == padded and parsed.millis == _ms(AT)
    verify(header, body, [KEY], AT, 300.0)
    assert parse(None) == [] and parse(",,;;;") == []
