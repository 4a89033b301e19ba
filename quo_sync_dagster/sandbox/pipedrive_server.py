"""Strict local simulator of the Pipedrive API parts the sync uses.

v2 persons (list with opaque cursors, sorting, `updated_since`, batch read by `ids`, single
read, create), v2 organizations (listed and read by `ids` the same way: the organizations the
seeded persons belong to), v2 activities (create, read, PATCH), v1 call logs, v1 notes and v1
webhooks, per `crm-apis.md` section 1 and the v2 API reference. `GET /_sandbox/activities`
lists what was logged on people.
People can be created, changed, merged and deleted through `/_sandbox/people` while a sync runs
(and created through `POST /api/v2/persons`, as the sync does for unknown callers);
each change is delivered as the documented webhooks v2 payload to every matching v2 subscription
(HTTP Basic with the subscription's credentials), after the admin answer, through a
`WebhookDelivery` that can drop, duplicate, delay or reorder deliveries.
Auth is the `x-api-token` header (or the legacy `api_token` query); every token gets a rolling
2-second burst window (429 + `x-ratelimit-*` + Retry-After) and, when configured, a daily token
budget whose exhaustion yields Pipedrive's Cloudflare 403 HTML page instead of JSON.

Persons are seeded deterministically into SQLite in the data dir and survive restarts, as do
their changes (a deleted person is kept soft-deleted, so its id is never reused); created call
logs, activities, notes and webhooks are persisted too. Organizations never change, so they are
generated on every start. The server only binds 127.0.0.1;
`/_sandbox/*` admin endpoints are unauthenticated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import random
import re
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.sandbox.serving import (
    FaultQueue,
    SandboxServer,
    admin_routes,
    serve_until_signalled,
)
from quo_sync_dagster.sandbox.webhook_delivery import WebhookDelivery, delivery_routes

log = logging.getLogger(__name__)

DB_FILENAME = "pipedrive_sandbox.sqlite"
DEFAULT_TOKEN = "pipedrive-sandbox-token"
BURST_WINDOW_SECONDS = 2.0
DEFAULT_BURST = 40  # Growth plan, API token, per 2 s
FIRST_PERSON_ID = 1001
FIRST_ORG_ID, ORGANIZATIONS = 501, 40  # seeded persons belong to these, 3 in 4 of them
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, MAX_IDS = 100, 500, 100
MAX_WEBHOOKS = 40  # per user
SORT_FIELDS = ("id", "update_time", "add_time")
CALL_OUTCOMES = frozenset(
    {"connected", "no_answer", "left_message", "left_voicemail", "wrong_number", "busy"}
)
ACTIVITY_TYPES = frozenset({"call", "meeting", "task", "deadline", "email", "lunch"})
WEBHOOK_OBJECTS = frozenset(
    {"activity", "deal", "lead", "note", "organization", "person", "pipeline", "product"}
    | {"stage", "user", "*"}
)
WEBHOOK_ACTIONS = {
    "1.0": frozenset({"added", "updated", "deleted", "merged", "*"}),
    "2.0": frozenset({"create", "change", "delete", "*"}),
}
FAULT_STATUSES = frozenset({403, 429, 500, 502, 503})  # 403 = the Cloudflare HTML page
ERROR_INFO = "Please check developers.pipedrive.com"
# Token costs per request (v2 about half of v1), charged against the daily budget.
COSTS = {
    "list_persons": 10,
    "batch_persons": 10,
    "list_organizations": 10,
    "batch_organizations": 10,
    "get_person": 1,
    "create_person": 5,
    "create_activity": 5,
    "update_activity": 5,
    "get_activity": 1,
    "create_call_log": 10,
    "create_note": 10,
    "create_webhook": 10,
    "list_webhooks": 20,
    "delete_webhook": 6,
}
KINDS = tuple(COSTS)
CREATED = {"call_log": "callLogs", "activity": "activities", "note": "notes", "webhook": "webhooks"}
COMPANY_ID, ADMIN_USER_ID, USER_IDS = 987654, 1111, (1111, 1112, 1113)
# The person keys of a webhooks v2 `data`/`previous` (crm-apis.md 1.4): fewer than the API's.
WEBHOOK_PERSON_KEYS = ("id", "name", "first_name", "last_name", "owner_id", "org_id", "phones")
WEBHOOK_PERSON_KEYS += ("emails", "add_time", "update_time", "label_ids", "visible_to")
WEBHOOK_PERSON_KEYS += ("custom_fields",)

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_V1_TIME, _DATE, _HHMM = "%Y-%m-%d %H:%M:%S", "%Y-%m-%d", re.compile(r"([01]\d|2[0-3]):[0-5]\d")
_BLOCKED_PAGE = """<!DOCTYPE html>
<html lang="en-US"><head><title>Attention Required! | Cloudflare</title>
<meta charset="UTF-8" /></head>
<body><div id="cf-wrapper"><div id="cf-error-details">
<h1 data-translate="block_headline">Sorry, you have been blocked</h1>
<h2>You are unable to access pipedrive.com</h2>
<p>This website is using a security service to protect itself from online attacks.</p>
<p>Cloudflare Ray ID: <strong>{ray}</strong></p>
</div></div></body></html>
"""

Person = dict[str, Any]
Handler = Callable[[Request], Awaitable[Response]]


# ---- deterministic seed data ----------------------------------------------------------------
_BASE_TIME = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
_BULK_EDIT_TIME = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)  # many persons tie on update_time
_FIRST = ["Ana", "José", "Zoë", "Łukasz", "Mei", "Oluwaseun", "Siobhán", "Kenji", "Amara"]
_FIRST += ["Björn", "Chloé", "Дмитрий", "Ingrid", "Rahul", "Søren", "李", "Fatima", "Tom"]
_LAST = ["García", "Nguyen", "O'Brien", "Müller", "Okafor", "Tanaka", "Silva", "Kowalski"]
_LAST += ["Ng", "Øster", "Dubois", "Patel", "Смирнов", "王", "Haddad", "Smith-Jones"]
_ASCII = {"ł": "l", "ø": "o", "ß": "ss"}
_AREA = ["212", "415", "617", "312", "206", "303", "512", "646"]
_INTERNATIONAL = [
    "+44 20 7946 {:04d}",
    "+49 30 9018{:04d}",
    "+61 2 9374 {:04d}",
    "+33 1 4268 {:04d}",
]
_LABELS = ["mobile", "work", "home", "other"]
_ORG_STEMS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Nakatomi"]
_ORG_STEMS += ["Müller & Söhne", "Øresund Logistik"]
_ORG_KINDS = ["GmbH", "Ltd", "Inc.", "Trading Co."]
CUSTOM_FIELD_KEYS = {
    name: hashlib.sha1(f"pipedrive-sandbox:{name}".encode()).hexdigest()
    for name in ("lead_source", "customer_tier")
}


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(text: str) -> str:
    ascii_text = "".join(_ASCII.get(c, c) for c in text.lower())
    ascii_text = ascii_text.encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "", ascii_text) or "contact"


def _phone(i: int, n: int) -> str:
    """Stored as typed, like Pipedrive: mixed formats, some international."""
    if (i + n) % 10 == 9:
        return _INTERNATIONAL[(i // 10) % len(_INTERNATIONAL)].format((i * 7 + n) % 10000)
    area, exchange, line = _AREA[(i + n) % len(_AREA)], 200 + (i // 100) % 700, (i * 3 + n) % 10000
    style = (i + n) % 4
    if style == 0:
        return f"({area}) {exchange}-{line:04d}"
    if style == 1:
        return f"{area}.{exchange}.{line:04d}"
    if style == 2:
        return f"+1 {area} {exchange} {line:04d}"
    return f"{area}{exchange}{line:04d}"


def _items(values: list[str], i: int) -> list[dict[str, Any]]:
    primary = 1 if len(values) > 1 and i % 7 == 2 else 0  # primary is not always the first
    return [
        {"value": v, "primary": n == primary, "label": _LABELS[(i + n) % len(_LABELS)]}
        for n, v in enumerate(values)
    ]


def seed_person(i: int) -> Person:
    """Person number i (0-based) of the deterministic data set, in the v2 shape."""
    first: str | None = _FIRST[i % len(_FIRST)]
    last: str | None = _LAST[(i // len(_FIRST) + i) % len(_LAST)]
    if i % 97 == 13:  # no name at all
        first = last = None
    elif i % 11 == 5:  # first name only
        last = None
    name = " ".join(p for p in (first, last) if p)
    phone_count = 0 if i % 50 == 7 else 3 if i % 17 == 3 else 2 if i % 5 == 0 else 1
    local = f"{_slug(name)}{i}" if name else f"person{i}"
    email_count = 0 if i % 9 == 4 else 2 if i % 6 == 1 else 1
    emails = [f"{local}@{('example.com', 'example.org')[n]}" for n in range(email_count)]
    add_time = _BASE_TIME + timedelta(hours=3 * i, minutes=17 * (i % 7))
    if i % 25 == 0:
        update_time = _BULK_EDIT_TIME
    else:
        update_time = add_time + timedelta(days=(i * 7919) % 365, minutes=i % 60)
    return {
        "id": FIRST_PERSON_ID + i,
        "name": name,
        "first_name": first,
        "last_name": last,
        "owner_id": USER_IDS[i % 3],
        "org_id": None if i % 4 == 3 else FIRST_ORG_ID + i % ORGANIZATIONS,
        "add_time": _rfc3339(add_time),
        "update_time": _rfc3339(update_time),
        "emails": _items(emails, i),
        "phones": _items([_phone(i, n) for n in range(phone_count)], i),
        "is_deleted": False,
        "visible_to": 3,
        "label_ids": [5] if i % 8 == 0 else [],
        "picture_id": None,
        "custom_fields": {
            CUSTOM_FIELD_KEYS["lead_source"]: (None, "Website", "Referral", "Trade show")[i % 4],
            CUSTOM_FIELD_KEYS["customer_tier"]: i % 3 + 1 if i % 5 else None,
        },
    }


def seed_organization(n: int) -> dict[str, Any]:
    """Organization number n (0-based), in the v2 shape; all of them exist before any person."""
    add_time = _BASE_TIME - timedelta(days=7 * (ORGANIZATIONS - n))
    return {
        "id": FIRST_ORG_ID + n,
        "name": f"{_ORG_STEMS[n % len(_ORG_STEMS)]} {_ORG_KINDS[n // len(_ORG_STEMS)]}",
        "owner_id": USER_IDS[n % 3],
        "add_time": _rfc3339(add_time),
        "update_time": _rfc3339(add_time + timedelta(days=n % 5, hours=n)),
        "is_deleted": False,
        "visible_to": 3,
        "address": None,
        "label_ids": [],
        "custom_fields": {},
    }


# ---- state ----------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "ERR_SCHEMA_VALIDATION_FAILED"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _not_found(person_id: int) -> ApiError:
    return ApiError(404, f"Person {person_id} not found", "ERR_NOT_FOUND")


def _text_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _contact_items(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict)
        and set(item) <= {"value", "primary", "label"}
        and isinstance(item.get("value"), str)
        and item["value"].strip() != ""
        and isinstance(item.get("primary", False), bool)
        and item.get("label", "work") in _LABELS
        for item in value
    )


# What a person change may set: the writable v2 person fields, with their types.
PERSON_FIELDS: dict[str, Callable[[object], bool]] = {
    "name": lambda v: isinstance(v, str),
    "first_name": _text_or_none,
    "last_name": _text_or_none,
    "owner_id": lambda v: v in USER_IDS,
    "org_id": lambda v: v is None or _is_int(v),
    "visible_to": lambda v: v in (1, 3, 5, 7),
    "label_ids": lambda v: isinstance(v, list) and all(map(_is_int, v)),
    "custom_fields": lambda v: isinstance(v, dict) and set(v) <= set(CUSTOM_FIELD_KEYS.values()),
    "phones": _contact_items,
    "emails": _contact_items,
}


def _with_fields(person: Person, fields: dict[str, Any]) -> Person:
    """`person` with `fields` set the way the v2 API sets them: `name` and `first_name` /
    `last_name` follow each other, one item becomes primary, custom fields merge by key."""
    for name, value in fields.items():
        if name not in PERSON_FIELDS:
            raise _bad(f"Field '{name}' cannot be set; settable: {', '.join(PERSON_FIELDS)}")
        if not PERSON_FIELDS[name](value):
            raise _bad(f"Field '{name}' has an invalid type or format")
    changed = {**person, **fields}
    if "custom_fields" in fields:
        changed["custom_fields"] = {**person["custom_fields"], **fields["custom_fields"]}
    for name in ("phones", "emails"):
        items = [{"label": "work", "primary": False, **item} for item in changed[name]]
        if sum(item["primary"] for item in items) > 1:
            raise _bad(f"Only one item of '{name}' can be primary")
        if items and not any(item["primary"] for item in items):
            items[0]["primary"] = True  # documented: the first becomes primary
        changed[name] = [{k: item[k] for k in ("value", "primary", "label")} for item in items]
    if "name" in fields and not {"first_name", "last_name"} & set(fields):
        first, _, last = fields["name"].strip().partition(" ")
        changed.update(first_name=first or None, last_name=last.strip() or None)
    elif "name" not in fields and {"first_name", "last_name"} & set(fields):
        parts = (changed["first_name"], changed["last_name"])
        changed["name"] = " ".join(p for p in parts if p)
    return changed


def _generated_identity(rng: random.Random, person: Person | None) -> dict[str, Any]:
    """A new name and primary phone (both unlike `person`'s), for a generated create or edit."""
    while True:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        phone = _phone(rng.randrange(10**6), rng.randrange(4))
        old_phones = [p["value"] for p in person["phones"]] if person else []
        if person is None or (f"{first} {last}" != person["name"] and phone not in old_phones):
            break
    phones = [dict(p) for p in person["phones"]] if person else []
    primary = next((p for p in phones if p["primary"]), None)
    if primary is None:
        phones.insert(0, {"value": phone, "primary": True, "label": "mobile"})
    else:
        primary["value"] = phone
    return {"name": f"{first} {last}", "first_name": first, "last_name": last, "phones": phones}


def _webhook_person(person: Person) -> dict[str, Any]:
    return {key: person[key] for key in WEBHOOK_PERSON_KEYS}


def _changed_fields(before: Person, after: Person) -> dict[str, Any]:
    """A v2 `change` event's `previous`: the old values of the fields that changed."""
    return {
        key: before[key]
        for key in WEBHOOK_PERSON_KEYS
        if key != "update_time" and before[key] != after[key]
    }


def _merged(survivor: Person, loser: Person) -> Person:
    """What Pipedrive keeps of a merge: the survivor's values, its empty fields filled from the
    merged person's, and the merged person's phones and emails it lacked added."""
    merged = dict(survivor)
    if not merged["name"]:
        merged |= {key: loser[key] for key in ("name", "first_name", "last_name")}
    if merged["org_id"] is None:
        merged["org_id"] = loser["org_id"]
    merged["custom_fields"] = {
        key: value if value is not None else loser["custom_fields"].get(key)
        for key, value in survivor["custom_fields"].items()
    }
    for name in ("phones", "emails"):
        kept = {item["value"] for item in survivor[name]}
        added = [{**item, "primary": False} for item in loser[name] if item["value"] not in kept]
        merged[name] = [*survivor[name], *added]
        if merged[name] and not survivor[name]:
            merged[name][0]["primary"] = True
    return merged


@dataclass(frozen=True)
class PersonEvent:
    """One webhooks v2 event about a person, before it is addressed to a subscription."""

    action: str  # create | change | delete
    person_id: int
    data: dict[str, Any] | None
    previous: dict[str, Any] | None
    timestamp: str
    # merged_to_id / merged_from_id; change_source "api" for a change made through the API
    extra_meta: dict[str, str] = field(default_factory=dict)

    def payload(self, webhook: dict[str, Any], correlation_id: str, host: str) -> dict[str, Any]:
        meta = {
            "action": self.action,
            "entity": "person",
            "entity_id": str(self.person_id),
            "company_id": str(COMPANY_ID),
            "correlation_id": correlation_id,
            "id": str(uuid.uuid4()),
            "is_bulk_edit": False,
            "timestamp": self.timestamp,
            "type": "general",
            "user_id": str(ADMIN_USER_ID),
            "version": "2.0",
            "webhook_id": str(webhook["id"]),
            "webhook_owner_id": str(webhook["owner_id"]),
            "change_source": "app",  # made in the sandbox, as a user in the Pipedrive app would
            "attempt": 1,
            "host": host,
            "permitted_user_ids": [str(u) for u in USER_IDS],
            **self.extra_meta,
        }
        return {"meta": meta, "data": self.data, "previous": self.previous}

    def wanted_by(self, webhook: dict[str, Any]) -> bool:
        return (
            webhook["version"] == "2.0"
            and webhook["event_object"] in ("person", "*")
            and webhook["event_action"] in (self.action, "*")
        )


def _event_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class BurstWindow:
    """Pipedrive's burst limit: at most `limit` requests per token in any rolling 2 s."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sent: dict[str, deque[float]] = {}

    def acquire(self, token: str) -> tuple[bool, int, float]:
        """(allowed, remaining, seconds until the window frees a slot)."""
        now = time.monotonic()
        sent = self._sent.setdefault(token, deque())
        while sent and sent[0] <= now - BURST_WINDOW_SECONDS:
            sent.popleft()
        allowed = len(sent) < self.limit
        if allowed:
            sent.append(now)
        reset = (sent[0] + BURST_WINDOW_SECONDS - now) if sent else BURST_WINDOW_SECONDS
        return allowed, self.limit - len(sent), max(0.0, reset)


class PipedriveState:
    """Persons, created objects, counters, limits and faults of one sandbox server."""

    def __init__(
        self,
        data_dir: str | Path,
        api_token: str,
        records: int,
        rate_limit: int | None,
        daily_budget: int | None,
    ) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.api_token = api_token
        self.burst = BurstWindow(rate_limit) if rate_limit else None
        self.daily_budget = daily_budget
        self.faults = FaultQueue()
        self.delivery = WebhookDelivery()
        self._rng = random.Random(records)
        self._db = sqlite3.connect(
            data_dir / DB_FILENAME, check_same_thread=False, isolation_level=None
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS persons (id INTEGER PRIMARY KEY, body TEXT)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS objects "
            "(seq INTEGER PRIMARY KEY, kind TEXT, id TEXT, body TEXT, deleted INTEGER DEFAULT 0)"
        )
        if not self._db.execute("SELECT 1 FROM persons LIMIT 1").fetchone():
            self._db.executemany(
                "INSERT INTO persons (id, body) VALUES (?, ?)",
                ((p["id"], json.dumps(p)) for p in map(seed_person, range(records))),
            )
        stored = {pid: json.loads(b) for pid, b in self._db.execute("SELECT id, body FROM persons")}
        self.persons: dict[int, Person] = {
            pid: person for pid, person in stored.items() if not person["is_deleted"]
        }
        # Never changed, so generated rather than stored.
        self.organizations = {o["id"]: o for o in map(seed_organization, range(ORGANIZATIONS))}
        self._next_person_id = max(stored, default=FIRST_PERSON_ID - 1) + 1
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in CREATED}
        for kind, oid, body in self._db.execute(
            "SELECT kind, id, body FROM objects WHERE deleted = 0 ORDER BY seq"
        ):
            self.objects[kind][oid] = json.loads(body)
        (self._next_seq,) = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM objects"
        ).fetchone()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.blocked = 0
        self.tokens_used = 0
        self.budget_day = datetime.now(UTC).date()

    def count(self, kind: str, status: int, html: bool) -> None:
        self.by_kind[kind] += 1
        self.by_status[status] += 1
        self.blocked += html

    def budget_spent(self) -> bool:
        """True once today's tokens are used up; the budget resets at midnight UTC."""
        today = datetime.now(UTC).date()
        if today != self.budget_day:
            self.budget_day, self.tokens_used = today, 0
        return self.daily_budget is not None and self.tokens_used >= self.daily_budget

    def add(self, kind: str, body: dict[str, Any]) -> None:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._db.execute(
            "INSERT INTO objects (seq, kind, id, body) VALUES (?, ?, ?, ?)",
            (seq, kind, str(body["id"]), json.dumps(body)),
        )
        self.objects[kind][str(body["id"])] = body

    def replace(self, kind: str, body: dict[str, Any]) -> None:
        """Store a changed object in place: same id, same place in the listing."""
        self._db.execute(
            "UPDATE objects SET body = ? WHERE kind = ? AND id = ? AND deleted = 0",
            (json.dumps(body), kind, str(body["id"])),
        )
        self.objects[kind][str(body["id"])] = body

    def remove(self, kind: str, oid: str) -> bool:
        if self.objects[kind].pop(oid, None) is None:
            return False
        self._db.execute("UPDATE objects SET deleted = 1 WHERE kind = ? AND id = ?", (kind, oid))
        return True

    def next_id(self) -> int:
        return self._next_seq

    # ---- people changes: each returns what it did and the webhook events it causes ----------
    def _save_person(self, person: Person) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO persons (id, body) VALUES (?, ?)",
            (person["id"], json.dumps(person)),
        )
        if person["is_deleted"]:
            self.persons.pop(person["id"], None)
        else:
            self.persons[person["id"]] = person

    def person(self, person_id: int) -> Person:
        if person_id not in self.persons:
            raise _not_found(person_id)
        return self.persons[person_id]

    def create_person(
        self, fields: dict[str, Any], generated: bool = True
    ) -> tuple[Person, list[PersonEvent]]:
        """A new person with the next id. `generated` (an admin create, as a user in the app
        makes one): a generated name, phone and email where `fields` give none. Otherwise
        (`POST /api/v2/persons`): only what `fields` give, the rest empty, as the API does."""
        now = datetime.now(UTC)
        person_id = self._next_person_id
        person = seed_person(person_id - FIRST_PERSON_ID)
        if generated:
            person |= _generated_identity(self._rng, None)
            email = f"{_slug(person['name'])}{person_id}@example.com"
            person |= {"emails": [{"value": email, "primary": True, "label": "work"}]}
        else:
            person |= {"name": "", "first_name": None, "last_name": None, "org_id": None}
            person |= {"owner_id": ADMIN_USER_ID, "emails": [], "phones": [], "label_ids": []}
            person |= {"visible_to": 3, "custom_fields": dict.fromkeys(person["custom_fields"])}
        person |= {"add_time": _rfc3339(now), "update_time": _rfc3339(now)}
        person = _with_fields(person, fields)
        self._next_person_id += 1
        self._save_person(person)
        data, source = _webhook_person(person), {} if generated else {"change_source": "api"}
        return person, [PersonEvent("create", person_id, data, None, _event_time(now), source)]

    def update_person(
        self, person_id: int, fields: dict[str, Any]
    ) -> tuple[Person, list[PersonEvent]]:
        """`fields` set (none: a generated new name and phone); update_time moves to now."""
        now = datetime.now(UTC)
        before = self.person(person_id)
        after = _with_fields(before, fields or _generated_identity(self._rng, before))
        after["update_time"] = _rfc3339(now)
        self._save_person(after)
        previous = _changed_fields(before, after)
        event = PersonEvent("change", person_id, _webhook_person(after), previous, _event_time(now))
        return after, [event]

    def delete_person(self, person_id: int) -> list[PersonEvent]:
        before = self.person(person_id)
        self._save_person({**before, "is_deleted": True})
        last = _webhook_person(before)
        return [PersonEvent("delete", person_id, None, last, _event_time(datetime.now(UTC)))]

    def merge_persons(self, loser_id: int, survivor_id: int) -> tuple[Person, list[PersonEvent]]:
        """Merge `loser_id` into `survivor_id`: the loser's delete carries `merged_to_id`, the
        survivor's change `merged_from_id` (webhooks v2 have no merge action)."""
        if loser_id == survivor_id:
            raise _bad("A person cannot be merged with itself")
        loser, before = self.person(loser_id), self.person(survivor_id)
        now = datetime.now(UTC)
        after = _merged(before, loser) | {"update_time": _rfc3339(now)}
        self._save_person({**loser, "is_deleted": True, "update_time": _rfc3339(now)})
        self._save_person(after)
        when = _event_time(now)
        gone = _webhook_person(loser)
        return after, [
            PersonEvent("delete", loser_id, None, gone, when, {"merged_to_id": str(survivor_id)}),
            PersonEvent(
                "change",
                survivor_id,
                _webhook_person(after),
                _changed_fields(before, after),
                when,
                {"merged_from_id": str(loser_id)},
            ),
        ]

    def deliveries_of(self, events: list[PersonEvent], host: str) -> BackgroundTasks:
        """The sends of `events` to every matching subscription, as tasks to run once the
        answer that made the change is out. One correlation id per change, as in Pipedrive."""
        tasks, correlation_id = BackgroundTasks(), str(uuid.uuid4())
        for webhook in self.objects["webhook"].values():
            headers = {"Content-Type": "application/json"}
            if webhook["http_auth_user"] is not None:
                pair = f"{webhook['http_auth_user']}:{webhook['http_auth_password']}"
                headers["Authorization"] = f"Basic {base64.b64encode(pair.encode()).decode()}"
            for event in events:
                if event.wanted_by(webhook):
                    payload = event.payload(webhook, correlation_id, host)
                    body = json.dumps(payload, ensure_ascii=False).encode()
                    tasks.add_task(self.delivery.send, webhook["subscription_url"], body, headers)
        return tasks

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_kind.values()),
            "byKind": {k: self.by_kind[k] for k in (*KINDS, "unauthenticated")},
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "blocked": self.blocked,
            "tokensUsed": self.tokens_used,
            "dailyBudget": self.daily_budget,
            "persons": len(self.persons),
            "organizations": len(self.organizations),
            "created": {name: list(self.objects[k].values()) for k, name in CREATED.items()},
            "pendingFaults": self.faults.pending,
        }

    def close(self) -> None:
        self.delivery.close()
        self._db.close()


