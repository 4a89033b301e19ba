"""The Attio sandbox over real HTTP: auth, body validation, paging, filters, notes, webhooks and
rate limits, with every response checked against the spec subset."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import phonenumbers
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from quo_sync_dagster.sandbox.attio_server import (
    API_TOKEN_ACTOR,
    ATTRIBUTE_IDS,
    COMPANIES,
    COMPANIES_OBJECT_ID,
    MEMBER_ACTOR,
    PEOPLE_FILE,
    PEOPLE_OBJECT_ID,
    QUERY,
    SPEC_PATH,
    WORKSPACE_ID,
    AttioSandbox,
    generate_people,
)
from quo_sync_dagster.sandbox.serving import SandboxServer

KEY = "attio-test-key"
RECORDS = 500
SPEC = json.loads(SPEC_PATH.read_text())
QUERY_URL = "/v2/objects/people/records/query"
COMPANIES_URL = "/v2/objects/companies/records/query"


def response_validator(path: str, method: str, status: int) -> Draft202012Validator:
    content = SPEC["paths"][path][method]["responses"][str(status)]["content"]
    return Draft202012Validator(
        content["application/json"]["schema"], format_checker=FormatChecker(("uuid",))
    )


ERROR = Draft202012Validator(SPEC["components"]["schemas"]["error"])
QUERY_200 = response_validator(QUERY, "post", 200)


def check(validator: Draft202012Validator, response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    validator.validate(body)
    return body


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttioSandbox]:
    with AttioSandbox(tmp_path_factory.mktemp("attio"), KEY, RECORDS, rate_limit=None) as sb:
        yield sb


@pytest.fixture(scope="module")
def http(sandbox: AttioSandbox) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=sandbox.url, headers=headers) as client:
        yield client


_VALIDATED: set[str] = set()  # people do not change: validating each once keeps the tests fast


def query(http: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    response = http.post(QUERY_URL, json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    QUERY_200.validate({"data": [p for p in data if p["id"]["record_id"] not in _VALIDATED]})
    _VALIDATED.update(ids(data))
    return data


def ids(people: list[dict[str, Any]]) -> list[str]:
    return [p["id"]["record_id"] for p in people]


def test_rejects_missing_or_wrong_bearer(sandbox: AttioSandbox) -> None:
    body = {"limit": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(sandbox.url + QUERY_URL, json=body, headers=headers)
        error = check(ERROR, response, 401)
        assert (error["status_code"], error["type"]) == (401, "auth_error")
        assert KEY not in response.text
    good = httpx.post(
        sandbox.url + QUERY_URL, json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert len(check(QUERY_200, good, 200)["data"]) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"limit": "10"}, "validation_type"),
        ({"limit": 2.5}, "validation_type"),
        ({"offset": -1}, "validation_type"),
        ({"sorts": [{"attribute": "created_at", "direction": "newest"}]}, "validation_type"),
        ({"sorts": [{"attribute": "updated_at", "direction": "desc"}]}, "filter_error"),
        ({"sorts": [{"attribute": "shoe_size", "direction": "asc"}]}, "filter_error"),
        ({"filter": {"shoe_size": "42"}}, "filter_error"),
        ({"filter": {"record_id": {"$between": ["a", "b"]}}}, "filter_error"),
    ],
)
def test_rejects_invalid_query_bodies(http: httpx.Client, body: dict, code: str) -> None:
    error = check(ERROR, http.post(QUERY_URL, json=body), 400)
    assert error["code"] == code
    if code == "filter_error":  # the one 400 the spec documents for this operation
        response_validator(QUERY, "post", 400).validate(error)


def test_paging_covers_every_person_once_newest_first(http: httpx.Client) -> None:
    desc = [{"attribute": "created_at", "direction": "desc"}]
    seen: list[dict[str, Any]] = []
    while True:
        page = query(http, limit=77, offset=len(seen), sorts=desc)
        seen += page
        if len(page) < 77:
            break
    assert len(seen) == RECORDS
    assert len(set(ids(seen))) == RECORDS
    stamps = [p["created_at"] for p in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert len(set(stamps)) == RECORDS  # so the order is total, not an accident of ties
    oldest_first = query(http, limit=RECORDS, sorts=[{**desc[0], "direction": "asc"}])
    assert ids(oldest_first) == ids(seen)[::-1]
    assert len(query(http)) == RECORDS  # limit defaults to 500


def test_people_are_realistic(http: httpx.Client) -> None:
    people = query(http, limit=RECORDS)
    emails = [len(p["values"]["email_addresses"]) for p in people]
    phones = [p["values"]["phone_numbers"] for p in people]
    assert 0 in emails and max(emails) >= 2
    assert any(not p for p in phones) and max(map(len, phones)) >= 2
    assert any(not p["values"]["name"][0]["full_name"].isascii() for p in people)
    all_phones = [v for p in phones for v in p]
    assert any(v["active_until"] is not None for v in all_phones)  # history is kept
    assert {v["country_code"] for v in all_phones} >= {"US", "GB", "JP"}
    for value in all_phones:
        number = phonenumbers.parse(value["phone_number"])
        assert phonenumbers.is_valid_number(number), value
        e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        assert value["phone_number"] == e164
    assert all(p["web_url"].endswith(p["id"]["record_id"]) for p in people)


def test_filters(http: httpx.Client) -> None:
    people = query(http, limit=RECORDS)
    wanted = ids(people[3:9])
    found = query(http, filter={"record_id": {"$in": wanted}})
    assert sorted(ids(found)) == sorted(wanted)
    person = next(p for p in people if len(p["values"]["phone_numbers"]) == 1)
    phone = person["values"]["phone_numbers"][0]["phone_number"]
    assert person["id"]["record_id"] in ids(query(http, filter={"phone_numbers": phone}))
    assert query(http, filter={"phone_numbers": "+15550000000"}) == []
    email = person["values"]["email_addresses"][0]["email_address"]
    by_email = query(http, filter={"email_addresses": email.upper()})
    assert ids(by_email) == [person["id"]["record_id"]]


def test_the_companies_people_reference_are_read_by_record_id(
    sandbox: AttioSandbox, http: httpx.Client
) -> None:
    people = query(http, limit=RECORDS)
    references = [v for p in people for v in active(p, "company")]
    assert any(not active(p, "company") for p in people)  # some people have no company
    assert {(v["target_object"], v["attribute_type"]) for v in references} == {
        ("companies", "record-reference")
    }
    referenced = {v["target_record_id"] for v in references}
    wanted = [*sorted(referenced), str(uuid.uuid4())]  # and an id no company has
    before = sandbox.stats()["byKind"]
    body = {"filter": {"record_id": {"$in": wanted}}, "limit": len(wanted)}
    companies = check(QUERY_200, http.post(COMPANIES_URL, json=body), 200)["data"]
    after = sandbox.stats()["byKind"]
    assert (after["query_companies"], after["query"]) == (
        before["query_companies"] + 1,
        before["query"],
    )
    assert sorted(c["id"]["record_id"] for c in companies) == sorted(referenced)
    for company in companies:
        assert company["id"]["object_id"] == COMPANIES_OBJECT_ID
        assert company["web_url"].endswith(f"/company/{company['id']['record_id']}")
        [name] = active(company, "name")
        assert name["attribute_type"] == "text" and name["value"].strip()


def test_companies_are_filtered_and_sorted_by_their_own_attributes(http: httpx.Client) -> None:
    by_id = f"/v2/objects/{COMPANIES_OBJECT_ID}/records/query"  # the object's ID works too
    sorts = [{"attribute": "name", "direction": "asc"}]
    everyone = check(QUERY_200, http.post(by_id, json={"sorts": sorts}), 200)["data"]
    names = [active(c, "name")[0]["value"] for c in everyone]
    assert len(everyone) == len(COMPANIES) and names == sorted(names)
    found = http.post(COMPANIES_URL, json={"filter": {"name": names[3]}}).json()["data"]
    assert [active(c, "name")[0]["value"] for c in found] == [names[3]]
    for body in (
        {"filter": {"email_addresses": "a@b.example"}},  # a people attribute
        {"sorts": [{"attribute": "phone_numbers", "direction": "asc"}]},
    ):
        assert check(ERROR, http.post(COMPANIES_URL, json=body), 400)["code"] == "filter_error"
    check(ERROR, http.post(COMPANIES_URL, json={"limit": "10"}), 400)


def test_get_record_and_not_found(sandbox: AttioSandbox, http: httpx.Client) -> None:
    record_id = query(http, limit=1)[0]["id"]["record_id"]
    response = http.get(f"/v2/objects/people/records/{record_id}")
    body = check(
        response_validator(QUERY.replace("/query", "/{record_id}"), "get", 200), response, 200
    )
    assert body["data"]["id"]["record_id"] == record_id
    not_found = response_validator(QUERY.replace("/query", "/{record_id}"), "get", 404)
    missing = "00000000-0000-4000-8000-000000000000"
    check(not_found, http.get(f"/v2/objects/people/records/{missing}"), 404)
    check(not_found, http.get(f"/v2/objects/deals/records/{record_id}"), 404)


def test_notes_are_validated_and_stored(sandbox: AttioSandbox, http: httpx.Client) -> None:
    record_id = query(http, limit=1)[0]["id"]["record_id"]
    data = {
        "parent_object": "people",
        "parent_record_id": record_id,
        "title": "Call with +15558675309",
        "format": "markdown",
        "content": "**Call** answered ☎️",
        "created_at": "2026-01-02T03:04:05.123456789Z",
    }
    note = check(
        response_validator("/v2/notes", "post", 200),
        http.post("/v2/notes", json={"data": data}),
        200,
    )
    assert note["data"]["content_plaintext"] == "Call answered ☎️"
    assert note["data"]["created_at"].startswith("2026-01-02T03:04:05.123456")
    assert sandbox.notes()[-1] == note["data"]
    for bad, status in (
        ({**data, "format": "html"}, 400),
        ({k: v for k, v in data.items() if k != "content"}, 400),
        ({**data, "parent_record_id": "not-a-uuid"}, 400),
        ({**data, "created_at": "2999-01-01T00:00:00Z"}, 400),
        ({**data, "parent_record_id": "00000000-0000-4000-8000-000000000000"}, 404),
        ({**data, "parent_object": "deals"}, 404),
    ):
        check(ERROR, http.post("/v2/notes", json={"data": bad}), status)
    assert len(sandbox.notes()) == 1


# The subset has no schema of its own for list/get/delete: GET /v2/notes/{note_id} answers
# `{"data": note}` like the create, the list `{"data": [note]}`, the delete `{}` (the spec's).
NOTE_200 = response_validator("/v2/notes", "post", 200)
NOTES_200 = Draft202012Validator(
    {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": NOTE_200.schema["properties"]["data"]}},
    },
    format_checker=FormatChecker(("uuid",)),
)
DELETED_200 = Draft202012Validator({"type": "object", "properties": {}, "maxProperties": 0})


def test_notes_are_listed_read_and_deleted(sandbox: AttioSandbox, http: httpx.Client) -> None:
    first, second = ids(query(http, limit=2, offset=40))

    def create(record_id: str, title: str) -> dict[str, Any]:
        data = {
            "parent_object": "people",
            "parent_record_id": record_id,
            "title": title,
            "format": "plaintext",
            "content": title,
        }
        return check(NOTE_200, http.post("/v2/notes", json={"data": data}), 200)["data"]

    mine = [create(first, f"mine {i}") for i in range(12)]
    theirs = create(second, "theirs")
    params = {"parent_object": "people", "parent_record_id": first}
    listed = check(NOTES_200, http.get("/v2/notes", params=params), 200)["data"]
    assert listed == mine[:10]  # the spec's default limit, oldest first
    page = http.get("/v2/notes", params={**params, "limit": 50, "offset": 10})
    assert check(NOTES_200, page, 200)["data"] == mine[10:]
    everyone = check(NOTES_200, http.get("/v2/notes", params={"limit": 50}), 200)["data"]
    assert theirs in everyone and mine[0] in everyone
    for bad, status in (
        ({"limit": 51}, 400),
        ({"limit": 0}, 400),
        ({"limit": "ten"}, 400),
        ({"offset": -1}, 400),
        ({"parent_record_id": "not-a-uuid"}, 400),
        ({"parent_object": "deals"}, 404),
    ):
        check(ERROR, http.get("/v2/notes", params=bad), status)

    note_id = mine[3]["id"]["note_id"]
    assert check(NOTE_200, http.get(f"/v2/notes/{note_id}"), 200)["data"] == mine[3]
    check(DELETED_200, http.delete(f"/v2/notes/{note_id}"), 200)
    gone = check(ERROR, http.get(f"/v2/notes/{note_id}"), 404)
    assert gone["message"] == f'Note with ID "{note_id}" was not found.'
    check(ERROR, http.delete(f"/v2/notes/{note_id}"), 404)
    check(ERROR, http.get("/v2/notes/not-a-uuid"), 400)
    listed = check(NOTES_200, http.get("/v2/notes", params={**params, "limit": 50}), 200)
    assert listed["data"] == [n for n in mine if n["id"]["note_id"] != note_id]
    assert note_id not in [n["id"]["note_id"] for n in sandbox.notes()]
    shown = {a["id"]: a for a in sandbox.activities()}  # every simulator's shape
    assert note_id not in shown
    kept = mine[4]["id"]["note_id"]
    assert shown[kept] == {
        "id": kept,
        "kind": "note",
        "person": first,
        "subject": "mine 4",
        "body": "mine 4",
        "record": mine[4],
    }
    by_kind = sandbox.stats()["byKind"]
    assert (by_kind["get_note"], by_kind["delete_note"]) == (3, 2)


def test_faults_can_name_their_kind_and_come_after_the_write(
    sandbox: AttioSandbox, http: httpx.Client
) -> None:
    record_id = ids(query(http, limit=1, offset=60))[0]
    data = {
        "parent_object": "people",
        "parent_record_id": record_id,
        "title": "written",
        "format": "plaintext",
        "content": "c",
    }
    sandbox.inject_fault(500, kinds=["create_note"], after_write=True)
    try:
        params = {"parent_object": "people", "parent_record_id": record_id}
        # a fault for creates does not answer a list
        assert check(NOTES_200, http.get("/v2/notes", params=params), 200)["data"] == []
        check(ERROR, http.post("/v2/notes", json={"data": data}), 500)
        assert sandbox.stats()["pendingFaults"] == 0
        listed = check(NOTES_200, http.get("/v2/notes", params=params), 200)["data"]
        assert [n["title"] for n in listed] == ["written"]  # served, then the answer failed
    finally:
        sandbox.clear_faults()


def test_webhooks_create_and_delete(sandbox: AttioSandbox, http: httpx.Client) -> None:
    subscriptions = [{"event_type": "record.updated", "filter": None}]
    data = {"target_url": "https://hooks.example/attio", "subscriptions": subscriptions}
    created = check(
        response_validator("/v2/webhooks", "post", 200),
        http.post("/v2/webhooks", json={"data": data}),
        200,
    )["data"]
    assert len(created["secret"]) == 64 and created["status"] == "active"
    for bad in (
        {**data, "target_url": "http://hooks.example/attio"},
        {**data, "subscriptions": [{"event_type": "person.updated", "filter": None}]},
    ):
        check(ERROR, http.post("/v2/webhooks", json={"data": bad}), 400)
    webhook_id = created["id"]["webhook_id"]
    delete = response_validator("/v2/webhooks/{webhook_id}", "delete", 200)
    check(delete, http.delete(f"/v2/webhooks/{webhook_id}"), 200)
    gone = response_validator("/v2/webhooks/{webhook_id}", "delete", 404)
    check(gone, http.delete(f"/v2/webhooks/{webhook_id}"), 404)
    stats = sandbox.stats()
    assert stats["byKind"]["create_webhook"] == 3 and stats["byKind"]["delete_webhook"] == 2
    assert stats["webhooks"] == 0


def test_reads_are_rate_limited_with_http_date(tmp_path) -> None:
    with AttioSandbox(tmp_path, KEY, records=5, rate_limit=2) as sb:
        headers = {"Authorization": f"Bearer {KEY}"}
        responses = [httpx.post(sb.url + QUERY_URL, json={}, headers=headers) for _ in range(6)]
        limited = [r for r in responses if r.status_code == 429]
        assert limited and responses[0].status_code == 200
        error = check(ERROR, limited[0], 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        wait = parsedate_to_datetime(limited[0].headers["Retry-After"]).timestamp() - time.time()
        assert 0 < wait <= 2.5
        assert sb.stats()["rateLimited"] == len(limited)


def test_state_persists_across_restarts(tmp_path) -> None:
    with AttioSandbox(tmp_path, KEY, records=7, rate_limit=None) as sb:
        first = sb.stats()
        headers = {"Authorization": f"Bearer {KEY}"}
        people = httpx.post(sb.url + QUERY_URL, json={}, headers=headers).json()["data"]
        note = {
            "parent_object": "people",
            "parent_record_id": people[0]["id"]["record_id"],
            "title": "t",
            "format": "plaintext",
            "content": "c",
        }
        httpx.post(sb.url + "/v2/notes", json={"data": note}, headers=headers).raise_for_status()
    with AttioSandbox(tmp_path, KEY, records=99, rate_limit=None) as sb:
        again = httpx.post(sb.url + QUERY_URL, json={}, headers=headers).json()["data"]
        assert again == people and first["people"] == 7
        assert [n["content_plaintext"] for n in sb.notes()] == ["c"]
        note_id = sb.notes()[0]["id"]["note_id"]
        httpx.delete(f"{sb.url}/v2/notes/{note_id}", headers=headers).raise_for_status()
    with AttioSandbox(tmp_path, KEY, records=7, rate_limit=None) as sb:
        assert sb.notes() == []  # the delete was kept too


def test_cli_prints_ready_line(tmp_path) -> None:
    command = [
        sys.executable,
        "-m",
        "quo_sync_dagster.sandbox.attio_server",
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
        "--records",
        "3",
        "--token",
        "T",
        "--no-rate-limit",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            line = process.stdout.readline().strip()
            assert line.startswith("SANDBOX_READY http://127.0.0.1:")
            url = line.split()[1]
            response = httpx.post(url + QUERY_URL, json={}, headers={"Authorization": "Bearer T"})
            assert len(response.json()["data"]) == 3
        finally:
            process.terminate()
            process.wait(10)


# ---- people changes while a sync runs, and the webhooks they send --------------------------
@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]  # lower-case names
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)


class Receiver:
    """Captures the POSTs sent to it on 127.0.0.1 (a free port), answering 200."""

    def __init__(self) -> None:
        self.received: list[Delivery] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._arrived:
                    receiver.received.append(Delivery(self.path, headers, raw))
                    receiver._arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Delivery]:
        with self._arrived:
            arrived = self._arrived.wait_for(lambda: len(self.received) >= count, timeout)
            assert arrived, f"{len(self.received)} of {count} deliveries arrived"
            return list(self.received)


def settled(sb: SandboxServer, queued: int, timeout: float = 15.0) -> dict[str, Any]:
    """The sandbox's delivery stats once `queued` deliveries were queued and none is pending:
    after this, nothing more arrives."""
    deadline = time.monotonic() + timeout
    while True:
        stats = sb.deliveries()
        if stats["queued"] >= queued and stats["pending"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[AttioSandbox]:
    """A small sandbox of its own: these tests change its people."""
    with AttioSandbox(tmp_path, KEY, records=30, rate_limit=None) as sb:
        yield sb


def client(sb: AttioSandbox) -> httpx.Client:
    return httpx.Client(base_url=sb.url, headers={"Authorization": f"Bearer {KEY}"})


def create_webhook(sb: AttioSandbox, target_url: str, subscriptions: list[dict]) -> dict:
    with client(sb) as http:
        body = {"data": {"target_url": target_url, "subscriptions": subscriptions}}
        response = http.post("/v2/webhooks", json=body)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def oldest_first(sb: AttioSandbox, limit: int = 500, offset: int = 0) -> list[str]:
    sorts = [{"attribute": "created_at", "direction": "asc"}]
    with client(sb) as http:
        body = {"sorts": sorts, "limit": limit, "offset": offset}
        return ids(http.post(QUERY_URL, json=body).json()["data"])


def active(person: dict[str, Any], attribute: str) -> list[dict[str, Any]]:
    return [v for v in person["values"][attribute] if v["active_until"] is None]


def test_admin_changes_are_what_the_api_serves(live: AttioSandbox) -> None:
    before = live.people()
    assert ids(before) == oldest_first(live)
    mobile = phonenumbers.example_number_for_type("NZ", phonenumbers.PhoneNumberType.MOBILE)
    national = phonenumbers.format_number(mobile, phonenumbers.PhoneNumberFormat.NATIONAL)
    created = live.create_person(
        {
            "name": {"first_name": "Aroha", "last_name": "Ngata"},
            "phone_numbers": [{"original_phone_number": national, "country_code": "NZ"}],
            "email_addresses": "Aroha@Example.org",
        }
    )
    new_id = created["id"]["record_id"]
    assert new_id not in ids(before)
    assert created["created_at"] > max(p["created_at"] for p in before)
    [phone] = active(created, "phone_numbers")
    assert (phone["country_code"], phone["phone_number"]) == ("NZ", "+64211234567")
    assert active(created, "email_addresses")[0]["email_address"] == "aroha@example.org"
    assert active(created, "name")[0]["full_name"] == "Aroha Ngata"
    assert oldest_first(live)[-1] == new_id  # a create lands at the end, oldest first

    edited, victim = ids(before)[4], ids(before)[7]
    old_name = active(before[4], "name")[0]["full_name"]
    updated = live.update_person(edited)  # a generated new name and phone
    assert active(updated, "name")[0]["full_name"] != old_name
    superseded = updated["values"]["name"][0]  # the old value is kept, inactive
    assert (superseded["full_name"], superseded["active_until"] is None) == (old_name, False)
    new_phone = active(updated, "phone_numbers")[0]["phone_number"]
    with client(live) as http:
        assert http.get(f"/v2/objects/people/records/{edited}").json()["data"] == updated
        by_phone = http.post(QUERY_URL, json={"filter": {"phone_numbers": new_phone}})
        assert edited in ids(by_phone.json()["data"])

        live.delete_person(victim)
        assert http.get(f"/v2/objects/people/records/{victim}").status_code == 404
        wanted = {"filter": {"record_id": {"$in": [victim, edited, new_id]}}}
        assert sorted(ids(http.post(QUERY_URL, json=wanted).json()["data"])) == sorted(
            [edited, new_id]
        )
    assert victim not in ids(live.people()) and victim not in oldest_first(live)
    assert len(live.people()) == len(before)  # one created, one deleted
    assert oldest_first(live).index(edited) == 4  # an update does not move a person
    with pytest.raises(httpx.HTTPStatusError) as gone:
        live.delete_person(victim)
    assert gone.value.response.status_code == 404
    assert live.stats()["people"] == len(before)


def test_a_persons_company_can_be_changed(live: AttioSandbox) -> None:
    person = next(p for p in live.people() if active(p, "company"))
    [old] = active(person, "company")
    new = next(c for c in COMPANIES if c != old["target_record_id"])
    reference = {"target_object": "companies", "target_record_id": new}
    changed = live.update_person(person["id"]["record_id"], {"company": reference})
    assert [v["target_record_id"] for v in active(changed, "company")] == [new]
    cleared = live.update_person(person["id"]["record_id"], {"company": None})
    assert active(cleared, "company") == []


@pytest.mark.parametrize(
    ("call", "status"),
    [
        (lambda sb, pid: sb.create_person({"shoe_size": "42"}), 400),
        (lambda sb, pid: sb.create_person({"name": {"first_name": ""}}), 400),
        (lambda sb, pid: sb.create_person({"name": [{"full_name": "A"}, {"full_name": "B"}]}), 400),
        (lambda sb, pid: sb.create_person({"phone_numbers": ["+1 555 010 0000"]}), 400),
        (lambda sb, pid: sb.create_person({"phone_numbers": [{"country_code": "US"}]}), 400),
        (lambda sb, pid: sb.create_person({"email_addresses": ["not-an-address@"]}), 400),
        (lambda sb, pid: sb.create_person({"job_title": 7}), 400),
        (lambda sb, pid: sb.update_person(pid, {"company": str(uuid.uuid4())}), 400),
        (
            lambda sb, pid: sb.update_person(
                pid,
                {"company": {"target_object": "deals", "target_record_id": next(iter(COMPANIES))}},
            ),
            400,
        ),
        (lambda sb, pid: sb.create_person(kind="companies"), 400),
        (lambda sb, pid: sb.update_person("00000000-0000-4000-8000-000000000000"), 404),
        (lambda sb, pid: sb.merge_people(pid, into=pid), 400),
        (lambda sb, pid: sb.merge_people(pid, into="00000000-0000-4000-8000-000000000000"), 404),
    ],
)
def test_admin_refuses_bad_changes(live: AttioSandbox, call: Callable, status: int) -> None:
    before = live.people()
    with pytest.raises(httpx.HTTPStatusError) as refused:
        call(live, ids(before)[0])
    assert refused.value.response.status_code == status
    assert "message" in refused.value.response.json()
    assert live.people() == before  # nothing half-written


def check_delivery(delivery: Delivery, webhook: dict[str, Any]) -> dict[str, Any]:
    """The one event of a delivery, after checking its signature and headers."""
    expected = hmac.new(webhook["secret"].encode(), delivery.raw, hashlib.sha256).hexdigest()
    assert delivery.headers["attio-signature"] == expected
    assert delivery.headers["x-attio-signature"] == expected
    assert delivery.headers["content-type"] == "application/json"
    uuid.UUID(delivery.headers["idempotency-key"])
    body = delivery.json()
    assert set(body) == {"webhook_id", "events"}
    assert body["webhook_id"] == webhook["id"]["webhook_id"]
    [event] = body["events"]  # Attio sends one event per delivery
    return event


def record_ids(record_id: str, **extra: str) -> dict[str, str]:
    return {
        "workspace_id": WORKSPACE_ID,
        "object_id": PEOPLE_OBJECT_ID,
        "record_id": record_id,
        **extra,
    }


def test_changes_are_delivered_signed_to_the_subscriptions_that_take_them(
    live: AttioSandbox,
) -> None:
    people_only = {
        "$and": [{"field": "id.object_id", "operator": "equals", "value": PEOPLE_OBJECT_ID}]
    }
    not_people = {
        "$and": [{"field": "id.object_id", "operator": "not_equals", "value": PEOPLE_OBJECT_ID}]
    }
    by_member = {
        "$or": [
            {"field": "id.object_id", "operator": "equals", "value": "companies"},
            {"field": "actor.type", "operator": "equals", "value": "workspace-member"},
        ]
    }
    with Receiver() as rx:
        events = ("record.created", "record.updated", "record.deleted", "record.merged")
        everything = create_webhook(
            live, f"{rx.url}/all", [{"event_type": e, "filter": people_only} for e in events]
        )
        narrow = create_webhook(
            live,
            f"{rx.url}/narrow",
            [
                {"event_type": "record.updated", "filter": not_people},
                {"event_type": "record.deleted", "filter": by_member},
            ],
        )
        create_webhook(live, f"{rx.url}/notes", [{"event_type": "note.created", "filter": None}])

        created = live.create_person()
        record_id = created["id"]["record_id"]
        live.update_person(record_id, {"job_title": "Harbour master", "name": {"full_name": "Mo"}})
        live.update_person(record_id, {"job_title": "Harbour master"})  # no change: no event
        live.delete_person(record_id)
        rx.wait_for(5)
        stats = settled(live, queued=5)

    assert (stats["queued"], stats["sent"], stats["failed"]) == (5, 5, 0)
    assert sorted(d.path for d in rx.received) == ["/all"] * 4 + ["/narrow"]
    got = {
        (d.path, json.dumps(check_delivery(d, everything if d.path == "/all" else narrow)))
        for d in rx.received
    }
    member = {"type": "workspace-member", "id": MEMBER_ACTOR["id"]}
    attribute = {a: ATTRIBUTE_IDS[a] for a in ("job_title", "name")}
    expected = [
        ("/all", {"event_type": "record.created", "id": record_ids(record_id)}),
        *(
            (
                "/all",
                {
                    "event_type": "record.updated",
                    "id": record_ids(record_id, attribute_id=attribute[a]),
                },
            )
            for a in ("job_title", "name")
        ),
        ("/all", {"event_type": "record.deleted", "id": record_ids(record_id)}),
        ("/narrow", {"event_type": "record.deleted", "id": record_ids(record_id)}),
    ]
    assert got == {(path, json.dumps({**event, "actor": member})) for path, event in expected}
    keys = [d.headers["idempotency-key"] for d in rx.received]
    assert len(set(keys)) == len(keys)


def test_merge_makes_a_new_record_and_two_merged_events(live: AttioSandbox) -> None:
    people = live.people()
    primary = next(p for p in people if active(p, "phone_numbers") and active(p, "job_title"))
    secondary = next(p for p in people if p != primary and active(p, "email_addresses"))
    with Receiver() as rx:
        events = ("record.created", "record.updated", "record.deleted", "record.merged")
        webhook = create_webhook(
            live, f"{rx.url}/hook", [{"event_type": e, "filter": None} for e in events]
        )
        merged = live.merge_people(secondary["id"]["record_id"], into=primary["id"]["record_id"])
        rx.wait_for(2)
        settled(live, queued=2)

    new_id = merged["id"]["record_id"]
    originals = [secondary["id"]["record_id"], primary["id"]["record_id"]]
    assert new_id not in originals
    assert [check_delivery(d, webhook) for d in rx.received] == [
        {
            "event_type": "record.merged",
            "id": record_ids(new_id),
            "duplicate_object_id": PEOPLE_OBJECT_ID,
            "duplicate_record_id": original,
            "actor": {"type": "workspace-member", "id": MEMBER_ACTOR["id"]},
        }
        for original in originals
    ]
    assert active(merged, "name") == active(primary, "name")  # the primary's value wins
    assert active(merged, "job_title") == active(primary, "job_title")
    company = active(primary, "company") or active(secondary, "company")
    assert [v["target_record_id"] for v in active(merged, "company")] == [
        v["target_record_id"] for v in company
    ]
    emails = {v["email_address"] for v in active(merged, "email_addresses")}
    assert emails == {
        v["email_address"]
        for p in (primary, secondary)
        for v in active(p, "email_addresses")  # both people's, once each
    }
    assert merged["created_at"] > max(p["created_at"] for p in people)
    with client(live) as http:
        for original in originals:
            assert http.get(f"/v2/objects/people/records/{original}").status_code == 404
        assert http.get(f"/v2/objects/people/records/{new_id}").json()["data"] == merged
    assert oldest_first(live)[-1] == new_id
    assert len(live.people()) == len(people) - 1


def test_lost_and_duplicated_deliveries_are_counted(live: AttioSandbox) -> None:
    with Receiver() as rx:
        webhook = create_webhook(
            live, f"{rx.url}/hook", [{"event_type": "record.created", "filter": None}]
        )
        assert live.webhook_faults(drop=1, duplicate=1)["drop"] == 1
        created = [live.create_person()["id"]["record_id"] for _ in range(2)]
        rx.wait_for(2)
        stats = settled(live, queued=2)
    assert (stats["queued"], stats["dropped"], stats["duplicated"], stats["sent"]) == (2, 1, 1, 2)
    first, second = rx.received  # both copies of the one kept, with one idempotency key
    assert first.raw == second.raw
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert check_delivery(first, webhook)["id"]["record_id"] in created


def test_offset_paging_under_concurrent_changes(live: AttioSandbox) -> None:
    """Oldest first, an offset page shifts back by the people deleted before it; creates
    append at the end and updates do not move anyone. What the sync's guarantee builds on."""
    everyone = oldest_first(live)
    first_page = oldest_first(live, limit=10, offset=0)
    assert first_page == everyone[:10]
    for record_id in first_page[:3]:
        live.delete_person(record_id)
    live.update_person(everyone[15])
    created = live.create_person()["id"]["record_id"]
    # The next page starts three people later than it would have: those three are skipped.
    assert oldest_first(live, limit=10, offset=10) == everyone[13:23]
    assert oldest_first(live) == [*everyone[3:], created]


