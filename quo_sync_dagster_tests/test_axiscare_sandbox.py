"""The AxisCare sandbox is as strict as the official spec says, checked over real HTTP.

Every body is validated against the spec's response schema for its operation and status. The
spec copy points its record schemas at sibling files (`../Client.yaml`, ...) that AxisCare does
not publish, so those refs resolve to RECORD below: the fields of the spec's examples and
request bodies, with their types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from quo_sync_dagster.sandbox.axiscare_server import (
    CALL_LOGS,
    KINDS,
    PEOPLE_FILE,
    SPEC_PATH,
    AxisCareSandbox,
    generate_people,
)

SPEC = yaml.safe_load(SPEC_PATH.read_text())
ONE_LOG = "/api/call-logs/{callLogId}"
TOKEN = "axiscare-sandbox-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-AxisCare-Api-Version": "2023-10-01"}
REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = 500

_TEXT = {"type": ["string", "null"]}
_ADDRESS = {
    "type": ["object", "null"],
    "required": ["streetAddress1", "locality", "region", "postalCode"],
    "properties": {k: _TEXT for k in ("name", "streetAddress1", "streetAddress2", "locality")},
}
RECORD: dict[str, Any] = {
    "type": "object",
    "required": ["id", "firstName", "lastName", "status", "homePhone", "mobilePhone"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "firstName": _TEXT,
        "lastName": _TEXT,
        "goesBy": _TEXT,
        "status": {
            "type": "object",
            "required": ["label", "active"],
            "properties": {"label": {"type": "string"}, "active": {"type": "boolean"}},
        },
        **{k: _TEXT for k in ("homePhone", "mobilePhone", "otherPhone")},
        **{k: _TEXT for k in ("personalEmail", "billingEmail")},
        **{k: {"type": ["string", "null"], "format": "date"} for k in ("dateOfBirth", "startDate")},
        **{k: _ADDRESS for k in ("residentialAddress", "billingAddress", "mailingAddress")},
    },
}
CALL_LOG = {
    "type": "object",
    "required": ["id", "callerName", "callerPhone", "followUp", "dateTime", "tags"],
    "properties": {
        "id": {"type": "integer"},
        "tags": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "type", "url"]},
        },
    },
}
_REGISTRY = Registry().with_resources(
    [(f"../{name}.yaml", Resource.opaque(RECORD)) for name in ("Client", "Lead", "Caregiver")]
    + [
        ("../Applicant.yaml", Resource.opaque(RECORD)),
        ("../CallLog.yaml", Resource.opaque(CALL_LOG)),
    ]
)


@cache
def _validator(path: str, method: str, status: int) -> Draft202012Validator:
    response = SPEC["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    return Draft202012Validator(schema, registry=_REGISTRY, format_checker=FormatChecker())


def check(response: httpx.Response, path: str, method: str, status: int) -> Any:
    """Assert the status, validate the body against the spec, return the parsed body."""
    assert response.status_code == status, response.text
    body = response.json()
    _validator(path, method, status).validate(body)
    return body


def check_error(response: httpx.Response, status: int, fragment: str) -> None:
    # 401 is documented only on visits, 429 nowhere: all errors share the spec's envelope.
    assert response.status_code == status, response.text
    body = response.json()
    _validator("/api/call-logs", "post", 400).validate(body)
    assert body["success"] is False and body["results"] is None
    assert any(fragment in e for e in body["errors"]), body


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AxisCareSandbox]:
    with AxisCareSandbox(
        tmp_path_factory.mktemp("axiscare"), records=RECORDS, rate_limit=None
    ) as sb:
        yield sb


@pytest.fixture
def client(sandbox: AxisCareSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers=HEADERS) as c:
        yield c


def walk(client: httpx.Client, kind: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Every person of `kind` by following nextPage; also the number of pages."""
    people: list[dict[str, Any]] = []
    url: str | None = f"/api/{kind}?limit={limit}"
    pages = 0
    while url is not None:
        response = client.get(url)
        bare = kind in ("caregivers", "applicants")
        body = check(response, f"/api/{kind}", "get", response.status_code)
        envelope = body if bare else body["results"]
        people += envelope[kind]
        url = envelope.get("nextPage")
        assert url is None or url.startswith(f"{client.base_url}/api/{kind}?")
        pages += 1
    return people, pages