# ---- request parsing ------------------------------------------------------------------------
def _int_param(value: str, name: str) -> int:
    if not re.fullmatch("[0-9]+", value):
        raise _bad(f"Parameter '{name}' must be an integer")
    return int(value)


def _rfc3339_param(value: str, name: str) -> datetime:
    if not _RFC3339.fullmatch(value):
        raise _bad(f"Parameter '{name}' must be an RFC 3339 date-time, e.g. 2025-01-01T10:20:00Z")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise _bad(f"Parameter '{name}' is not a valid date-time") from None


def _encode_cursor(sort_by: str, direction: str, record: dict[str, Any]) -> str:
    raw = json.dumps({"field": sort_by, "dir": direction, "v": record[sort_by], "id": record["id"]})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, sort_by: str, direction: str) -> tuple[Any, int]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if raw["field"] == sort_by and raw["dir"] == direction and isinstance(raw["id"], int):
            return raw["v"], raw["id"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        pass
    raise _bad("Invalid cursor: it does not belong to this sort_by/sort_direction")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(body: dict[str, Any], types: dict[str, Callable[[object], bool]]) -> None:
    for name, ok in types.items():
        if name in body and body[name] is not None and not ok(body[name]):
            raise _bad(f"Field '{name}' has an invalid type or format")


def _v1_time(value: object) -> bool:
    try:
        return isinstance(value, str) and bool(datetime.strptime(value, _V1_TIME))
    except ValueError:
        return False


def _date(value: object) -> bool:
    try:
        return isinstance(value, str) and bool(datetime.strptime(value, _DATE))
    except ValueError:
        return False


def _string(value: object) -> bool:
    return isinstance(value, str)


def _hhmm(value: object) -> bool:
    return isinstance(value, str) and bool(_HHMM.fullmatch(value))


def _required(body: dict[str, Any], *names: str) -> None:
    for name in names:
        if body.get(name) in (None, ""):
            raise _bad(f"Field '{name}' is required")


# ---- the API --------------------------------------------------------------------------------
def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    body = {
        "success": False,
        "error": message,
        "code": code,
        "error_info": ERROR_INFO,
        "data": None,
        "additional_data": None,
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _unauthorized() -> Response:
    body = {"success": False, "error": "unauthorized access", "errorCode": 401}
    return JSONResponse({**body, "error_info": ERROR_INFO}, status_code=401)


def _blocked_page() -> Response:
    ray = hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:16]
    headers = {"server": "cloudflare", "cf-ray": f"{ray}-AMS"}
    return HTMLResponse(_BLOCKED_PAGE.format(ray=ray), status_code=403, headers=headers)


def _ok(data: Any, http_status: int = 200, **extra: Any) -> Response:
    return JSONResponse({"success": True, "data": data, **extra}, status_code=http_status)


def _listed(
    query: QueryParams, records: list[dict[str, Any]], filters: tuple[str, ...]
) -> Response:
    """A v2 list endpoint's page of `records` (persons, organizations): `limit`, `sort_by`,
    `sort_direction`, `ids` (a batch read), the integer `filters`, `updated_since` and
    `updated_until`, and the opaque `cursor`, each checked as Pipedrive checks it."""
    limit = _int_param(query.get("limit", str(LIST_LIMIT_DEFAULT)), "limit")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise _bad(f"Parameter 'limit' must be between 1 and {LIST_LIMIT_MAX}")
    sort_by, direction = query.get("sort_by", "id"), query.get("sort_direction", "asc")
    if sort_by not in SORT_FIELDS:
        raise _bad(f"Parameter 'sort_by' must be one of {', '.join(SORT_FIELDS)}")
    if direction not in ("asc", "desc"):
        raise _bad("Parameter 'sort_direction' must be one of asc, desc")
    if "ids" in query:
        parts = query["ids"].split(",")
        if len(parts) > MAX_IDS:
            raise _bad(f"Parameter 'ids' accepts at most {MAX_IDS} ids")
        wanted = {_int_param(p.strip(), "ids") for p in parts}
        records = [r for r in records if r["id"] in wanted]
    for name in filters:
        if name in query:
            value = _int_param(query[name], name)
            records = [r for r in records if r[name] == value]
    if "updated_since" in query:
        since = _rfc3339_param(query["updated_since"], "updated_since")
        records = [r for r in records if _parse(r["update_time"]) >= since]
    if "updated_until" in query:
        until = _rfc3339_param(query["updated_until"], "updated_until")
        records = [r for r in records if _parse(r["update_time"]) < until]
    # RFC 3339 in one format sorts as text; the id breaks ties so cursors are exact.
    records = sorted(records, key=lambda r: (r[sort_by], r["id"]), reverse=direction == "desc")
    if "cursor" in query:
        after = _decode_cursor(query["cursor"], sort_by, direction)
        if direction == "asc":
            records = [r for r in records if (r[sort_by], r["id"]) > after]
        else:
            records = [r for r in records if (r[sort_by], r["id"]) < after]
    page = records[:limit]
    next_cursor = _encode_cursor(sort_by, direction, page[-1]) if len(records) > limit else None
    return _ok(page, additional_data={"next_cursor": next_cursor})


class _Api:
    """Every handler runs on the server's single event loop, so state needs no locks."""

    def __init__(self, state: PipedriveState) -> None:
        self.state = state

    async def serve(self, request: Request, kind: str, handler: Handler) -> Response:
        response = await self._guarded(request, kind, handler)
        counted = "unauthenticated" if response.status_code == 401 else kind
        self.state.count(counted, response.status_code, response.media_type == "text/html")
        return response

    async def _guarded(self, request: Request, kind: str, handler: Handler) -> Response:
        state = self.state
        fault = state.faults.take()
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status == 403:
                return _blocked_page()
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                return _error(fault.status, "Injected sandbox fault", "ERR_SANDBOX", headers)
        token = request.headers.get("x-api-token") or request.query_params.get("api_token")
        if token != state.api_token:
            return _unauthorized()
        if state.budget_spent():
            return _blocked_page()
        limit_headers: dict[str, str] = {}
        if state.burst is not None:
            allowed, remaining, reset = state.burst.acquire(token)
            limit_headers = {
                "x-ratelimit-limit": str(state.burst.limit),
                "x-ratelimit-remaining": str(remaining),
                "x-ratelimit-reset": str(math.ceil(reset)),
            }
            if not allowed:
                headers = {**limit_headers, "Retry-After": str(max(1, math.ceil(reset)))}
                return _error(429, "Request over limit", "ERR_RATE_LIMIT", headers)
        state.tokens_used += COSTS[kind]
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc.status, exc.message, exc.code)
        except Exception:
            log.exception("sandbox handler failed")
            response = _error(500, "Internal server error", "ERR_INTERNAL")
        response.headers.update(limit_headers)
        if state.daily_budget is not None:
            left = max(0, state.daily_budget - state.tokens_used)
            response.headers["x-daily-ratelimit-token-remaining"] = str(left)
        return response

    # ---- persons ----------------------------------------------------------------------------
    async def persons(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.serve(request, "create_person", self._create_person)
        kind = "batch_persons" if "ids" in request.query_params else "list_persons"
        return await self.serve(request, kind, self._list_persons)

    async def person(self, request: Request) -> Response:
        return await self.serve(request, "get_person", self._get_person)

    async def _list_persons(self, request: Request) -> Response:
        persons = list(self.state.persons.values())
        return _listed(request.query_params, persons, ("owner_id", "org_id"))

    async def _get_person(self, request: Request) -> Response:
        person_id = _int_param(request.path_params["id"], "id")
        person = self.state.persons.get(person_id)
        if person is None:
            raise ApiError(404, "Person not found", "ERR_NOT_FOUND")
        return _ok(person)

    async def _create_person(self, request: Request) -> Response:
        """POST /api/v2/persons: `name` is required; `first_name`/`last_name` are not v2
        request fields (Pipedrive derives them from `name`); every other field is checked as
        the admin create checks it. The `create` webhook goes out after the answer."""
        body = await self._json_body(request)
        _required(body, "name")
        if not isinstance(body["name"], str) or not body["name"].strip():
            raise _bad("Field 'name' must be a non-empty string")
        for name in ("first_name", "last_name"):
            if name in body:
                raise _bad(f"Field '{name}' cannot be set; set 'name' instead")
        person, events = self.state.create_person(body, generated=False)
        response = _ok(person)
        response.background = self.state.deliveries_of(events, request.url.netloc)
        return response

    def _person_exists(self, person_id: object, field: str = "person_id") -> None:
        if not _is_int(person_id):
            raise _bad(f"Field '{field}' must be an integer")
        if person_id not in self.state.persons:
            raise ApiError(404, f"Person {person_id} not found", "ERR_NOT_FOUND")

    # ---- organizations ----------------------------------------------------------------------
    async def organizations(self, request: Request) -> Response:
        kind = "batch_organizations" if "ids" in request.query_params else "list_organizations"
        return await self.serve(request, kind, self._list_organizations)

    async def _list_organizations(self, request: Request) -> Response:
        organizations = list(self.state.organizations.values())
        return _listed(request.query_params, organizations, ("owner_id",))

    # ---- writes -----------------------------------------------------------------------------
    @staticmethod
    async def _json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _bad("Request body must be valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        return body

    async def call_logs(self, request: Request) -> Response:
        return await self.serve(request, "create_call_log", self._create_call_log)

    async def _create_call_log(self, request: Request) -> Response:
        body = await self._json_body(request)
        # Pipedrive only needs one of person/org/deal/lead; the sandbox insists on person_id
        # because the sync always logs calls on a person.
        _required(body, "person_id", "outcome", "to_phone_number", "start_time", "end_time")
        if body["outcome"] not in CALL_OUTCOMES:
            raise _bad(f"Field 'outcome' must be one of {', '.join(sorted(CALL_OUTCOMES))}")
        _check_types(
            body,
            {
                "to_phone_number": _string,
                "from_phone_number": _string,
                "start_time": _v1_time,
                "end_time": _v1_time,
                "duration": lambda v: isinstance(v, str) and bool(re.fullmatch("[0-9]+", v)),
                "subject": _string,
                "note": _string,
                "org_id": _is_int,
                "deal_id": _is_int,
                "user_id": _is_int,
                "lead_id": _string,
                "activity_id": _is_int,
            },
        )
        if body["end_time"] < body["start_time"]:
            raise _bad("Field 'end_time' must not be before 'start_time'")
        self._person_exists(body["person_id"])
        call_id = hashlib.md5(f"call-log-{self.state.next_id()}".encode()).hexdigest()
        keys = ("person_id", "org_id", "deal_id", "lead_id", "user_id", "activity_id", "subject")
        keys += ("duration", "outcome", "from_phone_number", "to_phone_number", "note")
        log_entry = {"id": call_id, **{k: body.get(k) for k in keys}}
        log_entry.update(start_time=body["start_time"], end_time=body["end_time"])
        log_entry.update(has_recording=False, company_id=987654)
        self.state.add("call_log", log_entry)
        return _ok(log_entry)

    async def activities(self, request: Request) -> Response:
        return await self.serve(request, "create_activity", self._create_activity)

    async def activity(self, request: Request) -> Response:
        if request.method == "PATCH":
            return await self.serve(request, "update_activity", self._update_activity)
        return await self.serve(request, "get_activity", self._get_activity)

    def _check_activity(self, body: dict[str, Any]) -> None:
        """What POST and PATCH /api/v2/activities both refuse."""
        if "person_id" in body:
            raise _bad(
                "'person_id' is a read-only field. "
                "Add a primary participant to set 'person_id' instead."
            )
        _check_types(
            body,
            {
                "subject": _string,
                "owner_id": _is_int,
                "deal_id": _is_int,
                "org_id": _is_int,
                "lead_id": _string,
                "due_date": _date,
                "due_time": _hhmm,
                "duration": lambda v: _hhmm(v) and v != "00:00",
                "busy": lambda v: isinstance(v, bool),
                "done": lambda v: isinstance(v, bool),
                "note": _string,
                "public_description": _string,
                "participants": lambda v: isinstance(v, list),
            },
        )
        if "type" in body and body["type"] not in ACTIVITY_TYPES:
            raise _bad(f"Field 'type' must be an activity type key, not {body['type']!r}")
        for n, item in enumerate(body.get("participants") or []):
            if not isinstance(item, dict) or not isinstance(item.get("primary", False), bool):
                raise _bad(f"Field 'participants[{n}]' must be {{person_id, primary}}")
            self._person_exists(item.get("person_id"), f"participants[{n}].person_id")
        if sum(bool(p.get("primary")) for p in body.get("participants") or []) > 1:
            raise _bad("Only one participant can be primary")

    @staticmethod
    def _participants(activity: dict[str, Any], participants: list[dict[str, Any]]) -> None:
        """Set the participants; the primary one is the activity's (read-only) person_id."""
        activity["participants"] = [
            {"person_id": p["person_id"], "primary": p.get("primary", False)} for p in participants
        ]
        primaries = [p["person_id"] for p in participants if p.get("primary")]
        activity["person_id"] = primaries[0] if primaries else None

    async def _create_activity(self, request: Request) -> Response:
        body = await self._json_body(request)
        self._check_activity(body)
        if body.get("deal_id") is not None and body.get("lead_id") is not None:
            raise _bad("Only one of 'deal_id' and 'lead_id' can be set")
        activity_type = body.get("type", "task")
        now = _rfc3339(datetime.now(UTC))
        activity = {
            "id": self.state.next_id(),
            "subject": body.get("subject") or activity_type.capitalize(),
            "type": activity_type,
            **{k: body.get(k) for k in ("owner_id", "deal_id", "lead_id", "org_id", "note")},
            **{k: body.get(k) for k in ("due_date", "due_time", "duration")},
            "done": body.get("done", False),
            "busy": body.get("busy", False),
            "add_time": now,
            "update_time": now,
        }
        self._participants(activity, body.get("participants") or [])
        self.state.add("activity", activity)
        return _ok(activity)

    def _existing_activity(self, request: Request) -> dict[str, Any]:
        activity_id = _int_param(request.path_params["id"], "id")
        activity = self.state.objects["activity"].get(str(activity_id))
        if activity is None:
            raise ApiError(404, "Activity not found", "ERR_NOT_FOUND")
        return activity

    async def _get_activity(self, request: Request) -> Response:
        return _ok(self._existing_activity(request))

    async def _update_activity(self, request: Request) -> Response:
        """PATCH: the fields given replace the activity's, the others stay."""
        activity = dict(self._existing_activity(request))
        body = await self._json_body(request)
        self._check_activity(body)
        writable = ("subject", "type", "owner_id", "deal_id", "lead_id", "org_id", "note")
        writable += ("due_date", "due_time", "duration", "done", "busy", "public_description")
        activity.update({k: body[k] for k in writable if k in body})
        if activity.get("deal_id") is not None and activity.get("lead_id") is not None:
            raise _bad("Only one of 'deal_id' and 'lead_id' can be set")
        if "participants" in body:
            self._participants(activity, body["participants"] or [])
        activity["update_time"] = _rfc3339(datetime.now(UTC))
        self.state.replace("activity", activity)
        return _ok(activity)

    async def notes(self, request: Request) -> Response:
        return await self.serve(request, "create_note", self._create_note)

    async def _create_note(self, request: Request) -> Response:
        body = await self._json_body(request)
        _required(body, "content")
        targets = ("deal_id", "person_id", "org_id", "lead_id", "project_id")
        if all(body.get(t) is None for t in targets):
            raise _bad(f"One of {', '.join(targets)} is required")
        _check_types(
            body,
            {
                "content": _string,
                "deal_id": _is_int,
                "org_id": _is_int,
                "project_id": _is_int,
                "lead_id": _string,
                "user_id": _is_int,
                "add_time": _v1_time,
                "pinned_to_person_flag": lambda v: v in (0, 1) or isinstance(v, bool),
            },
        )
        if body.get("person_id") is not None:
            self._person_exists(body["person_id"])
        now = datetime.now(UTC).strftime(_V1_TIME)
        note = {
            "id": self.state.next_id(),
            "content": body["content"],
            **{t: body.get(t) for t in targets},
            "user_id": body.get("user_id", 1111),
            "add_time": body.get("add_time") or now,
            "update_time": now,
            "active_flag": True,
            "pinned_to_person_flag": bool(body.get("pinned_to_person_flag", False)),
        }
        self.state.add("note", note)
        return _ok(note)

    # ---- webhooks ---------------------------------------------------------------------------
    async def webhooks(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.serve(request, "create_webhook", self._create_webhook)
        return await self.serve(request, "list_webhooks", self._list_webhooks)

    async def webhook(self, request: Request) -> Response:
        return await self.serve(request, "delete_webhook", self._delete_webhook)

    async def _create_webhook(self, request: Request) -> Response:
        body = await self._json_body(request)
        _required(body, "subscription_url", "event_action", "event_object", "name")
        _check_types(
            body,
            {
                "name": _string,
                "user_id": _is_int,
                "http_auth_user": _string,
                "http_auth_password": _string,
            },
        )
        try:
            url = urlsplit(str(body["subscription_url"]))
            url.port  # noqa: B018 - a bad port raises here, not at delivery
        except ValueError:
            raise _bad("Field 'subscription_url' is not a valid URL") from None
        # Pipedrive wants public HTTPS; plain http is let through for loopback receivers only.
        loopback = url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost")
        if not (url.scheme == "https" or loopback) or not url.hostname:
            raise _bad("Field 'subscription_url' must be an absolute https URL")
        version = body.get("version", "2.0")
        if version not in WEBHOOK_ACTIONS:
            raise _bad("Field 'version' must be '1.0' or '2.0'")
        if body["event_action"] not in WEBHOOK_ACTIONS[version]:
            allowed = ", ".join(sorted(WEBHOOK_ACTIONS[version]))
            raise _bad(f"Field 'event_action' must be one of {allowed} for version {version}")
        if body["event_object"] not in WEBHOOK_OBJECTS:
            raise _bad(f"Field 'event_object' must be one of {', '.join(sorted(WEBHOOK_OBJECTS))}")
        if (body.get("http_auth_user") is None) != (body.get("http_auth_password") is None):
            raise _bad("Fields 'http_auth_user' and 'http_auth_password' go together")
        if len(self.state.objects["webhook"]) >= MAX_WEBHOOKS:
            raise ApiError(403, f"A user can have at most {MAX_WEBHOOKS} webhooks", "ERR_LIMIT")
        webhook = {
            "id": self.state.next_id(),
            "company_id": 987654,
            "owner_id": 1111,
            "user_id": body.get("user_id", 1111),
            "event_action": body["event_action"],
            "event_object": body["event_object"],
            "subscription_url": body["subscription_url"],
            "version": version,
            "name": body["name"],
            "is_active": 1,
            "add_time": datetime.now(UTC).strftime(_V1_TIME),
            "remove_time": None,
            "type": "general",
            "http_auth_user": body.get("http_auth_user"),
            "http_auth_password": body.get("http_auth_password"),
            "last_delivery_time": None,
            "last_http_status": None,
        }
        self.state.add("webhook", webhook)
        return _ok(webhook, 201, status="ok")

    async def _list_webhooks(self, request: Request) -> Response:
        return _ok(list(self.state.objects["webhook"].values()), status="ok")

    async def _delete_webhook(self, request: Request) -> Response:
        webhook_id = str(_int_param(request.path_params["id"], "id"))
        if not self.state.remove("webhook", webhook_id):
            raise ApiError(404, "Webhook not found", "ERR_NOT_FOUND")
        return JSONResponse({"success": True, "status": "ok", "data": {"id": int(webhook_id)}})


def _parse(rfc3339: str) -> datetime:
    return datetime.fromisoformat(rfc3339)


# ---- admin: people changed while a sync runs --------------------------------------------------
Changed = tuple[Any, list[PersonEvent]]  # what an admin call answers, and the events it causes


class _PeopleAdmin:
    """`/_sandbox/people` (see `SandboxServer.people`): changes as a Pipedrive user makes them,
    each answered first and then delivered to the webhooks. Pipedrive has one kind: person."""

    def __init__(self, state: PipedriveState) -> None:
        self.state = state

    def route(self, change: Callable[[Request], Awaitable[Changed]]) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                kind = request.query_params.get("kind", "person")
                if kind.lower() != "person":
                    raise _bad(f"Pipedrive has persons only, not {kind!r}")
                content, events = await change(request)
            except ApiError as exc:
                return JSONResponse({"message": exc.message}, exc.status)
            tasks = self.state.deliveries_of(events, request.url.netloc)
            if content is None:
                return Response(status_code=204, background=tasks)
            return JSONResponse(content, background=tasks)

        return handler

    async def list_or_create(self, request: Request) -> Changed:
        if request.method == "GET":
            return sorted(self.state.persons.values(), key=lambda p: p["id"]), []
        return self.state.create_person(await _admin_fields(request))

    async def update_or_delete(self, request: Request) -> Changed:
        person_id = _int_param(request.path_params["id"], "id")
        if request.method == "DELETE":
            return None, self.state.delete_person(person_id)
        return self.state.update_person(person_id, await _admin_fields(request))

    async def merge(self, request: Request) -> Changed:
        into = (await _admin_body(request)).get("into")
        if not (_is_int(into) or isinstance(into, str)):
            raise _bad('Request body must be {"into": "<surviving person id>"}')
        loser_id = _int_param(request.path_params["id"], "id")
        return self.state.merge_persons(loser_id, _int_param(str(into), "into"))


async def _admin_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise _bad("Request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object")
    return body


async def _admin_fields(request: Request) -> dict[str, Any]:
    fields = (await _admin_body(request)).get("fields", {})
    if not isinstance(fields, dict):
        raise _bad('Request body must be {"fields": {...}}')
    return fields


def sandbox_activities(state: PipedriveState) -> list[dict[str, Any]]:
    """What was logged on people, one shape for every simulator: `person` is the connector's
    record key, `body` the text a person reads (HTML as stored), `kind` call or note."""
    found = []
    for kind, text_key in (("activity", "note"), ("call_log", "note"), ("note", "content")):
        for record in state.objects[kind].values():
            is_call = kind == "call_log" or record.get("type") == "call"
            found.append(
                {
                    "id": str(record["id"]),
                    "kind": "call" if is_call else "note",
                    "person": None if record.get("person_id") is None else str(record["person_id"]),
                    "subject": record.get("subject"),
                    "body": record.get(text_key) or "",
                    "record": record,
                }
            )
    return found


async def _admin_activities(request: Request) -> Response:
    return JSONResponse({"activities": sandbox_activities(request.app.state.sandbox)})


def build_app(state: PipedriveState) -> Starlette:
    api, admin = _Api(state), _PeopleAdmin(state)
    app = Starlette(
        routes=[
            Route("/api/v2/persons", api.persons, methods=["GET", "POST"]),
            Route("/api/v2/persons/{id}", api.person, methods=["GET"]),
            Route("/api/v2/organizations", api.organizations, methods=["GET"]),
            Route("/api/v2/activities", api.activities, methods=["POST"]),
            Route("/api/v2/activities/{id}", api.activity, methods=["GET", "PATCH"]),
            Route("/v1/callLogs", api.call_logs, methods=["POST"]),
            Route("/v1/notes", api.notes, methods=["POST"]),
            Route("/v1/webhooks", api.webhooks, methods=["GET", "POST"]),
            Route("/v1/webhooks/{id}", api.webhook, methods=["DELETE"]),
            Route("/_sandbox/people", admin.route(admin.list_or_create), methods=["GET", "POST"]),
            Route(
                "/_sandbox/people/{id}",
                admin.route(admin.update_or_delete),
                methods=["PATCH", "DELETE"],
            ),
            Route("/_sandbox/people/{id}/merge", admin.route(admin.merge), methods=["POST"]),
            Route("/_sandbox/activities", _admin_activities, methods=["GET"]),
            *admin_routes(FAULT_STATUSES),
            *delivery_routes(),
        ]
    )
    app.state.sandbox, app.state.delivery = state, state.delivery
    return app


class PipedriveSandbox(SandboxServer):
    """Runs the sandbox in-process on 127.0.0.1 (uvicorn in a background thread).

    `rate_limit` is the burst allowance per token per 2 s (None: off); `daily_budget` is the
    day's token allowance (None: unlimited), after which every request gets the 403 HTML page.
    `inject_fault(403)` answers with the Cloudflare HTML page too.
    """

    name = "Pipedrive"

    def __init__(
        self,
        data_dir: str | Path,
        api_token: str = DEFAULT_TOKEN,
        records: int = 500,
        rate_limit: int | None = DEFAULT_BURST,
        daily_budget: int | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.api_token = Path(data_dir), api_token
        self._options = {"records": records, "rate_limit": rate_limit, "daily_budget": daily_budget}

    def _create_state(self) -> PipedriveState:
        return PipedriveState(self.data_dir, self.api_token, **self._options)

    def _create_app(self, state: PipedriveState) -> Starlette:
        return build_app(state)

    def _close_state(self, state: PipedriveState) -> None:
        state.close()

    def reset_stats(self) -> None:
        self._admin_request("POST", "reset-stats")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--records", type=int, default=500, help="persons seeded on first start")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the accepted x-api-token")
    limits = parser.add_mutually_exclusive_group()
    limits.add_argument("--rate-limit", type=int, default=DEFAULT_BURST, help="requests per 2 s")
    limits.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--daily-budget", type=int, help="daily API tokens (default unlimited)")
    args = parser.parse_args(argv)
    sandbox = PipedriveSandbox(
        args.data_dir,
        api_token=args.token,
        records=args.records,
        rate_limit=None if args.no_rate_limit else args.rate_limit,
        daily_budget=args.daily_budget,
        port=args.port,
    )
    serve_until_signalled(sandbox, "SANDBOX_READY")


if __name__ == "__main__":
    main()
