"""The Zoho CRM sandbox over real HTTP: the rules a lax fake would let through."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from quo_sync_dagster.sandbox.zoho_server import ZohoSandbox

TOKEN = "zoho-sandbox-token"
CONTACTS, LEADS = 2300, 120
FIELDS = "Last_Name,Modified_Time"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoSandbox]:
    records = {"Contacts": CONTACTS, "Leads": LEADS}
    with ZohoSandbox(tmp_path_factory.mktemp("zoho"), records=records, rate_limit=None) as sb:
        yield sb


def get(
    sb: ZohoSandbox, path: str, auth: str = f"Zoho-oauthtoken {TOKEN}", **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": auth, **kwargs.pop("headers", {})}
    return httpx.get(f"{sb.url}/crm/v8/{path}", headers=headers, **kwargs)


def walk(sb: ZohoSandbox, module: str, **params: Any) -> list[dict[str, Any]]:
    """Every record by `page` up to 2,000, then by `page_token`, 200 per page."""
    records, page, token = [], 1, None
    while True:
        query = {"fields": FIELDS, "per_page": 200, **params}
        query |= {"page_token": token} if token else {"page": page}
        body = get(sb, module, params=query).json()
        records += body["data"]
        if not body["info"]["more_records"]:
            return records
        page += 1
        if token or page * 200 > 2000:
            token = body["info"]["next_page_token"]


@pytest.mark.parametrize(
    "auth", ["Bearer zoho-sandbox-token", "Zoho-oauthtoken wrong", "zoho-sandbox-token"]
)
def test_rejects_wrong_auth_form_or_token(sandbox: ZohoSandbox, auth: str) -> None:
    response = get(sandbox, "Contacts", auth=auth, params={"fields": FIELDS})
    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"
    assert get(sandbox, "Contacts", params={"fields": FIELDS}).status_code == 200


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"fields": FIELDS, "per_page": 201}, "INVALID_DATA"),
        ({"fields": FIELDS, "per_page": 200, "page": 11}, "DISCRETE_PAGINATION_LIMIT_EXCEEDED"),
        ({"fields": FIELDS, "per_page": 100, "page": 21}, "DISCRETE_PAGINATION_LIMIT_EXCEEDED"),
        ({"per_page": 10}, "REQUIRED_PARAM_MISSING"),
        ({"fields": FIELDS, "sort_by": "Last_Name"}, "INVALID_DATA"),
        ({"fields": FIELDS, "sort_order": "newest"}, "INVALID_DATA"),
        ({"fields": "Last_Name,Company"}, "INVALID_DATA"),  # a Leads field asked of Contacts
        ({"fields": FIELDS, "ids": ",".join(str(i) for i in range(101))}, "LIMIT_EXCEEDED"),
    ],
)
def test_rejects_what_zoho_rejects(sandbox: ZohoSandbox, params: dict[str, Any], code: str) -> None:
    response = get(sandbox, "Contacts", params=params)
    assert response.status_code == 400
    assert response.json()["code"] == code
    assert response.json()["status"] == "error"


def test_last_page_reachable_by_page_is_record_2000(sandbox: ZohoSandbox) -> None:
    response = get(sandbox, "Contacts", params={"fields": FIELDS, "per_page": 200, "page": 10})
    assert response.status_code == 200
    info = response.json()["info"]
    assert (info["page"], info["count"], info["more_records"]) == (10, 200, True)


def test_page_then_page_token_covers_every_record_once(sandbox: ZohoSandbox) -> None:
    records = walk(sandbox, "Contacts", sort_by="Modified_Time", sort_order="desc")
    ids = [r["id"] for r in records]
    assert len(ids) == CONTACTS
    assert len(set(ids)) == CONTACTS
    times = [datetime.fromisoformat(r["Modified_Time"]) for r in records]
    assert times == sorted(times, reverse=True)
    assert set(records[0]) == {"id", "Last_Name", "Modified_Time"}  # only the asked fields


def test_default_sort_is_id_descending(sandbox: ZohoSandbox) -> None:
    ids = [int(r["id"]) for r in walk(sandbox, "Leads")]
    assert len(ids) == LEADS
    assert ids == sorted(ids, reverse=True)


def test_page_token_is_bound_to_its_query(sandbox: ZohoSandbox) -> None:
    first = get(sandbox, "Leads", params={"fields": FIELDS, "per_page": 50}).json()
    token = first["info"]["next_page_token"]
    other = {"fields": FIELDS, "per_page": 50, "page_token": token, "sort_order": "asc"}
    mismatch = get(sandbox, "Leads", params=other)
    assert mismatch.status_code == 400
    assert mismatch.json()["code"] == "TOKEN_BOUND_DATA_MISMATCH"
    both = get(sandbox, "Leads", params={"fields": FIELDS, "page_token": token, "page": 2})
    assert both.status_code == 400
    assert both.json()["code"] == "AMBIGUITY_DURING_PROCESSING"


def test_if_modified_since_filters_and_answers_204_when_nothing(sandbox: ZohoSandbox) -> None:
    everyone = walk(sandbox, "Leads", sort_by="Modified_Time")
    cutoff = everyone[40]["Modified_Time"]  # newest first: 40 records are strictly newer
    params = {"fields": FIELDS, "sort_by": "Modified_Time"}
    newer = get(sandbox, "Leads", params=params, headers={"If-Modified-Since": cutoff})
    assert newer.status_code == 200
    assert [r["id"] for r in newer.json()["data"]] == [r["id"] for r in everyone[:40]]

    newest = everyone[0]["Modified_Time"]
    none = get(sandbox, "Leads", params=params, headers={"If-Modified-Since": newest})
    assert none.status_code == 204
    assert none.content == b""

    sandbox.touch("Leads", [everyone[-1]["id"]])
    touched = get(sandbox, "Leads", params=params, headers={"If-Modified-Since": newest})
    assert [r["id"] for r in touched.json()["data"]] == [everyone[-1]["id"]]


def test_if_modified_since_needs_an_offset(sandbox: ZohoSandbox) -> None:
    naive = (datetime.now() - timedelta(days=1)).isoformat(timespec="seconds")
    response = get(
        sandbox, "Leads", params={"fields": FIELDS}, headers={"If-Modified-Since": naive}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_DATA"


def test_count_matches_the_listing(sandbox: ZohoSandbox) -> None:
    for module, expected in (("Contacts", CONTACTS), ("Leads", LEADS)):
        response = get(sandbox, f"{module}/actions/count")
        assert response.json() == {"count": expected}
    assert sandbox.stats()["byKind"]["count"] >= 2


def test_batch_read_returns_known_ids_only(sandbox: ZohoSandbox) -> None:
    known = [r["id"] for r in walk(sandbox, "Leads")[:2]]
    params = {"fields": "First_Name,Last_Name,Company", "ids": ",".join([*known, "1"])}
    body = get(sandbox, "Leads", params=params).json()
    assert [r["id"] for r in body["data"]] == known
    assert all(isinstance(r["Company"], str) and r["Last_Name"] for r in body["data"])


def test_people_have_realistic_shapes(sandbox: ZohoSandbox) -> None:
    fields = "First_Name,Last_Name,Email,Phone,Mobile,Account_Name,Customer_Tier__c,Created_Time"
    records = get(sandbox, "Contacts", params={"fields": fields}).json()["data"]
    assert all(len(r["id"]) == 19 and r["id"].isdigit() for r in records)
    assert all(r["Last_Name"] for r in records)
    assert any(r["First_Name"] is None for r in records)
    assert any(not (r["Last_Name"] + (r["First_Name"] or "")).isascii() for r in records)
    assert any((r["Phone"] or "").startswith("+44") for r in records)
    assert any(set(r["Account_Name"] or {}) == {"name", "id"} for r in records)
    assert all(datetime.fromisoformat(r["Created_Time"]).utcoffset() is not None for r in records)


def test_429_has_zoho_body_and_no_retry_after(tmp_path: Any) -> None:
    with ZohoSandbox(tmp_path, records=10, rate_limit=2) as sb:
        responses = [get(sb, "Leads/actions/count") for _ in range(6)]
        limited = [r for r in responses if r.status_code == 429]
        assert limited
        assert all(r.json()["code"] == "TOO_MANY_REQUESTS" for r in limited)
        assert all("retry-after" not in r.headers for r in limited)
        assert sb.stats()["rateLimited"] == len(limited)


def test_people_persist_across_restarts(tmp_path: Any) -> None:
    with ZohoSandbox(tmp_path, records=9, rate_limit=None) as sb:
        first = get(sb, "Contacts", params={"fields": FIELDS}).json()["data"]
        sb.touch("Contacts", [first[-1]["id"]])
    with ZohoSandbox(tmp_path, records=500, rate_limit=None) as sb:  # the data dir wins
        again = get(sb, "Contacts", params={"fields": FIELDS}).json()["data"]
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert again[-1]["Modified_Time"] != first[-1]["Modified_Time"]
