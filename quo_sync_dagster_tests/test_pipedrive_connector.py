"""The Pipedrive connector against the Pipedrive simulator over real HTTP, and the whole Dagster
pipeline from the simulator into the Quo sandbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.external_ids import quo_external_id
from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    CustomFieldValue,
    Excluded,
    Integration,
    InvalidRecord,
    LabeledValue,
    NoPhone,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms.pipedrive import ActivityNotFound, PipedriveConnector
from quo_sync_dagster.crms.pipedrive_api import (
    PipedriveApi,
    PipedriveApiError,
    PipedriveOutcomeUnknown,
)
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.pipedrive_server import (
    CUSTOM_FIELD_KEYS,
    DEFAULT_TOKEN,
    FIRST_ORG_ID,
    FIRST_PERSON_ID,
    PipedriveSandbox,
    seed_organization,
    seed_person,
)
from quo_sync_dagster_tests.corpus import Expected, each_record, transform_as_expected
from quo_sync_dagster_tests.pipeline import add_integration, pipeline, sync_everything

RECORDS = 60
NO_PHONE = {FIRST_PERSON_ID + i for i in (7, 57)}
NAMELESS = FIRST_PERSON_ID + 13  # no name and no e-mail: named by their organization
LEAD_SOURCE, TIER = CUSTOM_FIELD_KEYS["lead_source"], CUSTOM_FIELD_KEYS["customer_tier"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipedriveSandbox]:
    with PipedriveSandbox(
        tmp_path_factory.mktemp("pipedrive"), records=RECORDS, rate_limit=None
    ) as sb:
        yield sb


def connector(url: str = "http://unused", **settings: Any) -> PipedriveConnector:
    integration = Integration(
        "it-pd", "pipedrive", "env:QUO", settings={"base_url": url, **settings}
    )
    return PipedriveConnector(integration, DEFAULT_TOKEN)


@pytest.fixture
def crm(sim: PipedriveSandbox) -> Iterator[PipedriveConnector]:
    c = connector(sim.url)
    yield c
    c.close()


def person(**fields: Any) -> dict[str, Any]:
    """A person in the v2 shape, as GET /api/v2/persons returns it."""
    return {
        "id": 1234,
        "name": "Zoë Łukasiewicz-Ørsted",
        "first_name": "Zoë",
        "last_name": "Łukasiewicz-Ørsted",
        "owner_id": 111,
        "org_id": 55,
        "add_time": "2025-05-01T08:00:00Z",
        "update_time": "2026-03-01T10:00:00Z",
        "emails": [
            {"value": "zoe@acme.example", "primary": False, "label": "work"},
            {"value": " zoe@home.example ", "primary": True, "label": "home"},
            {"value": "ZOE@acme.example", "primary": False, "label": "other"},  # a duplicate
        ],
        "phones": [
            {"value": "(415) 555-0132", "primary": False, "label": "work"},
            {"value": "+49 30 90181234", "primary": True, "label": "mobile"},
            {"value": "415.555.0132", "primary": False, "label": "home"},  # the work number again
            {"value": "12", "primary": False, "label": "other"},  # not a number: dropped
            {"value": "", "primary": False, "label": ""},
        ],
        "is_deleted": False,
        "visible_to": 3,
        "label_ids": [5],
        "picture_id": None,
        "custom_fields": {LEAD_SOURCE: "Referral", TIER: 2, "blank": None, "unmapped": "x"},
        **fields,
    }


# ---- transform ----------------------------------------------------------------------------------
def test_transform_maps_every_field() -> None:
    mapping = {LEAD_SOURCE: "inbound-lead", TIER: "lifetime-value", "blank": "vip"}
    crm = connector(custom_fields=mapping)
    contact = crm.transform_person_to_quo(person(org_name="Acme GmbH", job_title="Buyer"), "Person")
    assert contact == QuoContact(
        external_id="1234",
        source="pipedrive",
        first_name="Zoë",
        last_name="Łukasiewicz-Ørsted",
        company="Acme GmbH",
        role="Buyer",
        emails=(
            LabeledValue("home", "zoe@home.example"),
            LabeledValue("work", "zoe@acme.example"),
        ),
        phone_numbers=(
            LabeledValue("mobile", "+493090181234"),
            LabeledValue("work", "+14155550132"),
        ),
        custom_fields=(
            CustomFieldValue("inbound-lead", "Referral"),
            CustomFieldValue("lifetime-value", 2),
        ),
        source_url="https://app.pipedrive.com/person/1234",
    )


def test_transform_of_a_simulator_record_and_the_v1_org_object() -> None:
    raw = seed_person(3)  # three phones in three formats, custom fields, no org name
    contact = connector().transform_person_to_quo(raw, "Person")
    assert (contact.first_name, contact.last_name) == (raw["first_name"], raw["last_name"])
    assert [p.value for p in contact.phone_numbers] == [
        "+13122000009",
        "+12062000010",
        "+13032000011",
    ]
    assert [p.name for p in contact.phone_numbers] == ["other", "mobile", "work"]
    assert contact.company is None and contact.role is None
    assert contact.custom_fields == ()  # no Quo keys configured: left out
    v1 = connector().transform_person_to_quo(person(org_id={"value": 55, "name": "Acme"}), "Person")
    assert v1.company == "Acme"


NO_NAME = {"first_name": None, "last_name": None, "name": ""}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"first_name": "Mei", "last_name": None}, ("Mei", None)),
        ({"first_name": "", "last_name": "Tanaka"}, ("Tanaka", None)),
        (
            {"first_name": None, "last_name": None, "name": "Ada King Lovelace"},
            ("Ada", "King Lovelace"),
        ),
        ({**NO_NAME, "org_id": {"value": 55, "name": "Acme GmbH"}}, ("Acme GmbH", None)),
        (NO_NAME, ("zoe", None)),  # the primary e-mail's local part
        ({**NO_NAME, "emails": []}, ("+493090181234", None)),  # the primary phone number
    ],
)
def test_the_name_falls_back_to_name_company_email_then_phone(
    fields: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    contact = connector().transform_person_to_quo(person(**fields), "Person")
    assert (contact.first_name, contact.last_name) == expected


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"phones": []}, "no phone number"),
        ({"phones": [{"value": " ", "primary": True, "label": "work"}]}, "no phone number"),
        (
            {"phones": [{"value": "555-01", "primary": True, "label": "work"}]},
            "invalid phone number '555-01'",
        ),
    ],
)
def test_a_person_without_a_phone_is_no_phone(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(NoPhone, match=problem):
        connector().transform_person_to_quo(person(**fields), "Person")


def test_people_without_a_phone_are_synced_when_the_integration_says_so() -> None:
    crm = connector(sync_people_without_phone=True)
    contact = crm.transform_person_to_quo(person(phones=[]), "Person")
    assert contact.phone_numbers == ()
    assert (contact.first_name, contact.emails[0].value) == ("Zoë", "zoe@home.example")
    with pytest.raises(InvalidRecord, match="no name"):  # nothing at all to show
        crm.transform_person_to_quo(person(**NO_NAME, emails=[], phones=[]), "Person")


def test_fictional_555_numbers_are_kept() -> None:
    phones = [
        {"value": "(555) 123-4567", "primary": True, "label": "mobile"},
        {"value": "+1 555 123 9999", "primary": False, "label": "work"},
    ]
    contact = connector().transform_person_to_quo(person(phones=phones), "Person")
    assert contact.phone_numbers == (
        LabeledValue("mobile", "+15551234567"),
        LabeledValue("work", "+15551239999"),
    )


def test_a_person_pipedrive_marks_deleted_is_excluded() -> None:
    with pytest.raises(Excluded, match="deleted"):
        connector().transform_person_to_quo(person(is_deleted=True), "Person")


JANE = ("Jane", "Doe")
# No company anywhere: the corpus is transformed without prepare_page (no HTTP), and a v2
# person's integer org_id names no organization until prepare_page has read it; none of these
# records carries an org_name or a v1 org_id object.
WORK_EMAIL = (("work", "jane@acme.example"),)
MOBILE, WORK = ("mobile", "+15551230001"), ("work", "+15551239999")  # 555 numbers are kept
# corpus id -> (first, last, company, emails, phones) as (label, value) pairs, or the skip.
CORPUS_EXPECTED: dict[str, Expected] = {
    "pd-base": (*JANE, None, WORK_EMAIL, (MOBILE, WORK)),
    "pd-no-phone": NoPhone,
    "pd-only-mobile": (*JANE, None, WORK_EMAIL, (MOBILE,)),
    "pd-extension": (*JANE, None, WORK_EMAIL, (("work", "+12125550134"),)),  # ext. 204 dropped
    # "030 901820" has no country code: read in the integration's region (US) it is too short.
    "pd-international": (*JANE, None, WORK_EMAIL, (("work", "+442079460958"),)),
    "pd-555-only": (*JANE, None, WORK_EMAIL, (("work", "+15551234567"),)),
    "pd-no-name": ("jane", None, None, WORK_EMAIL, (MOBILE, WORK)),  # the e-mail's local part
    "pd-name-only": (*JANE, None, WORK_EMAIL, (MOBILE, WORK)),  # `name` split at its space
    "pd-unicode": ("Zoë", "Ångström-Müller", None, WORK_EMAIL, (MOBILE, WORK)),
    "pd-unicode-cjk": ("太郎", "山田", None, WORK_EMAIL, (("mobile", "+819012345678"),)),
    "pd-multi": (  # nothing primary: Pipedrive's order stands
        *JANE,
        None,
        (*WORK_EMAIL, ("home", "jane.doe@home.example")),
        (MOBILE, WORK, ("home", "+15551230003"), ("other", "+15551230004")),
    ),
    "pd-deleted": Excluded,  # is_deleted
    "pd-no-org": ("+15551230001", None, None, (), (MOBILE, WORK)),  # the first phone number
    "pd-vanity": (*JANE, None, WORK_EMAIL, (("work", "+18003569377"),)),  # 1-800-356-9377
    "pd-no-area-code": NoPhone,  # 123-4567 alone
    "pd-garbage-phone": NoPhone,  # "n/a"
}


@each_record("pipedrive")
def test_the_corpus_field_by_field(entry: dict[str, Any]) -> None:
    assert entry["objectType"] == "person"  # the connector's object type is "Person"
    record = entry["record"]
    if contact := transform_as_expected(
        connector(), record, "Person", CORPUS_EXPECTED[entry["id"]]
    ):
        assert contact.external_id == str(record["id"])
        assert contact.source_url == f"https://app.pipedrive.com/person/{record['id']}"


# ---- organizations -----------------------------------------------------------------------------
def org_name(org_id: int | None) -> str | None:
    return None if org_id is None else seed_organization(org_id - FIRST_ORG_ID)["name"]


def org_reads(sim: PipedriveSandbox) -> int:
    """GET /api/v2/organizations?ids= requests the simulator has served."""
    return sim.stats()["byKind"]["batch_organizations"]


def test_companies_are_read_once_per_page_and_cached_for_the_run(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    before = org_reads(sim)
    everyone = crm.fetch_person_page("Person", 0, 500).records
    crm.prepare_page(everyone, "Person")
    assert org_reads(sim) == before + 1  # one request for the page's organizations
    companies = {}
    for record in everyone:
        if record["id"] not in NO_PHONE:
            contact = crm.transform_person_to_quo(record, "Person")
            assert contact.company == org_name(record["org_id"])
            companies[record["org_id"]] = contact.company
    assert None in companies and len(companies) > 10  # with and without an organization
    # Later pages name the same organizations: no request.
    for page in walk(crm, 7):
        crm.prepare_page(page.records, "Person")
    assert org_reads(sim) == before + 1
    raw = seed_person(NAMELESS - FIRST_PERSON_ID)  # no name, no e-mail
    nameless = crm.transform_person_to_quo(raw, "Person")
    assert (nameless.first_name, nameless.last_name) == (org_name(raw["org_id"]), None)


def test_organizations_are_read_100_at_a_time_and_missing_ones_are_no_company(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    known = [FIRST_ORG_ID + n for n in range(3)]
    people = [person(id=2000 + n, org_id=org) for n, org in enumerate([*known, *range(1, 151)])]
    before = org_reads(sim)
    crm.prepare_page(people, "Person")
    assert org_reads(sim) == before + 2  # 153 organizations: 100 per request
    companies = [crm.transform_person_to_quo(p, "Person").company for p in people]
    assert companies == [*map(org_name, known), *[None] * 150]  # 1..150: Pipedrive has none
    crm.prepare_page(people, "Person")  # what Pipedrive lacks is not asked for again
    assert org_reads(sim) == before + 2


def test_v1_payloads_carry_their_organization_name_and_need_no_request(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    people = [
        person(org_id={"value": 7, "name": "Acme Ltd", "people_count": 3}),
        person(org_id=None, org_name="Globex GmbH"),
        person(org_id=None),
    ]
    before = org_reads(sim)
    crm.prepare_page(people, "Person")
    assert org_reads(sim) == before
    companies = [crm.transform_person_to_quo(p, "Person").company for p in people]
    assert companies == ["Acme Ltd", "Globex GmbH", None]


# ---- paging -------------------------------------------------------------------------------------
def walk(crm: PipedriveConnector, limit: int, since: datetime | None = None) -> list[PersonPage]:
    """As the planner does: page 0 without a cursor, then each page's next_cursor."""
    pages = [crm.fetch_person_page("Person", 0, limit, since)]
    while pages[-1].has_more:
        assert len(pages) < 50, "paging never ends"
        cursor = pages[-1].next_cursor
        pages.append(crm.fetch_person_page("Person", len(pages), limit, since, cursor=cursor))
    return pages


