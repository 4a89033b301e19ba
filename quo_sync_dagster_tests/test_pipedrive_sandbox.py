"""The Pipedrive sandbox rejects what Pipedrive rejects and pages like it, over real HTTP."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.sandbox import webhook_delivery
from quo_sync_dagster.sandbox.pipedrive_server import (
    CUSTOM_FIELD_KEYS,
    DEFAULT_TOKEN,
    FIRST_ORG_ID,
    PipedriveSandbox,
)
from quo_sync_dagster_tests.test_webhook_delivery import Received, Receiver, settled

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = 500
PERSONS, ORGANIZATIONS = "/api/v2/persons", "/api/v2/organizations"
AUTH = {"x-api-token": DEFAULT_TOKEN}
CALL = {
    "person_id": 1001,
    "outcome": "connected",
    "to_phone_number": "+12125550100",
    "start_time": "2026-03-01 10:00:00",
    "end_time": "2026-03-01 10:01:35",
    "duration": "95",
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipedriveSandbox]:
    with PipedriveSandbox(tmp_path_factory.mktemp("pipedrive"), rate_limit=None) as sb:
        yield sb


@pytest.fixture(autouse=True)
def no_faults_left(sandbox: PipedriveSandbox) -> Iterator[None]:
    sandbox.clear_faults()
    yield
    sandbox.clear_faults()


@pytest.fixture(scope="module")
def client(sandbox: PipedriveSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers=AUTH) as c:
        yield c


def error_of(response: httpx.Response, status: int) -> str:
    """Assert a Pipedrive JSON error with `status`; return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["error_info"]
    return body["error"]


def all_listed(client: httpx.Client, path: str = PERSONS, **params: Any) -> list[dict[str, Any]]:
    """Everything a v2 list endpoint (persons unless `path` says otherwise) serves, cursor by
    cursor."""
    records, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True and set(body["additional_data"]) == {"next_cursor"}
        records += body["data"]
        cursor = body["additional_data"]["next_cursor"]
        if cursor is None:
            return records


# ---- auth -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{}, {"x-api-token": "wrong"}, {"Authorization": f"Bearer {DEFAULT_TOKEN}"}]
)
def test_requests_without_the_token_are_401(
    sandbox: PipedriveSandbox, headers: dict[str, str]
) -> None:
    before = sandbox.stats()["byKind"]["unauthenticated"]
    response = httpx.get(f"{sandbox.url}{PERSONS}", headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "success": False,
        "error": "unauthorized access",
        "errorCode": 401,
        "error_info": "Please check developers.pipedrive.com",
    }
    assert sandbox.stats()["byKind"]["unauthenticated"] == before + 1


def test_legacy_api_token_query_is_accepted(sandbox: PipedriveSandbox) -> None:
    response = httpx.get(f"{sandbox.url}{PERSONS}/1001", params={"api_token": DEFAULT_TOKEN})
    assert response.status_code == 200 and response.json()["data"]["id"] == 1001


# ---- list validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"limit": 501},
        {"limit": 0},
        {"limit": "ten"},
        {"sort_by": "name"},
        {"sort_direction": "down"},
        {"updated_since": "2025-01-01"},
        {"updated_since": "2025-01-01 10:00:00"},
        {"updated_since": "2025-13-01T00:00:00Z"},
        {"updated_since": "yesterday"},
        {"ids": ",".join(str(1001 + i) for i in range(101))},
        {"ids": "1001,abc"},
        {"cursor": "not-a-cursor"},
    ],
)
@pytest.mark.parametrize("path", [PERSONS, ORGANIZATIONS])
def test_invalid_list_parameters_are_400(
    client: httpx.Client, path: str, params: dict[str, Any]
) -> None:
    name = next(iter(params))
    assert name in error_of(client.get(path, params=params), 400)


def test_cursor_of_another_sort_is_400(client: httpx.Client) -> None:
    body = client.get(PERSONS, params={"limit": 5, "sort_by": "add_time"}).json()
    cursor = body["additional_data"]["next_cursor"]
    assert cursor is not None
    response = client.get(PERSONS, params={"limit": 5, "sort_by": "id", "cursor": cursor})
    assert "cursor" in error_of(response, 400)


def test_limit_defaults_to_100_and_allows_500(client: httpx.Client) -> None:
    assert len(client.get(PERSONS).json()["data"]) == 100
    assert len(client.get(PERSONS, params={"limit": 500}).json()["data"]) == 500


# ---- paging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sort_by", ["id", "update_time", "add_time"])
@pytest.mark.parametrize("direction", ["asc", "desc"])
def test_cursor_paging_returns_every_person_once_in_order(
    client: httpx.Client, sort_by: str, direction: str
) -> None:
    persons = all_listed(client, limit=37, sort_by=sort_by, sort_direction=direction)
    ids = [p["id"] for p in persons]
    assert sorted(ids) == list(range(1001, 1001 + RECORDS))
    keys = [(p[sort_by], p["id"]) for p in persons]
    assert keys == sorted(keys, reverse=direction == "desc")


def test_default_order_is_id_ascending(client: httpx.Client) -> None:
    ids = [p["id"] for p in client.get(PERSONS, params={"limit": 10}).json()["data"]]
    assert ids == list(range(1001, 1011))


def test_update_time_ties_are_paged_without_loss(client: httpx.Client) -> None:
    """A bulk edit gives many persons one update_time; page boundaries fall inside the tie."""
    persons = all_listed(client, limit=3, sort_by="update_time", sort_direction="desc")
    newest = [p for p in persons if p["update_time"] == persons[0]["update_time"]]
    assert len(newest) > 3
    assert len({p["id"] for p in persons}) == RECORDS


