"""Person pages from a CRM, Quo contacts, integrations and per-record outcomes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from quo_sync_dagster.core.sanitize import MAX_TEXT, clean, clean_or_none, finite, has_unsafe

# Quo rejects these sources on create (quo-openapi-v1.json, createContact_v1).
_RESERVED_SOURCES = {"openphone", "device", "csv", "zapier", "google-people", "other"}
_RESERVED_SOURCE_PREFIXES = ("openphone", "csv")
MAX_EXTERNAL_ID = 75
MAX_SOURCE_URL = 200
# Quo documents no maximum for names, company and role. 255 is far beyond any real name or job
# title and keeps a 100 KB value out of every create and PATCH; longer text is cut, not refused,
# so the person still syncs.
MAX_NAME = MAX_TEXT
# Nor a maximum number of e-mails or phone numbers. People have a few; dozens mean broken data
# (a string iterated as a list once made 100,920 one-letter "e-mails"), and every PATCH resends
# the full lists, so the first 20 of each are kept.
MAX_ITEMS = 20
MAX_EMAIL = 254  # the longest address SMTP carries (RFC 5321)
MAX_CUSTOM_TEXT = 1000  # custom fields hold notes and addresses, longer than a name
MAX_SAFE_INTEGER = 2**53  # larger integers lose precision in JSON clients (and may not print)
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")  # local@domain.tld
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


class InvalidRecord(ValueError):
    """A CRM record that cannot become a Quo contact; the message names the bad field."""


class NoPhone(InvalidRecord):
    """A readable person without a phone number Quo can hold: skipped, not a contact, unless
    the integration syncs people without a phone (a person who had one and lost it is
    withdrawn from Quo, see ContactUpserter.withdraw)."""


class Excluded(InvalidRecord):
    """A record a connector leaves out on purpose (a filter: e.g. a CRM's deleted or merged-away
    marker on a record it still lists): skipped with the message as the reason."""


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
        # The last check before Quo for every connector: types and Quo's limits are enforced,
        # text is cleaned, and what cannot be sent is dropped, so that to_api_body and
        # content_hash never fail. Only an unusable externalId or source refuses the contact.
        ext = self.external_id
        if not isinstance(ext, str):
            raise InvalidRecord(f"externalId must be a string, not {type(ext).__name__}")
        if not 1 <= len(ext) <= MAX_EXTERNAL_ID:
            raise InvalidRecord(f"externalId {ext[:80]!r} must be 1-75 characters")
        if has_unsafe(ext):
            raise InvalidRecord(f"externalId {ext!r} holds control, bidi or surrogate characters")
        source = self.source
        if not isinstance(source, str) or not 1 <= len(source) <= 72 or has_unsafe(source):
            raise InvalidRecord(f"source {source!r} must be 1-72 printable characters")
        if source in _RESERVED_SOURCES or source.startswith(_RESERVED_SOURCE_PREFIXES):
            raise InvalidRecord(f"source {source!r} is reserved by Quo")
        for name, api_name in _TEXT_FIELDS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidRecord(
                    f"{api_name} of {ext!r} must be text, not {type(value).__name__}"
                )
            object.__setattr__(self, name, clean_or_none(value, MAX_NAME))
        object.__setattr__(self, "emails", _items(self.emails, "email", _is_email))
        object.__setattr__(
            self, "phone_numbers", _items(self.phone_numbers, "phone", _E164.fullmatch)
        )
        object.__setattr__(
            self, "custom_fields", tuple(_custom(ext, c) for c in self.custom_fields)
        )
        object.__setattr__(self, "source_url", _url(self.source_url))

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
        canonical = json.dumps(
            self.to_api_body(), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


_TEXT_FIELDS = {
    "first_name": "firstName",
    "last_name": "lastName",
    "company": "company",
    "role": "role",
}


def _is_email(value: str) -> bool:
    return len(value) <= MAX_EMAIL and _EMAIL.fullmatch(value) is not None


def _items(
    items: Any, default_label: str, valid: Callable[[str], object]
) -> tuple[LabeledValue, ...]:
    """The items with a string value that is still `valid` once cleaned, labels cleaned (the
    default for a blank one), at most MAX_ITEMS; the rest is dropped, not the person."""
    kept: list[LabeledValue] = []
    for item in items or ():
        if len(kept) == MAX_ITEMS:
            break
        if not isinstance(item, LabeledValue) or not isinstance(item.value, str):
            continue
        value = clean(item.value, None)
        if valid(value):
            kept.append(LabeledValue(clean_or_none(item.name) or default_label, value))
    return tuple(kept)


def _custom(external_id: str, field: Any) -> CustomFieldValue:
    """A custom field whose value JSON and Quo can take; any other value is absent (None)."""
    if not isinstance(field, CustomFieldValue) or not isinstance(field.key, str) or not field.key:
        raise InvalidRecord(f"customFields of {external_id!r}: every item needs a string key")
    value = finite(field.value)
    if isinstance(value, str):
        value = clean_or_none(value, MAX_CUSTOM_TEXT)
    elif isinstance(value, list | tuple):
        value = [text for v in value[:MAX_ITEMS] if (text := clean_or_none(v, MAX_CUSTOM_TEXT))]
    elif isinstance(value, int) and not isinstance(value, bool):
        value = value if abs(value) <= MAX_SAFE_INTEGER else None
    elif not isinstance(value, bool | float):
        value = None
    return CustomFieldValue(field.key, value)


def _url(value: Any) -> str | None:
    """An absolute http(s) URL of at most 200 characters; anything else is no link (a link
    is a convenience: losing it must not lose the person)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SOURCE_URL or has_unsafe(value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    ok = parts.scheme in ("http", "https") and parts.netloc and not any(c.isspace() for c in value)
    return value if ok else None


@dataclass(frozen=True)
class ContactLink:
    """What the store remembers of a synced contact: its Quo id, the hash last sent and its
    phone numbers (E.164), which index people by number for activity logging."""

    quo_id: str
    content_hash: str
    phones: tuple[str, ...] = ()


class UpsertAction(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    ADOPTED = "adopted"  # an earlier system's contact, found and linked instead of a new one
    FAILED = "failed"


@dataclass(frozen=True)
class RecordOutcome:
    external_id: str
    action: UpsertAction
    error: str | None = None
    # A Quo contact that shares a phone number with this person but no externalId scheme
    # (the adoption's `adopt_by_phone` candidate), when it was not adopted.
    candidate: str | None = None


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
    """A Quo message to log on a CRM record (the seed's transformQuoSMSToActivity).
    `contact_external_id` is the connector's record key of the person (`record_key`)."""

    quo_message_id: str
    direction: str  # "incoming" | "outgoing"
    content: str
    contact_external_id: str
    timestamp: str
    external_number: str | None = None  # E.164 of the other party
    quo_number: str | None = None  # E.164 of the workspace's Quo number
    quo_user: str | None = None  # the Quo user (id, or name when known)
    deep_link: str | None = None  # the conversation in Quo


class CallOutcome(StrEnum):
    ANSWERED = "answered"
    MISSED = "missed"  # nobody answered (answeredAt null), whatever the duration
    VOICEMAIL = "voicemail"  # missed, and the caller left a voicemail
    RINGING = "ringing"  # only call.ringing has arrived so far


@dataclass(frozen=True)
class CallActivity:
    """A Quo call to log on a CRM record (the seed's transformQuoCallToActivity), with what Quo
    has sent about it so far: a later version (recording, summary, transcript, voicemail)
    updates the same CRM activity. `contact_external_id` is the connector's record key."""

    quo_call_id: str
    direction: str  # "incoming" | "outgoing"
    duration_seconds: int
    contact_external_id: str
    timestamp: str  # when the call began (ISO 8601)
    summary: str | None = None  # Quo's AI summary, its lines joined
    outcome: CallOutcome = CallOutcome.ANSWERED
    answered_at: str | None = None
    completed_at: str | None = None
    external_number: str | None = None  # E.164 of the other party
    quo_number: str | None = None  # E.164 of the workspace's Quo number
    quo_user: str | None = None  # who answered or called (id, or name when known)
    deep_link: str | None = None  # the call in Quo
    recording_urls: tuple[str, ...] = ()
    voicemail_url: str | None = None
    voicemail_transcript: str | None = None
    next_steps: tuple[str, ...] = ()
    transcript: str | None = None  # "speaker: words" lines
