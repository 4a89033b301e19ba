"""ZohoApi against the Zoho sandbox over real HTTP: paging switch, writes, watch, 429s, errors."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from quo_sync_dagster.core.ratelimit import DEFAULT_RETRY_AFTER
from quo_sync_dagster.crms.zoho_api import (
    DEFAULT_FIELDS,
    ZohoApi,
    ZohoApiError,
    ZohoOutcomeUnknown,
    ZohoUnavailable,
)
from quo_sync_dagster.quo.governor import governor_key
from quo_sync_dagster.sandbox.zoho_server import ZohoSandbox
from quo_sync_dagster.store import open_store
from quo_sync_dagster_tests.governing import RecordingGovernor

TOKEN = "zoho-sandbox-token"
CONTACTS, LEADS, ACCOUNTS = 2600, 150, 210


class RecordingTransport(httpx.HTTPTransport):
    """Keeps the query of every request, to see how the client paged."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[httpx.QueryParams] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(request.url.params)
        return super().handle_request(request)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoSandbox]:
    records = {"Contacts": CONTACTS, "Leads": LEADS, "Accounts": ACCOUNTS}
    with ZohoSandbox(tmp_path_factory.mktemp("zoho"), records=records, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def api(sandbox: ZohoSandbox) -> Iterator[ZohoApi]:
    sandbox.clear_faults()
    with ZohoApi(sandbox.url, TOKEN, max_attempts=3) as client:
        yield client


@pytest.mark.parametrize(
    ("module", "total"), [("Contacts", CONTACTS), ("Leads", LEADS), ("Accounts", ACCOUNTS)]
)
def test_lists_every_record_newest_first(sandbox: ZohoSandbox, module: str, total: int) -> None:
    transport = RecordingTransport()
    with ZohoApi(sandbox.url, TOKEN, transport=transport) as api:
        records = list(api.iter_records(module))
        assert api.count(module) == total
    assert len(records) == total
    assert len({r["id"] for r in records}) == total
    times = [datetime.fromisoformat(r["Modified_Time"]) for r in records]
    assert times == sorted(times, reverse=True)
    pages = [q for q in transport.queries if "per_page" in q]
    assert [q.get("page") for q in pages[:10]] == [str(p) for p in range(1, 11)][: len(pages)]
    past_2000 = pages[10:]
    assert len(past_2000) == max(0, -(-total // 200) - 10)
    assert all("page_token" in q and "page" not in q for q in past_2000)
    assert set(records[0]) == {"id", *DEFAULT_FIELDS[module]}  # the module's own fields


def test_accounts_are_read_by_id_with_their_own_fields(api: ZohoApi) -> None:
    ids = [r["id"] for r in api.iter_records("Accounts")][:3]
    found = api.get_records("Accounts", [*ids, "3652397000999999999"])
    assert [r["id"] for r in found] == ids
    assert all(isinstance(r["Account_Name"], str) and "Last_Name" not in r for r in found)
    with pytest.raises(ZohoApiError) as refused:  # a person's field is not an Account's
        api.get_records("Accounts", ids, fields=DEFAULT_FIELDS["Contacts"])
    assert refused.value.code == "INVALID_DATA"


def test_empty_result_is_an_empty_page(sandbox: ZohoSandbox, api: ZohoApi) -> None:
    before = sandbox.stats()["byStatus"].get("204", 0)
    records, info = api.list_records("Leads", modified_since=datetime.now(UTC))
    assert records == []
    assert info["more_records"] is False
    assert sandbox.stats()["byStatus"].get("204", 0) == before + 1


def test_modified_since_returns_only_newer_records(sandbox: ZohoSandbox, api: ZohoApi) -> None:
    newest = next(api.iter_records("Leads"))
    since = datetime.fromisoformat(newest["Modified_Time"])
    target = next(api.iter_records("Leads", sort_order="asc"))["id"]
    sandbox.touch("Leads", [target])
    records, _ = api.list_records("Leads", modified_since=since)
    assert [r["id"] for r in records] == [target]


def test_get_records_reads_in_batches_of_100(api: ZohoApi) -> None:
    ids = [r["id"] for r in api.iter_records("Contacts", per_page=150)][:230]
    found = api.get_records("Contacts", [*ids, "3652397000999999999"])
    assert [r["id"] for r in found] == ids
    assert all("Account_Name" in r for r in found)


def test_call_and_note_are_written(sandbox: ZohoSandbox, api: ZohoApi) -> None:
    contact = next(api.iter_records("Contacts"))["id"]
    lead = next(api.iter_records("Leads"))["id"]
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    call_id = api.create_call("Contacts", contact, "Outbound call via Quo", "Outbound", start, 205)
    lead_call = api.create_call("Leads", lead, "Inbound call via Quo", "Inbound", start, 61, "Hi")
    note_id = api.create_note("Leads", lead, "Message from +1 212 555 0100", title="SMS")
    account = next(api.iter_records("Accounts"))["id"]
    account_call = api.create_call("Accounts", account, "Inbound call", "Inbound", start, 30)

    created = sandbox.created()
    calls = {c["id"]: c for c in created["calls"]}
    assert calls[call_id]["Who_Id"] == {"id": contact}
    assert calls[call_id]["Call_Duration"] == "03:25"
    assert calls[call_id]["Call_Start_Time"] == "2026-03-01T10:00:00+00:00"
    assert (calls[lead_call]["$se_module"], calls[lead_call]["What_Id"]) == ("Leads", {"id": lead})
    assert "Who_Id" not in calls[lead_call]
    assert (calls[account_call]["$se_module"], calls[account_call]["What_Id"]) == (
        "Accounts",
        {"id": account},
    )
    note = {n["id"]: n for n in created["notes"]}[note_id]
    assert note["Parent_Id"] == {"module": {"api_name": "Leads"}, "id": lead}
    assert note["Note_Title"] == "SMS"


def test_rejected_call_raises_with_zoho_code(api: ZohoApi) -> None:
    contact = next(api.iter_records("Contacts"))["id"]
    now = datetime.now(UTC)
    with pytest.raises(ZohoApiError) as zero:
        api.create_call("Contacts", contact, "Outbound call", "Outbound", now, 0)
    assert (zero.value.status, zero.value.code) == (400, "INVALID_DATA")
    assert "Call_Duration" in str(zero.value)
    with pytest.raises(ZohoApiError) as unknown:
        api.create_note("Contacts", "3652397000999999999", "text")
    assert unknown.value.code == "INVALID_DATA"


def test_call_is_updated_in_place(sandbox: ZohoSandbox, api: ZohoApi) -> None:
    contact = next(api.iter_records("Contacts"))["id"]
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    call_id = api.create_call("Contacts", contact, "Incoming call (missed)", "Missed", start, 0)
    assert api.update_call(call_id, "Incoming call", "Inbound", 75, "Summary: hi") == call_id
    calls = [c for c in sandbox.created()["calls"] if c["id"] == call_id]
    assert len(calls) == 1  # the same record, changed
    (call,) = calls
    assert (call["Subject"], call["Call_Type"], call["Call_Duration"]) == (
        "Incoming call",
        "Inbound",
        "01:15",
    )
    assert call["Description"] == "Summary: hi" and call["Who_Id"] == {"id": contact}
    assert call["Call_Start_Time"] == "2026-03-01T10:00:00+00:00"  # untouched
    api.update_call(call_id, "Outgoing call", "Outbound", 75)
    (call,) = [c for c in sandbox.created()["calls"] if c["id"] == call_id]
    assert call["Outbound_Call_Status"] == "Completed"


def test_rejected_update_raises_and_an_unknown_id_is_missing(api: ZohoApi) -> None:
    contact = next(api.iter_records("Contacts"))["id"]
    call_id = api.create_call("Contacts", contact, "Call", "Missed", datetime.now(UTC), 0)
    with pytest.raises(ZohoApiError) as zero:
        api.update_call(call_id, "Call", "Inbound", 0)
    assert zero.value.code == "INVALID_DATA" and "Call_Duration" in str(zero.value)
    assert not zero.value.record_missing
    with pytest.raises(ZohoApiError) as unknown:
        api.update_call("3652397000999999999", "Call", "Missed", 0)
    assert (unknown.value.status, unknown.value.code) == (400, "INVALID_DATA")
    assert unknown.value.record_missing and unknown.value.details == {"resource_path_index": 1}


def test_a_create_is_not_retried_once_its_outcome_is_unknown(
    sandbox: ZohoSandbox, api: ZohoApi
) -> None:
    """After a 5xx Zoho may have written the call: the caller is told rather than the call
    logged twice. An update rewrites the record, so it is retried."""
    contact = next(api.iter_records("Contacts"))["id"]
    before = sandbox.stats()["calls"]
    sandbox.inject_fault(500)
    with pytest.raises(ZohoOutcomeUnknown) as unknown:
        api.create_call("Contacts", contact, "Call", "Missed", datetime.now(UTC), 0)
    assert unknown.value.status == 500 and sandbox.stats()["pendingFaults"] == 0
    assert sandbox.stats()["calls"] == before
    call_id = api.create_call("Contacts", contact, "Call", "Missed", datetime.now(UTC), 0)
    sandbox.inject_fault(503)
    assert api.update_call(call_id, "Call", "Inbound", 5) == call_id


def test_watch_renew_and_unwatch(sandbox: ZohoSandbox, api: ZohoApi) -> None:
    expiry = (datetime.now(UTC) + timedelta(days=6)).replace(microsecond=0)
    events = ["Contacts.all", "Leads.all"]
    granted = api.watch("1000000068001", events, "https://example.test/zoho?t=1", "tok", expiry)
    assert [e["resource_name"] for e in granted] == ["Contacts", "Leads"]
    assert datetime.fromisoformat(granted[0]["channel_expiry"]) == expiry

    later = expiry + timedelta(hours=12)
    renewed = api.renew_watch("1000000068001", events, later)
    assert datetime.fromisoformat(renewed[0]["channel_expiry"]) == later
    channel = {c["channel_id"]: c for c in sandbox.created()["channels"]}["1000000068001"]
    assert channel["token"] == "tok"

    api.unwatch(["1000000068001"])
    assert "1000000068001" not in {c["channel_id"] for c in sandbox.created()["channels"]}
    with pytest.raises(ZohoApiError) as gone:
        api.renew_watch("1000000068001", events, later)
    assert gone.value.code == "NOT_SUBSCRIBED"


def test_expiry_beyond_a_week_silently_becomes_one_hour(api: ZohoApi) -> None:
    now = datetime.now(UTC)
    granted = api.watch("1000000068002", ["Leads.edit"], "https://x.test", "t", now + timedelta(8))
    expiry = datetime.fromisoformat(granted[0]["channel_expiry"])
    assert timedelta(minutes=59) < expiry - now < timedelta(minutes=61)
    api.unwatch(["1000000068002"])


def test_429_without_retry_after_is_retried_through_the_throttle(
    sandbox: ZohoSandbox, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    governor = RecordingGovernor(store, TOKEN, 50, api="zoho")
    before = sandbox.stats()["rateLimited"]
    sandbox.inject_fault(429, count=2)
    with ZohoApi(sandbox.url, TOKEN, throttle=governor, max_attempts=3) as api:
        assert api.count("Leads") == LEADS
    assert sandbox.stats()["rateLimited"] == before + 2
    assert [kind for kind, _, _ in governor.events] == ["send", "429", "send", "429", "send"]
    retry_afters = [after for kind, _, after in governor.events if kind == "429"]
    assert retry_afters == [None, None]  # Zoho sends no Retry-After
    # Without Retry-After, the refused request waits the default before it is sent again
    # (lower bounds only; 5 ms for time.sleep on the monotonic clock vs the wall clock)...
    for (kind, seen, _), (_, resent, _) in itertools.pairwise(governor.events):
        if kind == "429":
            assert resent >= seen + DEFAULT_RETRY_AFTER - 0.005
    # ...and the 429s neither paused nor slowed the shared schedule: the next slot is one
    # interval after the last request's.
    next_at, slowdown = store.update_governor(
        governor_key(TOKEN, "zoho"), lambda s: (s, (s.next_at, s.slowdown))
    )
    assert slowdown == 1.0 and next_at <= governor.events[-1][1] + 1 / 50 + 0.005

    sandbox.inject_fault(429, count=3)
    api = ZohoApi(sandbox.url, TOKEN, throttle=governor, max_attempts=3)
    with api, pytest.raises(ZohoUnavailable):
        api.count("Leads")


def test_errors_carry_the_code_and_never_the_token(sandbox: ZohoSandbox) -> None:
    secret = "1000.secretaccesstoken.abcdef"
    with ZohoApi(sandbox.url, secret) as api, pytest.raises(ZohoApiError) as denied:
        api.count("Contacts")
    assert (denied.value.status, denied.value.code) == (401, "INVALID_TOKEN")
    assert secret not in str(denied.value)
    assert all(secret not in str(arg) for arg in denied.value.args)

    with ZohoApi(sandbox.url, TOKEN) as api, pytest.raises(ZohoApiError) as bad_field:
        api.list_records("Contacts", fields=["Last_Name", "Company"])
    assert bad_field.value.code == "INVALID_DATA"
    assert "Company" in str(bad_field.value)
