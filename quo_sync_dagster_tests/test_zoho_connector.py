"""The Zoho CRM connector: transform, paging past Zoho's 2,000-record `page` cap, activities and
watch channels against the Zoho simulator over real HTTP, and the whole Dagster pipeline."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    Integration,
    InvalidRecord,
    LabeledValue,
    PersonPage,
    SmsActivity,
)
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms import zoho
from quo_sync_dagster.crms.zoho import CallNotFound, ZohoConnector
from quo_sync_dagster.crms.zoho_api import ZohoOutcomeUnknown
from quo_sync_dagster.sandbox.zoho_server import ZohoSandbox
from quo_sync_dagster_tests.pipeline import add_integration, pipeline, sync_everything

TOKEN = "zoho-test-token"
CONTACTS, LEADS = 2150, 45  # Contacts cross the 2,000-record `page` limit

CONTACT: dict[str, Any] = {
    "id": "3652397000100000008",
    "First_Name": "Zoë",
    "Last_Name": "Müller",
    "Full_Name": "Zoë Müller",
    "Email": "zoe.1@contacts.example",
    "Secondary_Email": "Zoe.Work@home.example",
    "Phone": "(415) 555-0132",
    "Mobile": "+44 20 7946 0132",
    "Home_Phone": "+1 (646) 555-0132 ext. 12",
    "Other_Phone": "212.555.0199",
    "Title": "Head of Sales",
    "Account_Name": {"name": "Société Générale Démo", "id": "3652397000000000003"},
    "Customer_Tier__c": "Gold",  # a custom field with no Quo counterpart configured
    "Owner": {"name": "Pat Sandbox", "id": "3652397000000080001"},
    "Created_Time": "2024-01-01T05:30:00+05:30",
    "Modified_Time": "2024-06-01T10:00:00+05:30",
}
LEAD: dict[str, Any] = {
    "id": "3652397000200000036",
    "First_Name": None,
    "Last_Name": "田中",
    "Full_Name": "田中",
    "Email": None,
    "Secondary_Email": None,
    "Phone": "+81 3-1234-5678",
    "Mobile": "555-123-4567",  # no such US area code
    "Home_Phone": None,
    "Title": None,
    "Company": "Initech",
    "Created_Time": "2024-01-01T05:43:00+05:30",
    "Modified_Time": "2024-02-01T10:00:00+05:30",
}


def connector(url: str = "https://www.zohoapis.com", **settings: Any) -> ZohoConnector:
    integration = Integration("it-z", "zoho", "env:QUO", settings={"base_url": url, **settings})
    return ZohoConnector(integration, TOKEN)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoSandbox]:
    records = {"Contacts": CONTACTS, "Leads": LEADS}
    with ZohoSandbox(
        tmp_path_factory.mktemp("zoho"), TOKEN, records=records, rate_limit=None
    ) as sb:
        yield sb


@pytest.fixture
def crm(sim: ZohoSandbox) -> Iterator[ZohoConnector]:
    c = connector(sim.url)
    yield c
    c.close()


# ---- transform ----------------------------------------------------------------------------
def test_contact_maps_every_field() -> None:
    contact = connector().transform_person_to_quo(CONTACT, "Contacts")
    assert contact.external_id == "Contacts-3652397000100000008"
    assert contact.source == "zoho"
    assert (contact.first_name, contact.last_name) == ("Zoë", "Müller")
    assert contact.company == "Société Générale Démo"
    assert contact.role == "Head of Sales"
    assert contact.emails == (
        LabeledValue("primary", "zoe.1@contacts.example"),
        LabeledValue("secondary", "Zoe.Work@home.example"),
    )
    assert contact.phone_numbers == (
        LabeledValue("work", "+14155550132"),
        LabeledValue("mobile", "+442079460132"),
        LabeledValue("home", "+16465550132"),
        LabeledValue("other", "+12125550199"),
    )
    assert contact.custom_fields == ()  # Customer_Tier__c has no Quo custom field key
    assert contact.source_url is None  # no org domain_name, no record link


def test_lead_without_first_name_drops_invalid_phone() -> None:
    contact = connector().transform_person_to_quo(LEAD, "Leads")
    assert contact.external_id == "Leads-3652397000200000036"
    assert (contact.first_name, contact.last_name) == ("田中", None)  # not duplicated
    assert contact.company == "Initech"
    assert contact.role is None
    assert contact.emails == ()
    assert contact.phone_numbers == (LabeledValue("work", "+81312345678"),)


def test_duplicates_and_missing_values_collapse() -> None:
    person = {
        **CONTACT,
        "Mobile": "415-555-0132",  # the same number as Phone
        "Home_Phone": float("nan"),  # what a page frame holds for a value no record had
        "Other_Phone": "  ",
        "Secondary_Email": "ZOE.1@contacts.example",
        "Account_Name": None,
        "Title": "",
    }
    contact = connector().transform_person_to_quo(person, "Contacts")
    assert contact.phone_numbers == (LabeledValue("work", "+14155550132"),)
    assert contact.emails == (LabeledValue("primary", "zoe.1@contacts.example"),)
    assert (contact.company, contact.role) == (None, None)


@pytest.mark.parametrize(
    ("url", "web"),
    [
        ("https://www.zohoapis.eu", "https://crm.zoho.eu"),
        ("https://www.zohoapis.ca/", "https://crm.zohocloud.ca"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
    ],
)
def test_source_url_links_the_crm_record(url: str, web: str) -> None:
    crm = connector(url, org_domain_name="org771")
    contact = crm.transform_person_to_quo(LEAD, "Leads")
    assert contact.source_url == f"{web}/crm/org771/tab/Leads/3652397000200000036"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Phone": None, "Mobile": None, "Home_Phone": None}, "no valid phone number (none"),
        (
            {"Phone": "555-01", "Mobile": "+1 555 123 0001", "Home_Phone": None},
            "only invalid numbers: Phone '555-01', Mobile '+1 555 123 0001'",
        ),
        ({"First_Name": None, "Last_Name": " "}, "no name"),
    ],
)
def test_invalid_records(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRecord, match=re.escape(message)):
        connector().transform_person_to_quo({**LEAD, **change}, "Leads")


def test_unknown_module_is_refused() -> None:
    with pytest.raises(ValueError, match="no person module 'Accounts'"):
        connector().transform_person_to_quo(CONTACT, "Accounts")


# ---- paging -------------------------------------------------------------------------------
def walk(crm: ZohoConnector, module: str, limit: int, **kwargs: Any) -> list[PersonPage]:
    """As the planner does: page 0 without a cursor, then each page's next_cursor."""
    pages = [crm.fetch_person_page(module, 0, limit, **kwargs)]
    while pages[-1].has_more:
        cursor = pages[-1].next_cursor
        pages.append(crm.fetch_person_page(module, len(pages), limit, cursor=cursor, **kwargs))
    return pages


