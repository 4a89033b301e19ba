"""Strict local simulator of the Attio REST API (v2): people records, notes and webhooks, and the
companies the people belong to (a fixed, generated set, queried like people).

Request bodies are validated against schemas extracted from Attio's OpenAPI spec
(`specs/attio-subset.json`); every error uses Attio's `{status_code, type, code, message}`
envelope. People are generated deterministically and persisted in the data dir, as are notes
(created, listed, read and deleted: Attio has no note update) and webhooks. People can also be
created through the API (`POST /v2/objects/people/records`): such a record holds only the values
sent, made by the API token, and sends `record.created` like an admin create. The server only
binds 127.0.0.1; `/_sandbox/*` admin endpoints are open.

People can be created, updated, merged and deleted through `/_sandbox/people` while a sync runs.
Each change is delivered as Attio's `record.*` webhook events (one event per delivery, signed
with `Attio-Signature`) to every active webhook whose subscriptions and filters take it, after
the admin answer, through a `WebhookDelivery` that can drop, duplicate, delay or reorder them.
A merge follows the current docs: a new record replaces both originals (two `record.merged`).
Attio requires https webhook targets; the sandbox also takes http on loopback, where a local
receiver has no TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import phonenumbers
from jsonschema import Draft202012Validator, FormatChecker
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from quo_sync_dagster.sandbox.quo_state import TokenBuckets
from quo_sync_dagster.sandbox.serving import (
    Fault,
    FaultQueue,
    SandboxServer,
    admin_routes,
    serve_until_signalled,
)
from quo_sync_dagster.sandbox.webhook_delivery import WebhookDelivery, delivery_routes

log = logging.getLogger(__name__)

SPEC_PATH = Path(__file__).parent / "specs" / "attio-subset.json"
RECORDS, QUERY = "/v2/objects/{object}/records", "/v2/objects/{object}/records/query"
RECORD = "/v2/objects/{object}/records/{record_id}"
NOTES, NOTE = "/v2/notes", "/v2/notes/{note_id}"
WEBHOOKS, WEBHOOK = "/v2/webhooks", "/v2/webhooks/{webhook_id}"
PEOPLE_FILE, LOG_FILE = "attio_people.json", "attio_writes.jsonl"
WORKSPACE_ID = "5c1d2e3f-0a1b-4c2d-8e3f-a0b1c2d3e4f5"
PEOPLE_OBJECT_ID = "97052eb9-e65e-443f-a297-f2d9a4a7f795"
COMPANIES_OBJECT_ID = "3f1e9c2a-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
# A path's object slug or ID -> the object it names.
OBJECTS = {
    "people": "people",
    PEOPLE_OBJECT_ID: "people",
    "companies": "companies",
    COMPANIES_OBJECT_ID: "companies",
}
WORKSPACE_SLUG = "sandbox"
API_TOKEN_ACTOR = {"type": "api-token", "id": "0b7e1a52-3c4d-4e5f-8a9b-0c1d2e3f4a5b"}
MEMBER_ACTOR = {"type": "workspace-member", "id": "50cf242c-7fa3-4cad-87d0-75b1af71c57b"}
FAULT_STATUSES = frozenset({429, 500, 502, 503})
WRITE_SHARE = 0.25  # Attio allows 25 writes/s against 100 reads/s
KINDS = (
    "query",
    "query_companies",
    "get",
    "create_record",
    "create_note",
    "list_notes",
    "get_note",
    "delete_note",
    "create_webhook",
    "get_webhook",
    "delete_webhook",
)
READ_KINDS = frozenset({"query", "query_companies", "get", "list_notes", "get_note"})
MAX_NOTES_LIMIT, DEFAULT_NOTES_LIMIT = 50, 10  # GET /v2/notes `limit` (spec)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
ATTRIBUTES = ("name", "email_addresses", "phone_numbers", "job_title", "lead_source", "company")
MULTI_VALUED = frozenset({"email_addresses", "phone_numbers"})
# Stable made-up attribute ids: a record.updated event names the attribute that changed.
ATTRIBUTE_IDS = {a: str(uuid.uuid5(uuid.UUID(PEOPLE_OBJECT_ID), a)) for a in ATTRIBUTES}
_LOOPBACK_HTTP = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")

# Per object, the attributes a query may sort or filter on, and the value field each compares by
# default. Attio has no updated_at: created_at is the only time a record carries.
QUERY_FIELDS: dict[str, dict[str, str | None]] = {
    "people": {
        "record_id": None,
        "created_at": None,
        "name": "full_name",
        "email_addresses": "email_address",
        "phone_numbers": "phone_number",
        "job_title": "value",
        "lead_source": "value",
    },
    "companies": {"record_id": None, "created_at": None, "name": "value", "domains": "domain"},
}

_SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())


def _request_validator(path: str, method: str) -> Draft202012Validator:
    body = _SPEC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator(body, format_checker=FormatChecker(("uuid",)))


_RECORD_VALIDATOR = _request_validator(RECORDS, "post")
_QUERY_VALIDATOR = _request_validator(QUERY, "post")
_NOTE_VALIDATOR = _request_validator(NOTES, "post")
_WEBHOOK_VALIDATOR = _request_validator(WEBHOOKS, "post")


class AttioError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = {401: "auth_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    body = {"status_code": status, "type": kind, "code": code, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validate(validator: Draft202012Validator, body: object) -> None:
    error = next(iter(sorted(validator.iter_errors(body), key=lambda e: e.json_path)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(body)"
        raise AttioError(
            400, "validation_type", f"Body payload validation error: {where}: {error.message}"
        )


def _timestamp(at: datetime) -> str:
    """Attio's nanosecond-precision UTC timestamps."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _parse_timestamp(value: str) -> datetime:
    # fromisoformat takes at most microseconds; Attio sends nanoseconds.
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00")
    parsed = datetime.fromisoformat(trimmed)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ---- deterministic people ----------------------------------------------------------------
