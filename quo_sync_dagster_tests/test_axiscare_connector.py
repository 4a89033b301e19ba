"""The AxisCare connector against the AxisCare simulator over real HTTP, and through the whole
Dagster pipeline into the Quo sandbox."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    Integration,
    InvalidRecord,
    LabeledValue,
    NoPhone,
    SmsActivity,
)
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.crms.axiscare import AxisCareConnector, CallLogNotFound
from quo_sync_dagster.crms.axiscare_api import AxisCareApiError
from quo_sync_dagster.governed_http import OutcomeUnknown
from quo_sync_dagster.sandbox.axiscare_server import KINDS, AxisCareSandbox, generate_people
from quo_sync_dagster_tests.corpus import Expected, each_record, transform_as_expected
from quo_sync_dagster_tests.pipeline import add_integration, pipeline, sync_everything

TOKEN = "axiscare-test-token"
RECORDS = 200


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AxisCareSandbox]:
    data = tmp_path_factory.mktemp("axiscare")
    with AxisCareSandbox(data, token=TOKEN, records=RECORDS, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def connector(sim: AxisCareSandbox) -> Iterator[AxisCareConnector]:
    integration = Integration("it-ax", "axiscare", "env:UNUSED", settings={"base_url": sim.url})
    c = AxisCareConnector(integration, TOKEN)
    yield c
    c.close()


def offline(**settings: Any) -> AxisCareConnector:
    settings = {"base_url": "https://7060.axiscare.com/", **settings}
    return AxisCareConnector(Integration("it-ax", "axiscare", "env:UNUSED", settings=settings))


NO_PHONES = {"homePhone": None, "mobilePhone": None, "otherPhone": None}
NO_NAMES = {"firstName": None, "lastName": None, "goesBy": None}


def client_record(**changes: Any) -> dict[str, Any]:
    """A client in the list's shape (the spec's example, with realistic free-text phones)."""
    record = {
        "id": 295,
        "firstName": "Zoë",
        "lastName": "Núñez",
        "goesBy": "Zozo",
        "gender": "Female",
        "dateOfBirth": "1941-05-12",
        "status": {"label": "Temporarily Unavailable", "active": True},
        "createdDate": "2024-02-01",
        "classes": [{"code": "PRV", "name": "Private Pay"}],
        "region": {"id": 1, "name": "Milwaukee"},
        "residentialAddress": {"streetAddress1": "1 Main St", "locality": "Milwaukee"},
        "personalEmail": "zoe.nunez@example.com",
        "billingEmail": "Billing.295@example.org",
        "homePhone": "(414) 555-0199",
        "mobilePhone": "414.555.0142 x12",
        "otherPhone": "+44 20 7946 0958",
        "telephonyPhone": "Unrestricted",
    }
    return {**record, **changes}


# ---- transform ------------------------------------------------------------------------------


def test_client_maps_every_field() -> None:
    contact = offline().transform_person_to_quo(client_record(), "clients")
    assert contact.external_id == "client-295"
    assert contact.source == "axiscare"
    assert (contact.first_name, contact.last_name) == ("Zozo", "Núñez")
    assert contact.company is None
    assert contact.role == "Client"
    assert contact.emails == (
        LabeledValue("personal", "zoe.nunez@example.com"),
        LabeledValue("billing", "Billing.295@example.org"),
    )
    assert contact.phone_numbers == (
        LabeledValue("home", "+14145550199"),
        LabeledValue("mobile", "+14145550142"),
        LabeledValue("other", "+442079460958"),
    )
    # status, classes, region...: AxisCare fields with no configured Quo custom field.
    assert contact.custom_fields == ()
    assert contact.source_url == "https://7060.axiscare.com?customers-profile.php&id=295"


def test_caregiver_without_goes_by_and_duplicates_collapsed() -> None:
    record = client_record(
        goesBy=None,
        mobilePhone="+1 414 555 0199",  # the home number again
        otherPhone=None,
        billingEmail="ZOE.NUNEZ@example.com",  # the personal email again
    )
    contact = offline().transform_person_to_quo(record, "caregivers")
    assert (contact.external_id, contact.role) == ("caregiver-295", "Caregiver")
    assert (contact.first_name, contact.last_name) == ("Zoë", "Núñez")
    assert contact.phone_numbers == (LabeledValue("home", "+14145550199"),)
    assert contact.emails == (LabeledValue("personal", "zoe.nunez@example.com"),)
    assert contact.source_url == "https://7060.axiscare.com?caregivers-profile.php&id=295"


def test_lead_with_missing_names_and_an_invalid_phone_beside_a_valid_one() -> None:
    lead = {
        "id": 42,
        "firstName": None,
        "lastName": "  O'Brien ",
        "status": {"label": "New", "active": True},
        "personalEmail": None,
        "homePhone": "n/a",
        "mobilePhone": "4145550177",
    }
    contact = offline().transform_person_to_quo(lead, "leads")
    assert (contact.external_id, contact.role) == ("lead-42", "Lead")
    assert (contact.first_name, contact.last_name) == ("O'Brien", None)  # last name moves up
    assert contact.phone_numbers == (LabeledValue("mobile", "+14145550177"),)
    assert contact.emails == ()
    assert contact.source_url is None  # no documented profile page for leads
    applicant = {**lead, "id": 7, "firstName": "Łukasz", "lastName": ""}
    contact = offline().transform_person_to_quo(applicant, "applicants")
    assert (contact.external_id, contact.first_name, contact.last_name) == (
        "applicant-7",
        "Łukasz",
        None,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"homePhone": None, "mobilePhone": "", "otherPhone": None},
            "client-295: no phone number (homePhone, mobilePhone, otherPhone are empty)",
        ),
        (
            {"homePhone": "123", "mobilePhone": "n/a", "otherPhone": None},
            "client-295: no phone number (homePhone: invalid phone number '123': ",
        ),
    ],
)
def test_a_person_without_a_phone_number_is_no_phone(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(NoPhone, match=re.escape(message)):
        offline().transform_person_to_quo(client_record(**changes), "clients")


def test_people_without_a_phone_are_contacts_when_the_integration_syncs_them() -> None:
    crm = offline(sync_people_without_phone=True)
    contact = crm.transform_person_to_quo(client_record(**NO_PHONES), "clients")
    assert contact.phone_numbers == ()
    assert (contact.external_id, contact.first_name, contact.last_name) == (
        "client-295",
        "Zozo",
        "Núñez",
    )
    assert contact.emails[0] == LabeledValue("personal", "zoe.nunez@example.com")
    nothing = client_record(**NO_PHONES, **NO_NAMES, personalEmail=None, billingEmail=None)
    with pytest.raises(InvalidRecord, match="no name") as nameless:  # nothing left to show
        crm.transform_person_to_quo(nothing, "clients")
    assert not isinstance(nameless.value, NoPhone)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({}, ("Zozo", "Núñez")),  # goesBy: the name people use on the phone
        ({"goesBy": " "}, ("Zoë", "Núñez")),
        ({"goesBy": None, "firstName": None}, ("Núñez", None)),
        ({**NO_NAMES, "goesBy": "Zozo"}, ("Zozo", None)),
        (NO_NAMES, ("zoe.nunez", None)),  # personalEmail's local part
        ({**NO_NAMES, "personalEmail": None}, ("Billing.295", None)),
        ({**NO_NAMES, "personalEmail": None, "billingEmail": None}, ("+14145550199", None)),
    ],
)
def test_a_person_is_named_by_the_first_of_the_fallbacks_it_has(
    changes: dict[str, Any], names: tuple[str, str | None]
) -> None:
    contact = offline().transform_person_to_quo(client_record(**changes), "clients")
    assert (contact.first_name, contact.last_name) == names
    assert contact.phone_numbers[0] == LabeledValue("home", "+14145550199")


def test_555_numbers_are_kept_unless_the_integration_wants_valid_ones() -> None:
    lead = client_record(homePhone="555-123-4567", mobilePhone="(555) 123-0002", otherPhone=None)
    contact = offline().transform_person_to_quo(lead, "leads")
    assert contact.phone_numbers == (
        LabeledValue("home", "+15551234567"),
        LabeledValue("mobile", "+15551230002"),
    )
    with pytest.raises(NoPhone, match=re.escape("homePhone: invalid phone number '555-123-4567'")):
        offline(phone_policy="valid").transform_person_to_quo(lead, "leads")


@pytest.mark.parametrize(
    "status", [{"label": "Deceased", "active": False}, {"label": "Discharged", "active": False}]
)
def test_an_inactive_person_is_still_synced(status: dict[str, Any]) -> None:
    """AxisCare marks no deletion: an inactive status is a state, and the family may call."""
    contact = offline().transform_person_to_quo(client_record(status=status), "clients")
    assert (contact.external_id, contact.first_name) == ("client-295", "Zozo")


LAKEMAN = ("Sure Shot", "Lakeman")  # goesBy before firstName "John"
HOME = ("home", "+12345678901")  # "+2-345-678-9012" (no country +2) is dropped beside it
CIA = (("personal", "jtavner@cia.gov"),)  # billingEmail repeats it
# corpus id -> what its contact holds (corpus.Expected).
CORPUS_EXPECTED: dict[str, Expected] = {  # people of a care agency have no company
    "axiscare-client-base": (*LAKEMAN, None, CIA, (HOME,)),
    "axiscare-client-ref": (
        "Ruthie",
        "Adams",
        None,
        (("personal", "ruth@example.com"), ("billing", "jtavner@cia.gov")),
        (("home", "+15551230001"), ("mobile", "+15551230002")),
    ),
    "axiscare-client-no-phone": NoPhone,
    "axiscare-client-only-mobile": (*LAKEMAN, None, CIA, (("mobile", "+14145550188"),)),
    "axiscare-client-extension": (*LAKEMAN, None, CIA, (("other", "+14145550100"),)),
    "axiscare-client-inactive": (*LAKEMAN, None, CIA, (HOME,)),  # Deceased: still someone's number
    "axiscare-client-goesby-only": ("Sure Shot", None, None, CIA, (HOME,)),
    "axiscare-client-unicode": ("María José", "Peña", None, CIA, (("mobile", "+525512345678"),)),
    "axiscare-client-status-string": (*LAKEMAN, None, CIA, (HOME, ("other", "+12345678902"))),
    "axiscare-client-same-phone-twice": (*LAKEMAN, None, CIA, (HOME,)),
    "axiscare-client-no-email": ("+12345678901", None, None, (), (HOME,)),
    "axiscare-caregiver-base": (*LAKEMAN, None, CIA, (HOME,)),
    "axiscare-caregiver-only-mobile": (*LAKEMAN, None, CIA, (("mobile", "+12625550147"),)),
    "axiscare-caregiver-no-phone": NoPhone,
    "axiscare-lead-base": ("John", "Lakeman", None, CIA, (HOME,)),
    "axiscare-lead-555": ("John", "Lakeman", None, CIA, (("home", "+15551234567"),)),
    "axiscare-applicant-base": (*LAKEMAN, None, CIA, (HOME,)),
    "axiscare-applicant-intl": (*LAKEMAN, None, CIA, (("mobile", "+38787667676"),)),
}


@each_record("axiscare")
def test_the_corpus_field_by_field(entry: dict[str, Any]) -> None:
    kind, record = entry["objectType"], entry["record"]
    expected = CORPUS_EXPECTED[entry["id"]]
    if contact := transform_as_expected(offline(), record, kind, expected):
        assert contact.external_id == f"{kind[:-1]}-{record['id']}"
        assert contact.role == kind[:-1].title()


def test_simulator_records_transform_or_fail_cleanly(connector: AxisCareConnector) -> None:
    good = 0
    for kind in KINDS:
        for record in connector.fetch_person_page(kind, 0, 50).records:
            try:
                contact = connector.transform_person_to_quo(record, kind)
            except NoPhone:  # the only refusal left: every generated person can be named
                continue
            good += 1
            assert contact.external_id == f"{kind[:-1]}-{record['id']}"
            assert contact.first_name
            assert all(p.value.startswith("+") for p in contact.phone_numbers)
            assert contact.source_url is None  # no profile pages on a simulator's URL
    assert good > 100


# ---- paging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_planner_walk_returns_everyone_once_in_id_order(
    connector: AxisCareConnector, kind: str
) -> None:
    expected = [p["id"] for p in generate_people(RECORDS)[kind]]
    pages, cursors, cursor = [], [], None
    while True:
        cursors.append(cursor)
        page = connector.fetch_person_page(kind, len(pages), 25, cursor=cursor)
        assert page.total is None
        pages.append(page)
        if not page.has_more:
            break
        assert page.next_cursor is not None
        cursor = page.next_cursor
    assert pages[-1].next_cursor is None
    assert [r["id"] for p in pages for r in p.records] == expected  # ascending: no sort in API
    # A sync run later fetches page k with the cursor the planner noted for it.
    k = len(pages) - 1
    again = connector.fetch_person_page(kind, k, 25, cursor=cursors[k])
    assert again.records == pages[k].records


def test_page_size_capped_and_modified_since_ignored(connector: AxisCareConnector) -> None:
    everyone = connector.fetch_person_page("clients", 0, 2000)  # the API refuses limit > 500
    assert len(everyone.records) == len(generate_people(RECORDS)["clients"])
    assert not everyone.has_more
    since = connector.fetch_person_page("clients", 0, 2000, modified_since=datetime.now(UTC))
    assert since.records == everyone.records  # no filter exists: polls are full scans


def test_fetch_persons_by_ids(connector: AxisCareConnector) -> None:
    ids = [p["id"] for p in generate_people(RECORDS)["leads"][:3]]
    found = connector.fetch_persons_by_ids("leads", [str(ids[0]), f"lead-{ids[2]}"])
    assert [p["id"] for p in found] == [ids[0], ids[2]]
    # A client's id is not a lead: the CRM has no such lead (what the sweep asks every kind).
    assert connector.fetch_persons_by_ids("leads", [f"client-{ids[0]}"]) == []


# ---- activities and webhooks ----------------------------------------------------------------


def _valid_person(connector: AxisCareConnector, kind: str) -> dict[str, Any]:
    for record in connector.fetch_person_page(kind, 0, 50).records:
        try:
            connector.transform_person_to_quo(record, kind)
            return record
        except InvalidRecord:
            continue
    raise AssertionError(f"no valid {kind}")


def test_call_and_sms_become_tagged_call_logs(
    connector: AxisCareConnector, sim: AxisCareSandbox
) -> None:
    client = _valid_person(connector, "clients")
    caregiver = _valid_person(connector, "caregivers")
    before = len(sim.stats()["callLogs"])
    call_id = connector.log_call_to_activity(
        CallActivity(
            "AC1",
            "incoming",
            205,
            f"client-{client['id']}",
            "2026-03-01T15:00:00Z",
            "Asked to move Tuesday",
        )
    )
    sms_id = connector.log_sms_to_activity(
        SmsActivity(
            "MS1",
            "outgoing",
            "See you at 9",
            f"caregiver-{caregiver['id']}",
            "2026-03-01T10:00:00-05:00",
            quo_number="+14155550100",
            quo_user="Dana Quo",
        )
    )
    call, sms = sim.stats()["callLogs"][before:]
    assert (call_id, sms_id) == (str(call["id"]), str(sms["id"]))
    assert call["subject"] == "Incoming call (Quo)"
    assert call["notes"].splitlines() == [
        "Duration: 3 min 25 s",
        "Summary: Asked to move Tuesday",
        "Quo call id: AC1",
    ]
    assert call["dateTime"] == "2026-03-01T15:00:00+00:00"
    assert call["followUp"] is False
    assert call["tags"][0]["type"] == "client"
    assert call["tags"][0]["url"].endswith(f"customers-profile.php&id={client['id']}")
    # An incoming call's caller is the person; without the number Quo saw, their first phone.
    assert call["callerName"] == f"{client['firstName'] or ''} {client['lastName']}".strip()
    client_phones = connector.transform_person_to_quo(client, "clients").phone_numbers
    assert call["callerPhone"] == client_phones[0].value
    assert sms["subject"] == "Outgoing SMS (Quo)"
    assert sms["notes"].splitlines() == [
        "See you at 9",
        "Quo number: +14155550100",
        "Quo message id: MS1",
    ]
    assert sms["dateTime"] == "2026-03-01T10:00:00-05:00"
    # An outgoing one's caller is the Quo side.
    assert (sms["callerName"], sms["callerPhone"]) == ("Dana Quo (Quo)", "+14155550100")
    assert [(t["type"], t["url"].rsplit("=", 1)[1]) for t in sms["tags"]] == [
        ("caregiver", str(caregiver["id"]))
    ]


def call_of(external_id: str, call_id: str, **changes: Any) -> CallActivity:
    fields: dict[str, Any] = {
        "quo_call_id": call_id,
        "direction": "incoming",
        "duration_seconds": 75,
        "contact_external_id": external_id,
        "timestamp": "2026-03-02T09:30:00-05:00",
        "external_number": "+15558675309",
        "quo_number": "+14155550100",
        "quo_user": "Dana Quo",
        "deep_link": f"https://my.quo.com/calls/{call_id}",
    }
    return CallActivity(**{**fields, **changes})


def logs_of(sim: AxisCareSandbox, call_id: str) -> list[dict[str, Any]]:
    """The call logs of that call, as the sandbox's activities (every simulator's shape)
    show them."""
    return [
        {**a["record"], "person": a["person"]}
        for a in sim.activities()
        if a["kind"] == "call" and a["body"].splitlines()[-1] == f"Quo call id: {call_id}"
    ]


def test_update_patches_the_same_call_log(
    connector: AxisCareConnector, sim: AxisCareSandbox
) -> None:
    lead = _valid_person(connector, "leads")
    first = call_of(f"lead-{lead['id']}", "AC-upd")
    log_id = connector.log_call_to_activity(first)
    (created,) = logs_of(sim, "AC-upd")
    assert created["person"] == f"lead-{lead['id']}"  # on the person, as the check reads it
    assert (created["callerName"], created["callerPhone"]) == (
        f"{lead['firstName'] or ''} {lead['lastName']}".strip(),
        "+15558675309",  # the number Quo saw
    )
    enriched = replace(
        first,
        summary="Wants to move the visit to Tuesday",
        next_steps=("Call back Monday",),
        recording_urls=("https://files.quo.example/rec/AC-upd.mp3",),
        transcript="Dana: Hello\nCaller: Can we move Tuesday?",
    )
    assert connector.update_call_activity(log_id, enriched) == log_id  # edited in place
    (log,) = logs_of(sim, "AC-upd")  # still one call log of the call
    assert log["id"] == int(log_id) and log["subject"] == "Incoming call (Quo)"
    for line in (
        "Summary: Wants to move the visit to Tuesday",
        "Next step: Call back Monday",
        "Recording: https://files.quo.example/rec/AC-upd.mp3",
        "Transcript:\nDana: Hello\nCaller: Can we move Tuesday?",
        "Quo user: Dana Quo",
        "Open in Quo: https://my.quo.com/calls/AC-upd",
    ):
        assert line in log["notes"]
    # what the update does not concern is as it was
    unchanged = ("callerName", "callerPhone", "dateTime", "tags", "followUp")
    assert {k: log[k] for k in unchanged} == {k: created[k] for k in unchanged}
    assert connector.api.get_call_log(int(log_id)) == {
        k: v for k, v in log.items() if k != "person"
    }


@pytest.mark.parametrize(
    ("direction", "outcome", "subject", "follow_up"),
    [
        ("incoming", CallOutcome.MISSED, "Incoming call (missed) (Quo)", True),
        ("incoming", CallOutcome.VOICEMAIL, "Incoming call (missed, voicemail) (Quo)", True),
        ("outgoing", CallOutcome.MISSED, "Outgoing call (missed) (Quo)", False),
    ],
)
def test_missed_calls_read_as_missed(
    connector: AxisCareConnector,
    sim: AxisCareSandbox,
    direction: str,
    outcome: CallOutcome,
    subject: str,
    follow_up: bool,
) -> None:
    client = _valid_person(connector, "clients")
    call_id = f"AC-{direction}-{outcome}"
    # Quo sends a missed call's duration too (it rang): the outcome decides, not the duration.
    ringing = call_of(f"client-{client['id']}", call_id, direction=direction, duration_seconds=9)
    log_id = connector.log_call_to_activity(replace(ringing, outcome=CallOutcome.RINGING))
    (log,) = logs_of(sim, call_id)
    assert log["subject"].endswith("call (ringing) (Quo)") and log["followUp"] is False
    connector.update_call_activity(log_id, replace(ringing, outcome=outcome))
    (log,) = logs_of(sim, call_id)
    assert log["subject"] == subject
    assert "Duration" not in log["notes"]
    assert log["followUp"] is follow_up  # a missed incoming call needs a call back


def test_updating_an_unknown_call_log_is_a_clear_error(
    connector: AxisCareConnector, sim: AxisCareSandbox
) -> None:
    before = sim.call_logs()
    call = call_of("client-1", "AC-none")
    with pytest.raises(CallLogNotFound, match="no call log 999999 \\(Quo call AC-none\\)") as info:
        connector.update_call_activity("999999", call)
    assert isinstance(info.value, LookupError) and info.value.status == 404
    with pytest.raises(CallLogNotFound, match="not an AxisCare call log id"):
        connector.update_call_activity("st-call-1", call)
    assert sim.call_logs() == before


@pytest.mark.parametrize("external_id", ["client-0", "foo-123", "512", "abc123def", "client-"])
def test_malformed_external_ids_write_nothing(
    connector: AxisCareConnector, sim: AxisCareSandbox, external_id: str
) -> None:
    before = len(sim.stats()["callLogs"])
    with pytest.raises(ValueError, match="not an AxisCare externalId"):
        connector.log_call_to_activity(
            CallActivity("AC2", "outgoing", 5, external_id, "2026-03-01T10:00:00Z")
        )
    assert len(sim.stats()["callLogs"]) == before


def test_unknown_person_is_an_error(connector: AxisCareConnector) -> None:
    with pytest.raises(LookupError, match="no lead 99999"):
        connector.log_sms_to_activity(
            SmsActivity("MS2", "incoming", "hi", "lead-99999", "2026-03-01T10:00:00Z")
        )


def test_no_webhooks_so_polling() -> None:
    assert AxisCareConnector.crm_config.sync_config.supports_webhooks is False
    with pytest.raises(NotImplementedError, match="polling"):
        offline().setup_webhooks("https://example.com/hook")


def test_registered_with_its_simulator() -> None:
    assert connector_class("axiscare") is AxisCareConnector
    assert AxisCareConnector.simulator == "quo_sync_dagster.sandbox.axiscare_server"
    types = [t.crm_object_name for t in AxisCareConnector.crm_config.person_object_types]
    assert types == list(KINDS)
    assert AxisCareConnector.crm_config.sync_config.lists_oldest_first


# ---- unknown callers --------------------------------------------------------------------------
CALLER = "+14155550123"


@pytest.fixture
def callers(tmp_path: Path) -> Iterator[tuple[AxisCareSandbox, AxisCareConnector]]:
    """A sandbox of its own: these tests add leads, which the module's sandbox must not get."""
    with AxisCareSandbox(tmp_path, token=TOKEN, records=40, rate_limit=None) as sb:
        integration = Integration("it-ax", "axiscare", "env:UNUSED", settings={"base_url": sb.url})
        c = AxisCareConnector(integration, TOKEN)
        yield sb, c
        c.close()