@pytest.mark.parametrize("suffix", ["Z", "+02:00"])
def test_updated_since_keeps_persons_updated_at_or_after_it(
    client: httpx.Client, suffix: str
) -> None:
    everyone = all_listed(client, limit=500)
    times = sorted(datetime.fromisoformat(p["update_time"]) for p in everyone)
    since = times[len(times) // 2]
    stamp = since.astimezone(datetime.fromisoformat(f"2026-01-01T00:00:00{suffix}").tzinfo)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S") + suffix
    kept = all_listed(client, limit=100, updated_since=text, sort_by="update_time")
    expected = {p["id"] for p in everyone if datetime.fromisoformat(p["update_time"]) >= since}
    assert {p["id"] for p in kept} == expected
    assert 0 < len(expected) < RECORDS


def test_batch_read_by_ids_leaves_out_unknown_ids(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    before = sandbox.stats()["byKind"]["batch_persons"]
    wanted = [*range(1400, 1450), 99999]
    response = client.get(PERSONS, params={"ids": ",".join(map(str, wanted)), "limit": 100})
    assert sorted(p["id"] for p in response.json()["data"]) == list(range(1400, 1450))
    assert sandbox.stats()["byKind"]["batch_persons"] == before + 1


def test_single_read_and_its_errors(client: httpx.Client) -> None:
    assert client.get(f"{PERSONS}/1234").json()["data"]["id"] == 1234
    assert error_of(client.get(f"{PERSONS}/99999"), 404) == "Person not found"
    error_of(client.get(f"{PERSONS}/abc"), 400)


def test_seeded_persons_look_like_real_pipedrive_data(client: httpx.Client) -> None:
    persons = all_listed(client, limit=500)
    assert any(len(p["phones"]) > 1 for p in persons)
    assert any(len(p["emails"]) > 1 for p in persons)
    assert any(ph["value"].startswith("+44") for p in persons for ph in p["phones"])
    assert any(not p["name"].isascii() for p in persons)
    assert any(not p["name"] and p["first_name"] is None for p in persons)
    assert any(not p["phones"] for p in persons)
    for p in persons:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["update_time"])
        assert set(p["custom_fields"]) == set(CUSTOM_FIELD_KEYS.values())
        for item in p["phones"] + p["emails"]:
            assert set(item) == {"value", "primary", "label"}
        if p["phones"]:
            assert sum(item["primary"] for item in p["phones"]) == 1
    assert all(re.fullmatch("[0-9a-f]{40}", key) for key in CUSTOM_FIELD_KEYS.values())


def test_seed_is_deterministic_and_persists(tmp_path: Path) -> None:
    with PipedriveSandbox(tmp_path / "a", records=20, rate_limit=None) as a:
        first = httpx.get(f"{a.url}{PERSONS}", headers=AUTH).json()["data"]
        hook = {"subscription_url": "https://example.com/h", "event_action": "*"}
        hook |= {"event_object": "person", "name": "kept"}
        assert httpx.post(f"{a.url}/v1/webhooks", json=hook, headers=AUTH).status_code == 201
    with PipedriveSandbox(tmp_path / "b", records=20, rate_limit=None) as b:
        assert httpx.get(f"{b.url}{PERSONS}", headers=AUTH).json()["data"] == first
    with PipedriveSandbox(tmp_path / "a", records=5, rate_limit=None) as again:
        assert len(httpx.get(f"{again.url}{PERSONS}", headers=AUTH).json()["data"]) == 20
        assert [w["name"] for w in again.stats()["created"]["webhooks"]] == ["kept"]


# ---- organizations --------------------------------------------------------------------------
ORGANIZATION_KEYS = {"id", "name", "owner_id", "add_time", "update_time", "is_deleted"}
ORGANIZATION_KEYS |= {"visible_to", "address", "label_ids", "custom_fields"}


def test_every_organization_a_person_names_is_served(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    organizations = all_listed(client, ORGANIZATIONS, limit=7, sort_by="update_time")
    by_id = {o["id"]: o for o in organizations}
    assert len(by_id) == len(organizations) == sandbox.stats()["organizations"]
    named = {p["org_id"] for p in all_listed(client, limit=500)}
    assert None in named  # some people have no organization
    assert named - {None} <= set(by_id)
    for org in organizations:
        assert set(org) == ORGANIZATION_KEYS and org["is_deleted"] is False
        assert org["name"].strip() and org["add_time"] <= org["update_time"]
    assert len({o["name"] for o in organizations}) == len(organizations)
    assert any(not o["name"].isascii() for o in organizations)


def test_organizations_are_read_by_ids_leaving_out_unknown_ones(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    before = sandbox.stats()["byKind"]
    wanted = [FIRST_ORG_ID + 3, FIRST_ORG_ID, 99999]
    response = client.get(ORGANIZATIONS, params={"ids": ",".join(map(str, wanted))})
    assert response.status_code == 200, response.text
    assert [o["id"] for o in response.json()["data"]] == [FIRST_ORG_ID, FIRST_ORG_ID + 3]
    after = sandbox.stats()["byKind"]
    assert after["batch_organizations"] == before["batch_organizations"] + 1
    assert after["list_organizations"] == before["list_organizations"]
    owner = response.json()["data"][0]["owner_id"]
    owned = all_listed(client, ORGANIZATIONS, owner_id=owner)
    assert owned and {o["owner_id"] for o in owned} == {owner}


# ---- writes ---------------------------------------------------------------------------------
def test_call_log_is_stored_with_its_fields(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    subject = f"call-{uuid.uuid4().hex[:8]}"
    response = client.post("/v1/callLogs", json={**CALL, "subject": subject})
    assert response.status_code == 200, response.text
    created = response.json()["data"]
    stored = [c for c in sandbox.stats()["created"]["callLogs"] if c["subject"] == subject]
    assert stored == [created]
    assert created["duration"] == "95" and created["person_id"] == 1001
    assert sandbox.stats()["byKind"]["create_call_log"] >= 1


@pytest.mark.parametrize("missing", ["person_id", "outcome", "to_phone_number", "start_time"])
def test_call_log_requires_its_fields(client: httpx.Client, missing: str) -> None:
    body = {k: v for k, v in CALL.items() if k != missing}
    assert missing in error_of(client.post("/v1/callLogs", json=body), 400)


@pytest.mark.parametrize(
    "change",
    [
        {"outcome": "answered"},
        {"start_time": "2026-03-01T10:00:00Z"},
        {"duration": 95},
        {"duration": "1:35"},
        {"end_time": "2026-03-01 09:59:59"},
        {"person_id": "1001"},
    ],
)
def test_call_log_rejects_bad_values(client: httpx.Client, change: dict[str, Any]) -> None:
    error_of(client.post("/v1/callLogs", json={**CALL, **change}), 400)


def test_call_log_for_unknown_person_is_404(client: httpx.Client) -> None:
    error_of(client.post("/v1/callLogs", json={**CALL, "person_id": 99999}), 404)


def test_activity_links_person_through_participants_only(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    body = {"subject": "Call", "type": "call", "done": True, "duration": "00:03"}
    message = error_of(client.post("/api/v2/activities", json={**body, "person_id": 1001}), 400)
    assert "read-only" in message
    subject = f"act-{uuid.uuid4().hex[:8]}"
    participants = [{"person_id": 1002, "primary": True}]
    response = client.post(
        "/api/v2/activities", json={**body, "subject": subject, "participants": participants}
    )
    assert response.status_code == 200, response.text
    stored = [a for a in sandbox.stats()["created"]["activities"] if a["subject"] == subject]
    assert len(stored) == 1 and stored[0]["person_id"] == 1002
    assert stored[0]["participants"] == participants


@pytest.mark.parametrize(
    "change",
    [{"done": 1}, {"duration": "00:00"}, {"duration": "3"}, {"type": "sms"}, {"due_time": "25:00"}],
)
def test_activity_rejects_loose_types(client: httpx.Client, change: dict[str, Any]) -> None:
    body = {"subject": "Call", "type": "call", "participants": [{"person_id": 1001}]}
    error_of(client.post("/api/v2/activities", json={**body, **change}), 400)


def test_activity_patch_changes_only_the_fields_given(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    body = {"subject": "Call", "type": "call", "done": False, "due_date": "2026-03-01"}
    body["participants"] = [{"person_id": 1004, "primary": True}]
    created = client.post("/api/v2/activities", json=body).json()["data"]
    path = f"/api/v2/activities/{created['id']}"
    response = client.patch(path, json={"done": True, "note": "<p>hi</p>", "duration": "00:02"})
    assert response.status_code == 200, response.text
    patched = response.json()["data"]
    assert patched == {
        **created,
        "done": True,
        "note": "<p>hi</p>",
        "duration": "00:02",
        "update_time": patched["update_time"],
    }
    assert client.get(path).json()["data"] == patched
    moved = [{"person_id": 1005, "primary": True}]
    assert client.patch(path, json={"participants": moved}).json()["data"]["person_id"] == 1005
    (activity,) = [a for a in sandbox.activities() if a["id"] == str(created["id"])]
    assert (activity["kind"], activity["person"], activity["body"]) == ("call", "1005", "<p>hi</p>")
    assert sandbox.stats()["byKind"]["update_activity"] >= 2


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"person_id": 1001}, 400),  # read-only in v2, as in a create
        ({"done": 1}, 400),
        ({"duration": "00:00"}, 400),
        ({"type": "sms"}, 400),
        ({"lead_id": "abc"}, 400),  # the activity has a deal: only one of the two
        ({"participants": [{"person_id": 99999, "primary": True}]}, 404),
        ({"participants": [{"person_id": 1001, "primary": True}] * 2}, 400),
    ],
)
def test_activity_patch_rejects_what_a_create_rejects(
    client: httpx.Client, change: dict[str, Any], status: int
) -> None:
    body = {"subject": "Call", "type": "call", "deal_id": 7, "participants": [{"person_id": 1001}]}
    created = client.post("/api/v2/activities", json=body).json()["data"]
    error_of(client.patch(f"/api/v2/activities/{created['id']}", json=change), status)
    assert client.get(f"/api/v2/activities/{created['id']}").json()["data"] == created


def test_unknown_activity_is_404_and_a_bad_id_400(client: httpx.Client) -> None:
    assert error_of(client.patch("/api/v2/activities/99999999", json={"done": True}), 404) == (
        "Activity not found"
    )
    error_of(client.get("/api/v2/activities/99999999"), 404)
    error_of(client.patch("/api/v2/activities/abc", json={"done": True}), 400)
    error_of(client.patch("/api/v2/activities/99999999", content=b"[1]"), 404)


def test_patched_activity_persists_across_restarts(tmp_path: Path) -> None:
    body = {"subject": "Call", "type": "call", "participants": [{"person_id": 1001}]}
    with PipedriveSandbox(tmp_path, records=3, rate_limit=None) as sb:
        created = httpx.post(f"{sb.url}/api/v2/activities", json=body, headers=AUTH).json()
        path = f"{sb.url}/api/v2/activities/{created['data']['id']}"
        httpx.patch(path, json={"note": "<p>later</p>"}, headers=AUTH).raise_for_status()
    with PipedriveSandbox(tmp_path, records=3, rate_limit=None) as again:
        (stored,) = again.stats()["created"]["activities"]
        assert stored["note"] == "<p>later</p>" and stored["id"] == created["data"]["id"]
        assert [a["body"] for a in again.activities()] == ["<p>later</p>"]


def test_note_needs_content_and_a_target(sandbox: PipedriveSandbox, client: httpx.Client) -> None:
    assert "content" in error_of(client.post("/v1/notes", json={"person_id": 1001}), 400)
    assert "person_id" in error_of(client.post("/v1/notes", json={"content": "<p>x</p>"}), 400)
    content = f"<p>{uuid.uuid4().hex}</p>"
    response = client.post("/v1/notes", json={"content": content, "person_id": 1003})
    assert response.status_code == 200, response.text
    stored = [n for n in sandbox.stats()["created"]["notes"] if n["content"] == content]
    assert len(stored) == 1 and stored[0]["person_id"] == 1003


WEBHOOK = {
    "subscription_url": "https://hooks.example.com/pipedrive",
    "event_action": "*",
    "event_object": "person",
    "name": "Quo sync",
    "version": "2.0",
    "http_auth_user": "quo",
    "http_auth_password": "s3cret",
}


@pytest.mark.parametrize(
    "change",
    [
        {"subscription_url": "http://hooks.example.com/pipedrive"},
        {"subscription_url": "hooks.example.com"},
        {"event_action": "updated"},  # a v1 action on a v2 webhook
        {"event_object": "people"},
        {"version": "3.0"},
        {"http_auth_password": None},
        {"name": None},
    ],
)
def test_webhook_rejects_bad_bodies(client: httpx.Client, change: dict[str, Any]) -> None:
    error_of(client.post("/v1/webhooks", json={**WEBHOOK, **change}), 400)


def test_webhook_create_list_delete(sandbox: PipedriveSandbox, client: httpx.Client) -> None:
    response = client.post("/v1/webhooks", json=WEBHOOK)
    assert response.status_code == 201, response.text
    webhook = response.json()["data"]
    assert webhook["version"] == "2.0" and webhook["http_auth_user"] == "quo"
    assert webhook in client.get("/v1/webhooks").json()["data"]
    assert webhook in sandbox.stats()["created"]["webhooks"]
    assert client.delete(f"/v1/webhooks/{webhook['id']}").status_code == 200
    assert webhook not in sandbox.stats()["created"]["webhooks"]
    error_of(client.delete(f"/v1/webhooks/{webhook['id']}"), 404)


# ---- limits and faults ----------------------------------------------------------------------
def test_burst_window_answers_429_with_headers_then_recovers(tmp_path: Path) -> None:
    with (
        PipedriveSandbox(tmp_path, records=5, rate_limit=3) as sb,
        httpx.Client(base_url=sb.url, headers=AUTH) as c,
    ):
        ok = [c.get(PERSONS) for _ in range(3)]
        assert [r.status_code for r in ok] == [200] * 3
        assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["2", "1", "0"]
        limited = c.get(PERSONS)
        assert limited.status_code == 429 and limited.json()["success"] is False
        assert limited.headers["x-ratelimit-limit"] == "3"
        assert limited.headers["x-ratelimit-remaining"] == "0"
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        time.sleep(2.05)
        assert c.get(PERSONS).status_code == 200
        assert sb.stats()["rateLimited"] == 1


def test_spent_daily_budget_gets_the_403_html_page(tmp_path: Path) -> None:
    with (
        PipedriveSandbox(tmp_path, records=5, rate_limit=None, daily_budget=25) as sb,
        httpx.Client(base_url=sb.url, headers=AUTH) as c,
    ):
        left = [c.get(PERSONS).headers["x-daily-ratelimit-token-remaining"] for _ in range(3)]
        assert left == ["15", "5", "0"]
        blocked = c.get(f"{PERSONS}/1001")
        assert blocked.status_code == 403
        assert blocked.headers["content-type"].startswith("text/html")
        assert "Cloudflare" in blocked.text
        assert sb.stats()["blocked"] == 1 and sb.stats()["tokensUsed"] == 30


@pytest.mark.parametrize("status", [500, 429, 403])
def test_injected_faults_come_first_then_clear(
    sandbox: PipedriveSandbox, client: httpx.Client, status: int
) -> None:
    sandbox.inject_fault(status, count=2, retry_after="3")
    first, second = client.get(f"{PERSONS}/1001"), client.get(f"{PERSONS}/1001")
    assert first.status_code == second.status_code == status
    if status == 403:
        assert first.headers["content-type"].startswith("text/html")
    else:
        assert first.headers["Retry-After"] == "3" and first.json()["success"] is False
    assert sandbox.stats()["pendingFaults"] == 0
    assert client.get(f"{PERSONS}/1001").status_code == 200


def test_runs_as_a_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "quo_sync_dagster.sandbox.pipedrive_server"]
    args = ["--data-dir", str(tmp_path), "--port", "0", "--records", "7", "--token", "t1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [*command, *args, "--no-rate-limit"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        ready, url = process.stdout.readline().split()
        assert ready == "SANDBOX_READY" and url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{url}{PERSONS}", headers={"x-api-token": "t1"})
        assert len(response.json()["data"]) == 7
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# ---- people changed while a sync runs, and their webhooks ----------------------------------
FIRST, CHANGING = 1001, 30  # persons 1001..1030
# crm-apis.md 1.4: a webhooks v2 person's keys and the meta of every delivery
WEBHOOK_DATA_KEYS = {"id", "name", "first_name", "last_name", "owner_id", "org_id", "phones"}
WEBHOOK_DATA_KEYS |= {"emails", "add_time", "update_time", "label_ids", "visible_to"}
WEBHOOK_DATA_KEYS |= {"custom_fields"}
META_KEYS = {"action", "entity", "entity_id", "company_id", "correlation_id", "id"}
META_KEYS |= {"is_bulk_edit", "timestamp", "type", "user_id", "version", "webhook_id"}
META_KEYS |= {"webhook_owner_id", "change_source", "attempt", "host", "permitted_user_ids"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[PipedriveSandbox]:
    with PipedriveSandbox(tmp_path, records=CHANGING, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def fresh_client(fresh: PipedriveSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh.url, headers=AUTH) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def subscribe(client: httpx.Client, url: str, **change: Any) -> dict[str, Any]:
    body = {**WEBHOOK, "subscription_url": url, **change}
    response = client.post("/v1/webhooks", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 201, response.text
    return response.json()["data"]


def admin(sandbox: PipedriveSandbox, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{sandbox.url}/_sandbox/{path}", **kwargs)


def by_event(received: list[Received]) -> dict[tuple[str, str], dict[str, Any]]:
    payloads = [r.json() for r in received]
    return {(p["meta"]["action"], p["meta"]["entity_id"]): p for p in payloads}


def test_created_person_is_listed_and_read_like_the_others(
    fresh: PipedriveSandbox, fresh_client: httpx.Client
) -> None:
    generated = fresh.create_person()
    assert generated["id"] == FIRST + CHANGING  # a new, higher id
    assert generated["name"] and generated["first_name"] and generated["last_name"]
    assert len(generated["phones"]) == 1 and generated["phones"][0]["primary"] is True
    assert len(generated["emails"]) == 1 and "@" in generated["emails"][0]["value"]
    assert generated["add_time"] == generated["update_time"]
    given = fresh.create_person(
        {"name": "Ada  Lovelace", "phones": [{"value": "+44 20 7946 0001"}], "org_id": None}
    )
    assert given["id"] == generated["id"] + 1
    assert (given["first_name"], given["last_name"]) == ("Ada", "Lovelace")
    assert given["phones"] == [{"value": "+44 20 7946 0001", "primary": True, "label": "work"}]
    listed = all_listed(fresh_client, limit=7)
    assert listed[-2:] == [generated, given] and fresh.people() == listed
    assert fresh_client.get(f"{PERSONS}/{given['id']}").json()["data"] == given
    batch = fresh_client.get(PERSONS, params={"ids": f"{generated['id']},{given['id']}"})
    assert batch.json()["data"] == [generated, given]
    assert fresh.stats()["persons"] == CHANGING + 2


def test_update_sets_fields_and_moves_update_time(
    fresh: PipedriveSandbox, fresh_client: httpx.Client
) -> None:
    before = fresh_client.get(f"{PERSONS}/1002").json()["data"]
    emails = [{"value": "new@example.com", "label": "home"}, {"value": "b@example.org"}]
    after = fresh.update_person("1002", {"emails": emails, "last_name": "Nuñez"})
    assert after["emails"] == [
        {"value": "new@example.com", "primary": True, "label": "home"},
        {"value": "b@example.org", "primary": False, "label": "work"},
    ]
    assert after["name"] == f"{before['first_name']} Nuñez"
    assert after["phones"] == before["phones"] and after["add_time"] == before["add_time"]
    now = datetime.now(UTC)
    assert now - timedelta(seconds=5) < datetime.fromisoformat(after["update_time"]) <= now
    changed = all_listed(fresh_client, updated_since=after["update_time"])
    assert [p["id"] for p in changed] == [1002]
    assert fresh_client.get(f"{PERSONS}/1002").json()["data"] == after


def test_update_without_fields_changes_name_and_phone(fresh: PipedriveSandbox) -> None:
    for person_id in ("1008", "1008", "1001"):  # 1008 has no phone at first
        before = next(p for p in fresh.people() if p["id"] == int(person_id))
        after = fresh.update_person(person_id)
        assert after["name"] != before["name"]
        primary = next(p["value"] for p in after["phones"] if p["primary"])
        assert primary not in [p["value"] for p in before["phones"]]
        assert len(after["phones"]) == max(1, len(before["phones"]))


def test_deleted_person_is_gone_from_every_read(
    fresh: PipedriveSandbox, fresh_client: httpx.Client
) -> None:
    fresh.delete_person("1005")
    assert error_of(fresh_client.get(f"{PERSONS}/1005"), 404) == "Person not found"
    assert 1005 not in [p["id"] for p in all_listed(fresh_client)]
    batch = fresh_client.get(PERSONS, params={"ids": "1004,1005,1006"}).json()["data"]
    assert [p["id"] for p in batch] == [1004, 1006]
    assert 1005 not in [p["id"] for p in fresh.people()]
    assert fresh.stats()["persons"] == CHANGING - 1
    again = admin(fresh, "DELETE", "people/1005")
    assert again.status_code == 404 and "1005" in again.json()["message"]
    assert admin(fresh, "PATCH", "people/1005", json={"fields": {}}).status_code == 404
    error_of(fresh_client.post("/v1/notes", json={"content": "x", "person_id": 1005}), 404)


def test_merge_keeps_the_survivor_with_the_merged_persons_details(
    fresh: PipedriveSandbox, fresh_client: httpx.Client
) -> None:
    loser = fresh.update_person("1002", {"phones": [{"value": "111"}, {"value": "222"}]})
    survivor = fresh.update_person("1003", {"phones": [{"value": "222", "label": "home"}]})
    merged = fresh.merge_people("1002", into="1003")
    assert merged["id"] == 1003 and merged["name"] == survivor["name"]
    assert merged["phones"] == [
        {"value": "222", "primary": True, "label": "home"},
        {"value": "111", "primary": False, "label": "work"},
    ]
    assert merged["update_time"] >= survivor["update_time"]
    assert fresh_client.get(f"{PERSONS}/1003").json()["data"] == merged
    error_of(fresh_client.get(f"{PERSONS}/{loser['id']}"), 404)
    assert admin(fresh, "POST", "people/1003/merge", json={"into": 1003}).status_code == 400
    assert admin(fresh, "POST", "people/1003/merge", json={"into": "1002"}).status_code == 404
    assert admin(fresh, "POST", "people/1003/merge", json={}).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "people", {"fields": {"id": 5}}),
        ("POST", "people", {"fields": {"update_time": "2026-01-01T00:00:00Z"}}),
        ("POST", "people", {"fields": {"owner_id": 9}}),
        ("POST", "people", {"fields": {"name": None}}),
        ("POST", "people", {"fields": {"visible_to": "3"}}),
        ("POST", "people", {"fields": {"phones": "+15551230000"}}),
        ("POST", "people", {"fields": {"phones": [{"value": " "}]}}),
        ("POST", "people", {"fields": {"phones": [{"value": "1", "label": "cell"}]}}),
        ("POST", "people", {"fields": {"emails": [{"value": "a", "primary": 1}]}}),
        ("POST", "people", {"fields": {"custom_fields": {"tier": 1}}}),
        ("PATCH", "people/1001", {"fields": {"phones": [{"value": "1", "primary": True}] * 2}}),
        ("PATCH", "people/1001", {"fields": ["name"]}),
        ("PATCH", "people/1001", []),
        ("PATCH", "people/abc", {"fields": {}}),
        ("POST", "people/1001/merge", {"into": None}),
        ("POST", "people/1001/merge", {"into": "10x"}),
        ("POST", "people?kind=deal", {"fields": {}}),
    ],
)
def test_bad_admin_changes_are_400_and_change_nothing(
    fresh: PipedriveSandbox, method: str, path: str, body: Any
) -> None:
    before = fresh.people()
    response = admin(fresh, method, path, json=body)
    assert response.status_code == 400 and response.json()["message"], response.text
    assert fresh.people() == before
    assert admin(fresh, "POST", "people", content=b"{nope").status_code == 400


def test_changes_survive_a_restart_and_ids_are_not_reused(tmp_path: Path) -> None:
    with PipedriveSandbox(tmp_path, records=5, rate_limit=None) as sb:
        created = sb.create_person()
        sb.update_person("1002", {"name": "Kept Name"})
        sb.delete_person(str(created["id"]))  # the highest id
        sb.merge_people("1003", into="1004")
        people = sb.people()
    with PipedriveSandbox(tmp_path, records=5, rate_limit=None) as sb:
        assert sb.people() == people
        assert [p["id"] for p in people] == [1001, 1002, 1004, 1005]
        assert sb.create_person()["id"] == created["id"] + 1


@pytest.mark.parametrize("sort_by", ["id", "update_time"])
def test_cursor_misses_nobody_when_earlier_people_are_deleted_between_pages(
    fresh: PipedriveSandbox, fresh_client: httpx.Client, sort_by: str
) -> None:
    everyone = [p["id"] for p in all_listed(fresh_client, sort_by=sort_by)]
    first = fresh_client.get(PERSONS, params={"limit": 10, "sort_by": sort_by}).json()
    assert [p["id"] for p in first["data"]] == everyone[:10]
    for person in first["data"]:  # the whole page, the cursor's own person too
        fresh.delete_person(str(person["id"]))
    rest = all_listed(
        fresh_client, limit=10, sort_by=sort_by, cursor=first["additional_data"]["next_cursor"]
    )
    assert [p["id"] for p in rest] == everyone[10:]


def test_every_change_is_delivered_as_a_documented_v2_webhook(
    fresh: PipedriveSandbox, fresh_client: httpx.Client, receiver: Receiver
) -> None:
    hook = subscribe(fresh_client, f"{receiver.url}/hooks/pd")
    created = fresh.create_person()
    before = fresh_client.get(f"{PERSONS}/1001").json()["data"]
    updated = fresh.update_person("1001", {"name": "Zoë Ångström"})
    gone = fresh_client.get(f"{PERSONS}/1007").json()["data"]
    fresh.delete_person("1007")
    loser = fresh_client.get(f"{PERSONS}/1009").json()["data"]
    survivor = fresh_client.get(f"{PERSONS}/1010").json()["data"]
    merged = fresh.merge_people("1009", into="1010")
    received = receiver.wait_for(5)
    assert fresh.deliveries()["queued"] == 5

    secret = base64.b64encode(b"quo:s3cret").decode()
    for delivery in received:
        assert delivery.path == "/hooks/pd"
        assert delivery.headers["authorization"] == f"Basic {secret}"
        assert delivery.headers["content-type"] == "application/json"
    events = by_event(received)
    assert set(events) == {
        ("create", str(created["id"])),
        ("change", "1001"),
        ("delete", "1007"),
        ("delete", "1009"),
        ("change", "1010"),
    }
    for (_, entity_id), payload in events.items():
        meta = payload["meta"]
        extra = {"merged_to_id"} if entity_id == "1009" else set()
        extra |= {"merged_from_id"} if entity_id == "1010" else set()
        assert set(meta) == META_KEYS | extra and set(payload) == {"meta", "data", "previous"}
        assert (meta["entity"], meta["version"], meta["type"]) == ("person", "2.0", "general")
        assert meta["webhook_id"] == str(hook["id"]) and meta["company_id"] == "987654"
        assert meta["is_bulk_edit"] is False and meta["attempt"] == 1
        assert UUID.fullmatch(meta["id"]) and UUID.fullmatch(meta["correlation_id"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", meta["timestamp"])
        assert all(isinstance(u, str) for u in meta["permitted_user_ids"])
        for part in (payload["data"], payload["previous"]):
            assert part is None or set(part) <= WEBHOOK_DATA_KEYS
    assert len({p["meta"]["id"] for p in events.values()}) == 5

    def shown(person: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in person.items() if k in WEBHOOK_DATA_KEYS}

    create = events["create", str(created["id"])]
    assert create["data"] == shown(created) and create["previous"] is None
    change = events["change", "1001"]
    assert change["data"] == shown(updated)
    old_names = {k: before[k] for k in ("name", "first_name", "last_name")}
    assert change["previous"] == old_names  # the changed fields only
    delete = events["delete", "1007"]
    assert delete["data"] is None and delete["previous"] == shown(gone)
    merged_away, kept = events["delete", "1009"], events["change", "1010"]
    assert merged_away["data"] is None and merged_away["previous"] == shown(loser)
    assert merged_away["meta"]["merged_to_id"] == "1010"
    assert kept["meta"]["merged_from_id"] == "1009" and kept["data"] == shown(merged)
    assert kept["previous"] == {k: survivor[k] for k in kept["previous"]}
    assert "phones" in kept["previous"] or not loser["phones"]
    assert kept["meta"]["correlation_id"] == merged_away["meta"]["correlation_id"]
    assert change["meta"]["correlation_id"] != create["meta"]["correlation_id"]


def test_only_matching_v2_subscriptions_get_deliveries(
    fresh: PipedriveSandbox, fresh_client: httpx.Client, receiver: Receiver
) -> None:
    subscribe(fresh_client, f"{receiver.url}/deletes", event_action="delete")
    subscribe(fresh_client, f"{receiver.url}/creates", event_action="create", event_object="*")
    subscribe(fresh_client, f"{receiver.url}/deals", event_object="deal")
    subscribe(fresh_client, f"{receiver.url}/v1", event_action="added", version="1.0")
    no_auth = {"http_auth_user": None, "http_auth_password": None}
    subscribe(fresh_client, f"{receiver.url}/all", **no_auth)
    created = fresh.create_person()
    fresh.delete_person(str(created["id"]))
    received = receiver.wait_for(4)
    assert settled(fresh)["sent"] == 4 and len(receiver.received) == 4  # and no more
    got = sorted((r.path, r.json()["meta"]["action"]) for r in received)
    assert got == [
        ("/all", "create"),
        ("/all", "delete"),
        ("/creates", "create"),
        ("/deletes", "delete"),
    ]
    assert all("authorization" not in r.headers for r in received if r.path == "/all")


def test_the_answer_does_not_wait_for_the_delivery(
    fresh: PipedriveSandbox, fresh_client: httpx.Client, receiver: Receiver
) -> None:
    subscribe(fresh_client, receiver.url)
    receiver.gate.clear()  # the receiver holds its answers
    fresh.update_person("1001")
    fresh.update_person("1002")
    assert fresh.deliveries()["sent"] == 0
    receiver.gate.set()
    assert {r.json()["meta"]["entity_id"] for r in receiver.wait_for(2)} == {"1001", "1002"}


def test_delivery_faults_and_retries_through_the_sandbox(
    fresh: PipedriveSandbox,
    fresh_client: httpx.Client,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webhook_delivery, "RETRY_WAIT_SECONDS", 0.01)
    subscribe(fresh_client, receiver.url)
    fresh.webhook_faults(drop=1, duplicate=1)
    fresh.update_person("1001")  # dropped
    fresh.update_person("1002")  # sent twice
    receiver.wait_for(2)
    receiver.statuses.append(500)  # the first try of the next one fails
    fresh.update_person("1003")
    received = receiver.wait_for(4)
    assert [r.json()["meta"]["entity_id"] for r in received] == ["1002", "1002", "1003", "1003"]
    assert received[0].body == received[1].body and received[2].body == received[3].body
    stats = settled(fresh)
    assert {k: stats[k] for k in ("queued", "sent", "dropped", "duplicated", "failed")} == {
        "queued": 3,
        "sent": 3,
        "dropped": 1,
        "duplicated": 1,
        "failed": 0,
    }


# ---- POST /api/v2/persons: a person created through the API ------------------------------------
def test_api_create_keeps_only_what_is_given_and_is_read_and_notified_like_the_others(
    fresh: PipedriveSandbox, fresh_client: httpx.Client, receiver: Receiver
) -> None:
    subscribe(fresh_client, f"{receiver.url}/hooks/pd", event_action="create")
    body = {"name": "Unknown caller +14155550199", "phones": [{"value": "+14155550199"}]}
    tokens = fresh.stats()["tokensUsed"]
    response = fresh_client.post(PERSONS, json=body)
    assert fresh.stats()["tokensUsed"] == tokens + 5  # v2 costs about half of v1's 10
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True
    created = response.json()["data"]
    assert created["id"] == FIRST + CHANGING  # the next id, as an admin create takes
    assert (created["name"], created["first_name"], created["last_name"]) == (
        "Unknown caller +14155550199",
        "Unknown",
        "caller +14155550199",
    )
    assert created["phones"] == [{"value": "+14155550199", "primary": True, "label": "work"}]
    assert created["emails"] == [] and created["org_id"] is None and created["label_ids"] == []
    assert created["owner_id"] == 1111 and created["visible_to"] == 3
    assert set(created["custom_fields"]) == set(CUSTOM_FIELD_KEYS.values())
    assert not any(created["custom_fields"].values())  # nothing generated
    assert created["add_time"] == created["update_time"] and created["is_deleted"] is False

    assert fresh_client.get(f"{PERSONS}/{created['id']}").json()["data"] == created
    batch = fresh_client.get(PERSONS, params={"ids": f"1001,{created['id']}"}).json()["data"]
    assert [p["id"] for p in batch] == [1001, created["id"]] and batch[1] == created
    assert all_listed(fresh_client, limit=7)[-1] == created
    newest = fresh_client.get(PERSONS, params={"sort_by": "update_time", "sort_direction": "desc"})
    assert newest.json()["data"][0] == created
    stats = fresh.stats()
    assert stats["persons"] == CHANGING + 1 and stats["byKind"]["create_person"] == 1

    (delivery,) = receiver.wait_for(1)
    event = delivery.json()
    assert (event["meta"]["action"], event["meta"]["entity_id"]) == ("create", str(created["id"]))
    assert event["meta"]["change_source"] == "api" and set(event["meta"]) == META_KEYS
    assert event["data"] == {k: v for k, v in created.items() if k in WEBHOOK_DATA_KEYS}
    assert event["previous"] is None

    # The admin create still makes a generated person, with the next id again.
    generated = fresh.create_person()
    assert generated["id"] == created["id"] + 1 and generated["emails"]


def test_api_create_with_every_settable_field(fresh_client: httpx.Client) -> None:
    body = {
        "name": "Ada Lovelace",
        "owner_id": 1112,
        "org_id": 77,
        "visible_to": 1,
        "label_ids": [5],
        "emails": [{"value": "ada@example.com", "primary": True, "label": "home"}],
        "phones": [
            {"value": "+44 20 7946 0001", "label": "mobile"},
            {"value": "+1 415 555 0100", "primary": True},
        ],
        "custom_fields": {CUSTOM_FIELD_KEYS["customer_tier"]: 2},
    }
    created = fresh_client.post(PERSONS, json=body).json()["data"]
    assert (created["owner_id"], created["org_id"], created["visible_to"]) == (1112, 77, 1)
    assert created["phones"] == [
        {"value": "+44 20 7946 0001", "primary": False, "label": "mobile"},
        {"value": "+1 415 555 0100", "primary": True, "label": "work"},
    ]
    assert created["custom_fields"][CUSTOM_FIELD_KEYS["customer_tier"]] == 2
    assert created["custom_fields"][CUSTOM_FIELD_KEYS["lead_source"]] is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": 5}, "name"),
        ({"phones": [{"value": "+14155550199"}]}, "name"),
        ({"name": "A", "first_name": "A"}, "first_name"),  # not a v2 request field
        ({"name": "A", "last_name": "B"}, "last_name"),
        ({"name": "A", "id": 5}, "id"),
        ({"name": "A", "update_time": "2026-01-01T00:00:00Z"}, "update_time"),
        ({"name": "A", "phone": ["+14155550199"]}, "phone"),  # the v1 name
        ({"name": "A", "phones": "+14155550199"}, "phones"),
        ({"name": "A", "phones": ["+14155550199"]}, "phones"),
        ({"name": "A", "phones": [{"value": " "}]}, "phones"),
        ({"name": "A", "phones": [{"value": 14155550199}]}, "phones"),
        ({"name": "A", "phones": [{"value": "+1", "label": "cell"}]}, "phones"),
        ({"name": "A", "phones": [{"value": "+1", "primary": "true"}]}, "phones"),
        ({"name": "A", "phones": [{"value": "+1", "primary": True}] * 2}, "phones"),
        ({"name": "A", "phones": [{"value": "+1", "type": "mobile"}]}, "phones"),
        ({"name": "A", "emails": [{"value": "a@example.com", "primary": 1}]}, "emails"),
        ({"name": "A", "owner_id": "1111"}, "owner_id"),
        ({"name": "A", "owner_id": 9}, "owner_id"),
        ({"name": "A", "org_id": "55"}, "org_id"),
        ({"name": "A", "visible_to": "3"}, "visible_to"),
        ({"name": "A", "custom_fields": {"tier": 1}}, "custom_fields"),
    ],
)
def test_api_create_refuses_bad_bodies(
    sandbox: PipedriveSandbox, client: httpx.Client, body: dict[str, Any], problem: str
) -> None:
    before = sandbox.stats()
    assert problem in error_of(client.post(PERSONS, json=body), 400)
    after = sandbox.stats()
    assert after["persons"] == before["persons"]
    assert after["byKind"]["create_person"] == before["byKind"]["create_person"] + 1


def test_api_create_refuses_what_is_not_a_json_object(
    sandbox: PipedriveSandbox, client: httpx.Client
) -> None:
    persons = sandbox.stats()["persons"]
    assert "JSON" in error_of(client.post(PERSONS, content=b"{nope"), 400)
    assert "JSON object" in error_of(client.post(PERSONS, json=[{"name": "A"}]), 400)
    unauthenticated = httpx.post(f"{sandbox.url}{PERSONS}", json={"name": "A"})
    assert unauthenticated.status_code == 401
    assert client.put(PERSONS, json={"name": "A"}).status_code == 405
    assert sandbox.stats()["persons"] == persons


def test_api_created_person_survives_a_restart(tmp_path: Path) -> None:
    with PipedriveSandbox(tmp_path, records=5, rate_limit=None) as sb:
        body = {"name": "Kept", "phones": [{"value": "+14155550199"}]}
        created = httpx.post(f"{sb.url}{PERSONS}", json=body, headers=AUTH).json()["data"]
    with PipedriveSandbox(tmp_path, records=5, rate_limit=None) as sb:
        assert sb.people()[-1] == created and created["id"] == 1006
        assert sb.create_person()["id"] == 1007
