"""The Zoho CRM connector: transform (Contacts, Leads, Accounts), paging past Zoho's 2,000-record
`page` cap, activities and watch channels against the Zoho simulator over real HTTP, and the
whole Dagster pipeline."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.external_ids import quo_external_id
from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    Excluded,
    Integration,
    InvalidRecord,
    LabeledValue,
    NoPhone,
    PersonPage,
    SmsActivity,
)
from quo_sync_dagster.core.phones import to_e164
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms import zoho
from quo_sync_dagster.crms.zoho import CallNotFound, ZohoConnector
from quo_sync_dagster.crms.zoho_api import ZohoOutcomeUnknown
from quo_sync_dagster.crms.zoho_webhooks import ZohoWebhooks
from quo_sync_dagster.sandbox.zoho_server import ZohoSandbox
from quo_sync_dagster.webhooks.handler import Delivery, WebhookContext
from quo_sync_dagster_tests.corpus import Expected, each_record, transform_as_expected
from quo_sync_dagster_tests.pipeline import add_integration, pipeline, sync_everything

TOKEN = "zoho-test-token"
CONTACTS, LEADS, ACCOUNTS = 2150, 45, 230  # Contacts cross the 2,000-record `page` limit

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
    "Mobile": "555-123-4567",  # a fictional 555 number: possible, never assigned
    "Home_Phone": None,
    "Title": None,
    "Company": "Initech",
    "Converted__s": False,
    "Created_Time": "2024-01-01T05:43:00+05:30",
    "Modified_Time": "2024-02-01T10:00:00+05:30",
}
# Shaped as the simulator serves an Account (v8 field API names), Fax and Website included.
ACCOUNT: dict[str, Any] = {
    "id": "3652397000300000022",
    "Account_Name": "Globex GmbH",
    "Phone": "+49 30 1234820",
    "Fax": "+49 30 1234821",
    "Website": "https://globex.example",
    "Parent_Account": {"name": "Acme", "id": "3652397000300000001"},
    "Created_Time": "2023-06-01T05:30:00+05:30",
    "Modified_Time": "2024-03-01T10:00:00+05:30",
}
NO_PHONES = {"Phone": None, "Mobile": None, "Home_Phone": None, "Other_Phone": None}
NO_NAMES = {"First_Name": None, "Last_Name": None, "Full_Name": None}


def connector(url: str = "https://www.zohoapis.com", **settings: Any) -> ZohoConnector:
    integration = Integration("it-z", "zoho", "env:QUO", settings={"base_url": url, **settings})
    return ZohoConnector(integration, TOKEN)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoSandbox]:
    records = {"Contacts": CONTACTS, "Leads": LEADS, "Accounts": ACCOUNTS}
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


def test_lead_with_a_lone_last_name_keeps_its_555_number() -> None:
    contact = connector().transform_person_to_quo(LEAD, "Leads")
    assert contact.external_id == "Leads-3652397000200000036"
    assert (contact.first_name, contact.last_name) == ("田中", None)  # not duplicated
    assert contact.company == "Initech"
    assert contact.role is None
    assert contact.emails == ()
    assert contact.phone_numbers == (
        LabeledValue("work", "+81312345678"),
        LabeledValue("mobile", "+15551234567"),
    )


JANE = ("Jane", "Doe")
WORK, MOBILE = ("work", "+15551230001"), ("mobile", "+15551230002")
PRIMARY = (("primary", "jane@acme.example"),)
# corpus id -> what its contact holds (corpus.Expected).
CORPUS_EXPECTED: dict[str, Expected] = {
    "zoho-contact-base": (*JANE, "Acme", PRIMARY, (WORK, MOBILE)),
    "zoho-contact-no-phone": NoPhone,
    "zoho-contact-only-mobile": (*JANE, "Acme", PRIMARY, (MOBILE,)),
    "zoho-contact-extension": (*JANE, "Acme", PRIMARY, (("work", "+12125550134"),)),
    "zoho-contact-intl": (
        *JANE,
        "Acme",
        PRIMARY,
        (("work", "+919876543210"), ("mobile", "+447700900123")),
    ),
    "zoho-contact-full-name-only": (*JANE, "Acme", PRIMARY, (WORK, MOBILE)),
    "zoho-contact-last-name-only": ("Doe", None, "Acme", PRIMARY, (WORK, MOBILE)),
    "zoho-contact-unicode": ("José", "Muñoz Ñúñez", "Acme", PRIMARY, (WORK, MOBILE)),
    "zoho-contact-multi": (  # Asst_Phone and Fax are not the person's lines
        *JANE,
        "Acme",
        (*PRIMARY, ("secondary", "jane.doe@home.example")),
        (WORK, MOBILE, ("home", "+15551230003"), ("other", "+15551230004")),
    ),
    "zoho-contact-555-bare": (*JANE, None, PRIMARY, (WORK,)),
    "zoho-contact-no-name-email": ("jane", None, None, PRIMARY, (WORK, MOBILE)),
    "zoho-lead-base": (*JANE, "Acme", PRIMARY, (WORK, MOBILE)),
    "zoho-lead-no-phone": NoPhone,
    "zoho-lead-company-only": ("Acme", None, "Acme", (), (WORK, MOBILE)),
    "zoho-lead-converted": Excluded,
    "zoho-lead-only-mobile-intl": (*JANE, "Acme", PRIMARY, (("mobile", "+61412345678"),)),
}


@each_record("zoho")
def test_the_corpus_field_by_field(entry: dict[str, Any]) -> None:
    kind, record = entry["objectType"], entry["record"]
    if contact := transform_as_expected(connector(), record, kind, CORPUS_EXPECTED[entry["id"]]):
        assert contact.external_id == f"{kind}-{record['id']}"


def test_the_valid_phone_policy_drops_555_numbers() -> None:
    crm = connector(phone_policy="valid")
    contact = crm.transform_person_to_quo(LEAD, "Leads")
    assert contact.phone_numbers == (LabeledValue("work", "+81312345678"),)
    with pytest.raises(NoPhone, match=re.escape("Mobile: invalid phone number '555-123-4567'")):
        crm.transform_person_to_quo({**LEAD, "Phone": None}, "Leads")


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({}, ("Zoë", "Müller")),
        ({"First_Name": None}, ("Müller", None)),  # Zoho's mandatory Last_Name alone
        ({"First_Name": None, "Last_Name": ""}, ("Zoë", "Müller")),  # Full_Name split
        ({**NO_NAMES, "Full_Name": "Jean-Luc de la Tour"}, ("Jean-Luc", "de la Tour")),
        (NO_NAMES, ("Société Générale Démo", None)),  # the Account_Name lookup's name
        ({**NO_NAMES, "Account_Name": None}, ("zoe.1", None)),  # Email's local part
        ({**NO_NAMES, "Account_Name": None, "Email": None}, ("Zoe.Work", None)),
        (
            {**NO_NAMES, "Account_Name": None, "Email": None, "Secondary_Email": None},
            ("+14155550132", None),  # the first phone number kept
        ),
    ],
)
def test_a_contact_is_named_by_the_first_of_the_fallbacks_it_has(
    change: dict[str, Any], names: tuple[str, str | None]
) -> None:
    contact = connector().transform_person_to_quo({**CONTACT, **change}, "Contacts")
    assert (contact.first_name, contact.last_name) == names
    assert contact.phone_numbers[0] == LabeledValue("work", "+14155550132")


def test_a_lead_without_names_is_named_by_its_company() -> None:
    contact = connector().transform_person_to_quo({**LEAD, **NO_NAMES}, "Leads")
    assert (contact.first_name, contact.last_name, contact.company) == ("Initech", None, "Initech")


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
        (NO_PHONES, "no phone number (none given)"),
        (
            {**NO_PHONES, "Phone": "555-01", "Home_Phone": "+1 055 123 0001"},
            "no phone number (Phone: invalid phone number '555-01': it is too short; "
            "Home_Phone: invalid phone number '+1 055 123 0001': ",
        ),
    ],
)
def test_a_person_without_a_phone_number_is_no_phone(change: dict[str, Any], message: str) -> None:
    with pytest.raises(NoPhone, match=re.escape(message)):
        connector().transform_person_to_quo({**CONTACT, **change}, "Contacts")


def test_people_without_a_phone_are_contacts_when_the_integration_syncs_them() -> None:
    crm = connector(sync_people_without_phone=True)
    contact = crm.transform_person_to_quo({**CONTACT, **NO_PHONES}, "Contacts")
    assert contact.phone_numbers == ()
    assert (contact.first_name, contact.last_name) == ("Zoë", "Müller")
    assert contact.emails[0] == LabeledValue("primary", "zoe.1@contacts.example")
    assert contact.company == "Société Générale Démo"
    empty = {**CONTACT, **NO_PHONES, **NO_NAMES, "Account_Name": None}
    with pytest.raises(InvalidRecord, match="no name") as nameless:  # nothing left to show
        crm.transform_person_to_quo({**empty, "Email": None, "Secondary_Email": None}, "Contacts")
    assert not isinstance(nameless.value, NoPhone)


def test_a_converted_lead_is_excluded_and_an_unconverted_one_synced() -> None:
    with pytest.raises(Excluded, match="converted lead"):
        connector().transform_person_to_quo({**LEAD, "Converted__s": True}, "Leads")
    assert connector().transform_person_to_quo(LEAD, "Leads").external_id.startswith("Leads-")


def test_an_account_is_a_company_contact() -> None:
    crm = connector("https://www.zohoapis.eu", org_domain_name="org771")
    contact = crm.transform_person_to_quo(ACCOUNT, "Accounts")
    assert contact.external_id == "Accounts-3652397000300000022"
    assert contact.source == "zoho"
    assert (contact.first_name, contact.last_name) == ("Globex GmbH", None)
    assert contact.company == "Globex GmbH"  # its own name, not the parent account's
    assert contact.role is None
    assert contact.emails == ()
    assert contact.phone_numbers == (LabeledValue("work", "+49301234820"),)  # no Fax
    assert contact.source_url == ("https://crm.zoho.eu/crm/org771/tab/Accounts/3652397000300000022")


def test_an_account_without_phone_or_name() -> None:
    only_fax = {**ACCOUNT, "Phone": None}
    with pytest.raises(NoPhone, match=re.escape("no phone number (none given)")):
        connector().transform_person_to_quo(only_fax, "Accounts")
    kept = connector(sync_people_without_phone=True).transform_person_to_quo(only_fax, "Accounts")
    assert (kept.first_name, kept.phone_numbers) == ("Globex GmbH", ())
    nameless = connector().transform_person_to_quo({**ACCOUNT, "Account_Name": " "}, "Accounts")
    assert (nameless.first_name, nameless.company) == ("+49301234820", None)


def test_accounts_are_synced_only_where_named() -> None:
    assert ZohoConnector.object_types_for({}) == ["Contacts", "Leads"]
    named = {"object_types": ["Contacts", "Accounts"]}
    assert ZohoConnector.object_types_for(named) == ["Contacts", "Accounts"]
    assert connector(**named).object_types == ["Contacts", "Accounts"]


def test_unknown_module_is_refused() -> None:
    with pytest.raises(ValueError, match="no person module 'Deals'"):
        connector().transform_person_to_quo(CONTACT, "Deals")


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


@pytest.mark.parametrize(
    ("module", "total"), [("Contacts", CONTACTS), ("Leads", LEADS), ("Accounts", ACCOUNTS)]
)
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


def test_fetch_by_ids_reads_accounts_and_leaves_other_modules_keys_out(
    sim: ZohoSandbox, crm: ZohoConnector
) -> None:
    """What a sweep asks every module: each key is looked up only in its own module."""
    (account,) = crm.fetch_person_page("Accounts", 0, 1).records
    (contact,) = crm.fetch_person_page("Contacts", 0, 1).records
    key = crm.record_key(account, "Accounts")
    assert key == f"Accounts-{account['id']}"
    reads = sim.stats()["byKind"]["get_by_ids"]
    found = crm.fetch_persons_by_ids("Accounts", [key, f"Contacts-{contact['id']}"])
    assert found == [account]
    assert crm.fetch_persons_by_ids("Accounts", [f"Contacts-{contact['id']}"]) == []
    assert crm.fetch_persons_by_ids("Contacts", [key]) == []
    assert sim.stats()["byKind"]["get_by_ids"] == reads + 1  # none sent for other modules


def test_generated_records_transform_or_are_skipped_without_a_phone(crm: ZohoConnector) -> None:
    for module in zoho.MODULES:
        ok, records = 0, crm.fetch_person_page(module, 0, 200).records
        for record in records:
            try:
                contact = crm.transform_person_to_quo(record, module)
            except NoPhone:
                continue
            ok += 1
            assert contact.external_id == f"{module}-{record['id']}"
            assert contact.first_name
            assert all(p.value.startswith("+") for p in contact.phone_numbers)
        assert ok > len(records) // 2


def test_an_account_as_served_over_http(sim: ZohoSandbox, crm: ZohoConnector) -> None:
    """Every account the simulator has, read by the connector and checked field by field
    against the simulator's own record."""
    served = {r["id"]: r for p in walk(crm, "Accounts", 100) for r in p.records}
    everyone = {r["id"]: r for r in sim.people("Accounts")}
    assert served.keys() == everyone.keys() and len(served) == ACCOUNTS
    for record_id, record in served.items():
        assert set(record) == {"id", *zoho.FIELDS["Accounts"]}  # only the fields asked for
        truth = everyone[record_id]
        try:
            contact = crm.transform_person_to_quo(record, "Accounts")
        except NoPhone:
            assert truth["Phone"] is None
            continue
        assert (contact.first_name, contact.company) == (truth["Account_Name"],) * 2
        assert contact.phone_numbers == (LabeledValue("work", to_e164(truth["Phone"])),)
        assert contact.emails == () and contact.last_name is None


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


