"""The Quo sandbox's webhooks, calls and messages, over real HTTP on 127.0.0.1.

Responses are validated against the official spec's schema for their operation and status;
deliveries land on a real receiver and their `openphone-signature` is checked here with a few
lines of hmac, independently of the sandbox's signer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from quo_sync_dagster.sandbox import webhook_delivery
from quo_sync_dagster.sandbox.quo_activity import PHONE_NUMBER_ID, USER_ID, WORKSPACE_NUMBER
from quo_sync_dagster.sandbox.quo_server import SPEC_PATH, QuoSandbox
from quo_sync_dagster_tests.test_webhook_delivery import Received, Receiver, settled

CALLER = "+12125550147"
CALL_EVENTS = ["call.ringing", "call.completed", "call.recording.completed"]
CALL, SUMMARY = "/v1/calls/{callId}", "/v1/call-summaries/{callId}"
TRANSCRIPT, RECORDINGS = "/v1/call-transcripts/{id}", "/v1/call-recordings/{callId}"
VOICEMAIL, MESSAGE = "/v1/call-voicemails/{callId}", "/v1/messages/{id}"
WEBHOOKS, WEBHOOK = "/v1/webhooks", "/v1/webhooks/{id}"
SPEC = json.loads(SPEC_PATH.read_text())


@cache
def _validator(path: str, method: str, status: int) -> Draft202012Validator:
    schema = SPEC["paths"][path][method]["responses"][str(status)]["content"]
    # `#/components/...` references resolve against the spec's components, kept at the root.
    return Draft202012Validator(
        {**schema["application/json"]["schema"], "components": SPEC["components"]}
    )


def check(response: httpx.Response, path: str, method: str, status: int) -> Any:
    """Assert the status, validate the body against the spec, return the parsed body."""
    assert response.status_code == status, response.text
    if status == 204:
        assert "204" in SPEC["paths"][path][method]["responses"] and response.content == b""
        return None
    body = response.json()
    _validator(path, method, status).validate(body)
    if status >= 400:
        assert body["status"] == status
    return body


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[QuoSandbox]:
    """A fresh sandbox per test: webhooks and delivery faults do not leak between tests."""
    monkeypatch.setattr(webhook_delivery, "RETRY_WAIT_SECONDS", 0.01)
    with QuoSandbox(tmp_path, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def api(sandbox: QuoSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def register(api: httpx.Client, kind: str, url: str, events: list[str], **extra: Any) -> dict:
    path = f"{WEBHOOKS}/{kind}"
    body = check(api.post(path, json={"url": url, "events": events, **extra}), path, "post", 201)
    return body["data"]


def register_all(api: httpx.Client, base_url: str) -> dict[str, dict[str, Any]]:
    """The four webhooks of an integration, each on its own path under `base_url`; by path."""
    kinds = {
        "messages": ["message.received", "message.delivered"],
        "calls": CALL_EVENTS,
        "call-summaries": ["call.summary.completed"],
        "call-transcripts": ["call.transcript.completed"],
    }
    return {
        f"/{kind}": register(api, kind, f"{base_url}/{kind}", events)
        for kind, events in kinds.items()
    }


def verify(received: Received, key: str) -> int:
    """Assert the delivery's openphone-signature with the base64-decoded key; its ms time."""
    scheme, version, at_ms, digest = received.headers["openphone-signature"].split(";")
    assert (scheme, version) == ("hmac", "1") and at_ms.isdigit() and len(at_ms) == 13
    mac = hmac.new(base64.b64decode(key), at_ms.encode() + b"." + received.body, hashlib.sha256)
    assert hmac.compare_digest(base64.b64encode(mac.digest()).decode(), digest)
    return int(at_ms)


def arrived(receiver: Receiver, sandbox: QuoSandbox, count: int) -> list[Received]:
    """Exactly `count` deliveries, once the sandbox has nothing more on its way."""
    got = receiver.wait_for(count)
    settled(sandbox)
    assert len(receiver.received) == count, [r.json()["type"] for r in receiver.received]
    return got


