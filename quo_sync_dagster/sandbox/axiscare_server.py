"""Strict local simulator of AxisCare's API: people lists (clients, leads, caregivers, applicants),
lead creation (`POST /api/leads`: the lead holds what was sent, Active unless told otherwise)
and call logs (add, list, get, and PATCH: only the keys sent change, comments are appended).

Parameters, limits, version header and envelopes follow the official OpenAPI spec copy, including
its per-type differences: clients/leads answer `{results: {<kind>: [...], nextPage}, errors}`,
caregivers/applicants answer `{<kind>: [...], nextPage, <kind>NotFound}` with 404 when nothing
matches, and applicants take no `limit`. The spec declares no closed parameter set, so unknown
query parameters are ignored, as the real API does. The server only binds 127.0.0.1;
`/_sandbox/*` admin endpoints are unauthenticated.

People of every kind can be created, changed and deleted through `/_sandbox/people?kind=...`
while a sync runs (persisted with the rest). AxisCare records carry no modification time and
AxisCare has no merges; it has no API to subscribe to webhooks either, so none are sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
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

SPEC_PATH = Path(__file__).parent / "specs" / "axiscare-openapi.yaml"
_SPEC: dict[str, Any] = yaml.load(SPEC_PATH.read_text(), Loader=yaml.CSafeLoader)

KINDS = ("clients", "leads", "caregivers", "applicants")
# Share of `records` per kind; the last kind takes the remainder.
_SHARES = {"clients": 0.4, "leads": 0.2, "caregivers": 0.25}
_SINGULAR = {
    "clients": "client",
    "leads": "lead",
    "caregivers": "caregiver",
    "applicants": "applicant",
}
# Kinds whose list answer is the spec's bare `{<kind>: [...], nextPage, <kind>NotFound}` shape.
_BARE_KINDS = frozenset({"caregivers", "applicants"})
CALL_LOGS, CALL_LOG = "/api/call-logs", "/api/call-logs/{callLogId}"
LEADS = "/api/leads"
DEFAULT_PAGE_SIZE = 100  # the spec's `limit` default; also applicants' fixed page size
PEOPLE_FILE, CALL_LOGS_FILE = "axiscare_people.json", "axiscare_call_logs.json"
FAULT_STATUSES = frozenset({429, 500, 502, 503})
SANDBOX_USER_ID = 1
SANDBOX_USERS = {SANDBOX_USER_ID: "Sandbox Admin"}  # comments name an existing user


def _list_op(kind: str) -> dict[str, Any]:
    return _SPEC["paths"][f"/api/{kind}"]["get"]


def _query_params(kind: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["schema"] for p in _list_op(kind)["parameters"] if p["in"] == "query"}


def _supported_versions() -> frozenset[str]:
    """Every version any operation's X-AxisCare-Api-Version enum allows."""
    versions: set[str] = set()
    for item in _SPEC["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                if param["in"] == "header" and param["name"].lower() == "x-axiscare-api-version":
                    versions.update(param["schema"].get("enum", []))
    return frozenset(versions)


SUPPORTED_VERSIONS = _supported_versions()


def _body_validator(
    path: str, method: str, formats: Sequence[str] | None = None
) -> Draft202012Validator:
    return Draft202012Validator(
        _SPEC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"],
        format_checker=FormatChecker(formats) if formats else None,
    )


_CALL_LOG_VALIDATOR = _body_validator(CALL_LOGS, "post")
_PATCH_VALIDATOR = _body_validator(CALL_LOG, "patch")
# The lead's `format: date` (dateOfBirth, assessmentDate) and `format: email` are checked.
_LEAD_VALIDATOR = _body_validator(LEADS, "post", ("date", "email"))
_LEAD_SCHEMA = _LEAD_VALIDATOR.schema["properties"]
# The spec's example of `status` ("Active | Inactive": a new lead is Active) and of the
# referrer's type ("client | caregiver | contact | organization | other").
LEAD_STATUSES = frozenset(_LEAD_SCHEMA["status"]["example"].split(" | "))
REFERRER_TYPES = frozenset(
    _LEAD_SCHEMA["referredBy"]["properties"]["type"]["examples"][0].split(" | ")
)
_ADDRESS_KEYS = tuple(_LEAD_SCHEMA["residentialAddress"]["properties"])
_CALL_LOG_LIMIT = next(
    p["schema"] for p in _SPEC["paths"][CALL_LOGS]["get"]["parameters"] if p["name"] == "limit"
)
# The spec's 400 messages for a time that is not ISO 8601 with an offset.
_DATETIME_ERROR = "incorrect DateTime string. Must be in a format ISO8601"
_LOG_TIME_ERROR = "dateTime field is required and must be a DateTime string in a format ISO8601"
_COMMENT_TIME_ERROR = (
    "dateTime field of the comment object is required and must be a valid ISO 8601 date time string"
)
# The spec's description of tags[].type: "supported options ... `applicant`, `caregiver`, ..."
TAG_TYPES = frozenset(
    re.findall(
        r"`(\w+)`",
        _CALL_LOG_VALIDATOR.schema["properties"]["tags"]["items"]["properties"]["type"][
            "description"
        ],
    )
)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The spec's error envelope for every documented 4xx/5xx of these operations.
    body = {"results": None, "success": False, "errors": [message]}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- deterministic people -----------------------------------------------------------------------

_FIRST = (
    "Ruth", "James", "María", "José", "Zoë", "Chloé", "Søren", "Björn", "Łukasz", "Nguyễn",
    "Aoife", "Dmitri", "Fatima", "Grace", "Hiroshi", "Ingrid", "Kwame", "Linda", "Renée", "Walter",
)  # fmt: skip
_LAST = (
    "Adams", "Baker", "García", "Müller", "O'Brien", "Núñez", "Øster", "Smith-Jones", "Tran",
    "Williams", "Kowalski", "Haddad", "Johnson", "de la Cruz", "Lee", "Brontë", "Nakamura", "Patel",
)  # fmt: skip
_CITIES = (("Oxnard", "CA", "930"), ("Milwaukee", "WI", "532"), ("Austin", "TX", "787"),
           ("Tampa", "FL", "336"), ("Portland", "OR", "972"), ("Albany", "NY", "122"))  # fmt: skip
_STREETS = ("Main St", "Oak Ave", "Elm St", "Maple Dr", "Cedar Ln", "Lakeview Rd")
_STATUSES = {
    "clients": (("Active", True), ("Temporarily Unavailable", True), ("On Vacation Leave", True),
                ("Discharged", False), ("Deceased", False)),
    "leads": (("New", True), ("Contacted", True), ("Assessment Scheduled", True), ("Lost", False)),
    "caregivers": (("Active", True), ("On Leave", True), ("Terminated", False)),
    "applicants": (("Applied", True), ("Interviewing", True), ("Hired", False),
                   ("Rejected", False)),
}  # fmt: skip


def _phone(rng: random.Random) -> str | None:
    """Free text, as AxisCare stores it: several formats, some blank, a few unusable."""
    area, mid, last = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    roll = rng.random()
    if roll < 0.2:
        return None
    if roll < 0.23:
        return rng.choice(("123", "n/a", ""))
    return rng.choice(
        (
            f"{area}-{mid}-{last:04d}",
            f"({area}) {mid}-{last:04d}",
            f"+1 {area} {mid} {last:04d}",
            f"{area}{mid}{last:04d}",
            f"{area}.{mid}.{last:04d} x{rng.randint(1, 99)}",
        )
    )


def _day(rng: random.Random, start: date, span_days: int) -> str:
    return (start + timedelta(days=rng.randrange(span_days))).isoformat()


def _address(rng: random.Random, name: str) -> dict[str, Any]:
    city, region, zip_prefix = rng.choice(_CITIES)
    return {
        "name": name,
        "streetAddress1": f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}",
        "streetAddress2": rng.choice(("", "", f"Apt {rng.randint(1, 40)}")),
        "locality": city,
        "region": region,
        "postalCode": f"{zip_prefix}{rng.randint(0, 99):02d}",
        "latitude": f"{rng.uniform(25, 48):.4f}",
        "longitude": f"{rng.uniform(-123, -73):.4f}",
    }


