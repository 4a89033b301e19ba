"""Strict local simulator of the Zoho CRM v8 API: Contacts, Leads and Accounts, Calls, Notes,
watch channels.

Enforces what real Zoho enforces and a lax fake would let through: the `Zoho-oauthtoken` auth
form, a mandatory `fields` list, `per_page` <= 200, `page` paging only up to record 2,000 (then
`page_token`), 204 with no body for an empty result, 429 without Retry-After, v8 body shapes for
Calls (create, and update by id), Notes and inserts (`POST /{module}`, the module's mandatory
field (Last_Name; an Account's Account_Name), field types and lengths checked per record). The
records are generated deterministically on first start and persisted in the data dir, as are
written calls, notes and channels (read them back through `GET /_sandbox/activities`). Binds
127.0.0.1 only; `/_sandbox/*` admin endpoints are unauthenticated. Every module is served the
same way; "people" below means records of any of them (an Account is a company).

People can be created, edited, merged and deleted through `/_sandbox/people` while a sync runs
(and inserted through the API, as the sync does for unknown callers).
Each change is reported, as the Notification API does, to every live watch channel whose events
cover it (`insert`/`update`/`delete`; a merge is an update of the survivor and a delete of the
other, which Zoho lists as deleted), after the admin answer, through a `WebhookDelivery` that
can drop, duplicate, delay or reorder deliveries. Deleted people are served by `/{module}/deleted`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.sandbox.quo_state import TokenBuckets
from quo_sync_dagster.sandbox.serving import (
    FaultQueue,
    SandboxServer,
    admin_routes,
    serve_until_signalled,
)
from quo_sync_dagster.sandbox.webhook_delivery import WebhookDelivery, delivery_routes

log = logging.getLogger(__name__)

API = "/crm/v8"
API_DOMAIN = "https://www.zohoapis.com"
PEOPLE_MODULES = ("Contacts", "Leads", "Accounts")  # the modules the sync reads
MANDATORY = {"Contacts": "Last_Name", "Leads": "Last_Name", "Accounts": "Account_Name"}
RELATED_TO_MODULES = ("Leads", "Accounts")  # what a call's What_Id may name here
WATCHABLE_MODULES = frozenset({"Contacts", "Leads", "Accounts", "Deals"})
WATCH_OPERATIONS = frozenset({"create", "edit", "delete", "all"})
SORT_FIELDS = frozenset({"id", "Created_Time", "Modified_Time"})
MAX_PER_PAGE = 200
PAGE_LIMIT = 2000  # `page` paging stops here; beyond it only `page_token` works
MAX_FIELDS = 50
MAX_IDS = 100
MAX_WRITE_RECORDS = 100
MAX_TEXTAREA = 32_000  # a Description textarea
TOKEN_TTL = timedelta(hours=24)
DEFAULT_CHANNEL_TTL = timedelta(hours=1)  # also what a too-distant channel_expiry falls back to
MAX_CHANNEL_TTL = timedelta(weeks=1)
FAULT_STATUSES = frozenset({429, 500, 502, 503})
ORG_TZ = timezone(timedelta(hours=5, minutes=30))  # Zoho answers in the org's offset
RECORDS_FILE, ACTIVITY_FILE = "zoho_records.json", "zoho_activity.json"
DELETED_FILE = "zoho_deleted.json"
# Fields Zoho sets itself: a change through the admin routes may not name them.
SYSTEM_FIELDS = frozenset(
    {"id", "Full_Name", "Created_Time", "Modified_Time", "Created_By", "Modified_By"}
)
WATCH_OPERATION = {"insert": "create", "update": "edit", "delete": "delete"}  # callback -> event
OWNER = {"name": "Pat Sandbox", "id": "3652397000000080001", "email": "pat@sandbox.example"}
_DURATION = re.compile(r"^(\d{1,4}):([0-5]\d)$")  # mm:ss, minutes may exceed 59
# What an insert may set, by field type (Zoho's field limits: a single line holds 255
# characters, a phone 30); any other settable field is a single line (text or picklist).
PHONE_FIELDS = frozenset({"Phone", "Mobile", "Home_Phone", "Other_Phone", "Fax"})
EMAIL_FIELDS = frozenset({"Email", "Secondary_Email"})
BOOLEAN_FIELDS = frozenset({"Email_Opt_Out"})
# On Contacts Account_Name is a lookup of the Account; on Accounts it is the name itself.
LOOKUP_FIELDS = {
    "Contacts": frozenset({"Owner", "Account_Name"}),
    "Leads": frozenset({"Owner"}),
    "Accounts": frozenset({"Owner", "Parent_Account"}),
}
# What Zoho sets on an inserted record that names none of them.
INSERT_DEFAULTS: dict[str, dict[str, Any]] = {
    "Contacts": {"Email_Opt_Out": False},
    "Leads": {"Email_Opt_Out": False, "Converted__s": False},
    "Accounts": {},
}
READ_ONLY_FIELDS = frozenset({"Converted__s"})  # Zoho sets it when a lead is converted
MAX_SINGLE_LINE, MAX_PHONE = 255, 30
_PHONE = re.compile(r"^\+?[0-9A-Za-z][0-9A-Za-z .()\-]*(?:[#;,][0-9A-Za-z]+)*$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]{2,22}$")

_FIRST = ["Jane", "José", "Zoë", "Łukasz", "Mei", "Oluwaseun", "Siobhán", "Kenji", "Ana", "Björn"]
_LAST = ["Doe", "García", "Nguyen", "O'Brien", "Müller", "Okafor", "田中", "Silva", "Kowalski"]
_COMPANIES = ["Acme", "Globex GmbH", "Initech", "Société Générale Démo", "Umbrella Ltd", "Stark"]
_TITLES = ["CEO", "Office Manager", "Head of Sales", "Nurse", "Paralegal", None]
_CITIES = [
    ("Austin", "TX", "78701", "United States"),
    ("München", "Bayern", "80331", "Germany"),
    ("London", None, "EC1A 1BB", "United Kingdom"),
    ("Bengaluru", "Karnataka", "560001", "India"),
]
_TIERS = ["Gold", "Silver", "Bronze", None]
_ACCOUNT_TYPES = ["Customer", "Prospect", "Partner", "Vendor", None]
_INDUSTRIES = ["Healthcare", "Legal", "Manufacturing", "Retail", None]

Record = dict[str, Any]
Handler = Callable[[Request], Awaitable[Response]]


class ZohoError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "details": self.details,
            "message": self.message,
            "status": "error",
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(ORG_TZ).isoformat(timespec="seconds")


def _parse_time(value: str, param: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:  # Zoho wants an explicit offset
        raise ZohoError(400, "INVALID_DATA", "invalid data", param_name=param)
    return moment


def _phone(i: int, salt: int) -> str | None:
    n = (i * 7 + salt) % 13
    if n == 0:
        return None
    k = (i * 37 + salt * 11) % 10_000
    return [
        f"+1 555 123 {k:04d}",
        f"(415) 555-{k:04d}",
        f"555-{k % 1000:03d}-{k:04d}",
        f"+44 20 7946 {k:04d}",
        f"+91 98765 {k:05d}",
        f"+49 30 {k:04d}820",
        f"+61 2 9374 {k:04d}",
        f"+81 3-{k % 9000 + 1000}-{k:04d}",
        f"212.555.{k:04d}",
        f"+1 (646) 555-{k:04d} ext. 12",
    ][n % 10]


def _full_name(first: str | None, last: str | None) -> str:
    return " ".join(part for part in (first, last) if part)


def _record_id(module: str, i: int) -> str:
    """Ids rise with the index and differ across modules, as Zoho's do within an org."""
    return f"3652397000{PEOPLE_MODULES.index(module) + 1}{i * 7 + 1:08d}"


