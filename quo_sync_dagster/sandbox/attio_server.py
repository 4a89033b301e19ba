"""Strict local simulator of the Attio REST API (v2): people records, notes and webhooks.

Request bodies are validated against schemas extracted from Attio's OpenAPI spec
(`specs/attio-subset.json`); every error uses Attio's `{status_code, type, code, message}`
envelope. People are generated deterministically and persisted in the data dir, as are created
notes and webhooks. The server only binds 127.0.0.1; `/_sandbox/*` admin endpoints are open.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
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

log = logging.getLogger(__name__)

SPEC_PATH = Path(__file__).parent / "specs" / "attio-subset.json"
QUERY = "/v2/objects/{object}/records/query"
RECORD = "/v2/objects/{object}/records/{record_id}"
NOTES, WEBHOOKS, WEBHOOK = "/v2/notes", "/v2/webhooks", "/v2/webhooks/{webhook_id}"
PEOPLE_FILE, LOG_FILE = "attio_people.json", "attio_writes.jsonl"
WORKSPACE_ID = "5c1d2e3f-0a1b-4c2d-8e3f-a0b1c2d3e4f5"
PEOPLE_OBJECT_ID = "97052eb9-e65e-443f-a297-f2d9a4a7f795"
WORKSPACE_SLUG = "sandbox"
API_TOKEN_ACTOR = {"type": "api-token", "id": "0b7e1a52-3c4d-4e5f-8a9b-0c1d2e3f4a5b"}
MEMBER_ACTOR = {"type": "workspace-member", "id": "50cf242c-7fa3-4cad-87d0-75b1af71c57b"}
FAULT_STATUSES = frozenset({429, 500, 502, 503})
WRITE_SHARE = 0.25  # Attio allows 25 writes/s against 100 reads/s
KINDS = ("query", "get", "create_note", "create_webhook", "delete_webhook")

# Attributes a people query may sort or filter on, and the value field each compares by default.
# Attio has no updated_at: created_at is the only time a record carries.
SORT_FIELDS = {
    "record_id": None,
    "created_at": None,
    "name": "last_name",
    "email_addresses": "email_address",
    "phone_numbers": "phone_number",
    "job_title": "value",
    "lead_source": "value",
}

_SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())


def _request_validator(path: str, method: str) -> Draft202012Validator:
    body = _SPEC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator(body, format_checker=FormatChecker(("uuid",)))


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
        record_id, actor = _uuid(rng), rng.choice((API_TOKEN_ACTOR, MEMBER_ACTOR))
        first, last = rng.choice(_FIRST), ("" if i % 23 == 5 else rng.choice(_LAST))
        full = f"{first} {last}".strip()
        values: dict[str, list[dict[str, Any]]] = {
            "name": [
                _value("personal-name", at, actor, first_name=first, last_name=last, full_name=full)
            ],
            "email_addresses": [],
            "phone_numbers": [],
            "job_title": [_value("text", at, actor, value=rng.choice(_TITLES))] if i % 3 else [],
            "lead_source": [_value("text", at, actor, value=rng.choice(_SOURCES))],
        }
        slug = re.sub(r"[^a-z]", "", first.lower().encode("ascii", "ignore").decode()) or "person"
        n_emails = 0 if i % 17 == 3 else rng.choice((1, 1, 1, 2, 3))
        n_phones = 0 if i % 13 == 7 else rng.choice((1, 1, 1, 2, 3))
        for n in range(n_emails):
            address = f"{slug}.{i}{'+work' if n == 2 else ''}{n or ''}@{rng.choice(_DOMAINS)}"
            values["email_addresses"].append(_value("email-address", at, actor, **_email(address)))
        for _ in range(n_phones):
            values["phone_numbers"].append(_value("phone-number", at, actor, **_phone(rng)))
        if i % 11 == 4 and n_phones:  # a number replaced later: the old one stays, inactive
            changed = at + timedelta(days=30)
            values["phone_numbers"][0]["active_until"] = _timestamp(changed)
            values["phone_numbers"].append(_value("phone-number", changed, actor, **_phone(rng)))
        people.append(
            {
                "id": {
                    "workspace_id": WORKSPACE_ID,
                    "object_id": PEOPLE_OBJECT_ID,
                    "record_id": record_id,
                },
                "created_at": _timestamp(at),
                "web_url": f"https://app.attio.com/{WORKSPACE_SLUG}/person/{record_id}",
                "values": values,
            }
        )
    return people


# ---- queries -------------------------------------------------------------------------------
def _active(person: dict[str, Any], attribute: str) -> list[dict[str, Any]]:
    return [v for v in person["values"].get(attribute, []) if v["active_until"] is None]


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


def _compared(person: dict[str, Any], attribute: str, field: str | None = None) -> list[object]:
    """The values a filter or sort on `attribute` sees (active values only)."""
    if attribute == "record_id":
        return [person["id"]["record_id"]]
    if attribute == "created_at":
        return [person["created_at"]]
    if attribute == "name" and field is None:
        field = "full_name"
    key = field or SORT_FIELDS[attribute]
    return [_normalize(attribute, v.get(key)) for v in _active(person, attribute)]


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


def _matches(person: dict[str, Any], flt: object) -> bool:
    if not isinstance(flt, dict):
        raise AttioError(400, "filter_error", "A filter must be an object.")
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list):
                raise AttioError(400, "filter_error", f"{key} needs an array of filters.")
            results = [_matches(person, f) for f in cond]
            if not (all(results) if key == "$and" else any(results)):
                return False
        elif key == "$not":
            if _matches(person, cond):
                return False
        elif key in SORT_FIELDS:
            conds = cond if isinstance(cond, dict) else {"$eq": cond}
            for op, operand in conds.items():
                field = None
                if not op.startswith("$"):  # a value field, e.g. {"name": {"first_name": ...}}
                    field, (op, operand) = op, next(iter(_as_operators(operand).items()))
                if not _condition(_compared(person, key, field), op, operand, key):
                    return False
        else:
            raise AttioError(400, "filter_error", f'Unknown attribute slug "{key}" in filter.')
    return True


def _as_operators(operand: object) -> dict[str, object]:
    return operand if isinstance(operand, dict) and operand else {"$eq": operand}


def _sorted(people: list[dict[str, Any]], sorts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ordered = sorted(people, key=lambda p: (p["created_at"], p["id"]["record_id"]))
    for sort in reversed(sorts):  # stable sorts applied last-key-first give lexicographic order
        if "attribute" not in sort:
            raise AttioError(400, "filter_error", "Sorting by path is not supported on people.")
        attribute = sort["attribute"]
        if attribute not in SORT_FIELDS:
            raise AttioError(400, "filter_error", f'Unknown attribute slug "{attribute}" in sorts.')
        field = sort.get("field")

        def key(p: dict[str, Any], attribute: str = attribute, field: str | None = field) -> tuple:
            values = [v for v in _compared(p, attribute, field) if v is not None]
            return (not values, values[0] if values else "")

        ordered.sort(key=key, reverse=sort["direction"] == "desc")
    return ordered


def _markdown_to_plaintext(content: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", content)
    text = re.sub(r"^#{1,3}\s+", "", text, flags=re.MULTILINE)
    return re.sub(r"(\*\*|__|~~|==|\*|_)", "", text)


def sign(secret: str, raw_body: bytes) -> str:
    """Attio-Signature: hex HMAC-SHA256 of the raw body, keyed with the webhook secret."""
    return hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


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
        self.notes: list[dict[str, Any]] = []
        self.webhooks: dict[str, dict[str, Any]] = {}
        self._log_path = self.data_dir / LOG_FILE
        if self._log_path.exists():
            for line in self._log_path.read_text().splitlines():
                self._apply(json.loads(line))
        self.faults = FaultQueue()
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()

    def _apply(self, entry: dict[str, Any]) -> None:
        if "note" in entry:
            self.notes.append(entry["note"])
        elif "webhook" in entry:
            self.webhooks[entry["webhook"]["id"]["webhook_id"]] = entry["webhook"]
        else:
            self.webhooks.pop(entry["webhook_deleted"], None)

    def record(self, entry: dict[str, Any]) -> None:
        """Apply a write and append it to the data dir's log, so a restart keeps it."""
        self._apply(entry)
        with self._log_path.open("a") as log_file:
            log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_kind.values()),
            "byKind": {k: self.by_kind[k] for k in KINDS},
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "people": len(self.people),
            "notes": len(self.notes),
            "webhooks": len(self.webhooks),
            "pendingFaults": self.faults.pending,
        }


