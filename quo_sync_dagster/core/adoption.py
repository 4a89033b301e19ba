"""Cutover from an earlier sync: finding the Quo contacts it wrote, so they are adopted rather
than duplicated.

An earlier system (the production Node.js sync wrote `source` 'openphone-<crm>' and the CRM id
as externalId; AxisCare 'axiscare' and 'client-123') left contacts this product's lookups, under
its own source and namespaced ids, never find. An integration's settings say where they are:

- `legacy_sources`: the sources the earlier system wrote (default none);
- `legacy_external_id`: its externalId for a CRM id, a template holding `{id}` exactly once
  (default `{id}`); `{id}` is the CRM id before this product's namespace (`crm_id_of`);
- `adopt_rewrites_ids` (default true): an adopted contact is rewritten to this product's source
  and externalId; false keeps the earlier ones (every PATCH then leaves both out);
- `adopt_by_phone` (default false): a contact that matches a person only by a phone number, held
  by no one else, is adopted too; otherwise it is only reported as a candidate.

The upserter (quo/upsert.py) applies these; this module holds the rules and the phone index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quo_sync_dagster.core.external_ids import SEPARATOR, crm_id_of
from quo_sync_dagster.core.models import MAX_EXTERNAL_ID, Integration, InvalidRecord
from quo_sync_dagster.core.phones import to_e164

ID_FIELD = "{id}"
MAX_SOURCE_FILTER = 75  # GET /v1/contacts `sources` items: 1-75 characters


@dataclass(frozen=True)
class AdoptionRules:
    """One integration's adoption settings (see the module docstring)."""

    legacy_sources: tuple[str, ...] = ()
    legacy_external_id: str = ID_FIELD
    rewrite_ids: bool = True
    by_phone: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AdoptionRules:
        """The rules in `settings`; a value of the wrong kind is a ValueError naming it."""
        sources = settings.get("legacy_sources", [])
        if not isinstance(sources, list | tuple) or not all(
            isinstance(s, str) and 1 <= len(s) <= MAX_SOURCE_FILTER for s in sources
        ):
            raise ValueError(
                f"setting legacy_sources must be a list of sources of 1-{MAX_SOURCE_FILTER} "
                f"characters, not {sources!r}"
            )
        template = settings.get("legacy_external_id", ID_FIELD)
        if (
            not isinstance(template, str)
            or template.count(ID_FIELD) != 1
            or len(template) - len(ID_FIELD) >= MAX_EXTERNAL_ID  # no room left for an id
        ):
            raise ValueError(
                f"setting legacy_external_id must be text holding {ID_FIELD} exactly once, "
                f"with room for the id in {MAX_EXTERNAL_ID} characters, not {template!r}"
            )
        flags = {}
        for name in ("adopt_rewrites_ids", "adopt_by_phone"):
            value = settings.get(name, name == "adopt_rewrites_ids")
            if not isinstance(value, bool):
                raise ValueError(f"setting {name} must be true or false, not {value!r}")
            flags[name] = value
        return cls(
            tuple(dict.fromkeys(sources)),
            template,
            flags["adopt_rewrites_ids"],
            flags["adopt_by_phone"],
        )

    @property
    def configured(self) -> bool:
        """Whether unmapped people are looked for among contacts this product did not write
        (then an empty workspace under this product's source says nothing)."""
        return bool(self.legacy_sources) or self.by_phone

    def legacy_id(self, crm_id: str) -> str | None:
        """The earlier system's externalId of CRM id `crm_id`; None if Quo could not hold it."""
        legacy = self.legacy_external_id.replace(ID_FIELD, crm_id)
        return legacy if len(legacy) <= MAX_EXTERNAL_ID else None

    def fits_legacy_id(self, external_id: str) -> bool:
        """Whether `external_id` has the shape of the earlier system's ids."""
        prefix, _, suffix = self.legacy_external_id.partition(ID_FIELD)
        return (
            len(external_id) > len(prefix) + len(suffix)
            and external_id.startswith(prefix)
            and external_id.endswith(suffix)
        )