# ---- auth and version ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "authorization",
    [None, TOKEN, f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer"],
)
def test_requests_without_the_bearer_token_are_401(
    sandbox: AxisCareSandbox, authorization: str | None
) -> None:
    headers = {"X-AxisCare-Api-Version": "2023-10-01"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for kind in KINDS:
        check_error(httpx.get(f"{sandbox.url}/api/{kind}", headers=headers), 401, "Unauthorized")
    check(httpx.get(f"{sandbox.url}/api/clients", headers=HEADERS), "/api/clients", "get", 200)


@pytest.mark.parametrize(
    ("version", "message"),
    [(None, "X-AxisCare-Api-Version header is required"), ("2024-01-01", "Unsupported version")],
)
@pytest.mark.parametrize("token_ok", [True, False])
def test_version_header_is_required_and_checked_before_auth(
    sandbox: AxisCareSandbox, version: str | None, message: str, token_ok: bool
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN if token_ok else 'nope'}"}
    if version is not None:
        headers["X-AxisCare-Api-Version"] = version
    for kind in KINDS:
        check_error(httpx.get(f"{sandbox.url}/api/{kind}", headers=headers), 400, message)
    post = httpx.post(f"{sandbox.url}/api/call-logs", json={}, headers=headers)
    check_error(post, 400, message)


# ---- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clients", "leads"])
def test_limit_is_bounded_by_the_spec(
    client: httpx.Client, sandbox: AxisCareSandbox, kind: str
) -> None:
    for bad in ("501", "0", "ten", "-5"):
        check_error(client.get(f"/api/{kind}", params={"limit": bad}), 400, "limit")
    expected = sandbox.stats()["people"][kind]
    for limit, size in ((500, min(500, expected)), (60, 60)):
        body = client.get(f"/api/{kind}", params={"limit": limit})
        assert len(check(body, f"/api/{kind}", "get", 200)["results"][kind]) == size


def test_caregiver_limit_must_be_a_positive_integer(client: httpx.Client) -> None:
    # The spec types caregivers' limit as a string with no bounds: only nonsense is refused.
    for bad in ("0", "x"):
        check_error(client.get("/api/caregivers", params={"limit": bad}), 400, "limit")
    body = check(client.get("/api/caregivers", params={"limit": 7}), "/api/caregivers", "get", 200)
    assert len(body["caregivers"]) == 7 and "limit=7" in body["nextPage"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after", ["abc", "-1", "1.5", ""])
def test_malformed_start_after_id_is_400(client: httpx.Client, kind: str, after: str) -> None:
    check_error(client.get(f"/api/{kind}", params={"startAfterId": after}), 400, "startAfterId")


def test_unknown_parameters_are_ignored(client: httpx.Client) -> None:
    # The spec's parameter lists are open; the peer's page/sort_by/updated_since do nothing.
    plain = client.get("/api/clients", params={"limit": 5}).json()
    noisy = client.get(
        "/api/clients",
        params={"limit": 5, "page": 3, "sort_by": "updated_at", "updated_since": "2030-01-01"},
    )
    body = check(noisy, "/api/clients", "get", 200)
    assert [p["id"] for p in body["results"]["clients"]] == [
        p["id"] for p in plain["results"]["clients"]
    ]
    assert "total" not in body["results"] and "total" not in body


# ---- paging ----------------------------------------------------------------------------------
# A one-per-page walk is slow, so only leads get it.
@pytest.mark.parametrize(
    ("kind", "limit"), [("leads", 1)] + [(k, n) for k in KINDS for n in (37, 500)]
)
def test_paging_returns_every_person_once_ascending(
    client: httpx.Client, sandbox: AxisCareSandbox, kind: str, limit: int
) -> None:
    expected = sandbox.stats()["people"][kind]
    people, pages = walk(client, kind, limit)
    ids = [p["id"] for p in people]
    assert ids == sorted(set(ids)) and len(ids) == expected
    # Applicants have no limit parameter: they always come in pages of the default 100.
    page_size = 100 if kind == "applicants" else limit
    assert pages == max(1, -(-expected // page_size))


def test_people_are_realistic(sandbox: AxisCareSandbox) -> None:
    people = generate_people(RECORDS)
    assert people == generate_people(RECORDS)  # deterministic
    assert sum(len(rows) for rows in people.values()) == RECORDS
    assert {k: len(v) for k, v in people.items()} == sandbox.stats()["people"]
    everyone = [p for rows in people.values() for p in rows]
    names = [f"{p['firstName']} {p['lastName']}" for p in everyone]
    assert any(not n.isascii() for n in names)
    assert any(p["firstName"] is None or p["lastName"] == "" for p in everyone)
    assert {p["status"]["active"] for p in people["clients"]} == {True, False}
    phones = [p[f] for p in everyone for f in ("homePhone", "mobilePhone")]
    assert None in phones and any(ph and "(" in ph for ph in phones)
    assert any(p.get("otherPhone") for p in people["clients"])
    ids = {kind: {p["id"] for p in rows} for kind, rows in people.items()}
    assert ids["clients"] & ids["leads"] & ids["caregivers"] & ids["applicants"]


def test_people_persist_in_the_data_dir(tmp_path: Path) -> None:
    with AxisCareSandbox(tmp_path, records=40, rate_limit=None) as sb:
        first = httpx.get(f"{sb.url}/api/clients", headers=HEADERS).json()
    stored = json.loads((tmp_path / PEOPLE_FILE).read_text())
    stored["people"]["clients"][0]["firstName"] = "Persisted"
    (tmp_path / PEOPLE_FILE).write_text(json.dumps(stored))
    with AxisCareSandbox(tmp_path, records=40, rate_limit=None) as sb:
        again = httpx.get(f"{sb.url}/api/clients", headers=HEADERS).json()
    assert again["results"]["clients"][0]["firstName"] == "Persisted"
    assert [p["id"] for p in again["results"]["clients"]] == [
        p["id"] for p in first["results"]["clients"]
    ]


# ---- batch read ------------------------------------------------------------------------------
def test_ids_filter_reports_missing_caregivers(
    client: httpx.Client, sandbox: AxisCareSandbox
) -> None:
    some = [p["id"] for p in walk(client, "caregivers", 500)[0][:3]]
    mixed = client.get(
        "/api/caregivers", params={"caregiverIds": ",".join(map(str, [*some, 99999]))}
    )
    body = check(mixed, "/api/caregivers", "get", 207)
    assert [p["id"] for p in body["caregivers"]] == some
    assert body["caregiversNotFound"] == [99999]
    none = client.get("/api/caregivers", params={"caregiverIds": "99998,99999"})
    assert check(none, "/api/caregivers", "get", 404)["caregivers"] == []
    clients = client.get("/api/clients", params={"clientIds": "1,2,99999", "statuses": "nope"})
    # Explicit ids bypass the other filters (spec).
    found = {p["id"] for p in check(clients, "/api/clients", "get", 200)["results"]["clients"]}
    assert found == {1, 2} & {p["id"] for p in walk(client, "clients", 500)[0]}
    check_error(client.get("/api/clients", params={"clientIds": "1,x"}), 400, "clientIds")


def test_statuses_filter(client: httpx.Client) -> None:
    body = client.get("/api/clients", params={"statuses": "Discharged,Deceased", "limit": 500})
    clients = check(body, "/api/clients", "get", 200)["results"]["clients"]
    assert clients and all(not p["status"]["active"] for p in clients)


# ---- call logs -------------------------------------------------------------------------------
CALL = {
    "callerName": "Ruth Adams",
    "callerPhone": "(555) 123-0001",
    "followUp": False,
    "dateTime": "2026-03-01T10:00:00-05:00",
    "subject": "Quo call (inbound, 3m25s)",
    "notes": "Summary: asked to move Tuesday visit.",
    "tags": [{"type": "client", "entityId": 1}],
}


def test_call_log_is_created_and_recorded(client: httpx.Client, sandbox: AxisCareSandbox) -> None:
    caregiver = walk(client, "caregivers", 500)[0][0]
    body = {**CALL, "tags": [*CALL["tags"], {"type": "caregiver", "entityId": caregiver["id"]}]}
    created = check(client.post("/api/call-logs", json=body), "/api/call-logs", "post", 200)
    log = created["results"]["data"]
    assert {k: log[k] for k in ("callerName", "callerPhone", "subject", "notes")} == {
        k: CALL[k] for k in ("callerName", "callerPhone", "subject", "notes")
    }
    assert [t["type"] for t in log["tags"]] == ["client", "caregiver"]
    assert log["tags"][1]["url"].endswith(f"caregivers-profile.php&id={caregiver['id']}")
    assert log in sandbox.stats()["callLogs"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"callerName": None}, "callerName"),
        ({"followUp": "no"}, "followUp"),
        ({"tags": None}, "tags"),
        ({"dateTime": "yesterday"}, "ISO8601"),
        ({"dateTime": "2026-03-01T10:00:00"}, "ISO8601"),  # no offset
        ({"tags": [{"type": "client"}]}, "entityId"),
        ({"tags": [{"type": "contact", "entityId": 1}]}, "tag type"),
        ({"tags": [{"type": "lead", "entityId": 99999}]}, "not found"),
    ],
)
def test_invalid_call_logs_are_400(
    client: httpx.Client, sandbox: AxisCareSandbox, change: dict[str, Any], fragment: str
) -> None:
    before = len(sandbox.stats()["callLogs"])
    body = {k: v for k, v in {**CALL, **change}.items() if v is not None}
    check_error(client.post("/api/call-logs", json=body), 400, fragment)
    assert len(sandbox.stats()["callLogs"]) == before


def test_call_logs_are_listed_page_by_page_and_filtered(fresh_client: httpx.Client) -> None:
    made = []
    for hour in (8, 9, 10):
        body = {**CALL, "dateTime": f"2026-03-01T{hour:02d}:00:00-05:00"}
        created = check(fresh_client.post("/api/call-logs", json=body), CALL_LOGS, "post", 200)
        made.append(created["results"]["data"])
    first = check(fresh_client.get(CALL_LOGS, params={"limit": 2}), CALL_LOGS, "get", 200)
    assert first["results"]["callLogs"] == made[:2]
    next_page = first["results"]["nextPage"]
    assert next_page.startswith(f"{fresh_client.base_url}{CALL_LOGS}?")
    last = check(fresh_client.get(next_page), CALL_LOGS, "get", 200)["results"]
    assert last["callLogs"] == made[2:] and "nextPage" not in last
    wanted = f"{made[0]['id']},{made[2]['id']}"
    by_id = check(fresh_client.get(CALL_LOGS, params={"callLogIds": wanted}), CALL_LOGS, "get", 200)
    assert by_id["results"]["callLogs"] == [made[0], made[2]]
    window = {
        "fromDateTime": "2026-03-01T14:30:00+00:00",
        "toDateTime": "2026-03-01T09:30:00-05:00",
    }
    in_window = check(fresh_client.get(CALL_LOGS, params=window), CALL_LOGS, "get", 200)
    assert in_window["results"]["callLogs"] == []
    window["fromDateTime"] = "2026-03-01T13:30:00Z"  # 8:30 -05:00 ... 9:30 -05:00
    in_window = check(fresh_client.get(CALL_LOGS, params=window), CALL_LOGS, "get", 200)
    assert in_window["results"]["callLogs"] == [made[1]]  # 9:00 -05:00 only
    for bad, fragment in (
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"fromDateTime": "yesterday"}, "incorrect DateTime string"),
        ({"toDateTime": "2026-03-01T10:00:00"}, "incorrect DateTime string"),  # no offset
        ({"callLogIds": "1,x"}, "callLogIds"),
    ):
        check_error(fresh_client.get(CALL_LOGS, params=bad), 400, fragment)


