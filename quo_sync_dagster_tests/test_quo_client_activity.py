"""QuoClient's webhook, call, message and workspace methods, against the Quo sandbox over real
HTTP: round-trips, missing objects read as None, retries, and creates never repeated blindly."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from quo_sync_dagster.quo.client import QuoApiError, QuoClient, QuoOutcomeUnknown
from quo_sync_dagster.sandbox.quo_activity import PHONE_NUMBER_ID, USER_ID, WORKSPACE_NUMBER
from quo_sync_dagster.sandbox.quo_server import QuoSandbox

CALLER = "+12125550163"
URL = "http://127.0.0.1:9/webhooks/quo/7"  # the discard port: a delivery goes nowhere


@pytest.fixture
def client(sandbox: QuoSandbox) -> Iterator[QuoClient]:
    sandbox.clear_faults()
    with QuoClient(sandbox.url, sandbox.api_key) as c:
        yield c
    sandbox.clear_faults()
    # The module's sandbox is shared: leave no webhook behind.
    with QuoClient(sandbox.url, sandbox.api_key) as cleaner:
        for webhook in cleaner.list_webhooks():
            cleaner.delete_webhook(webhook["id"])


def activity_requests(sandbox: QuoSandbox, kind: str) -> int:
    return sandbox.stats()["activityByKind"][kind]


# ---- webhooks ------------------------------------------------------------------------------
def test_webhook_round_trip(client: QuoClient) -> None:
    calls = client.create_webhook("calls", URL, ["call.completed", "call.ringing"], label="sync")
    summaries = client.create_webhook(
        "call-summaries", URL, ["call.summary.completed"], resource_ids=[PHONE_NUMBER_ID]
    )
    assert calls["id"].startswith("WH") and calls["key"] and calls["label"] == "sync"
    assert calls["events"] == ["call.completed", "call.ringing"] and calls["url"] == URL
    assert summaries["resourceIds"] == [PHONE_NUMBER_ID]
    assert {w["id"] for w in client.list_webhooks()} == {calls["id"], summaries["id"]}
    assert client.list_webhooks(user_id="USsomeoneelse") == []
    assert client.get_webhook(calls["id"]) == calls
    assert client.delete_webhook(calls["id"]) is True
    assert client.get_webhook(calls["id"]) is None
    assert client.delete_webhook(calls["id"]) is False  # already gone: fine
    assert [w["id"] for w in client.list_webhooks()] == [summaries["id"]]


def test_webhook_errors(client: QuoClient) -> None:
    with pytest.raises(ValueError, match="kind"):
        client.create_webhook("contacts", URL, ["contact.updated"])
    with pytest.raises(QuoApiError) as info:
        client.create_webhook("messages", URL, ["call.completed"])
    assert (info.value.status, info.value.code) == (400, "0305400")
    assert "/events/0" in str(info.value)
    with pytest.raises(QuoApiError) as info:
        client.get_webhook("not-a-webhook-id")
    assert info.value.status == 400
    assert client.list_webhooks() == []


def test_webhook_create_is_not_repeated_when_its_outcome_is_unknown(
    sandbox: QuoSandbox, client: QuoClient
) -> None:
    before = activity_requests(sandbox, "webhook_create")
    sandbox.inject_fault(500, kinds=["webhook_create"], after_write=True)
    with pytest.raises(QuoOutcomeUnknown):
        client.create_webhook("messages", URL, ["message.received"])
    assert activity_requests(sandbox, "webhook_create") == before + 1  # not retried
    (made,) = client.list_webhooks()  # it was created: the caller finds it by listing
    assert made["url"] == URL
    sandbox.inject_fault(429, retry_after="0", kinds=["webhook_create"])
    again = client.create_webhook("calls", URL, ["call.completed"])  # Quo did not act: retried
    assert activity_requests(sandbox, "webhook_create") == before + 3
    assert {w["id"] for w in client.list_webhooks()} == {made["id"], again["id"]}


# ---- calls and messages --------------------------------------------------------------------
def test_call_objects_round_trip(sandbox: QuoSandbox, client: QuoClient) -> None:
    call_id = sandbox.simulate_call(CALLER, recording=True, summary=True, transcript=True)["callId"]
    call = client.get_call(call_id)
    assert call is not None and call["id"] == call_id and call["answeredAt"]
    assert call["participants"] == [CALLER, WORKSPACE_NUMBER]
    summary = client.get_call_summary(call_id)
    assert summary is not None and summary["callId"] == call_id and summary["summary"]
    transcript = client.get_call_transcript(call_id)
    assert transcript is not None and transcript["dialogue"][0]["content"]
    (recording,) = client.get_call_recordings(call_id)
    assert recording["url"] and recording["duration"] == call["duration"]
    assert client.get_call_voicemail(call_id) is None


def test_missing_objects_read_as_none(sandbox: QuoSandbox, client: QuoClient) -> None:
    voicemail_call = sandbox.simulate_call(CALLER, outcome="voicemail")["callId"]
    voicemail = client.get_call_voicemail(voicemail_call)
    assert voicemail is not None and voicemail["id"].startswith("VM")
    assert voicemail["recordingUrl"] and voicemail["transcript"]
    call = client.get_call(voicemail_call)
    assert call is not None and call["answeredAt"] is None
    assert client.get_call_summary(voicemail_call) is None
    assert client.get_call_transcript(voicemail_call) is None
    assert client.get_call_recordings(voicemail_call) == []
    unknown = "AC" + "0" * 32
    assert client.get_call(unknown) is None
    assert client.get_call_recordings(unknown) == []
    assert client.get_message(unknown) is None


def test_message_round_trip(sandbox: QuoSandbox, client: QuoClient) -> None:
    record = sandbox.simulate_message(CALLER, "See you Friday", direction="outgoing")
    message = client.get_message(record["messageId"])
    assert message is not None
    assert (message["from"], message["to"], message["text"], message["direction"]) == (
        WORKSPACE_NUMBER,
        [CALLER],
        "See you Friday",
        "outgoing",
    )


def test_reads_are_retried_through_5xx(sandbox: QuoSandbox, client: QuoClient) -> None:
    call_id = sandbox.simulate_call(CALLER, summary=True)["callId"]
    before = activity_requests(sandbox, "call_summary")
    sandbox.inject_fault(503, count=2, kinds=["call_summary"])
    summary = client.get_call_summary(call_id)
    assert summary is not None and summary["callId"] == call_id
    assert activity_requests(sandbox, "call_summary") == before + 3


def test_workspace_numbers_and_users(client: QuoClient) -> None:
    (number,) = client.list_phone_numbers()
    assert (number["id"], number["number"]) == (PHONE_NUMBER_ID, WORKSPACE_NUMBER)
    assert [u["id"] for u in client.list_users()] == [USER_ID]


# ---- what the sandbox does not simulate ----------------------------------------------------
def test_list_users_follows_page_tokens() -> None:
    pages = {
        None: {"data": [{"id": "US1"}], "totalItems": 2, "nextPageToken": "p2"},
        "p2": {"data": [{"id": "US2"}], "totalItems": 2, "nextPageToken": None},
    }

    def quo(request: httpx.Request) -> httpx.Response:
        assert request.url.params["maxResults"] == "50"
        return httpx.Response(200, json=pages[request.url.params.get("pageToken")])

    with QuoClient("http://quo.test", "k", transport=httpx.MockTransport(quo)) as c:
        assert [u["id"] for u in c.list_users()] == ["US1", "US2"]


@pytest.mark.parametrize(
    ("code", "reads_as_none"), [("0101400", True), ("0100400", False)], ids=["parties", "other"]
)
def test_a_call_quo_cannot_serve(code: str, reads_as_none: bool) -> None:
    """Quo answers GET /v1/calls/{id} of a call with more than two parties with a 400 "Too Many
    Participants": that call reads as None; any other 400 is an error."""

    def quo(request: httpx.Request) -> httpx.Response:
        body = {"message": "no", "code": code, "status": 400, "title": "Too Many Participants"}
        return httpx.Response(400, content=json.dumps(body))

    with QuoClient("http://quo.test", "k", transport=httpx.MockTransport(quo)) as c:
        if reads_as_none:
            assert c.get_call("AC1") is None
        else:
            with pytest.raises(QuoApiError):
                c.get_call("AC1")
