"""Logging Quo calls and messages on CRM people, free of Dagster: the work of a
`<crm>_log_activities` run.

Events are grouped per Quo object (a message, or a call with its recording, summary and
transcript) and merged into the object's stored state (core.activities), so a duplicate,
replayed or reordered delivery changes nothing and a later event enriches the one activity the
CRM already has (`update_call_activity`). The other party's number finds the people through the
phone index the sync keeps (every linked contact's numbers). The activity ids are stored after
each CRM write, so a run that dies is redelivered without logging twice what it wrote, except
for a write whose id it never got to store (a kill between the two: at most one per run).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from quo_sync_dagster.core.activities import (
    QuoEvent,
    call_activity,
    external_number,
    has_call,
    merge,
    needs_voicemail_check,
    ready,
    sms_activity,
    with_call,
    with_voicemail,
)
from quo_sync_dagster.core.external_ids import crm_id_of, quo_external_id
from quo_sync_dagster.core.models import CallActivity, SmsActivity
from quo_sync_dagster.core.process import cap_text
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.store.port import ActivityRecord, InboxItem, Store

PEOPLE_SETTING = "activity_people"  # "all" (default): everyone with the number; "latest"
CREATE_CALLERS_SETTING = "create_unknown_callers"  # true: a CRM person for an unknown number


@dataclass
class ActivityReport:
    events: int = 0
    created: int = 0  # CRM activities made
    enriched: int = 0  # CRM activities rewritten with what Quo sent later
    duplicates: int = 0  # events that changed nothing (duplicated or replayed deliveries)
    waiting: int = 0  # calls still ringing: logged once they end
    unmatched: int = 0  # Quo objects whose number no synced person has
    callers_created: int = 0  # CRM people created for unknown numbers (create_unknown_callers)
    failed: int = 0
    unmatched_numbers: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (event id, reason)
    done: list[str] = field(default_factory=list)  # inbox items to acknowledge
    retry: dict[str, str] = field(default_factory=dict)  # inbox item -> why it failed
    latencies: list[float] = field(default_factory=list)  # receipt -> CRM written, seconds

    def metadata(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "events": self.events,
            "created": self.created,
            "enriched": self.enriched,
            "duplicates_dropped": self.duplicates,
            "waiting": self.waiting,
            "unmatched": self.unmatched,
            "callers_created": self.callers_created,
            "failed": self.failed,
            "retrying": len(self.retry),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_max_s": round(lat[-1], 3) if lat else None,
        }


class Workspace:
    """The workspace's own Quo numbers, read once per run and only when needed."""

    def __init__(self, quo: QuoClient) -> None:
        self.quo, self._numbers = quo, None

    @property
    def numbers(self) -> set[str]:
        if self._numbers is None:
            self._numbers = {n["number"] for n in self.quo.list_phone_numbers() if n.get("number")}
        return self._numbers


def log_activities(
    store: Store,
    connector: CRMConnector,
    quo: QuoClient,
    items: list[InboxItem],
    workspace: Workspace | None = None,
) -> ActivityReport:
    """Log what `items` say on the CRM. An object whose CRM or Quo request fails is left for a
    retry (`report.retry`) and fails nothing else; an unreadable event is acknowledged and
    reported (it can never be applied). `workspace`: the run's, kept across its batches."""
    integration = connector.integration
    report = ActivityReport(events=len(items))
    grouped: dict[str, list[tuple[InboxItem, QuoEvent]]] = defaultdict(list)
    for item in items:
        try:
            event = QuoEvent.from_envelope(item.payload.get("event"))
        except ValueError as exc:
            report.failed += 1
            report.failures.append((item.event_id, cap_text(f"unreadable event: {exc}")))
            report.done.append(item.id)
            continue
        if event is None:  # an event type that logs nothing
            report.done.append(item.id)
        else:
            grouped[event.object_id].append((item, event))
    records = store.get_activity_records(integration.id, grouped)
    workspace = workspace or Workspace(quo)
    only_latest = integration.settings.get(PEOPLE_SETTING) == "latest"
    for object_id, group in grouped.items():
        ids = [item.id for item, _ in group]
        record = records.get(object_id, ActivityRecord({}))
        try:
            _log_object(
                store, connector, quo, workspace, object_id, record, group, report, only_latest
            )
        except Exception as exc:  # this object's CRM or Quo fault: delivered again later
            reason = cap_text(f"{type(exc).__name__}: {exc}")
            report.retry.update(dict.fromkeys(ids, reason))
            report.failures.extend((event.event_id, reason) for _, event in group)
            continue
        report.done += ids
        written = datetime.now(UTC)
        report.latencies += [
            (written - datetime.fromisoformat(item.received_at)).total_seconds()
            for item, _ in group
        ]
    return report