def modified(record: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(record["Modified_Time"])


@pytest.mark.parametrize(("module", "total"), [("Contacts", CONTACTS), ("Leads", LEADS)])
def test_walk_returns_everyone_once_newest_first(
    crm: ZohoConnector, module: str, total: int
) -> None:
    pages = walk(crm, module, 150)
    rows = [r for p in pages for r in p.records]
    assert len(rows) == len({r["id"] for r in rows}) == total
    assert [modified(r) for r in rows] == sorted((modified(r) for r in rows), reverse=True)
    assert [p.has_more for p in pages] == [True] * (len(pages) - 1) + [False]
    assert all(p.total is None for p in pages) and pages[-1].next_cursor is None
    assert all(len(p.records) == 150 for p in pages[:-1])
    assert all(set(r) >= set(zoho.FIELDS[module]) for r in rows)


def test_cursors_switch_to_page_tokens_past_2000_and_refetch(crm: ZohoConnector) -> None:
    pages = walk(crm, "Contacts", 150)
    cursors = [None] + [p.next_cursor for p in pages[:-1]]
    # 13 pages of 150 stay within 2,000 records; Zoho refuses page 14 without a token.
    assert cursors[1:13] == [f"page:{n}" for n in range(2, 14)]
    assert all(c is not None and c.startswith("token:") for c in cursors[13:])
    for k in (0, 5, 13, len(pages) - 1):  # later runs fetch page k with the cursor noted for k
        again = crm.fetch_person_page("Contacts", k, 150, cursor=cursors[k])
        assert [r["id"] for r in again.records] == [r["id"] for r in pages[k].records]


def test_oldest_first_and_page_size_capped(crm: ZohoConnector) -> None:
    page = crm.fetch_person_page("Leads", 0, 500, sort_desc=False)
    assert len(page.records) == LEADS
    assert [modified(r) for r in page.records] == sorted(modified(r) for r in page.records)
    first = crm.fetch_person_page("Contacts", 0, 500)
    assert len(first.records) == 200 and first.next_cursor == "page:2"


def test_modified_since(sim: ZohoSandbox, crm: ZohoConnector) -> None:
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=2)
    empty = crm.fetch_person_page("Leads", 0, 10, modified_since=since)  # Zoho's 204
    assert empty == PersonPage([], None, has_more=False, next_cursor=None)
    leads = crm.fetch_person_page("Leads", 0, 50).records
    touched = [leads[-1]["id"], leads[-2]["id"], leads[-3]["id"]]  # the three oldest
    assert sim.touch("Leads", touched) == 3
    pages = walk(crm, "Leads", 2, modified_since=since)
    assert sorted(r["id"] for p in pages for r in p.records) == sorted(touched)
    assert [p.has_more for p in pages] == [True, False]