# ---- webhooks ------------------------------------------------------------------------------
def test_webhooks_create_list_get_delete(api: httpx.Client) -> None:
    made = register_all(api, "http://127.0.0.1:9/webhooks/quo/1")
    ids = {w["id"] for w in made.values()}
    for webhook in made.values():
        assert webhook["id"].startswith("WH") and webhook["userId"] == USER_ID
        assert len(base64.b64decode(webhook["key"], validate=True)) >= 16
        assert webhook["status"] == "enabled" and webhook["resourceIds"] == ["*"]
        assert webhook["label"] is None and webhook["deletedAt"] is None
    assert len({w["key"] for w in made.values()}) == 4  # one signing key per webhook
    listed = check(api.get(WEBHOOKS), WEBHOOKS, "get", 200)["data"]
    assert {w["id"] for w in listed} == ids
    assert check(api.get(WEBHOOKS, params={"userId": "USsomeoneelse"}), WEBHOOKS, "get", 200) == {
        "data": []
    }
    one = made["/calls"]
    url = f"{WEBHOOKS}/{one['id']}"
    assert check(api.get(url), WEBHOOK, "get", 200)["data"] == one
    check(api.delete(url), WEBHOOK, "delete", 204)
    assert check(api.get(url), WEBHOOK, "get", 404)["code"] == "0300404"
    assert check(api.delete(url), WEBHOOK, "delete", 404)["code"] == "0300404"
    assert len(check(api.get(WEBHOOKS), WEBHOOKS, "get", 200)["data"]) == 3


def test_webhook_fields_are_kept(api: httpx.Client) -> None:
    webhook = register(
        api,
        "messages",
        "http://127.0.0.1:9/hook",
        ["message.received"],
        label="crm sync",
        status="disabled",
        resourceIds=[PHONE_NUMBER_ID],
        userId=USER_ID,
    )
    assert (webhook["label"], webhook["status"], webhook["resourceIds"]) == (
        "crm sync",
        "disabled",
        [PHONE_NUMBER_ID],
    )


@pytest.mark.parametrize(
    ("kind", "body", "path"),
    [
        ("calls", {"url": "https://x.test/", "events": ["message.received"]}, "/events/0"),
        ("messages", {"url": "https://x.test/", "events": ["call.completed"]}, "/events/0"),
        ("call-summaries", {"url": "https://x.test/", "events": []}, "/events"),
        (
            "call-transcripts",
            {"url": "https://x.test/", "events": "call.transcript.completed"},
            "/events",
        ),
        ("calls", {"events": ["call.completed"]}, "/url"),
        ("calls", {"url": "https://x.test/"}, "/events"),
        ("calls", {"url": "not a url", "events": ["call.completed"]}, "/url"),
        (
            "calls",
            {"url": "https://x.test/", "events": ["call.completed"], "resourceIds": ["+1"]},
            "/resourceIds",
        ),
        (
            "calls",
            {"url": "https://x.test/", "events": ["call.completed"], "status": "on"},
            "/status",
        ),
    ],
)
def test_webhook_bodies_are_validated_per_endpoint(
    api: httpx.Client, kind: str, body: dict[str, Any], path: str
) -> None:
    spec_path = f"{WEBHOOKS}/{kind}"
    error = check(api.post(spec_path, json=body), spec_path, "post", 400)
    assert error["code"] == "0305400"
    assert error["errors"][0]["path"] == path
    assert check(api.get(WEBHOOKS), WEBHOOKS, "get", 200)["data"] == []


def test_webhook_of_an_unknown_user_and_malformed_ids(api: httpx.Client) -> None:
    body = {"url": "https://x.test/", "events": ["call.completed"], "userId": "USnobody"}
    check(api.post(f"{WEBHOOKS}/calls", json=body), f"{WEBHOOKS}/calls", "post", 404)
    error = check(api.get(f"{WEBHOOKS}/AB123"), WEBHOOK, "get", 400)
    assert error["errors"][0]["path"] == "/id"
    check(api.get(f"{CALL.format(callId='WH1')}"), CALL, "get", 400)
    check(api.get("/v1/messages/nope"), MESSAGE, "get", 400)


