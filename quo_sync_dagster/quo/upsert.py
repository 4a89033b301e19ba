"""Idempotent upsert of contacts into Quo, exactly once even on a Quo that allows duplicates.

Per contact: the same content hash as last time costs nothing; a mapped contact is PATCHed with
its full list fields (PATCH replaces lists); an unmapped one is looked up by externalId (≤20 per
request) and PATCHed if found, else created. A 409 on create (someone created it meanwhile) is
recovered by lookup + PATCH, and a PATCH 404 (deleted in Quo) by a create.

Exactly once without Quo's help. Quo's spec does not promise a 409 for a second contact with the
same source and externalId, so no create is ever sent twice blindly: the client does not retry
a create whose outcome is unknown (a timeout or reset after sending, a 5xx) but raises
QuoOutcomeUnknown, and the contact's externalId is then looked up before any second create. If
found, it is linked (PATCHed only if it does not hold what was sent); if not, the create is sent
again, at most MAX_CREATE_ATTEMPTS times in all, after which that record fails with the reason
(its page does not). The lookup waits a moment first (`settle_seconds`, growing per attempt) so
that a create Quo is still processing when the client gave up has landed.

Counts are exact: CREATED means this upsert made the contact in Quo.
- A create answered 201, or a lost create found by the lookup that followed it: CREATED (the
  contact is this create's; the lookup only learnt its id).
- A 409 on a contact's first create: the contact was there before (made by someone else, or by
  an earlier run that stopped before storing its link), so it is PATCHed and counted UPDATED.
- A 409 after an earlier create of this contact had an unknown outcome: that lost create made
  it, so CREATED.
- ADOPTED (cutover, below): this upsert linked a contact an earlier system made and PATCHed it
  (synced, neither created nor updated); had it been deleted meanwhile, the create is CREATED.

Failures: a record fails alone (RecordOutcome FAILED) for a Quo error answer (`Quo 400 ...`),
for a create still unconfirmed after every attempt, and for any unexpected exception in its
write (`TypeName: message`). Only QuoUnavailable (Quo down or refusing the key, after the
client's retries of idempotent requests) propagates, so the caller fails the page as a whole.

A page re-run after such a page failure (or after a killed run) may hold creates whose outcome
was never learnt and whose links were never stored, so the page asset passes `assume_absent`
only on a page's first try (orchestration/factory.py `_first_try`).

Cutover (core/adoption.py, with `adoption`): an unmapped contact not found under this product's
source is looked up under each legacy source by its legacy externalId (≤20 per request), and one
found there is adopted: linked and PATCHed in place, never created again. When adoption is
configured (`legacy_sources` or `adopt_by_phone`), those still not found are matched by phone
number against the workspace's contacts that no one holds by externalId (listed once per
upserter, when first needed: Quo cannot filter by number). A match is adopted only with
`adopt_by_phone`, and only when it is the sole contact holding any of the person's numbers, no
other person of this run or linked person of the integration holds one of them, and, re-read
just before, it is still free and holds one; otherwise the contact is created and the match
reported as the outcome's `candidate`. With `adopt_rewrites_ids` false every PATCH leaves
externalId and source out (PATCH is partial), so adopted contacts keep the earlier ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from quo_sync_dagster.core.adoption import Adoption, AdoptionRules, PhoneIndex
from quo_sync_dagster.core.models import ContactLink, QuoContact, RecordOutcome, UpsertAction
from quo_sync_dagster.quo.client import QuoApiError, QuoClient, QuoOutcomeUnknown, QuoUnavailable
from quo_sync_dagster.store.port import Store

# Links are written in small batches: a run killed between a create and its flush loses at most
# this many links, and the re-run recovers each one through lookup or the 409 path.
LINK_FLUSH_EVERY = 25
# Creates of one contact whose outcome stayed unknown (each followed by a lookup) before that
# record fails.
MAX_CREATE_ATTEMPTS = 3
# Seconds to wait before the lookup that follows the n-th unknown create: n times this.
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class _Write:
    contact: QuoContact
    quo_id: str | None  # None: create
    adopt: bool = False  # quo_id is an earlier system's contact
    candidate: str | None = None  # a contact sharing a phone number (quo_id too if adopted)


class _CreateUnconfirmed(Exception):
    """Every create of a contact had an unknown outcome and no lookup found it."""


class ContactUpserter:
    def __init__(
        self,
        client: QuoClient,
        store: Store,
        integration_id: str,
        concurrency: int = 4,
        *,
        adoption: Adoption | None = None,
        max_create_attempts: int = MAX_CREATE_ATTEMPTS,
        settle_seconds: float = SETTLE_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_create_attempts < 1:
            raise ValueError(f"max_create_attempts must be >= 1, got {max_create_attempts}")
        self._client = client
        self._store = store
        self._integration_id = integration_id
        self._concurrency = concurrency
        self._adoption = adoption
        self._rules = adoption.rules if adoption else AdoptionRules()
        self._phone_index: PhoneIndex | None = None  # listed when first needed
        self._max_create_attempts = max_create_attempts
        self._settle_seconds = settle_seconds
        self._sleep = sleep

    def withdraw(self, external_ids: Sequence[str]) -> list[str]:
        """Delete the Quo contacts of linked people who no longer belong in Quo (they lost
        their last phone number) and forget their links; returns those withdrawn. No
        tombstone: the person comes back as soon as the CRM gives them a number again."""
        links = self._store.get_contact_links(self._integration_id, list(external_ids))
        for link in links.values():
            try:
                self._client.delete_contact(link.quo_id)
            except QuoApiError as exc:
                if exc.status != 404:  # already gone is what we want
                    raise
        self._store.delete_contact_links(self._integration_id, list(links))
        return list(links)

    def upsert(
        self,
        contacts: Sequence[QuoContact],
        assume_absent: bool = False,
        match_phones: bool = False,
    ) -> list[RecordOutcome]:
        """One outcome per distinct externalId, in input order.

        `assume_absent` skips the lookup of unmapped contacts under this product's source (an
        earlier system's contacts are still looked for): safe when the workspace had no contact
        of this source when the sync began. A contact created since by a run killed
        before it stored its links is caught by a 409 where Quo enforces uniqueness; a create
        of this call whose answer is lost is looked up before it is sent again, so this call
        never makes a contact twice. `match_phones` (an initial sync's pages) lets people still
        unfound be matched by phone number, which lists the workspace once per upserter; other
        syncs meet people made since the cutover, found (if at all) by their legacy id.
        QuoUnavailable propagates: the caller fails the whole page rather than its records.
        """
        latest = {c.external_id: c for c in contacts}  # a repeated id: its last version wins
        links = self._store.get_contact_links(self._integration_id, latest)
        outcomes: dict[str, RecordOutcome] = {}
        writes: list[_Write] = []
        unmapped: list[QuoContact] = []
        reindexed: dict[str, ContactLink] = {}  # links from before the phone index
        for ext_id, contact in latest.items():
            link = links.get(ext_id)
            if link is None:
                unmapped.append(contact)
            elif link.content_hash == contact.content_hash():
                outcomes[ext_id] = RecordOutcome(ext_id, UpsertAction.UNCHANGED)
                if link.phones != _phones(contact):
                    reindexed[ext_id] = _link(link.quo_id, contact)
            else:
                writes.append(_Write(contact, link.quo_id))
        if unmapped:
            writes += self._find(unmapped, assume_absent, match_phones)

        pending = reindexed
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

    def _find(
        self, unmapped: list[QuoContact], assume_absent: bool, match_phones: bool
    ) -> list[_Write]:
        """The writes of unmapped contacts: a PATCH of the contact found under this product's
        source (not looked for with `assume_absent`), else the adoption of an earlier system's
        (by phone only with `match_phones`), else a create."""
        found = {} if assume_absent else self._find_own(unmapped)
        writes = [_Write(c, found[c.external_id]) for c in unmapped if c.external_id in found]
        rest = [c for c in unmapped if c.external_id not in found]
        if self._adoption is not None and self._rules.configured and rest:
            legacy = self._find_legacy(self._adoption, rest)
            writes += [
                _Write(c, legacy[c.external_id], adopt=True)
                for c in rest
                if c.external_id in legacy
            ]
            rest = [c for c in rest if c.external_id not in legacy]
            if rest and match_phones:
                return writes + self._match_phones(self._adoption, rest)
        return writes + [_Write(c, None) for c in rest]

    def _find_own(self, contacts: list[QuoContact]) -> dict[str, str]:
        """externalId -> Quo id of the contacts Quo has under their own source."""
        by_source: dict[str, list[str]] = {}
        for contact in contacts:
            by_source.setdefault(contact.source, []).append(contact.external_id)
        found: dict[str, str] = {}
        for source, ids in by_source.items():
            remote = self._client.find_by_external_ids(ids, source)
            found.update({ext_id: c["id"] for ext_id, c in remote.items()})
        return found

    def _find_legacy(self, adoption: Adoption, contacts: list[QuoContact]) -> dict[str, str]:
        """externalId -> Quo id of the contacts an earlier system wrote, by their legacy
        externalId under each legacy source in turn (the first that has one wins)."""
        wanted = {}  # legacy externalId -> this integration's
        for contact in contacts:
            if (legacy := adoption.legacy_id(contact.external_id)) is not None:
                wanted[legacy] = contact.external_id
        found: dict[str, str] = {}
        for source in self._rules.legacy_sources:
            if not wanted:
                break
            for legacy, remote in self._client.find_by_external_ids(wanted, source).items():
                found[wanted.pop(legacy)] = remote["id"]
        return found

    def _match_phones(self, adoption: Adoption, contacts: list[QuoContact]) -> list[_Write]:
        """Creates, each with the contact sharing a phone number as its candidate; adoptions of
        that contact where `adopt_by_phone` allows and nobody else may have it."""
        if self._phone_index is None:
            self._phone_index = PhoneIndex(adoption, self._client.iter_contacts())
        index = self._phone_index
        # Every match first: whether another person claims a contact must not depend on order.
        matches = {
            c.external_id: m for c in contacts if (m := index.match(c.external_id, _phones(c)))
        }
        numbers = {n for c in contacts if c.external_id in matches for n in _phones(c)}
        # People of this integration linked earlier hold their numbers in Quo too.
        linked = self._store.people_by_phone(self._integration_id, numbers)
        writes = []
        for contact in contacts:
            ext_id, match = contact.external_id, matches.get(contact.external_id)
            if match is None:
                writes.append(_Write(contact, None))
                continue
            adopt = (
                self._rules.by_phone
                and match.sole
                and not index.claimed_by_others(match.contact_id, ext_id)
                and not any(set(linked.get(n, ())) - {ext_id} for n in _phones(contact))
            )
            quo_id = match.contact_id if adopt else None
            writes.append(_Write(contact, quo_id, adopt=adopt, candidate=match.contact_id))
        return writes

    def _still_free(self, write: _Write) -> bool:
        """Whether the phone match of `write` is, read again now, held by no one's externalId
        and holds one of the person's numbers (a concurrent run may have adopted it since the
        listing: a PATCH gives it that person's ids, or numbers)."""
        assert self._adoption is not None and self._phone_index is not None and write.quo_id
        try:
            current = self._client.get_contact(write.quo_id)
        except QuoApiError as exc:
            if exc.status != 404:
                raise
            return False
        items = current.get("defaultFields", {}).get("phoneNumbers") or ()
        held = self._phone_index.numbers(item.get("value") for item in items)
        return not self._adoption.held_by_id(current) and bool(
            set(held) & set(_phones(write.contact))
        )

    def _write(self, write: _Write) -> tuple[RecordOutcome, ContactLink | None]:
        """One record's write; whatever goes wrong in it but Quo being unavailable is that
        record's failure."""
        ext_id = write.contact.external_id
        try:
            quo_id, action = self._upsert_one(write)
            candidate = None if action is UpsertAction.ADOPTED else write.candidate
            return RecordOutcome(ext_id, action, candidate=candidate), _link(quo_id, write.contact)
        except QuoApiError as exc:
            return RecordOutcome(ext_id, UpsertAction.FAILED, str(exc)), None
        except (_CreateUnconfirmed, QuoOutcomeUnknown) as exc:  # this record's, not Quo down
            return RecordOutcome(ext_id, UpsertAction.FAILED, str(exc)), None
        except QuoUnavailable:
            raise
        except Exception as exc:
            return RecordOutcome(ext_id, UpsertAction.FAILED, f"{type(exc).__name__}: {exc}"), None

    def _upsert_one(self, write: _Write) -> tuple[str, UpsertAction]:
        contact = write.contact
        if write.quo_id is None:
            return self._create(contact)
        if write.adopt and write.candidate is not None and not self._still_free(write):
            return self._create(contact)
        try:
            patched = self._client.patch_contact(write.quo_id, self._patch_body(contact))
        except QuoApiError as exc:
            if exc.status != 404:
                raise
            return self._create(contact)  # deleted in Quo: made again
        return patched["id"], UpsertAction.ADOPTED if write.adopt else UpsertAction.UPDATED

    def _patch_body(self, contact: QuoContact) -> dict[str, Any]:
        body = contact.to_api_body()
        if not self._rules.rewrite_ids:  # PATCH is partial: an adopted contact keeps its ids
            del body["externalId"], body["source"]
        return body

    def _create(self, contact: QuoContact) -> tuple[str, UpsertAction]:
        """Create the contact, never twice: after a create whose outcome is unknown the
        externalId is looked up, and only if Quo has no such contact is it sent again."""
        body = contact.to_api_body()
        unknown: QuoOutcomeUnknown | None = None
        for attempt in range(1, self._max_create_attempts + 1):
            try:
                return self._client.create_contact(body)["id"], UpsertAction.CREATED
            except QuoOutcomeUnknown as exc:
                unknown = exc
            except QuoApiError as exc:
                if exc.status != 409:
                    raise
                return self._recover_conflict(contact, ours=unknown is not None)
            self._sleep(self._settle_seconds * attempt)
            remote = self._lookup(contact)
            if remote is not None:  # the lost create did happen
                return self._confirm(remote, contact), UpsertAction.CREATED
        raise _CreateUnconfirmed(
            f"Quo did not confirm the create of {contact.external_id!r} in "
            f"{self._max_create_attempts} attempts and no contact with this externalId was "
            f"found after any of them; not created again (last: {unknown})"
        )

    def _recover_conflict(self, contact: QuoContact, ours: bool) -> tuple[str, UpsertAction]:
        """A 409: the contact exists. `ours`: an earlier create of this call, whose answer was
        lost, made it (CREATED); otherwise it was there before (PATCHed, UPDATED)."""
        remote = self._lookup(contact)
        if remote is None:
            raise QuoApiError(409, "0800409", "conflict, but no contact has this externalId", "")
        if ours:
            return self._confirm(remote, contact), UpsertAction.CREATED
        patched = self._client.patch_contact(remote["id"], self._patch_body(contact))
        return patched["id"], UpsertAction.UPDATED

    def _lookup(self, contact: QuoContact) -> dict[str, Any] | None:
        found = self._client.find_by_external_ids([contact.external_id], contact.source)
        return found.get(contact.external_id)

    def _confirm(self, remote: dict[str, Any], contact: QuoContact) -> str:
        """The id of a contact found after a lost create, PATCHed first if it does not hold
        `contact` (a create that did land holds it already)."""
        body = self._patch_body(contact)
        if _holds(remote, body):
            return remote["id"]
        return self._client.patch_contact(remote["id"], body)["id"]


def _holds(remote: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether the Quo contact `remote` already holds every field of the create/PATCH `body`."""
    fields, want = remote.get("defaultFields") or {}, body["defaultFields"]
    if any(fields.get(k) != want[k] for k in ("firstName", "lastName", "company", "role")):
        return False
    for name in ("emails", "phoneNumbers"):
        have = [(i.get("name"), i.get("value")) for i in fields.get(name) or ()]
        if have != [(i["name"], i["value"]) for i in want[name]]:
            return False
    have_custom = {c.get("key"): c.get("value") for c in remote.get("customFields") or ()}
    want_custom = {c["key"]: c["value"] for c in body["customFields"] if c["value"] is not None}
    return have_custom == want_custom and remote.get("sourceUrl") == body.get("sourceUrl")


def _phones(contact: QuoContact) -> tuple[str, ...]:
    return tuple(phone.value for phone in contact.phone_numbers)


def _link(quo_id: str, contact: QuoContact) -> ContactLink:
    return ContactLink(quo_id, contact.content_hash(), _phones(contact))
