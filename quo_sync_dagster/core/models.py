"""Person pages from a CRM, Quo contacts, integrations and per-record outcomes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Quo rejects these sources on create (quo-openapi-v1.json, createContact_v1).
_RESERVED_SOURCES = {"openphone", "device", "csv", "zapier", "google-people", "other"}
_RESERVED_SOURCE_PREFIXES = ("openphone", "csv")


class InvalidRecord(ValueError):
    """A CRM record that cannot become a Quo contact; the message names the bad field."""


@dataclass(frozen=True)
class PersonPage:
    """One page of CRM people, newest first when the CRM can sort."""

    records: list[dict[str, Any]]
    total: int | None  # None when the CRM does not report a total
    has_more: bool
    next_cursor: str | None = None  # for CRMs that page by opaque cursor


@dataclass(frozen=True)
class LabeledValue:
    name: str
    value: str


@dataclass(frozen=True)
class CustomFieldValue:
    key: str
    value: str | float | bool | list[str] | None


@dataclass(frozen=True)
class QuoContact:
    """A contact as Quo's v1 API takes it; `to_api_body` is the exact create/PATCH body."""

    external_id: str
    source: str
    first_name: str | None
    last_name: str | None = None
    company: str | None = None
    role: str | None = None
    emails: tuple[LabeledValue, ...] = ()
    phone_numbers: tuple[LabeledValue, ...] = ()
    custom_fields: tuple[CustomFieldValue, ...] = ()
    source_url: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.external_id) <= 75:
            raise InvalidRecord(f"externalId {self.external_id!r} must be 1-75 characters")
        if not 1 <= len(self.source) <= 72:
            raise InvalidRecord(f"source {self.source!r} must be 1-72 characters")
        if self.source in _RESERVED_SOURCES or self.source.startswith(_RESERVED_SOURCE_PREFIXES):
            raise InvalidRecord(f"source {self.source!r} is reserved by Quo")
        if self.source_url is not None and not 1 <= len(self.source_url) <= 200:
            raise InvalidRecord(f"sourceUrl of {self.external_id!r} must be 1-200 characters")

    def to_api_body(self) -> dict[str, Any]:
        # PATCH replaces list fields, so the body always carries the complete lists.
        body: dict[str, Any] = {
            "externalId": self.external_id,
            "source": self.source,
            "defaultFields": {
                "firstName": self.first_name,
                "lastName": self.last_name,
                "company": self.company,
                "role": self.role,
                "emails": [{"name": e.name, "value": e.value} for e in self.emails],
                "phoneNumbers": [{"name": p.name, "value": p.value} for p in self.phone_numbers],
            },
            "customFields": [{"key": c.key, "value": c.value} for c in self.custom_fields],
        }
        if self.source_url is not None:
            body["sourceUrl"] = self.source_url
        return body

    def content_hash(self) -> str:
        canonical = json.dumps(self.to_api_body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ContactLink:
    """What the store remembers of a synced contact: its Quo id and the hash last sent."""

    quo_id: str
    content_hash: str


class UpsertAction(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True)
class RecordOutcome:
    external_id: str
    action: UpsertAction
    error: str | None = None


@dataclass(frozen=True)
class Integration:
    """One customer's connection of one CRM to one Quo workspace.

    Credentials are references (`env:NAME` or `aws-sm:SECRET_ID`), never values, so this object
    can be stored, logged and shown without leaking anything.
    """

    id: str
    crm: str
    quo_api_key_ref: str
    quo_base_url: str = "https://api.openphone.com"
    default_region: str = "US"
    crm_credential_ref: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SmsActivity:
    """A Quo message to log on a CRM record (the seed's transformQuoSMSToActivity)."""

    quo_message_id: str
    direction: str  # "incoming" | "outgoing"
    content: str
    contact_external_id: str
    timestamp: str


@dataclass(frozen=True)
class CallActivity:
    """A Quo call to log on a CRM record (the seed's transformQuoCallToActivity)."""

    quo_call_id: str
    direction: str
    duration_seconds: int
    contact_external_id: str
    timestamp: str
    summary: str | None = None
