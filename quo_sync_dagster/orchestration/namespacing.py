"""Move contact links written before externalIds were namespaced to their namespaced ids.

Links are keyed by the externalId Quo stores. Syncs made before namespacing wrote the bare CRM
id; renaming those links keeps their Quo id, and because the externalId is part of the content
hash the next sync PATCHes each such contact once, writing its new externalId into Quo instead
of creating a twin.
"""

from __future__ import annotations

from quo_sync_dagster.core.external_ids import namespace
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.store.port import Store


def namespace_links(store: Store, integration: Integration) -> int:
    """Rename every link of `integration` outside its namespace; returns how many moved."""
    prefix = namespace(integration)
    # Collected first: renaming during the keyset scan would move links ahead of its position.
    renames = {
        external_id: prefix + external_id
        for external_id, _ in store.iter_contact_links(integration.id)
        if not external_id.startswith(prefix)
    }
    return store.rename_contact_links(integration.id, renames) if renames else 0