def _account_name(i: int) -> str:
    """The first six are the companies generated Contacts name in their Account_Name lookup."""
    branch, k = divmod(i, len(_COMPANIES))
    company = _COMPANIES[k]
    return company if branch == 0 else f"{company} {_CITIES[i % len(_CITIES)][0]} {branch}"


def _account_ref(i: int) -> Record:
    """A lookup of Account i, as Zoho answers one: {name, id}."""
    return {"name": _account_name(i), "id": _record_id("Accounts", i)}


def _account(i: int) -> Record:
    """Account i: a company with a switchboard Phone (a few none, or only a Fax); ids rise with
    Created_Time, Modified_Time is scattered."""
    created = datetime(2023, 6, 1, tzinfo=UTC) + timedelta(minutes=211 * i)
    modified = created + timedelta(seconds=(i * 6007) % 40_000_000)
    city, state, zip_code, country = _CITIES[i % len(_CITIES)]
    return {
        "id": _record_id("Accounts", i),
        "Owner": OWNER,
        "Account_Name": _account_name(i),
        "Phone": _phone(i, 2),
        "Fax": _phone(i, 6) if i % 5 == 1 else None,
        "Account_Type": _ACCOUNT_TYPES[i % len(_ACCOUNT_TYPES)],
        "Industry": _INDUSTRIES[i % len(_INDUSTRIES)],
        "Parent_Account": _account_ref(i % len(_COMPANIES)) if i % 7 == 6 else None,
        "Billing_Street": f"{i % 700 + 10} Market St",
        "Billing_City": city,
        "Billing_State": state,
        "Billing_Code": zip_code,
        "Billing_Country": country,
        "Created_Time": _iso(created),
        "Modified_Time": _iso(modified),
        "Created_By": OWNER,
        "Modified_By": OWNER,
    }


def _record(module: str, i: int) -> Record:
    return _account(i) if module == "Accounts" else _person(module, i)


def _person(module: str, i: int) -> Record:
    """Person i of Contacts or Leads; ids rise with Created_Time, Modified_Time is scattered."""
    lead = module == "Leads"
    first = None if i % 11 == 5 else _FIRST[(i * 3 + lead) % len(_FIRST)]
    last = _LAST[(i * 7 + 2 * lead) % len(_LAST)]
    created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=97 * i + 13 * lead)
    modified = created + timedelta(seconds=(i * 7919 + 17 * lead) % 40_000_000)
    local = f"{(first or 'x').lower()}.{i}".encode("ascii", "ignore").decode()
    city, state, zip_code, country = _CITIES[i % len(_CITIES)]
    record: Record = {
        "id": _record_id(module, i),
        "Owner": OWNER,
        "First_Name": first,
        "Last_Name": last,
        "Full_Name": _full_name(first, last),
        "Email": None if i % 13 == 3 else f"{local}@{module.lower()}.example",
        "Secondary_Email": f"{local}@home.example" if i % 5 == 0 else None,
        "Phone": _phone(i, 1),
        "Mobile": _phone(i, 4),
        "Home_Phone": _phone(i, 9) if i % 4 == 0 else None,
        "Other_Phone": None,
        "Fax": None,
        "Title": _TITLES[i % len(_TITLES)],
        "Email_Opt_Out": i % 17 == 0,
        "Customer_Tier__c": _TIERS[i % len(_TIERS)],
        "Created_Time": _iso(created),
        "Modified_Time": _iso(modified),
        "Created_By": OWNER,
        "Modified_By": OWNER,
    }
    company = _COMPANIES[i % len(_COMPANIES)]
    if lead:
        record |= {
            "Company": company,
            "Street": f"{i % 900 + 1} Main St",
            "City": city,
            "State": state,
            "Zip_Code": zip_code,
            "Country": country,
            "Lead_Status": ["Not Contacted", "Contacted", "Qualified"][i % 3],
            "Lead_Source": ["Web Download", "Cold Call", None][i % 3],
            "Converted__s": False,
        }
    else:
        account = None if i % 9 == 4 else _account_ref(i % len(_COMPANIES))
        record |= {
            "Account_Name": account,
            "Mailing_Street": f"{i % 900 + 1} Main St",
            "Mailing_City": city,
            "Mailing_State": state,
            "Mailing_Zip": zip_code,
            "Mailing_Country": country,
        }
    return record


# A module's fields are those its generated records carry (Leads: Company, Street...; Contacts:
# Account_Name, Mailing_*...), so asking Leads for Account_Name fails as it does in Zoho.
MODULE_FIELDS = {m: frozenset(_record(m, 0)) for m in PEOPLE_MODULES}


