"""Idempotent upsert of contacts into Quo.

Per contact: the same content hash as last time costs nothing; a mapped contact is PATCHed with
its full list fields (PATCH replaces lists); an unmapped one is looked up by externalId (≤20 per
request) and PATCHed if found, else created. A 409 on create (someone created it meanwhile) is
recovered by lookup + PATCH, and a PATCH 404 (deleted in Quo) by a create.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from quo_sync_dagster.core.models import ContactLink, QuoContact, RecordOutcome, UpsertAction
from quo_sync_dagster.quo.client import QuoApiError, QuoClient
from quo_sync_dagster.store.port import Store

# Links are written in small batches: a run killed between a create and its flush loses at most
# this many links, and the re-run recovers each one through lookup or the 409 path.
LINK_FLUSH_EVERY = 25


@dataclass(frozen=True)
class _Write:
    contact: QuoContact
    quo_id: str | None  # None: create


class ContactUpserter:
    def __init__(
        self, client: QuoClient, store: Store, integration_id: str, concurrency: int = 4
    ) -> None:
        self._client = client
        self._store = store
        self._integration_id = integration_id
        self._concurrency = concurrency

    def upsert(
        self, contacts: Sequence[QuoContact], assume_absent: bool = False
    ) -> list[RecordOutcome]:
        """One outcome per distinct externalId, in input order.

        `assume_absent` skips the lookup for unmapped contacts: safe when the workspace had no
        contact of this source when the sync began, because the 409 recovery still catches any
        contact created since (e.g. by a run killed before it stored its links).
        QuoUnavailable propagates: the caller fails the whole page rather than its records.
        """
        latest = {c.external_id: c for c in contacts}  # a repeated id: its last version wins
        links = self._store.get_contact_links(self._integration_id, latest)
        outcomes: dict[str, RecordOutcome] = {}
        writes: list[_Write] = []
        unmapped: list[QuoContact] = []
        for ext_id, contact in latest.items():
            link = links.get(ext_id)
            if link is None:
                unmapped.append(contact)
            elif link.content_hash == contact.content_hash():
                outcomes[ext_id] = RecordOutcome(ext_id, UpsertAction.UNCHANGED)
            else:
                writes.append(_Write(contact, link.quo_id))
        if unmapped and not assume_absent:
            by_source: dict[str, list[QuoContact]] = {}
            for contact in unmapped:
                by_source.setdefault(contact.source, []).append(contact)
            found: dict[str, str] = {}
            for source, group in by_source.items():
                remote = self._client.find_by_external_ids([c.external_id for c in group], source)
                found.update({ext_id: c["id"] for ext_id, c in remote.items()})
            writes += [_Write(c, found.get(c.external_id)) for c in unmapped]
        else:
            writes += [_Write(c, None) for c in unmapped]

        pending: dict[str, ContactLink] = {}
        pool = ThreadPoolExecutor(max_workers=self._concurrency)
        try:
            for future in as_completed([pool.submit(self._write, w) for w in writes]):
                outcome, link = future.result()  # QuoUnavailable ends the page here
                outcomes[outcome.external_id] = outcome
                if link is not None:
                    pending[outcome.external_id] = link
                if len(pending) >= LINK_FLUSH_EVERY:
                    self._store.put_contact_links(self._integration_id, pending)
                    pending = {}
        finally:
            # Quo is down: drop queued writes instead of retrying each of them for minutes.
            pool.shutdown(wait=True, cancel_futures=True)
            if pending:
                self._store.put_contact_links(self._integration_id, pending)
        return [outcomes[ext_id] for ext_id in latest]

    def _write(self, write: _Write) -> tuple[RecordOutcome, ContactLink | None]:
        contact = write.contact
        body = contact.to_api_body()
        ext_id = contact.external_id
        try:
            if write.quo_id is not None:
                try:
                    quo_id = self._client.patch_contact(write.quo_id, body)["id"]
                    action = UpsertAction.UPDATED
                except QuoApiError as exc:
                    if exc.status != 404:
                        raise
                    quo_id, action = self._create(contact)
            else:
                quo_id, action = self._create(contact)
        except QuoApiError as exc:
            return RecordOutcome(ext_id, UpsertAction.FAILED, str(exc)), None
        return RecordOutcome(ext_id, action), ContactLink(quo_id, contact.content_hash())

    def _create(self, contact: QuoContact) -> tuple[str, UpsertAction]:
        body = contact.to_api_body()
        try:
            return self._client.create_contact(body)["id"], UpsertAction.CREATED
        except QuoApiError as exc:
            if exc.status != 409:
                raise
        existing = self._client.find_by_external_ids([contact.external_id], contact.source)
        if contact.external_id not in existing:
            raise QuoApiError(409, "0800409", "conflict, but no contact has this externalId", "")
        patched = self._client.patch_contact(existing[contact.external_id]["id"], body)
        return patched["id"], UpsertAction.UPDATED