def test_activity_routes_share_auth_faults_and_rate_limit(
    sandbox: QuoSandbox, api: httpx.Client, tmp_path: Path
) -> None:
    with httpx.Client(base_url=sandbox.url) as anonymous:
        assert check(anonymous.get(WEBHOOKS), WEBHOOKS, "get", 401)["code"] == "0300401"
        call = CALL.format(callId="AC1")
        assert check(anonymous.get(call), CALL, "get", 401)["code"] == "0100401"
    sandbox.inject_fault(503, count=1, kinds=["call"])
    check(api.get(WEBHOOKS), WEBHOOKS, "get", 200)  # another kind: not this fault's
    assert api.get(CALL.format(callId="AC1")).status_code == 503
    check(api.get(CALL.format(callId="AC1")), CALL, "get", 404)
    sandbox.inject_fault(500, count=1)
    assert check(api.get(f"{WEBHOOKS}/WH1"), WEBHOOK, "get", 500)["code"] == "0301500"
    kinds = sandbox.stats()["activityByKind"]
    assert (kinds["call"], kinds["webhook_list"], kinds["webhook_get"]) == (3, 2, 1)
    # A refill of one token per 1000 s: the second request is limited, whatever the timing.
    with (
        QuoSandbox(tmp_path / "limited", rate_limit=0.001) as limited,
        httpx.Client(base_url=limited.url, headers={"Authorization": limited.api_key}) as c,
    ):
        check(c.get("/v1/phone-numbers"), "/v1/phone-numbers", "get", 200)
        throttled = c.get(WEBHOOKS)
        assert throttled.status_code == 429 and throttled.headers["Retry-After"]