_FIRST = (
    "Ada", "José", "Zoë", "Søren", "Łukasz", "Ngọc", "Amélie", "Björn", "Chloé", "Dmitri",
    "Émile", "Fatima", "Grace", "Hiroshi", "Ingrid", "Jürgen", "Kwame", "Leila", "Mateo", "Nadia",
    "Oluwaseun", "Priya", "Quentin", "Rosa", "Siobhán", "Tomás", "Uma", "Vikram", "Wei", "Yasmin",
)  # fmt: skip
_LAST = (
    "Lovelace", "García", "Müller", "Ólafsdóttir", "O'Brien", "Nguyễn", "Kowalski", "Smith",
    "Dubois", "Ivanova", "Tanaka", "Okafor", "Haddad", "Rossi", "Patel", "Andersson", "Costa",
    "Fernández", "Wójcik", "Kim", "Zhang 张", "Nakamura 中村", "Jones", "Schäfer", "Novák",
)  # fmt: skip
_DOMAINS = ("acme.example", "globex.example", "initech.example", "mail.example", "umbrella.example")
_TITLES = ("Office Manager", "CEO", "Sales Lead", "Nurse", "Director of Operations", "Founder")
_SOURCES = ("Referral", "Website", "Trade show", "Cold call")
_REGIONS = ("US", "US", "US", "CA", "GB", "DE", "FR", "BR", "JP", "IN", "AU", "MX")
_COMPANY_NAMES = (
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay Industries", "Stark Industries",
    "Wayne Enterprises", "Tyrell", "Nakatomi Trading", "Müller & Söhne", "Øresund Logistik",
    "Café Crème SARL", "Pied Piper", "Soylent", "Oceanic Airlines",
)  # fmt: skip


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _phone(rng: random.Random) -> dict[str, str]:
    region = rng.choice(_REGIONS)
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    national = str(example.national_number)
    number = example
    for _ in range(20):  # vary the subscriber digits, keeping only numbers libphonenumber accepts
        tail = "".join(rng.choice("0123456789") for _ in range(4))
        candidate = phonenumbers.parse(f"+{example.country_code}{national[:-4]}{tail}")
        if phonenumbers.is_valid_number(candidate):
            number = candidate
            break
    style = rng.choice(
        (phonenumbers.PhoneNumberFormat.NATIONAL, phonenumbers.PhoneNumberFormat.E164)
    )
    if region not in ("US", "CA"):  # a national format would lose the country elsewhere
        style = rng.choice((phonenumbers.PhoneNumberFormat.INTERNATIONAL, style))
    return {
        "original_phone_number": phonenumbers.format_number(number, style),
        "country_code": region,
        "phone_number": phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
    }


def _value(
    attribute_type: str, since: datetime, actor: dict, until: datetime | None = None, **fields: Any
) -> dict[str, Any]:
    return {
        "active_from": _timestamp(since),
        "active_until": _timestamp(until) if until else None,
        "created_by_actor": dict(actor),
        **fields,
        "attribute_type": attribute_type,
    }


def _email(address: str) -> dict[str, str]:
    local, _, domain = address.partition("@")
    return {
        "original_email_address": address,
        "email_address": address.lower(),
        "email_domain": domain.lower(),
        "email_root_domain": ".".join(domain.lower().split(".")[-2:]),
        "email_local_specifier": local.lower().split("+")[0],
    }


def generate_people(count: int, seed: int = 20240101) -> list[dict[str, Any]]:
    """`count` people in Attio's record shape, the same for the same arguments.

    Mix: 1-3 emails and phones, a few with none, some with a superseded (inactive) value, a few
    with a first name only, non-ASCII names, international numbers."""
    rng = random.Random(seed)
    at = datetime(2021, 1, 4, 9, 0, tzinfo=UTC)
    people = []
    for i in range(count):
        at += timedelta(minutes=rng.randint(1, 2880), microseconds=rng.randint(0, 999_999))
        people.append(_generated_person(rng, i, at))
    return people


def _generated_person(
    rng: random.Random, i: int, at: datetime, history: bool = True
) -> dict[str, Any]:
    """Person `i`, created `at`; with `history` some carry a number replaced 30 days later."""
    record_id, actor = _uuid(rng), rng.choice((API_TOKEN_ACTOR, MEMBER_ACTOR))
    first, last = rng.choice(_FIRST), ("" if i % 23 == 5 else rng.choice(_LAST))
    full = f"{first} {last}".strip()
    # From the index, not the generator: the values drawn after stay what they were.
    company = {"target_object": "companies", "target_record_id": _COMPANY_IDS[i % len(COMPANIES)]}
    values: dict[str, list[dict[str, Any]]] = {
        "name": [
            _value("personal-name", at, actor, first_name=first, last_name=last, full_name=full)
        ],
        "email_addresses": [],
        "phone_numbers": [],
        "job_title": [_value("text", at, actor, value=rng.choice(_TITLES))] if i % 3 else [],
        "lead_source": [_value("text", at, actor, value=rng.choice(_SOURCES))],
        "company": [] if i % 6 == 5 else [_value("record-reference", at, actor, **company)],
    }
    slug = re.sub(r"[^a-z]", "", first.lower().encode("ascii", "ignore").decode()) or "person"
    n_emails = 0 if i % 17 == 3 else rng.choice((1, 1, 1, 2, 3))
    n_phones = 0 if i % 13 == 7 else rng.choice((1, 1, 1, 2, 3))
    for n in range(n_emails):
        address = f"{slug}.{i}{'+work' if n == 2 else ''}{n or ''}@{rng.choice(_DOMAINS)}"
        values["email_addresses"].append(_value("email-address", at, actor, **_email(address)))
    for _ in range(n_phones):
        values["phone_numbers"].append(_value("phone-number", at, actor, **_phone(rng)))
    if history and i % 11 == 4 and n_phones:  # a number replaced later: the old one, inactive
        changed = at + timedelta(days=30)
        values["phone_numbers"][0]["active_until"] = _timestamp(changed)
        values["phone_numbers"].append(_value("phone-number", changed, actor, **_phone(rng)))
    return _record(record_id, at, values)


def _record(
    record_id: str,
    at: datetime,
    values: dict[str, list[dict[str, Any]]],
    object_id: str = PEOPLE_OBJECT_ID,
    kind: str = "person",
) -> dict:
    return {
        "id": {"workspace_id": WORKSPACE_ID, "object_id": object_id, "record_id": record_id},
        "created_at": _timestamp(at),
        "web_url": f"https://app.attio.com/{WORKSPACE_SLUG}/{kind}/{record_id}",
        "values": values,
    }