def _retry_after(wait: float) -> str:
    """Attio sends an HTTP date, rounded up so a client never comes back too early."""
    return formatdate(math.ceil(time.time() + max(wait, 1.0)), usegmt=True)


class _Api:
    def __init__(self, state: AttioState) -> None:
        self.state = state

    async def serve(
        self, request: Request, kind: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await self._guarded(request, kind, handler)
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
        fault = self.state.faults.take()
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status == 429:
                headers = {"Retry-After": fault.retry_after or _retry_after(1.0)}
                return _error(429, "rate_limit_exceeded", "Rate limit exceeded.", headers)
            if fault.status is not None:
                return _error(fault.status, "internal_error", "Injected sandbox fault.")
        if not self._authorized(request):
            return _error(401, "unauthorized", "Invalid or missing API token.")
        buckets = self.state.reads if kind in ("query", "get") else self.state.writes
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
    async def _body(request: Request, validator: Draft202012Validator) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise AttioError(400, "validation_type", "Body is not valid JSON.") from None
        _validate(validator, body)
        return body

    @staticmethod
    def _object(request: Request) -> None:
        slug = request.path_params["object"]
        if slug not in ("people", PEOPLE_OBJECT_ID):
            raise AttioError(404, "not_found", f'Object with slug/ID "{slug}" not found.')

    def _person(self, record_id: str) -> dict[str, Any]:
        person = self.state.people.get(record_id)
        if person is None:
            raise AttioError(404, "not_found", f'Record with ID "{record_id}" not found.')
        return person

    async def query(self, request: Request) -> Response:
        return await self.serve(request, "query", self._query)

    async def _query(self, request: Request) -> Response:
        self._object(request)
        body = await self._body(request, _QUERY_VALIDATOR)
        limit, offset = body.get("limit", 500), body.get("offset", 0)
        # The spec types both as "number"; Attio only takes whole, non-negative ones.
        for name, value, least in (("limit", limit, 1), ("offset", offset, 0)):
            if value != int(value) or value < least:
                raise AttioError(400, "validation_type", f"{name} must be an integer >= {least}.")
        people = list(self.state.people.values())
        if "filter" in body:
            people = [p for p in people if _matches(p, body["filter"])]
        people = _sorted(people, body.get("sorts", []))
        return JSONResponse({"data": people[int(offset) : int(offset) + int(limit)]})

    async def get_record(self, request: Request) -> Response:
        return await self.serve(request, "get", self._get_record)

    async def _get_record(self, request: Request) -> Response:
        self._object(request)
        return JSONResponse({"data": self._person(request.path_params["record_id"])})

    async def notes(self, request: Request) -> Response:
        return await self.serve(request, "create_note", self._create_note)

    async def _create_note(self, request: Request) -> Response:
        data = (await self._body(request, _NOTE_VALIDATOR))["data"]
        if data["parent_object"] not in ("people", PEOPLE_OBJECT_ID):
            message = f'Object with slug/ID "{data["parent_object"]}" not found.'
            raise AttioError(404, "not_found", message)
        self._person(data["parent_record_id"])
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
        data = (await self._body(request, _WEBHOOK_VALIDATOR))["data"]
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
        return await self.serve(request, "delete_webhook", self._delete_webhook)

    async def _delete_webhook(self, request: Request) -> Response:
        webhook_id = request.path_params["webhook_id"]
        if webhook_id not in self.state.webhooks:
            raise AttioError(404, "not_found", "Webhook not found")
        self.state.record({"webhook_deleted": webhook_id})
        return JSONResponse({})


async def _admin_notes(request: Request) -> Response:
    return JSONResponse(request.app.state.sandbox.notes)


async def _admin_webhooks(request: Request) -> Response:
    return JSONResponse(list(request.app.state.sandbox.webhooks.values()))


async def _admin_emit(request: Request) -> Response:
    """Deliver `{"events": [...]}` signed with the webhook's secret, as Attio would; the body may
    name a `target_url` to use instead of the registered one (which Attio requires be https)."""
    state: AttioState = request.app.state.sandbox
    webhook = state.webhooks.get(request.path_params["webhook_id"])
    if webhook is None:
        return JSONResponse({"message": "no such webhook"}, status_code=404)
    spec = json.loads(await request.body())
    raw = json.dumps({"webhook_id": webhook["id"]["webhook_id"], "events": spec["events"]}).encode()
    signature = sign(webhook["secret"], raw)
    headers = {
        "Content-Type": "application/json",
        "Attio-Signature": signature,
        "X-Attio-Signature": signature,
        "Idempotency-Key": str(uuid.uuid4()),
    }
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            spec.get("target_url") or webhook["target_url"], content=raw, headers=headers
        )
    return JSONResponse({"status": answer.status_code})


def build_app(state: AttioState) -> Starlette:
    api = _Api(state)
    app = Starlette(
        routes=[
            Route(QUERY, api.query, methods=["POST"]),
            Route(RECORD, api.get_record, methods=["GET"]),
            Route(NOTES, api.notes, methods=["POST"]),
            Route(WEBHOOKS, api.webhooks, methods=["POST"]),
            Route(WEBHOOK, api.webhook, methods=["DELETE"]),
            Route("/_sandbox/notes", _admin_notes, methods=["GET"]),
            Route("/_sandbox/webhooks", _admin_webhooks, methods=["GET"]),
            Route("/_sandbox/webhooks/{webhook_id}/emit", _admin_emit, methods=["POST"]),
            *admin_routes(FAULT_STATUSES, reset_stats=False),
        ]
    )
    app.state.sandbox = state
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

    def notes(self) -> list[dict[str, Any]]:
        return self._admin_request("GET", "notes").json()

    def webhooks(self) -> list[dict[str, Any]]:
        return self._admin_request("GET", "webhooks").json()

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