def test_http_targets_only_on_loopback(live: AttioSandbox) -> None:
    subscriptions = [{"event_type": "record.created", "filter": None}]
    with client(live) as http:
        for url, status in (
            ("http://127.0.0.1:9/hook", 200),
            ("http://localhost/hook", 200),
            ("http://127.0.0.1.evil.example/hook", 400),
            ("http://hooks.example/127.0.0.1", 400),
        ):
            body = {"data": {"target_url": url, "subscriptions": subscriptions}}
            assert http.post("/v2/webhooks", json=body).status_code == status, url


def test_people_changes_persist_across_restarts(tmp_path: Path) -> None:
    with AttioSandbox(tmp_path, KEY, records=6, rate_limit=None) as sb:
        people = ids(sb.people())
        sb.update_person(people[0], {"job_title": "Skipper"})
        sb.delete_person(people[-1])  # the newest: a later create still comes after it
        merged = sb.merge_people(people[1], into=people[2])["id"]["record_id"]
        newest = max(p["created_at"] for p in sb.people())
        before = sb.people()
    with AttioSandbox(tmp_path, KEY, records=99, rate_limit=None) as sb:
        assert sb.people() == before
        assert ids(before) == [people[0], *people[3:5], merged]
        assert active(before[0], "job_title")[0]["value"] == "Skipper"
        assert sb.create_person()["created_at"] > newest