def _company(n: int) -> dict[str, Any]:
    """Company number n: a name and a domain, created before every generated person."""
    name = _COMPANY_NAMES[n]
    record_id = str(uuid.uuid5(uuid.UUID(COMPANIES_OBJECT_ID), name))
    at = datetime(2020, 6, 1, 9, 0, tzinfo=UTC) + timedelta(days=n)
    domain = f"{re.sub(r'[^a-z0-9]+', '', name.lower()) or f'company{n}'}.example"
    values = {
        "name": [_value("text", at, MEMBER_ACTOR, value=name)],
        "domains": [_value("domain", at, MEMBER_ACTOR, domain=domain, root_domain=domain)],
    }
    return _record(record_id, at, values, COMPANIES_OBJECT_ID, "company")


# Never changed through the API, so the same on every start.
COMPANIES = {c["id"]["record_id"]: c for c in map(_company, range(len(_COMPANY_NAMES)))}
_COMPANY_IDS = list(COMPANIES)


# ---- queries -------------------------------------------------------------------------------
def _active(record: dict[str, Any], attribute: str) -> list[dict[str, Any]]:
    return [v for v in record["values"].get(attribute, []) if v["active_until"] is None]


def _normalize(attribute: str, value: object) -> object:
    if not isinstance(value, str):
        return value
    if attribute == "email_addresses":
        return value.lower()
    if attribute == "phone_numbers":
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            return value
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return value


def _compared(
    record: dict[str, Any], object_slug: str, attribute: str, field: str | None = None
) -> list[object]:
    """The values a filter or sort on `attribute` sees (active values only)."""
    if attribute == "record_id":
        return [record["id"]["record_id"]]
    if attribute == "created_at":
        return [record["created_at"]]
    key = field or QUERY_FIELDS[object_slug][attribute]
    return [_normalize(attribute, v.get(key)) for v in _active(record, attribute)]


def _condition(values: list[object], operator: str, operand: object, attribute: str) -> bool:
    if operator == "$not_empty":
        return bool(values) == bool(operand)
    if operator == "$in":
        if not isinstance(operand, list):
            raise AttioError(400, "filter_error", f"$in on {attribute!r} needs an array.")
        wanted = {_normalize(attribute, o) for o in operand}
        return any(v in wanted for v in values)
    checks: dict[str, Callable[[Any, Any], bool]] = {
        "$eq": lambda v, o: v == o,
        "$contains": lambda v, o: isinstance(v, str) and o in v,
        "$starts_with": lambda v, o: isinstance(v, str) and v.startswith(o),
        "$ends_with": lambda v, o: isinstance(v, str) and v.endswith(o),
        "$lt": lambda v, o: v < o,
        "$lte": lambda v, o: v <= o,
        "$gt": lambda v, o: v > o,
        "$gte": lambda v, o: v >= o,
    }
    if operator not in checks:
        raise AttioError(400, "filter_error", f"Unknown filter operator {operator!r}.")
    wanted = _normalize(attribute, operand)
    try:
        return any(v is not None and checks[operator](v, wanted) for v in values)
    except TypeError:  # e.g. $lt with a number against text values
        raise AttioError(
            400, "filter_error", f"Bad operand for {operator} on {attribute!r}."
        ) from None


def _matches(record: dict[str, Any], object_slug: str, flt: object) -> bool:
    if not isinstance(flt, dict):
        raise AttioError(400, "filter_error", "A filter must be an object.")
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list):
                raise AttioError(400, "filter_error", f"{key} needs an array of filters.")
            results = [_matches(record, object_slug, f) for f in cond]
            if not (all(results) if key == "$and" else any(results)):
                return False
        elif key == "$not":
            if _matches(record, object_slug, cond):
                return False
        elif key in QUERY_FIELDS[object_slug]:
            conds = cond if isinstance(cond, dict) else {"$eq": cond}
            for op, operand in conds.items():
                field = None
                if not op.startswith("$"):  # a value field, e.g. {"name": {"first_name": ...}}
                    field, (op, operand) = op, next(iter(_as_operators(operand).items()))
                if not _condition(_compared(record, object_slug, key, field), op, operand, key):
                    return False
        else:
            raise AttioError(400, "filter_error", f'Unknown attribute slug "{key}" in filter.')
    return True


def _as_operators(operand: object) -> dict[str, object]:
    return operand if isinstance(operand, dict) and operand else {"$eq": operand}


