"""Pipedrive webhooks v2 into PersonChanges (crm-apis.md 1.4, 1.8).

Pipedrive signs nothing: a delivery is authentic when it carries the HTTP Basic pair set at
subscription (`PipedriveConnector.webhook_basic_auth()`, derived from the API token), and fresh
when `meta.timestamp` is within the tolerance. `meta.id` is the event id (retries repeat it).
A merge arrives as `delete` of the loser with `meta.merged_to_id` and `change` of the survivor
with `meta.merged_from_id`; both become a MERGE change.
"""

from __future__ import annotations

from quo_sync_dagster.core.changes import ChangeKind, PersonChange
from quo_sync_dagster.webhooks.handler import Delivery, Rejected, WebhookContext, WebhookHandler
from quo_sync_dagster.webhooks.verify import (
    basic_auth_matches,
    iso,
    iso_time,
    json_object,
    member,
    person_id,
)

ENTITY_OBJECT_TYPES = {"person": "Person"}  # meta.entity -> the connector's object type
KINDS = {"create": ChangeKind.UPSERT, "change": ChangeKind.UPSERT, "delete": ChangeKind.DELETE}


class PipedriveWebhooks(WebhookHandler):
    crm = "pipedrive"
    needs_credential = True  # the Basic-auth pair derives from the API token

    def changes(self, delivery: Delivery, context: WebhookContext) -> list[PersonChange]:
        if not context.connector.credential:  # the pair would derive from "": anyone's guess
            raise Rejected(401, "the integration has no credential to verify deliveries with")
        user, password = context.connector.webhook_basic_auth()
        if not basic_auth_matches(delivery.headers.get("authorization"), user, password):
            raise Rejected(401, "missing or wrong HTTP Basic credentials")
        meta = member(json_object(delivery.body), "meta", dict)
        if meta.get("version") != "2.0":
            raise Rejected(400, "not a webhooks v2 delivery")
        sent_at = iso_time(member(meta, "timestamp", str), "meta.timestamp")
        self.check_fresh(sent_at, delivery)
        object_type = ENTITY_OBJECT_TYPES.get(member(meta, "entity", str))
        kind = KINDS.get(member(meta, "action", str))
        if object_type not in context.object_types or kind is None:
            return []  # another object, or an action people do not have
        event_id = member(meta, "id", str)
        pid = person_id(meta.get("entity_id"), "meta.entity_id")
        survivor, merged = pid, ()
        if meta.get("merged_to_id") is not None:  # the loser's delete
            survivor, merged = person_id(meta["merged_to_id"], "meta.merged_to_id"), (pid,)
        elif meta.get("merged_from_id") is not None:  # the survivor's change
            merged = (person_id(meta["merged_from_id"], "meta.merged_from_id"),)
        return [
            PersonChange(
                event_id=f"{event_id}:{pid}",
                kind=ChangeKind.MERGE if merged else kind,
                object_type=object_type,
                person_id=survivor,
                merged_ids=merged,
                occurred_at=iso(sent_at),
            )
        ]
