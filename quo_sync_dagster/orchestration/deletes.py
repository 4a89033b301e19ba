"""Removing people the CRM no longer has: their Quo contact, their link, and a tombstone.

The tombstone keeps a page fetched before the deletion from creating the contact again: page
runs skip tombstoned people (sync_records), and a person the CRM shows again (a restore) loses
its tombstone when it is synced by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from quo_sync_dagster.core.external_ids import crm_id_of, quo_external_id
from quo_sync_dagster.core.models import Integration, InvalidRecord
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.quo.client import QuoApiError, QuoClient
from quo_sync_dagster.store.port import Store


def delete_people(
    store: Store,
    client: QuoClient,
    integration: Integration,
    source: str,
    external_ids: Iterable[str],
) -> int:
    """Delete the Quo contacts of these (namespaced) people and forget them; returns how many
    contacts were deleted. A person without a link is looked up by externalId, so a contact
    whose link was lost (a run killed after its create) goes too. Idempotent: a second call
    finds nothing to delete."""
    ids = sorted(set(external_ids))
    if not ids:
        return 0
    store.put_tombstones(integration.id, ids)  # first: no page run may recreate them meanwhile
    quo_ids = {
        ext: link.quo_id for ext, link in store.get_contact_links(integration.id, ids).items()
    }
    if unlinked := [ext for ext in ids if ext not in quo_ids]:
        for ext, contact in client.find_by_external_ids(unlinked, source).items():
            quo_ids[ext] = contact["id"]
    deleted = 0
    for quo_id in quo_ids.values():
        try:
            client.delete_contact(quo_id)
            deleted += 1
        except QuoApiError as exc:
            if exc.status != 404:  # already gone is what we want
                raise
    store.delete_contact_links(integration.id, ids)
    return deleted


def still_in_crm(
    connector: CRMConnector, external_ids: Iterable[str], object_types: Iterable[str] = ()
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Those of the namespaced `external_ids` the CRM still has, re-read by id in
    `object_types` (none: every one): externalId -> (object type, the record now)."""
    integration = connector.integration
    wanted = sorted({c for ext in external_ids if (c := crm_id_of(integration, ext)) is not None})
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    batch = connector.max_ids_per_fetch
    types = list(object_types) or [
        o.crm_object_name for o in connector.crm_config.person_object_types
    ]
    for object_type in types:
        for start in range(0, len(wanted), batch):
            for record in connector.fetch_persons_by_ids(
                object_type, wanted[start : start + batch]
            ):
                try:
                    ext = quo_external_id(integration, connector.record_key(record, object_type))
                except InvalidRecord:  # no usable id: it cannot be any of those asked for
                    continue
                found[ext] = (object_type, record)
    return found