def test_a_call_log_is_read_and_patched_per_the_spec(
    fresh: AxisCareSandbox, fresh_client: httpx.Client
) -> None:
    created = check(fresh_client.post(CALL_LOGS, json=CALL), CALL_LOGS, "post", 200)
    log = created["results"]["data"]
    url = f"{CALL_LOGS}/{log['id']}"
    assert check(fresh_client.get(url), ONE_LOG, "get", 200)["results"]["data"] == log
    # Only the keys sent change; comments are appended, newest first.
    change = {"subject": "Missed call", "followUp": True, "followUpDone": False}
    patched = check(fresh_client.patch(url, json=change), ONE_LOG, "patch", 200)
    assert patched["results"]["data"] == {**log, **change}
    comment = {"comment": "Called back", "dateTime": "2026-03-02T09:00:00-05:00", "userId": 1}
    for text in ("first", "second"):
        body = {"comments": [{**comment, "comment": text}]}
        data = check(fresh_client.patch(url, json=body), ONE_LOG, "patch", 200)["results"]["data"]
    assert [c["comment"] for c in data["comments"]] == ["second", "first"]
    assert data["comments"][0]["user"] == {"id": 1, "name": "Sandbox Admin"}
    assert data["comments"][0]["id"] > data["comments"][1]["id"]
    # Refused changes change nothing, even the valid keys sent with them.
    for bad, fragment in (
        ({"followUp": "yes"}, "followUp"),
        ({"dateTime": "2026-03-01T10:00:00"}, "ISO8601"),
        ({"subject": "x", "tags": [{"type": "lead", "entityId": 99999}]}, "not found"),
        (
            {"subject": "x", "comments": [{"comment": "c", "dateTime": "now", "userId": 1}]},
            "ISO 8601",
        ),
        ({"comments": [{**comment, "userId": 99}]}, "user 99"),
        ({"comments": [{"comment": "c", "userId": 1}]}, "dateTime"),
    ):
        check_error(fresh_client.patch(url, json=bad), 400, fragment)
    assert check(fresh_client.get(url), ONE_LOG, "get", 200)["results"]["data"] == data
    for method in ("get", "patch"):
        response = fresh_client.request(method.upper(), f"{CALL_LOGS}/999", json={})
        body = check(response, ONE_LOG, method, 404)
        assert body["errors"] == ["Call log was not found"]
    assert fresh.call_logs()[-1] == data
    (shown,) = [a for a in fresh.activities() if a["id"] == str(log["id"])]  # every CRM's shape
    assert shown == {
        "id": str(log["id"]),
        "kind": "call",
        "person": "client-1",
        "subject": "Missed call",
        "body": CALL["notes"],
        "record": data,
    }
    stats = fresh.stats()["byKind"]
    assert (stats["get_call_log"], stats["update_call_log"]) == (3, 10)