def newest_first(people: list[dict[str, Any]]) -> list[int]:
    return [
        p["id"] for p in sorted(people, key=lambda p: (p["update_time"], p["id"]), reverse=True)
    ]


def test_paging_returns_every_person_once_newest_first(crm: PipedriveConnector) -> None:
    pages = walk(crm, 7)
    ids = [r["id"] for p in pages for r in p.records]
    assert ids == newest_first([seed_person(i) for i in range(RECORDS)])
    assert len(pages) == 9 and all(p.total is None for p in pages)
    assert [p.has_more for p in pages] == [True] * 8 + [False]
    assert pages[-1].next_cursor is None
    # Later runs fetch page k with the cursor the planner noted for it.
    cursor = pages[3].next_cursor
    assert crm.fetch_person_page("Person", 4, 7, cursor=cursor).records == pages[4].records


def test_paging_honours_modified_since(crm: PipedriveConnector) -> None:
    people = [seed_person(i) for i in range(RECORDS)]
    since = datetime(2024, 6, 1, tzinfo=UTC)
    expected = [p for p in people if datetime.fromisoformat(p["update_time"]) >= since]
    assert 0 < len(expected) < RECORDS
    ids = [r["id"] for p in walk(crm, 10, since) for r in p.records]
    assert ids == newest_first(expected)


