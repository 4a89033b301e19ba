"""Calls, messages and v1 webhooks of the Quo sandbox: its state and the events it emits.

The admin API simulates a call or a message; its objects are then served by the v1 activity
routes (quo_server.py) in the spec's shapes, and its events go, as Quo's v4 envelopes
(`{id, object, apiVersion, createdAt, type, data: {object, deepLink}}`) signed with each
webhook's key in `openphone-signature`, to every registered webhook that takes them, through a
WebhookDelivery (drop, duplicate, delay and reorder switches). Memory only: a restarted sandbox
has no webhooks, calls or messages.

Shapes follow what Quo sends (reference quo-api.md §3.3): an unanswered call completes with
`answeredAt: null` (a missed one with status "completed", the trap production fell into; a
voicemail with "no-answer" and a voicemail object), summaries and transcripts are keyed by
`callId`, and `participants` can be sent empty (`emptyParticipants`), as Quo sometimes does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from jsonschema import Draft202012Validator

from quo_sync_dagster.sandbox.webhook_delivery import WebhookDelivery

WORKSPACE_NUMBER = "+14155550100"  # the workspace's one Quo number (a valid US number)
PHONE_NUMBER_ID = "PNsandbox0"
USER_ID = "USsandbox0"  # the workspace owner, its one user
ORG_ID = "ORsandbox0"
GROUP_ID = "GRsandbox0"
MEDIA_URL = "https://media.quo-sandbox.invalid"  # .invalid: recordings are never fetched
RING_SECONDS = 4
# Request kinds of the activity routes, for stats and for faults that name kinds.
ACTIVITY_KINDS = (
    "webhook_create",
    "webhook_list",
    "webhook_get",
    "webhook_delete",
    "call",
    "call_summary",
    "call_transcript",
    "call_recordings",
    "call_voicemail",
    "message",
    "phone_numbers",
    "users",
)
_RECORDING_FIELDS = ("id", "duration", "startTime", "type", "url")  # as call events carry them
_SINCE = "2024-01-02T03:04:05.000Z"  # when the workspace's number and user were created
_E164 = r"^\+[1-9]\d{1,14}$"

USER: dict[str, Any] = {
    "id": USER_ID,
    "email": "owner@quo-sandbox.invalid",
    "firstName": "Sandy",
    "lastName": "Owner",
    "pictureUrl": None,
    "role": "owner",
    "createdAt": _SINCE,
    "updatedAt": _SINCE,
}
_UNRESTRICTED = {"CA": "unrestricted", "Intl": "restricted", "US": "unrestricted"}
PHONE_NUMBER: dict[str, Any] = {
    "id": PHONE_NUMBER_ID,
    "groupId": GROUP_ID,
    "portRequestId": None,
    "formattedNumber": "(415) 555-0100",
    "forward": None,
    "name": "Sandbox Line",
    "number": WORKSPACE_NUMBER,
    "portingStatus": None,
    "symbol": "📞",
    "users": [
        {k: USER[k] for k in ("email", "firstName", "lastName", "id", "role")}
        | {"groupId": GROUP_ID}
    ],
    "createdAt": _SINCE,
    "updatedAt": _SINCE,
    "restrictions": {"calling": dict(_UNRESTRICTED), "messaging": dict(_UNRESTRICTED)},
}

_CALL_SPEC = Draft202012Validator(
    {
        "type": "object",
        "properties": {
            "externalNumber": {"type": "string", "pattern": _E164},
            "direction": {"enum": ["incoming", "outgoing"]},
            "outcome": {"enum": ["answered", "missed", "voicemail"]},
            "duration": {"type": "integer", "minimum": 0, "maximum": 86_400},
            "recording": {"type": "boolean"},
            "summary": {"type": "boolean"},
            "transcript": {"type": "boolean"},
            "emptyParticipants": {"type": "boolean"},
        },
        "required": ["externalNumber"],
        "additionalProperties": False,
    }
)
_MESSAGE_SPEC = Draft202012Validator(
    {
        "type": "object",
        "properties": {
            "externalNumber": {"type": "string", "pattern": _E164},
            "direction": {"enum": ["incoming", "outgoing"]},
            "text": {"type": "string", "maxLength": 1600},
            "toAsString": {"type": "boolean"},  # `to` as a plain string, like older payloads
        },
        "required": ["externalNumber", "text"],
        "additionalProperties": False,
    }
)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_signing_key() -> str:
    """A webhook's `key`: base64 of random bytes (receivers base64-decode it for the HMAC)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def signature(key: str, raw_body: bytes, at_ms: int) -> str:
    """`openphone-signature`: hmac;1;<ms>;<base64 HMAC-SHA256 over "<ms>." + raw body> keyed
    with the base64-decoded webhook key."""
    mac = hmac.new(base64.b64decode(key), f"{at_ms}.".encode() + raw_body, hashlib.sha256)
    return f"hmac;1;{at_ms};{base64.b64encode(mac.digest()).decode()}"


