"""An integration's CRM webhook subscription as a stored object: subscribe, renew, unsubscribe.

`connector.setup_webhooks(url)` returns what teardown and renewal need, including the secret
the CRM echoes or signs with under the connector's `webhook_secret_key` (Zoho's channel token,
Attio's signing secret; Pipedrive's Basic-auth pair is derived from its API token instead) and,
when the subscription expires, its expiry as `expires_at` (Zoho). The store keeps
`{"crm", "receiverUrl", "createdAt", "expiresAt", "secretRef", "details"}`: the secret goes
through `secrets.store_secret`, the store holds only its reference, and `details` are the rest.
The connector gets its own dict back (secret included) to renew or check the subscription.

Optional connector methods: `renew_webhooks(subscription) -> subscription` moves an expiry
(keeping the secret; a connector whose subscriptions expire has it); `webhooks_gone(subscription)
-> bool` asks the CRM whether it still has the subscription (else only a lapse counts as gone).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.secrets import MissingSecret, delete_secret, resolve_secret, store_secret
from quo_sync_dagster.store.port import Store
from quo_sync_dagster.webhooks.app import PATH

log = logging.getLogger(__name__)

RECEIVER_URL_SETTING = "receiver_url"
RECEIVER_URL_ENV = "QUO_SYNC_RECEIVER_URL"
DEFAULT_RENEW_MARGIN = timedelta(hours=24)
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+=-]")  # what AWS secret names and file names take


@runtime_checkable
class Renewable(Protocol):
    def renew_webhooks(self, subscription: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class Checkable(Protocol):
    def webhooks_gone(self, subscription: dict[str, Any]) -> bool: ...


class Renewal(StrEnum):
    NONE = "none"  # the integration has no subscription
    CURRENT = "current"  # there at the CRM and not expiring within the margin
    RENEWED = "renewed"  # its expiry was moved
    RESUBSCRIBED = "resubscribed"  # gone or lapsed at the CRM: subscribed again


def receiver_base_url(integration: Integration) -> str:
    """The receiver's public base URL: the integration's `receiver_url` setting, else
    $QUO_SYNC_RECEIVER_URL. ValueError when neither is set or it is no absolute http(s) URL."""
    setting = integration.settings.get(RECEIVER_URL_SETTING)
    base = setting or os.environ.get(RECEIVER_URL_ENV)
    if not base:
        raise ValueError(
            f"integration {integration.id!r} has no receiver URL for {integration.crm} webhooks: "
            f"set its setting {RECEIVER_URL_SETTING!r} or the environment variable "
            f"{RECEIVER_URL_ENV} to the receiver's public base URL"
        )
    source = f"setting {RECEIVER_URL_SETTING}" if setting else RECEIVER_URL_ENV
    # The value is not echoed: a URL with user:password@ would put a password in the error.
    if not isinstance(base, str):
        raise ValueError(f"{source} must be a URL string")
    parts = urlsplit(base)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{source} must be an absolute http(s) URL without credentials, query or fragment"
        )
    return base.rstrip("/")


def receiver_url(integration: Integration, base_url: str) -> str:
    """The integration's own receiver route under `base_url`."""
    if "/" in integration.id:  # the receiver decodes the path before routing: no %2F
        raise ValueError(f"integration id {integration.id!r} cannot be a URL path segment")
    path = PATH.format(crm=integration.crm, integration_id=quote(integration.id, safe=""))
    return base_url.rstrip("/") + path


def subscribe(store: Store, connector: CRMConnector, receiver_base_url: str) -> dict[str, Any]:
    """Subscribe the integration's person events to its receiver route and store the
    subscription (returned: no secret in it). An older subscription is replaced, then torn
    down at the CRM and its secret deleted."""
    return _subscribe(store, connector, receiver_url(connector.integration, receiver_base_url))