def holders(sim: AxisCareSandbox, number: str) -> list[dict[str, Any]]:
    return [p for p in sim.people("leads") if p["mobilePhone"] == number]


def test_an_unknown_caller_becomes_a_lead_that_syncs_to_quo(
    callers: tuple[AxisCareSandbox, AxisCareConnector],
) -> None:
    sim, crm = callers
    newest = sim.people("leads")[-1]["id"]
    key = crm.create_person_for_caller(CALLER)
    [made] = holders(sim, CALLER)
    assert key == f"lead-{made['id']}" == crm.record_key(made, "leads")
    assert made["id"] > newest and made["status"] == {"label": "Active", "active": True}
    assert sim.stats()["byKind"]["create_lead"] == 1
    # The key reads back as the lead holding the number, which Quo takes as a contact.
    [lead] = crm.fetch_persons_by_ids("leads", [key])
    assert lead == made
    contact = crm.transform_person_to_quo(lead, "leads")
    assert (contact.external_id, contact.first_name, contact.last_name, contact.role) == (
        key,
        "Unknown",
        "caller",
        "Lead",
    )
    assert contact.phone_numbers == (LabeledValue("mobile", CALLER),)
    # Listed last, where the next poll's pages find it.
    assert crm.fetch_person_page("leads", 0, 500).records[-1] == made