def test_a_new_record_comes_after_one_created_in_the_future(tmp_path: Path) -> None:
    """Clock skew or an import can leave a created_at ahead of now: new records still sort last."""
    people = generate_people(5)
    people[2]["created_at"] = "2099-01-01T00:00:00.000000000Z"
    (tmp_path / PEOPLE_FILE).write_text(json.dumps(people))
    with AttioSandbox(tmp_path, KEY, records=5, rate_limit=None) as sb:
        created = sb.create_person()
        merged = sb.merge_people(ids(people)[0], into=ids(people)[1])
        assert "2099-01-01T00:00:00.000000000Z" < created["created_at"] < merged["created_at"]
        assert oldest_first(sb)[-3:] == [
            ids(people)[2],
            created["id"]["record_id"],
            merged["id"]["record_id"],
        ]


# ---- people created through the API (POST /v2/objects/{object}/records) ------------------
CREATE = "/v2/objects/{object}/records"
CREATE_URL = "/v2/objects/people/records"
CALLER = "+14155550123"


def test_api_creates_hold_what_was_sent_and_are_served_like_any_person(tmp_path: Path) -> None:
    with AttioSandbox(tmp_path, KEY, records=20, rate_limit=None) as sb, Receiver() as rx:
        webhook = create_webhook(
            sb, f"{rx.url}/hook", [{"event_type": "record.created", "filter": None}]
        )
        before = sb.people()
        values = {
            "name": [
                {"first_name": "Unknown", "last_name": "caller", "full_name": "Unknown caller"}
            ],
            "phone_numbers": [{"original_phone_number": CALLER}],
            "email_addresses": [{"email_address": "Caller@Example.org"}],
            ATTRIBUTE_IDS["job_title"]: ["Night nurse"],  # by attribute ID, as text
            "lead_source": [{"value": "Inbound call"}],  # or as {"value": text}
        }
        with client(sb) as http:
            created = check(
                response_validator(CREATE, "post", 200),
                http.post(CREATE_URL, json={"data": {"values": values}}),
                200,
            )["data"]
            record_id = created["id"]["record_id"]
            assert created["created_at"] > max(p["created_at"] for p in before)
            assert created["web_url"].endswith(f"/person/{record_id}")
            [phone] = active(created, "phone_numbers")
            assert (phone["phone_number"], phone["country_code"]) == (CALLER, "US")
            assert active(created, "name")[0]["full_name"] == "Unknown caller"
            assert active(created, "email_addresses")[0]["email_address"] == "caller@example.org"
            assert active(created, "job_title")[0]["value"] == "Night nurse"
            assert active(created, "lead_source")[0]["value"] == "Inbound call"
            made_by = {
                v["created_by_actor"]["type"] for vs in created["values"].values() for v in vs
            }
            assert made_by == {"api-token"}  # the token made it, not a workspace member
            # Nothing generated beside what was sent: every other attribute is empty.
            assert set(created["values"]) == set(ATTRIBUTE_IDS)

            # Served like any person: read, queried by its phone, listed last oldest first.
            got = http.get(f"/v2/objects/people/records/{record_id}").json()["data"]
            assert got == created
            by_phone = http.post(QUERY_URL, json={"filter": {"phone_numbers": CALLER}})
            assert ids(by_phone.json()["data"]) == [record_id]
        assert oldest_first(sb)[-1] == record_id
        assert sb.people()[-1] == created
        stats = sb.stats()
        assert (stats["byKind"]["create_record"], stats["people"]) == (1, len(before) + 1)

        # Delivered as record.created, made by the API token.
        rx.wait_for(1)
        settled(sb, queued=1)
        api_token = {"type": "api-token", "id": API_TOKEN_ACTOR["id"]}
        assert check_delivery(rx.received[0], webhook) == {
            "event_type": "record.created",
            "id": record_ids(record_id),
            "actor": api_token,
        }
    with AttioSandbox(tmp_path, KEY, records=20, rate_limit=None) as sb:  # persisted
        assert sb.people()[-1] == created


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "validation_type"),
        ({"data": {}}, 400, "validation_type"),
        ({"data": {"values": []}}, 400, "validation_type"),
        ({"data": {"values": {"name": {"full_name": "A"}}}}, 400, "validation_type"),  # no array
        ({"data": {"values": {"phone_numbers": [CALLER[:6]]}}}, 400, "validation_type"),
        ({"data": {"values": {"phone_numbers": [{"country_code": "US"}]}}}, 400, "validation_type"),
        ({"data": {"values": {"name": ["Unknown caller"]}}}, 400, "validation_type"),
        (
            {"data": {"values": {"name": [{"first_name": "A"}, {"first_name": "B"}]}}},
            400,
            "validation_type",
        ),
        ({"data": {"values": {"email_addresses": ["nobody"]}}}, 400, "validation_type"),
        ({"data": {"values": {"job_title": [7]}}}, 400, "validation_type"),
        ({"data": {"values": {"shoe_size": ["42"]}}}, 404, "not_found"),
        (
            {"data": {"values": {"job_title": ["A"], ATTRIBUTE_IDS["job_title"]: ["B"]}}},
            400,
            "validation_type",
        ),
    ],
)
def test_api_creates_refuse_bad_bodies(
    live: AttioSandbox, body: dict[str, Any], status: int, code: str
) -> None:
    before = live.people()
    with client(live) as http:
        error = check(ERROR, http.post(CREATE_URL, json=body), status)
    assert error["code"] == code
    if status == 404:  # the spec documents this operation's 404 (and its 400, value_not_found)
        response_validator(CREATE, "post", 404).validate(error)
    assert live.people() == before