@dataclass(frozen=True)
class Adoption:
    """The rules bound to one integration: its namespace, its default phone region, and the
    sources this product writes (`product_sources`: every connector's), which tell its own
    contacts, of any integration, from the rest."""

    integration: Integration
    product_sources: frozenset[str]
    rules: AdoptionRules = field(default_factory=AdoptionRules)
    # The CRM id the earlier system wrote for a record key (the connector's earlier_key).
    earlier_key: Callable[[str], str] = field(default=lambda key: key)

    @classmethod
    def of(
        cls,
        integration: Integration,
        product_sources: Iterable[str],
        earlier_key: Callable[[str], str] = lambda key: key,
    ) -> Adoption:
        return cls(
            integration,
            frozenset(product_sources),
            AdoptionRules.from_settings(integration.settings),
            earlier_key,
        )

    def legacy_id(self, external_id: str) -> str | None:
        """The earlier system's externalId of the person this integration calls `external_id`."""
        crm_id = crm_id_of(self.integration, external_id)
        return None if crm_id is None else self.rules.legacy_id(self.earlier_key(crm_id))

    def is_ours(self, contact: Mapping[str, Any]) -> bool:
        """Whether this product wrote `contact` (for any integration): only its externalIds
        are namespaced, and no earlier system's id scheme holds the separator."""
        return contact.get("source") in self.product_sources and SEPARATOR in (
            contact.get("externalId") or ""
        )

    def held_by_id(self, contact: Mapping[str, Any]) -> bool:
        """Whether some CRM person owns `contact` through its externalId (this product's or the
        earlier system's): such a contact is never adopted by phone."""
        external_id = contact.get("externalId")
        return self.is_ours(contact) or (
            contact.get("source") in self.rules.legacy_sources
            and external_id is not None
            and self.rules.fits_legacy_id(external_id)
        )


@dataclass(frozen=True)
class PhoneMatch:
    """A contact that shares a phone number with a person. `sole`: it is the only contact of
    the workspace holding any of the person's numbers."""

    contact_id: str
    sole: bool


class PhoneIndex:
    """The workspace's contacts by phone number (E.164), from one listing, and which persons of
    this run matched each contact. Only contacts no one holds by externalId are candidates; all
    count when deciding whether a number is held by one contact alone."""

    def __init__(self, adoption: Adoption, contacts: Iterable[Mapping[str, Any]]) -> None:
        self._region = adoption.integration.default_region
        self._holders: dict[str, list[str]] = {}  # number -> contact ids, in listing order
        self._free: set[str] = set()  # contacts no one holds by externalId
        self._claims: dict[str, set[str]] = {}  # contact id -> persons of this run matching it
        for contact in contacts:
            if not adoption.held_by_id(contact):
                self._free.add(contact["id"])
            items = (contact.get("defaultFields") or {}).get("phoneNumbers") or ()
            for number in self.numbers(item.get("value") for item in items):
                holders = self._holders.setdefault(number, [])
                if contact["id"] not in holders:
                    holders.append(contact["id"])

    def numbers(self, values: Iterable[Any]) -> list[str]:
        """The values as E.164 (Quo keeps numbers as written: an earlier system may have sent
        them unformatted); what is no phone number is left out."""
        found = []
        for value in values:
            if isinstance(value, str):
                try:
                    found.append(to_e164(value, self._region))
                except InvalidRecord:
                    continue
        return found

    def match(self, person: str, numbers: Iterable[str]) -> PhoneMatch | None:
        """The candidate for the person `person` holding the E.164 `numbers` (the first free
        contact holding one of them); None if there is none. The person claims every free
        contact holding one of its numbers."""
        held = list(dict.fromkeys(c for n in numbers for c in self._holders.get(n, ())))
        free = [c for c in held if c in self._free]
        for contact_id in free:
            self._claims.setdefault(contact_id, set()).add(person)
        return PhoneMatch(free[0], sole=len(held) == 1) if free else None

    def claimed_by_others(self, contact_id: str, person: str) -> bool:
        """Whether another person of this run holds a number of the contact too."""
        return bool(self._claims.get(contact_id, set()) - {person})