def split_records(records: int | Mapping[str, int]) -> dict[str, int]:
    """An int is people split two contacts to one lead, and an Account per ten of them; a
    mapping gives each module's count (a module it leaves out has none)."""
    if isinstance(records, int):
        return {
            "Contacts": records - records // 3,
            "Leads": records // 3,
            "Accounts": records // 10,
        }
    unknown = set(records) - set(PEOPLE_MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; people modules: {PEOPLE_MODULES}")
    return {module: int(records.get(module, 0)) for module in PEOPLE_MODULES}


class AdminError(Exception):
    """A refused `/_sandbox/*` request: `{"message"}` with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Notification:
    """One Notification API callback about people of a module, before it is addressed to a
    channel. `affected` maps each record id to the fields that changed (updates only)."""

    module: str
    operation: str  # insert | update | delete
    affected: dict[str, list[str]]
    server_time: int  # ms since the epoch: when the change happened

    def wanted_by(self, channel: dict[str, Any], now: datetime) -> bool:
        """A live channel watching this module for this operation (or for all)."""
        events = {f"{self.module}.all", f"{self.module}.{WATCH_OPERATION[self.operation]}"}
        return _expiry(channel) > now and bool(events & set(channel["events"]))

    def payload(self, channel: dict[str, Any]) -> dict[str, Any]:
        affected = (
            [{record_id: fields} for record_id, fields in self.affected.items() if fields]
            if channel.get("return_affected_field_values")
            else []
        )
        return {
            "server_time": self.server_time,
            "query_params": dict(parse_qsl(urlsplit(channel["notify_url"]).query)),
            "module": self.module,
            "resource_uri": f"{API_DOMAIN}{API}/{self.module}",
            "ids": list(self.affected),
            "affected_fields": affected,
            "operation": self.operation,
            "channel_id": channel["channel_id"],
            "token": channel.get("token"),
        }


def _notification(module: str, operation: str, affected: dict[str, list[str]]) -> Notification:
    return Notification(module, operation, affected, int(datetime.now(UTC).timestamp() * 1000))


def _check_fields(module: str, fields: Mapping[str, Any]) -> None:
    if not isinstance(fields, Mapping):
        raise AdminError(400, "fields must be a JSON object")
    if unknown := sorted(set(fields) - (MODULE_FIELDS[module] - SYSTEM_FIELDS)):
        raise AdminError(400, f"{module} has no settable fields {unknown}")
    name = MANDATORY[module]
    if name in fields and not (isinstance(fields[name], str) and fields[name]):
        raise AdminError(400, f"{name} is mandatory: a non-empty string")


class ZohoState:
    """People, written activities, watch channels, page tokens, counters, limiter, faults."""

    def __init__(
        self,
        data_dir: str | Path,
        access_token: str = "zoho-sandbox-token",
        records: int | Mapping[str, int] = 500,
        rate_limit: float | None = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_token = access_token
        self.limiter = TokenBuckets(rate_limit) if rate_limit else None
        # A data dir written before Accounts were served has none of them.
        none: dict[str, list[Record]] = {m: [] for m in PEOPLE_MODULES}
        deleted_path = self.data_dir / DELETED_FILE
        self.deleted = none | (
            json.loads(deleted_path.read_text()) if deleted_path.exists() else {}
        )
        records_path = self.data_dir / RECORDS_FILE
        if records_path.exists():  # a restart keeps the people and their changes
            self.people: dict[str, list[Record]] = none | json.loads(records_path.read_text())
        else:
            counts = split_records(records)
            self.people = {m: [_record(m, i) for i in range(counts[m])] for m in PEOPLE_MODULES}
            self._save_people()
        activity_path = self.data_dir / ACTIVITY_FILE
        self.activity: dict[str, Any] = (
            json.loads(activity_path.read_text())
            if activity_path.exists()
            else {"calls": [], "notes": [], "channels": {}}
        )
        self.page_tokens: dict[str, tuple[tuple, int, datetime]] = {}
        self.faults = FaultQueue()
        self.delivery = WebhookDelivery()
        self._rng = random.Random(sum(map(len, self.people.values())))
        self.reset_stats()

    def _save_people(self) -> None:
        (self.data_dir / RECORDS_FILE).write_text(json.dumps(self.people))
        (self.data_dir / DELETED_FILE).write_text(json.dumps(self.deleted))

    def save_activity(self) -> None:
        (self.data_dir / ACTIVITY_FILE).write_text(json.dumps(self.activity))

    def reset_stats(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()

    def find(self, record_id: str) -> tuple[str, Record] | None:
        for module in PEOPLE_MODULES:
            for record in self.people[module]:
                if record["id"] == record_id:
                    return module, record
        return None

    # ---- people changes: each returns what it did and the notifications it causes ----------
    def person(self, record_id: str, module: str | None) -> tuple[str, Record]:
        """The live person `record_id` (of `module`, if given) and its module."""
        found = self.find(record_id)
        if found is None or module not in (None, found[0]):
            raise AdminError(404, f"no {module or 'person'} with id {record_id}")
        return found

    @staticmethod
    def _edit(record: Record, fields: Mapping[str, Any], now: str) -> list[str]:
        """Set `fields` and move Modified_Time, as an edit in Zoho does; the fields changed."""
        changed = [name for name, value in fields.items() if record.get(name) != value]
        record.update(fields)
        if "Full_Name" in record:  # a person's, not an Account's
            record["Full_Name"] = _full_name(record["First_Name"], record["Last_Name"])
        record["Modified_Time"] = now
        return changed

    def touch(self, module: str, ids: Sequence[str]) -> tuple[int, list[Notification]]:
        """Mark records as just modified (what an edit in the Zoho UI does to Modified_Time)."""
        now, wanted = _iso(datetime.now(UTC)), set(ids)
        touched = [r for r in self.people[module] if r["id"] in wanted]
        for record in touched:
            self._edit(record, {}, now)
        self._save_people()
        affected: dict[str, list[str]] = {r["id"]: [] for r in touched}
        return len(touched), [_notification(module, "update", affected)] if touched else []

    def create_person(
        self, module: str, fields: Mapping[str, Any], generated: bool = True
    ) -> tuple[Record, list[Notification]]:
        """A new person with the next (larger) id. `generated` (an admin create): generated
        where `fields` say nothing; otherwise (an API insert) only what `fields` say, the other
        fields empty, as Zoho stores an inserted record."""
        _check_fields(module, fields)
        now = _iso(datetime.now(UTC))
        # Indexes never repeat (the deleted keep theirs), so neither do the ids they make.
        record = _record(module, len(self.people[module]) + len(self.deleted[module]))
        if not generated:
            record |= {name: None for name in MODULE_FIELDS[module] - SYSTEM_FIELDS}
            record |= {"Owner": OWNER, **INSERT_DEFAULTS[module]}
        record["Created_Time"] = now
        self._edit(record, fields, now)
        self.people[module].append(record)
        self._save_people()
        return record, [_notification(module, "insert", {record["id"]: []})]

    def update_person(
        self, record_id: str, module: str | None, fields: Mapping[str, Any]
    ) -> tuple[Record, list[Notification]]:
        """`fields` set (none: a generated new name and phone); Modified_Time moves to now."""
        module, record = self.person(record_id, module)
        _check_fields(module, fields)
        changed = self._edit(
            record, fields or self._generated_change(module, record), _iso(datetime.now(UTC))
        )
        self._save_people()
        return record, [_notification(module, "update", {record_id: changed})]

    def _generated_change(self, module: str, record: Record) -> dict[str, Any]:
        names = ("Account_Name",) if module == "Accounts" else ("First_Name", "Last_Name")
        while True:
            other = _record(module, self._rng.randrange(10**6))
            change = {k: other[k] for k in (*names, "Phone")}
            if other["Phone"] and all(record[k] != v for k, v in change.items()):
                return change

    def delete_person(self, record_id: str, module: str | None) -> list[Notification]:
        module, record = self.person(record_id, module)
        self._remove(module, record)
        self._save_people()
        return [_notification(module, "delete", {record_id: []})]

    def merge_people(
        self, record_id: str, into: str, module: str | None
    ) -> tuple[Record, list[Notification]]:
        """Merge `record_id` into `into`: the survivor keeps its values and takes the other's
        where it has none; the other is deleted. Zoho's callbacks have no merge operation."""
        if record_id == into:
            raise AdminError(400, "a person cannot be merged into itself")
        module, loser = self.person(record_id, module)
        _, survivor = self.person(into, module)
        taken = {
            name: value
            for name, value in loser.items()
            if name not in SYSTEM_FIELDS
            and value not in (None, "")
            and survivor.get(name) in (None, "")
        }
        changed = self._edit(survivor, taken, _iso(datetime.now(UTC)))
        self._remove(module, loser)
        self._save_people()
        return survivor, [
            _notification(module, "update", {into: changed}),
            _notification(module, "delete", {record_id: []}),
        ]

    def _remove(self, module: str, record: Record) -> None:
        """Into the recycle bin: gone from the module, listed by `/{module}/deleted`."""
        self.people[module].remove(record)
        by = {"name": OWNER["name"], "id": OWNER["id"]}
        self.deleted[module].append(
            {
                "deleted_by": by,
                "id": record["id"],
                "display_name": record.get("Full_Name", record.get("Account_Name")),
                "type": "recycle",
                "created_by": by,
                "deleted_time": _iso(datetime.now(UTC)),
            }
        )

    def deliveries_of(self, notifications: list[Notification]) -> BackgroundTasks:
        """The sends of `notifications` to every live channel watching them, as tasks to run
        once the answer that made the change is out."""
        tasks, now = BackgroundTasks(), datetime.now(UTC)
        headers = {"Content-Type": "application/json"}
        for notification in notifications:
            for channel in self.activity["channels"].values():
                if notification.wanted_by(channel, now):
                    body = json.dumps(notification.payload(channel), ensure_ascii=False).encode()
                    tasks.add_task(self.delivery.send, channel["notify_url"], body, headers)
        return tasks

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_kind.values()),
            "byKind": dict(self.by_kind),
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "records": {m: len(rs) for m, rs in self.people.items()},
            "calls": len(self.activity["calls"]),
            "notes": len(self.activity["notes"]),
            "channels": len(self.activity["channels"]),
            "deleted": {m: len(rs) for m, rs in self.deleted.items()},
            "pendingFaults": self.faults.pending,
        }


