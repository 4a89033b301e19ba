"""PipedriveApi against the Pipedrive sandbox over real HTTP: paging, writes, retries, errors."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quo_sync_dagster.core.ratelimit import GovernorState, retry_at
from quo_sync_dagster.crms.pipedrive_api import (
    PipedriveApi,
    PipedriveApiError,
    PipedriveOutcomeUnknown,
    PipedriveUnavailable,
)
from quo_sync_dagster.quo.governor import RateGovernor, governor_key
from quo_sync_dagster.sandbox.pipedrive_server import DEFAULT_TOKEN, PipedriveSandbox
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster_tests.governing import RecordingGovernor

RECORDS = 500
START = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


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
def api(sandbox: PipedriveSandbox) -> Iterator[PipedriveApi]:
    with PipedriveApi(sandbox.url, DEFAULT_TOKEN) as client:
        yield client


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    yield s
    s.close()


def governor_state(store: Store) -> GovernorState:
    key = governor_key(DEFAULT_TOKEN, "pipedrive")
    return GovernorState(*store.update_governor(key, lambda s: (s, (s.next_at, s.slowdown))))


def count(sandbox: PipedriveSandbox, kind: str) -> int:
    return sandbox.stats()["byKind"][kind]


# ---- reads ----------------------------------------------------------------------------------
def test_pages_newest_first_over_every_person(api: PipedriveApi) -> None:
    persons, cursor = [], None
    while True:
        page, cursor = api.list_persons(limit=120, cursor=cursor)
        assert len(page) <= 120
        persons += page
        if cursor is None:
            break
    assert sorted(p["id"] for p in persons) == list(range(1001, 1001 + RECORDS))
    times = [p["update_time"] for p in persons]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_updated_since_takes_an_aware_datetime(api: PipedriveApi) -> None:
    newest, _ = api.list_persons(limit=1)
    since = datetime.fromisoformat(newest[0]["update_time"]) - timedelta(days=30)
    page, _ = api.list_persons(limit=500, updated_since=since)
    assert 0 < len(page) < RECORDS
    assert all(datetime.fromisoformat(p["update_time"]) >= since for p in page)
    with pytest.raises(ValueError, match="time zone"):
        api.list_persons(limit=1, updated_since=since.replace(tzinfo=None))


def test_get_persons_batches_by_100_and_skips_unknown_ids(
    sandbox: PipedriveSandbox, api: PipedriveApi
) -> None:
    before = count(sandbox, "batch_persons")
    wanted = [*range(1001, 1151), 99998, 99999]
    found = api.get_persons(wanted)
    assert sorted(p["id"] for p in found) == list(range(1001, 1151))
    assert count(sandbox, "batch_persons") == before + 2


# ---- writes ---------------------------------------------------------------------------------
def test_call_log_is_written_with_pipedrive_formats(
    sandbox: PipedriveSandbox, api: PipedriveApi
) -> None:
    subject = f"call-{uuid.uuid4().hex[:8]}"
    created = api.create_call_log(
        person_id=1005,
        outcome="connected",
        to_phone_number="+12125550100",
        from_phone_number="+14155550111",
        start_time=START,
        end_time=START + timedelta(seconds=95),
        subject=subject,
        note="<p>Talked about renewal</p>",
    )
    [stored] = [c for c in sandbox.stats()["created"]["callLogs"] if c["subject"] == subject]
    assert stored == created
    assert stored["person_id"] == 1005 and stored["outcome"] == "connected"
    assert stored["start_time"] == "2026-03-01 10:00:00"
    assert stored["end_time"] == "2026-03-01 10:01:35"
    assert stored["duration"] == "95"
    assert stored["from_phone_number"] == "+14155550111"


def test_note_is_written_on_the_person(sandbox: PipedriveSandbox, api: PipedriveApi) -> None:
    content = f"<p><strong>SMS</strong></p><p>{uuid.uuid4().hex}</p>"
    created = api.create_note(1006, content, add_time=START)
    [stored] = [n for n in sandbox.stats()["created"]["notes"] if n["content"] == content]
    assert stored == created
    assert stored["person_id"] == 1006 and stored["add_time"] == "2026-03-01 10:00:00"


@pytest.mark.parametrize(("seconds", "duration"), [(150, "00:02"), (3720, "01:02"), (59, None)])
def test_activity_links_a_primary_participant(
    sandbox: PipedriveSandbox, api: PipedriveApi, seconds: int, duration: str | None
) -> None:
    subject = f"act-{uuid.uuid4().hex[:8]}"
    api.create_activity(1007, subject, due=START, duration_seconds=seconds)
    [stored] = [a for a in sandbox.stats()["created"]["activities"] if a["subject"] == subject]
    assert stored["participants"] == [{"person_id": 1007, "primary": True}]
    assert stored["person_id"] == 1007 and stored["done"] is True and stored["type"] == "call"
    assert (stored["due_date"], stored["due_time"]) == ("2026-03-01", "10:00")
    assert stored["duration"] == duration


def test_activity_is_updated_in_place_and_read_back(
    sandbox: PipedriveSandbox, api: PipedriveApi
) -> None:
    subject = f"act-{uuid.uuid4().hex[:8]}"
    created = api.create_activity(1008, subject, done=False, note="<p>ringing</p>", due=START)
    updated = api.update_activity(
        created["id"], done=True, note="<p>answered</p>", duration_seconds=125
    )
    assert updated["id"] == created["id"] and updated["subject"] == subject  # untouched
    assert (updated["done"], updated["note"], updated["duration"]) == (
        True,
        "<p>answered</p>",
        "00:02",
    )
    assert updated["participants"] == [{"person_id": 1008, "primary": True}]
    assert api.get_activity(created["id"]) == updated
    stored = [a for a in sandbox.stats()["created"]["activities"] if a["subject"] == subject]
    assert stored == [updated]  # the same activity, changed: not a second one
    assert api.get_activity(987654321) is None
    with pytest.raises(PipedriveApiError) as missing:
        api.update_activity(987654321, note="<p>x</p>")
    assert missing.value.status == 404 and "Activity not found" in missing.value.message


def test_a_create_is_not_retried_once_its_outcome_is_unknown(
    sandbox: PipedriveSandbox, api: PipedriveApi
) -> None:
    """After a 5xx Pipedrive may have written the activity: sending it again could log the
    call twice, so the caller is told instead. An update is a rewrite: it is retried."""
    before = count(sandbox, "create_activity")
    sandbox.inject_fault(503)
    with pytest.raises(PipedriveOutcomeUnknown) as unknown:
        api.create_activity(1009, "Call")
    assert unknown.value.status == 503 and count(sandbox, "create_activity") == before + 1
    sandbox.inject_fault(503)
    with pytest.raises(PipedriveOutcomeUnknown):
        api.create_note(1009, "<p>SMS</p>")
    activity = api.create_activity(1009, "Call")
    sandbox.inject_fault(503)
    assert api.update_activity(activity["id"], note="<p>after a 503</p>")["note"] == (
        "<p>after a 503</p>"
    )


def test_webhook_create_list_delete(api: PipedriveApi) -> None:
    url = f"https://hooks.example.com/{uuid.uuid4().hex}"
    webhook = api.create_webhook(url, http_auth_user="quo", http_auth_password="pw")
    assert (webhook["version"], webhook["event_object"], webhook["event_action"]) == (
        "2.0",
        "person",
        "*",
    )
    assert webhook["id"] in [w["id"] for w in api.list_webhooks()]
    api.delete_webhook(webhook["id"])
    assert webhook["id"] not in [w["id"] for w in api.list_webhooks()]


# ---- retries and errors ---------------------------------------------------------------------
@pytest.mark.parametrize(("status", "faults", "retry_after"), [(429, 1, "1"), (403, 2, None)])
def test_rate_limits_are_retried_through_the_throttle(
    sandbox: PipedriveSandbox, store: Store, status: int, faults: int, retry_after: str | None
) -> None:
    """Both rate-limit answers (429 JSON, 403 Cloudflare HTML) hold the refused request back
    for its Retry-After (1 s without one), and only it: the shared schedule is not pushed."""
    sandbox.inject_fault(status, count=faults, retry_after=retry_after)
    before = sandbox.stats()["byStatus"].get(str(status), 0)
    governor = RecordingGovernor(store, DEFAULT_TOKEN, 50, api="pipedrive")
    with PipedriveApi(sandbox.url, DEFAULT_TOKEN, throttle=governor) as api:
        assert [p["id"] for p in api.get_persons([1010])] == [1010]
    assert sandbox.stats()["byStatus"][str(status)] == before + faults
    assert [kind for kind, _, _ in governor.events] == ["send", "429"] * faults + ["send"]
    # Lower bounds only; 5 ms for time.sleep on the monotonic clock vs the wall clock.
    for (kind, seen, asked), (_, resent, _) in itertools.pairwise(governor.events):
        if kind == "429":
            assert asked == (None if retry_after is None else float(retry_after))
            assert resent >= retry_at(seen, asked) - 0.005
    state = governor_state(store)
    assert state.slowdown == 1.0 and state.next_at <= governor.events[-1][1] + 1 / 50 + 0.005


def test_a_spent_budget_ends_in_unavailable(tmp_path: Path, store: Store) -> None:
    governor = RateGovernor(store, DEFAULT_TOKEN, 100, api="pipedrive")
    with (
        PipedriveSandbox(tmp_path, records=5, rate_limit=None, daily_budget=10) as sb,
        PipedriveApi(sb.url, DEFAULT_TOKEN, throttle=governor, max_attempts=3) as api,
    ):
        api.list_persons(limit=5)
        with pytest.raises(PipedriveUnavailable, match="403") as info:
            api.list_persons(limit=5)
        assert DEFAULT_TOKEN not in str(info.value)
        assert sb.stats()["blocked"] == 3


def test_persistent_5xx_ends_in_unavailable(sandbox: PipedriveSandbox) -> None:
    sandbox.inject_fault(503, count=2)
    with (
        PipedriveApi(sandbox.url, DEFAULT_TOKEN, max_attempts=2) as api,
        pytest.raises(PipedriveUnavailable, match="503"),
    ):
        api.get_persons([1001])
    assert sandbox.stats()["pendingFaults"] == 0


def test_client_errors_carry_status_and_message_not_token(api: PipedriveApi) -> None:
    with pytest.raises(PipedriveApiError) as info:
        api.list_persons(limit=501)
    assert info.value.status == 400 and "limit" in info.value.message
    with pytest.raises(PipedriveApiError) as info:
        api.delete_webhook(123456789)
    assert info.value.status == 404 and "Webhook not found" in str(info.value)
    assert DEFAULT_TOKEN not in str(info.value)


def test_a_wrong_token_is_401_and_not_echoed(sandbox: PipedriveSandbox) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    before = count(sandbox, "unauthenticated")
    with PipedriveApi(sandbox.url, wrong) as api, pytest.raises(PipedriveApiError) as info:
        api.list_persons(limit=1)
    assert info.value.status == 401 and "unauthorized" in info.value.message
    assert wrong not in str(info.value)
    assert count(sandbox, "unauthenticated") == before + 1  # not retried


def test_a_json_403_is_an_error_not_a_rate_limit(tmp_path: Path) -> None:
    """Only the HTML 403 is a rate limit; a JSON 403 (here: the 40-webhook cap) fails at once."""
    with (
        PipedriveSandbox(tmp_path, records=1, rate_limit=None) as sb,
        PipedriveApi(sb.url, DEFAULT_TOKEN) as api,
    ):
        for n in range(40):
            api.create_webhook(f"https://hooks.example.com/{n}")
        with pytest.raises(PipedriveApiError) as info:
            api.create_webhook("https://hooks.example.com/41")
        assert info.value.status == 403
        assert sb.stats()["byStatus"]["403"] == 1