def _checked(validator: Draft202012Validator, spec: Any) -> dict[str, Any]:
    """`spec` if the validator holds; ValueError naming the first problem otherwise."""
    for error in sorted(validator.iter_errors(spec), key=lambda e: e.json_path)[:1]:
        raise ValueError(f"{error.json_path}: {error.message}")
    return spec


@dataclass(frozen=True)
class CallSpec:
    """What `POST /_sandbox/calls` asks for (camelCase in JSON)."""

    external_number: str
    direction: str = "incoming"
    outcome: str = "answered"
    duration: int = 60
    recording: bool = False
    summary: bool = False
    transcript: bool = False
    empty_participants: bool = False

    @classmethod
    def from_json(cls, spec: Any) -> CallSpec:
        spec = _checked(_CALL_SPEC, spec)
        outcome = spec.get("outcome", "answered")
        default_duration = {"answered": 60, "missed": 0, "voicemail": 20}[outcome]
        call = cls(
            external_number=spec["externalNumber"],
            direction=spec.get("direction", "incoming"),
            outcome=outcome,
            duration=spec.get("duration", default_duration),
            recording=spec.get("recording", False),
            summary=spec.get("summary", False),
            transcript=spec.get("transcript", False),
            empty_participants=spec.get("emptyParticipants", False),
        )
        if call.external_number == WORKSPACE_NUMBER:
            raise ValueError("externalNumber is the workspace's own Quo number")
        if outcome != "answered" and (call.recording or call.summary or call.transcript):
            raise ValueError("only an answered call has a recording, summary or transcript")
        if outcome == "voicemail" and call.direction != "incoming":
            raise ValueError("a voicemail is left on an incoming call")
        if outcome != "missed" and call.duration < 1:
            raise ValueError("an answered or voicemail call lasts at least 1 second")
        return call


def _event(event_type: str, obj: dict[str, Any], deep_link: str, at: datetime) -> dict[str, Any]:
    return {
        "id": new_id("EV"),
        "object": "event",
        "apiVersion": "v4",
        "createdAt": iso(at),
        "type": event_type,
        "data": {"object": obj, "deepLink": deep_link},
    }


def _deep_link(external_number: str, activity_id: str) -> str:
    conversation = "CN" + hashlib.sha256(external_number.encode()).hexdigest()[:24]
    return f"https://my.quo.com/inbox/{PHONE_NUMBER_ID}/c/{conversation}?at={activity_id}"