def _record_key(sort_by: str) -> Callable[[Record], tuple]:
    if sort_by == "id":
        return lambda r: (int(r["id"]),)
    # Compare instants, not strings: touched records may carry another offset's text.
    return lambda r: (datetime.fromisoformat(r[sort_by]), int(r["id"]))


def _fields(query: Mapping[str, str], module: str) -> list[str]:
    raw = query.get("fields")
    if not raw:
        raise ZohoError(
            400,
            "REQUIRED_PARAM_MISSING",
            "One of the expected parameter is missing",
            param="fields",
        )
    fields = [f.strip() for f in raw.split(",") if f.strip()]
    if len(fields) > MAX_FIELDS:
        raise ZohoError(
            400, "LIMIT_EXCEEDED", "fields limit exceeded", param="fields", limit=MAX_FIELDS
        )
    for name in fields:
        if name not in MODULE_FIELDS[module]:
            raise ZohoError(
                400,
                "INVALID_DATA",
                "invalid field in fields",
                param_name="fields",
                api_name=name,
            )
    return fields


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ZohoError(
            400,
            "INVALID_DATA",
            f"invalid value for {name}",
            param_name=name,
            minimum=low,
            maximum=high,
        )
    return int(raw)


class _Api:
    """The v8 endpoints. Handlers run on the server's single event loop and never await while
    mutating, so no lock is needed."""

    def __init__(self, state: ZohoState) -> None:
        self.state = state

    async def serve(self, request: Request, kind: str, handler: Handler) -> Response:
        """Faults, then auth, then the rate limit, then the handler; count the result."""
        response = await self._guarded(request, handler)
        self.state.by_kind[kind] += 1
        self.state.by_status[response.status_code] += 1
        return response

    async def _guarded(self, request: Request, handler: Handler) -> Response:
        try:
            fault = self.state.faults.take()
            if fault is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    raise self._status_error(fault.status)
            self._authenticate(request)
            if self.state.limiter is not None and self.state.limiter.acquire("org"):
                raise self._status_error(429)
            return await handler(request)
        except ZohoError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except Exception:
            log.exception("zoho sandbox handler failed")
            return JSONResponse(ZohoError(500, "INTERNAL_ERROR", "Internal Error").body(), 500)

    @staticmethod
    def _status_error(status: int) -> ZohoError:
        if status == 429:  # deliberately no Retry-After: Zoho sends none
            return ZohoError(429, "TOO_MANY_REQUESTS", "API call limit exceeded")
        return ZohoError(status, "INTERNAL_ERROR", "Internal Error")

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization")
        if header is None:
            raise ZohoError(401, "AUTHENTICATION_FAILURE", "Authentication failed")
        scheme, _, token = header.partition(" ")
        if scheme != "Zoho-oauthtoken" or token != self.state.access_token:
            raise ZohoError(401, "INVALID_TOKEN", "invalid oauth token")

    @staticmethod
    def _module(request: Request) -> str:
        module = request.path_params["module"]
        if module not in PEOPLE_MODULES:
            raise ZohoError(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                module=module,
            )
        return module

    async def _json(self, request: Request, key: str) -> list[Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ZohoError(400, "INVALID_DATA", "body is not valid JSON") from None
        items = body.get(key) if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ZohoError(
                400,
                "REQUIRED_PARAM_MISSING",
                "One of the expected parameter is missing",
                param=key,
            )
        if len(items) > MAX_WRITE_RECORDS:
            raise ZohoError(
                400,
                "LIMIT_EXCEEDED",
                f"at most {MAX_WRITE_RECORDS} {key} per call",
                limit=MAX_WRITE_RECORDS,
            )
        return items

    # ---- people ---------------------------------------------------------------------------
    async def records(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.serve(request, "create_person", self._insert)
        kind = "get_by_ids" if "ids" in request.query_params else "list"
        return await self.serve(request, kind, self._list)

    async def _insert(self, request: Request) -> Response:
        """POST /{module} `{"data": [...]}`: Zoho's insert, checked per record (201 all
        written, 207 some, 400 none); each new person is listed, read and notified (an
        `insert`) like one the admin route creates."""
        module = self._module(request)
        items = await self._json(request, "data")
        results, notifications = [], []
        for n, item in enumerate(items):
            path = f"$.data[{n}]"
            try:
                if not isinstance(item, dict):
                    raise ZohoError(400, "INVALID_DATA", "invalid data", json_path=path)
                _check_insert(module, item, path)
            except ZohoError as exc:
                results.append(exc.body())
                continue
            record, notified = self.state.create_person(module, item, generated=False)
            notifications += notified
            details = {
                "Modified_Time": record["Modified_Time"],
                "Modified_By": OWNER,
                "Created_Time": record["Created_Time"],
                "id": record["id"],
                "Created_By": OWNER,
                "$approval_state": "approved",
            }
            results.append(
                {"code": "SUCCESS", "details": details, "message": "record added"}
                | {"status": "success"}
            )
        ok = sum(r["status"] == "success" for r in results)
        status = 201 if ok == len(results) else 207 if ok else 400
        tasks = self.state.deliveries_of(notifications)
        return JSONResponse({"data": results}, status_code=status, background=tasks)

    async def count(self, request: Request) -> Response:
        return await self.serve(request, "count", self._count)

    async def _count(self, request: Request) -> Response:
        return JSONResponse({"count": len(self.state.people[self._module(request)])})

    async def deleted(self, request: Request) -> Response:
        return await self.serve(request, "deleted", self._deleted)

    async def _deleted(self, request: Request) -> Response:
        """Deleted records, newest first; `type` all|recycle|permanent, If-Modified-Since."""
        module, query = self._module(request), request.query_params
        kind = query.get("type", "all")
        if kind not in ("all", "recycle", "permanent"):
            raise ZohoError(400, "INVALID_DATA", "invalid value for type", param_name="type")
        per_page = _int_param(query, "per_page", MAX_PER_PAGE, 1, MAX_PER_PAGE)
        page = _int_param(query, "page", 1, 1, 10**6)
        since_header = request.headers.get("if-modified-since")
        since = _parse_time(since_header, "If-Modified-Since") if since_header else None
        records = [
            r
            for r in reversed(self.state.deleted[module])
            if kind in ("all", r["type"])
            and (since is None or datetime.fromisoformat(r["deleted_time"]) > since)
        ]
        window = records[(page - 1) * per_page : page * per_page]
        if not window:
            return Response(status_code=204)
        more = page * per_page < len(records)
        info = {"per_page": per_page, "count": len(window), "page": page, "more_records": more}
        return JSONResponse({"data": window, "info": info})

    async def _list(self, request: Request) -> Response:
        module, query = self._module(request), request.query_params
        fields = _fields(query, module)
        if "ids" in query:
            return self._by_ids(module, query["ids"], fields)
        per_page = _int_param(query, "per_page", MAX_PER_PAGE, 1, MAX_PER_PAGE)
        sort_by = query.get("sort_by", "id")
        sort_order = query.get("sort_order", "desc")
        if sort_by not in SORT_FIELDS:
            raise ZohoError(
                400,
                "INVALID_DATA",
                "invalid value for sort_by",
                param_name="sort_by",
                supported_values=sorted(SORT_FIELDS),
            )
        if sort_order not in ("asc", "desc"):
            raise ZohoError(
                400, "INVALID_DATA", "invalid value for sort_order", param_name="sort_order"
            )
        since_header = request.headers.get("if-modified-since")
        since = _parse_time(since_header, "If-Modified-Since") if since_header else None
        # A page token only continues the query it was issued for.
        binding = (module, tuple(fields), sort_by, sort_order, since and since.timestamp())
        offset = self._offset(query, binding, per_page)
        people = self.state.people[module]
        if since is not None:
            people = [r for r in people if datetime.fromisoformat(r["Modified_Time"]) > since]
        people = sorted(people, key=_record_key(sort_by), reverse=sort_order == "desc")
        window = people[offset : offset + per_page]
        if not window:  # Zoho's empty result: 204 and no body at all
            return Response(status_code=204)
        more = offset + per_page < len(people)
        expiry = datetime.now(UTC) + TOKEN_TTL
        info = {
            "per_page": per_page,
            "count": len(window),
            "page": offset // per_page + 1,
            "sort_by": sort_by,
            "sort_order": sort_order,
            "more_records": more,
            "next_page_token": self._issue(binding, offset + per_page, expiry) if more else None,
            "previous_page_token": (
                self._issue(binding, max(0, offset - per_page), expiry) if offset else None
            ),
            "page_token_expiry": _iso(expiry),
        }
        return JSONResponse({"data": [self._project(r, fields) for r in window], "info": info})

    def _offset(self, query: Mapping[str, str], binding: tuple, per_page: int) -> int:
        token = query.get("page_token")
        if token is None:
            page = _int_param(query, "page", 1, 1, 10**6)
            if page * per_page > PAGE_LIMIT:
                raise ZohoError(
                    400,
                    "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
                    "you can only get the first 2000 records without using page_token",
                    limit=PAGE_LIMIT,
                )
            return (page - 1) * per_page
        if "page" in query:
            raise ZohoError(
                400,
                "AMBIGUITY_DURING_PROCESSING",
                "page and page_token cannot be used together",
                ambiguity_due_to=["page", "page_token"],
            )
        issued = self.state.page_tokens.get(token)
        if issued is None or issued[2] < datetime.now(UTC):
            raise ZohoError(400, "INVALID_DATA", "invalid page_token", param_name="page_token")
        if issued[0] != binding:
            raise ZohoError(
                400,
                "TOKEN_BOUND_DATA_MISMATCH",
                "the page_token does not match the other parameters of the request",
                param_name="page_token",
            )
        return issued[1]

    def _issue(self, binding: tuple, offset: int, expiry: datetime) -> str:
        token = secrets.token_hex(16)
        self.state.page_tokens[token] = (binding, offset, expiry)
        return token

    @staticmethod
    def _project(record: Record, fields: list[str]) -> Record:
        return {"id": record["id"], **{f: record.get(f) for f in fields}}

    def _by_ids(self, module: str, raw: str, fields: list[str]) -> Response:
        ids = [i.strip() for i in raw.split(",") if i.strip()]
        if len(ids) > MAX_IDS:
            raise ZohoError(
                400,
                "LIMIT_EXCEEDED",
                f"at most {MAX_IDS} ids per request",
                param="ids",
                limit=MAX_IDS,
            )
        by_id = {r["id"]: r for r in self.state.people[module]}
        found = [self._project(by_id[i], fields) for i in dict.fromkeys(ids) if i in by_id]
        if not found:
            return Response(status_code=204)
        info = {"per_page": len(found), "count": len(found), "page": 1, "more_records": False}
        return JSONResponse({"data": found, "info": info})

    # ---- activities -----------------------------------------------------------------------
    async def calls(self, request: Request) -> Response:
        return await self.serve(request, "create_call", self._create_calls)

    async def notes(self, request: Request) -> Response:
        return await self.serve(request, "create_note", self._create_notes)

    async def call(self, request: Request) -> Response:
        return await self.serve(request, "update_call", self._update_call)

    async def _create_calls(self, request: Request) -> Response:
        return self._write(await self._json(request, "data"), "calls", self._check_call)

    async def _update_call(self, request: Request) -> Response:
        """PUT /Calls/{id}: the one record in `data` changes the fields it names; the call must
        still be valid afterwards (an Inbound call with a zero duration is refused here too)."""
        call_id = request.path_params["id"]
        items = await self._json(request, "data")
        if len(items) != 1:
            raise ZohoError(400, "INVALID_DATA", "one record per update by id", json_path="$.data")
        calls = self.state.activity["calls"]
        index = next((n for n, c in enumerate(calls) if c["id"] == call_id), None)
        try:
            if index is None:  # as Zoho answers an unknown id in the URL
                raise ZohoError(
                    400, "INVALID_DATA", "the id given seems to be invalid", resource_path_index=1
                )
            item, path = items[0], "$.data[0]"
            if not isinstance(item, dict):
                raise ZohoError(400, "INVALID_DATA", "invalid data", json_path=path)
            if "id" in item and str(item["id"]) != call_id:
                raise _invalid("id", path, "the id in the URL")
            # Fields Zoho sets itself are not the caller's to change: ignored, as Zoho does.
            changes = {k: v for k, v in item.items() if k not in SYSTEM_FIELDS}
            updated = {**calls[index], **changes}
            self._check_call(updated, path)
        except ZohoError as exc:
            return JSONResponse({"data": [exc.body()]}, status_code=400)
        now = _iso(datetime.now(UTC))
        calls[index] = {**updated, "Modified_Time": now}
        self.state.save_activity()
        details = {
            "id": call_id,
            "Created_Time": updated["Created_Time"],
            "Modified_Time": now,
            "Created_By": OWNER,
            "Modified_By": OWNER,
        }
        result = {"code": "SUCCESS", "details": details, "message": "record updated"}
        return JSONResponse({"data": [{**result, "status": "success"}]})

    async def _create_notes(self, request: Request) -> Response:
        return self._write(await self._json(request, "data"), "notes", self._check_note)

    def _write(
        self, items: list[Any], kind: str, check: Callable[[Any, str], None]
    ) -> JSONResponse:
        """Zoho's per-record results: 201 all written, 207 some, 400 none."""
        results, now = [], _iso(datetime.now(UTC))
        for n, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ZohoError(400, "INVALID_DATA", "invalid data", json_path=f"$.data[{n}]")
                check(item, f"$.data[{n}]")
            except ZohoError as exc:
                results.append(exc.body())
                continue
            record_id = f"36523970009{len(self.state.activity[kind]) + 1:08d}"
            self.state.activity[kind].append({**item, "id": record_id, "Created_Time": now})
            details = {
                "id": record_id,
                "Created_Time": now,
                "Modified_Time": now,
                "Created_By": OWNER,
                "Modified_By": OWNER,
            }
            message = "record added"
            results.append(
                {"code": "SUCCESS", "details": details, "message": message, "status": "success"}
            )
        self.state.save_activity()
        ok = sum(r["status"] == "success" for r in results)
        status = 201 if ok == len(results) else 207 if ok else 400
        return JSONResponse({"data": results}, status_code=status)

    def _check_call(self, call: dict[str, Any], path: str) -> None:
        subject = call.get("Subject")
        _require(call, "Subject", path)
        if not isinstance(subject, str) or len(subject) > 255:
            raise _invalid("Subject", path, "text")
        _require(call, "Call_Type", path)
        call_type = call["Call_Type"]
        if call_type not in ("Inbound", "Outbound", "Missed"):
            raise _invalid("Call_Type", path, "picklist")
        _require(call, "Call_Start_Time", path)
        start = call["Call_Start_Time"]
        if not isinstance(start, str) or "T" not in start:
            raise _invalid("Call_Start_Time", path, "datetime")
        try:
            _parse_time(start, "Call_Start_Time")
        except ZohoError:
            raise _invalid("Call_Start_Time", path, "datetime") from None
        if call_type != "Missed":
            _require(call, "Call_Duration", path)
        duration = call.get("Call_Duration")
        if duration is not None:
            match = _DURATION.match(duration) if isinstance(duration, str) else None
            if match is None or (call_type != "Missed" and match.group(0) in ("0:00", "00:00")):
                raise _invalid("Call_Duration", path, "mm:ss, non-zero for Inbound/Outbound")
        description = call.get("Description")
        if description is not None and not isinstance(description, str):
            raise _invalid("Description", path, "textarea")
        if description is not None and len(description) > MAX_TEXTAREA:
            raise ZohoError(
                400,
                "INVALID_DATA",
                "invalid data",
                api_name="Description",
                json_path=f"{path}.Description",
                maximum_length=MAX_TEXTAREA,
            )
        # Who_Id ("Contact Name") looks up Contacts only; a Lead or an Account is the "Related
        # To" record: What_Id with $se_module naming its module (no contact beside a lead).
        if "Who_Id" in call and self._check_person_ref(call["Who_Id"], "Who_Id", path) != (
            "Contacts"
        ):
            raise _invalid("Who_Id", path, "a Contacts record id")
        if "What_Id" in call:
            module = call.get("$se_module")
            if module not in RELATED_TO_MODULES:  # the "Related To" modules held here
                raise _invalid("$se_module", path, " or ".join(RELATED_TO_MODULES))
            if self._check_person_ref(call["What_Id"], "What_Id", path) != module:
                raise _invalid("What_Id", path, f"a {module} record id")
            if module == "Leads" and "Who_Id" in call:
                raise _invalid("Who_Id", path, "no contact on a call related to a lead")

    def _check_person_ref(self, ref: object, name: str, path: str) -> str:
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str):
            raise _invalid(name, path, "lookup")
        found = self.state.find(ref["id"])
        if found is None:
            raise ZohoError(
                400,
                "INVALID_DATA",
                "the related id given seems to be invalid",
                api_name=name,
                json_path=f"{path}.{name}",
                id=ref["id"],
            )
        return found[0]

    def _check_note(self, note: dict[str, Any], path: str) -> None:
        _require(note, "Note_Content", path)
        if not isinstance(note["Note_Content"], str):
            raise _invalid("Note_Content", path, "textarea")
        if not isinstance(note.get("Note_Title", ""), str | None):
            raise _invalid("Note_Title", path, "text")
        _require(note, "Parent_Id", path)
        parent = note["Parent_Id"]
        # v8 wants {"module": {"api_name": ...}, "id": ...}; v2's string + se_module is refused.
        module = parent.get("module") if isinstance(parent, dict) else None
        if not isinstance(module, dict) or module.get("api_name") not in PEOPLE_MODULES:
            raise _invalid("Parent_Id", path, "{module: {api_name}, id}")
        if self._check_person_ref(parent, "Parent_Id", path) != module["api_name"]:
            raise _invalid("Parent_Id", path, f"a {module['api_name']} record id")

    # ---- notifications --------------------------------------------------------------------
    async def watch(self, request: Request) -> Response:
        handler = {
            "GET": self._list_channels,
            "POST": self._subscribe,
            "PATCH": self._renew,
            "DELETE": self._unsubscribe,
        }[request.method]
        return await self.serve(request, f"watch_{request.method.lower()}", handler)

    async def _list_channels(self, request: Request) -> Response:
        now = datetime.now(UTC)
        live = [c for c in self.state.activity["channels"].values() if _expiry(c) > now]
        return JSONResponse({"watch": live}) if live else Response(status_code=204)

    async def _subscribe(self, request: Request) -> Response:
        return self._watch_write(await self._json(request, "watch"), renew=False)

    async def _renew(self, request: Request) -> Response:
        return self._watch_write(await self._json(request, "watch"), renew=True)

    def _watch_write(self, items: list[Any], renew: bool) -> JSONResponse:
        results, channels, now = [], self.state.activity["channels"], datetime.now(UTC)
        for n, item in enumerate(items):
            path = f"$.watch[{n}]"
            try:
                if not isinstance(item, dict):
                    raise ZohoError(400, "INVALID_DATA", "invalid data", json_path=path)
                channel_id = str(item.get("channel_id") or "")
                if not channel_id.isdigit():
                    raise _invalid("channel_id", path, "long")
                existing = channels.get(channel_id)
                if renew and (existing is None or _expiry(existing) <= now):
                    raise ZohoError(
                        400,
                        "NOT_SUBSCRIBED",
                        "the channel is not subscribed",
                        channel_id=channel_id,
                    )
                channel = self._channel(item, path, existing if renew else None, now)
            except ZohoError as exc:
                results.append(exc.body())
                continue
            channels[channel_id] = channel
            events = [
                {
                    "channel_expiry": channel["channel_expiry"],
                    "resource_uri": f"{API_DOMAIN}{API}/{event.split('.')[0]}",
                    "resource_id": "3652397000000002179",
                    "resource_name": event.split(".")[0],
                    "channel_id": channel_id,
                }
                for event in channel["events"]
            ]
            verb = "updated" if renew else "subscribed for actions-watch of the given module"
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": events},
                    "message": f"Successfully {verb}",
                    "status": "success",
                }
            )
        self.state.save_activity()
        ok = sum(r["status"] == "success" for r in results)
        return JSONResponse({"watch": results}, status_code=200 if ok else 400)

    @staticmethod
    def _channel(
        item: dict[str, Any], path: str, existing: dict[str, Any] | None, now: datetime
    ) -> dict[str, Any]:
        merged = {**(existing or {}), **item}
        for name in ("events", "notify_url"):
            if not merged.get(name):
                raise ZohoError(
                    400,
                    "MANDATORY_NOT_FOUND",
                    "required field not found",
                    api_name=name,
                    json_path=f"{path}.{name}",
                )
        events = merged["events"]
        for event in events if isinstance(events, list) else [None]:
            module, _, operation = str(event).partition(".")
            if module not in WATCHABLE_MODULES or operation not in WATCH_OPERATIONS:
                raise _invalid("events", path, "Module.create|edit|delete|all")
        if not str(merged["notify_url"]).startswith(("https://", "http://")):
            raise _invalid("notify_url", path, "url")
        token = merged.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 50):
            raise _invalid("token", path, "text of at most 50 characters")
        expiry = now + DEFAULT_CHANNEL_TTL
        if item.get("channel_expiry") is not None:
            try:
                asked = _parse_time(str(item["channel_expiry"]), "channel_expiry")
            except ZohoError:
                raise _invalid("channel_expiry", path, "datetime") from None
            if asked <= now:
                raise _invalid("channel_expiry", path, "a future datetime")
            # Like Zoho: beyond the one-week maximum silently becomes the one-hour default.
            expiry = asked if asked <= now + MAX_CHANNEL_TTL else expiry
        elif existing is not None:
            expiry = _expiry(existing)
        keep = (
            "channel_id",
            "events",
            "notify_url",
            "token",
            "return_affected_field_values",
            "notify_on_related_action",
        )
        channel = {k: merged[k] for k in keep if k in merged}
        return {**channel, "channel_id": str(merged["channel_id"]), "channel_expiry": _iso(expiry)}

    async def _unsubscribe(self, request: Request) -> Response:
        raw = request.query_params.get("channel_ids")
        if not raw:
            raise ZohoError(
                400,
                "REQUIRED_PARAM_MISSING",
                "One of the expected parameter is missing",
                param="channel_ids",
            )
        results = []
        for channel_id in [c.strip() for c in raw.split(",") if c.strip()]:
            if self.state.activity["channels"].pop(channel_id, None) is None:
                results.append(
                    ZohoError(
                        400,
                        "NOT_SUBSCRIBED",
                        "the channel is not subscribed",
                        channel_id=channel_id,
                    ).body()
                )
            else:
                results.append(
                    {
                        "code": "SUCCESS",
                        "details": {"channel_id": channel_id},
                        "message": "Successfully unsubscribed",
                        "status": "success",
                    }
                )
        self.state.save_activity()
        return JSONResponse({"watch": results})


