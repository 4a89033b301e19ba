"""The Zoho CRM sandbox over real HTTP: the rules a lax fake would let through, for Contacts,
Leads and Accounts alike."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.sandbox.zoho_server import SYSTEM_FIELDS, ZohoSandbox
from quo_sync_dagster_tests.test_attio_sandbox import Receiver, settled

TOKEN = "zoho-sandbox-token"
CONTACTS, LEADS, ACCOUNTS = 2300, 120, 2050  # Accounts past the 2,000-record `page` limit too
FIELDS = "Last_Name,Modified_Time"
ACCOUNT_FIELDS = "Account_Name,Modified_Time"  # an Account has no Last_Name
FIELDS_OF = {"Contacts": FIELDS, "Leads": FIELDS, "Accounts": ACCOUNT_FIELDS}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoSandbox]:
    records = {"Contacts": CONTACTS, "Leads": LEADS, "Accounts": ACCOUNTS}
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
        query = {"fields": FIELDS_OF[module], "per_page": 200, **params}
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
        ({"fields": "Last_Name,Account_Type"}, "INVALID_DATA"),  # an Accounts field
        ({"fields": FIELDS, "ids": ",".join(str(i) for i in range(101))}, "LIMIT_EXCEEDED"),
    ],
)
def test_rejects_what_zoho_rejects(sandbox: ZohoSandbox, params: dict[str, Any], code: str) -> None:
    response = get(sandbox, "Contacts", params=params)
    assert response.status_code == 400
    assert response.json()["code"] == code
    assert response.json()["status"] == "error"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"fields": FIELDS}, "INVALID_DATA"),  # Last_Name is a person's
        ({"fields": "Account_Name,First_Name"}, "INVALID_DATA"),
        ({"per_page": 10}, "REQUIRED_PARAM_MISSING"),
        (
            {"fields": ACCOUNT_FIELDS, "per_page": 200, "page": 11},
            "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
        ),
    ],
)
def test_accounts_reject_what_zoho_rejects(
    sandbox: ZohoSandbox, params: dict[str, Any], code: str
) -> None:
    response = get(sandbox, "Accounts", params=params)
    assert response.status_code == 400
    assert response.json()["code"] == code


def test_last_page_reachable_by_page_is_record_2000(sandbox: ZohoSandbox) -> None:
    response = get(sandbox, "Contacts", params={"fields": FIELDS, "per_page": 200, "page": 10})
    assert response.status_code == 200
    info = response.json()["info"]
    assert (info["page"], info["count"], info["more_records"]) == (10, 200, True)


@pytest.mark.parametrize(("module", "total"), [("Contacts", CONTACTS), ("Accounts", ACCOUNTS)])
def test_page_then_page_token_covers_every_record_once(
    sandbox: ZohoSandbox, module: str, total: int
) -> None:
    records = walk(sandbox, module, sort_by="Modified_Time", sort_order="desc")
    ids = [r["id"] for r in records]
    assert len(ids) == total
    assert len(set(ids)) == total
    times = [datetime.fromisoformat(r["Modified_Time"]) for r in records]
    assert times == sorted(times, reverse=True)
    # only the asked fields
    assert set(records[0]) == {"id", *FIELDS_OF[module].split(",")}


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
    for module, expected in (("Contacts", CONTACTS), ("Leads", LEADS), ("Accounts", ACCOUNTS)):
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


def test_accounts_have_realistic_shapes_and_contacts_look_them_up(sandbox: ZohoSandbox) -> None:
    fields = "Account_Name,Phone,Fax,Parent_Account,Billing_City,Created_Time"
    accounts = walk(sandbox, "Accounts", fields=fields)
    by_id = {a["id"]: a for a in accounts}
    assert all(len(i) == 19 and i.isdigit() for i in by_id)
    assert not by_id.keys() & {r["id"] for r in walk(sandbox, "Contacts")}  # ids never shared
    assert all(isinstance(a["Account_Name"], str) and a["Account_Name"] for a in accounts)
    assert any(not a["Account_Name"].isascii() for a in accounts)
    assert any(a["Phone"] is None for a in accounts) and any(a["Fax"] for a in accounts)
    parents = [a["Parent_Account"] for a in accounts if a["Parent_Account"]]
    assert parents and all(by_id[p["id"]]["Account_Name"] == p["name"] for p in parents)
    # A Contact's Account_Name is a lookup of an Account the module holds.
    contacts = get(sandbox, "Contacts", params={"fields": "Account_Name"}).json()["data"]
    lookups = [c["Account_Name"] for c in contacts if c["Account_Name"]]
    assert lookups and all(by_id[a["id"]]["Account_Name"] == a["name"] for a in lookups)


def test_an_int_record_count_makes_an_account_per_ten_people(tmp_path: Path) -> None:
    with ZohoSandbox(tmp_path, records=50, rate_limit=None) as sb:
        assert sb.stats()["records"] == {"Contacts": 34, "Leads": 16, "Accounts": 5}


def test_a_data_dir_from_before_accounts_serves_none_then_takes_them(tmp_path: Path) -> None:
    with ZohoSandbox(tmp_path, records={"Contacts": 2, "Leads": 1}, rate_limit=None):
        pass
    for name in ("zoho_records.json", "zoho_deleted.json"):  # as an older sandbox wrote them
        path = tmp_path / name
        path.write_text(
            json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "Accounts"})
        )
    with ZohoSandbox(tmp_path, rate_limit=None) as sb:
        assert get(sb, "Accounts", params={"fields": ACCOUNT_FIELDS}).status_code == 204
        created = sb.create_person({"Account_Name": "Initech"}, kind="Accounts")
        assert ids(walk(sb, "Accounts")) == [created["id"]]
        assert sb.stats()["records"] == {"Contacts": 2, "Leads": 1, "Accounts": 1}


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


# ---- Calls: create, then update by id ------------------------------------------------------
def write(sb: ZohoSandbox, method: str, path: str, body: Any) -> httpx.Response:
    headers = {"Authorization": f"Zoho-oauthtoken {TOKEN}"}
    return httpx.request(method, f"{sb.url}/crm/v8/{path}", json=body, headers=headers)


def a_call(sb: ZohoSandbox, **fields: Any) -> dict[str, Any]:
    """A Missed call on the first contact; the stored record."""
    contact = get(sb, "Contacts", params={"fields": FIELDS, "per_page": 1}).json()["data"][0]
    call = {"Subject": "Call", "Call_Type": "Missed", "Call_Start_Time": "2026-03-01T10:00:00Z"}
    call |= {"Who_Id": {"id": contact["id"]}, **fields}
    response = write(sb, "POST", "Calls", {"data": [call]})
    assert response.status_code == 201, response.text
    call_id = response.json()["data"][0]["details"]["id"]
    return next(c for c in sb.created()["calls"] if c["id"] == call_id)


def test_put_changes_the_fields_named_and_keeps_one_record(sandbox: ZohoSandbox) -> None:
    created = a_call(sandbox)
    change = {"Call_Type": "Inbound", "Call_Duration": "01:15", "Description": "Summary: ok"}
    response = write(sandbox, "PUT", f"Calls/{created['id']}", {"data": [change]})
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]
    assert (result["code"], result["status"], result["message"]) == (
        "SUCCESS",
        "success",
        "record updated",
    )
    assert result["details"]["id"] == created["id"]
    assert result["details"]["Created_Time"] == created["Created_Time"]
    stored = [c for c in sandbox.created()["calls"] if c["id"] == created["id"]]
    assert stored == [{**created, **change, "Modified_Time": result["details"]["Modified_Time"]}]
    (activity,) = [a for a in sandbox.activities() if a["id"] == created["id"]]
    assert (activity["kind"], activity["body"]) == ("call", "Summary: ok")
    assert activity["person"] == f"Contacts-{created['Who_Id']['id']}"
    assert sandbox.stats()["byKind"]["update_call"] >= 1


@pytest.mark.parametrize(
    ("body", "api_name"),
    [
        ({"data": [{"Call_Type": "Inbound"}]}, "Call_Duration"),  # required once not Missed
        ({"data": [{"Call_Type": "Outbound", "Call_Duration": "00:00"}]}, "Call_Duration"),
        ({"data": [{"Call_Type": "Voicemail"}]}, "Call_Type"),
        ({"data": [{"Call_Duration": "1:5"}]}, "Call_Duration"),
        ({"data": [{"Subject": "x" * 256}]}, "Subject"),
        ({"data": [{"Description": "x" * 32_001}]}, "Description"),
        ({"data": [{"Description": 5}]}, "Description"),
        ({"data": [{"id": "3652397000000000001"}]}, "id"),  # not the id in the URL
        ({"data": [{"Who_Id": {"id": "3652397000999999999"}}]}, "Who_Id"),
    ],
)
def test_put_refuses_what_zoho_refuses(
    sandbox: ZohoSandbox, body: dict[str, Any], api_name: str
) -> None:
    created = a_call(sandbox)
    response = write(sandbox, "PUT", f"Calls/{created['id']}", body)
    assert response.status_code == 400, response.text
    (error,) = response.json()["data"]
    assert error["status"] == "error" and error["code"] in ("INVALID_DATA", "MANDATORY_NOT_FOUND")
    assert error["details"]["api_name"] == api_name
    assert next(c for c in sandbox.created()["calls"] if c["id"] == created["id"]) == created


def test_put_of_an_unknown_id_or_several_records(sandbox: ZohoSandbox) -> None:
    response = write(sandbox, "PUT", "Calls/3652397000999999999", {"data": [{"Subject": "x"}]})
    assert response.status_code == 400
    assert response.json() == {
        "data": [
            {
                "code": "INVALID_DATA",
                "details": {"resource_path_index": 1},
                "message": "the id given seems to be invalid",
                "status": "error",
            }
        ]
    }
    created = a_call(sandbox)
    two = {"data": [{"Subject": "a"}, {"Subject": "b"}]}
    assert write(sandbox, "PUT", f"Calls/{created['id']}", two).status_code == 400
    empty = write(sandbox, "PUT", f"Calls/{created['id']}", {"data": []})
    assert empty.json()["code"] == "REQUIRED_PARAM_MISSING"
    assert write(sandbox, "POST", f"Calls/{created['id']}", {"data": []}).status_code == 405


def test_calls_and_notes_relate_to_an_account(sandbox: ZohoSandbox) -> None:
    account = get(sandbox, "Accounts", params={"fields": ACCOUNT_FIELDS}).json()["data"][0]
    contact = get(sandbox, "Contacts", params={"fields": FIELDS}).json()["data"][0]
    call = {"Subject": "Call", "Call_Type": "Missed", "Call_Start_Time": "2026-03-01T10:00:00Z"}
    related = {"$se_module": "Accounts", "What_Id": {"id": account["id"]}}
    # A contact may be named beside the account (unlike beside a lead).
    both = {**call, **related, "Who_Id": {"id": contact["id"]}}
    response = write(sandbox, "POST", "Calls", {"data": [{**call, **related}, both]})
    assert response.status_code == 201, response.text
    made = {r["details"]["id"] for r in response.json()["data"]}
    people = {a["id"]: a["person"] for a in sandbox.activities() if a["id"] in made}
    assert sorted(people.values()) == sorted(
        [f"Accounts-{account['id']}", f"Contacts-{contact['id']}"]
    )
    note = {
        "Note_Content": "hi",
        "Parent_Id": {"module": {"api_name": "Accounts"}, "id": account["id"]},
    }
    response = write(sandbox, "POST", "Notes", {"data": [note]})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("related", "api_name"),
    [
        ({"$se_module": "Deals", "What_Id": {"id": "3652397000300000001"}}, "$se_module"),
        (
            {"$se_module": "Leads", "What_Id": {"id": "3652397000300000001"}},
            "What_Id",
        ),  # an Account
        (
            {"$se_module": "Accounts", "What_Id": {"id": "3652397000100000001"}},
            "What_Id",
        ),  # a Contact
    ],
)
def test_a_call_related_to_a_record_of_another_module_is_refused(
    sandbox: ZohoSandbox, related: dict[str, Any], api_name: str
) -> None:
    call = {"Subject": "Call", "Call_Type": "Missed", "Call_Start_Time": "2026-03-01T10:00:00Z"}
    response = write(sandbox, "POST", "Calls", {"data": [{**call, **related}]})
    assert response.status_code == 400, response.text
    (error,) = response.json()["data"]
    assert (error["code"], error["details"]["api_name"]) == ("INVALID_DATA", api_name)


def test_updated_calls_persist_across_restarts(tmp_path: Path) -> None:
    with ZohoSandbox(tmp_path, records=5, rate_limit=None) as sb:
        created = a_call(sb)
        change = {"data": [{"Description": "later"}]}
        assert write(sb, "PUT", f"Calls/{created['id']}", change).status_code == 200
    with ZohoSandbox(tmp_path, records=5, rate_limit=None) as again:
        assert [(a["id"], a["body"]) for a in again.activities()] == [(created["id"], "later")]


# ---- people changes while a sync runs, and the notifications they send ---------------------
@pytest.fixture
def live(tmp_path: Path) -> Iterator[ZohoSandbox]:
    """A small sandbox of its own: these tests change its people."""
    records = {"Contacts": 30, "Leads": 10, "Accounts": 4}
    with ZohoSandbox(tmp_path, records=records, rate_limit=None) as sb:
        yield sb


def watch(sb: ZohoSandbox, channel_id: str, events: list[str], url: str, **extra: Any) -> None:
    channel = {"channel_id": channel_id, "events": events, "notify_url": url, **extra}
    response = httpx.post(
        f"{sb.url}/crm/v8/actions/watch",
        json={"watch": [channel]},
        headers={"Authorization": f"Zoho-oauthtoken {TOKEN}"},
    )
    assert response.status_code == 200, response.text


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


def id_order(sb: ZohoSandbox, module: str = "Contacts", **params: Any) -> list[str]:
    return ids(walk(sb, module, sort_by="id", sort_order="asc", **params))


def test_admin_changes_are_what_the_api_serves(live: ZohoSandbox) -> None:
    before = {r["id"]: r for r in live.people()}
    assert list(before) == id_order(live)
    since = max(datetime.fromisoformat(r["Modified_Time"]) for r in before.values())
    created = live.create_person({"First_Name": "Aroha", "Last_Name": "Ngata", "Phone": "021 555"})
    assert int(created["id"]) > max(map(int, before))
    assert (created["Full_Name"], created["Phone"]) == ("Aroha Ngata", "021 555")
    assert created["Email"] and created["Mailing_City"]  # generated where not given
    assert id_order(live)[-1] == created["id"]  # a create lands at the end, by id

    edited, victim = list(before)[4], list(before)[7]
    updated = live.update_person(edited)  # a generated new name and phone
    for name in ("First_Name", "Last_Name", "Phone"):
        assert updated[name] != before[edited][name]
    assert updated["Full_Name"] == " ".join(
        filter(None, (updated["First_Name"], updated["Last_Name"]))
    )
    assert datetime.fromisoformat(updated["Modified_Time"]) > since
    newer = get(
        live,
        "Contacts",
        params={"fields": FIELDS},
        headers={"If-Modified-Since": since.isoformat()},
    )
    assert sorted(ids(newer.json()["data"])) == sorted([created["id"], edited])

    live.delete_person(victim)
    assert victim not in id_order(live) and victim not in ids(live.people())
    assert id_order(live).index(edited) == 4  # an update does not move a person, by id
    batch = get(live, "Contacts", params={"fields": FIELDS, "ids": f"{victim},{edited}"})
    assert ids(batch.json()["data"]) == [edited]
    assert get(live, "Contacts", params={"fields": FIELDS, "ids": victim}).status_code == 204
    assert get(live, "Contacts/actions/count").json() == {"count": len(before)}
    [gone] = get(live, "Contacts/deleted").json()["data"]
    assert (gone["id"], gone["type"]) == (victim, "recycle")
    assert gone["display_name"] == before[victim]["Full_Name"]
    for call in (live.delete_person, live.update_person):
        with pytest.raises(httpx.HTTPStatusError) as unknown:
            call(victim)
        assert unknown.value.response.status_code == 404

    lead = live.create_person({"Company": "Initech"}, kind="Leads")
    assert lead["Company"] == "Initech" and id_order(live, "Leads")[-1] == lead["id"]
    assert lead["id"] not in ids(live.people())  # the default kind is Contacts
    assert live.update_person(lead["id"], {"Last_Name": "Bolton"})["Full_Name"].endswith("Bolton")


def test_admin_changes_of_accounts_are_served_and_notified(live: ZohoSandbox) -> None:
    accounts = live.people("Accounts")
    assert ids(accounts) == id_order(live, "Accounts") and len(accounts) == 4
    with Receiver() as rx:
        watch(live, "1000000068004", ["Accounts.all"], f"{rx.url}/accounts", token="t")
        watch(live, "1000000068005", ["Contacts.all"], f"{rx.url}/contacts", token="t")
        created = live.create_person(
            {"Account_Name": "Hooli", "Phone": "+1 650 555 0100"}, kind="Accounts"
        )
        updated = live.update_person(accounts[0]["id"], kind="Accounts")  # a generated change
        merged = live.merge_people(accounts[1]["id"], into=accounts[2]["id"], kind="Accounts")
        rx.wait_for(4)
        settled(live, queued=4)
    assert (created["Account_Name"], created["Phone"]) == ("Hooli", "+1 650 555 0100")
    assert "Full_Name" not in created and "Last_Name" not in created
    assert created["Billing_City"]  # generated where not given
    for name in ("Account_Name", "Phone"):
        assert updated[name] != accounts[0][name]
    assert merged["id"] == accounts[2]["id"]
    assert [(d.path, d.json()["module"], d.json()["operation"]) for d in rx.received] == [
        ("/accounts", "Accounts", "insert"),
        ("/accounts", "Accounts", "update"),
        ("/accounts", "Accounts", "update"),
        ("/accounts", "Accounts", "delete"),
    ]
    assert id_order(live, "Accounts") == [
        accounts[0]["id"],
        accounts[2]["id"],
        accounts[3]["id"],
        created["id"],
    ]
    [gone] = get(live, "Accounts/deleted").json()["data"]
    assert (gone["id"], gone["display_name"]) == (accounts[1]["id"], accounts[1]["Account_Name"])
    assert ids(live.people()) == ids(live.people("Contacts"))  # untouched by all of it


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (lambda sb, cid, lid: sb.create_person({"Company": "Initech"}), 400),  # a Leads field
        (lambda sb, cid, lid: sb.create_person({"Account_Name": ""}, kind="Accounts"), 400),
        (lambda sb, cid, lid: sb.create_person({"Last_Name": "X"}, kind="Accounts"), 400),
        (lambda sb, cid, lid: sb.create_person({"Full_Name": "Set By Zoho"}), 400),
        (lambda sb, cid, lid: sb.create_person({"Last_Name": ""}), 400),
        (lambda sb, cid, lid: sb.create_person(kind="Deals"), 400),
        (
            lambda sb, cid, lid: sb.update_person(cid, {"Modified_Time": "2020-01-01T00:00:00Z"}),
            400,
        ),
        (lambda sb, cid, lid: sb.update_person(lid, kind="Contacts"), 404),
        (lambda sb, cid, lid: sb.delete_person("3652397000999999999"), 404),
        (lambda sb, cid, lid: sb.merge_people(cid, into=cid), 400),
        (lambda sb, cid, lid: sb.merge_people(lid, into=cid), 404),  # across modules
    ],
)
def test_admin_refuses_bad_changes(live: ZohoSandbox, change: Callable, status: int) -> None:
    before = {m: live.people(m) for m in ("Contacts", "Leads")}
    with pytest.raises(httpx.HTTPStatusError) as refused:
        change(live, before["Contacts"][0]["id"], before["Leads"][0]["id"])
    assert refused.value.response.status_code == status
    assert "message" in refused.value.response.json()
    assert {m: live.people(m) for m in before} == before  # nothing half-written


NOTIFICATION_KEYS = {
    "server_time",
    "query_params",
    "module",
    "resource_uri",
    "ids",
    "affected_fields",
    "operation",
    "channel_id",
    "token",
}


def test_changes_notify_the_live_channels_that_watch_them(live: ZohoSandbox) -> None:
    with Receiver() as rx:
        watch(
            live,
            "1000000068001",
            ["Contacts.all"],
            f"{rx.url}/zoho?tenant=abc&k=1",
            token="tok-all",
            return_affected_field_values=True,
        )
        watch(live, "1000000068002", ["Leads.create", "Leads.edit"], f"{rx.url}/leads")
        started = int(time.time() * 1000)
        contact = live.create_person()
        live.update_person(contact["id"], {"Phone": "+1 555 0100", "Title": contact["Title"]})
        live.touch("Contacts", [contact["id"]])
        lead = live.create_person(kind="Leads")
        live.update_person(lead["id"], kind="Leads")
        live.delete_person(lead["id"])  # Leads.delete is not watched
        live.delete_person(contact["id"])
        rx.wait_for(6)
        stats = settled(live, queued=6)
        ended = int(time.time() * 1000)

    assert (stats["queued"], stats["sent"]) == (6, 6)
    bodies = [d.json() for d in rx.received]
    assert all(set(body) == NOTIFICATION_KEYS for body in bodies)
    assert all(started <= body["server_time"] <= ended for body in bodies)
    assert all(d.headers["content-type"] == "application/json" for d in rx.received)
    got = sorted((d.path, untimed(body)) for d, body in zip(rx.received, bodies, strict=True))
    on_contacts = {
        "channel_id": "1000000068001",
        "token": "tok-all",
        "query_params": {"tenant": "abc", "k": "1"},
        "module": "Contacts",
        "resource_uri": "https://www.zohoapis.com/crm/v8/Contacts",
        "ids": [contact["id"]],
        "affected_fields": [],
    }
    on_leads = {
        "channel_id": "1000000068002",
        "token": None,
        "query_params": {},
        "module": "Leads",
        "resource_uri": "https://www.zohoapis.com/crm/v8/Leads",
        "ids": [lead["id"]],
        "affected_fields": [],
    }
    phone_changed = {"affected_fields": [{contact["id"]: ["Phone"]}]}  # Title did not change
    contacts_path = "/zoho?tenant=abc&k=1"
    assert got == sorted(
        [
            (contacts_path, untimed({**on_contacts, "operation": "insert"})),
            (contacts_path, untimed({**on_contacts, "operation": "update", **phone_changed})),
            (contacts_path, untimed({**on_contacts, "operation": "update"})),  # the touch
            (contacts_path, untimed({**on_contacts, "operation": "delete"})),
            ("/leads", untimed({**on_leads, "operation": "insert"})),
            ("/leads", untimed({**on_leads, "operation": "update"})),  # fields not asked for
        ]
    )


def untimed(body: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in body.items() if k != "server_time"}, sort_keys=True)


def test_merge_is_an_update_of_the_survivor_and_a_delete(live: ZohoSandbox) -> None:
    people = live.people()
    loser = next(p for p in people if p["Secondary_Email"] and p["Home_Phone"])
    survivor = next(p for p in people if p["Secondary_Email"] is None and p["Title"])
    taken = {
        name
        for name, value in loser.items()
        if name not in SYSTEM_FIELDS and value is not None and survivor[name] is None
    }
    assert {"Secondary_Email", "Home_Phone"} <= taken
    with Receiver() as rx:
        watch(
            live,
            "1",
            ["Contacts.all"],
            f"{rx.url}/hook",
            token="t",
            return_affected_field_values=True,
        )
        merged = live.merge_people(loser["id"], into=survivor["id"])
        rx.wait_for(2)
        settled(live, queued=2)

    assert merged["id"] == survivor["id"]
    assert merged["Last_Name"] == survivor["Last_Name"] and merged["Title"] == survivor["Title"]
    assert {name: merged[name] for name in taken} == {name: loser[name] for name in taken}
    update, delete = (d.json() for d in rx.received)  # one request's notifications, in order
    assert (update["operation"], update["ids"]) == ("update", [survivor["id"]])
    [affected] = update["affected_fields"]
    assert set(affected[survivor["id"]]) == taken
    assert (delete["operation"], delete["ids"], delete["affected_fields"]) == (
        "delete",
        [loser["id"]],
        [],
    )
    assert loser["id"] not in id_order(live)
    assert ids(get(live, "Contacts/deleted").json()["data"]) == [loser["id"]]
    assert datetime.fromisoformat(merged["Modified_Time"]) > datetime.fromisoformat(
        survivor["Modified_Time"]
    )


def test_an_expired_channel_is_notified_of_nothing(live: ZohoSandbox) -> None:
    expiry = (datetime.now(UTC) + timedelta(seconds=2)).isoformat(timespec="seconds")
    with Receiver() as rx:
        watch(live, "1", ["Contacts.all"], f"{rx.url}/expired", channel_expiry=expiry)
        watch(live, "2", ["Contacts.all"], f"{rx.url}/live")
        deadline = time.monotonic() + 10
        while channels(live) != ["2"]:  # channel 1 lapses within two seconds
            assert time.monotonic() < deadline
            time.sleep(0.05)
        live.create_person()
        rx.wait_for(1)
        stats = settled(live, queued=1)
    assert [d.path for d in rx.received] == ["/live"]
    assert stats["queued"] == 1


def channels(sb: ZohoSandbox) -> list[str]:
    response = get(sb, "actions/watch")
    return (
        [] if response.status_code == 204 else [c["channel_id"] for c in response.json()["watch"]]
    )


def test_lost_and_duplicated_deliveries_are_counted(live: ZohoSandbox) -> None:
    with Receiver() as rx:
        watch(live, "1", ["Contacts.create"], f"{rx.url}/hook", token="t")
        assert live.webhook_faults(drop=1, duplicate=1)["duplicate"] == 1
        created = [live.create_person()["id"] for _ in range(2)]
        rx.wait_for(2)
        stats = settled(live, queued=2)
    assert (stats["queued"], stats["dropped"], stats["duplicated"], stats["sent"]) == (2, 1, 1, 2)
    first, second = rx.received  # both copies of the one that was kept
    assert first.raw == second.raw
    assert first.json()["ids"][0] in created


def test_offset_paging_under_concurrent_changes(live: ZohoSandbox) -> None:
    """By id ascending, a page token's offset shifts back by the people deleted before it;
    creates append at the end and updates do not move anyone. What the sync builds on."""
    everyone = id_order(live)
    params = {"fields": FIELDS, "per_page": 10, "sort_by": "id", "sort_order": "asc"}
    first = get(live, "Contacts", params=params).json()
    assert ids(first["data"]) == everyone[:10]
    for record_id in everyone[:3]:
        live.delete_person(record_id)
    live.update_person(everyone[15])
    created = live.create_person()["id"]
    token = first["info"]["next_page_token"]
    second = get(live, "Contacts", params={**params, "page_token": token}).json()
    # The next page starts three people later than it would have: those three are skipped.
    assert ids(second["data"]) == everyone[13:23]
    assert id_order(live) == [*everyone[3:], created]


def test_people_changes_persist_across_restarts(tmp_path: Path) -> None:
    records = {"Contacts": 6, "Leads": 3}
    with ZohoSandbox(tmp_path, records=records, rate_limit=None) as sb:
        people = ids(sb.people())
        sb.update_person(people[0], {"Title": "Skipper"})
        sb.delete_person(people[-1])  # the largest id: the next create still gets a larger one
        sb.merge_people(people[1], into=people[2])
        before = sb.people()
    with ZohoSandbox(tmp_path, records=records, rate_limit=None) as sb:
        assert sb.people() == before
        assert ids(before) == [people[0], *people[2:5]] and before[0]["Title"] == "Skipper"
        assert sorted(ids(get(sb, "Contacts/deleted").json()["data"])) == sorted(
            [people[1], people[-1]]
        )
        assert int(sb.create_person()["id"]) > int(people[-1])


# ---- POST /{module}: people inserted through the API ---------------------------------------
LEAD = {"Last_Name": "Unknown caller +14155550199", "Phone": "+14155550199"}
ACCOUNT = {"Account_Name": "Initech", "Phone": "+1 512 555 0100"}
PEOPLE_FIELDS = "First_Name,Last_Name,Full_Name,Phone,Mobile,Email,Modified_Time"


def test_insert_is_listed_read_and_notified_like_an_admin_create(live: ZohoSandbox) -> None:
    leads_before = ids(live.people("Leads"))
    since = datetime.now(UTC) - timedelta(seconds=1)
    with Receiver() as rx:
        watch(live, "1000000068003", ["Leads.create"], f"{rx.url}/leads", token="tok")
        response = write(live, "POST", "Leads", {"data": [LEAD]})
        assert response.status_code == 201, response.text
        (result,) = response.json()["data"]
        assert (result["code"], result["status"], result["message"]) == (
            "SUCCESS",
            "success",
            "record added",
        )
        details = result["details"]
        assert set(details) == {
            *("id", "Created_Time", "Modified_Time", "Created_By", "Modified_By"),
            "$approval_state",
        }
        (delivery,) = rx.wait_for(1)
        settled(live, queued=1)
    lead_id = details["id"]
    assert int(lead_id) > max(map(int, leads_before))
    assert delivery.path == "/leads"
    assert untimed(delivery.json()) == untimed(
        {
            "query_params": {},
            "module": "Leads",
            "resource_uri": "https://www.zohoapis.com/crm/v8/Leads",
            "ids": [lead_id],
            "affected_fields": [],
            "operation": "insert",
            "channel_id": "1000000068003",
            "token": "tok",
        }
    )

    (stored,) = [r for r in live.people("Leads") if r["id"] == lead_id]
    assert (stored["Last_Name"], stored["Full_Name"], stored["Phone"]) == (
        LEAD["Last_Name"],
        LEAD["Last_Name"],
        LEAD["Phone"],
    )
    # Only what was given: nothing generated, as Zoho stores an insert.
    for name in ("First_Name", "Email", "Mobile", "Company", "City", "Lead_Source", "Title"):
        assert stored[name] is None, name
    assert stored["Converted__s"] is False and stored["Owner"]["id"]
    assert stored["Created_Time"] == stored["Modified_Time"] == details["Created_Time"]

    by_id = get(live, "Leads", params={"fields": PEOPLE_FIELDS, "ids": lead_id}).json()["data"]
    assert by_id == [{"id": lead_id, **{f: stored[f] for f in PEOPLE_FIELDS.split(",")}}]
    assert id_order(live, "Leads")[-1] == lead_id
    newer = get(
        live,
        "Leads",
        params={"fields": FIELDS},
        headers={"If-Modified-Since": since.isoformat()},
    )
    assert ids(newer.json()["data"]) == [lead_id]
    assert get(live, "Leads/actions/count").json() == {"count": len(leads_before) + 1}
    stats = live.stats()
    assert stats["byKind"]["create_person"] == 1 and stats["records"]["Leads"] == 11


def test_insert_of_several_records_answers_per_record(live: ZohoSandbox) -> None:
    contacts = len(live.people())
    body = {
        "data": [
            {"First_Name": "Aroha", "Last_Name": "Ngata", "Mobile": "+64 21 555 0100"},
            {"First_Name": "No last name"},
            {"Last_Name": "Account", "Account_Name": {"id": "3652397000000000003"}},
        ],
        "trigger": [],
    }
    response = write(live, "POST", "Contacts", body)
    assert response.status_code == 207, response.text
    first, refused, third = response.json()["data"]
    assert first["status"] == third["status"] == "success"
    assert refused == {
        "code": "MANDATORY_NOT_FOUND",
        "details": {"api_name": "Last_Name", "json_path": "$.data[1].Last_Name"},
        "message": "required field not found",
        "status": "error",
    }
    assert int(third["details"]["id"]) > int(first["details"]["id"])
    stored = {r["id"]: r for r in live.people()}
    assert len(stored) == contacts + 2
    assert stored[first["details"]["id"]]["Full_Name"] == "Aroha Ngata"
    assert stored[third["details"]["id"]]["Account_Name"] == {"id": "3652397000000000003"}


@pytest.mark.parametrize(
    ("module", "record", "code", "api_name"),
    [
        ("Leads", {"Phone": "+14155550199"}, "MANDATORY_NOT_FOUND", "Last_Name"),
        ("Leads", {"Last_Name": ""}, "MANDATORY_NOT_FOUND", "Last_Name"),
        ("Leads", {"Last_Name": None}, "MANDATORY_NOT_FOUND", "Last_Name"),
        ("Leads", {"Last_Name": "   "}, "INVALID_DATA", "Last_Name"),
        ("Leads", {"Last_Name": 5}, "INVALID_DATA", "Last_Name"),
        ("Leads", {"Last_Name": "x" * 256}, "INVALID_DATA", "Last_Name"),
        ("Leads", {**LEAD, "Phone": "+1 415 555 0199 0199 0199 0199 0"}, "INVALID_DATA", "Phone"),
        ("Leads", {**LEAD, "Phone": "call me!"}, "INVALID_DATA", "Phone"),
        ("Leads", {**LEAD, "Phone": 14155550199}, "INVALID_DATA", "Phone"),
        ("Leads", {**LEAD, "Email": "not-an-email"}, "INVALID_DATA", "Email"),
        ("Leads", {**LEAD, "Email_Opt_Out": "yes"}, "INVALID_DATA", "Email_Opt_Out"),
        ("Leads", {**LEAD, "Owner": "Pat Sandbox"}, "INVALID_DATA", "Owner"),
        ("Leads", {**LEAD, "Full_Name": "Set By Zoho"}, "INVALID_DATA", "Full_Name"),
        ("Leads", {**LEAD, "id": "3652397000999999999"}, "INVALID_DATA", "id"),
        ("Leads", {**LEAD, "Converted__s": True}, "INVALID_DATA", "Converted__s"),
        ("Leads", {**LEAD, "Account_Name": {"id": "1"}}, "INVALID_DATA", "Account_Name"),
        ("Leads", {**LEAD, "Nickname": "x"}, "INVALID_DATA", "Nickname"),
        ("Contacts", {**LEAD, "Company": "Initech"}, "INVALID_DATA", "Company"),  # Leads only
        ("Contacts", {**LEAD, "Account_Name": "Initech"}, "INVALID_DATA", "Account_Name"),
        ("Accounts", {"Phone": "+14155550199"}, "MANDATORY_NOT_FOUND", "Account_Name"),
        ("Accounts", {"Account_Name": "  "}, "INVALID_DATA", "Account_Name"),
        ("Accounts", {"Account_Name": {"id": "1"}}, "INVALID_DATA", "Account_Name"),  # text here
        ("Accounts", {**ACCOUNT, "Last_Name": "Doe"}, "INVALID_DATA", "Last_Name"),
        ("Accounts", {**ACCOUNT, "Parent_Account": "Acme"}, "INVALID_DATA", "Parent_Account"),
        ("Accounts", {**ACCOUNT, "Fax": "fax: 0199"}, "INVALID_DATA", "Fax"),
    ],
)
def test_insert_refuses_what_zoho_refuses(
    sandbox: ZohoSandbox, module: str, record: dict[str, Any], code: str, api_name: str
) -> None:
    before = sandbox.stats()["records"]
    response = write(sandbox, "POST", module, {"data": [record]})
    assert response.status_code == 400, response.text
    (error,) = response.json()["data"]
    assert (error["status"], error["code"]) == ("error", code)
    assert error["details"]["api_name"] == api_name
    assert error["details"]["json_path"] == f"$.data[0].{api_name}"
    assert sandbox.stats()["records"] == before


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("Leads", {"data": []}, "REQUIRED_PARAM_MISSING"),
        ("Leads", {"data": LEAD}, "REQUIRED_PARAM_MISSING"),  # one record is still a list
        ("Leads", [LEAD], "REQUIRED_PARAM_MISSING"),
        ("Leads", {"data": [LEAD] * 101}, "LIMIT_EXCEEDED"),
        ("Deals", {"data": [{"Deal_Name": "x"}]}, "INVALID_MODULE"),
    ],
)
def test_insert_refuses_bad_envelopes(
    sandbox: ZohoSandbox, path: str, body: Any, code: str
) -> None:
    before = sandbox.stats()["records"]
    response = write(sandbox, "POST", path, body)
    assert response.status_code == 400 and response.json()["code"] == code, response.text
    assert sandbox.stats()["records"] == before


def test_an_account_insert_stores_only_what_was_given(live: ZohoSandbox) -> None:
    parent = live.people("Accounts")[0]
    body = {"data": [{**ACCOUNT, "Parent_Account": {"id": parent["id"]}}]}
    response = write(live, "POST", "Accounts", body)
    assert response.status_code == 201, response.text
    account_id = response.json()["data"][0]["details"]["id"]
    (stored,) = [a for a in live.people("Accounts") if a["id"] == account_id]
    assert (stored["Account_Name"], stored["Phone"]) == (ACCOUNT["Account_Name"], ACCOUNT["Phone"])
    assert stored["Parent_Account"] == {"id": parent["id"]}
    assert stored["Fax"] is None and stored["Billing_City"] is None and stored["Owner"]["id"]
    assert "Email_Opt_Out" not in stored and "Converted__s" not in stored
    params = {"fields": "Account_Name,Phone,Fax", "ids": account_id}
    assert get(live, "Accounts", params=params).json()["data"] == [
        {"id": account_id, "Account_Name": "Initech", "Phone": ACCOUNT["Phone"], "Fax": None}
    ]


def test_insert_needs_json_and_the_token(sandbox: ZohoSandbox) -> None:
    before = sandbox.stats()["records"]
    headers = {"Authorization": f"Zoho-oauthtoken {TOKEN}"}
    not_json = httpx.post(f"{sandbox.url}/crm/v8/Leads", content=b"{nope", headers=headers)
    assert not_json.status_code == 400 and not_json.json()["code"] == "INVALID_DATA"
    bearer = httpx.post(
        f"{sandbox.url}/crm/v8/Leads",
        json={"data": [LEAD]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bearer.status_code == 401 and bearer.json()["code"] == "INVALID_TOKEN"
    assert sandbox.stats()["records"] == before


def test_inserted_people_persist_across_restarts(tmp_path: Path) -> None:
    records = {"Contacts": 2, "Leads": 2}
    with ZohoSandbox(tmp_path, records=records, rate_limit=None) as sb:
        response = write(sb, "POST", "Leads", {"data": [LEAD]})
        lead_id = response.json()["data"][0]["details"]["id"]
        leads = sb.people("Leads")
    with ZohoSandbox(tmp_path, records=records, rate_limit=None) as sb:
        assert sb.people("Leads") == leads and leads[-1]["id"] == lead_id
        assert int(sb.create_person(kind="Leads")["id"]) > int(lead_id)