class ActivityState:
    """Webhooks, calls (with their summaries, transcripts, recordings, voicemails) and messages.

    Used from the server's event loop only. `contact_ids(number)` are the ids of the sandbox's
    contacts with that phone number (the events' `contactIds`)."""

    def __init__(self, contact_ids: Callable[[str], list[str]] = lambda number: []) -> None:
        self._contact_ids = contact_ids
        self.delivery = WebhookDelivery()
        self.webhooks: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        self.summaries: dict[str, dict[str, Any]] = {}
        self.transcripts: dict[str, dict[str, Any]] = {}
        self.recordings: dict[str, list[dict[str, Any]]] = {}
        self.voicemails: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.simulated_calls: list[dict[str, Any]] = []
        self.simulated_messages: list[dict[str, Any]] = []

    def close(self) -> None:
        self.delivery.close()

    def summary(self) -> dict[str, int]:
        return {
            "webhooks": len(self.webhooks),
            "calls": len(self.calls),
            "messages": len(self.messages),
        }

    # ---- webhooks (bodies already validated against the spec) -------------------------------
    def add_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        now = iso(datetime.now(UTC))
        webhook = {
            "id": new_id("WH"),
            "userId": body.get("userId", USER_ID),
            "orgId": ORG_ID,
            "label": body.get("label"),
            "status": body.get("status", "enabled"),
            "url": body["url"],
            "key": new_signing_key(),
            "createdAt": now,
            "updatedAt": now,
            "deletedAt": None,
            "events": list(body["events"]),
            "resourceIds": list(body.get("resourceIds", ["*"])),
        }
        self.webhooks[webhook["id"]] = webhook
        return webhook

    def webhooks_of(self, user_id: str) -> list[dict[str, Any]]:
        return [w for w in self.webhooks.values() if w["userId"] == user_id]

    def _takes(self, webhook: dict[str, Any], event_type: str) -> bool:
        resources = webhook["resourceIds"]
        return (
            webhook["status"] == "enabled"
            and event_type in webhook["events"]
            and ("*" in resources or PHONE_NUMBER_ID in resources)
        )

    def _emit(self, events: list[dict[str, Any]]) -> int:
        """Sign and hand each event to the delivery, for every webhook that takes it; the
        number of deliveries handed over (before the delivery's faults)."""
        sent = 0
        for event in events:
            raw = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
            for webhook in list(self.webhooks.values()):
                if self._takes(webhook, event["type"]):
                    header = signature(webhook["key"], raw, int(time.time() * 1000))
                    headers = {"Content-Type": "application/json", "openphone-signature": header}
                    self.delivery.send(webhook["url"], raw, headers)
                    sent += 1
        return sent

    # ---- calls -----------------------------------------------------------------------------
    def simulate_call(self, spec: CallSpec) -> dict[str, Any]:
        """Store the call and what came of it, emit its events; the admin record of it."""
        ended = datetime.now(UTC)
        call = _call(spec, ended)
        call_id, external = call["id"], spec.external_number
        self.calls[call_id] = call
        self.recordings[call_id] = []
        if spec.outcome == "voicemail":
            self.voicemails[call_id] = _voicemail(call, external)
        if spec.recording:
            self.recordings[call_id] = [_recording(call)]
        if spec.summary:
            self.summaries[call_id] = _summary(call_id, external)
        if spec.transcript:
            self.transcripts[call_id] = _transcript(call, external)
        link = _deep_link(external, call_id)
        events = self._call_events(call, spec, link, self._contact_ids(external))
        record = {
            "callId": call_id,
            "externalNumber": external,
            "direction": spec.direction,
            "outcome": spec.outcome,
            "emptyParticipants": spec.empty_participants,
            "deepLink": link,
            "events": [{"id": e["id"], "type": e["type"]} for e in events],
            "eventIds": [e["id"] for e in events],
            "deliveries": self._emit(events),
        }
        self.simulated_calls.append(record)
        return record

    def _call_events(
        self, call: dict[str, Any], spec: CallSpec, link: str, contact_ids: list[str]
    ) -> list[dict[str, Any]]:
        """call.ringing, call.completed, then the recording, summary and transcript events."""
        call_id, ended = call["id"], datetime.fromisoformat(call["completedAt"])

        def call_object(state: dict[str, Any], recordings: list | None) -> dict[str, Any]:
            obj = {**state, "object": "call", "contactIds": contact_ids, "recordings": recordings}
            if spec.empty_participants:
                obj["participants"] = []
            return obj

        ringing = {
            **call,
            "status": "ringing",
            "answeredAt": None,
            "answeredBy": None,
            "completedAt": None,
            "duration": 0,
            "updatedAt": call["createdAt"],
        }
        started = datetime.fromisoformat(call["createdAt"])
        events = [
            _event("call.ringing", call_object(ringing, None), link, started),
            _event("call.completed", call_object(call, None), link, ended),
        ]
        if spec.recording:
            sent = [{k: r[k] for k in _RECORDING_FIELDS} for r in self.recordings[call_id]]
            obj = call_object(call, sent)
            events.append(_event("call.recording.completed", obj, link, ended))
        if spec.summary:
            obj = {**self.summaries[call_id], "object": "callSummary", "contactIds": contact_ids}
            events.append(_event("call.summary.completed", obj, link, ended))
        if spec.transcript:
            obj = {**self.transcripts[call_id], "object": "callTranscript"}
            obj["contactIds"] = contact_ids
            events.append(_event("call.transcript.completed", obj, link, ended))
        return events

    def call_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """An admin record with the call's current objects (what a complete activity holds)."""
        call_id = record["callId"]
        return {
            **record,
            "call": self.calls[call_id],
            "recordings": self.recordings[call_id],
            "summary": self.summaries.get(call_id),
            "transcript": self.transcripts.get(call_id),
            "voicemail": self.voicemails.get(call_id),
        }

    # ---- messages --------------------------------------------------------------------------
    def simulate_message(self, spec: Any) -> dict[str, Any]:
        """`POST /_sandbox/messages`: store the message and emit message.received (incoming)
        or message.delivered (outgoing); the admin record of it. ValueError: a bad spec."""
        spec = _checked(_MESSAGE_SPEC, spec)
        external, direction = spec["externalNumber"], spec.get("direction", "incoming")
        if external == WORKSPACE_NUMBER:
            raise ValueError("externalNumber is the workspace's own Quo number")
        incoming = direction == "incoming"
        message_id, now = new_id("AC"), iso(datetime.now(UTC))
        sender, recipient = (
            (external, WORKSPACE_NUMBER) if incoming else (WORKSPACE_NUMBER, external)
        )
        message = {
            "id": message_id,
            "to": [recipient],
            "from": sender,
            "text": spec["text"],
            "phoneNumberId": PHONE_NUMBER_ID,
            "direction": direction,
            "userId": USER_ID,
            "status": "delivered",  # the spec's message statuses have no "received"
            "createdAt": now,
            "updatedAt": now,
        }
        self.messages[message_id] = message
        link = _deep_link(external, message_id)
        obj = {
            **message,
            "object": "message",
            "to": recipient if spec.get("toAsString") else [recipient],
            "status": "received" if incoming else "delivered",
            "conversationId": link.split("/c/")[1].split("?")[0],
            "contactIds": self._contact_ids(external),
        }
        event_type = "message.received" if incoming else "message.delivered"
        event = _event(event_type, obj, link, datetime.now(UTC))
        record = {
            "messageId": message_id,
            "externalNumber": external,
            "direction": direction,
            "text": spec["text"],
            "deepLink": link,
            "events": [{"id": event["id"], "type": event_type}],
            "eventIds": [event["id"]],
            "deliveries": self._emit([event]),
        }
        self.simulated_messages.append(record)
        return record