def _sorted(
    records: list[dict[str, Any]], object_slug: str, sorts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    ordered = sorted(records, key=lambda r: (r["created_at"], r["id"]["record_id"]))
    for sort in reversed(sorts):  # stable sorts applied last-key-first give lexicographic order
        if "attribute" not in sort:
            message = f"Sorting by path is not supported on {object_slug}."
            raise AttioError(400, "filter_error", message)
        attribute = sort["attribute"]
        if attribute not in QUERY_FIELDS[object_slug]:
            raise AttioError(400, "filter_error", f'Unknown attribute slug "{attribute}" in sorts.')
        field = sort.get("field")

        def key(r: dict[str, Any], attribute: str = attribute, field: str | None = field) -> tuple:
            values = [v for v in _compared(r, object_slug, attribute, field) if v is not None]
            return (not values, values[0] if values else "")

        ordered.sort(key=key, reverse=sort["direction"] == "desc")
    return ordered


def _loopback_as_https(body: object) -> object:
    """`body` with an http target on loopback read as https, for the schema's https pattern."""
    data = body.get("data") if isinstance(body, dict) else None
    url = data.get("target_url") if isinstance(data, dict) else None
    if isinstance(url, str) and _LOOPBACK_HTTP.match(url):
        return {**body, "data": {**data, "target_url": "https" + url.removeprefix("http")}}
    return body


def _markdown_to_plaintext(content: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", content)
    text = re.sub(r"^#{1,3}\s+", "", text, flags=re.MULTILINE)
    return re.sub(r"(\*\*|__|~~|==|\*|_)", "", text)


def sign(secret: str, raw_body: bytes) -> str:
    """Attio-Signature: hex HMAC-SHA256 of the raw body, keyed with the webhook secret."""
    return hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def _signed(webhook: dict[str, Any], events: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """A delivery's raw body and headers; the Idempotency-Key stays the same on a retry."""
    raw = json.dumps({"webhook_id": webhook["id"]["webhook_id"], "events": events}).encode()
    signature = sign(webhook["secret"], raw)
    headers = {
        "Content-Type": "application/json",
        "Attio-Signature": signature,
        "X-Attio-Signature": signature,
        "Idempotency-Key": str(uuid.uuid4()),
    }
    return raw, headers


def _takes(subscription: dict[str, Any], event: dict[str, Any]) -> bool:
    """The subscription's event type, and its filter: `$and`/`$or` of `equals`/`not_equals`
    on the event's fields in dot notation (`id.object_id`)."""
    flt = subscription["filter"]
    if subscription["event_type"] != event["event_type"]:
        return False
    if flt is None:
        return True
    results = (_holds(condition, event) for condition in flt.get("$and", flt.get("$or", [])))
    return all(results) if "$and" in flt else any(results)


def _holds(condition: dict[str, str], event: dict[str, Any]) -> bool:
    value: Any = event
    for part in condition["field"].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return (value == condition["value"]) == (condition["operator"] == "equals")


def _event(
    event_type: str,
    record_id: str,
    attribute: str | None = None,
    duplicate: str | None = None,
    actor: dict[str, str] = MEMBER_ACTOR,
) -> dict[str, Any]:
    """A `record.*` event as Attio sends it: ids only, made by `actor` (a workspace member,
    unless the API token made the change)."""
    ids = {"workspace_id": WORKSPACE_ID, "object_id": PEOPLE_OBJECT_ID, "record_id": record_id}
    if attribute is not None:
        ids["attribute_id"] = ATTRIBUTE_IDS[attribute]
    event: dict[str, Any] = {"event_type": event_type, "id": ids}
    if duplicate is not None:
        event |= {"duplicate_object_id": PEOPLE_OBJECT_ID, "duplicate_record_id": duplicate}
    return {**event, "actor": dict(actor)}


# ---- people changes ------------------------------------------------------------------------
def _invalid(message: str) -> AttioError:
    return AttioError(400, "validation_type", message)


def _written(
    fields: object, at: datetime, actor: dict[str, str] = MEMBER_ACTOR
) -> dict[str, list[dict[str, Any]]]:
    """The active values a change writes, per attribute slug. A field is one value or a list of
    them: `name` {first_name, last_name, full_name?}, `email_addresses` strings,
    `phone_numbers` strings or {original_phone_number, country_code}, `job_title` and
    `lead_source` strings, `company` a company's record id or {target_object: "companies",
    target_record_id}; null or [] clears the attribute."""
    if not isinstance(fields, dict):
        raise _invalid("fields must be a JSON object.")
    written = {}
    for slug, raw in fields.items():
        if slug not in ATTRIBUTES:
            raise _invalid(f'Unknown attribute slug "{slug}"; known: {", ".join(ATTRIBUTES)}.')
        items = raw if isinstance(raw, list) else [] if raw is None else [raw]
        if len(items) > 1 and slug not in MULTI_VALUED:
            raise _invalid(f'"{slug}" takes a single value.')
        written[slug] = [_written_value(slug, item, at, actor) for item in items]
    return written


def _written_value(
    slug: str, item: object, at: datetime, actor: dict[str, str] = MEMBER_ACTOR
) -> dict[str, Any]:
    if slug == "name":
        parts = item if isinstance(item, dict) else {}
        first, last = parts.get("first_name", ""), parts.get("last_name", "")
        full = parts.get("full_name") or f"{first} {last}".strip()
        if not all(isinstance(p, str) for p in (first, last, full)) or not full:
            raise _invalid("A name is {first_name, last_name, full_name?} with some text.")
        return _value("personal-name", at, actor, first_name=first, last_name=last, full_name=full)
    if slug == "email_addresses":
        if not isinstance(item, str) or "@" not in item.strip("@"):
            raise _invalid(f"{item!r} is not an email address.")
        return _value("email-address", at, actor, **_email(item))
    if slug == "phone_numbers":
        return _value("phone-number", at, actor, **_written_phone(item))
    if slug == "company":
        return _value("record-reference", at, actor, **_written_reference(item))
    if not isinstance(item, str):
        raise _invalid(f'"{slug}" is text.')
    return _value("text", at, actor, value=item)


def _written_reference(item: object) -> dict[str, str]:
    target = item
    if isinstance(item, dict) and item.get("target_object") in ("companies", COMPANIES_OBJECT_ID):
        target = item.get("target_record_id")
    if not isinstance(target, str) or target not in COMPANIES:
        raise _invalid(f"{item!r} does not reference a record of companies.")
    return {"target_object": "companies", "target_record_id": target}


def _written_phone(item: object) -> dict[str, str]:
    original, region = item, None
    if isinstance(item, dict):
        original, region = item.get("original_phone_number"), item.get("country_code")
    try:
        if not isinstance(original, str) or not isinstance(region, str | None):
            raise phonenumbers.NumberParseException(0, "not text")
        number = phonenumbers.parse(original, region)
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise _invalid(f"{item!r} is not a valid phone number.")
    return {
        "original_phone_number": original,
        "country_code": phonenumbers.region_code_for_number(number),
        "phone_number": phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
    }


# The API's write forms that the admin `fields` take unwrapped: a text value may be sent as
# {"value": text}, an email address as {"email_address": address}.
_WRAPPED_AS = {"email_addresses": "email_address", "job_title": "value", "lead_source": "value"}
_SLUG_OF = {attribute_id: slug for slug, attribute_id in ATTRIBUTE_IDS.items()}


def _api_fields(values: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A record create's `values` (keyed by attribute slug or ID, each an array of values in
    the attribute type's write form) as `_written` takes them, keyed by slug."""
    fields: dict[str, list[Any]] = {}
    for key, items in values.items():
        slug = _SLUG_OF.get(key, key)
        if slug not in ATTRIBUTES:
            raise AttioError(404, "not_found", f'Cannot find attribute with slug/ID "{key}".')
        if slug in fields:
            raise _invalid(f'Attribute "{slug}" is given twice (by slug and by ID).')
        wrapped = _WRAPPED_AS.get(slug)
        fields[slug] = [
            item[wrapped] if isinstance(item, dict) and wrapped and set(item) == {wrapped} else item
            for item in items
        ]
    return fields


def _content(value: dict[str, Any]) -> dict[str, Any]:
    """A value without its bookkeeping: what says whether two values are the same."""
    bookkeeping = ("active_from", "active_until", "created_by_actor")
    return {k: v for k, v in value.items() if k not in bookkeeping}


class AttioState:
    """People (generated once, then read from the data dir), notes, webhooks and bookkeeping."""

    def __init__(
        self,
        data_dir: str | Path,
        api_key: str = "attio-sandbox-key",
        records: int = 500,
        rate_limit: float | None = 100.0,
        webhook_secret: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_key, self.webhook_secret = api_key, webhook_secret
        self.reads = TokenBuckets(rate_limit) if rate_limit else None
        self.writes = TokenBuckets(rate_limit * WRITE_SHARE) if rate_limit else None
        people_path = self.data_dir / PEOPLE_FILE
        if not people_path.exists():
            people_path.write_text(json.dumps(generate_people(records), ensure_ascii=False))
        self.people = {p["id"]["record_id"]: p for p in json.loads(people_path.read_text())}
        # Newest created_at ever held: a new record is created after it, even a deleted one.
        self._newest = max(
            (_parse_timestamp(p["created_at"]) for p in self.people.values()),
            default=datetime(1970, 1, 1, tzinfo=UTC),
        )
        self.notes: dict[str, dict[str, Any]] = {}  # by note_id, oldest first
        self.webhooks: dict[str, dict[str, Any]] = {}
        self._log_path = self.data_dir / LOG_FILE
        if self._log_path.exists():
            for line in self._log_path.read_text().splitlines():
                self._apply(json.loads(line))
        self.faults = FaultQueue()
        self.delivery = WebhookDelivery()
        self._rng = random.Random(len(self.people))
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()

    def _apply(self, entry: dict[str, Any]) -> None:
        if "note" in entry:
            self.notes[entry["note"]["id"]["note_id"]] = entry["note"]
        elif "note_deleted" in entry:
            self.notes.pop(entry["note_deleted"], None)
        elif "webhook" in entry:
            self.webhooks[entry["webhook"]["id"]["webhook_id"]] = entry["webhook"]
        elif "webhook_deleted" in entry:
            self.webhooks.pop(entry["webhook_deleted"], None)
        elif "person" in entry:
            person = entry["person"]
            self.people[person["id"]["record_id"]] = person
            self._newest = max(self._newest, _parse_timestamp(person["created_at"]))
        else:
            self.people.pop(entry["person_deleted"], None)

    def record(self, entry: dict[str, Any]) -> None:
        """Apply a write and append it to the data dir's log, so a restart keeps it."""
        self._apply(entry)
        with self._log_path.open("a") as log_file:
            log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def note(self, note_id: str) -> dict[str, Any]:
        if not _UUID.fullmatch(note_id):
            raise AttioError(400, "validation_type", "note_id must be a UUID.")
        note = self.notes.get(note_id)
        if note is None:
            raise AttioError(404, "not_found", f'Note with ID "{note_id}" was not found.')
        return note

    def person(self, record_id: str) -> dict[str, Any]:
        person = self.people.get(record_id)
        if person is None:
            raise AttioError(404, "not_found", f'Record with ID "{record_id}" not found.')
        return person

    # ---- people changes: each returns the person and the events it causes -----------------
    def _next_created_at(self) -> datetime:
        return max(datetime.now(UTC), self._newest + timedelta(microseconds=1))

    def create_person(
        self, fields: object, by_api_token: bool = False
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A new record created after every other. An admin create (a workspace member's) is
        generated where `fields` say nothing; one `by_api_token` (`POST .../records`) holds
        only `fields`, made by the token, and is refused when an email address in it is
        another person's (email_addresses is unique on people)."""
        at = self._next_created_at()
        actor = API_TOKEN_ACTOR if by_api_token else MEMBER_ACTOR
        written = _written(fields, at, actor)
        if by_api_token:
            person = _record(str(uuid.uuid4()), at, {slug: [] for slug in ATTRIBUTES})
            self._check_unique_emails(written.get("email_addresses", []))
        else:
            person = _generated_person(self._rng, len(self.people), at, history=False)
        person["values"].update(written)
        self.record({"person": person})
        return person, [_event("record.created", person["id"]["record_id"], actor=actor)]

    def _check_unique_emails(self, values: list[dict[str, Any]]) -> None:
        wanted = {v["email_address"] for v in values}
        for other in self.people.values():
            taken = wanted & {v["email_address"] for v in _active(other, "email_addresses")}
            if taken:
                message = (
                    f'Uniqueness violation: email_addresses "{min(taken)}" is already held by '
                    f'record "{other["id"]["record_id"]}".'
                )
                raise AttioError(400, "uniqueness_conflict", message)

    def update_person(
        self, record_id: str, fields: object
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """`fields` written (none: a generated new name and phone); the values they replace
        stay, inactive. One record.updated per attribute that changed."""
        person, at = copy.deepcopy(self.person(record_id)), datetime.now(UTC)
        written = _written(fields, at) if fields else self._generated_change(person, at)
        changed = []
        for slug, values in written.items():
            old = _active(person, slug)
            if [_content(v) for v in old] == [_content(v) for v in values]:
                continue
            for value in old:
                value["active_until"] = _timestamp(at)
            person["values"][slug] = [*person["values"].get(slug, []), *values]
            changed.append(slug)
        if changed:
            self.record({"person": person})
        return person, [_event("record.updated", record_id, attribute=a) for a in changed]

    def _generated_change(
        self, person: dict[str, Any], at: datetime
    ) -> dict[str, list[dict[str, Any]]]:
        names = {v["full_name"] for v in _active(person, "name")}
        phones = {v["phone_number"] for v in _active(person, "phone_numbers")}
        while True:
            first, last, phone = (
                self._rng.choice(_FIRST),
                self._rng.choice(_LAST),
                _phone(self._rng),
            )
            if f"{first} {last}" not in names and phone["phone_number"] not in phones:
                break
        name = {"first_name": first, "last_name": last, "full_name": f"{first} {last}"}
        return {
            "name": [_value("personal-name", at, MEMBER_ACTOR, **name)],
            "phone_numbers": [_value("phone-number", at, MEMBER_ACTOR, **phone)],
        }

    def delete_person(self, record_id: str) -> list[dict[str, Any]]:
        self.person(record_id)
        self.record({"person_deleted": record_id})
        return [_event("record.deleted", record_id)]

    def merge_people(
        self, record_id: str, into: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Merge `record_id` into `into` as Attio does now: a new record holds `into`'s values
        and the other's it lacks; both originals are gone; one record.merged per original."""
        if record_id == into:
            raise _invalid("A record cannot be merged with itself.")
        secondary, primary = self.person(record_id), self.person(into)
        values = {}
        for slug in ATTRIBUTES:
            kept = copy.deepcopy(_active(primary, slug))
            seen = [_content(v) for v in kept]
            added = [copy.deepcopy(v) for v in _active(secondary, slug) if _content(v) not in seen]
            values[slug] = [*kept, *added] if slug in MULTI_VALUED else kept or added[:1]
        merged = _record(str(uuid.uuid4()), self._next_created_at(), values)
        for entry in ({"person": merged}, {"person_deleted": record_id}, {"person_deleted": into}):
            self.record(entry)
        new_id = merged["id"]["record_id"]
        return merged, [_event("record.merged", new_id, duplicate=d) for d in (record_id, into)]

    def deliveries_of(self, events: list[dict[str, Any]]) -> BackgroundTasks:
        """The sends of `events`, one per delivery, to every active webhook that takes them,
        as tasks to run once the answer that made the change is out."""
        tasks = BackgroundTasks()
        for event in events:
            for webhook in self.webhooks.values():
                if webhook["status"] == "active" and any(
                    _takes(s, event) for s in webhook["subscriptions"]
                ):
                    raw, headers = _signed(webhook, [event])
                    tasks.add_task(self.delivery.send, webhook["target_url"], raw, headers)
        return tasks

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_kind.values()),
            "byKind": {k: self.by_kind[k] for k in KINDS},
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "people": len(self.people),
            "companies": len(COMPANIES),
            "notes": len(self.notes),
            "webhooks": len(self.webhooks),
            "pendingFaults": self.faults.pending,
        }


def _int_param(query: Any, name: str, default: int, least: int, most: int | None) -> int:
    """An integer query parameter within [least, most], as the spec bounds it."""
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < least or (most is not None and int(raw) > most):
        bound = f"between {least} and {most}" if most is not None else f">= {least}"
        raise AttioError(400, "validation_type", f"{name} must be an integer {bound}.")
    return int(raw)


async def _faulty(fault: Fault) -> Response | None:
    """The injected fault's answer, after its delay; None: the request's own answer."""
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.drop:
        return _Dropped()
    if fault.status == 429:
        headers = {"Retry-After": fault.retry_after or _retry_after(1.0)}
        return _error(429, "rate_limit_exceeded", "Rate limit exceeded.", headers)
    if fault.status is not None:
        return _error(fault.status, "internal_error", "Injected sandbox fault.")
    return None


class _Dropped(Response):
    """No answer: the status line goes out, then the connection closes before the body, so the
    client gets a transport error. Counted as status 0."""

    def __init__(self) -> None:
        super().__init__(status_code=0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1024")]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        if self.background is not None:  # e.g. the webhooks of a create whose answer is lost
            await self.background()
        # Returning with the body unsent makes uvicorn close the connection.


def _retry_after(wait: float) -> str:
    """Attio sends an HTTP date, rounded up so a client never comes back too early."""
    return formatdate(math.ceil(time.time() + max(wait, 1.0)), usegmt=True)


class _Api:
    def __init__(self, state: AttioState) -> None:
        self.state = state

    async def serve(
        self, request: Request, kind: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # A fault may name the kinds it answers; an afterWrite one answers once the request was
        # served (a note is written, the client cannot know), a drop one closes the connection.
        fault = self.state.faults.take(kind)
        response = None
        if fault is not None and not fault.after_write:
            response = await _faulty(fault)
        if response is None:
            response = await self._guarded(request, kind, handler)
            if fault is not None and fault.after_write:
                served = response
                response = await _faulty(fault) or served
                # What the served request set off (a create's webhooks) still happens.
                response.background = served.background
        self.state.by_kind[kind] += 1
        self.state.by_status[response.status_code] += 1
        return response

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":  # Attio accepts the token as username, empty password
            try:
                credentials = base64.b64decode(credentials).decode().removesuffix(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.encode(), self.state.api_key.encode())

    async def _guarded(
        self, request: Request, kind: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not self._authorized(request):
            return _error(401, "unauthorized", "Invalid or missing API token.")
        buckets = self.state.reads if kind in READ_KINDS else self.state.writes
        if buckets is not None and (wait := buckets.acquire(self.state.api_key)):
            headers = {"Retry-After": _retry_after(wait)}
            return _error(429, "rate_limit_exceeded", "Rate limit exceeded.", headers)
        try:
            return await handler(request)
        except AttioError as exc:
            return _error(exc.status, exc.code, exc.message)
        except Exception:
            log.exception("attio sandbox handler failed")
            return _error(500, "internal_error", "Internal server error.")

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError:
            raise AttioError(400, "validation_type", "Body is not valid JSON.") from None

    async def _body(self, request: Request, validator: Draft202012Validator) -> dict[str, Any]:
        body = await self._json(request)
        _validate(validator, body)
        return body

    @staticmethod
    def _object(request: Request, served: tuple[str, ...] = ("people",)) -> str:
        """The object the path names by slug or ID, when the route serves it."""
        slug = request.path_params["object"]
        if OBJECTS.get(slug) not in served:
            raise AttioError(404, "not_found", f'Object with slug/ID "{slug}" not found.')
        return OBJECTS[slug]

    async def query(self, request: Request) -> Response:
        companies = OBJECTS.get(request.path_params["object"]) == "companies"
        return await self.serve(request, "query_companies" if companies else "query", self._query)

    async def _query(self, request: Request) -> Response:
        object_slug = self._object(request, ("people", "companies"))
        body = await self._body(request, _QUERY_VALIDATOR)
        limit, offset = body.get("limit", 500), body.get("offset", 0)
        # The spec types both as "number"; Attio only takes whole, non-negative ones.
        for name, value, least in (("limit", limit, 1), ("offset", offset, 0)):
            if value != int(value) or value < least:
                raise AttioError(400, "validation_type", f"{name} must be an integer >= {least}.")
        held = self.state.people if object_slug == "people" else COMPANIES
        records = list(held.values())
        if "filter" in body:
            records = [r for r in records if _matches(r, object_slug, body["filter"])]
        records = _sorted(records, object_slug, body.get("sorts", []))
        return JSONResponse({"data": records[int(offset) : int(offset) + int(limit)]})

    async def records(self, request: Request) -> Response:
        return await self.serve(request, "create_record", self._create_record)

    async def _create_record(self, request: Request) -> Response:
        """POST /v2/objects/people/records: a person holding the values sent, delivered as
        `record.created` once the answer is out, as an admin create is."""
        self._object(request)
        values = (await self._body(request, _RECORD_VALIDATOR))["data"]["values"]
        person, events = self.state.create_person(_api_fields(values), by_api_token=True)
        return JSONResponse({"data": person}, background=self.state.deliveries_of(events))

    async def get_record(self, request: Request) -> Response:
        return await self.serve(request, "get", self._get_record)

    async def _get_record(self, request: Request) -> Response:
        self._object(request)
        return JSONResponse({"data": self.state.person(request.path_params["record_id"])})

    async def notes(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.serve(request, "list_notes", self._list_notes)
        return await self.serve(request, "create_note", self._create_note)

    async def _list_notes(self, request: Request) -> Response:
        """GET /v2/notes: every note, or a parent object's or record's, oldest first."""
        query = request.query_params
        limit = _int_param(query, "limit", DEFAULT_NOTES_LIMIT, 1, MAX_NOTES_LIMIT)
        offset = _int_param(query, "offset", 0, 0, None)
        notes = list(self.state.notes.values())
        if (parent := query.get("parent_object")) is not None:
            if parent not in ("people", PEOPLE_OBJECT_ID):
                raise AttioError(404, "not_found", f'Object with slug/ID "{parent}" not found.')
            notes = [n for n in notes if n["parent_object"] == "people"]
        if (record_id := query.get("parent_record_id")) is not None:
            if not _UUID.fullmatch(record_id):
                raise AttioError(400, "validation_type", "parent_record_id must be a UUID.")
            notes = [n for n in notes if n["parent_record_id"] == record_id]
        return JSONResponse({"data": notes[offset : offset + limit]})

    async def note(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.serve(request, "get_note", self._get_note)
        return await self.serve(request, "delete_note", self._delete_note)

    async def _get_note(self, request: Request) -> Response:
        return JSONResponse({"data": self.state.note(request.path_params["note_id"])})

    async def _delete_note(self, request: Request) -> Response:
        note_id = self.state.note(request.path_params["note_id"])["id"]["note_id"]
        self.state.record({"note_deleted": note_id})
        return JSONResponse({})

    async def _create_note(self, request: Request) -> Response:
        data = (await self._body(request, _NOTE_VALIDATOR))["data"]
        if data["parent_object"] not in ("people", PEOPLE_OBJECT_ID):
            message = f'Object with slug/ID "{data["parent_object"]}" not found.'
            raise AttioError(404, "not_found", message)
        self.state.person(data["parent_record_id"])
        if data.get("meeting_id"):
            raise AttioError(404, "not_found", f'Meeting with ID "{data["meeting_id"]}" not found.')
        now = datetime.now(UTC)
        created_at = now
        if "created_at" in data:
            try:
                created_at = _parse_timestamp(data["created_at"])
            except ValueError:
                raise AttioError(400, "validation_type", "created_at is not a timestamp.") from None
            if not datetime(1970, 1, 1, tzinfo=UTC) <= created_at <= now:
                message = "created_at must be after 1970 and not in the future."
                raise AttioError(400, "validation_type", message)
        content = data["content"]
        markdown = data["format"] == "markdown"
        note = {
            "id": {"workspace_id": WORKSPACE_ID, "note_id": str(uuid.uuid4())},
            "parent_object": "people",
            "parent_record_id": data["parent_record_id"],
            "title": data["title"],
            "meeting_id": None,
            "content_plaintext": _markdown_to_plaintext(content) if markdown else content,
            "content_markdown": content,
            "tags": [],
            "created_by_actor": dict(API_TOKEN_ACTOR),
            "created_at": _timestamp(created_at),
        }
        self.state.record({"note": note})
        return JSONResponse({"data": note})

    async def webhooks(self, request: Request) -> Response:
        return await self.serve(request, "create_webhook", self._create_webhook)

    async def _create_webhook(self, request: Request) -> Response:
        body = await self._json(request)
        _validate(_WEBHOOK_VALIDATOR, _loopback_as_https(body))
        data = body["data"]
        webhook = {
            "target_url": data["target_url"],
            "subscriptions": data["subscriptions"],
            "id": {"workspace_id": WORKSPACE_ID, "webhook_id": str(uuid.uuid4())},
            "status": "active",
            "created_at": _timestamp(datetime.now(UTC)),
            "secret": self.state.webhook_secret or secrets.token_hex(32),
        }
        self.state.record({"webhook": webhook})
        return JSONResponse({"data": webhook})

    async def webhook(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.serve(request, "get_webhook", self._get_webhook)
        return await self.serve(request, "delete_webhook", self._delete_webhook)

    async def _get_webhook(self, request: Request) -> Response:
        webhook_id = request.path_params["webhook_id"]
        if webhook_id not in self.state.webhooks:
            raise AttioError(404, "not_found", f'Webhook with ID "{webhook_id}" was not found.')
        # The secret is shown only when the webhook is created.
        shown = {k: v for k, v in self.state.webhooks[webhook_id].items() if k != "secret"}
        return JSONResponse({"data": shown})

    async def _delete_webhook(self, request: Request) -> Response:
        webhook_id = request.path_params["webhook_id"]
        if webhook_id not in self.state.webhooks:
            raise AttioError(404, "not_found", "Webhook not found")
        self.state.record({"webhook_deleted": webhook_id})
        return JSONResponse({})


async def _admin_notes(request: Request) -> Response:
    return JSONResponse(list(request.app.state.sandbox.notes.values()))


def sandbox_activities(state: AttioState) -> list[dict[str, Any]]:
    """What was logged on people, one shape for every simulator: `person` is the connector's
    record key (the record id), `body` the note's plain text; Attio's only kind is the note."""
    return [
        {
            "id": note["id"]["note_id"],
            "kind": "note",
            "person": note["parent_record_id"],
            "subject": note["title"],
            "body": note["content_plaintext"],
            "record": note,
        }
        for note in state.notes.values()
    ]


async def _admin_activities(request: Request) -> Response:
    return JSONResponse({"activities": sandbox_activities(request.app.state.sandbox)})


async def _admin_webhooks(request: Request) -> Response:
    return JSONResponse(list(request.app.state.sandbox.webhooks.values()))


async def _admin_webhook_status(request: Request) -> Response:
    """Set a webhook's `status` (active, degraded, inactive) as Attio does after failed
    deliveries."""
    state: AttioState = request.app.state.sandbox
    webhook = state.webhooks.get(request.path_params["webhook_id"])
    status = json.loads(await request.body()).get("status")
    if webhook is None or status not in ("active", "degraded", "inactive"):
        return JSONResponse({"message": "no such webhook, or no such status"}, status_code=404)
    state.record({"webhook": {**webhook, "status": status}})
    return JSONResponse({"status": status})


async def _admin_emit(request: Request) -> Response:
    """Deliver `{"events": [...]}` signed with the webhook's secret, as Attio would, and answer
    the receiver's status; the body may name a `target_url` to use instead of the registered one.
    """
    state: AttioState = request.app.state.sandbox
    webhook = state.webhooks.get(request.path_params["webhook_id"])
    if webhook is None:
        return JSONResponse({"message": "no such webhook"}, status_code=404)
    spec = json.loads(await request.body())
    raw, headers = _signed(webhook, spec["events"])
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            spec.get("target_url") or webhook["target_url"], content=raw, headers=headers
        )
    return JSONResponse({"status": answer.status_code})


AdminHandler = Callable[[Request, AttioState], Awaitable[Response]]


def _admin(handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    """An admin people route: `?kind=` may only name people; errors answer `{"message"}`."""

    async def route(request: Request) -> Response:
        try:
            if request.query_params.get("kind") not in (None, "people", PEOPLE_OBJECT_ID):
                raise AttioError(400, "validation_type", "The sandbox holds people only.")
            return await handler(request, request.app.state.sandbox)
        except AttioError as exc:
            return JSONResponse({"message": exc.message}, status_code=exc.status)

    return route


async def _admin_body(request: Request, key: str) -> Any:
    try:
        return json.loads(await request.body() or b"{}")[key]
    except (ValueError, TypeError, KeyError):
        raise _invalid(f'The body must be a JSON object with "{key}".') from None


@_admin
async def _admin_people(request: Request, state: AttioState) -> Response:
    """GET: every person, oldest first; POST `{"fields"}`: a new one."""
    if request.method == "GET":
        return JSONResponse(_sorted(list(state.people.values()), "people", []))
    person, events = state.create_person(await _admin_body(request, "fields"))
    return JSONResponse(person, background=state.deliveries_of(events))


@_admin
async def _admin_person(request: Request, state: AttioState) -> Response:
    """PATCH `{"fields"}` or DELETE a person."""
    record_id = request.path_params["record_id"]
    if request.method == "DELETE":
        events = state.delete_person(record_id)
        return Response(status_code=204, background=state.deliveries_of(events))
    person, events = state.update_person(record_id, await _admin_body(request, "fields"))
    return JSONResponse(person, background=state.deliveries_of(events))


@_admin
async def _admin_merge(request: Request, state: AttioState) -> Response:
    """Merge the person into `{"into": id}`; answers the new record that replaces both."""
    into = str(await _admin_body(request, "into"))
    person, events = state.merge_people(request.path_params["record_id"], into)
    return JSONResponse(person, background=state.deliveries_of(events))


def build_app(state: AttioState) -> Starlette:
    api = _Api(state)
    app = Starlette(
        routes=[
            Route(RECORDS, api.records, methods=["POST"]),
            Route(QUERY, api.query, methods=["POST"]),
            Route(RECORD, api.get_record, methods=["GET"]),
            Route(NOTES, api.notes, methods=["GET", "POST"]),
            Route(NOTE, api.note, methods=["GET", "DELETE"]),
            Route(WEBHOOKS, api.webhooks, methods=["POST"]),
            Route(WEBHOOK, api.webhook, methods=["GET", "DELETE"]),
            Route("/_sandbox/notes", _admin_notes, methods=["GET"]),
            Route("/_sandbox/activities", _admin_activities, methods=["GET"]),
            Route("/_sandbox/webhooks", _admin_webhooks, methods=["GET"]),
            Route("/_sandbox/webhooks/{webhook_id}", _admin_webhook_status, methods=["PATCH"]),
            Route("/_sandbox/webhooks/{webhook_id}/emit", _admin_emit, methods=["POST"]),
            Route("/_sandbox/people", _admin_people, methods=["GET", "POST"]),
            Route("/_sandbox/people/{record_id}", _admin_person, methods=["PATCH", "DELETE"]),
            Route("/_sandbox/people/{record_id}/merge", _admin_merge, methods=["POST"]),
            *admin_routes(FAULT_STATUSES, reset_stats=False, fault_kinds=KINDS, write_faults=True),
            *delivery_routes(),
        ]
    )
    app.state.sandbox, app.state.delivery = state, state.delivery
    return app


class AttioSandbox(SandboxServer):
    """Runs the sandbox in-process on 127.0.0.1 (uvicorn in a background thread)."""

    name = "Attio"

    def __init__(
        self,
        data_dir: str | Path,
        api_key: str = "attio-sandbox-key",
        records: int = 500,
        rate_limit: float | None = 100.0,
        webhook_secret: str | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.api_key = Path(data_dir), api_key
        self._options = {
            "records": records,
            "rate_limit": rate_limit,
            "webhook_secret": webhook_secret,
        }

    def _create_state(self) -> AttioState:
        return AttioState(self.data_dir, self.api_key, **self._options)

    def _create_app(self, state: AttioState) -> Starlette:
        return build_app(state)

    def _close_state(self, state: AttioState) -> None:
        state.delivery.close()

    def notes(self) -> list[dict[str, Any]]:
        """The notes there are now (deleted ones are gone), oldest first."""
        return self._admin_request("GET", "notes").json()

    def webhooks(self) -> list[dict[str, Any]]:
        return self._admin_request("GET", "webhooks").json()

    def set_webhook_status(self, webhook_id: str, status: str) -> None:
        self._admin_request("PATCH", f"webhooks/{webhook_id}", json={"status": status})

    def emit_webhook(
        self, webhook_id: str, events: list[dict[str, Any]], target_url: str | None = None
    ) -> int:
        """Have the sandbox deliver a signed event; returns the receiver's HTTP status."""
        body = {"events": events, "target_url": target_url}
        return self._admin_request("POST", f"webhooks/{webhook_id}/emit", json=body).json()[
            "status"
        ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--records", type=int, default=500, help="people generated on first start")
    parser.add_argument("--token", default="attio-sandbox-key", help="the accepted API key")
    parser.add_argument("--rate-limit", type=float, default=100.0, help="reads/s per key")
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--webhook-secret", help="secret of every created webhook (else random)")
    args = parser.parse_args(argv)
    sandbox = AttioSandbox(
        args.data_dir,
        api_key=args.token,
        records=args.records,
        rate_limit=None if args.no_rate_limit else args.rate_limit,
        webhook_secret=args.webhook_secret,
        port=args.port,
    )
    serve_until_signalled(sandbox, "SANDBOX_READY")


if __name__ == "__main__":
    main()