def test_fetch_persons_by_ids(crm: ZohoConnector) -> None:
    rows = crm.fetch_person_page("Contacts", 0, 3).records
    ids = [f"Contacts-{rows[0]['id']}", rows[1]["id"], rows[2]["id"]]
    found = crm.fetch_persons_by_ids("Contacts", ids)
    assert sorted(r["id"] for r in found) == sorted(r["id"] for r in rows)
    assert found[0]["Other_Phone"] is None and "Account_Name" in found[0]


def test_generated_people_transform_or_name_their_problem(crm: ZohoConnector) -> None:
    for module in ("Contacts", "Leads"):
        ok, records = 0, crm.fetch_person_page(module, 0, 200).records
        for record in records:
            try:
                contact = crm.transform_person_to_quo(record, module)
            except InvalidRecord as exc:
                assert "phone" in str(exc)  # every generated person has a Last_Name
                continue
            ok += 1
            assert contact.external_id == f"{module}-{record['id']}"
            assert all(p.value.startswith("+") for p in contact.phone_numbers)
        assert ok > len(records) // 2


# ---- activities and watch channels --------------------------------------------------------
def test_sms_and_calls_land_on_the_right_person(sim: ZohoSandbox, crm: ZohoConnector) -> None:
    contact_id = crm.fetch_person_page("Contacts", 0, 1).records[0]["id"]
    lead_id = crm.fetch_person_page("Leads", 0, 1).records[0]["id"]
    note_id = crm.log_sms_to_activity(
        SmsActivity(
            "MSG1",
            "incoming",
            "Running late 🚗",
            f"Leads-{lead_id}",
            "2026-03-01T10:00Z",
            external_number="+12125550100",
        )
    )
    outbound = crm.log_call_to_activity(
        CallActivity(
            "CALL1", "outgoing", 205, f"Contacts-{contact_id}", "2026-03-01T10:05:00Z", "ok"
        )
    )
    inbound = crm.log_call_to_activity(
        CallActivity("CALL2", "incoming", 61, f"Leads-{lead_id}", "2026-03-01T11:00:00-05:00")
    )
    created = sim.created()
    note = next(n for n in created["notes"] if n["id"] == note_id)
    assert note["Parent_Id"] == {"module": {"api_name": "Leads"}, "id": lead_id}
    assert note["Note_Title"] == "Incoming SMS (Quo)"
    assert note["Note_Content"] == (
        "Incoming SMS (Quo)\nRunning late 🚗\nOther party: +12125550100\nQuo message id: MSG1"
    )
    calls = {c["id"]: c for c in created["calls"]}
    out = calls[outbound]
    assert out["Who_Id"] == {"id": contact_id} and "What_Id" not in out
    assert (out["Subject"], out["Call_Type"], out["Call_Duration"]) == (
        "Outgoing call (Quo)",
        "Outbound",
        "03:25",
    )
    assert out["Description"] == (
        "Outgoing call (Quo)\nDuration: 3 min 25 s\nSummary: ok\nQuo call id: CALL1"
    )
    assert out["Outbound_Call_Status"] == "Completed"
    assert datetime.fromisoformat(out["Call_Start_Time"]) == datetime(2026, 3, 1, 10, 5, tzinfo=UTC)
    inc = calls[inbound]
    assert (inc["$se_module"], inc["What_Id"]) == ("Leads", {"id": lead_id})
    assert (inc["Call_Type"], inc["Call_Duration"], inc["Subject"]) == (
        "Inbound",
        "01:01",
        "Incoming call (Quo)",
    )
    assert "Who_Id" not in inc and "Outbound_Call_Status" not in inc


