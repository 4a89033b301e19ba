"""Is Quo equal to the CRM? The differential check behind `quo-sync demo --changes` and the
ongoing-sync tests: every CRM person Quo can take is there once and current, nothing else is.

Free of Dagster and HTTP: the caller reads the CRM's people (a simulator's ground truth) and the
integration's contacts from Quo.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from quo_sync_dagster.core.external_ids import crm_id_of, namespaced
from quo_sync_dagster.crms.base import CRMConnector

SAMPLE = 10  # ids shown per finding


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """What the sync writes and a person's change can alter, as Quo returns it."""
    fields = body.get("defaultFields") or {}
    return {
        "firstName": fields.get("firstName"),
        "lastName": fields.get("lastName"),
        "company": fields.get("company"),
        "role": fields.get("role"),
        "emails": sorted(e.get("value") for e in fields.get("emails") or []),
        "phoneNumbers": sorted(p.get("value") for p in fields.get("phoneNumbers") or []),
    }


@dataclass
class Differential:
    crm_people: int = 0  # people of the CRM that Quo can take
    invalid: int = 0  # people of the CRM the transform refuses (not expected in Quo)
    quo_contacts: int = 0  # contacts of the integration in Quo
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.stale or self.duplicates or self.orphans)

    def result(self) -> dict[str, Any]:
        """The RESULT-line fields: counts, and a few ids of each finding."""
        findings = {
            name: getattr(self, name) for name in ("missing", "stale", "duplicates", "orphans")
        }
        return {
            "crmPeople": self.crm_people,
            "quoContacts": self.quo_contacts,
            **{name: len(ids) for name, ids in findings.items()},
            **{f"{name}First": ids[:SAMPLE] for name, ids in findings.items() if ids},
        }


def differential(
    connector: CRMConnector,
    people: Iterable[tuple[str, dict[str, Any]]],
    quo_contacts: Iterable[dict[str, Any]],
) -> Differential:
    """Compare `people` ((object type, record) as the CRM holds them now) with the Quo contacts
    of the connector's source (those of other integrations are ignored)."""
    integration = connector.integration
    diff = Differential()
    expected: dict[str, dict[str, Any]] = {}
    people = list(people)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for object_type, record in people:
        by_type.setdefault(object_type, []).append(record)
    for object_type, records in by_type.items():  # what the sync reads beside each page
        connector.prepare_page(records, object_type)
    for object_type, record in people:
        try:
            contact = namespaced(
                connector.transform_person_to_quo(record, object_type), integration
            )
        except Exception:  # the sync counts it as failed; Quo must not hold it
            diff.invalid += 1
            continue
        expected[contact.external_id] = _comparable(contact.to_api_body())
    diff.crm_people = len(expected)
    mine = [
        c
        for c in quo_contacts
        if c.get("externalId") and crm_id_of(integration, c["externalId"]) is not None
    ]
    diff.quo_contacts = len(mine)
    counts = Counter(c["externalId"] for c in mine)
    diff.duplicates = sorted(ext for ext, n in counts.items() if n > 1)
    seen = {c["externalId"]: c for c in mine}
    diff.missing = sorted(set(expected) - set(seen))
    diff.orphans = sorted(set(seen) - set(expected))
    diff.stale = sorted(
        ext for ext in set(expected) & set(seen) if _comparable(seen[ext]) != expected[ext]
    )
    return diff