def test_calls_and_sms_of_an_account_are_related_to_it(
    sim: ZohoSandbox, crm: ZohoConnector
) -> None:
    account = f"Accounts-{crm.fetch_person_page('Accounts', 0, 1).records[0]['id']}"
    call_id = crm.log_call_to_activity(quo_call("AC-ACC", account))
    note_id = crm.log_sms_to_activity(
        SmsActivity("MSG-ACC", "incoming", "Invoice?", account, "2026-03-01T10:00Z")
    )
    by_id = {a["id"]: a for a in sim.activities()}
    assert (by_id[call_id]["kind"], by_id[call_id]["person"]) == ("call", account)
    call = by_id[call_id]["record"]
    assert (call["$se_module"], call["What_Id"]["id"]) == ("Accounts", account.split("-")[1])
    assert "Who_Id" not in call
    assert (by_id[note_id]["kind"], by_id[note_id]["person"]) == ("note", account)


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


def test_the_channel_watches_accounts_once_the_integration_syncs_them(
    sim: ZohoSandbox, crm: ZohoConnector
) -> None:
    def events(sub: dict[str, Any]) -> list[str]:
        live = {c["channel_id"]: c for c in sim.created()["channels"]}
        return live[sub["channel_id"]]["events"]

    sub = crm.setup_webhooks("https://hooks.example/zoho")
    assert sub["events"] == events(sub) == ["Contacts.all", "Leads.all"]
    syncing = connector(sim.url, object_types=["Contacts", "Leads", "Accounts"])
    try:
        renewed = syncing.renew_webhooks(sub)  # the setting changed: the renewal follows it
        assert renewed["events"] == events(renewed) == ["Contacts.all", "Leads.all", "Accounts.all"]
        syncing.teardown_webhooks(renewed)
    finally:
        syncing.close()


