"""Strict local simulator of Quo's (formerly OpenPhone) v1 contacts, webhooks and activity API.

Request bodies and list queries are validated against schemas taken from the official OpenAPI
spec copy; error bodies use the spec's documented envelope for each operation and status. The
server only ever binds 127.0.0.1; `/_sandbox/*` admin endpoints are unauthenticated.

Admin switches for exactly-once tests (besides stats and the fault queue of serving.py):
- `POST /_sandbox/settings {"uniqueExternalIds": false}` (or `--accept-duplicates`): accept a
  second contact with the same source and externalId instead of answering 409, like a Quo that
  does not enforce it (its spec does not promise it). `stats()["duplicateExternalIds"]` counts
  the pairs held more than once.
- `GET /_sandbox/writes?after=N`: every contact create, patch and delete since write N, with
  its time and externalId (who was written, how often, when).
- `POST /_sandbox/contacts` (a list of create bodies): a workspace as an earlier sync left it,
  contacts with any source (`openphone-pipedrive`, which the public create refuses), for
  cutover tests and `quo-sync demo --legacy-contacts`.
- Calls and messages (quo_activity.py): `POST /_sandbox/calls` and `POST /_sandbox/messages`
  simulate one and emit its signed events to the webhooks registered through `/v1/webhooks/*`;
  `GET` of either lists what was simulated; `POST /_sandbox/webhook-faults` drops, duplicates,
  delays or reorders deliveries, `GET /_sandbox/deliveries` says what happened to them.
- Faults may name request `kinds` (e.g. `["create"]`), and be `afterWrite`: the request is
  served (a create is written) and then its answer is a 5xx (`status`), comes after
  `delaySeconds` (past the client's timeout) or is lost with the connection (`drop`), so the
  client cannot know whether it was written. `drop` without `afterWrite` loses the connection
  before the request is served.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from quo_sync_dagster.sandbox.quo_activity import (
    ACTIVITY_KINDS,
    PHONE_NUMBER,
    USER,
    USER_ID,
    ActivityState,
    CallSpec,
)
from quo_sync_dagster.sandbox.quo_state import (
    KINDS,
    Contact,
    ContactStore,
    RequestCounters,
    TokenBuckets,
    WriteLog,
)
from quo_sync_dagster.sandbox.serving import (
    AdminClient,
    Fault,
    FaultQueue,
    SandboxServer,
    admin_routes,
    serve_until_signalled,
)
from quo_sync_dagster.sandbox.webhook_delivery import delivery_routes

log = logging.getLogger(__name__)

SPEC_PATH = Path(__file__).parent / "specs" / "quo-openapi-v1.json"
CONTACTS, CONTACT, CUSTOM_FIELDS = "/v1/contacts", "/v1/contacts/{id}", "/v1/contact-custom-fields"
WEBHOOKS, WEBHOOK = "/v1/webhooks", "/v1/webhooks/{id}"
# POST /v1/webhooks/<kind>: one endpoint, and one set of allowed events, per kind
WEBHOOK_KINDS = ("messages", "calls", "call-summaries", "call-transcripts")
CALL, CALL_SUMMARY = "/v1/calls/{callId}", "/v1/call-summaries/{callId}"
CALL_TRANSCRIPT, CALL_RECORDINGS = "/v1/call-transcripts/{id}", "/v1/call-recordings/{callId}"
CALL_VOICEMAIL, MESSAGE = "/v1/call-voicemails/{callId}", "/v1/messages/{id}"
PHONE_NUMBERS, USERS = "/v1/phone-numbers", "/v1/users"
RESERVED_SOURCES = frozenset({"openphone", "device", "csv", "zapier", "google-people", "other"})
RESERVED_SOURCE_PREFIXES = ("openphone", "csv")
PREFILL_BATCH = 500  # contacts per admin prefill request
MAX_ARRAY_QUERY_VALUES = 20  # Quo's query parser rejects more repeated values (Lefthook finding)
SANDBOX_USER_ID = USER_ID
FAULT_STATUSES = frozenset({429, 500, 502, 503})
DEFAULT_CUSTOM_FIELDS: tuple[dict[str, str], ...] = (
    {"name": "Inbound Lead", "key": "inbound-lead", "type": "string"},
    {"name": "Lifetime Value", "key": "lifetime-value", "type": "number"},
    {"name": "VIP", "key": "vip", "type": "boolean"},
    {"name": "Interests", "key": "interests", "type": "multi-select"},
    {"name": "Last Visit", "key": "last-visit", "type": "date"},
)

Op = tuple[str, str]  # (spec path, lower-case method)
Handler = Callable[[Request], Awaitable[Response]]
_OPERATIONS: tuple[Op, ...] = (
    (CONTACTS, "post"),
    (CONTACTS, "get"),
    (CONTACT, "get"),
    (CONTACT, "patch"),
    (CONTACT, "delete"),
    (CUSTOM_FIELDS, "get"),
    *((f"{WEBHOOKS}/{kind}", "post") for kind in WEBHOOK_KINDS),
    (WEBHOOKS, "get"),
    (WEBHOOK, "get"),
    (WEBHOOK, "delete"),
    (CALL, "get"),
    (CALL_SUMMARY, "get"),
    (CALL_TRANSCRIPT, "get"),
    (CALL_RECORDINGS, "get"),
    (CALL_VOICEMAIL, "get"),
    (MESSAGE, "get"),
    (PHONE_NUMBERS, "get"),
    (USERS, "get"),
)
_CONFLICT = "A contact with the same source and external ID already exists"

_SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())
_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("uri")
def _is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parts = urlsplit(value)
    return bool(parts.scheme and (parts.netloc or parts.path))


def _operation(op: Op) -> dict[str, Any]:
    return _SPEC["paths"][op[0]][op[1]]


def _body_validator(op: Op) -> Draft202012Validator:
    schema = _operation(op)["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator(schema, format_checker=_FORMATS)


def _query_schema(op: Op) -> dict[str, Any]:
    """The operation's query parameters as one object schema, plus Quo's array-size limit."""
    params = [p for p in _operation(op)["parameters"] if p["in"] == "query"]
    properties = {p["name"]: copy.deepcopy(p["schema"]) for p in params}
    for schema in properties.values():
        if schema.get("type") == "array":
            schema["maxItems"] = MAX_ARRAY_QUERY_VALUES
    required = [p["name"] for p in params if p.get("required")]
    return {"type": "object", "properties": properties, "required": required}


def _path_schemas(op: Op) -> dict[str, dict[str, Any]]:
    return {
        p["name"]: p["schema"] for p in _operation(op).get("parameters", []) if p["in"] == "path"
    }


def _error_constants() -> dict[tuple[Op, int], dict[str, Any]]:
    """code/status/docs/title(/description) fixed by the spec for each documented error.

    The spec documents a single 400 body per operation (contacts: 0801400 "Invalid Custom Field
    Item", webhooks: 0305400 "Invalid Version", ...), so every 400 of the operation carries it;
    `message` and `errors` say what was wrong.
    """
    out = {}
    for op in _OPERATIONS:
        for status, response in _operation(op)["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            props = schema.get("properties", {})
            if "code" in props:
                out[(op, int(status))] = {k: v["const"] for k, v in props.items() if "const" in v}
    return out


_CREATE_VALIDATOR = _body_validator((CONTACTS, "post"))
_PATCH_VALIDATOR = _body_validator((CONTACT, "patch"))
_LIST_QUERY_SCHEMA = _query_schema((CONTACTS, "get"))
_LIST_QUERY_VALIDATOR = Draft202012Validator(_LIST_QUERY_SCHEMA)
_CUSTOM_FIELD_DEF_VALIDATOR = Draft202012Validator(
    _operation((CUSTOM_FIELDS, "get"))["responses"]["200"]["content"]["application/json"]["schema"][
        "properties"
    ]["data"]["items"]
)
_WEBHOOK_VALIDATORS = {
    kind: _body_validator((f"{WEBHOOKS}/{kind}", "post")) for kind in WEBHOOK_KINDS
}
_QUERIES = {  # op -> (query schema, its validator)
    op: (schema, Draft202012Validator(schema))
    for op in ((WEBHOOKS, "get"), (PHONE_NUMBERS, "get"), (USERS, "get"))
    for schema in (_query_schema(op),)
}
_ERRORS = _error_constants()


def _is_date(value: object) -> bool:
    try:
        return isinstance(value, str) and bool(datetime.fromisoformat(value))
    except ValueError:
        return False


_VALUE_CHECKS: dict[str, Callable[[object], bool]] = {
    "address": lambda v: isinstance(v, str),
    "string": lambda v: isinstance(v, str),
    "url": lambda v: isinstance(v, str),
    "multi-select": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "date": _is_date,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


def _error_item(path: str, message: str, schema_type: str, value: object = ...) -> dict[str, Any]:
    item: dict[str, Any] = {"path": path, "message": message, "schema": {"type": schema_type}}
    if value is not ...:
        item["value"] = value
    return item


def _type_name(schema: dict[str, Any]) -> str:
    if isinstance(schema.get("type"), str):
        return schema["type"]
    branches = schema.get("anyOf") or schema.get("allOf") or []
    return "|".join(dict.fromkeys(_type_name(b) for b in branches)) or "unknown"


def _validate(validator: Draft202012Validator, instance: object, what: str) -> None:
    """Raise a 400 listing the schema violations, in the spec's `errors` item shape."""
    errors = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: e.json_path)[:10]:
        path = "/" + "/".join(str(p) for p in err.absolute_path)
        if err.validator == "required":  # point at the missing property, like Quo does
            name = next(n for n in err.validator_value if err.message.startswith(repr(n)))
            prop = err.schema.get("properties", {}).get(name, {})
            errors.append(_error_item(path.rstrip("/") + f"/{name}", err.message, _type_name(prop)))
        else:
            errors.append(_error_item(path, err.message, _type_name(err.schema), err.instance))
    if errors:
        raise ApiError(400, f"Invalid {what}: {errors[0]['path']} {errors[0]['message']}", errors)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _new_id() -> str:
    return secrets.token_hex(12)  # Quo ids look like 24-hex Mongo ObjectIds