def test_patched_call_logs_persist(tmp_path: Path) -> None:
    with (
        AxisCareSandbox(tmp_path, records=20, rate_limit=None) as sb,
        httpx.Client(base_url=sb.url, headers=HEADERS) as http,
    ):
        log = http.post(CALL_LOGS, json=CALL).json()["results"]["data"]
        http.patch(f"{CALL_LOGS}/{log['id']}", json={"notes": "later"}).raise_for_status()
    with AxisCareSandbox(tmp_path, records=20, rate_limit=None) as sb:
        assert [(c["id"], c["notes"]) for c in sb.call_logs()] == [(log["id"], "later")]


# ---- rate limit, faults, stats, CLI ----------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    with AxisCareSandbox(tmp_path, records=20, rate_limit=1) as sb, httpx.Client() as http:
        # One token, refilled at 1/s: a request right after another is refused. Requesting
        # until that happened keeps the test true however slowly the machine runs.
        answers = [http.get(f"{sb.url}/api/leads", headers=HEADERS)]
        while answers[-1].status_code != 429:
            assert answers[-1].status_code == 200
            assert len(answers) < 20, "the 1 req/s limiter never answered 429"
            answers.append(http.get(f"{sb.url}/api/leads", headers=HEADERS))
        limited = answers[-1]
        check_error(limited, 429, "Too many requests")
        retry_after = int(limited.headers["Retry-After"])
        assert retry_after >= 1
        # Waiting as long as asked is enough: the request then goes through.
        time.sleep(retry_after)
        answers.append(http.get(f"{sb.url}/api/leads", headers=HEADERS))
        assert answers[-1].status_code == 200
        stats = sb.stats()
    assert stats["rateLimited"] == 1 and stats["byKind"]["list_leads"] == len(answers)