@pytest.mark.parametrize(
    ("object_types", "expected"),
    [(None, []), (["Contacts", "Accounts"], ["Accounts-11", "Accounts-12"])],
)
def test_an_accounts_notification_is_a_change_only_where_accounts_are_synced(
    object_types: list[str] | None, expected: list[str]
) -> None:
    settings = {} if object_types is None else {"object_types": object_types}
    crm = connector(**settings)
    subscription = {"details": {"channel_id": "1000000068001"}}
    context = WebhookContext(crm.integration, crm, subscription, "tok")
    now = datetime.now(UTC)
    body = {
        "server_time": int(now.timestamp() * 1000),
        "module": "Accounts",
        "ids": ["11", "12"],
        "operation": "update",
        "channel_id": "1000000068001",
        "token": "tok",
    }
    delivery = Delivery(json.dumps(body).encode(), {}, {}, now)
    changes = ZohoWebhooks().changes(delivery, context)
    assert [crm.change_key(c.object_type, c.person_id) for c in changes] == expected


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
        assert own_sim.stats()["records"] == {"Contacts": 3, "Leads": 4, "Accounts": 0}
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
def test_pipeline_syncs_contacts_leads_and_accounts_then_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOHO_TEST_TOKEN", TOKEN)
    # 5, 3 and 2 pages: each ends with a one-page run.
    records = {"Contacts": 34, "Leads": 16, "Accounts": 10}
    config = {"integration_id": "it-1", "page_size": 7, "pages_per_run": 2}
    with (
        ZohoSandbox(tmp_path / "zoho", TOKEN, records=records) as sim,
        pipeline(tmp_path, monkeypatch) as p,
    ):
        settings = {"base_url": sim.url, "object_types": list(zoho.MODULES)}
        integration = add_integration(p, "zoho", settings, crm_credential_ref="env:ZOHO_TEST_TOKEN")
        processes = sync_everything(p, "zoho", config)
        by_type = {q.context["personObjectType"]: q for q in processes}
        assert sorted(by_type) == ["Accounts", "Contacts", "Leads"]
        assert all(q.state is ProcessState.COMPLETED for q in processes)
        # Every generated person has a name and a phone; the account without one is skipped.
        phoned = [a for a in sim.people("Accounts") if a["Phone"]]
        assert len(phoned) == 9
        assert {t: (q.counters["synced"], q.counters["skipped"]) for t, q in by_type.items()} == {
            "Contacts": (34, 0),
            "Leads": (16, 0),
            "Accounts": (9, 1),
        }
        assert sum(q.counters["failed"] for q in processes) == 0
        stats = p.quo.stats()
        assert stats["contactsBySource"]["zoho"] == 34 + 16 + 9
        assert stats["duplicateExternalIds"] == 0
        keys = [quo_external_id(integration, f"Accounts-{a['id']}") for a in phoned]
        assert len(p.store.get_contact_links(integration.id, keys)) == len(phoned)

        before = stats["byKind"]
        again = sync_everything(p, "zoho", config)
        assert all(q.state is ProcessState.COMPLETED for q in again)
        after = p.quo.stats()["byKind"]
        for kind in ("create", "patch"):
            assert after.get(kind, 0) == before.get(kind, 0), kind
        assert sim.stats()["byStatus"].get("429", 0) == 0  # the governor kept under the limit
