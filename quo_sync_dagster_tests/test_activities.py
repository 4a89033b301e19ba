"""Quo events into one activity per call or message (core/activities.py): envelopes of every
version and quirk, merging in any order, duplicates, missed calls and voicemails."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from quo_sync_dagster.core.activities import (
    QuoEvent,
    call_activity,
    external_number,
    merge,
    needs_voicemail_check,
    ready,
    sms_activity,
    with_call,
    with_voicemail,
)
from quo_sync_dagster.core.models import CallOutcome

QUO, OTHER = "+14155550100", "+14155550123"
NUMBERS = {QUO}


def envelope(event_id: str, kind: str, obj: dict[str, Any], version: str = "v4") -> dict:
    return {
        "id": event_id,
        "object": "event",
        "apiVersion": version,
        "createdAt": "2026-03-01T10:00:00.000Z",
        "type": kind,
        "data": {"object": obj, "deepLink": "https://my.quo.com/inbox/PN1/c/CN1?at=AC1"},
    }


def call(**fields: Any) -> dict[str, Any]:
    return {
        "id": "AC1",
        "object": "call",
        "direction": "incoming",
        "status": "completed",
        "createdAt": "2026-03-01T10:00:00.000Z",
        "answeredAt": "2026-03-01T10:00:03.000Z",
        "completedAt": "2026-03-01T10:01:16.000Z",
        "duration": 76,
        "answeredBy": "US1",
        "participants": [OTHER, QUO],
        "userId": "US1",
        "recordings": None,
        **fields,
    }


def call_events(**fields: Any) -> list[QuoEvent]:
    raw = [
        envelope("EV1", "call.ringing", call(status="ringing", answeredAt=None, completedAt=None)),
        envelope("EV2", "call.completed", call(**fields)),
        envelope(
            "EV3",
            "call.recording.completed",
            call(**fields, recordings=[{"id": "R1", "url": "https://rec/1", "duration": 70}]),
        ),
        envelope(
            "EV4",
            "call.summary.completed",
            {
                "callId": "AC1",
                "object": "callSummary",
                "status": "completed",
                "summary": ["Wants a quote", "Calls back Monday"],
                "nextSteps": ["Send quote"],
            },
        ),
        envelope(
            "EV5",
            "callTranscript",  # the docs' sample names the type by its object
            {
                "callId": "AC1",
                "object": "callTranscript",
                "status": "completed",
                "dialogue": [
                    {"content": "Hi", "identifier": OTHER},
                    {"content": "Hello", "userId": "US1"},
                ],
            },
        ),
    ]
    events = [QuoEvent.from_envelope(e) for e in raw]
    assert all(e is not None for e in events)
    return events  # type: ignore[return-value]


def merged(events: list[QuoEvent]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for event in events:
        state = merge(state, event) or state
    return state


def test_every_order_of_a_calls_events_gives_the_same_complete_activity() -> None:
    events = call_events()
    assert {e.object_id for e in events} == {"AC1"}  # summaries and transcripts by callId
    expected = call_activity(merged(events), "1004", NUMBERS)
    assert expected.outcome is CallOutcome.ANSWERED and expected.duration_seconds == 76
    assert expected.summary == "Wants a quote Calls back Monday"
    assert expected.next_steps == ("Send quote",)
    assert expected.recording_urls == ("https://rec/1",)
    assert expected.transcript == f"{OTHER}: Hi\nUS1: Hello"
    assert (expected.external_number, expected.quo_number) == (OTHER, QUO)
    assert expected.deep_link and expected.contact_external_id == "1004"
    for order in itertools.permutations(events):
        assert call_activity(merged(list(order)), "1004", NUMBERS) == expected


def test_a_duplicate_event_changes_nothing() -> None:
    first, *_ = call_events()
    state = merge({}, first)
    assert state is not None and merge(state, first) is None


def test_a_call_still_ringing_is_not_ready_and_a_completed_one_is() -> None:
    ringing, completed, *_ = call_events()
    state = merge({}, ringing)
    assert state is not None and not ready(state)
    assert ready(merge(state, completed) or {})


def test_unanswered_calls_are_missed_whatever_their_duration() -> None:
    _, completed, *_ = call_events(answeredAt=None, duration=31, status="completed")
    state = merge({}, completed) or {}
    assert call_activity(state, "k", NUMBERS).outcome is CallOutcome.MISSED
    assert needs_voicemail_check(state)
    left = with_voicemail(state, {"recordingUrl": "https://vm/1", "transcript": "Call me"})
    activity = call_activity(left, "k", NUMBERS)
    assert activity.outcome is CallOutcome.VOICEMAIL and activity.voicemail_url == "https://vm/1"
    assert not needs_voicemail_check(left)
    assert call_activity(with_voicemail(state, None), "k", NUMBERS).outcome is CallOutcome.MISSED


def test_a_summary_before_the_call_is_completed_by_the_fetched_call() -> None:
    *_, summary, _ = call_events()
    state = merge({}, summary) or {}
    assert not ready(state)  # no call object yet: the run fetches GET /v1/calls/{id}
    state = with_call(state, call())
    assert ready(state) and call_activity(state, "k", NUMBERS).summary


def test_empty_participants_are_filled_from_the_fetched_call() -> None:
    _, completed, *_ = call_events(participants=[])
    state = merge({}, completed) or {}
    assert external_number(state, NUMBERS) is None
    assert external_number(with_call(state, call()), NUMBERS) == OTHER


@pytest.mark.parametrize("version", ["v2", "v3", "v4"])
@pytest.mark.parametrize("to", [QUO, [QUO]])
@pytest.mark.parametrize("text_field", ["text", "body"])
def test_messages_of_every_envelope_version(version: str, to: Any, text_field: str) -> None:
    obj = {
        "id": "AC9",
        "object": "message",
        "from": OTHER,
        "to": to,
        "direction": "incoming",
        text_field: "Can you send more info?",
        "createdAt": "2026-03-01T10:20:12Z",
    }
    event = QuoEvent.from_envelope(envelope("EV9", "message.received", obj, version))
    assert event is not None and event.is_message
    state = merge({}, event) or {}
    assert ready(state)
    sms = sms_activity(state, "1005", NUMBERS)
    assert (sms.content, sms.external_number, sms.quo_number) == (
        "Can you send more info?",
        OTHER,
        QUO,
    )


def test_an_outgoing_messages_other_party_is_its_recipient() -> None:
    obj = {"id": "AC8", "from": QUO, "to": [OTHER], "direction": "outgoing", "text": "On my way"}
    state = merge({}, QuoEvent.from_envelope(envelope("EV8", "message.delivered", obj))) or {}
    assert sms_activity(state, "k", NUMBERS).external_number == OTHER


def test_events_that_log_nothing_and_unreadable_ones() -> None:
    assert QuoEvent.from_envelope(envelope("EV7", "contact.updated", {"id": "CT1"})) is None
    for bad in [
        [],
        {"id": 7, "type": "call.completed", "data": {"object": {}}},
        {"id": "EV1", "type": "call.completed", "data": {}},
        envelope("EV1", "call.summary.completed", {"id": "AC1"}),  # keyed by callId, not id
    ]:
        with pytest.raises(ValueError):
            QuoEvent.from_envelope(bad)


def test_hostile_event_fields_never_break_the_rendering() -> None:
    rng = random.Random(7)
    junk: list[Any] = [None, 3, -1.5, float("nan"), "", "\ud800", [], {}, ["x"], True, "+1"]
    for n in range(300):
        obj = call(**{k: rng.choice(junk) for k in rng.sample(sorted(call()), 5) if k != "id"})
        event = QuoEvent.from_envelope(envelope(f"EV{n}", "call.completed", obj))
        assert event is not None
        state = merge({}, event) or {}
        activity = call_activity(state, "k", NUMBERS)
        assert isinstance(activity.duration_seconds, int) and activity.outcome in CallOutcome