def test_faults_and_stats_by_kind(client: httpx.Client, sandbox: AxisCareSandbox) -> None:
    sandbox.reset_stats()
    sandbox.inject_fault(503, count=2)
    assert client.get("/api/leads").status_code == 503
    assert client.get("/api/leads", params={"leadIds": "1"}).status_code == 503
    assert client.get("/api/leads").status_code == 200
    stats = sandbox.stats()
    assert stats["byKind"] == {"list_leads": 2, "lookup_leads": 1}
    assert stats["byStatus"] == {"200": 1, "503": 2} and stats["pendingFaults"] == 0


def test_cli_prints_ready_line_and_serves(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "quo_sync_dagster.sandbox.axiscare_server",
         "--data-dir", str(tmp_path), "--port", "0", "--records", "12",
         "--token", "cli-token", "--no-rate-limit"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("SANDBOX_READY http://127.0.0.1:")
        url = line.split()[1]
        headers = {**HEADERS, "Authorization": "Bearer cli-token"}
        body = httpx.get(f"{url}/api/clients", headers=headers).json()
        assert len(body["results"]["clients"]) == 4  # 40% of 12
        assert httpx.get(f"{url}/api/clients", headers=HEADERS).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert (tmp_path / PEOPLE_FILE).exists()


# ---- people changed while a sync runs --------------------------------------------------------
SINGULAR = {
    "clients": "client",
    "leads": "lead",
    "caregivers": "caregiver",
    "applicants": "applicant",
}


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[AxisCareSandbox]:
    with AxisCareSandbox(tmp_path, records=80, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def fresh_client(fresh: AxisCareSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh.url, headers=HEADERS) as c:
        yield c


def admin(sandbox: AxisCareSandbox, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{sandbox.url}/_sandbox/{path}", **kwargs)


def looked_up(client: httpx.Client, kind: str, ids: list[int]) -> list[int]:
    response = client.get(f"/api/{kind}", params={f"{SINGULAR[kind]}Ids": ",".join(map(str, ids))})
    body = check(response, f"/api/{kind}", "get", response.status_code)
    return [
        p["id"] for p in (body if kind in ("caregivers", "applicants") else body["results"])[kind]
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_created_people_are_listed_last_and_looked_up(
    fresh: AxisCareSandbox, fresh_client: httpx.Client, kind: str
) -> None:
    before, _ = walk(fresh_client, kind, 500)
    generated = fresh.create_person(kind=kind)
    assert generated["id"] == before[-1]["id"] + 1
    for name in ("firstName", "lastName", "mobilePhone", "personalEmail"):
        assert generated[name], name
    given = fresh.create_person({"firstName": "Ada", "homePhone": None}, kind=kind)
    assert given["id"] == generated["id"] + 1
    assert (given["firstName"], given["homePhone"]) == ("Ada", None)
    after, _ = walk(fresh_client, kind, 500)  # validated against the spec
    assert after == [*before, generated, given] and fresh.people(kind) == after
    assert looked_up(fresh_client, kind, [given["id"], generated["id"]]) == [
        generated["id"],
        given["id"],
    ]


def test_the_default_kind_is_clients(fresh: AxisCareSandbox, fresh_client: httpx.Client) -> None:
    created = fresh.create_person()
    assert looked_up(fresh_client, "clients", [created["id"]]) == [created["id"]]
    assert fresh.people() == fresh.people("clients")


def test_update_sets_fields_or_generates_a_new_name_and_phone(
    fresh: AxisCareSandbox, fresh_client: httpx.Client
) -> None:
    status = {"label": "Discharged", "active": False}
    updated = fresh.update_person("1", {"mobilePhone": "+1 555 0100", "status": status})
    assert (updated["mobilePhone"], updated["status"]) == ("+1 555 0100", status)
    assert walk(fresh_client, "clients", 500)[0][0] == updated
    generated = ("firstName", "lastName", "mobilePhone")
    for _ in range(3):
        before = fresh.people("caregivers")[0]
        after = fresh.update_person(str(before["id"]), kind="caregivers")
        assert (after["firstName"], after["lastName"]) != (before["firstName"], before["lastName"])
        assert after["mobilePhone"] != before["mobilePhone"]
        assert {k: v for k, v in after.items() if k not in generated} == {
            k: v for k, v in before.items() if k not in generated
        }


@pytest.mark.parametrize("kind", ["clients", "caregivers"])
def test_deleted_people_are_gone_from_lists_and_lookups(
    fresh: AxisCareSandbox, fresh_client: httpx.Client, kind: str
) -> None:
    first, second = (p["id"] for p in fresh.people(kind)[:2])
    fresh.delete_person(str(first), kind=kind)
    assert first not in [p["id"] for p in walk(fresh_client, kind, 500)[0]]
    assert looked_up(fresh_client, kind, [first, second]) == [second]
    if kind == "caregivers":
        response = fresh_client.get("/api/caregivers", params={"caregiverIds": f"{first},{second}"})
        assert check(response, "/api/caregivers", "get", 207)["caregiversNotFound"] == [first]
    again = admin(fresh, "DELETE", f"people/{first}", params={"kind": kind})
    assert again.status_code == 404 and str(first) in again.json()["message"]
    assert fresh.stats()["people"][kind] == len(walk(fresh_client, kind, 500)[0])


def test_axiscare_has_no_merges(fresh: AxisCareSandbox) -> None:
    before = fresh.people()
    response = admin(fresh, "POST", "people/1/merge", json={"into": "2"})
    assert response.status_code == 404 and "no merges" in response.json()["message"]
    assert fresh.people() == before


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "people?kind=contacts", {"fields": {}}, 400),
        ("POST", "people", {"fields": {"id": 7}}, 400),
        ("POST", "people", {"fields": {"nickname": "x"}}, 400),
        ("POST", "people", {"fields": {"mailingAddress": None}}, 400),  # a caregiver field
        ("POST", "people", {"fields": {"firstName": 5}}, 400),
        ("POST", "people", {"fields": {"status": "Active"}}, 400),
        ("POST", "people", {"fields": {"status": {"label": "Active"}}}, 400),
        ("POST", "people", {"fields": {"status": None}}, 400),
        ("POST", "people", {"fields": {"classes": "PRV"}}, 400),
        ("POST", "people", {"fields": {"residentialAddress": "1 Main St"}}, 400),
        ("POST", "people", {"fields": ["firstName"]}, 400),
        ("POST", "people", ["fields"], 400),
        ("PATCH", "people/abc", {"fields": {}}, 400),
        ("PATCH", "people/99999", {"fields": {}}, 404),
        ("DELETE", "people/99999?kind=leads", None, 404),
    ],
)
def test_bad_admin_changes_are_refused_and_change_nothing(
    fresh: AxisCareSandbox, method: str, path: str, body: Any, status: int
) -> None:
    before = {kind: fresh.people(kind) for kind in KINDS}
    response = admin(fresh, method, path, json=body)
    assert response.status_code == status and response.json()["message"], response.text
    assert {kind: fresh.people(kind) for kind in KINDS} == before


def test_changes_survive_a_restart_and_ids_are_not_reused(tmp_path: Path) -> None:
    with AxisCareSandbox(tmp_path, records=20, rate_limit=None) as sb:
        created = sb.create_person(kind="leads")
        sb.update_person(str(sb.people()[0]["id"]), {"lastName": "Kept"})
        sb.delete_person(str(created["id"]), kind="leads")  # the highest lead id
        people = {kind: sb.people(kind) for kind in KINDS}
    with AxisCareSandbox(tmp_path, records=20, rate_limit=None) as sb:
        assert {kind: sb.people(kind) for kind in KINDS} == people
        assert people["clients"][0]["lastName"] == "Kept"
        assert sb.create_person(kind="leads")["id"] == created["id"] + 1


@pytest.mark.parametrize("kind", ["clients", "caregivers"])
def test_start_after_id_misses_nobody_when_earlier_people_are_deleted_between_pages(
    fresh: AxisCareSandbox, fresh_client: httpx.Client, kind: str
) -> None:
    everyone = [p["id"] for p in walk(fresh_client, kind, 500)[0]]
    response = fresh_client.get(f"/api/{kind}", params={"limit": 10})
    body = check(response, f"/api/{kind}", "get", 200)
    envelope = body if kind == "caregivers" else body["results"]
    assert [p["id"] for p in envelope[kind]] == everyone[:10]
    for person in envelope[kind]:  # the whole page, the startAfterId person too
        fresh.delete_person(str(person["id"]), kind=kind)
    rest, url = [], envelope["nextPage"]
    while url is not None:
        response = fresh_client.get(url)
        body = check(response, f"/api/{kind}", "get", 200)
        envelope = body if kind == "caregivers" else body["results"]
        rest += [p["id"] for p in envelope[kind]]
        url = envelope.get("nextPage")
    assert rest == everyone[10:]


# ---- leads created through the API (POST /api/leads) ----------------------------------------
LEADS = "/api/leads"
CALLER = "+14155550123"


def test_api_leads_hold_what_was_sent_and_are_listed_and_looked_up(tmp_path: Path) -> None:
    with AxisCareSandbox(tmp_path, records=40, rate_limit=None) as sb:
        with httpx.Client(base_url=sb.url, headers=HEADERS) as http:
            before, _ = walk(http, "leads", 500)
            region = next(p["region"] for p in before if p.get("region"))
            minimal = check(
                http.post(LEADS, json={"firstName": "Unknown", "lastName": "caller"}),
                LEADS,
                "post",
                201,
            )["results"]
            assert minimal["id"] == before[-1]["id"] + 1
            assert minimal["status"] == {"label": "Active", "active": True}  # the spec's default
            assert (minimal["mobilePhone"], minimal["homePhone"]) == (None, None)
            body = {
                "firstName": "Ruth",
                "lastName": "Núñez",
                "status": "Inactive",
                "dateOfBirth": "1941-05-12",
                "assessmentDate": "2026-04-01",
                "residentialAddress": {
                    "name": "Home Address",
                    "streetAddress1": "12 Oak Ave",
                    "streetAddress2": None,
                    "city": "Austin",
                    "state": "TX",
                    "postalCode": "78701",
                },
                "region": region["name"],
                "personalEmail": "ruth@example.com",
                "homePhone": "(512) 555-0147",
                "mobilePhone": CALLER,
                "gender": "F",
                "referredBy": {"type": "other", "name": "Quo call"},
                "priorityNote": "Called about evening visits",
            }
            full = check(http.post(LEADS, json=body), LEADS, "post", 201)["results"]
            assert full["id"] == minimal["id"] + 1
            assert full["status"] == {"label": "Inactive", "active": False}
            assert full["region"]["name"] == region["name"]  # a region AxisCare has
            address = full["residentialAddress"]
            assert (address["locality"], address["region"], address["postalCode"]) == (
                "Austin",
                "TX",
                "78701",
            )
            for name in ("firstName", "lastName", "dateOfBirth", "personalEmail", "homePhone"):
                assert full[name] == body[name], name
            for name in ("mobilePhone", "assessmentDate", "referredBy", "priorityNote"):
                assert full[name] == body[name], name

            # Listed last (ascending ids), looked up by id, counted.
            after, _ = walk(http, "leads", 500)
            assert after == [*before, minimal, full]
            assert looked_up(http, "leads", [full["id"], minimal["id"]]) == [
                minimal["id"],
                full["id"],
            ]
        assert sb.stats()["byKind"]["create_lead"] == 2
    with AxisCareSandbox(tmp_path, records=40, rate_limit=None) as sb:  # persisted
        assert sb.people("leads")[-2:] == [minimal, full]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"lastName": None}, "lastName"),
        ({"firstName": 7}, "firstName"),
        ({"firstName": "  "}, "firstName is required"),
        ({"status": "Lost"}, "status must be Active or Inactive"),
        ({"dateOfBirth": "12/05/1941"}, "date"),
        ({"personalEmail": "nobody"}, "email"),
        ({"mobilePhone": 4155550123}, "mobilePhone"),
        ({"residentialAddress": {"streetAddress1": "12 Oak Ave"}}, "must be complete"),
        (
            {
                "residentialAddress": {
                    "name": None,
                    "streetAddress1": "12 Oak Ave",
                    "streetAddress2": None,
                    "city": "Austin",
                    "state": "Texas",
                    "postalCode": "78701",
                }
            },
            "two character state code",
        ),
        ({"region": "Atlantis"}, "region 'Atlantis' not found"),
        ({"referredBy": {"name": "Dr. Lee"}}, "referredBy needs a type"),
        ({"referredBy": {"type": "client"}}, "referredBy needs a type"),
    ],
)
def test_invalid_leads_are_400(
    fresh: AxisCareSandbox, fresh_client: httpx.Client, change: dict[str, Any], fragment: str
) -> None:
    before = fresh.people("leads")
    body = {"firstName": "Unknown", "lastName": "caller", "mobilePhone": CALLER, **change}
    body = {k: v for k, v in body.items() if v is not None}
    check_error(fresh_client.post(LEADS, json=body), 400, fragment)
    assert fresh.people("leads") == before


def test_leads_are_created_only_with_the_token_version_and_json(
    fresh: AxisCareSandbox, fresh_client: httpx.Client
) -> None:
    before = fresh.people("leads")
    body = {"firstName": "Unknown", "lastName": "caller"}
    check_error(httpx.post(fresh.url + LEADS, json=body, headers={}), 400, "Version")
    headers = {"X-AxisCare-Api-Version": "2023-10-01"}
    check_error(httpx.post(fresh.url + LEADS, json=body, headers=headers), 401, "Unauthorized")
    check_error(fresh_client.post(LEADS, content=b"{"), 400, "valid JSON")
    check_error(fresh_client.post(LEADS, json=[body]), 400, "body")
    assert fresh.people("leads") == before
    assert fresh.stats()["byKind"]["create_lead"] == 4
