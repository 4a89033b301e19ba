"""Quo externalIds namespaced per integration.

Two integrations of one CRM can write into one Quo workspace (two CRM accounts, overlapping
ids). Under one `source` their people must stay apart, so the externalId Quo stores is the
integration's namespace followed by the CRM's own id; links, hashes and lookups use that id.
"""

from __future__ import annotations

import dataclasses
import hashlib

from quo_sync_dagster.core.models import MAX_EXTERNAL_ID, Integration, InvalidRecord, QuoContact

_MAX_READABLE_NAMESPACE = 24  # longer integration ids are hashed, leaving room for the CRM id
SEPARATOR = ":"


def namespace(integration: Integration) -> str:
    """The prefix of every externalId this integration writes: the `external_id_namespace`
    setting, else the integration id (hashed to 12 characters when it is long)."""
    ns = integration.settings.get("external_id_namespace") or integration.id
    if len(ns) > _MAX_READABLE_NAMESPACE:
        ns = hashlib.sha256(ns.encode()).hexdigest()[:12]
    return ns + SEPARATOR


def quo_external_id(integration: Integration, crm_id: str) -> str:
    """The externalId Quo stores for the CRM person `crm_id` of `integration`."""
    qualified = namespace(integration) + crm_id
    if len(qualified) > MAX_EXTERNAL_ID:
        raise InvalidRecord(
            f"id {crm_id[:80]!r} is too long for a Quo externalId with the integration's "
            f"namespace ({len(qualified)} > {MAX_EXTERNAL_ID} characters)"
        )
    return qualified


def crm_id_of(integration: Integration, external_id: str) -> str | None:
    """The CRM id inside a namespaced externalId of `integration`; None if it is not one."""
    prefix = namespace(integration)
    return external_id.removeprefix(prefix) if external_id.startswith(prefix) else None


def namespaced(contact: QuoContact, integration: Integration) -> QuoContact:
    """`contact` as this integration writes it to Quo."""
    return dataclasses.replace(
        contact, external_id=quo_external_id(integration, contact.external_id)
    )
