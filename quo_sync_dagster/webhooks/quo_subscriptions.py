"""An integration's Quo webhooks (calls, messages, summaries, transcripts) as a stored object.

`subscribe` registers the four v1 API webhooks (quo-api.md §3.2) to the integration's Quo route
of the receiver and stores, under the integration's activity queue key,
`{"crm": "quo", "receiverUrl", "createdAt", "expiresAt": None, "secretRef": None,
  "details": {"webhooks": [{"id", "kind", "events", "keyRef"}]}}`: each webhook's signing key
goes through `secrets.store_secret` and only its reference is stored. `unsubscribe` deletes them
at Quo, then the record and the keys. Quo webhooks do not expire (v1 has no renewal).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.secrets import delete_secret, store_secret
from quo_sync_dagster.store.port import Store
from quo_sync_dagster.webhooks.quo_route import QUO_PATH, SUBSCRIPTION_CRM

log = logging.getLogger(__name__)

# Per registration endpoint, the events the activity log needs (all that each one offers).
WEBHOOKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("message.received", "message.delivered")),
    ("calls", ("call.completed", "call.ringing", "call.recording.completed")),
    ("call-summaries", ("call.summary.completed",)),
    ("call-transcripts", ("call.transcript.completed",)),
)
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+=-]")  # what AWS secret names and file names take


class QuoWebhookApi(Protocol):
    """The QuoClient methods used here."""

    def create_webhook(
        self, kind: str, url: str, events: Sequence[str], label: str | None = None
    ) -> dict[str, Any]: ...

    def list_webhooks(self) -> list[dict[str, Any]]: ...

    def delete_webhook(self, webhook_id: str) -> bool: ...


def quo_receiver_url(integration_id: str, base_url: str) -> str:
    """The integration's Quo route under the receiver's public `base_url`."""
    if "/" in integration_id:  # the receiver decodes the path before routing: no %2F
        raise ValueError(f"integration id {integration_id!r} cannot be a URL path segment")
    path = QUO_PATH.format(integration_id=quote(integration_id, safe=""))
    return base_url.rstrip("/") + path


def subscribe(
    store: Store, integration: Integration, quo: QuoWebhookApi, receiver_base_url: str
) -> dict[str, Any]:
    """Register the integration's Quo webhooks and store them (returned: no key in it). An
    older subscription is replaced, then deleted at Quo with its keys. When a step fails, what
    this call made is removed (at Quo and as secrets) before the error is raised, and so is any
    webhook at Quo for this URL that no subscription holds (a create whose answer was lost)."""
    url = quo_receiver_url(integration.id, receiver_base_url)
    queue = activity_queue(integration.id)
    old = store.get_webhook_subscription(queue)
    made: list[dict[str, Any]] = []
    try:
        for kind, events in WEBHOOKS:
            label = f"quo-sync {kind} {integration.id}"
            webhook = quo.create_webhook(kind, url, list(events), label=label)
            entry = {"id": webhook["id"], "kind": kind, "events": list(events), "keyRef": None}
            made.append(entry)  # before its key is stored: a failure there still deletes it
            key = webhook.get("key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"Quo returned webhook {webhook['id']!r} without a signing key")
            entry["keyRef"] = _store_key(integration.id, kind, key)
        subscription = {
            "crm": SUBSCRIPTION_CRM,
            "receiverUrl": url,
            "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "expiresAt": None,
            "secretRef": None,
            "details": {"webhooks": made},
        }
        store.put_webhook_subscription(queue, subscription)
    except BaseException:
        _retire(quo, made, integration.id, "new")
        _sweep(quo, url, keep=_ids(old), integration_id=integration.id)
        raise
    if old is not None:
        _retire(quo, old["details"]["webhooks"], integration.id, "replaced")
    return subscription


def unsubscribe(store: Store, integration: Integration, quo: QuoWebhookApi) -> bool:
    """Delete the integration's Quo webhooks at Quo (already gone is fine), then their record
    and keys. False when it had none. A Quo error is raised with the record kept, to retry."""
    queue = activity_queue(integration.id)
    old = store.get_webhook_subscription(queue)
    if old is None or old.get("crm") != SUBSCRIPTION_CRM:
        return False
    webhooks = old["details"]["webhooks"]
    for webhook in webhooks:
        quo.delete_webhook(webhook["id"])
    store.delete_webhook_subscription(queue)
    for webhook in webhooks:
        if webhook.get("keyRef"):
            delete_secret(webhook["keyRef"])
    return True


# ---- plumbing ------------------------------------------------------------------------------
def _store_key(integration_id: str, kind: str, key: str) -> str:
    """A new reference per webhook, so a replacement never overwrites a key still in use."""
    safe = _NAME_UNSAFE.sub("_", integration_id)
    return store_secret(f"quo-sync/webhooks/quo/{safe}-{kind}-{secrets.token_hex(6)}", key)


def _ids(subscription: dict[str, Any] | None) -> set[str]:
    if subscription is None or subscription.get("crm") != SUBSCRIPTION_CRM:
        return set()
    return {w["id"] for w in subscription["details"]["webhooks"]}


def _retire(
    quo: QuoWebhookApi, webhooks: Iterable[dict[str, Any]], integration_id: str, which: str
) -> None:
    """Best effort, logged by kind of error only: what is left behind is harmless, since a
    delivery of a retired webhook no longer verifies."""
    for webhook in webhooks:
        try:
            quo.delete_webhook(webhook["id"])
            if webhook.get("keyRef"):
                delete_secret(webhook["keyRef"])
        except Exception as exc:
            log.warning(
                "%s Quo webhook %s of %r not fully removed: %s",
                which,
                webhook["id"],
                integration_id,
                type(exc).__name__,
            )


def _sweep(quo: QuoWebhookApi, url: str, keep: set[str], integration_id: str) -> None:
    """Delete the webhooks at Quo for `url` but those in `keep` (best effort)."""
    try:
        strays = [w["id"] for w in quo.list_webhooks() if w.get("url") == url]
        for webhook_id in strays:
            if webhook_id not in keep:
                quo.delete_webhook(webhook_id)
    except Exception as exc:
        log.warning("stray Quo webhooks of %r not checked: %s", integration_id, type(exc).__name__)