def test_fetch_persons_by_ids(crm: PipedriveConnector) -> None:
    found = crm.fetch_persons_by_ids("Person", ["1005", "1001", "99999"])
    assert sorted(p["id"] for p in found) == [1001, 1005]


# ---- activities and webhooks ---------------------------------------------------------------------
def test_sms_becomes_a_note_on_the_person(sim: PipedriveSandbox, crm: PipedriveConnector) -> None:
    sms = SmsActivity(
        "MSG1",
        "incoming",
        "Can we <reschedule>?",
        "1005",
        "2026-03-01T10:00:00Z",
        external_number="+12125550100",
        quo_number="+14155550100",
        deep_link="https://my.quo.com/inbox/PN1/c/CN1?m=MSG1",
    )
    note_id = crm.log_sms_to_activity(sms)
    (note,) = [n for n in sim.stats()["created"]["notes"] if str(n["id"]) == note_id]
    assert note["person_id"] == 1005
    assert note["content"] == (
        "<p><strong>Incoming SMS (Quo)</strong></p><p>Can we &lt;reschedule&gt;?"
        "<br>Quo number: +14155550100<br>Other party: +12125550100"
        "<br>Open in Quo: https://my.quo.com/inbox/PN1/c/CN1?m=MSG1<br>Quo message id: MSG1</p>"
    )
    assert note["add_time"] == "2026-03-01 10:00:00"