def _check_source(source: str | None) -> None:
    if source is not None and (
        source in RESERVED_SOURCES or source.startswith(RESERVED_SOURCE_PREFIXES)
    ):
        message = f"Source '{source}' is reserved"
        raise ApiError(400, message, [_error_item("/source", message, "string", source)])


def _list_items(items: list[dict[str, Any]], existing: list[dict[str, Any]]) -> list[dict]:
    """Replace an email/phone list: known item ids are kept (once), `value: null` drops the item."""
    unclaimed = {item["id"] for item in existing}
    out = []
    for item in items:
        if item["value"] is None:
            continue
        item_id = item.get("id")
        if item_id in unclaimed:
            unclaimed.discard(item_id)
        else:
            item_id = _new_id()
        out.append({"name": item["name"], "value": item["value"], "id": item_id})
    return out


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def _decode_token(token: str | None) -> int:
    if token is None:
        return 0
    try:
        prefix, _, seq = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).partition(b":")
        if prefix == b"after":
            return int(seq)
    except (binascii.Error, ValueError):
        pass
    message = "Invalid pageToken"
    raise ApiError(400, message, [_error_item("/pageToken", message, "string", token)])


class SandboxState:
    """Everything one sandbox server holds: contacts, config, counters, limiter and faults."""

    def __init__(
        self,
        data_dir: str | Path,
        api_keys: Iterable[str] = ("sandbox-key",),
        rate_limit: float | None = 10.0,
        retry_after_format: str = "seconds",
        custom_fields: Iterable[dict[str, str]] = DEFAULT_CUSTOM_FIELDS,
        unique_external_ids: bool = True,
    ) -> None:
        if retry_after_format not in ("seconds", "http-date"):
            raise ValueError(
                f"retry_after_format must be 'seconds' or 'http-date', not {retry_after_format!r}"
            )
        definitions = [dict(d) for d in custom_fields]
        for definition in definitions:
            _CUSTOM_FIELD_DEF_VALIDATOR.validate(definition)
        self.custom_fields = {d["key"]: d for d in definitions}
        self.api_keys = frozenset(api_keys)
        self.limiter = TokenBuckets(rate_limit) if rate_limit else None
        self.retry_after_format = retry_after_format
        self.store = ContactStore(Path(data_dir))
        self.writes = WriteLog()
        self.faults = FaultQueue()
        # False: a second contact with the same source and externalId is accepted, not a 409.
        self.unique_external_ids = unique_external_ids
        self.activity = ActivityState(self._contact_ids)
        self.reset_stats()

    def _contact_ids(self, number: str) -> list[str]:
        """Ids of the contacts with this phone number (a scan: only simulated activity asks)."""
        contacts, _, _ = self.store.page([], [], 0, 2**62)
        return [
            c["id"]
            for c in contacts
            if any(p["value"] == number for p in c["defaultFields"]["phoneNumbers"])
        ]

    def close(self) -> None:
        self.activity.close()
        self.store.close()

    def reset_stats(self) -> None:
        self.overall = RequestCounters()
        self.by_key: dict[str, RequestCounters] = {}

    def count(self, key: str, kind: str, status: int, at: float) -> None:
        self.overall.add(kind, status, at)
        self.by_key.setdefault(key, RequestCounters()).add(kind, status, at)

    def retry_after(self, wait: float) -> str:
        seconds = max(1, math.ceil(wait))
        if self.retry_after_format == "http-date":  # whole seconds, rounded up: never too early
            return formatdate(math.ceil(time.time() + seconds), usegmt=True)
        return str(seconds)

    def stats(self) -> dict[str, Any]:
        return {
            **self.overall.as_json(),
            "byApiKey": {k: c.as_json() for k, c in self.by_key.items()},
            **self.store.summary(),
            "pendingFaults": self.faults.pending,
            # Apart from byKind (the contact kinds), so contact-only checks keep their shape.
            "activityByKind": {k: self.overall.by_kind[k] for k in ACTIVITY_KINDS},
            **self.activity.summary(),
        }


