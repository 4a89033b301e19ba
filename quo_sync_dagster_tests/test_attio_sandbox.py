"""The Attio sandbox over real HTTP: auth, body validation, paging, filters, notes, webhooks and
rate limits, with every response checked against the spec subset."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import phonenumbers
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from quo_sync_dagster.sandbox.attio_server import QUERY, SPEC_PATH, AttioSandbox

KEY = "attio-test-key"
RECORDS = 500
SPEC = json.loads(SPEC_PATH.read_text())
QUERY_URL = "/v2/objects/people/records/query"


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
