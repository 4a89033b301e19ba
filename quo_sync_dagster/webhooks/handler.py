"""The contract of a CRM's webhook handler: verify a delivery, then turn it into PersonChanges.

A handler module (`crms/<crm>_webhooks.py`) defines one subclass with the CRM's `crm` name;
subclassing registers it, as connectors register themselves, so adding a CRM stays its own files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from quo_sync_dagster.core.changes import PersonChange
from quo_sync_dagster.core.models import Integration

if TYPE_CHECKING:  # crms imports every handler module: a runtime import here would be circular
    from quo_sync_dagster.crms.base import CRMConnector

DEFAULT_TIMESTAMP_TOLERANCE_SECONDS = 300.0


class Rejected(Exception):
    """A delivery answered with `status` (4xx) and `reason`: a short fixed text that never
    holds a secret or any of the delivery's content."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Delivery:
    body: bytes  # the raw body, exactly as received (signatures are over these bytes)
    headers: Mapping[str, str]  # case-insensitive (Starlette's Headers) or lower-case names
    query: Mapping[str, str]
    received_at: datetime  # aware, UTC


@dataclass(frozen=True)
class WebhookContext:
    """What verification needs about the integration a delivery is addressed to."""

    integration: Integration
    connector: CRMConnector  # built with the resolved CRM credential (Pipedrive's Basic auth)
    subscription: Mapping[str, Any]  # store.get_webhook_subscription(integration.id)
    secret: str | None  # the resolved subscription["secretRef"] (Zoho token, Attio secret)

    @property
    def details(self) -> Mapping[str, Any]:
        return self.subscription.get("details") or {}

    @property
    def object_types(self) -> frozenset[str]:
        return frozenset(self.connector.object_types)


_REGISTRY: dict[str, type[WebhookHandler]] = {}


class WebhookHandler(ABC):
    crm: ClassVar[str]  # the connector's name
    # The context's connector gets the resolved CRM credential (else None, and a missing
    # credential cannot hold up a CRM whose verification does not use it).
    needs_credential: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.crm in _REGISTRY:
            raise TypeError(f"two webhook handlers for {cls.crm!r}")
        _REGISTRY[cls.crm] = cls

    def __init__(
        self, timestamp_tolerance_seconds: float = DEFAULT_TIMESTAMP_TOLERANCE_SECONDS
    ) -> None:
        self.timestamp_tolerance_seconds = timestamp_tolerance_seconds

    @abstractmethod
    def changes(self, delivery: Delivery, context: WebhookContext) -> list[PersonChange]:
        """Verify `delivery`, then parse it: one PersonChange per person it reports, each with
        an event id that a retry or duplicate of the delivery repeats. Events about anything
        but people of the connector's object types are left out (an empty list is a valid,
        ignored delivery). Raise Rejected: 401/403 when it is not authentic or too old, 400
        when it is not the CRM's documented shape."""

    def check_fresh(self, sent_at: datetime, delivery: Delivery) -> None:
        """Refuse a delivery whose own time is further than the tolerance from its receipt
        (either way): a captured delivery cannot be replayed later."""
        skew = abs((delivery.received_at - sent_at).total_seconds())
        if skew > self.timestamp_tolerance_seconds:
            raise Rejected(403, "stale delivery: its timestamp is outside the allowed window")


def webhook_handler(crm: str) -> type[WebhookHandler] | None:
    return _REGISTRY.get(crm)


def registered_handlers() -> dict[str, type[WebhookHandler]]:
    return dict(_REGISTRY)