class _Api:
    """The v1 endpoints. Every handler runs on the server's single event loop."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state
        activity = state.activity
        # Spec path -> (request kind, what it serves, its objects by the path's id).
        self._activity_objects: dict[str, tuple[str, str, dict[str, Any]]] = {
            CALL: ("call", "Call", activity.calls),
            CALL_SUMMARY: ("call_summary", "Call summary", activity.summaries),
            CALL_TRANSCRIPT: ("call_transcript", "Call transcript", activity.transcripts),
            CALL_RECORDINGS: ("call_recordings", "Call", activity.recordings),
            CALL_VOICEMAIL: ("call_voicemail", "Call voicemail", activity.voicemails),
            MESSAGE: ("message", "Message", activity.messages),
        }

    @staticmethod
    def _error(
        op: Op,
        status: int,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        consts = _ERRORS.get((op, status))
        if consts is None:  # undocumented (429, 502, 503): same envelope, code by Quo's scheme
            family = _ERRORS[(op, 401)]
            consts = {
                "code": f"{family['code'][:2]}0{status}",
                "status": status,
                "docs": family["docs"],
                "title": HTTPStatus(status).phrase,
            }
        body = {"message": message, **consts}
        if errors:
            body["errors"] = errors
        return JSONResponse(body, status_code=status, headers=headers)

    async def serve(self, request: Request, kind: str, op: Op, handler: Handler) -> Response:
        """Faults, then auth, then the per-key rate limit, then the handler; count the result.

        An `afterWrite` fault comes last instead: the request is served, then its answer fails.
        """
        at = time.time()
        api_key = request.headers.get("authorization")
        known = api_key in self.state.api_keys
        fault = self.state.faults.take(kind)
        response: Response | None = None
        if fault is not None and not fault.after_write:
            response = await self._faulty(op, fault)
        if response is None:
            response = await self._guarded(request, op, api_key if known else None, handler)
            if fault is not None and fault.after_write:  # served: a create is written
                response = await self._faulty(op, fault, after_write=True) or response
        self.state.count(api_key if known else "(unauthenticated)", kind, response.status_code, at)
        return response

    async def _faulty(self, op: Op, fault: Fault, after_write: bool = False) -> Response | None:
        """The injected fault's answer, after its delay; None: the request's own answer."""
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            return _Dropped()
        if fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            message = "Injected sandbox fault" + (
                " after the request was served" if after_write else ""
            )
            return self._error(op, fault.status, message, headers=headers)
        return None

    async def _guarded(
        self, request: Request, op: Op, api_key: str | None, handler: Handler
    ) -> Response:
        if api_key is None:
            missing = "authorization" not in request.headers
            message = "No API key found in request" if missing else "Invalid API key"
            return self._error(op, 401, message)
        if self.state.limiter is not None and (wait := self.state.limiter.acquire(api_key)):
            headers = {"Retry-After": self.state.retry_after(wait)}
            return self._error(op, 429, "API rate limit exceeded", headers=headers)
        try:
            return await handler(request)
        except ApiError as exc:
            return self._error(op, exc.status, exc.message, exc.errors)
        except Exception:
            log.exception("sandbox handler failed")
            return self._error(op, 500, "Unknown error")

    async def contacts(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.serve(request, "create", (CONTACTS, "post"), self._create)
        query = request.query_params
        kind = "lookup" if "externalIds" in query or "externalIds[]" in query else "list"
        return await self.serve(request, kind, (CONTACTS, "get"), self._list)

    async def contact(self, request: Request) -> Response:
        method = request.method.lower()
        handler = {"get": self._get, "patch": self._patch, "delete": self._delete}[method]
        return await self.serve(request, method, (CONTACT, method), handler)

    async def custom_field_definitions(self, request: Request) -> Response:
        return await self.serve(request, "custom_fields", (CUSTOM_FIELDS, "get"), self._fields)

    @staticmethod
    async def _json_body(request: Request, validator: Draft202012Validator) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            message = "Request body must be valid JSON"
            raise ApiError(400, message, [_error_item("/", message, "object")]) from None
        _validate(validator, body, "request body")
        return body

    def _existing(self, request: Request) -> Contact:
        contact = self.state.store.get(request.path_params["id"])
        if contact is None:
            raise ApiError(404, "Contact not found")
        return contact

    def _custom_items(self, items: list[dict], existing: list[dict]) -> list[dict[str, Any]]:
        """Resolve items by `key` (or by the contact's own item `id`) and type-check values."""
        key_of_id = {item["id"]: item["key"] for item in existing}
        id_of_key = {item["key"]: item["id"] for item in existing}
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for n, item in enumerate(items):
            key = item.get("key") or key_of_id.get(item.get("id", ""))
            definition = self.state.custom_fields.get(key or "")
            if definition is None or key in seen:
                problem = "Duplicate" if key in seen else "Unknown"
                message = f"{problem} custom field {key or item.get('id')!r}"
                raise ApiError(400, message, [_error_item(f"/customFields/{n}", message, "object")])
            seen.add(key)
            if item["value"] is None:
                continue
            if not _VALUE_CHECKS[definition["type"]](item["value"]):
                message = f"Custom field {key!r} expects a {definition['type']} value"
                path = f"/customFields/{n}/value"
                error = _error_item(path, message, definition["type"], item["value"])
                raise ApiError(400, message, [error])
            out.append(
                {
                    "name": definition["name"],
                    "key": key,
                    "id": id_of_key.get(key) or _new_id(),
                    "type": definition["type"],
                    "value": item["value"],
                }
            )
        return out

    async def _create(self, request: Request) -> Response:
        body = await self._json_body(request, _CREATE_VALIDATOR)
        _check_source(body.get("source"))
        contact = self._new_contact(body)
        if not self.state.store.insert(contact, unique=self.state.unique_external_ids):
            raise ApiError(409, _CONFLICT)
        self.state.writes.add("create", contact)
        return JSONResponse({"data": contact}, status_code=201)

    def _new_contact(self, body: dict[str, Any]) -> Contact:
        """The contact a valid create body makes (its source unchecked)."""
        fields, now = body["defaultFields"], _now()
        return {
            "id": _new_id(),
            "externalId": body.get("externalId"),
            "source": body.get("source", "public-api"),
            "sourceUrl": body.get("sourceUrl"),
            "defaultFields": {
                "company": fields.get("company"),
                "emails": _list_items(fields.get("emails", []), []),
                "firstName": fields["firstName"],
                "lastName": fields.get("lastName"),
                "phoneNumbers": _list_items(fields.get("phoneNumbers", []), []),
                "role": fields.get("role"),
            },
            "customFields": self._custom_items(body.get("customFields", []), []),
            "createdAt": now,
            "updatedAt": now,
            "createdByUserId": body.get("createdByUserId", SANDBOX_USER_ID),
        }

    async def prefill(self, request: Request) -> Response:
        """`POST /_sandbox/contacts` (a list of create bodies): contacts as an earlier system
        left them, with any source (the reserved `openphone*` ones included, which the public
        create refuses); neither counted as requests nor logged as writes. Answers the contacts
        made, in order; nothing is made if any body is invalid or, while externalIds are
        unique, takes a source and externalId that is taken (409)."""
        try:
            bodies = json.loads(await request.body())
            if not isinstance(bodies, list):
                raise ValueError("not a list of contact create bodies")
            for n, body in enumerate(bodies):
                _validate(_CREATE_VALIDATOR, body, f"contact {n}")
            contacts = [self._new_contact(body) for body in bodies]
        except ApiError as exc:
            return JSONResponse({"message": exc.message, "errors": exc.errors}, status_code=400)
        except ValueError as exc:
            return JSONResponse({"message": f"Invalid request body: {exc}"}, status_code=400)
        keys = [(c["source"], c["externalId"]) for c in contacts if c["externalId"] is not None]
        if self.state.unique_external_ids and (
            len(set(keys)) < len(keys) or self.state.store.taken(keys)
        ):
            return JSONResponse({"message": _CONFLICT}, status_code=409)
        for contact in contacts:
            self.state.store.insert(contact, unique=False)
        return JSONResponse(contacts, status_code=201)

    async def _get(self, request: Request) -> Response:
        return JSONResponse({"data": self._existing(request)})

    async def _patch(self, request: Request) -> Response:
        body = await self._json_body(request, _PATCH_VALIDATOR)
        old = self._existing(request)
        _check_source(body.get("source"))
        new = {**old, **{k: body[k] for k in ("externalId", "source", "sourceUrl") if k in body}}
        fields = body.get("defaultFields", {})
        new["defaultFields"] = {**old["defaultFields"], **fields}  # scalars merge
        for name in ("emails", "phoneNumbers"):  # lists are replaced wholesale
            if name in fields:
                new["defaultFields"][name] = _list_items(fields[name], old["defaultFields"][name])
        if "customFields" in body:
            new["customFields"] = self._custom_items(body["customFields"], old["customFields"])
        new["updatedAt"] = _now()
        # No await since _existing(): the read-modify-write cannot interleave with another write.
        if not self.state.store.replace(new, unique=self.state.unique_external_ids):
            raise ApiError(409, _CONFLICT)
        self.state.writes.add("patch", new)
        return JSONResponse({"data": new})

    async def _delete(self, request: Request) -> Response:
        contact = self.state.store.get(request.path_params["id"])
        if contact is None or not self.state.store.delete(contact["id"]):
            raise ApiError(404, "Contact not found")
        self.state.writes.add("delete", contact)
        return Response(status_code=204)

    async def _list(self, request: Request) -> Response:
        query = _parsed_query(request, (_LIST_QUERY_SCHEMA, _LIST_QUERY_VALIDATOR))
        contacts, total, next_seq = self.state.store.page(
            query.get("externalIds", []),
            query.get("sources", []),
            _decode_token(query.get("pageToken")),
            query["maxResults"],
        )
        token = None if next_seq is None else _encode_token(next_seq)
        return JSONResponse({"data": contacts, "totalItems": total, "nextPageToken": token})

    async def _fields(self, request: Request) -> Response:
        return JSONResponse({"data": list(self.state.custom_fields.values())})

    # ---- webhooks, calls, messages (state in quo_activity.py) -----------------------------
    async def webhook_create(self, kind: str, request: Request) -> Response:
        op = (f"{WEBHOOKS}/{kind}", "post")
        return await self.serve(request, "webhook_create", op, partial(self._add_webhook, kind))

    async def webhooks(self, request: Request) -> Response:
        return await self.serve(request, "webhook_list", (WEBHOOKS, "get"), self._webhooks)

    async def webhook(self, request: Request) -> Response:
        method = request.method.lower()
        handler = self._webhook if method == "get" else self._delete_webhook
        return await self.serve(request, f"webhook_{method}", (WEBHOOK, method), handler)

    async def activity_object(self, path: str, request: Request) -> Response:
        """The GET routes of one call's objects and of a message, by their spec path."""
        kind, what, objects = self._activity_objects[path]
        handler = partial(self._activity_object, (path, "get"), what, objects)
        return await self.serve(request, kind, (path, "get"), handler)

    async def phone_numbers(self, request: Request) -> Response:
        op = (PHONE_NUMBERS, "get")
        return await self.serve(request, "phone_numbers", op, self._phone_numbers)

    async def users(self, request: Request) -> Response:
        return await self.serve(request, "users", (USERS, "get"), self._users)

    async def _add_webhook(self, kind: str, request: Request) -> Response:
        body = await self._json_body(request, _WEBHOOK_VALIDATORS[kind])
        if body.get("userId", USER_ID) != USER_ID:
            raise ApiError(404, "User not found")
        return JSONResponse({"data": self.state.activity.add_webhook(body)}, status_code=201)

    async def _webhooks(self, request: Request) -> Response:
        op = (WEBHOOKS, "get")
        query = _parsed_query(request, _QUERIES[op])
        return JSONResponse({"data": self.state.activity.webhooks_of(query.get("userId", USER_ID))})

    def _existing_webhook(self, request: Request, op: Op) -> dict[str, Any]:
        webhook = self.state.activity.webhooks.get(_path_param(request, op, "id"))
        if webhook is None:
            raise ApiError(404, "Webhook not found")
        return webhook

    async def _webhook(self, request: Request) -> Response:
        return JSONResponse({"data": self._existing_webhook(request, (WEBHOOK, "get"))})

    async def _delete_webhook(self, request: Request) -> Response:
        webhook = self._existing_webhook(request, (WEBHOOK, "delete"))
        del self.state.activity.webhooks[webhook["id"]]
        return Response(status_code=204)

    async def _activity_object(
        self, op: Op, what: str, objects: dict[str, Any], request: Request
    ) -> Response:
        (name,) = _path_schemas(op)
        found = objects.get(_path_param(request, op, name))
        if found is None:  # a call without a summary, transcript or voicemail has none
            raise ApiError(404, f"{what} not found")
        return JSONResponse({"data": found})

    async def _phone_numbers(self, request: Request) -> Response:
        query = _parsed_query(request, _QUERIES[(PHONE_NUMBERS, "get")])
        return JSONResponse(
            {"data": [PHONE_NUMBER] if query.get("userId", USER_ID) == USER_ID else []}
        )

    async def _users(self, request: Request) -> Response:
        query = _parsed_query(request, _QUERIES[(USERS, "get")])
        start, users = _decode_token(query.get("pageToken")), [USER]
        end = start + query["maxResults"]
        token = _encode_token(end) if end < len(users) else None
        return JSONResponse(
            {"data": users[start:end], "totalItems": len(users), "nextPageToken": token}
        )


def _path_param(request: Request, op: Op, name: str) -> str:
    """The path parameter, if it matches the spec's pattern (an `AC…` call id, a `WH…` webhook
    id); a 400 otherwise."""
    value = request.path_params[name]
    pattern = _path_schemas(op)[name].get("pattern")
    if pattern and not re.search(pattern, value):
        message = f"Invalid {name}: must match {pattern}"
        raise ApiError(400, message, [_error_item(f"/{name}", message, "string", value)])
    return value


def _parsed_query(
    request: Request, query_schema: tuple[dict[str, Any], Draft202012Validator]
) -> dict[str, Any]:
    """The query string as the operation's parameters (`name[]` arrays, integers), validated
    by the (schema, validator) of `_query_schema`."""
    schema, validator = query_schema
    properties = schema["properties"]
    values: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        base = name.removesuffix("[]")
        is_array = properties.get(base, {}).get("type") == "array"
        values.setdefault(base if is_array else name, []).append(value)
    query: dict[str, Any] = {}
    for name, vals in values.items():
        prop = properties.get(name, {})
        if prop.get("type") == "integer":
            vals = [int(v) if v.lstrip("-").isdigit() else v for v in vals]
        query[name] = vals if prop.get("type") == "array" or len(vals) > 1 else vals[0]
    _validate(validator, query, "query")
    return query


class _Dropped(Response):
    """No answer: the status line goes out, then the connection is closed before the body, so
    the client gets a transport error. Counted as status 0."""

    def __init__(self) -> None:
        super().__init__(status_code=0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1024")]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        # Returning with the body unsent makes uvicorn close the connection (it logs that).


async def _writes(request: Request) -> Response:
    """`GET /_sandbox/writes?after=N&limit=L`: a list of the contact writes numbered above N,
    oldest first (see WriteLog)."""
    try:
        after = int(request.query_params.get("after", 0))
        limit = int(request.query_params.get("limit", 10_000))
        if after < 0 or limit < 1:
            raise ValueError
    except ValueError:
        return JSONResponse({"message": "after >= 0 and limit >= 1 are integers"}, 400)
    return JSONResponse(request.app.state.sandbox.writes.after(after, limit))


async def _simulated_calls(request: Request) -> Response:
    """`POST /_sandbox/calls` (CallSpec as camelCase JSON): simulate a call, emit its events;
    `GET`: every simulated call with its current objects."""
    activity: ActivityState = request.app.state.sandbox.activity
    if request.method == "GET":
        return JSONResponse([activity.call_record(r) for r in activity.simulated_calls])
    try:
        spec = CallSpec.from_json(json.loads(await request.body()))
    except ValueError as exc:
        return JSONResponse({"message": str(exc)}, status_code=400)
    return JSONResponse(activity.simulate_call(spec), status_code=201)


async def _simulated_messages(request: Request) -> Response:
    """`POST /_sandbox/messages` ({externalNumber, direction, text, toAsString?}): simulate a
    message, emit its event; `GET`: every simulated message."""
    activity: ActivityState = request.app.state.sandbox.activity
    if request.method == "GET":
        messages = activity.messages
        return JSONResponse(
            [{**r, "message": messages[r["messageId"]]} for r in activity.simulated_messages]
        )
    try:
        record = activity.simulate_message(json.loads(await request.body()))
    except ValueError as exc:
        return JSONResponse({"message": str(exc)}, status_code=400)
    return JSONResponse(record, status_code=201)


def build_app(state: SandboxState) -> Starlette:
    api = _Api(state)
    app = Starlette(
        routes=[
            Route(CONTACTS, api.contacts, methods=["GET", "POST"]),
            Route(CONTACT, api.contact, methods=["GET", "PATCH", "DELETE"]),
            Route(CUSTOM_FIELDS, api.custom_field_definitions, methods=["GET"]),
            *(
                Route(f"{WEBHOOKS}/{kind}", partial(api.webhook_create, kind), methods=["POST"])
                for kind in WEBHOOK_KINDS
            ),
            Route(WEBHOOKS, api.webhooks, methods=["GET"]),
            Route(WEBHOOK, api.webhook, methods=["GET", "DELETE"]),
            *(
                Route(path, partial(api.activity_object, path), methods=["GET"])
                for path in (CALL, CALL_SUMMARY, CALL_TRANSCRIPT, CALL_RECORDINGS, CALL_VOICEMAIL)
            ),
            Route(MESSAGE, partial(api.activity_object, MESSAGE), methods=["GET"]),
            Route(PHONE_NUMBERS, api.phone_numbers, methods=["GET"]),
            Route(USERS, api.users, methods=["GET"]),
            Route("/_sandbox/writes", _writes, methods=["GET"]),
            Route("/_sandbox/contacts", api.prefill, methods=["POST"]),
            Route("/_sandbox/calls", _simulated_calls, methods=["GET", "POST"]),
            Route("/_sandbox/messages", _simulated_messages, methods=["GET", "POST"]),
            *delivery_routes(),
            *admin_routes(
                FAULT_STATUSES,
                fault_kinds=(*KINDS, *ACTIVITY_KINDS),
                write_faults=True,
                settings=("unique_external_ids",),
            ),
        ]
    )
    app.state.sandbox, app.state.delivery = state, state.activity.delivery
    return app


class QuoAdmin(AdminClient):
    """The Quo sandbox's admin API, of a sandbox process at `url` (or in-process: QuoSandbox)."""

    name = "Quo"

    def reset_stats(self) -> None:
        self._admin_request("POST", "reset-stats")

    def accept_duplicates(self, accept: bool = True) -> None:
        """Accept a second contact with the same source and externalId (no 409), or not."""
        self.settings(unique_external_ids=not accept)

    def prefill_contacts(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put contacts (create bodies, any source) into Quo as an earlier system left them;
        the contacts made, in order."""
        made: list[dict[str, Any]] = []
        for start in range(0, len(bodies), PREFILL_BATCH):
            batch = list(bodies[start : start + PREFILL_BATCH])
            made += self._admin_request("POST", "contacts", json=batch).json()
        return made

    def writes(self, after: int = 0) -> list[dict[str, Any]]:
        """Every contact write numbered above `after` that the sandbox still holds."""
        found: list[dict[str, Any]] = []
        while batch := self._admin_request("GET", "writes", params={"after": after}).json():
            found += batch
            after = batch[-1]["n"]
        return found

    def simulate_call(
        self,
        external_number: str,
        direction: str = "incoming",
        outcome: str = "answered",
        duration: int | None = None,
        *,
        recording: bool = False,
        summary: bool = False,
        transcript: bool = False,
        empty_participants: bool = False,
    ) -> dict[str, Any]:
        """Simulate a call (outcome answered|missed|voicemail; only an answered one has a
        recording, summary or transcript) and emit its events to the registered webhooks.
        Returns {callId, eventIds, events: [{id, type}], deliveries, deepLink, ...}."""
        spec: dict[str, Any] = {
            "externalNumber": external_number,
            "direction": direction,
            "outcome": outcome,
            "recording": recording,
            "summary": summary,
            "transcript": transcript,
            "emptyParticipants": empty_participants,
        }
        if duration is not None:
            spec["duration"] = duration
        return self._admin_request("POST", "calls", json=spec).json()

    def simulate_message(
        self,
        external_number: str,
        text: str,
        direction: str = "incoming",
        *,
        to_as_string: bool = False,
    ) -> dict[str, Any]:
        """Simulate a message; message.received (incoming) or message.delivered (outgoing)."""
        spec = {"externalNumber": external_number, "direction": direction, "text": text}
        if to_as_string:
            spec["toAsString"] = True
        return self._admin_request("POST", "messages", json=spec).json()

    def simulated_calls(self) -> list[dict[str, Any]]:
        """Every simulated call, with its call, recordings, summary, transcript, voicemail."""
        return self._admin_request("GET", "calls").json()

    def simulated_messages(self) -> list[dict[str, Any]]:
        return self._admin_request("GET", "messages").json()


class QuoSandbox(SandboxServer, QuoAdmin):
    """Runs the sandbox in-process on 127.0.0.1 (uvicorn in a background thread)."""

    def __init__(
        self,
        data_dir: str | Path,
        api_keys: Sequence[str] = ("sandbox-key",),
        rate_limit: float | None = 10.0,
        retry_after_format: str = "seconds",
        custom_fields: Iterable[dict[str, str]] = DEFAULT_CUSTOM_FIELDS,
        port: int = 0,
        unique_external_ids: bool = True,
    ) -> None:
        super().__init__(port)
        self.data_dir, self.api_keys = Path(data_dir), tuple(api_keys)
        self._options = {
            "rate_limit": rate_limit,
            "retry_after_format": retry_after_format,
            "custom_fields": tuple(custom_fields),
            "unique_external_ids": unique_external_ids,
        }

    @property
    def api_key(self) -> str:
        return self.api_keys[0]

    def _create_state(self) -> SandboxState:
        return SandboxState(self.data_dir, self.api_keys, **self._options)

    def _create_app(self, state: SandboxState) -> Starlette:
        return build_app(state)

    def _close_state(self, state: SandboxState) -> None:
        state.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rate-limit", type=float, default=10.0, help="requests/s per API key")
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--api-key", action="append", dest="api_keys")
    parser.add_argument("--retry-after-format", choices=("seconds", "http-date"), default="seconds")
    parser.add_argument("--custom-fields", type=Path, help="JSON list of {name, key, type}")
    parser.add_argument(
        "--accept-duplicates",
        action="store_true",
        help="no 409 for a second contact with the same source and externalId",
    )
    args = parser.parse_args(argv)
    sandbox = QuoSandbox(
        args.data_dir,
        api_keys=args.api_keys or ("sandbox-key",),
        rate_limit=None if args.no_rate_limit else args.rate_limit,
        retry_after_format=args.retry_after_format,
        custom_fields=(
            json.loads(args.custom_fields.read_text())
            if args.custom_fields
            else DEFAULT_CUSTOM_FIELDS
        ),
        port=args.port,
        unique_external_ids=not args.accept_duplicates,
    )
    serve_until_signalled(sandbox, "QUO_SANDBOX_READY")


if __name__ == "__main__":
    main()
