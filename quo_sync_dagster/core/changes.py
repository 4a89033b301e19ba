"""A change to a CRM person, as a webhook reports it: what the inbox holds and the runs apply.

A change only says *which* person changed; the webhook run re-reads the person by id and syncs
what the CRM holds then, so a stale, duplicated or reordered delivery cannot write old data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ChangeKind(StrEnum):
    UPSERT = "upsert"  # created or updated
    DELETE = "delete"
    MERGE = "merge"  # `person_id` survives; `merged_ids` were merged into it and are gone


@dataclass(frozen=True)
class PersonChange:
    event_id: str  # the CRM's delivery/event id: the inbox drops a second one
    kind: ChangeKind
    object_type: str  # one of the connector's person_object_types' crm_object_name
    person_id: str  # the CRM's id (not namespaced)
    merged_ids: tuple[str, ...] = ()
    occurred_at: str | None = None  # ISO 8601, when the CRM says the change happened

    def to_payload(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "objectType": self.object_type,
            "personId": self.person_id,
            "mergedIds": list(self.merged_ids),
            "occurredAt": self.occurred_at,
        }

    @classmethod
    def from_payload(cls, event_id: str, payload: dict[str, Any]) -> PersonChange:
        return cls(
            event_id=event_id,
            kind=ChangeKind(payload["kind"]),
            object_type=payload["objectType"],
            person_id=payload["personId"],
            merged_ids=tuple(payload.get("mergedIds") or ()),
            occurred_at=payload.get("occurredAt"),
        )

    def touched_ids(self) -> tuple[str, ...]:
        """Every person whose current state the CRM must be asked for."""
        return (self.person_id, *self.merged_ids)