def test_api_creates_refuse_another_object_a_taken_email_and_bad_json(live: AttioSandbox) -> None:
    taken = next(v["email_address"] for p in live.people() for v in active(p, "email_addresses"))
    before = live.people()
    name = {"full_name": "Unknown caller", "first_name": "Unknown", "last_name": "caller"}
    with client(live) as http:
        values = {"name": [name], "phone_numbers": [CALLER]}
        deals = http.post("/v2/objects/deals/records", json={"data": {"values": values}})
        response_validator(CREATE, "post", 404).validate(check(ERROR, deals, 404))
        clash = {"data": {"values": {**values, "email_addresses": [taken.upper()]}}}
        assert check(ERROR, http.post(CREATE_URL, json=clash), 400)["code"] == (
            "uniqueness_conflict"
        )
        raw = http.post(
            CREATE_URL, content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert check(ERROR, raw, 400)["code"] == "validation_type"
        unauthorized = httpx.post(live.url + CREATE_URL, json={"data": {"values": values}})
        check(ERROR, unauthorized, 401)
    assert live.people() == before
    assert live.stats()["byKind"]["create_record"] == 4  # the 401 is counted too


def test_a_create_whose_answer_fails_is_written_and_announced(live: AttioSandbox) -> None:
    """An afterWrite fault: the person exists and record.created goes out, but the client
    sees a 500, as after a real Attio failure between the write and the answer."""
    with Receiver() as rx:
        create_webhook(live, f"{rx.url}/hook", [{"event_type": "record.created", "filter": None}])
        live.inject_fault(500, kinds=["create_record"], after_write=True)
        with client(live) as http:
            body = {"data": {"values": {"phone_numbers": [CALLER]}}}
            check(ERROR, http.post(CREATE_URL, json=body), 500)
        [made] = [
            p
            for p in live.people()
            if active(p, "phone_numbers")
            and active(p, "phone_numbers")[0]["phone_number"] == CALLER
        ]
        [delivery] = rx.wait_for(1)
        assert delivery.json()["events"][0]["id"]["record_id"] == made["id"]["record_id"]