def _person(kind: str, person_id: int, rng: random.Random) -> dict[str, Any]:
    # A few legacy imports lack a first or last name.
    first = None if rng.random() < 0.02 else rng.choice(_FIRST)
    last = "" if rng.random() < 0.02 else rng.choice(_LAST)
    full = " ".join(n for n in (first, last) if n)
    email_local = re.sub(r"[^a-z]", "", (first or "x").lower()) or "person"
    label, active = rng.choice(_STATUSES[kind])
    person: dict[str, Any] = {
        "id": person_id,
        "firstName": first,
        "lastName": last,
        "status": {"label": label, "active": active},
        "dateOfBirth": _day(rng, date(1925, 1, 1), 365 * 75) if rng.random() < 0.8 else None,
        "createdDate": _day(rng, date(2019, 1, 1), 365 * 6),
        "personalEmail": (f"{email_local}.{person_id}@example.com" if rng.random() < 0.7 else None),
        "homePhone": _phone(rng),
        "mobilePhone": _phone(rng),
    }
    region = {"id": rng.randint(1, 4), "name": rng.choice(_CITIES)[0]}
    if kind == "clients":
        person.update(
            goesBy=rng.choice((None, None, None, first)),
            otherPhone=_phone(rng) if rng.random() < 0.3 else None,
            billingEmail=rng.choice(
                (None, person["personalEmail"], f"billing.{person_id}@example.org")
            ),
            residentialAddress=_address(rng, full),
            billingAddress=_address(rng, full) if rng.random() < 0.5 else None,
            startDate=_day(rng, date(2020, 1, 1), 365 * 5),
            effectiveEndDate=None,
            region=region,
            classes=[{"code": "PRV", "name": "Private Pay"}],
        )
    elif kind == "leads":
        person.update(residentialAddress=_address(rng, full), region=region)
    elif kind == "caregivers":
        person.update(
            goesBy=rng.choice((None, None, first)),
            otherPhone=_phone(rng) if rng.random() < 0.2 else None,
            mailingAddress=_address(rng, full),
            hireDate=_day(rng, date(2018, 1, 1), 365 * 7),
            region=region,
            classes=[{"code": "CNA", "name": "Certified Nursing Assistant"}],
        )
    else:
        person.update(
            mailingAddress=_address(rng, full),
            applicationDate=_day(rng, date(2024, 1, 1), 600),
        )
    return person