def _require(item: dict[str, Any], name: str, path: str) -> None:
    if item.get(name) in (None, ""):
        raise ZohoError(
            400,
            "MANDATORY_NOT_FOUND",
            "required field not found",
            api_name=name,
            json_path=f"{path}.{name}",
        )


def _check_insert(module: str, item: dict[str, Any], path: str) -> None:
    """What Zoho refuses in a record inserted into the module."""
    mandatory = MANDATORY[module]  # the module's system-defined mandatory field
    _require(item, mandatory, path)
    for name, value in item.items():
        settable = MODULE_FIELDS[module] - SYSTEM_FIELDS - READ_ONLY_FIELDS
        if name not in settable:
            raise _invalid(name, path, f"a settable {module} field")
        if value is None:
            continue
        if name in BOOLEAN_FIELDS:
            if not isinstance(value, bool):
                raise _invalid(name, path, "boolean")
        elif name in LOOKUP_FIELDS[module]:
            if not isinstance(value, dict) or not isinstance(value.get("id"), str):
                raise _invalid(name, path, "lookup {id}")
        elif not isinstance(value, str):
            raise _invalid(name, path, "text")
        elif name in PHONE_FIELDS:
            if len(value) > MAX_PHONE or not _PHONE.match(value):
                raise _invalid(name, path, f"phone of at most {MAX_PHONE} characters")
        elif name in EMAIL_FIELDS:
            if not _EMAIL.match(value):
                raise _invalid(name, path, "email")
        elif len(value) > MAX_SINGLE_LINE:
            raise ZohoError(
                400,
                "INVALID_DATA",
                "invalid data",
                api_name=name,
                json_path=f"{path}.{name}",
                maximum_length=MAX_SINGLE_LINE,
            )
    if not item[mandatory].strip():
        raise _invalid(mandatory, path, "text")