def quo_call(quo_id: str, person: str, **fields: Any) -> CallActivity:
    """An answered incoming call of 75 s, as call.completed tells it."""
    base: dict[str, Any] = {
        "quo_call_id": quo_id,
        "direction": "incoming",
        "duration_seconds": 75,
        "contact_external_id": person,
        "timestamp": "2026-03-01T12:00:00",
        "external_number": "+12125550100",
        "quo_number": "+14155550100",
        "quo_user": "Pat Quo",
        "deep_link": f"https://my.quo.com/calls/{quo_id}",
    }
    return CallActivity(**{**base, **fields})


def logged(sim: ZohoSandbox, quo_id: str) -> list[dict[str, Any]]:
    """The sandbox's activities whose body names Quo call `quo_id`."""
    return [a for a in sim.activities() if f"Quo call id: {quo_id}" in a["body"]]


def test_a_call_is_logged_then_enriched_in_place(sim: ZohoSandbox, crm: ZohoConnector) -> None:
    contact = f"Contacts-{crm.fetch_person_page('Contacts', 0, 1).records[0]['id']}"
    call_id = crm.log_call_to_activity(quo_call("AC1", contact))
    (created,) = logged(sim, "AC1")
    assert (created["id"], created["kind"], created["person"]) == (call_id, "call", contact)
    assert created["record"]["Call_Type"] == "Inbound" and "Summary" not in created["body"]
    assert "Quo user: Pat Quo" in created["body"] and "Other party: +12125550100" in created["body"]

    enriched = quo_call(
        "AC1",
        contact,
        summary="Wants a quote",
        next_steps=("Send the quote",),
        recording_urls=("https://files.quo.com/rec/AC1.mp3",),
        transcript="Pat: Hello\nJane: Hi",
    )
    assert crm.update_call_activity(call_id, enriched) == call_id
    (updated,) = logged(sim, "AC1")  # still one call, the same record
    assert updated["id"] == call_id and updated["person"] == contact
    assert updated["body"] == "\n".join(
        [
            "Incoming call (Quo)",
            "Duration: 1 min 15 s",
            "Quo number: +14155550100",
            "Other party: +12125550100",
            "Quo user: Pat Quo",
            "Summary: Wants a quote",
            "Next step: Send the quote",
            "Recording: https://files.quo.com/rec/AC1.mp3",
            "Transcript:\nPat: Hello\nJane: Hi",
            "Open in Quo: https://my.quo.com/calls/AC1",
            "Quo call id: AC1",
        ]
    )
    record = updated["record"]
    assert (record["Call_Type"], record["Call_Duration"]) == ("Inbound", "01:15")
    assert record["Call_Start_Time"] == created["record"]["Call_Start_Time"]


@pytest.mark.parametrize(
    ("outcome", "direction", "subject"),
    [
        (CallOutcome.MISSED, "incoming", "Incoming call (missed) (Quo)"),
        (CallOutcome.VOICEMAIL, "incoming", "Incoming call (missed, voicemail) (Quo)"),
        (CallOutcome.MISSED, "outgoing", "Outgoing call (missed) (Quo)"),
    ],
)
def test_missed_and_voicemail_calls_are_zoho_missed_calls(
    sim: ZohoSandbox, crm: ZohoConnector, outcome: CallOutcome, direction: str, subject: str
) -> None:
    """Missed by the outcome, even with the ringing time as duration; a lead's call too."""
    lead = f"Leads-{crm.fetch_person_page('Leads', 0, 1).records[0]['id']}"
    quo_id = f"AC-{outcome}-{direction}"
    extra = {"voicemail_url": "https://files.quo.com/vm/1.mp3"} if outcome == "voicemail" else {}
    missed = quo_call(quo_id, lead, direction=direction, outcome=outcome, **extra)
    call_id = crm.log_call_to_activity(missed)
    (created,) = logged(sim, quo_id)
    record = created["record"]
    assert created["id"] == call_id and created["person"] == lead
    assert (record["Call_Type"], record["Subject"]) == ("Missed", subject)
    assert record["Call_Duration"] == "01:15" and "Outbound_Call_Status" not in record
    assert created["body"].startswith(subject + "\n") and "Duration" not in created["body"]
    if extra:
        assert "Voicemail: https://files.quo.com/vm/1.mp3" in created["body"]


