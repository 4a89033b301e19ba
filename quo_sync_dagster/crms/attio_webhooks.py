"""Attio record webhooks into PersonChanges (crm-apis.md 3.4, 3.8).

A delivery is authentic when `Attio-Signature` (or `X-Attio-Signature`) is the hex HMAC-SHA256
of the raw body keyed with the webhook's secret (resolved from the subscription's secretRef).
Attio sends no time, so there is no freshness check: replays are caught by the inbox, keyed on
the `Idempotency-Key` header that every retry repeats (a hash of the body when it is missing).
Events about other objects than people are skipped: the subscription's details name the people
object's id as `peopleObjectId` (without it, every record event counts as a person's).
A merge names the surviving record in `id.record_id` and a merged one in `duplicate_record_id`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from quo_sync_dagster.core.changes import ChangeKind, PersonChange
from quo_sync_dagster.crms.attio_api import PEOPLE
from quo_sync_dagster.webhooks.handler import Delivery, Rejected, WebhookContext, WebhookHandler
from quo_sync_dagster.webhooks.verify import (
    hmac_sha256_hex_matches,
    json_object,
    member,
    person_id,
)

KINDS = {
    "record.created": ChangeKind.UPSERT,
    "record.updated": ChangeKind.UPSERT,
    "record.deleted": ChangeKind.DELETE,
    "record.merged": ChangeKind.MERGE,
}


class AttioWebhooks(WebhookHandler):
    crm = "attio"

    def changes(self, delivery: Delivery, context: WebhookContext) -> list[PersonChange]:
        headers = delivery.headers
        signature = headers.get("attio-signature") or headers.get("x-attio-signature")
        if not hmac_sha256_hex_matches(context.secret or "", delivery.body, signature):
            raise Rejected(401, "missing or wrong Attio-Signature")
        events = member(json_object(delivery.body), "events", list)
        key = headers.get("idempotency-key") or hashlib.sha256(delivery.body).hexdigest()
        people = context.details.get("peopleObjectId")
        changes = []
        for index, event in enumerate(events):
            if not isinstance(event, dict):
                raise Rejected(400, "events[] holds a non-object")
            if (change := _change(event, people, f"{key}:{index}")) is not None:
                changes.append(change)
        return changes


def _change(event: dict[str, Any], people: str | None, event_id: str) -> PersonChange | None:
    kind = KINDS.get(member(event, "event_type", str))
    if kind is None:
        return None  # notes, lists, tasks...
    ids = member(event, "id", dict)
    if people is not None and ids.get("object_id") != people:
        return None
    record = person_id(ids.get("record_id"), "id.record_id")
    merged = ()
    if kind is ChangeKind.MERGE:
        merged = (person_id(event.get("duplicate_record_id"), "duplicate_record_id"),)
    return PersonChange(event_id, kind, PEOPLE, record, merged)