# What an admin change may set, per kind: every field of the kind's records but `id`.
SETTABLE = {kind: frozenset(_person(kind, 1, random.Random(0))) - {"id"} for kind in KINDS}
# Objects or null; `status` is always an object, `classes` a list, every other field text or null.
_OBJECT_FIELDS = frozenset({"region", "residentialAddress", "billingAddress", "mailingAddress"})


def _field_ok(name: str, value: object) -> bool:
    if name == "status":
        return (
            isinstance(value, dict)
            and isinstance(value.get("label"), str)
            and isinstance(value.get("active"), bool)
        )
    if name == "classes":
        return isinstance(value, list) and all(isinstance(c, dict) for c in value)
    kind = dict if name in _OBJECT_FIELDS else str
    return value is None or isinstance(value, kind)


def _generated_identity(rng: random.Random, person: dict[str, Any] | None) -> dict[str, Any]:
    """A name and a mobile phone unlike `person`'s (clean ones: generated people are reachable)."""
    while True:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        phone = f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
        if person is None or (
            (first, last) != (person["firstName"], person["lastName"])
            and phone != person["mobilePhone"]
        ):
            return {"firstName": first, "lastName": last, "mobilePhone": phone}


def generate_people(records: int, seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    """`records` people over the four kinds, ascending ids starting near 1 for every kind, so
    ids of different kinds overlap as in the real API."""
    rng = random.Random(seed)
    counts = {kind: int(records * share) for kind, share in _SHARES.items()}
    counts["applicants"] = records - sum(counts.values())
    people: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        next_id, rows = 0, []
        for _ in range(counts[kind]):
            next_id += rng.choice((1, 1, 1, 2, 3))  # deleted records leave gaps
            rows.append(_person(kind, next_id, rng))
        people[kind] = rows
    return people


# ---- state ---------------------------------------------------------------------------------------


class SandboxState:
    """People (generated once, persisted), call logs (persisted), counters, limiter, faults."""

    def __init__(
        self,
        data_dir: str | Path,
        token: str,
        records: int,
        rate_limit: float | None,
        live_envelope: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.token, self.live_envelope = token, live_envelope
        people_file = self.data_dir / PEOPLE_FILE
        stored = json.loads(people_file.read_text()) if people_file.exists() else None
        if stored is None or stored["records"] != records:
            stored = {"records": records, "people": generate_people(records)}
        self.records = records
        self.people: dict[str, list[dict[str, Any]]] = stored["people"]  # ascending ids
        self.by_id = {kind: {p["id"]: p for p in rows} for kind, rows in self.people.items()}
        # Ids are never reused, also after the highest person was deleted.
        self.next_ids: dict[str, int] = stored.get("nextIds") or {
            kind: max(self.by_id[kind], default=0) + 1 for kind in KINDS
        }
        self._rng = random.Random(records)
        self._save_people()
        logs_file = self.data_dir / CALL_LOGS_FILE
        self.call_logs: list[dict[str, Any]] = (
            json.loads(logs_file.read_text()) if logs_file.exists() else []
        )
        self.limiter = TokenBuckets(rate_limit) if rate_limit else None
        self.faults = FaultQueue()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()

    def _save_people(self) -> None:
        stored = {"records": self.records, "people": self.people, "nextIds": self.next_ids}
        (self.data_dir / PEOPLE_FILE).write_text(json.dumps(stored, ensure_ascii=False))

    def person(self, kind: str, person_id: int) -> dict[str, Any]:
        if person_id not in self.by_id[kind]:
            raise ApiError(404, f"{_SINGULAR[kind]} {person_id} not found")
        return self.by_id[kind][person_id]

    def create_person(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A new person with the kind's next (highest) id; generated name, mobile phone and
        email where `fields` give none."""
        person_id = self.next_ids[kind]
        person = _person(kind, person_id, self._rng) | _generated_identity(self._rng, None)
        local = re.sub(r"[^a-z]", "", person["firstName"].lower()) or "person"
        person["personalEmail"] = f"{local}.{person_id}@example.com"
        person["createdDate"] = datetime.now(UTC).date().isoformat()
        return self.add_person(kind, _with_fields(kind, person, fields))

    def add_person(self, kind: str, person: dict[str, Any]) -> dict[str, Any]:
        """Store `person`, which carries the kind's next id (an admin or API create)."""
        if person["id"] != self.next_ids[kind]:
            raise ValueError(f"a new {_SINGULAR[kind]} takes id {self.next_ids[kind]}")
        self.next_ids[kind] += 1
        self.people[kind].append(person)
        self.by_id[kind][person["id"]] = person
        self._save_people()
        return person

    def regions(self) -> dict[str, dict[str, Any]]:
        """The regions people are in, by name (the API names a lead's region by its name)."""
        return {
            p["region"]["name"]: p["region"]
            for rows in self.people.values()
            for p in rows
            if isinstance(p.get("region"), dict)
        }

    def update_person(self, kind: str, person_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` set; none: a generated new name and mobile phone."""
        person = self.person(kind, person_id)
        person.update(_with_fields(kind, person, fields or _generated_identity(self._rng, person)))
        self._save_people()
        return person

    def delete_person(self, kind: str, person_id: int) -> None:
        person = self.person(kind, person_id)
        self.people[kind].remove(person)
        del self.by_id[kind][person_id]
        self._save_people()

    def add_call_log(self, log_entry: dict[str, Any]) -> None:
        self.call_logs.append(log_entry)
        self.save_call_logs()

    def call_log(self, raw_id: str) -> dict[str, Any]:
        log_entry = next((c for c in self.call_logs if str(c["id"]) == raw_id), None)
        if log_entry is None:
            raise ApiError(404, "Call log was not found")
        return log_entry

    def save_call_logs(self) -> None:
        (self.data_dir / CALL_LOGS_FILE).write_text(json.dumps(self.call_logs, ensure_ascii=False))

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_kind.values()),
            "byKind": dict(sorted(self.by_kind.items())),
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "people": {kind: len(rows) for kind, rows in self.people.items()},
            "callLogs": self.call_logs,
            "pendingFaults": self.faults.pending,
        }


def _with_fields(kind: str, person: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    for name, value in fields.items():
        if name not in SETTABLE[kind]:
            settable = ", ".join(sorted(SETTABLE[kind]))
            raise ApiError(400, f"{kind} have no settable field {name!r}; settable: {settable}")
        if not _field_ok(name, value):
            raise ApiError(400, f"{name} has an invalid type")
    return {**person, **fields}


# ---- API -----------------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _int_list(name: str, raw: str) -> list[int]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ApiError(400, f"{name} must be a comma-delimited list of integer IDs")
    return [int(p) for p in parts]


def _limit(kind: str, raw: str | None) -> int:
    schema = _query_params(kind).get("limit")
    if schema is None or raw is None:  # applicants take no limit: a fixed page size
        return int((schema or {}).get("default", DEFAULT_PAGE_SIZE))
    low, high = schema.get("minimum", 1), schema.get("maximum", math.inf)
    if not raw.isdigit() or not low <= int(raw) <= high:
        bound = f"between {low} and {high}" if high != math.inf else f"at least {low}"
        raise ApiError(400, f"limit must be an integer {bound}")
    return int(raw)


class _Api:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def serve(self, request: Request, kind: str, handler: Handler) -> Response:
        response = await self._guarded(request, handler)
        self.state.by_kind[kind] += 1
        self.state.by_status[response.status_code] += 1
        return response

    async def _guarded(self, request: Request, handler: Handler) -> Response:
        """Faults, then the version header (checked before auth, as AxisCare does), then the
        token, then the per-token rate limit, then the handler."""
        fault = self.state.faults.take()
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                return _error(fault.status, "Injected sandbox fault", headers)
        version = request.headers.get("x-axiscare-api-version")
        if version is None:
            return _error(400, "X-AxisCare-Api-Version header is required")
        if version not in SUPPORTED_VERSIONS:
            return _error(400, "Unsupported version")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != self.state.token:
            return _error(401, "Unauthorized")
        if self.state.limiter is not None and (wait := self.state.limiter.acquire(token)):
            return _error(429, "Too many requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except Exception:
            log.exception("axiscare sandbox handler failed")
            return _error(500, "Internal server error")

    def people_route(self, kind: str) -> Handler:
        async def route(request: Request) -> Response:
            lookup = f"{_SINGULAR[kind]}Ids" in request.query_params
            op = f"{'lookup' if lookup else 'list'}_{kind}"
            return await self.serve(request, op, lambda r: self._list(kind, r))

        return route

    async def leads(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.people_route("leads")(request)
        return await self.serve(request, "create_lead", self._create_lead)

    async def _create_lead(self, request: Request) -> Response:
        """POST /api/leads: 201 with the lead as the list shows it. Beyond the body's schema:
        names must not be blank, `status` is Active or Inactive, an address is given whole
        (with a two-letter state), the region is one AxisCare has, a referrer has a type."""
        body = await _valid_body(request, _LEAD_VALIDATOR)
        for name in ("firstName", "lastName"):
            if not body[name].strip():
                raise ApiError(400, f"{name} is required")
        status = body.get("status", "Active")
        if status not in LEAD_STATUSES:
            allowed = " or ".join(sorted(LEAD_STATUSES))
            raise ApiError(400, f"status must be {allowed}, not {status!r}")
        lead: dict[str, Any] = {
            "id": self.state.next_ids["leads"],
            "firstName": body["firstName"],
            "lastName": body["lastName"],
            "status": {"label": status, "active": status == "Active"},
            "dateOfBirth": body.get("dateOfBirth"),
            "createdDate": datetime.now(UTC).date().isoformat(),
            "personalEmail": body.get("personalEmail"),
            "homePhone": body.get("homePhone"),
            "mobilePhone": body.get("mobilePhone"),
            "residentialAddress": _lead_address(body.get("residentialAddress")),
            "region": None,
        }
        if "region" in body:
            lead["region"] = self.state.regions().get(body["region"])
            if lead["region"] is None:
                raise ApiError(400, f"region {body['region']!r} not found")
        referrer = body.get("referredBy")
        if referrer is not None and (
            referrer.get("type") not in REFERRER_TYPES
            or not (referrer.get("id") or referrer.get("name"))
        ):
            types = ", ".join(sorted(REFERRER_TYPES))
            raise ApiError(400, f"referredBy needs a type ({types}) and an id or a name")
        for optional in ("assessmentDate", "gender", "referredBy", "priorityNote"):
            if optional in body:
                lead[optional] = body[optional]
        self.state.add_person("leads", lead)
        return JSONResponse({"results": lead, "errors": []}, status_code=201)

    async def call_logs(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.serve(request, "list_call_logs", self._list_call_logs)
        return await self.serve(request, "create_call_log", self._create_call_log)

    async def call_log(self, request: Request) -> Response:
        if request.method == "GET":
            return await self.serve(request, "get_call_log", self._get_call_log)
        return await self.serve(request, "update_call_log", self._update_call_log)

    async def _list(self, kind: str, request: Request) -> Response:
        query = request.query_params
        limit = _limit(kind, query.get("limit"))
        after_raw = query.get("startAfterId")
        if after_raw is not None and not after_raw.isdigit():
            raise ApiError(400, "startAfterId must be an integer")
        after = int(after_raw or 0)
        ids_param = f"{_SINGULAR[kind]}Ids"
        wanted = _int_list(ids_param, query[ids_param]) if ids_param in query else None
        statuses = (
            {s.strip().lower() for s in query["statuses"].split(",")}
            if "statuses" in query
            else None
        )
        rows = self.state.people[kind]
        if wanted is not None:  # explicit ids bypass the other filters (spec)
            rows = [
                self.state.by_id[kind][i]
                for i in sorted(set(wanted))
                if i in self.state.by_id[kind]
            ]
        elif statuses is not None:
            rows = [p for p in rows if p["status"]["label"].lower() in statuses]
        rows = [p for p in rows if p["id"] > after]
        page, more = rows[:limit], len(rows) > limit
        next_page = None
        if more:  # the same query, continued after this page's last id
            params = {k: v for k, v in query.items() if k not in ("startAfterId", "limit")}
            params["startAfterId"] = str(page[-1]["id"])
            if "limit" in _query_params(kind):
                params["limit"] = str(limit)
            next_page = f"{str(request.base_url).rstrip('/')}/api/{kind}?{urlencode(params)}"
        if kind not in _BARE_KINDS:
            body = {"results": {kind: page, "nextPage": next_page}, "errors": None, "success": True}
            return JSONResponse(body)
        not_found = sorted(set(wanted) - self.state.by_id[kind].keys()) if wanted else []
        status = 404 if not page else 207 if not_found else 200
        bare: dict[str, Any] = {kind: page, f"{kind}NotFound": not_found}
        if next_page is not None:  # nextPage is a plain string in the spec: absent at the end
            bare["nextPage"] = next_page
        if self.state.live_envelope:  # what a third party saw live: results.<kind> keyed by id
            results = {**bare, kind: {str(p["id"]): p for p in page}}
            return JSONResponse({"results": results, "errors": None}, status_code=status)
        return JSONResponse(bare, status_code=status)

    async def _create_call_log(self, request: Request) -> Response:
        body = await _valid_body(request, _CALL_LOG_VALIDATOR)
        _date_time(body["dateTime"], _LOG_TIME_ERROR)
        entry = {
            "id": len(self.state.call_logs) + 1,
            **{k: body[k] for k in ("callerName", "callerPhone", "followUp", "dateTime")},
            "followUpDone": False,
            "subject": body["subject"],
            "notes": body["notes"],
            "userId": SANDBOX_USER_ID,
            "comments": [],
            "tags": self._tags(request, body["tags"]),
        }
        self.state.add_call_log(entry)
        return JSONResponse({"results": {"data": entry}, "success": True, "errors": []})

    async def _get_call_log(self, request: Request) -> Response:
        entry = self.state.call_log(request.path_params["callLogId"])
        return JSONResponse({"results": {"data": entry}, "success": True, "errors": []})

    async def _update_call_log(self, request: Request) -> Response:
        """Only the keys sent change (all checked before any is applied); comments are
        appended with new ids, as the spec says ("Comments update is not supported")."""
        entry = self.state.call_log(request.path_params["callLogId"])
        body = await _valid_body(request, _PATCH_VALIDATOR)
        if "dateTime" in body:
            _date_time(body["dateTime"], _LOG_TIME_ERROR)
        comments = []
        next_id = 1 + max((c["id"] for e in self.state.call_logs for c in e["comments"]), default=0)
        for number, comment in enumerate(body.get("comments", [])):
            _date_time(comment["dateTime"], _COMMENT_TIME_ERROR)
            if comment["userId"] not in SANDBOX_USERS:
                raise ApiError(400, f"user {comment['userId']} not found")
            user = {"id": comment["userId"], "name": SANDBOX_USERS[comment["userId"]]}
            comments.append(
                {
                    "id": next_id + number,
                    "comment": comment["comment"],
                    "dateTime": comment["dateTime"],
                    "user": user,
                }
            )
        changes = {k: v for k, v in body.items() if k not in ("tags", "comments")}
        if "tags" in body:
            changes["tags"] = self._tags(request, body["tags"])
        entry.update(changes)
        # Newest first, as the spec's examples list them.
        entry["comments"] = [*reversed(comments), *entry["comments"]]
        self.state.save_call_logs()
        return JSONResponse({"results": {"data": entry}, "success": True, "errors": []})

    async def _list_call_logs(self, request: Request) -> Response:
        """Ascending ids, filtered by callLogIds and the dateTime range, `limit` per page with
        the next page's full URL."""
        query = request.query_params
        raw_limit = query.get("limit")
        low, high = _CALL_LOG_LIMIT["minimum"], _CALL_LOG_LIMIT["maximum"]
        if raw_limit is not None and (not raw_limit.isdigit() or not low <= int(raw_limit) <= high):
            raise ApiError(400, f"limit must be an integer between {low} and {high}")
        limit = int(raw_limit or _CALL_LOG_LIMIT["default"])
        after_raw = query.get("startAfterId", "0")
        if not after_raw.isdigit():
            raise ApiError(400, "startAfterId must be an integer")
        rows = [c for c in self.state.call_logs if c["id"] > int(after_raw)]
        if "callLogIds" in query:
            wanted = set(_int_list("callLogIds", query["callLogIds"]))
            rows = [c for c in rows if c["id"] in wanted]
        for name, keep in (
            ("fromDateTime", lambda a, b: a >= b),
            ("toDateTime", lambda a, b: a <= b),
        ):
            if name in query:
                bound = _date_time(query[name].replace(" ", "+"))
                rows = [c for c in rows if keep(datetime.fromisoformat(c["dateTime"]), bound)]
        page, next_page = rows[:limit], None
        if len(rows) > limit:
            params = {k: v for k, v in query.items() if k != "startAfterId"}
            params |= {"startAfterId": str(page[-1]["id"]), "limit": str(limit)}
            next_page = f"{str(request.base_url).rstrip('/')}{CALL_LOGS}?{urlencode(params)}"
        results: dict[str, Any] = {"callLogs": page}
        if next_page is not None:  # a plain string in the spec: absent at the end
            results["nextPage"] = next_page
        return JSONResponse({"results": results, "success": True, "errors": []})

    def _tags(self, request: Request, raw_tags: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The call log's tags as AxisCare shows them (name, type, profile url)."""
        tags = []
        for tag in raw_tags:
            kind = f"{tag['type']}s"
            if tag["type"] not in TAG_TYPES:
                raise ApiError(400, f"Unsupported tag type {tag['type']!r}")
            person = self.state.by_id[kind].get(tag["entityId"])
            if person is None:
                raise ApiError(400, f"{tag['type']} {tag['entityId']} not found")
            profile = "customers" if kind == "clients" else kind
            site = str(request.base_url).rstrip("/")
            tags.append(
                {
                    "name": f"{person['lastName']}, {person['firstName'] or ''}".strip(", "),
                    "type": tag["type"],
                    "url": f"{site}?{profile}-profile.php&id={person['id']}",
                }
            )
        return tags


async def _valid_body(request: Request, validator: Draft202012Validator) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "Request body must be valid JSON") from None
    error = next(iter(sorted(validator.iter_errors(body), key=str)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        raise ApiError(400, f"{where}: {error.message}")
    return body


def _lead_address(address: dict[str, Any] | None) -> dict[str, Any] | None:
    """A lead's residentialAddress as AxisCare shows it (city as locality, state as region);
    the spec wants the whole object when one is given."""
    if address is None:
        return None
    missing = [key for key in _ADDRESS_KEYS if key not in address]
    if missing:
        raise ApiError(400, f"residentialAddress must be complete: {', '.join(missing)} missing")
    if not re.fullmatch(r"[A-Z]{2}", address["state"]):
        raise ApiError(400, "residentialAddress.state must be a two character state code")
    return {
        "name": address["name"],
        "streetAddress1": address["streetAddress1"],
        "streetAddress2": address["streetAddress2"],
        "locality": address["city"],
        "region": address["state"],
        "postalCode": address["postalCode"],
        "latitude": None,
        "longitude": None,
    }


def _date_time(value: str, error: str = _DATETIME_ERROR) -> datetime:
    """An ISO 8601 time with an offset, as AxisCare requires; else 400 with `error` (the
    spec's message for the field)."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ApiError(400, error)
    return when


# ---- admin: people changed while a sync runs -----------------------------------------------------
def _admin(change: Callable[[SandboxState, str, Request], Awaitable[Any]]) -> Handler:
    """An admin route of `/_sandbox/people[?kind=...]` (see `SandboxServer.people`): `change`
    answers the JSON to send, or None for 204."""

    async def handler(request: Request) -> Response:
        kind = request.query_params.get("kind", "clients")
        try:
            if kind not in KINDS:
                raise ApiError(400, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
            content = await change(request.app.state.sandbox, kind, request)
        except ApiError as exc:
            return JSONResponse({"message": exc.message}, exc.status)
        return Response(status_code=204) if content is None else JSONResponse(content)

    return handler


def _person_id(request: Request) -> int:
    raw = request.path_params["id"]
    if not raw.isdigit():
        raise ApiError(400, "a person id is an integer")
    return int(raw)


async def _fields(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise ApiError(400, "Request body must be valid JSON") from None
    fields = body.get("fields", {}) if isinstance(body, dict) else None
    if not isinstance(fields, dict):
        raise ApiError(400, 'Request body must be {"fields": {...}}')
    return fields


async def _list_or_create(state: SandboxState, kind: str, request: Request) -> Any:
    if request.method == "GET":
        return state.people[kind]
    return state.create_person(kind, await _fields(request))


async def _update_or_delete(state: SandboxState, kind: str, request: Request) -> Any:
    if request.method == "DELETE":
        return state.delete_person(kind, _person_id(request))
    return state.update_person(kind, _person_id(request), await _fields(request))


async def _merge(state: SandboxState, kind: str, request: Request) -> Any:
    raise ApiError(404, "AxisCare has no merges: people cannot be merged")


_TAGGED_ID = re.compile(r"[?&]id=([0-9]+)$")


def sandbox_activities(state: SandboxState) -> list[dict[str, Any]]:
    """What was logged on people, one shape for every simulator: `person` is the connector's
    record key ("client-5", from the tag's type and profile link), `body` the notes; a call log
    tagged with several people is listed once per person (untagged: `person` None)."""
    found = []
    for log_entry in state.call_logs:
        people = [
            f"{tag['type']}-{match[1]}"
            for tag in log_entry["tags"]
            if (match := _TAGGED_ID.search(tag["url"]))
        ]
        for person in people or [None]:
            found.append(
                {
                    "id": str(log_entry["id"]),
                    "kind": "call",
                    "person": person,
                    "subject": log_entry["subject"],
                    "body": log_entry["notes"],
                    "record": log_entry,
                }
            )
    return found


async def _admin_activities(request: Request) -> Response:
    return JSONResponse({"activities": sandbox_activities(request.app.state.sandbox)})


def build_app(state: SandboxState) -> Starlette:
    api = _Api(state)
    routes = [
        Route(f"/api/{kind}", api.people_route(kind), methods=["GET"])
        for kind in KINDS
        if kind != "leads"
    ]
    app = Starlette(
        routes=[
            *routes,
            Route(LEADS, api.leads, methods=["GET", "POST"]),
            Route(CALL_LOGS, api.call_logs, methods=["GET", "POST"]),
            Route(CALL_LOG, api.call_log, methods=["GET", "PATCH"]),
            Route("/_sandbox/activities", _admin_activities, methods=["GET"]),
            Route("/_sandbox/people", _admin(_list_or_create), methods=["GET", "POST"]),
            Route("/_sandbox/people/{id}", _admin(_update_or_delete), methods=["PATCH", "DELETE"]),
            Route("/_sandbox/people/{id}/merge", _admin(_merge), methods=["POST"]),
            *admin_routes(FAULT_STATUSES),
        ]
    )
    app.state.sandbox = state
    return app


class AxisCareSandbox(SandboxServer):
    """Runs the sandbox in-process on 127.0.0.1 (uvicorn in a background thread)."""

    name = "AxisCare"

    def __init__(
        self,
        data_dir: str | Path,
        token: str = "axiscare-sandbox-token",
        records: int = 500,
        rate_limit: float | None = 5.0,  # the ~5 requests/s a third party reports
        port: int = 0,
        live_envelope: bool = False,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.token = Path(data_dir), token
        self._options = {"records": records, "rate_limit": rate_limit}
        self._live_envelope = live_envelope

    def _create_state(self) -> SandboxState:
        return SandboxState(
            self.data_dir, self.token, live_envelope=self._live_envelope, **self._options
        )

    def _create_app(self, state: SandboxState) -> Starlette:
        return build_app(state)

    def reset_stats(self) -> None:
        self._admin_request("POST", "reset-stats")

    def call_logs(self) -> list[dict[str, Any]]:
        """Every call log as the API shows it, oldest first."""
        return self.stats()["callLogs"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--token", default="axiscare-sandbox-token")
    parser.add_argument("--rate-limit", type=float, default=5.0, help="requests/s per token")
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument(
        "--live-envelope",
        action="store_true",
        help="caregivers/applicants as results.<kind> keyed by id, as seen live",
    )
    args = parser.parse_args(argv)
    sandbox = AxisCareSandbox(
        args.data_dir,
        token=args.token,
        records=args.records,
        rate_limit=None if args.no_rate_limit else args.rate_limit,
        port=args.port,
        live_envelope=args.live_envelope,
    )
    serve_until_signalled(sandbox, "SANDBOX_READY")


if __name__ == "__main__":
    main()
