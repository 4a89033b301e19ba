"""The Quo sandbox is as strict as the real v1 contacts API, checked over real HTTP.

Every response body is validated against the official spec's schema for its operation and status.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from quo_sync_dagster.sandbox.quo_server import SPEC_PATH, QuoSandbox

SPEC = json.loads(SPEC_PATH.read_text())
CONTACTS, CONTACT, FIELDS = "/v1/contacts", "/v1/contacts/{id}", "/v1/contact-custom-fields"
REPO_ROOT = Path(__file__).resolve().parents[1]
VALID = {"defaultFields": {"firstName": "Ada"}}


def _without_consts(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_consts(v) for k, v in schema.items() if k != "const"}
    if isinstance(schema, list):
        return [_without_consts(v) for v in schema]
    return schema


@cache
def _validator(path: str, method: str, status: int) -> Draft202012Validator:
    responses = SPEC["paths"][path][method]["responses"]
    if str(status) in responses:
        schema = responses[str(status)]["content"]["application/json"]["schema"]
    else:  # 429/502/503 are undocumented: expect the spec's error envelope, any code/title
        assert status in (429, 502, 503), f"{status} is not a status of {method} {path}"
        schema = _without_consts(responses["500"]["content"]["application/json"]["schema"])
    return Draft202012Validator(schema)


def check(response: httpx.Response, path: str, method: str, status: int) -> Any:
    """Assert the status, validate the body against the spec, return the parsed body."""
    assert response.status_code == status, response.text
    if status == 204:
        assert "204" in SPEC["paths"][path][method]["responses"]
        assert response.content == b""
        return None
    body = response.json()
    _validator(path, method, status).validate(body)
    if status >= 400:
        assert body["status"] == status
    return body


def uid(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create(client: httpx.Client, status: int = 201, **body: Any) -> Any:
    body.setdefault("defaultFields", {"firstName": "Ada"})
    return check(client.post(CONTACTS, json=body), CONTACTS, "post", status)


def lookup(client: httpx.Client, status: int = 200, **params: Any) -> Any:
    return check(client.get(CONTACTS, params=params), CONTACTS, "get", status)


@pytest.fixture
def client(sandbox: QuoSandbox) -> Iterator[httpx.Client]:
    sandbox.clear_faults()
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as c:
        yield c


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sandbox-key"}, {"Authorization": "wrong-key"}]
)
def test_api_key_must_be_sent_raw(sandbox: QuoSandbox, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=sandbox.url, headers=headers) as anonymous:
        body = check(anonymous.get(CONTACTS, params={"maxResults": 1}), CONTACTS, "get", 401)
        assert body["code"] == "0800401"
        body = check(anonymous.get(FIELDS), FIELDS, "get", 401)
        assert body["code"] == "0700401"
    ok = httpx.get(
        f"{sandbox.url}{CONTACTS}",
        params={"maxResults": 1},
        headers={"Authorization": "sandbox-key"},
    )
    check(ok, CONTACTS, "get", 200)


def test_create_returns_full_contact_shape(client: httpx.Client) -> None:
    external_id = uid()
    contact = create(
        client,
        defaultFields={
            "firstName": "Ada",
            "emails": [{"name": "work", "value": "ada@example.com"}],
            "phoneNumbers": [{"name": "mobile", "value": "+15555550100"}],
        },
        externalId=external_id,
        source="acme-crm",
        sourceUrl="https://crm.example.com/people/1",
        customFields=[
            {"key": "interests", "value": ["sms"]},
            {"key": "lifetime-value", "value": 3},
        ],
    )["data"]
    fields = contact["defaultFields"]
    assert set(fields) == {"firstName", "lastName", "company", "role", "emails", "phoneNumbers"}
    assert fields["lastName"] is None and fields["emails"][0]["id"]
    assert fields["phoneNumbers"][0]["id"] and contact["createdByUserId"].startswith("US")
    assert [(f["name"], f["type"]) for f in contact["customFields"]] == [
        ("Interests", "multi-select"),
        ("Lifetime Value", "number"),
    ]
    assert contact["createdAt"] == contact["updatedAt"]
    assert create(client)["data"]["source"] == "public-api"  # the documented default
    fetched = check(client.get(f"{CONTACTS}/{contact['id']}"), CONTACT, "get", 200)
    assert fetched["data"] == contact


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "/defaultFields"),
        ({"defaultFields": {"lastName": "x"}}, "/defaultFields/firstName"),
        ({"defaultFields": {"firstName": 5}}, "/defaultFields/firstName"),
        ({"defaultFields": {"firstName": "a", "emails": "a@b.c"}}, "/defaultFields/emails"),
        (
            {"defaultFields": {"firstName": "a", "emails": [{"name": "w"}]}},
            "/defaultFields/emails/0/value",
        ),
        ({**VALID, "externalId": "x" * 76}, "/externalId"),
        ({**VALID, "externalId": ""}, "/externalId"),
        ({**VALID, "source": "s" * 73}, "/source"),
        ({**VALID, "sourceUrl": "https://e.com/" + "a" * 200}, "/sourceUrl"),
        ({**VALID, "sourceUrl": "not a url"}, "/sourceUrl"),
        ({**VALID, "createdByUserId": "X123"}, "/createdByUserId"),
        ({**VALID, "customFields": {"inbound-lead": "yes"}}, "/customFields"),
    ],
)
def test_invalid_create_body_is_400(client: httpx.Client, body: dict, path: str) -> None:
    error = check(client.post(CONTACTS, json=body), CONTACTS, "post", 400)
    assert path in [e["path"] for e in error["errors"]]


def test_non_json_body_is_400(client: httpx.Client) -> None:
    response = client.post(CONTACTS, content=b"{nope", headers={"Content-Type": "application/json"})
    check(response, CONTACTS, "post", 400)


@pytest.mark.parametrize(
    "source",
    ["openphone", "device", "csv", "zapier", "google-people", "other", "openphone-x", "csv2"],
)
def test_reserved_source_is_400(client: httpx.Client, source: str) -> None:
    assert create(client, 400, source=source)["errors"][0]["path"] == "/source"
    contact_id = create(client, source="my-crm")["data"]["id"]
    check(client.patch(f"{CONTACTS}/{contact_id}", json={"source": source}), CONTACT, "patch", 400)


def test_source_limit_is_72_on_create_but_75_on_patch(client: httpx.Client) -> None:
    create(client, 400, source="s" * 73)
    contact_id = create(client, source="s" * 72)["data"]["id"]
    url = f"{CONTACTS}/{contact_id}"
    assert check(client.patch(url, json={"source": "t" * 75}), CONTACT, "patch", 200)
    check(client.patch(url, json={"source": "t" * 76}), CONTACT, "patch", 400)


def test_custom_fields_must_reference_known_keys_with_matching_types(client: httpx.Client) -> None:
    definitions = check(client.get(FIELDS), FIELDS, "get", 200)["data"]
    assert {"key": "vip", "name": "VIP", "type": "boolean"} in definitions
    for item in (
        {"key": "no-such-field", "value": "x"},
        {"value": "x"},
        {"key": "vip", "value": "yes"},
        {"key": "last-visit", "value": "yesterday"},
    ):
        error = create(client, 400, customFields=[item])
        assert (error["code"], error["title"]) == ("0801400", "Invalid Custom Field Item")
    data = create(client, customFields=[{"key": "last-visit", "value": "2025-01-02T03:04:05Z"}])
    assert data["data"]["customFields"][0]["type"] == "date"


@pytest.mark.parametrize("max_results", [None, 0, 51, "abc", "1.5"])
def test_list_requires_max_results_between_1_and_50(
    client: httpx.Client, max_results: object
) -> None:
    params = {} if max_results is None else {"maxResults": max_results}
    error = lookup(client, 400, **params)
    assert error["errors"][0]["path"] == "/maxResults"


def test_list_accepts_max_results_at_the_bounds(client: httpx.Client) -> None:
    assert len(lookup(client, maxResults=50)["data"]) <= 50
    assert len(lookup(client, maxResults=1)["data"]) <= 1


@pytest.mark.parametrize("param", ["externalIds", "externalIds[]"])
def test_external_ids_filter_takes_at_most_20_values(client: httpx.Client, param: str) -> None:
    source = uid("src")
    ids = [create(client, externalId=uid(), source=source)["data"]["externalId"] for _ in range(2)]
    wanted = ids + [uid() for _ in range(18)]
    found = lookup(client, maxResults=50, **{param: wanted})
    assert sorted(c["externalId"] for c in found["data"]) == sorted(ids)
    assert found["nextPageToken"] is None
    lookup(client, 400, maxResults=50, **{param: [*wanted, uid()]})
    lookup(client, 400, maxResults=50, **{param: ["x" * 76]})
    lookup(client, 400, maxResults=50, **{param.replace("externalIds", "sources"): [*wanted, "y"]})
    only = lookup(client, maxResults=50, **{param: ids, "sources": [source]})
    assert len(only["data"]) == 2
    assert lookup(client, maxResults=50, **{param: ids, "sources": ["elsewhere"]})["data"] == []


def test_duplicate_external_id_and_source_conflicts(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    external_id = uid()
    first = create(client, externalId=external_id, source="crm-a")["data"]
    error = create(client, 409, externalId=external_id, source="crm-a")
    assert error["code"] == "0800409"
    second = create(client, externalId=external_id, source="crm-b")["data"]
    url = f"{CONTACTS}/{second['id']}"
    check(client.patch(url, json={"source": "crm-a"}), CONTACT, "patch", 409)
    other = create(client, externalId=uid(), source="crm-a")["data"]
    move = {"externalId": external_id}
    check(client.patch(f"{CONTACTS}/{other['id']}", json=move), CONTACT, "patch", 409)
    assert check(client.patch(url, json={"externalId": uid()}), CONTACT, "patch", 200)
    # The freed key can now be taken by the first contact's twin again.
    check(client.delete(f"{CONTACTS}/{first['id']}"), CONTACT, "delete", 204)
    create(client, externalId=external_id, source="crm-a")
    assert sandbox.stats()["duplicateExternalIds"] == 0


def test_patch_replaces_lists_and_merges_scalars(client: httpx.Client) -> None:
    contact = create(
        client,
        defaultFields={
            "firstName": "Ada",
            "lastName": "Lovelace",
            "emails": [{"name": "work", "value": "a@w.com"}, {"name": "home", "value": "a@h.com"}],
            "phoneNumbers": [{"name": "mobile", "value": "+15555550100"}],
        },
        customFields=[{"key": "vip", "value": True}, {"key": "inbound-lead", "value": "web"}],
    )["data"]
    work, home = contact["defaultFields"]["emails"]
    phone = contact["defaultFields"]["phoneNumbers"][0]
    vip = contact["customFields"][0]
    body = {
        "defaultFields": {
            "company": "Analytical Engines",
            "emails": [{**work, "value": "ada@w.com"}, {"name": "other", "value": "ada@o.com"}],
            "phoneNumbers": [{**phone, "value": None}],
        },
        "customFields": [{"id": vip["id"], "value": False}],
    }
    url = f"{CONTACTS}/{contact['id']}"
    patched = check(client.patch(url, json=body), CONTACT, "patch", 200)["data"]
    fields = patched["defaultFields"]
    assert (fields["firstName"], fields["lastName"]) == ("Ada", "Lovelace")
    assert fields["company"] == "Analytical Engines"
    assert [(e["id"] == work["id"], e["value"]) for e in fields["emails"]] == [
        (True, "ada@w.com"),
        (False, "ada@o.com"),
    ]
    assert home["id"] not in [e["id"] for e in fields["emails"]]
    assert fields["phoneNumbers"] == []
    assert [(f["id"], f["value"]) for f in patched["customFields"]] == [(vip["id"], False)]
    assert patched["updatedAt"] >= contact["updatedAt"]
    untouched = check(
        client.patch(url, json={"defaultFields": {"role": "CTO"}}), CONTACT, "patch", 200
    )
    assert untouched["data"]["defaultFields"]["emails"] == fields["emails"]
    assert untouched["data"]["customFields"] == patched["customFields"]


@pytest.mark.parametrize("method", ["get", "patch", "delete"])
def test_unknown_contact_is_404(client: httpx.Client, method: str) -> None:
    kwargs = {"json": {"defaultFields": {"role": "x"}}} if method == "patch" else {}
    response = client.request(method, f"{CONTACTS}/{uuid.uuid4().hex[:24]}", **kwargs)
    assert check(response, CONTACT, method, 404)["code"] == "0800404"


def test_deleted_contact_is_gone(client: httpx.Client) -> None:
    url = f"{CONTACTS}/{create(client)['data']['id']}"
    check(client.delete(url), CONTACT, "delete", 204)
    check(client.get(url), CONTACT, "get", 404)
    check(client.delete(url), CONTACT, "delete", 404)


def test_pagination_returns_every_contact_exactly_once(tmp_path: Path) -> None:
    with (
        QuoSandbox(tmp_path, rate_limit=None) as sandbox,
        httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as client,
    ):
        created = {create(client, externalId=uid())["data"]["id"] for _ in range(23)}
        seen: list[str] = []
        params: dict[str, Any] = {"maxResults": 5}
        while True:
            page = lookup(client, **params)
            assert page["totalItems"] == 23 and len(page["data"]) <= 5
            seen += [c["id"] for c in page["data"]]
            if page["nextPageToken"] is None:
                break
            params["pageToken"] = page["nextPageToken"]
        assert len(seen) == 23 and set(seen) == created
        lookup(client, 400, maxResults=5, pageToken="not-a-token")


@pytest.mark.parametrize("retry_after_format", ["seconds", "http-date"])
def test_rate_limit_is_per_key_with_retry_after(tmp_path: Path, retry_after_format: str) -> None:
    with QuoSandbox(
        tmp_path,
        api_keys=("key-a", "key-b"),
        rate_limit=5,
        retry_after_format=retry_after_format,
    ) as sandbox:
        with httpx.Client(base_url=sandbox.url, headers={"Authorization": "key-a"}) as client:
            started = time.monotonic()
            responses = [client.get(FIELDS) for _ in range(15)]
            elapsed = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        ok = statuses.count(200)  # the full bucket of 5, plus what refilled during the burst
        assert 5 <= ok <= 5 + math.ceil(elapsed * 5) and statuses.count(429) == 15 - ok > 0
        throttled = next(r for r in responses if r.status_code == 429)
        check(throttled, FIELDS, "get", 429)
        header = throttled.headers["Retry-After"]
        if retry_after_format == "seconds":
            wait = int(header)
        else:
            wait = parsedate_to_datetime(header).timestamp() - time.time()
        assert 0 < wait <= 2
        other = httpx.get(f"{sandbox.url}{FIELDS}", headers={"Authorization": "key-b"})
        check(other, FIELDS, "get", 200)
        stats = sandbox.stats()
        assert stats["rateLimited"] == statuses.count(429)
        assert stats["byApiKey"]["key-a"]["rateLimited"] == statuses.count(429)
        assert stats["byApiKey"]["key-b"]["rateLimited"] == 0
        time.sleep(max(wait, 1.0))
        again = httpx.get(f"{sandbox.url}{FIELDS}", headers={"Authorization": "key-a"})
        check(again, FIELDS, "get", 200)


def test_stats_count_requests_by_kind_status_and_key(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    sandbox.reset_stats()
    started = time.time()
    url = f"{CONTACTS}/{create(client, externalId=uid())['data']['id']}"
    check(client.get(url), CONTACT, "get", 200)
    check(client.patch(url, json={"defaultFields": {"role": "x"}}), CONTACT, "patch", 200)
    lookup(client, maxResults=5)
    lookup(client, maxResults=5, externalIds=[uid()])
    lookup(client, 400, maxResults=5, **{"externalIds[]": [uid()] * 21})
    check(client.get(FIELDS), FIELDS, "get", 200)
    check(client.delete(url), CONTACT, "delete", 204)
    check(httpx.get(f"{sandbox.url}{FIELDS}"), FIELDS, "get", 401)
    stats = sandbox.stats()
    assert stats["byKind"] == {
        "create": 1,
        "patch": 1,
        "get": 1,
        "delete": 1,
        "list": 1,
        "lookup": 2,
        "custom_fields": 2,
    }
    assert stats["byStatus"] == {"200": 5, "201": 1, "204": 1, "400": 1, "401": 1}
    assert stats["requests"] == 9 and stats["rateLimited"] == 0
    assert stats["byApiKey"]["sandbox-key"]["requests"] == 8
    assert started <= stats["firstRequestAt"] <= stats["lastRequestAt"] <= time.time()
    assert stats["contacts"] == sum(stats["contactsBySource"].values())
    assert stats["duplicateExternalIds"] == 0


def test_faults_are_injected_then_clear(sandbox: QuoSandbox, client: httpx.Client) -> None:
    sandbox.inject_fault(500, count=2)
    assert sandbox.stats()["pendingFaults"] == 2  # admin requests do not consume faults
    for _ in range(2):
        assert lookup(client, 500, maxResults=1)["code"] == "0801500"
    lookup(client, maxResults=1)
    sandbox.inject_fault(429, retry_after="2")
    throttled = client.get(CONTACTS, params={"maxResults": 1})
    check(throttled, CONTACTS, "get", 429)
    assert throttled.headers["Retry-After"] == "2"
    sandbox.inject_fault(503)
    check(client.get(FIELDS), FIELDS, "get", 503)
    sandbox.inject_fault(delay_seconds=0.3)
    started = time.monotonic()
    check(client.get(FIELDS), FIELDS, "get", 200)
    assert time.monotonic() - started >= 0.3
    assert sandbox.stats()["pendingFaults"] == 0
    bad = httpx.post(f"{sandbox.url}/_sandbox/faults", json={"status": 404})
    assert bad.status_code == 400


def test_contacts_persist_across_restart(tmp_path: Path) -> None:
    external_id = uid()
    with (
        QuoSandbox(tmp_path, rate_limit=None) as sandbox,
        httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as client,
    ):
        kept = create(client, externalId=external_id, source="crm")["data"]
        url = f"{CONTACTS}/{kept['id']}"
        kept = check(
            client.patch(url, json={"defaultFields": {"role": "x"}}), CONTACT, "patch", 200
        )
        gone = create(client)["data"]
        check(client.delete(f"{CONTACTS}/{gone['id']}"), CONTACT, "delete", 204)
    with (
        QuoSandbox(tmp_path, rate_limit=None) as sandbox,
        httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as client,
    ):
        assert check(client.get(url), CONTACT, "get", 200) == kept
        check(client.get(f"{CONTACTS}/{gone['id']}"), CONTACT, "get", 404)
        assert lookup(client, maxResults=5, externalIds=[external_id])["data"] == [kept["data"]]
        create(client, 409, externalId=external_id, source="crm")
        assert sandbox.stats()["contacts"] == 1


def test_runs_as_a_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "quo_sync_dagster.sandbox.quo_server"]
    args = ["--data-dir", str(tmp_path), "--port", "0", "--no-rate-limit", "--api-key", "k1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        ready, url = process.stdout.readline().split()
        assert ready == "QUO_SANDBOX_READY" and url.startswith("http://127.0.0.1:")
        response = httpx.post(
            f"{url}{CONTACTS}",
            json={"defaultFields": {"firstName": "A"}},
            headers={"Authorization": "k1"},
        )
        check(response, CONTACTS, "post", 201)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_uniqueness_switch_accepts_duplicate_source_and_external_id(tmp_path: Path) -> None:
    external_id = uid()
    key = {"externalId": external_id, "source": "crm-a"}
    with (
        QuoSandbox(tmp_path, rate_limit=None) as sandbox,
        httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as client,
    ):
        assert sandbox.settings() == {"uniqueExternalIds": True}
        first = create(client, **key)["data"]
        create(client, 409, **key)
        sandbox.accept_duplicates()
        assert sandbox.settings() == {"uniqueExternalIds": False}
        second = create(client, **key)["data"]
        third = create(client, **key)["data"]
        other = create(client, externalId=uid(), source="crm-a")["data"]
        check(client.patch(f"{CONTACTS}/{other['id']}", json=key), CONTACT, "patch", 200)
        found = lookup(client, maxResults=50, externalIds=[external_id], sources=["crm-a"])
        assert [c["id"] for c in found["data"]] == [
            first["id"],
            second["id"],
            third["id"],
            other["id"],
        ]
        stats = sandbox.stats()
        assert (stats["contacts"], stats["duplicateExternalIds"]) == (4, 1)
        # Deleting one of the twins keeps the others findable.
        check(client.delete(f"{CONTACTS}/{second['id']}"), CONTACT, "delete", 204)
        found = lookup(client, maxResults=50, externalIds=[external_id])
        assert [c["id"] for c in found["data"]] == [first["id"], third["id"], other["id"]]
        # Enforced again: the key is taken (by three contacts), so a fourth is a 409.
        assert sandbox.settings(unique_external_ids=True) == {"uniqueExternalIds": True}
        assert create(client, 409, **key)["code"] == "0800409"
        for bad in ({"uniqueExternalIds": "no"}, {"noSuchSetting": True}, {}, [True]):
            response = httpx.post(f"{sandbox.url}/_sandbox/settings", json=bad)
            assert response.status_code == 400, bad
        assert sandbox.settings() == {"uniqueExternalIds": True}
    # The duplicates persist; the switch is the constructor's again after a restart.
    with (
        QuoSandbox(tmp_path, rate_limit=None, unique_external_ids=False) as sandbox,
        httpx.Client(base_url=sandbox.url, headers={"Authorization": sandbox.api_key}) as client,
    ):
        assert sandbox.settings() == {"uniqueExternalIds": False}
        assert sandbox.stats()["duplicateExternalIds"] == 1
        create(client, **key)
        assert len(lookup(client, maxResults=50, externalIds=[external_id])["data"]) == 4


def test_accept_duplicates_flag_of_the_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "quo_sync_dagster.sandbox.quo_server"]
    args = ["--data-dir", str(tmp_path), "--no-rate-limit", "--accept-duplicates"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        _, url = process.stdout.readline().split()
        with httpx.Client(base_url=url, headers={"Authorization": "sandbox-key"}) as client:
            for _ in range(2):
                create(client, externalId="twin", source="crm")
        assert httpx.get(f"{url}/_sandbox/stats").json()["duplicateExternalIds"] == 1
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def _count(client: httpx.Client, external_id: str) -> int:
    return len(lookup(client, maxResults=50, externalIds=[external_id])["data"])


@pytest.mark.parametrize("status", [500, 502, 503])
def test_write_then_fail_fault_writes_then_answers_5xx(
    sandbox: QuoSandbox, client: httpx.Client, status: int
) -> None:
    external_id = uid()
    sandbox.inject_fault(status, kinds=["create"], after_write=True)
    error = create(client, status, externalId=external_id, source="crm")
    assert error["message"] == "Injected sandbox fault after the request was served"
    assert _count(client, external_id) == 1  # written, though the answer said otherwise
    create(client, 409, externalId=external_id, source="crm")
    assert sandbox.stats()["pendingFaults"] == 0


# A dropped connection reads as closed without an answer or as reset, depending on timing.
NO_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError)


def test_write_then_fail_fault_drops_the_connection(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    external_id = uid()
    sandbox.reset_stats()
    sandbox.inject_fault(kinds=["create"], after_write=True, drop=True)
    with pytest.raises(NO_ANSWER):
        client.post(CONTACTS, json={**VALID, "externalId": external_id, "source": "crm"})
    assert _count(client, external_id) == 1
    # Dropped before the request is served: nothing written, and still no answer.
    unwritten = uid()
    sandbox.inject_fault(kinds=["create"], drop=True)
    with pytest.raises(NO_ANSWER):
        client.post(CONTACTS, json={**VALID, "externalId": unwritten, "source": "crm"})
    assert _count(client, unwritten) == 0
    stats = sandbox.stats()
    assert stats["byKind"]["create"] == 2 and stats["byStatus"]["0"] == 2  # 0: no answer


def test_write_then_fail_fault_answers_after_the_client_gave_up(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    external_id = uid()
    sandbox.inject_fault(kinds=["create"], after_write=True, delay_seconds=1.0)
    body = {**VALID, "externalId": external_id, "source": "crm"}
    with pytest.raises(httpx.ReadTimeout):
        client.post(CONTACTS, json=body, timeout=0.2)
    assert _count(client, external_id) == 1  # written before the answer was held back


def test_fault_for_one_kind_leaves_other_requests_alone(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    url = f"{CONTACTS}/{create(client)['data']['id']}"
    sandbox.inject_fault(503, count=2, kinds=["create", "patch"])
    sandbox.inject_fault(500)  # any kind: served to the first request, not held back
    lookup(client, 500, maxResults=1)
    check(client.get(FIELDS), FIELDS, "get", 200)
    lookup(client, maxResults=1, externalIds=[uid()])
    assert sandbox.stats()["pendingFaults"] == 2
    external_id = uid()
    create(client, 503, externalId=external_id)  # not written: the fault came first
    assert _count(client, external_id) == 0
    check(client.patch(url, json={"defaultFields": {"role": "x"}}), CONTACT, "patch", 503)
    check(client.patch(url, json={"defaultFields": {"role": "x"}}), CONTACT, "patch", 200)
    assert sandbox.stats()["pendingFaults"] == 0


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "kinds": ["nope"]},
        {"status": 500, "kinds": []},
        {"status": 500, "kinds": "create"},
        {"status": 500, "drop": True},
        {"afterWrite": True},
        {"status": 500, "afterWrite": "yes"},
    ],
)
def test_bad_write_faults_are_400(sandbox: QuoSandbox, fault: dict[str, Any]) -> None:
    response = httpx.post(f"{sandbox.url}/_sandbox/faults", json=fault)
    assert response.status_code == 400, response.text
    assert sandbox.stats()["pendingFaults"] == 0


def test_prefill_puts_an_earlier_systems_contacts_in_with_reserved_sources(
    sandbox: QuoSandbox, client: httpx.Client
) -> None:
    source, ids = f"openphone-{uid('crm')}", [uid(), uid()]
    bodies = [
        {"externalId": i, "source": source, "defaultFields": {"firstName": "Old"}} for i in ids
    ]
    create(client, 400, **bodies[0])  # the public API refuses the earlier system's source
    before, last_write = sandbox.stats(), (sandbox.writes() or [{"n": 0}])[-1]["n"]
    made = sandbox.prefill_contacts(bodies)
    after = sandbox.stats()
    assert [c["externalId"] for c in made] == ids
    # Neither requests nor writes of the product: its counts stay its own.
    assert after["requests"] == before["requests"]
    assert sandbox.writes(after=last_write) == []
    assert after["contactsBySource"][source] == 2
    found = lookup(client, maxResults=50, externalIds=ids, sources=[source])
    assert [c["id"] for c in found["data"]] == [c["id"] for c in made]
    for contact in found["data"]:  # the same shape as a contact the public API made
        _validator(CONTACT, "get", 200).validate({"data": contact})
    # The product may then move it to its own source; PATCH still refuses a reserved one.
    url = f"{CONTACTS}/{made[0]['id']}"
    check(client.patch(url, json={"source": "my-crm", "externalId": uid()}), CONTACT, "patch", 200)
    check(client.patch(url, json={"source": source}), CONTACT, "patch", 400)


@pytest.mark.parametrize(
    "bodies",
    [
        {"defaultFields": {"firstName": "Not a list"}},
        [{"externalId": "x"}],  # no defaultFields
        [{"defaultFields": {"firstName": "Ada"}, "customFields": [{"key": "nope", "value": 1}]}],
    ],
)
def test_prefill_refuses_invalid_bodies_and_makes_nothing(sandbox: QuoSandbox, bodies: Any) -> None:
    contacts = sandbox.stats()["contacts"]
    valid = {"externalId": uid(), "source": "openphone-x", "defaultFields": {"firstName": "A"}}
    batch = [valid, *bodies] if isinstance(bodies, list) else bodies
    response = httpx.post(f"{sandbox.url}/_sandbox/contacts", json=batch)
    assert response.status_code == 400, response.text
    assert sandbox.stats()["contacts"] == contacts


def test_prefill_keeps_source_and_external_id_unique(sandbox: QuoSandbox) -> None:
    key = {"externalId": uid(), "source": "openphone-pipedrive"}
    sandbox.prefill_contacts([{**key, "defaultFields": {"firstName": "A"}}])
    contacts = sandbox.stats()["contacts"]
    fresh = {
        "externalId": uid(),
        "source": "openphone-pipedrive",
        "defaultFields": {"firstName": "B"},
    }
    for batch in ([fresh, {**key, "defaultFields": {"firstName": "C"}}], [fresh, fresh]):
        response = httpx.post(f"{sandbox.url}/_sandbox/contacts", json=batch)
        assert response.status_code == 409
    assert sandbox.stats()["contacts"] == contacts