def _log_object(
    store: Store,
    connector: CRMConnector,
    quo: QuoClient,
    workspace: Workspace,
    object_id: str,
    record: ActivityRecord,
    group: list[tuple[InboxItem, QuoEvent]],
    report: ActivityReport,
    only_latest: bool,
) -> None:
    integration = connector.integration
    state = record.state
    for _, event in group:
        merged = merge(state, event)
        if merged is None:
            report.duplicates += 1
        else:
            state = merged
    if state.get("kind") == "call":
        incomplete = not has_call(state) or not external_number(state, workspace.numbers)
        if incomplete and (call := quo.get_call(object_id)):  # a summary came first, or the
            state = with_call(state, call)  # event's participants were empty
        if needs_voicemail_check(state):
            state = with_voicemail(state, quo.get_call_voicemail(object_id))
    crm_ids = dict(record.crm_ids)

    def save() -> None:
        store.put_activity_record(integration.id, object_id, ActivityRecord(state, crm_ids))

    if not ready(state):
        report.waiting += 1
        save()
        return
    people: list[str] = state.get("people") or []  # who it is logged on, fixed once found
    if not people:
        number = external_number(state, workspace.numbers)
        found = store.people_by_phone(integration.id, [number]).get(number, []) if number else []
        people = found[:1] if only_latest else found
        if not people and number and integration.settings.get(CREATE_CALLERS_SETTING) is True:
            people = _caller(store, connector, number, report)
        if not people:
            report.unmatched += 1
            report.unmatched_numbers.append(number or f"(no number on {object_id})")
            save()  # a person synced later is matched by this object's next event
            return
        state = {**state, "people": people}
    rendered = _fingerprint(_activity(state, "", workspace.numbers))
    shown: dict[str, str] = dict(state.get("shown") or {})  # person -> what their activity shows
    for person in people:
        key = crm_id_of(integration, person)
        if key is None:
            continue  # another integration's id cannot be in this index; skip defensively
        activity = _activity(state, key, workspace.numbers)
        if person not in crm_ids:
            crm_ids[person] = (
                connector.log_call_to_activity(activity)
                if isinstance(activity, CallActivity)
                else connector.log_sms_to_activity(activity)
            )
            report.created += 1
        elif shown.get(person) != rendered and isinstance(activity, CallActivity):
            try:
                crm_ids[person] = connector.update_call_activity(crm_ids[person], activity)
                report.enriched += 1
            except LookupError:  # deleted in the CRM since: the call is logged again
                crm_ids[person] = connector.log_call_to_activity(activity)
                report.created += 1
        else:
            continue  # logged already, and nothing it shows has changed
        shown[person] = rendered
        state = {**state, "shown": shown}
        save()  # after every CRM write: a redelivery must not write it again
    save()


def _caller(
    store: Store, connector: CRMConnector, number: str, report: ActivityReport
) -> list[str]:
    """The person this integration created for an unknown `number` (once: remembered in the
    activity records; once synced, the phone index finds them first), or [] where the CRM
    cannot create people."""
    integration = connector.integration
    remembered = store.get_activity_records(integration.id, [f"caller:{number}"])
    if record := remembered.get(f"caller:{number}"):
        return [record.state["person"]]
    key = connector.create_person_for_caller(number)
    if key is None:
        return []
    person = quo_external_id(integration, key)
    store.put_activity_record(
        integration.id, f"caller:{number}", ActivityRecord({"person": person})
    )
    report.callers_created += 1
    return [person]


def _activity(state: dict[str, Any], key: str, numbers: set[str]) -> CallActivity | SmsActivity:
    if state.get("kind") == "message":
        return sms_activity(state, key, numbers)
    return call_activity(state, key, numbers)


def _fingerprint(activity: CallActivity | SmsActivity) -> str:
    text = json.dumps(activity.__dict__, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