def _invalid(name: str, path: str, expected: str) -> ZohoError:
    return ZohoError(
        400,
        "INVALID_DATA",
        "invalid data",
        api_name=name,
        json_path=f"{path}.{name}",
        expected_data_type=expected,
    )


def _expiry(channel: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(channel["channel_expiry"])


# ---- admin --------------------------------------------------------------------------------
async def _admin_created(request: Request) -> Response:
    activity = request.app.state.zoho.activity
    return JSONResponse({**activity, "channels": list(activity["channels"].values())})


def _person_key(ref: object, module: object) -> str | None:
    """The connector's record key ("Contacts-<id>") of a lookup `{"id": ...}` in `module`."""
    return f"{module}-{ref['id']}" if isinstance(ref, dict) and "id" in ref else None


def sandbox_activities(state: ZohoState) -> list[dict[str, Any]]:
    """What was logged on people, one shape for every simulator: `person` is the connector's
    record key, `body` the text a person reads, `kind` call or note."""
    found = []
    for call in state.activity["calls"]:
        person = _person_key(call.get("Who_Id"), "Contacts") or _person_key(
            call.get("What_Id"), call.get("$se_module")
        )
        found.append(
            {
                "id": call["id"],
                "kind": "call",
                "person": person,
                "subject": call.get("Subject"),
                "body": call.get("Description") or "",
                "record": call,
            }
        )
    for note in state.activity["notes"]:
        parent = note.get("Parent_Id") or {}
        found.append(
            {
                "id": note["id"],
                "kind": "note",
                "person": _person_key(parent, (parent.get("module") or {}).get("api_name")),
                "subject": note.get("Note_Title"),
                "body": note.get("Note_Content") or "",
                "record": note,
            }
        )
    return found


async def _admin_activities(request: Request) -> Response:
    return JSONResponse({"activities": sandbox_activities(request.app.state.zoho)})


async def _admin_touch(request: Request) -> Response:
    state: ZohoState = request.app.state.zoho
    try:
        spec = json.loads(await request.body())
        module, ids = spec["module"], spec["ids"]
        if module not in PEOPLE_MODULES or not isinstance(ids, list):
            raise ValueError(f"module must be one of {PEOPLE_MODULES}, ids a list")
    except (ValueError, TypeError, KeyError) as exc:
        return JSONResponse({"message": str(exc)}, status_code=400)
    touched, notifications = state.touch(module, [str(i) for i in ids])
    return JSONResponse({"touched": touched}, background=state.deliveries_of(notifications))


AdminHandler = Callable[[Request, ZohoState, str | None], Awaitable[Response]]


def _admin(handler: AdminHandler) -> Handler:
    """An admin people route: `?kind=` (a people module) checked, AdminError answered."""

    async def route(request: Request) -> Response:
        kind = request.query_params.get("kind")
        try:
            if kind not in (None, *PEOPLE_MODULES):
                raise AdminError(400, f"kind must be one of {PEOPLE_MODULES}")
            return await handler(request, request.app.state.zoho, kind)
        except AdminError as exc:
            return JSONResponse({"message": exc.message}, status_code=exc.status)

    return route


async def _admin_body(request: Request, key: str) -> Any:
    try:
        return json.loads(await request.body() or b"{}")[key]
    except (ValueError, TypeError, KeyError):
        raise AdminError(400, f'the body must be a JSON object with "{key}"') from None


@_admin
async def _admin_people(request: Request, state: ZohoState, kind: str | None) -> Response:
    """GET: every live person of `kind` (default Contacts); POST `{"fields"}`: a new one."""
    module = kind or "Contacts"
    if request.method == "GET":
        return JSONResponse(state.people[module])
    record, notifications = state.create_person(module, await _admin_body(request, "fields"))
    return JSONResponse(record, background=state.deliveries_of(notifications))


@_admin
async def _admin_person(request: Request, state: ZohoState, kind: str | None) -> Response:
    """PATCH `{"fields"}` or DELETE a person (of `kind`, if given: else found in any module)."""
    record_id = request.path_params["record_id"]
    if request.method == "DELETE":
        notifications = state.delete_person(record_id, kind)
        return Response(status_code=204, background=state.deliveries_of(notifications))
    fields = await _admin_body(request, "fields")
    record, notifications = state.update_person(record_id, kind, fields)
    return JSONResponse(record, background=state.deliveries_of(notifications))


@_admin
async def _admin_merge(request: Request, state: ZohoState, kind: str | None) -> Response:
    into = str(await _admin_body(request, "into"))
    record, notifications = state.merge_people(request.path_params["record_id"], into, kind)
    return JSONResponse(record, background=state.deliveries_of(notifications))


def build_app(state: ZohoState) -> Starlette:
    api = _Api(state)
    app = Starlette(
        routes=[
            Route(f"{API}/Calls", api.calls, methods=["POST"]),
            Route(f"{API}/Calls/{{id}}", api.call, methods=["PUT"]),
            Route(f"{API}/Notes", api.notes, methods=["POST"]),
            Route(f"{API}/actions/watch", api.watch, methods=["GET", "POST", "PATCH", "DELETE"]),
            Route(f"{API}/{{module}}/actions/count", api.count, methods=["GET"]),
            Route(f"{API}/{{module}}/deleted", api.deleted, methods=["GET"]),
            Route(f"{API}/{{module}}", api.records, methods=["GET", "POST"]),
            Route("/_sandbox/created", _admin_created, methods=["GET"]),
            Route("/_sandbox/activities", _admin_activities, methods=["GET"]),
            Route("/_sandbox/touch", _admin_touch, methods=["POST"]),
            Route("/_sandbox/people", _admin_people, methods=["GET", "POST"]),
            Route("/_sandbox/people/{record_id}", _admin_person, methods=["PATCH", "DELETE"]),
            Route("/_sandbox/people/{record_id}/merge", _admin_merge, methods=["POST"]),
            *admin_routes(FAULT_STATUSES, state_attr="zoho", retry_after=False),
            *delivery_routes(),
        ]
    )
    app.state.zoho, app.state.delivery = state, state.delivery
    return app


class ZohoSandbox(SandboxServer):
    """Runs the sandbox in-process on 127.0.0.1 (uvicorn in a background thread)."""

    name = "Zoho"

    def __init__(
        self,
        data_dir: str | Path,
        access_token: str = "zoho-sandbox-token",
        records: int | Mapping[str, int] = 500,
        rate_limit: float | None = 10.0,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.access_token = Path(data_dir), access_token
        self._records, self._rate_limit = records, rate_limit

    def _create_state(self) -> ZohoState:
        return ZohoState(self.data_dir, self.access_token, self._records, self._rate_limit)

    def _create_app(self, state: ZohoState) -> Starlette:
        return build_app(state)

    def _close_state(self, state: ZohoState) -> None:
        state.delivery.close()

    def reset_stats(self) -> None:
        self._admin_request("POST", "reset-stats")

    def created(self) -> dict[str, list[dict[str, Any]]]:
        """What was written through the API: {"calls": [...], "notes": [...], "channels": [...]}"""
        return self._admin_request("GET", "created").json()

    def touch(self, module: str, ids: Sequence[str]) -> int:
        """Set Modified_Time of these records to now; returns how many were found."""
        body = {"module": module, "ids": list(ids)}
        return self._admin_request("POST", "touch", json=body).json()["touched"]

    def inject_fault(  # type: ignore[override]  # Zoho sends no Retry-After
        self, status: int | None = None, count: int = 1, delay_seconds: float = 0.0
    ) -> None:
        fault = {"status": status, "count": count, "delaySeconds": delay_seconds}
        self._admin_request("POST", "faults", json=fault)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--records",
        type=int,
        default=500,
        help="people, split 2:1 Contacts:Leads, and an Account per ten of them",
    )
    parser.add_argument("--token", default="zoho-sandbox-token", help="the valid access token")
    parser.add_argument("--rate-limit", type=float, default=10.0, help="requests/s for the org")
    parser.add_argument("--no-rate-limit", action="store_true")
    args = parser.parse_args(argv)
    sandbox = ZohoSandbox(
        args.data_dir,
        access_token=args.token,
        records=args.records,
        rate_limit=None if args.no_rate_limit else args.rate_limit,
        port=args.port,
    )
    serve_until_signalled(sandbox, "SANDBOX_READY")


if __name__ == "__main__":
    main()
