"""Did every Quo call and message reach the right CRM people once, enriched? The check behind
`quo-sync demo --calls` and the activity tests.

Free of Dagster and HTTP: the caller reads what the Quo sandbox simulated (its ground truth),
who holds each number in the CRM, and the activities the CRM simulator stores. An activity is
recognised by the "Quo call id: …" / "Quo message id: …" line every connector writes
(core/activity_text.py), and its person by the `person` (record key) every simulator's
`GET /_sandbox/activities` gives each activity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quo_sync_dagster.core.external_ids import crm_id_of
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.store.port import Store

SAMPLE = 10
_QUO_ID = re.compile(r"Quo (?:call|message) id: (AC[0-9A-Za-z]+)")


@dataclass
class ActivityCheck:
    quo_events: int = 0  # events the sandbox emitted
    crm_activities: int = 0  # activities in the CRM that carry a Quo id
    expected: int = 0  # (Quo object, person) pairs that must have one activity
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # pairs with more than one activity
    unenriched: list[str] = field(default_factory=list)  # summary/transcript/recording not on it
    wrong_outcome: list[str] = field(default_factory=list)  # missed calls not shown as missed
    unmatched: int = 0  # objects whose number no CRM person has (nothing expected)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.duplicates or self.unenriched or self.wrong_outcome)

    def result(self) -> dict[str, Any]:
        return {
            "quoEvents": self.quo_events,
            "crmActivities": self.crm_activities,
            "activitiesExpected": self.expected,
            "missingActivities": len(self.missing),
            "duplicateActivities": len(self.duplicates),
            "unenriched": len(self.unenriched),
            "wrongOutcome": len(self.wrong_outcome),
            "unmatched": self.unmatched,
            **{
                f"{name}First": getattr(self, name)[:SAMPLE]
                for name in ("missing", "duplicates", "unenriched", "wrong_outcome")
                if getattr(self, name)
            },
        }


def check_activities(
    calls: Iterable[Mapping[str, Any]],
    messages: Iterable[Mapping[str, Any]],
    holders: Mapping[str, list[str]],
    activities: Iterable[Any],
) -> ActivityCheck:
    """`calls`/`messages`: the Quo sandbox's simulated objects; `holders`: E.164 number -> the
    CRM ids (record keys) of the people holding it; `activities`: what the CRM stores."""
    check = ActivityCheck()
    texts: dict[tuple[str, str], list[str]] = {}
    for activity in activities:
        text = json.dumps(activity, ensure_ascii=False)
        quo_ids = set(_QUO_ID.findall(text))
        if not quo_ids:
            continue
        check.crm_activities += 1
        for quo_id in quo_ids:
            texts.setdefault((quo_id, str(activity.get("person"))), []).append(text)
    for obj in [*calls, *messages]:
        check.quo_events += len(obj.get("eventIds") or [])
        quo_id = obj.get("callId") or obj.get("messageId")
        owners = holders.get(obj["externalNumber"], [])
        if not owners:
            check.unmatched += 1
        for key in owners:
            check.expected += 1
            label = f"{quo_id}@{key}"
            found = texts.get((quo_id, key), [])
            if not found:
                check.missing.append(label)
                continue
            if len(found) > 1:
                check.duplicates.append(label)
            if "callId" in obj:
                _check_call(obj, found[-1], label, check)
    return check


def _check_call(call: Mapping[str, Any], text: str, label: str, check: ActivityCheck) -> None:
    wanted = {
        "Summary:": call.get("summary"),
        "Transcript:": call.get("transcript"),
        "Recording:": call.get("recordings"),
    }
    if any(value and marker not in text for marker, value in wanted.items()):
        check.unenriched.append(label)
    if call.get("outcome") in ("missed", "voicemail") and "missed" not in text.lower():
        check.wrong_outcome.append(label)


def phone_holders(store: Store, integration: Integration) -> dict[str, list[str]]:
    """E.164 number -> the record keys of the integration's linked people holding it."""
    holders: dict[str, list[str]] = {}
    for ext, link in store.iter_contact_links(integration.id):
        for phone in link.phones:
            holders.setdefault(phone, []).append(crm_id_of(integration, ext) or ext)
    return holders