def test_a_ringing_call_becomes_inbound_once_answered(sim: ZohoSandbox, crm: ZohoConnector) -> None:
    contact = f"Contacts-{crm.fetch_person_page('Contacts', 0, 1).records[0]['id']}"
    ringing = quo_call("AC-R", contact, outcome=CallOutcome.RINGING, duration_seconds=0)
    call_id = crm.log_call_to_activity(ringing)
    (created,) = logged(sim, "AC-R")
    assert (created["record"]["Call_Type"], created["record"]["Call_Duration"]) == (
        "Missed",
        "00:00",
    )
    # Answered, but Quo reported no duration yet: Zoho refuses a zero one for Inbound.
    crm.update_call_activity(call_id, quo_call("AC-R", contact, duration_seconds=0))
    (answered,) = logged(sim, "AC-R")
    assert (answered["record"]["Call_Type"], answered["record"]["Call_Duration"]) == (
        "Inbound",
        "00:01",
    )


def test_updating_an_unknown_call_is_a_clear_error(crm: ZohoConnector) -> None:
    contact = f"Contacts-{crm.fetch_person_page('Contacts', 0, 1).records[0]['id']}"
    with pytest.raises(
        CallNotFound, match=r"no Calls record 3652397000999999999 .* Quo call AC9"
    ) as gone:
        crm.update_call_activity("3652397000999999999", quo_call("AC9", contact))
    assert isinstance(gone.value, LookupError) and gone.value.code == "INVALID_DATA"
    with pytest.raises(ValueError, match="not a Zoho Calls record id"):
        crm.update_call_activity("Calls-1", quo_call("AC9", contact))


def test_activity_for_a_foreign_external_id_is_refused(crm: ZohoConnector) -> None:
    with pytest.raises(ValueError, match="not a zoho external id"):
        crm.log_sms_to_activity(SmsActivity("M", "outgoing", "hi", "st-0000001", "2026-03-01"))


def test_watch_setup_renew_teardown(
    sim: ZohoSandbox, crm: ZohoConnector, monkeypatch: pytest.MonkeyPatch
) -> None:
    def channel(sub: dict[str, Any]) -> dict[str, Any] | None:
        live = sim.created()["channels"]
        return next((c for c in live if c["channel_id"] == sub["channel_id"]), None)

    monkeypatch.setattr(zoho, "CHANNEL_TTL", timedelta(hours=1))
    sub = crm.setup_webhooks("https://hooks.example/zoho?tenant=it-z")
    stored = channel(sub)
    assert stored is not None
    assert stored["notify_url"] == "https://hooks.example/zoho?tenant=it-z"
    assert stored["token"] == sub["token"] and 0 < len(sub["token"]) <= 50
    assert stored["events"] == ["Contacts.all", "Leads.all"]
    assert stored["channel_expiry"] == sub["expires_at"]
    first_expiry = datetime.fromisoformat(sub["expires_at"])
    assert first_expiry - datetime.now(UTC) < timedelta(hours=1, minutes=1)

    monkeypatch.undo()
    renewed = crm.renew_webhooks(sub)
    expiry = datetime.fromisoformat(renewed["expires_at"])
    assert expiry - first_expiry > timedelta(days=5)  # granted, not fallen back to one hour
    assert channel(renewed)["channel_expiry"] == renewed["expires_at"]  # type: ignore[index]
    assert channel(renewed)["token"] == sub["token"]  # type: ignore[index]

    crm.teardown_webhooks(renewed)
    assert channel(renewed) is None
    revived = crm.renew_webhooks(renewed)  # a lapsed channel is subscribed again
    assert channel(revived) is not None
    crm.teardown_webhooks(revived)
    assert channel(revived) is None


# ---- a Lead for an unknown caller ----------------------------------------------------------
@pytest.fixture
def own_sim(tmp_path: Path) -> Iterator[ZohoSandbox]:
    """A sandbox of its own: these tests add people, which the shared one's tests count."""
    with ZohoSandbox(tmp_path, TOKEN, records={"Contacts": 3, "Leads": 2}, rate_limit=None) as sb:
        yield sb