def renew(
    store: Store, connector: CRMConnector, margin: timedelta = DEFAULT_RENEW_MARGIN
) -> Renewal:
    """Subscribe again what the CRM reports gone (or what lapsed, or whose secret is lost);
    move the expiry of what expires within `margin`."""
    integration_id = connector.integration.id
    old = store.get_webhook_subscription(integration_id)
    if old is None:
        return Renewal.NONE
    now = datetime.now(UTC)
    expires = _expiry(old)
    try:
        current = _connector_view(connector, old)
    except MissingSecret:  # the receiver cannot verify anything: a new secret is needed
        log.warning("webhook secret of %r is unreadable: subscribing again", integration_id)
        current = None
    lapsed = expires is not None and expires <= now
    if (
        current is None
        or lapsed
        or (isinstance(connector, Checkable) and connector.webhooks_gone(current))
    ):
        _subscribe(store, connector, old["receiverUrl"])
        return Renewal.RESUBSCRIBED
    if expires is None or expires - now > margin:
        return Renewal.CURRENT
    if not isinstance(connector, Renewable):
        raise TypeError(f"{connector.name} subscriptions expire, but it has no renew_webhooks")
    details, _ = _split(connector, connector.renew_webhooks(current))  # the same secret
    renewed = {**old, "expiresAt": details.get("expires_at"), "details": details}
    store.put_webhook_subscription(integration_id, renewed)
    return Renewal.RENEWED


def unsubscribe(store: Store, connector: CRMConnector) -> bool:
    """Tear the subscription down at the CRM (already gone there is fine), then delete it and
    its secret. False when the integration had none."""
    integration_id = connector.integration.id
    old = store.get_webhook_subscription(integration_id)
    if old is None:
        return False
    connector.teardown_webhooks(dict(old["details"]))  # teardown needs no secret
    store.delete_webhook_subscription(integration_id)
    if old["secretRef"]:
        delete_secret(old["secretRef"])
    return True


# ---- plumbing ------------------------------------------------------------------------------
def _subscribe(store: Store, connector: CRMConnector, url: str) -> dict[str, Any]:
    integration_id = connector.integration.id
    old = store.get_webhook_subscription(integration_id)
    details, secret = _split(connector, connector.setup_webhooks(url))
    secret_ref = None
    try:
        secret_ref = _store_secret(connector, secret)
        subscription = {
            "crm": connector.name,
            "receiverUrl": url,
            "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "expiresAt": details.get("expires_at"),
            "secretRef": secret_ref,
            "details": details,
        }
        store.put_webhook_subscription(integration_id, subscription)
    except BaseException:  # nothing half made stays behind: not at the CRM, not as a secret
        _retire(connector, {"details": details, "secretRef": secret_ref}, "new")
        raise
    if old is not None:
        _retire(connector, old, "replaced")
    return subscription


def _retire(connector: CRMConnector, subscription: dict[str, Any], which: str) -> None:
    """Best effort: a failure is logged (by kind and CRM status only), not raised, since what
    it leaves behind is harmless: deliveries of a retired subscription fail verification."""
    try:
        connector.teardown_webhooks(dict(subscription["details"]))
        if subscription.get("secretRef"):
            delete_secret(subscription["secretRef"])
    except Exception as exc:
        log.warning(
            "%s webhook subscription of %r not fully removed: %s",
            which,
            connector.integration.id,
            type(exc).__name__,
        )


def _secret_key(connector: CRMConnector) -> str | None:
    return getattr(connector, "webhook_secret_key", None)


def _split(connector: CRMConnector, raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """setup/renew_webhooks' dict as (details, secret)."""
    details, key = dict(raw), _secret_key(connector)
    return details, (details.pop(key, None) if key else None)


def _connector_view(connector: CRMConnector, subscription: dict[str, Any]) -> dict[str, Any]:
    """The dict the connector returned, secret included (MissingSecret if unreadable)."""
    view, key = dict(subscription["details"]), _secret_key(connector)
    if key and subscription["secretRef"]:
        view[key] = resolve_secret(subscription["secretRef"])
    return view


def _store_secret(connector: CRMConnector, secret: str | None) -> str | None:
    """A new reference per subscription, so replacing one never overwrites the secret the
    other still verifies with."""
    if not secret:
        return None
    integration = _NAME_UNSAFE.sub("_", connector.integration.id)
    name = f"quo-sync/webhooks/{connector.name}/{integration}-{secrets.token_hex(6)}"
    return store_secret(name, secret)


def _expiry(subscription: dict[str, Any]) -> datetime | None:
    if not subscription.get("expiresAt"):
        return None
    moment = datetime.fromisoformat(subscription["expiresAt"])
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