def call(quo_id: str, person: str = "1004", **fields: Any) -> CallActivity:
    """An answered outgoing call of 95 s, as call.completed tells it."""
    base: dict[str, Any] = {
        "quo_call_id": quo_id,
        "direction": "outgoing",
        "duration_seconds": 95,
        "contact_external_id": person,
        "timestamp": "2026-03-01T10:00:00+00:00",
        "external_number": "+12125550100",
        "quo_number": "+14155550100",
        "quo_user": "Pat Quo",
        "deep_link": f"https://my.quo.com/calls/{quo_id}",
    }
    return CallActivity(**{**base, **fields})


def logged(sim: PipedriveSandbox, quo_id: str) -> list[dict[str, Any]]:
    """The activities whose body names Quo call `quo_id` (the sandbox's admin view)."""
    return [a for a in sim.activities() if f"Quo call id: {quo_id}" in a["body"]]


def test_a_call_is_logged_then_enriched_in_place(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    lookups = {k: sim.stats()["byKind"][k] for k in ("get_person", "batch_persons")}
    activity_id = crm.log_call_to_activity(call("AC1"))
    (created,) = logged(sim, "AC1")
    assert (created["id"], created["kind"], created["person"]) == (activity_id, "call", "1004")
    record = created["record"]
    assert record["type"] == "call" and record["done"] is True
    assert record["subject"] == "Outgoing call (Quo)"
    assert record["participants"] == [{"person_id": 1004, "primary": True}]
    assert (record["due_date"], record["due_time"], record["duration"]) == (
        "2026-03-01",
        "10:00",
        "00:01",
    )
    assert (
        "Duration: 1 min 35 s" in record["note"] and "Other party: +12125550100" in record["note"]
    )
    assert "Quo user: Pat Quo" in record["note"] and "Summary" not in record["note"]
    # The number is in the activity itself: no person was looked up to log the call.
    assert {k: sim.stats()["byKind"][k] for k in lookups} == lookups

    enriched = call(
        "AC1",
        summary="Asked for a <quote> & a call back",
        next_steps=("Send the quote",),
        recording_urls=("https://files.quo.com/rec/AC1.mp3",),
        transcript="Pat: Hello\nJane: Hi <there>",
    )
    assert crm.update_call_activity(activity_id, enriched) == activity_id
    (updated,) = logged(sim, "AC1")  # still one activity, the same one
    note = updated["record"]["note"]
    assert updated["id"] == activity_id and updated["record"]["subject"] == "Outgoing call (Quo)"
    assert "Summary: Asked for a &lt;quote&gt; &amp; a call back" in note
    assert "Next step: Send the quote<br>Recording: https://files.quo.com/rec/AC1.mp3" in note
    assert "Transcript:<br>Pat: Hello<br>Jane: Hi &lt;there&gt;" in note
    assert updated["record"]["duration"] == "00:01"
    assert updated["record"]["participants"] == [{"person_id": 1004, "primary": True}]
    with PipedriveApi(sim.url, DEFAULT_TOKEN) as api:
        assert api.get_activity(int(activity_id)) == updated["record"]


@pytest.mark.parametrize(
    ("outcome", "extra", "subject", "in_note"),
    [
        (CallOutcome.MISSED, {}, "Incoming call (missed) (Quo)", "Other party"),
        (
            CallOutcome.VOICEMAIL,
            {
                "voicemail_url": "https://files.quo.com/vm/1.mp3",
                "voicemail_transcript": "Call me back",
            },
            "Incoming call (missed, voicemail) (Quo)",
            "Voicemail: https://files.quo.com/vm/1.mp3<br>Voicemail transcript: Call me back",
        ),
    ],
)
def test_missed_and_voicemail_calls_read_as_missed(
    sim: PipedriveSandbox,
    crm: PipedriveConnector,
    outcome: CallOutcome,
    extra: dict[str, Any],
    subject: str,
    in_note: str,
) -> None:
    """Missed by its outcome, not by a zero duration: Quo counts the ringing of a missed call."""
    quo_id = f"AC-{outcome}"
    missed = call(quo_id, direction="incoming", duration_seconds=20, outcome=outcome, **extra)
    activity_id = crm.log_call_to_activity(missed)
    (created,) = logged(sim, quo_id)
    record = created["record"]
    assert created["id"] == activity_id and record["subject"] == subject
    assert record["duration"] is None and record["done"] is True
    assert record["note"].startswith(f"<p><strong>{subject}</strong></p>")
    assert in_note in record["note"] and "Duration" not in record["note"]


def test_a_ringing_call_becomes_done_once_answered(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    activity_id = crm.log_call_to_activity(call("AC-R", outcome=CallOutcome.RINGING))
    (ringing,) = logged(sim, "AC-R")
    assert ringing["record"]["done"] is False and "(ringing)" in ringing["record"]["subject"]
    crm.update_call_activity(activity_id, call("AC-R", duration_seconds=3700))
    (answered,) = logged(sim, "AC-R")
    assert answered["record"]["done"] is True and answered["record"]["duration"] == "01:01"
    assert answered["record"]["subject"] == "Outgoing call (Quo)"


def test_activity_errors_are_clear(crm: PipedriveConnector) -> None:
    with pytest.raises(ActivityNotFound, match=r"no activity 999999 .* Quo call AC9") as gone:
        crm.update_call_activity("999999", call("AC9"))
    assert isinstance(gone.value, LookupError) and gone.value.status == 404
    with pytest.raises(ValueError, match="not a Pipedrive activity id"):
        crm.update_call_activity("act-1", call("AC9"))
    with pytest.raises(PipedriveApiError, match="99999") as gone:
        crm.log_call_to_activity(call("AC9", person="99999"))
    assert gone.value.status == 404
    with pytest.raises(ValueError, match="not a Pipedrive person id"):
        crm.log_call_to_activity(call("AC9", person="Contacts-1"))


def test_webhooks_round_trip(sim: PipedriveSandbox, crm: PipedriveConnector) -> None:
    subscription = crm.setup_webhooks("https://hooks.example/pipedrive")
    user, password = crm.webhook_basic_auth()
    assert password not in json.dumps(subscription) and DEFAULT_TOKEN not in password
    hooks = {h["id"]: h for h in sim.stats()["created"]["webhooks"]}
    mine = [hooks[i] for i in subscription["webhookIds"]]
    assert [h["event_action"] for h in mine] == ["create", "change", "delete"]
    assert {(h["event_object"], h["version"], h["subscription_url"]) for h in mine} == {
        ("person", "2.0", "https://hooks.example/pipedrive")
    }
    assert {(h["http_auth_user"], h["http_auth_password"]) for h in mine} == {(user, password)}
    crm.teardown_webhooks(subscription)
    assert not set(subscription["webhookIds"]) & {
        h["id"] for h in sim.stats()["created"]["webhooks"]
    }
    crm.teardown_webhooks(subscription)  # already gone: nothing to do


def test_failed_webhook_setup_removes_what_it_created(
    sim: PipedriveSandbox, crm: PipedriveConnector
) -> None:
    with PipedriveApi(sim.url, DEFAULT_TOKEN) as api:
        fillers = [api.create_webhook("https://x.example/h")["id"] for _ in range(38)]
        with pytest.raises(PipedriveApiError, match="at most 40"):  # the third one fails
            crm.setup_webhooks("https://hooks.example/pipedrive")
        assert {h["id"] for h in api.list_webhooks()} == set(fillers)
        for hook_id in fillers:
            api.delete_webhook(hook_id)


# ---- a person for an unknown caller --------------------------------------------------------------
@pytest.fixture
def own_sim(tmp_path: Path) -> Iterator[PipedriveSandbox]:
    """A sandbox of its own: these tests add people, which the shared one's paging tests count."""
    with PipedriveSandbox(tmp_path, records=5, rate_limit=None) as sb:
        yield sb


def test_a_person_is_created_for_an_unknown_caller(own_sim: PipedriveSandbox) -> None:
    crm = connector(own_sim.url)
    try:
        key = crm.create_person_for_caller("+14155550199")
        assert key == str(FIRST_PERSON_ID + 5)  # the record key: the new person's id
        (person,) = crm.fetch_persons_by_ids("Person", [key])
        assert crm.record_key(person, "Person") == key
        assert person["name"] == "Unknown caller +14155550199"
        assert person["phones"] == [{"value": "+14155550199", "primary": True, "label": "work"}]
        assert person["emails"] == []  # nothing made up
        contact = crm.transform_person_to_quo(person, "Person")
        assert contact.external_id == key
        assert contact.phone_numbers == (LabeledValue("work", "+14155550199"),)
        assert (contact.first_name, contact.last_name) == ("Unknown", "caller +14155550199")
        assert contact.emails == () and contact.company is None
        assert own_sim.stats()["byKind"]["create_person"] == 1
        # Another unknown caller is another person.
        assert crm.create_person_for_caller("+442079460001") == str(FIRST_PERSON_ID + 6)
    finally:
        crm.close()


def test_a_caller_create_is_not_sent_twice_once_its_outcome_is_unknown(
    own_sim: PipedriveSandbox,
) -> None:
    crm = connector(own_sim.url)
    try:
        own_sim.inject_fault(503)
        with pytest.raises(PipedriveOutcomeUnknown) as unknown:
            crm.create_person_for_caller("+14155550199")
        assert unknown.value.status == 503
        assert own_sim.stats()["byKind"]["create_person"] == 1  # one POST, no retry
        own_sim.inject_fault(429, retry_after="0")  # refused before anything was written
        assert crm.create_person_for_caller("+14155550199") == str(FIRST_PERSON_ID + 5)
        assert own_sim.stats()["byKind"]["create_person"] == 3
    finally:
        crm.close()


@pytest.mark.parametrize("number", ["4155550199", "+0123", "tel:+14155550199", ""])
def test_a_caller_number_must_be_e164(number: str) -> None:
    with pytest.raises(ValueError, match=r"not an E\.164 number"):
        connector().create_person_for_caller(number)


# ---- the whole pipeline --------------------------------------------------------------------------
def test_pipeline_syncs_every_person_once(
    sim: PipedriveSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPEDRIVE_TEST_TOKEN", DEFAULT_TOKEN)
    config = {"integration_id": "it-1", "page_size": 7, "pages_per_run": 3}
    with pipeline(tmp_path, monkeypatch) as p:
        settings = {"base_url": sim.url, "custom_fields": {LEAD_SOURCE: "inbound-lead"}}
        integration = add_integration(
            p, "pipedrive", settings, crm_credential_ref="env:PIPEDRIVE_TEST_TOKEN"
        )
        processes = sync_everything(p, "pipedrive", config)
        assert [q.state for q in processes] == [ProcessState.COMPLETED]
        counted = {k: sum(q.counters[k] for q in processes) for k in ("synced", "skipped")}
        assert sum(q.counters["failed"] for q in processes) == 0
        assert counted == {"synced": RECORDS - len(NO_PHONE), "skipped": len(NO_PHONE)}
        synced = counted["synced"]
        stats = p.quo.stats()
        assert stats["contactsBySource"]["pipedrive"] == synced
        assert stats["duplicateExternalIds"] == 0

        before = p.quo.stats()["byKind"]
        sync_everything(p, "pipedrive", config)
        after = p.quo.stats()["byKind"]
        assert (after["create"], after["patch"]) == (before["create"], before["patch"])

        ext, nameless = (quo_external_id(integration, str(i)) for i in (1002, NAMELESS))
        with QuoClient(p.quo.url, "test-key") as quo:
            wanted = [quo_external_id(integration, str(i)) for i in (1002, NAMELESS, *NO_PHONE)]
            found = quo.find_by_external_ids(wanted, "pipedrive")
        assert set(found) == {ext, nameless}
        fields = found[ext]["defaultFields"]
        assert fields["firstName"] == seed_person(1)["first_name"]
        assert fields["company"] == org_name(seed_person(1)["org_id"])
        company = org_name(seed_person(NAMELESS - FIRST_PERSON_ID)["org_id"])
        assert found[nameless]["defaultFields"]["firstName"] == company
        assert fields["phoneNumbers"][0]["value"].startswith("+")
        assert [(c["key"], c["value"]) for c in found[ext]["customFields"]] == [
            ("inbound-lead", "Website")
        ]
