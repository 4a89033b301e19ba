"""The ScalingTest synthetic CRM: deterministic, newest first, complete paging, mappable people."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    Integration,
    NoPhone,
    PersonPage,
    SmsActivity,
)
from quo_sync_dagster.core.phones import to_e164
from quo_sync_dagster.crms.scalingtest import (
    ActivityNotFound,
    ScalingTestConnector,
    skipped_record_count,
)

OBJ = "MockPerson"
BAD = {13: "no phone", 47: "invalid phone", 81: "no name"}  # index % 100 -> problem
SKIPPED = {13: "no phone", 47: "invalid phone"}  # the problems that leave no contact


def connector(
    records: int, revision: int = 0, region: str = "US", **more: Any
) -> ScalingTestConnector:
    settings = {"records": records, "revision": revision, **more}
    return ScalingTestConnector(
        Integration(
            "int-st", "scalingtest", "env:QUO_KEY", default_region=region, settings=settings
        )
    )


def all_pages(
    crm: ScalingTestConnector, limit: int, modified_since: datetime | None = None
) -> list[PersonPage]:
    pages = []
    while True:
        page = crm.fetch_person_page(OBJ, len(pages), limit, modified_since)
        pages.append(page)
        if not page.has_more:
            return pages


def records(pages: list[PersonPage]) -> list[dict[str, Any]]:
    return [r for p in pages for r in p.records]


def index(person: dict[str, Any]) -> int:
    return int(person["id"].removeprefix("st-"))


def test_two_instances_give_identical_pages() -> None:
    a, b = connector(450, revision=3), connector(450, revision=3)
    for page in range(4):
        assert a.fetch_person_page(OBJ, page, 100) == b.fetch_person_page(OBJ, page, 100)


def test_pages_are_newest_first() -> None:
    for revision in (0, 4):
        rows = records(all_pages(connector(600, revision), 100))
        stamps = [datetime.fromisoformat(r["updated_at"]) for r in rows]
        assert stamps == sorted(stamps, reverse=True)


def test_oldest_first_when_asked() -> None:
    crm = connector(300)
    rows = crm.fetch_person_page(OBJ, 0, 300, sort_desc=False).records
    stamps = [r["updated_at"] for r in rows]
    assert [datetime.fromisoformat(s) for s in stamps] == sorted(
        datetime.fromisoformat(s) for s in stamps
    )


@pytest.mark.parametrize(("total", "limit"), [(1000, 200), (1001, 200), (999, 200), (7, 3), (5, 5)])
def test_paging_covers_every_record_once(total: int, limit: int) -> None:
    pages = all_pages(connector(total), limit)
    ids = [r["id"] for r in records(pages)]
    assert len(ids) == len(set(ids)) == total
    assert sorted(ids) == [f"st-{i:07d}" for i in range(total)]
    assert len(pages) == -(-total // limit)  # no trailing empty page
    assert all(p.total == total for p in pages)
    assert [p.has_more for p in pages] == [True] * (len(pages) - 1) + [False]
    assert all(len(p.records) == limit for p in pages[:-1])
    assert len(pages[-1].records) == total - limit * (len(pages) - 1)


def test_exact_multiple_ends_with_a_full_last_page() -> None:
    crm = connector(1000)
    pages = all_pages(crm, 200)
    assert [len(p.records) for p in pages] == [200] * 5
    assert pages[-1].has_more is False
    beyond = crm.fetch_person_page(OBJ, 5, 200)
    assert beyond.records == [] and beyond.has_more is False


def test_empty_crm() -> None:
    page = connector(0).fetch_person_page(OBJ, 0, 100)
    assert (page.records, page.total, page.has_more) == ([], 0, False)


@pytest.mark.parametrize("revision", [0, 2])
def test_modified_since_returns_exactly_the_later_records(revision: int) -> None:
    crm = connector(500, revision)
    everyone = records(all_pages(crm, 500))
    stamps = sorted({datetime.fromisoformat(r["updated_at"]) for r in everyone})
    cutoff = stamps[len(stamps) // 3]
    expected = {r["id"] for r in everyone if datetime.fromisoformat(r["updated_at"]) > cutoff}
    pages = all_pages(crm, 40, modified_since=cutoff)
    got = [r["id"] for r in records(pages)]
    assert len(got) == len(set(got)) and set(got) == expected
    assert pages[0].total == len(expected)
    latest = max(stamps)
    assert crm.fetch_person_page(OBJ, 0, 10, modified_since=latest).records == []


def test_revision_edits_a_tenth_and_makes_them_newest() -> None:
    total = 1000
    before = {r["id"]: r for r in records(all_pages(connector(total), 250))}
    after_rows = records(all_pages(connector(total, revision=7), 250))
    after = {r["id"]: r for r in after_rows}
    changed = [pid for pid in before if before[pid] != after[pid]]
    assert len(changed) == total // 10
    assert all(index(after[pid]) % 10 == 7 for pid in changed)
    assert all(after[pid]["last_name"] != before[pid]["last_name"] for pid in changed
               if before[pid]["last_name"])  # fmt: skip
    # The edited records lead the newest-first order, each newer than every unedited one.
    assert {r["id"] for r in after_rows[: len(changed)]} == set(changed)
    oldest_edit = min(datetime.fromisoformat(after[pid]["updated_at"]) for pid in changed)
    newest_before = max(datetime.fromisoformat(r["updated_at"]) for r in before.values())
    assert oldest_edit > newest_before
    # A sync since the previous run's high-water mark sees exactly the edits.
    since = records(all_pages(connector(total, revision=7), 100, modified_since=newest_before))
    assert {r["id"] for r in since} == set(changed)


def test_transform_maps_every_field() -> None:
    crm = connector(400)
    people = records(all_pages(crm, 400))
    seen_non_ascii = seen_intl = seen_company = seen_role = seen_two_phones = False
    for person in people:
        if index(person) % 100 in BAD:
            continue
        contact = crm.transform_person_to_quo(person, OBJ)
        assert contact.external_id == person["id"]
        assert contact.source == crm.quo_source
        assert contact.first_name == person["first_name"]
        assert contact.last_name == person["last_name"]
        assert contact.company == person["company"]
        assert contact.role == person["title"]
        assert [e.value for e in contact.emails] == person["emails"]
        assert [(p.name, p.value) for p in contact.phone_numbers] == [
            (p["type"], to_e164(p["number"], "US")) for p in person["phones"]
        ]
        for phone in contact.phone_numbers:
            assert phone.value.startswith("+") and phone.value[1:].isdigit()
        seen_non_ascii |= not (person["first_name"] + person["last_name"]).isascii()
        seen_intl |= any(p.value.startswith("+44") for p in contact.phone_numbers)
        seen_company |= contact.company is not None
        seen_role |= contact.role is not None
        seen_two_phones |= len(contact.phone_numbers) > 1
    assert seen_non_ascii and seen_intl and seen_company and seen_role and seen_two_phones


def test_transform_of_specific_people() -> None:
    crm = connector(100)
    intl = crm.transform_person_to_quo(crm.person(9), OBJ)
    assert intl.phone_numbers[0].value == to_e164(crm.person(9)["phones"][0]["number"])
    assert intl.phone_numbers[0].value.startswith("+4420")
    zoe = crm.transform_person_to_quo(crm.person(2), OBJ)
    assert zoe.first_name == "Zoë" and zoe.to_api_body()["defaultFields"]["firstName"] == "Zoë"
    five = crm.transform_person_to_quo(crm.person(5), OBJ)
    assert [p.name for p in five.phone_numbers] == ["mobile", "work"]


def test_transform_uses_the_integration_region() -> None:
    crm = connector(10, region="GB")
    person = {**crm.person(1), "phones": [{"type": "mobile", "number": "020 7946 0123"}]}
    contact = crm.transform_person_to_quo(person, OBJ)
    assert contact.phone_numbers[0].value == "+442079460123"


@pytest.mark.parametrize(("i", "needle"), [(13, "no phone"), (47, "555-01"), (113, "no phone")])
def test_people_without_a_phone_raise_no_phone_naming_the_problem(i: int, needle: str) -> None:
    crm = connector(200)
    with pytest.raises(NoPhone) as info:
        crm.transform_person_to_quo(crm.person(i), OBJ)
    assert needle in str(info.value)


def test_a_person_without_a_name_is_shown_by_company_else_email_else_phone() -> None:
    crm = connector(200)
    person = crm.person(181)  # 81 has no company
    assert person["first_name"] == person["last_name"] == "" and person["company"]
    by_company = crm.transform_person_to_quo(person, OBJ)
    assert (by_company.first_name, by_company.last_name) == (person["company"], None)
    by_email = crm.transform_person_to_quo({**person, "company": None}, OBJ)
    assert by_email.first_name == person["emails"][0].partition("@")[0]
    by_phone = crm.transform_person_to_quo({**person, "company": None, "emails": []}, OBJ)
    assert by_phone.first_name == by_phone.phone_numbers[0].value


@pytest.mark.parametrize("total", [0, 13, 14, 99, 100, 250, 2000])
def test_skipped_record_count_matches_the_pages(total: int) -> None:
    crm = connector(total)
    problems: Counter[str] = Counter()
    for person in records(all_pages(crm, 200)):
        try:
            crm.transform_person_to_quo(person, OBJ)
        except NoPhone:
            problems[SKIPPED.get(index(person) % 100, "unexpected")] += 1
    assert "unexpected" not in problems
    assert sum(problems.values()) == skipped_record_count(total)


def test_skipped_record_count_grows_by_two_per_hundred() -> None:
    assert skipped_record_count(0) == 0
    assert skipped_record_count(10_000) - skipped_record_count(9_900) == len(SKIPPED)


def test_fetch_by_ids_returns_the_same_people() -> None:
    crm = connector(300)
    page = crm.fetch_person_page(OBJ, 1, 50).records
    assert crm.fetch_persons_by_ids(OBJ, [p["id"] for p in page]) == page


def test_edited_timestamps_stay_distinct() -> None:
    rows = records(all_pages(connector(300, revision=1), 300))
    stamps = [r["updated_at"] for r in rows]
    assert len(set(stamps)) == len(stamps)
    assert max(datetime.fromisoformat(s) for s in stamps) - min(
        datetime.fromisoformat(s) for s in stamps
    ) < timedelta(days=1)


# ---- activities: the synthetic timeline ----------------------------------------------------
def timeline(tmp_path: Path, integration_id: str = "int-st-act") -> ScalingTestConnector:
    settings = {"records": 300, "activity_db": str(tmp_path / "activities.sqlite")}
    return ScalingTestConnector(
        Integration(integration_id, "scalingtest", "env:Q", settings=settings)
    )


def call(person: str, call_id: str = "AC1", **changes: Any) -> CallActivity:
    fields: dict[str, Any] = {
        "quo_call_id": call_id,
        "direction": "incoming",
        "duration_seconds": 75,
        "contact_external_id": person,
        "timestamp": "2026-03-02T09:30:00Z",
        "quo_number": "+14155550100",
        "deep_link": f"https://my.quo.com/calls/{call_id}",
    }
    return CallActivity(**{**fields, **changes})


def test_calls_are_logged_then_updated_in_place(tmp_path: Path) -> None:
    crm = timeline(tmp_path)
    first = crm.log_call_to_activity(call("st-0000005"))
    enriched = call(
        "st-0000005",
        summary="Wants a quote",
        recording_urls=("https://files.quo.example/rec/AC1.mp3",),
        transcript="A: hi\nB: hello",
    )
    assert crm.update_call_activity(first, enriched) == first
    # Another connector (another run, another process) reads the same timeline.
    (row,) = timeline(tmp_path).activities()
    assert (row["id"], row["kind"], row["quo_id"], row["person"]) == (
        first,
        "call",
        "AC1",
        "st-0000005",
    )
    assert (row["subject"], row["outcome"], row["revisions"]) == (
        "Incoming call (Quo)",
        "answered",
        1,
    )
    for line in ("Summary: Wants a quote", "Recording: https://files.quo.example/rec/AC1.mp3"):
        assert line in row["body"].splitlines()
    assert "Transcript:\nA: hi\nB: hello" in row["body"]


def test_missed_calls_read_as_missed_and_sms_are_kept(tmp_path: Path) -> None:
    crm = timeline(tmp_path)
    missed = call("st-0000006", "AC2", outcome=CallOutcome.MISSED, duration_seconds=8)
    activity_id = crm.log_call_to_activity(missed)
    voicemail = replace(missed, outcome=CallOutcome.VOICEMAIL, voicemail_url="https://vm/1")
    crm.update_call_activity(activity_id, voicemail)
    sms = SmsActivity("MS1", "outgoing", "See you at 9", "st-0000006", "2026-03-02T10:00:00Z")
    sms_id = crm.log_sms_to_activity(sms)
    rows = {r["id"]: r for r in crm.activities()}
    assert rows[activity_id]["outcome"] == "voicemail"
    assert rows[activity_id]["subject"] == "Incoming call (missed, voicemail) (Quo)"
    assert "Duration" not in rows[activity_id]["body"]
    assert (rows[sms_id]["kind"], rows[sms_id]["subject"]) == ("sms", "Outgoing SMS (Quo)")
    assert rows[sms_id]["body"].splitlines()[0] == "See you at 9"


def test_a_call_logged_twice_is_two_activities(tmp_path: Path) -> None:
    crm = timeline(tmp_path)
    ids = {crm.log_call_to_activity(call("st-0000007", "AC3")) for _ in range(2)}
    assert len(ids) == 2 == len([r for r in crm.activities() if r["quo_id"] == "AC3"])


def test_unknown_activities_and_people_are_clear_errors(tmp_path: Path) -> None:
    crm = timeline(tmp_path)
    sms_id = crm.log_sms_to_activity(
        SmsActivity("MS2", "incoming", "hi", "st-0000008", "2026-03-02T10:00:00Z")
    )
    for unknown in ("st-call-999", "scalingtest-call-AC1", sms_id):  # an SMS is no call
        with pytest.raises(ActivityNotFound, match="no call activity"):
            crm.update_call_activity(unknown, call("st-0000008"))
    with pytest.raises(LookupError, match="no person 'st-0999999'"):
        crm.log_call_to_activity(call("st-0999999"))
    assert [r["id"] for r in crm.activities()] == [sms_id]


def test_without_a_file_the_timeline_is_the_process_s_own() -> None:
    settings = {"records": 50}
    a, b = (
        ScalingTestConnector(Integration(i, "scalingtest", "env:Q", settings=settings))
        for i in ("int-mem-a", "int-mem-b")
    )
    activity_id = a.log_call_to_activity(call("st-0000001", "AC-mem"))
    again = ScalingTestConnector(
        Integration("int-mem-a", "scalingtest", "env:Q", settings=settings)
    )
    assert [r["id"] for r in again.activities()] == [activity_id]
    assert b.activities() == []  # another integration's timeline


def test_the_content_hash_does_not_follow_libphonenumbers_validity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A metadata release that stops calling a range valid (here: every range) changes no
    contact under the default `possible` policy, so nothing is rewritten; `valid` drops them."""
    crm = connector(200)
    people = [crm.person(i) for i in range(60) if i % 100 not in BAD]
    before = [crm.transform_person_to_quo(p, OBJ).content_hash() for p in people]
    monkeypatch.setattr("phonenumbers.is_valid_number", lambda number: False)
    assert [crm.transform_person_to_quo(p, OBJ).content_hash() for p in people] == before
    strict = connector(200, phone_policy="valid")
    with pytest.raises(NoPhone, match="for region US"):
        strict.transform_person_to_quo(people[0], OBJ)