def _call(spec: CallSpec, ended: datetime) -> dict[str, Any]:
    """The call as `GET /v1/calls/{id}` serves it once completed."""
    answered, incoming = spec.outcome == "answered", spec.direction == "incoming"
    started = ended - timedelta(seconds=spec.duration + RING_SECONDS)
    external = spec.external_number
    return {
        "answeredAt": iso(started + timedelta(seconds=RING_SECONDS)) if answered else None,
        "answeredBy": USER_ID if answered else None,
        "initiatedBy": None if incoming else USER_ID,
        "direction": spec.direction,
        "status": "no-answer" if spec.outcome == "voicemail" else "completed",
        "completedAt": iso(ended),
        "createdAt": iso(started),
        "callRoute": None,
        "duration": spec.duration,
        "forwardedFrom": None,
        "forwardedTo": None,
        "aiHandled": None,
        "id": new_id("AC"),
        "phoneNumberId": PHONE_NUMBER_ID,
        "participants": [external, WORKSPACE_NUMBER] if incoming else [WORKSPACE_NUMBER, external],
        "updatedAt": iso(ended),
        "userId": USER_ID,
    }


def _recording(call: dict[str, Any]) -> dict[str, Any]:
    recording_id = new_id("RC")
    return {
        "duration": call["duration"],
        "id": recording_id,
        "startTime": call["answeredAt"],
        "status": "completed",
        "type": "audio/mpeg",
        "url": f"{MEDIA_URL}/recordings/{recording_id}.mp3",
    }


def _voicemail(call: dict[str, Any], external: str) -> dict[str, Any]:
    voicemail_id = new_id("VM")
    return {
        "duration": call["duration"],
        "id": voicemail_id,
        "transcript": f"Hi, this is {external}, please call me back about {call['id']}.",
        "recordingUrl": f"{MEDIA_URL}/voicemails/{voicemail_id}.mp3",
        "status": "completed",
    }


def _summary(call_id: str, external: str) -> dict[str, Any]:
    """A call summary; its lines name the call, so a check can find them in a CRM activity."""
    return {
        "callId": call_id,
        "nextSteps": [f"Send {external} the quote discussed on call {call_id}."],
        "status": "completed",
        "summary": [
            f"Call {call_id}: {external} asked about rescheduling the next visit.",
            "Agreed on Thursday morning.",
        ],
        "jobs": [
            {
                "icon": "📋",
                "name": "Lead details",
                "result": {"data": [{"name": "Interest", "value": "Rescheduling"}]},
            }
        ],
    }


def _transcript(call: dict[str, Any], external: str) -> dict[str, Any]:
    first, second = (WORKSPACE_NUMBER, external)
    if call["direction"] == "outgoing":
        first, second = second, first  # the one called speaks first
    lines = [
        (first, "Hello, how can I help?"),
        (second, f"Hi, this is about call {call['id']}, can we move the visit?"),
        (first, "Sure, Thursday morning works."),
    ]
    duration = call["duration"]
    step = duration / len(lines)
    return {
        "callId": call["id"],
        "createdAt": call["completedAt"],
        "dialogue": [
            {
                "content": content,
                "start": round(n * step, 2),
                "end": round((n + 1) * step, 2),
                "identifier": speaker,
                "userId": USER_ID if speaker == WORKSPACE_NUMBER else None,
            }
            for n, (speaker, content) in enumerate(lines)
        ],
        "duration": duration,
        "status": "completed",
    }
