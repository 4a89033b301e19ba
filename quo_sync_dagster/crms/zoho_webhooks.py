"""Zoho CRM Notification API callbacks into PersonChanges (crm-apis.md 2.4, 2.8).

Zoho signs nothing: a callback is authentic when it echoes the channel's `token` (resolved from
the subscription's secretRef) and the subscription's `channel_id`, and fresh when `server_time`
(epoch ms) is within the tolerance. A callback carries only ids and no delivery id, so each
person's event id is a hash of the callback's identifying fields plus the person's id: a
repeated callback repeats it. A merge's loser arrives as a delete.
"""

from __future__ import annotations

from quo_sync_dagster.core.changes import ChangeKind, PersonChange
from quo_sync_dagster.webhooks.handler import Delivery, Rejected, WebhookContext, WebhookHandler
from quo_sync_dagster.webhooks.verify import (
    digest,
    epoch_millis,
    iso,
    json_object,
    member,
    person_id,
    same_secret,
)

KINDS = {"insert": ChangeKind.UPSERT, "update": ChangeKind.UPSERT, "delete": ChangeKind.DELETE}


class ZohoWebhooks(WebhookHandler):
    crm = "zoho"

    def changes(self, delivery: Delivery, context: WebhookContext) -> list[PersonChange]:
        body = json_object(delivery.body)
        channel_id = str(context.details.get("channel_id") or "")
        token, channel = body.get("token"), body.get("channel_id")
        # `&`, not `and`: the token compare runs whatever the channel id is.
        authentic = same_secret(_text(token), context.secret or "") & same_secret(
            _text(channel), channel_id
        )
        if not authentic:
            raise Rejected(401, "missing or wrong channel token or channel id")
        sent_at = epoch_millis(member(body, "server_time", int), "server_time")
        self.check_fresh(sent_at, delivery)
        module, operation = member(body, "module", str), member(body, "operation", str)
        ids = [person_id(i, "ids[]") for i in member(body, "ids", list)]
        kind = KINDS.get(operation)
        if module not in context.object_types or kind is None:
            return []
        callback = digest(channel_id, body["server_time"], module, operation, ids)
        return [
            PersonChange(
                event_id=f"{callback}:{pid}",
                kind=kind,
                object_type=module,
                person_id=pid,
                occurred_at=iso(sent_at),
            )
            for pid in dict.fromkeys(ids)  # once per person, in Zoho's order
        ]


def _text(value: object) -> str | None:
    """A string or integer echoed back (ids are numeric strings, a sender may send numbers)."""
    if isinstance(value, bool):
        return None
    return str(value) if isinstance(value, str | int) else None