def test_a_lead_is_created_for_an_unknown_caller(own_sim: ZohoSandbox) -> None:
    crm = connector(own_sim.url)
    try:
        leads = [r["id"] for r in own_sim.people("Leads")]
        key = crm.create_person_for_caller("+14155550199")
        module, _, record_id = key.partition("-")
        assert module == "Leads" and record_id.isdigit() and record_id not in leads
        (lead,) = crm.fetch_persons_by_ids("Leads", [key])  # the key reads back as it is
        assert crm.record_key(lead, "Leads") == key
        assert (lead["Last_Name"], lead["First_Name"], lead["Phone"]) == (
            "Unknown caller +14155550199",
            None,
            "+14155550199",
        )
        assert lead["Mobile"] is None and lead["Email"] is None and lead["Company"] is None
        contact = crm.transform_person_to_quo(lead, "Leads")
        assert contact.external_id == key
        assert contact.phone_numbers == (LabeledValue("work", "+14155550199"),)
        assert (contact.first_name, contact.last_name) == ("Unknown caller +14155550199", None)
        assert contact.emails == () and contact.company is None
        assert crm.fetch_persons_by_ids("Contacts", [record_id]) == []  # a Lead, not a Contact
        assert own_sim.stats()["byKind"]["create_person"] == 1
        assert crm.create_person_for_caller("+442079460001") != key  # another caller, another
        assert own_sim.stats()["records"] == {"Contacts": 3, "Leads": 4}
    finally:
        crm.close()


def test_a_caller_create_is_not_sent_twice_once_its_outcome_is_unknown(
    own_sim: ZohoSandbox,
) -> None:
    crm = connector(own_sim.url)
    try:
        own_sim.inject_fault(503)
        with pytest.raises(ZohoOutcomeUnknown) as unknown:
            crm.create_person_for_caller("+14155550199")
        assert unknown.value.status == 503
        assert own_sim.stats()["byKind"]["create_person"] == 1  # one POST, no retry
        assert own_sim.stats()["records"]["Leads"] == 2
        own_sim.inject_fault(429)  # refused before anything was written: retried
        assert crm.create_person_for_caller("+14155550199").startswith("Leads-")
        assert own_sim.stats()["byKind"]["create_person"] == 3
        assert own_sim.stats()["records"]["Leads"] == 3
    finally:
        crm.close()


@pytest.mark.parametrize("number", ["4155550199", "+0123", "tel:+14155550199", ""])
def test_a_caller_number_must_be_e164(number: str) -> None:
    with pytest.raises(ValueError, match=r"not an E\.164 number"):
        connector().create_person_for_caller(number)


# ---- the whole pipeline -------------------------------------------------------------------
def test_pipeline_syncs_contacts_and_leads_then_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOHO_TEST_TOKEN", TOKEN)
    records = {"Contacts": 34, "Leads": 16}  # 5 and 3 pages: each ends with a one-page run
    config = {"integration_id": "it-1", "page_size": 7, "pages_per_run": 2}
    with (
        ZohoSandbox(tmp_path / "zoho", TOKEN, records=records) as sim,
        pipeline(tmp_path, monkeypatch) as p,
    ):
        add_integration(p, "zoho", {"base_url": sim.url}, crm_credential_ref="env:ZOHO_TEST_TOKEN")
        processes = sync_everything(p, "zoho", config)
        assert sorted(q.context["personObjectType"] for q in processes) == ["Contacts", "Leads"]
        assert all(q.state is ProcessState.COMPLETED for q in processes)
        synced = sum(q.counters["synced"] for q in processes)
        failed = sum(q.counters["failed"] for q in processes)
        assert synced + failed == sum(records.values()) and synced > 0 and failed > 0
        stats = p.quo.stats()
        assert stats["contactsBySource"]["zoho"] == synced
        assert stats["duplicateExternalIds"] == 0

        before = stats["byKind"]
        again = sync_everything(p, "zoho", config)
        assert all(q.state is ProcessState.COMPLETED for q in again)
        after = p.quo.stats()["byKind"]
        for kind in ("create", "patch"):
            assert after.get(kind, 0) == before.get(kind, 0), kind
        assert sim.stats()["byStatus"].get("429", 0) == 0  # the governor kept under the limit
