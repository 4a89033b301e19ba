"""Quo activity events (calls and messages) on their way to the CRM.

A Quo webhook envelope (`{"id", "type", "apiVersion", "data": {"object", "deepLink"}}`, v2-v4)
becomes a QuoEvent. Everything Quo sends about one call (ringing, completed, recording, summary,
transcript) is merged into one JSON state per call id, whatever order the events arrive in, and
the state renders as the one CallActivity the CRM holds for that call. The merge is
commutative and idempotent: a duplicate or replayed event changes nothing, and a summary that
arrives before the call completed still ends in a complete activity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quo_sync_dagster.core.models import CallActivity, CallOutcome, SmsActivity

MESSAGE_EVENTS = frozenset({"message.received", "message.delivered"})
CALL_EVENTS = {"call.ringing": 0, "call.completed": 1, "call.recording.completed": 2}  # -> rank
SUMMARY_EVENT, TRANSCRIPT_EVENT = "call.summary.completed", "call.transcript.completed"
# The docs' samples name summary and transcript events by their object; real deliveries do not.
_TYPE_ALIASES = {"callSummary": SUMMARY_EVENT, "callTranscript": TRANSCRIPT_EVENT}
_NOT_OVER = frozenset({"ringing", "initiated", "queued", "in-progress"})


def activity_queue(integration_id: str) -> str:
    """The inbox queue (and webhook-subscription key) of an integration's Quo events: kept
    apart from its CRM changes, which are queued under the bare integration id."""
    return f"quo:{integration_id}"


@dataclass(frozen=True)
class QuoEvent:
    event_id: str
    type: str  # normalised: message.received, call.completed, call.summary.completed, ...
    object_id: str  # the message id, or the call id (summaries and transcripts: their callId)
    obj: dict[str, Any]  # data.object
    deep_link: str | None

    @property
    def is_message(self) -> bool:
        return self.type in MESSAGE_EVENTS

    @classmethod
    def from_envelope(cls, envelope: Any) -> QuoEvent | None:
        """None for an event type that logs nothing; ValueError naming what is wrong."""
        if not isinstance(envelope, dict):
            raise ValueError("a Quo event is a JSON object")
        event_id, raw_type, data = envelope.get("id"), envelope.get("type"), envelope.get("data")
        if not isinstance(event_id, str) or not event_id or not isinstance(raw_type, str):
            raise ValueError("a Quo event needs a string id and type")
        if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
            raise ValueError(f"event {event_id}: data.object is missing")
        kind = _TYPE_ALIASES.get(raw_type, raw_type)
        if kind not in MESSAGE_EVENTS and kind not in CALL_EVENTS and kind not in _CALL_EXTRAS:
            return None
        obj = data["object"]
        key = "callId" if kind in _CALL_EXTRAS else "id"
        object_id = obj.get(key)
        if not isinstance(object_id, str) or not object_id:
            raise ValueError(f"event {event_id} ({kind}): data.object.{key} is missing")
        link = data.get("deepLink")
        return cls(event_id, kind, object_id, obj, link if isinstance(link, str) else None)


_CALL_EXTRAS = frozenset({SUMMARY_EVENT, TRANSCRIPT_EVENT})


def merge(state: dict[str, Any], event: QuoEvent) -> dict[str, Any] | None:
    """`state` with `event` in it, or None when the event adds nothing (already merged)."""
    if event.event_id in state.get("events", []):
        return None
    new = {**state, "events": [*state.get("events", []), event.event_id]}
    new["kind"] = "message" if event.is_message else "call"
    if event.deep_link:
        new["deepLink"] = event.deep_link
    if event.is_message:
        new["message"] = {**state.get("message", {}), **event.obj}
    elif event.type == SUMMARY_EVENT:
        new["summary"] = event.obj
    elif event.type == TRANSCRIPT_EVENT:
        new["transcript"] = event.obj
    else:
        rank = CALL_EVENTS[event.type]
        if rank >= state.get("callRank", -1):  # a later stage of the call replaces an earlier
            new["call"], new["callRank"] = event.obj, rank
        if event.obj.get("recordings"):
            new["recordings"] = event.obj["recordings"]
    return new


def has_call(state: dict[str, Any]) -> bool:
    return isinstance(state.get("call"), dict)


def with_call(state: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    """The state completed with the call as `GET /v1/calls/{id}` returns it (a summary came
    first, or the event's participants were empty); events keep precedence over it."""
    if has_call(state) and state["call"].get("participants"):
        return state
    known = state.get("call") or {}
    return {**state, "call": {**call, **{k: v for k, v in known.items() if v}}}


def with_voicemail(state: dict[str, Any], voicemail: dict[str, Any] | None) -> dict[str, Any]:
    return {**state, "voicemail": voicemail}


def ready(state: dict[str, Any]) -> bool:
    """Whether the state is worth an activity: a message, or a call that is over (a call
    still ringing is logged once it completes, not twice)."""
    if state.get("kind") == "message":
        return "message" in state
    return has_call(state) and _outcome(state) is not CallOutcome.RINGING


def needs_voicemail_check(state: dict[str, Any]) -> bool:
    """A missed call whose voicemail was not looked up yet (legacy events have no voicemail
    event: `GET /v1/call-voicemails/{id}` says whether the caller left one)."""
    return ready(state) and "voicemail" not in state and _outcome(state) is CallOutcome.MISSED


def external_number(state: dict[str, Any], workspace_numbers: set[str]) -> str | None:
    """The other party's number: the call participant or message side that is not one of
    the workspace's Quo numbers."""
    if state.get("kind") == "message":
        msg = state["message"]
        incoming = msg.get("direction") == "incoming"
        side = msg.get("from") if incoming else msg.get("to")
        candidates = _numbers(side)
    else:
        call = state.get("call") or {}
        candidates = _numbers(call.get("participants")) or _numbers(
            [call.get("from"), call.get("to")]
        )
    others = [n for n in candidates if n not in workspace_numbers]
    return others[0] if others else None


def quo_number(state: dict[str, Any], workspace_numbers: set[str]) -> str | None:
    obj = state.get("message") if state.get("kind") == "message" else state.get("call")
    sides = _numbers((obj or {}).get("participants")) + _numbers(
        [(obj or {}).get("from"), *_numbers((obj or {}).get("to"))]
    )
    mine = [n for n in sides if n in workspace_numbers]
    return mine[0] if mine else None


def call_activity(
    state: dict[str, Any], record_key: str, workspace_numbers: set[str]
) -> CallActivity:
    call = state["call"]
    summary = _dict(state.get("summary"))
    voicemail = _dict(state.get("voicemail"))
    transcript = "\n".join(
        f"{_text(d.get('identifier')) or _text(d.get('userId')) or '?'}: "
        f"{_text(d.get('content')) or ''}"
        for d in _list(_dict(state.get("transcript")).get("dialogue"))
        if isinstance(d, dict)
    )
    recordings = _list(state.get("recordings")) or _list(call.get("recordings"))
    return CallActivity(
        quo_call_id=_text(call.get("id")) or state["events"][0],
        direction="outgoing" if call.get("direction") == "outgoing" else "incoming",
        duration_seconds=_int(call.get("duration")),
        contact_external_id=record_key,
        timestamp=_text(call.get("createdAt")) or "",
        summary=" ".join(_strings(summary.get("summary"))) or None,
        outcome=_outcome(state),
        answered_at=_text(call.get("answeredAt")),
        completed_at=_text(call.get("completedAt")),
        external_number=external_number(state, workspace_numbers),
        quo_number=quo_number(state, workspace_numbers),
        quo_user=_text(call.get("answeredBy")) or _text(call.get("userId")),
        deep_link=_text(state.get("deepLink")),
        recording_urls=tuple(_strings([_dict(r).get("url") for r in recordings])),
        voicemail_url=_text(voicemail.get("recordingUrl")) or _text(voicemail.get("url")),
        voicemail_transcript=_text(voicemail.get("transcript")),
        next_steps=tuple(_strings(summary.get("nextSteps"))),
        transcript=transcript or None,
    )


def sms_activity(
    state: dict[str, Any], record_key: str, workspace_numbers: set[str]
) -> SmsActivity:
    msg = state["message"]
    text = _text(msg.get("text"))
    return SmsActivity(
        quo_message_id=msg["id"],
        direction="outgoing" if msg.get("direction") == "outgoing" else "incoming",
        content=text if text is not None else _text(msg.get("body")) or "",
        contact_external_id=record_key,
        timestamp=_text(msg.get("createdAt")) or "",
        external_number=external_number(state, workspace_numbers),
        quo_number=quo_number(state, workspace_numbers),
        quo_user=_text(msg.get("userId")),
        deep_link=_text(state.get("deepLink")),
    )


def _outcome(state: dict[str, Any]) -> CallOutcome:
    call = _dict(state.get("call"))
    status = _text(call.get("status"))
    if _text(call.get("answeredAt")):
        return CallOutcome.ANSWERED
    over = state.get("callRank", 0) > 0 or _text(call.get("completedAt"))
    if status in _NOT_OVER and not over:
        return CallOutcome.RINGING
    voicemail = state.get("voicemail") or call.get("voicemail")
    if voicemail or status == "voicemail":
        return CallOutcome.VOICEMAIL
    return CallOutcome.MISSED  # not answered, whatever its duration (production said answered)


def _numbers(value: Any) -> list[str]:
    """E.164-looking strings from a string or a list (Quo sends `to` as either)."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, str) and v.startswith("+")]


def _int(value: Any) -> int:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return max(int(value), 0) if ok else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    """The non-blank strings of a list (Quo's summary lines, next steps, URLs)."""
    return [v for v in _list(value) if isinstance(v, str) and v.strip()]