# ---- calls ---------------------------------------------------------------------------------
def test_answered_call_emits_signed_events_in_order(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    hooks = register_all(api, receiver.url)
    before_ms = int(time.time() * 1000)
    record = sandbox.simulate_call(CALLER, recording=True, summary=True, transcript=True)
    got = arrived(receiver, sandbox, 5)
    after_ms = int(time.time() * 1000)
    call_id = record["callId"]
    assert call_id.startswith("AC") and record["deliveries"] == 5
    for delivery in got:
        assert before_ms <= verify(delivery, hooks[delivery.path]["key"]) <= after_ms
        assert delivery.headers["content-type"] == "application/json"
    events = [d.json() for d in got]
    assert [e["id"] for e in events] == record["eventIds"]
    assert [e["type"] for e in events] == [
        *CALL_EVENTS,
        "call.summary.completed",
        "call.transcript.completed",
    ]
    assert [d.path for d in got] == ["/calls"] * 3 + ["/call-summaries", "/call-transcripts"]
    for event in events:
        assert event["object"] == "event" and event["apiVersion"] == "v4"
        assert event["id"].startswith("EV") and event["data"]["deepLink"] == record["deepLink"]
    ringing, completed, recorded, summary, transcript = (e["data"]["object"] for e in events)
    assert ringing["status"] == "ringing" and ringing["answeredAt"] is None
    assert completed["id"] == call_id and completed["object"] == "call"
    assert completed["answeredAt"] and completed["answeredBy"] == USER_ID
    assert completed["status"] == "completed" and completed["duration"] == 60
    assert completed["participants"] == [CALLER, WORKSPACE_NUMBER]
    assert completed["recordings"] is None and completed["phoneNumberId"] == PHONE_NUMBER_ID
    assert recorded["recordings"][0]["url"].endswith(".mp3")
    assert summary["callId"] == call_id and summary["object"] == "callSummary"
    assert "id" not in summary and summary["summary"] and summary["nextSteps"]
    assert transcript["callId"] == call_id and transcript["object"] == "callTranscript"

    # The v1 routes serve the same call, per the spec.
    call = check(api.get(CALL.format(callId=call_id)), CALL, "get", 200)["data"]
    assert {k: completed[k] for k in call} == call
    served = check(api.get(SUMMARY.format(callId=call_id)), SUMMARY, "get", 200)["data"]
    assert (served["summary"], served["nextSteps"]) == (summary["summary"], summary["nextSteps"])
    served = check(api.get(TRANSCRIPT.format(id=call_id)), TRANSCRIPT, "get", 200)["data"]
    assert served["dialogue"] == transcript["dialogue"]
    recordings = check(api.get(RECORDINGS.format(callId=call_id)), RECORDINGS, "get", 200)
    assert [r["url"] for r in recordings["data"]] == [r["url"] for r in recorded["recordings"]]
    assert check(api.get(VOICEMAIL.format(callId=call_id)), VOICEMAIL, "get", 404)["code"] == (
        "1200404"
    )


def test_voicemail_completes_unanswered_with_a_voicemail(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    hooks = register_all(api, receiver.url)
    record = sandbox.simulate_call(CALLER, outcome="voicemail", duration=25)
    got = arrived(receiver, sandbox, 2)
    for delivery in got:
        verify(delivery, hooks[delivery.path]["key"])
    assert [d.json()["type"] for d in got] == ["call.ringing", "call.completed"]
    completed = got[1].json()["data"]["object"]
    assert completed["answeredAt"] is None and completed["answeredBy"] is None
    assert completed["status"] == "no-answer" and completed["duration"] == 25
    call_id = record["callId"]
    voicemail = check(api.get(VOICEMAIL.format(callId=call_id)), VOICEMAIL, "get", 200)["data"]
    assert voicemail["id"].startswith("VM") and voicemail["status"] == "completed"
    assert voicemail["duration"] == 25 and voicemail["transcript"] and voicemail["recordingUrl"]
    check(api.get(SUMMARY.format(callId=call_id)), SUMMARY, "get", 404)
    check(api.get(TRANSCRIPT.format(id=call_id)), TRANSCRIPT, "get", 404)
    assert check(api.get(RECORDINGS.format(callId=call_id)), RECORDINGS, "get", 200) == {"data": []}


def test_missed_call_is_completed_but_never_answered(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    register_all(api, receiver.url)
    record = sandbox.simulate_call(CALLER, direction="outgoing", outcome="missed", duration=7)
    completed = arrived(receiver, sandbox, 2)[1].json()["data"]["object"]
    # Quo's trap: status "completed" and a duration, yet nobody answered.
    assert (completed["status"], completed["duration"], completed["answeredAt"]) == (
        "completed",
        7,
        None,
    )
    assert completed["participants"] == [WORKSPACE_NUMBER, CALLER]
    assert completed["initiatedBy"] == USER_ID
    check(api.get(VOICEMAIL.format(callId=record["callId"])), VOICEMAIL, "get", 404)


def test_empty_participants_only_in_events(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    register_all(api, receiver.url)
    record = sandbox.simulate_call(CALLER, empty_participants=True, recording=True)
    assert all(
        d.json()["data"]["object"]["participants"] == [] for d in arrived(receiver, sandbox, 3)
    )
    call = check(api.get(CALL.format(callId=record["callId"])), CALL, "get", 200)["data"]
    assert call["participants"] == [CALLER, WORKSPACE_NUMBER]


def test_events_name_the_contacts_with_the_number(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    fields = {"firstName": "Ada", "phoneNumbers": [{"name": "mobile", "value": CALLER}]}
    contact = api.post("/v1/contacts", json={"defaultFields": fields}).json()["data"]
    api.post("/v1/contacts", json={"defaultFields": {"firstName": "Other"}})
    register_all(api, receiver.url)
    sandbox.simulate_call(CALLER, summary=True)
    objects = [d.json()["data"]["object"] for d in arrived(receiver, sandbox, 3)]
    assert [o["contactIds"] for o in objects] == [[contact["id"]]] * 3


def test_only_matching_enabled_webhooks_receive(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    register(api, "calls", f"{receiver.url}/completed-only", ["call.completed"])
    register(api, "calls", f"{receiver.url}/off", CALL_EVENTS, status="disabled")
    register(api, "calls", f"{receiver.url}/other-line", CALL_EVENTS, resourceIds=["PNother"])
    mine = register(
        api, "calls", f"{receiver.url}/mine", CALL_EVENTS, resourceIds=[PHONE_NUMBER_ID]
    )
    gone = register(api, "calls", f"{receiver.url}/gone", CALL_EVENTS)
    check(api.delete(f"{WEBHOOKS}/{gone['id']}"), WEBHOOK, "delete", 204)
    record = sandbox.simulate_call(CALLER)
    got = arrived(receiver, sandbox, 3)
    assert record["deliveries"] == 3
    assert sorted((d.path, d.json()["type"]) for d in got) == [
        ("/completed-only", "call.completed"),
        ("/mine", "call.completed"),
        ("/mine", "call.ringing"),
    ]
    verify(next(d for d in got if d.path == "/mine"), mine["key"])


def test_simulated_calls_are_listed_with_their_objects(sandbox: QuoSandbox) -> None:
    first = sandbox.simulate_call(CALLER, summary=True, transcript=True)
    second = sandbox.simulate_call("+13125550188", outcome="voicemail")
    listed = sandbox.simulated_calls()
    assert [c["callId"] for c in listed] == [first["callId"], second["callId"]]
    assert listed[0]["outcome"] == "answered" and listed[0]["summary"]["summary"]
    assert listed[0]["transcript"]["dialogue"] and listed[0]["voicemail"] is None
    assert listed[0]["eventIds"] == first["eventIds"] and first["deliveries"] == 0
    assert listed[1]["voicemail"]["id"].startswith("VM") and listed[1]["summary"] is None
    assert listed[1]["call"]["answeredAt"] is None
    assert sandbox.stats()["calls"] == 2


@pytest.mark.parametrize(
    "spec",
    [
        {"externalNumber": CALLER, "outcome": "missed", "summary": True},
        {"externalNumber": CALLER, "outcome": "voicemail", "recording": True},
        {"externalNumber": CALLER, "outcome": "voicemail", "direction": "outgoing"},
        {"externalNumber": CALLER, "outcome": "answered", "duration": 0},
        {"externalNumber": "2125550147"},
        {"externalNumber": WORKSPACE_NUMBER},
        {"externalNumber": CALLER, "outcome": "busy"},
        {"externalNumber": CALLER, "colour": "red"},
        {},
    ],
)
def test_admin_refuses_impossible_calls(sandbox: QuoSandbox, spec: dict[str, Any]) -> None:
    answer = httpx.post(f"{sandbox.url}/_sandbox/calls", json=spec)
    assert answer.status_code == 400 and answer.json()["message"]
    assert sandbox.simulated_calls() == []


# ---- messages ------------------------------------------------------------------------------
def test_messages_emit_received_and_delivered(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    hooks = register_all(api, receiver.url)
    incoming = sandbox.simulate_message(CALLER, "Can we move it to Friday?")
    outgoing = sandbox.simulate_message(CALLER, "Sure, see you then.", direction="outgoing")
    legacy = sandbox.simulate_message(CALLER, "ok", to_as_string=True)
    got = arrived(receiver, sandbox, 3)
    for delivery in got:
        assert delivery.path == "/messages"
        verify(delivery, hooks["/messages"]["key"])
    events = [d.json() for d in got]
    assert [e["type"] for e in events] == [
        "message.received",
        "message.delivered",
        "message.received",
    ]
    assert [e["id"] for e in events] == [m["eventIds"][0] for m in (incoming, outgoing, legacy)]
    received, delivered, old = (e["data"]["object"] for e in events)
    assert (received["from"], received["to"], received["direction"]) == (
        CALLER,
        [WORKSPACE_NUMBER],
        "incoming",
    )
    assert received["text"] == "Can we move it to Friday?" and received["status"] == "received"
    assert (delivered["from"], delivered["to"], delivered["status"]) == (
        WORKSPACE_NUMBER,
        [CALLER],
        "delivered",
    )
    assert old["to"] == WORKSPACE_NUMBER  # a plain string, as older payloads send it
    message = check(api.get(f"/v1/messages/{incoming['messageId']}"), MESSAGE, "get", 200)
    assert message["data"]["text"] == "Can we move it to Friday?"
    assert message["data"]["to"] == [WORKSPACE_NUMBER]
    assert check(api.get("/v1/messages/AC404"), MESSAGE, "get", 404)["code"] == "0200404"
    assert [m["messageId"] for m in sandbox.simulated_messages()] == [
        m["messageId"] for m in (incoming, outgoing, legacy)
    ]


def test_a_message_webhook_takes_only_its_events(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    register(api, "messages", f"{receiver.url}/in", ["message.received"])
    sandbox.simulate_message(CALLER, "out", direction="outgoing")
    sandbox.simulate_message(CALLER, "in")
    sandbox.simulate_call(CALLER)
    assert [d.json()["data"]["object"]["text"] for d in arrived(receiver, sandbox, 1)] == ["in"]


# ---- delivery faults -----------------------------------------------------------------------
def test_duplicated_deliveries_arrive_twice(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    hooks = register_all(api, receiver.url)
    sandbox.webhook_faults(duplicate=1)
    record = sandbox.simulate_message(CALLER, "twice")
    got = arrived(receiver, sandbox, 2)
    assert got[0].body == got[1].body and got[0].json()["id"] == record["eventIds"][0]
    for delivery in got:
        verify(delivery, hooks["/messages"]["key"])
    assert sandbox.deliveries()["duplicated"] == 1


def test_dropped_and_reordered_deliveries(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    register_all(api, receiver.url)
    sandbox.webhook_faults(drop=1)
    dropped = sandbox.simulate_call(CALLER)  # its call.ringing is lost
    sandbox.webhook_faults(reorder=5)
    reordered = sandbox.simulate_call(CALLER, recording=True, summary=True, transcript=True)
    got = arrived(receiver, sandbox, 6)
    assert [d.json()["id"] for d in got] == [
        dropped["eventIds"][1],
        *reversed(reordered["eventIds"]),
    ]
    assert got[1].json()["type"] == "call.transcript.completed"  # summary before completed
    stats = sandbox.deliveries()
    assert (stats["dropped"], stats["sent"], stats["held"]) == (1, 6, 0)


# ---- workspace -----------------------------------------------------------------------------
def test_phone_numbers_and_users(api: httpx.Client) -> None:
    numbers = check(api.get("/v1/phone-numbers"), "/v1/phone-numbers", "get", 200)["data"]
    assert [(n["id"], n["number"]) for n in numbers] == [(PHONE_NUMBER_ID, WORKSPACE_NUMBER)]
    assert numbers[0]["users"][0]["id"] == USER_ID
    mine = api.get("/v1/phone-numbers", params={"userId": USER_ID})
    assert check(mine, "/v1/phone-numbers", "get", 200)["data"] == numbers
    other = api.get("/v1/phone-numbers", params={"userId": "USother"})
    assert check(other, "/v1/phone-numbers", "get", 200)["data"] == []
    check(api.get("/v1/phone-numbers", params={"userId": "x"}), "/v1/phone-numbers", "get", 400)
    users = check(api.get("/v1/users", params={"maxResults": 50}), "/v1/users", "get", 200)
    assert [u["id"] for u in users["data"]] == [USER_ID] and users["nextPageToken"] is None
    for bad in ({}, {"maxResults": 51}, {"maxResults": 0}):
        assert check(api.get("/v1/users", params=bad), "/v1/users", "get", 400)["code"] == (
            "1100400"
        )


def test_signature_changes_with_the_body(
    sandbox: QuoSandbox, api: httpx.Client, receiver: Receiver
) -> None:
    """The checker above is not vacuous: a tampered body or another key fails it."""
    hooks = register_all(api, receiver.url)
    sandbox.simulate_message(CALLER, "hello")
    (delivery,) = arrived(receiver, sandbox, 1)
    tampered = Received(
        delivery.path, delivery.headers, delivery.body.replace(b"hello", b"hellO"), 0
    )
    with pytest.raises(AssertionError):
        verify(tampered, hooks["/messages"]["key"])
    with pytest.raises(AssertionError):
        verify(delivery, hooks["/calls"]["key"])
    assert json.loads(delivery.body)["data"]["object"]["text"] == "hello"