def test_a_create_whose_answer_is_lost_is_not_sent_again_but_found(
    callers: tuple[AxisCareSandbox, AxisCareConnector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, crm = callers
    create = crm.api.create_lead

    def written_then_lost(*args: Any, **kwargs: Any) -> dict[str, Any]:
        create(*args, **kwargs)
        raise OutcomeUnknown("POST /api/leads outcome unknown, not retried: ReadTimeout")

    monkeypatch.setattr(crm.api, "create_lead", written_then_lost)
    key = crm.create_person_for_caller(CALLER)  # found among the leads, not created again
    assert [f"lead-{p['id']}" for p in holders(sim, CALLER)] == [key]
    assert sim.stats()["byKind"]["create_lead"] == 1


def test_a_lost_create_is_found_whatever_number_the_phone_policy_keeps(
    callers: tuple[AxisCareSandbox, AxisCareConnector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The `valid` policy drops a fictional 555 number from the synced contact, not from the
    search for the lead made for that caller."""
    sim, _ = callers
    settings = {"base_url": sim.url, "phone_policy": "valid"}
    crm = AxisCareConnector(
        Integration("it-ax", "axiscare", "env:UNUSED", settings=settings), TOKEN
    )
    fictional = "+15551234567"
    create = crm.api.create_lead

    def written_then_lost(*args: Any, **kwargs: Any) -> dict[str, Any]:
        create(*args, **kwargs)
        raise OutcomeUnknown("POST /api/leads outcome unknown, not retried: ReadTimeout")

    try:
        monkeypatch.setattr(crm.api, "create_lead", written_then_lost)
        key = crm.create_person_for_caller(fictional)
        assert [f"lead-{p['id']}" for p in holders(sim, fictional)] == [key]
        assert sim.stats()["byKind"]["create_lead"] == 1
    finally:
        crm.close()


def test_a_create_that_fails_unwritten_is_outcome_unknown_and_not_retried(
    callers: tuple[AxisCareSandbox, AxisCareConnector],
) -> None:
    sim, crm = callers
    sim.inject_fault(500)  # the create's answer; nothing is written
    with pytest.raises(OutcomeUnknown):
        crm.create_person_for_caller(CALLER)
    assert holders(sim, CALLER) == []
    assert sim.stats()["byKind"]["create_lead"] == 1  # a create is never re-sent blindly
    assert crm.create_person_for_caller(CALLER) == f"lead-{holders(sim, CALLER)[0]['id']}"


def test_a_lead_axiscare_refuses_is_a_clear_error(
    callers: tuple[AxisCareSandbox, AxisCareConnector],
) -> None:
    sim, crm = callers
    before = len(sim.people("leads"))
    with pytest.raises(AxisCareApiError) as refused:
        crm.api.create_lead("Unknown", " ")  # AxisCare wants a last name
    assert refused.value.status == 400 and "lastName" in refused.value.message
    assert len(sim.people("leads")) == before


# ---- the whole pipeline ---------------------------------------------------------------------


def test_pipeline_syncs_every_kind_then_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AxisCare's own ~5 requests/s limit is on: the connector's 4/s governor must stay under it.
    # 680 people: every kind, applicants too (fixed pages of 100), spans 2-3 pages of 100 and
    # each Process is one ranged run, because a one-page range fails in the framework's
    # PageFramesIOManager (Dagster hands a lone partition over as a bare DataFrame).
    with (
        AxisCareSandbox(tmp_path / "axiscare", token=TOKEN, records=680) as axis,
        pipeline(tmp_path, monkeypatch) as p,
    ):
        monkeypatch.setenv("AXISCARE_TEST_TOKEN", TOKEN)
        add_integration(
            p, "axiscare", {"base_url": axis.url}, crm_credential_ref="env:AXISCARE_TEST_TOKEN"
        )
        config = {"integration_id": "it-1", "page_size": 100, "pages_per_run": 3}
        processes = sync_everything(p, "axiscare", config)
        assert sorted(q.context["personObjectType"] for q in processes) == sorted(KINDS)
        assert all(q.state == ProcessState.COMPLETED for q in processes)
        synced = sum(q.counters["synced"] for q in processes)
        skipped = sum(q.counters["skipped"] for q in processes)
        assert synced + skipped == sum(axis.stats()["people"].values()) == 680
        assert sum(q.counters["failed"] for q in processes) == 0  # every one can be named
        assert 0 < skipped < synced  # the simulator's blank and unusable phones
        quo = p.quo.stats()
        assert quo["contactsBySource"]["axiscare"] == synced
        assert quo["duplicateExternalIds"] == 0
        assert axis.stats()["rateLimited"] == 0

        before = quo["byKind"]
        again = sync_everything(p, "axiscare", config)
        assert all(q.state == ProcessState.COMPLETED for q in again)
        after = p.quo.stats()["byKind"]
        assert (after["create"], after["patch"]) == (before["create"], before["patch"])
