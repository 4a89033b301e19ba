"""AxisCareApi against the AxisCare sandbox over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.crms.axiscare_api import (
    KINDS,
    AxisCareApi,
    AxisCareApiError,
    AxisCareUnavailable,
)
from quo_sync_dagster.quo.governor import governor_key
from quo_sync_dagster.sandbox.axiscare_server import AxisCareSandbox
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster_tests.governing import RecordingGovernor, assert_every_429_was_waited_out

TOKEN = "axiscare-sandbox-token"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AxisCareSandbox]:
    with AxisCareSandbox(tmp_path_factory.mktemp("axiscare"), records=300, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def api(sandbox: AxisCareSandbox) -> Iterator[AxisCareApi]:
    sandbox.clear_faults()
    with AxisCareApi(sandbox.url, TOKEN) as a:
        yield a
    sandbox.clear_faults()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    yield s
    s.close()


def walk(api: AxisCareApi, kind: str, limit: int) -> list[dict[str, Any]]:
    people, next_page = api.list_people(kind, limit)
    while next_page is not None:
        page, next_page = api.list_people(kind, limit, next_page_url=next_page)
        people += page
    return people


def test_walks_all_four_kinds_and_ids_overlap(api: AxisCareApi, sandbox: AxisCareSandbox) -> None:
    expected = sandbox.stats()["people"]
    ids = {}
    for kind in KINDS:
        people = walk(api, kind, 25)
        ids[kind] = [p["id"] for p in people]
        assert ids[kind] == sorted(set(ids[kind])) and len(ids[kind]) == expected[kind]
    # Ids repeat across kinds: a connector must key people by (kind, id).
    assert set(ids["clients"]) & set(ids["caregivers"]) & set(ids["leads"]) & set(ids["applicants"])


def test_live_envelope_reads_the_same_people(tmp_path: Path) -> None:
    people = {}
    for live in (False, True):
        with (
            AxisCareSandbox(
                tmp_path / str(live), records=300, rate_limit=None, live_envelope=live
            ) as sb,
            AxisCareApi(sb.url, TOKEN) as api,
        ):
            people[live] = {k: walk(api, k, 20) for k in ("caregivers", "applicants")}
    assert people[True] == people[False] and all(people[False].values())


def test_start_after_id_resumes_and_404_past_the_end_is_the_end(api: AxisCareApi) -> None:
    everyone = walk(api, "caregivers", 500)
    middle = everyone[len(everyone) // 2]["id"]
    rest, _ = api.list_people("caregivers", 500, start_after_id=middle)
    assert rest == [p for p in everyone if p["id"] > middle]
    # Caregivers answer 404 when nothing is left; that is an empty last page, not an error.
    assert api.list_people("caregivers", 10, start_after_id=everyone[-1]["id"]) == ([], None)


def test_next_page_on_another_host_is_refused(api: AxisCareApi) -> None:
    with pytest.raises(ValueError, match="another host"):
        api.list_people("clients", 10, next_page_url="https://evil.example/api/clients?limit=10")


def test_batch_read_by_ids(api: AxisCareApi) -> None:
    for kind in KINDS:
        everyone = walk(api, kind, 500)
        wanted = [p["id"] for p in everyone[::3]]
        found = api.get_people(kind, [*wanted, 999_999])
        assert [p["id"] for p in found] == wanted
    assert api.get_people("caregivers", [999_998]) == []


def test_create_call_log_writes_the_right_fields(
    api: AxisCareApi, sandbox: AxisCareSandbox
) -> None:
    lead = walk(api, "leads", 500)[-1]
    when = datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))
    log = api.create_call_log(
        "Ruth Adams",
        "+15551230001",
        when,
        "Quo call (inbound, 3m25s)",
        "Summary: asked to move Tuesday visit.",
        tags=[("lead", lead["id"])],
    )
    stored = sandbox.stats()["callLogs"]
    assert stored[-1] == log
    assert log["dateTime"] == "2026-03-01T10:00:00-05:00" and log["followUp"] is False
    assert (log["callerName"], log["callerPhone"]) == ("Ruth Adams", "+15551230001")
    assert log["subject"] == "Quo call (inbound, 3m25s)"
    assert [(t["type"], t["url"].rsplit("=", 1)[1]) for t in log["tags"]] == [
        ("lead", str(lead["id"]))
    ]
    with pytest.raises(ValueError, match="timezone"):
        api.create_call_log("x", "1", datetime(2026, 3, 1), "s", "n")


def test_call_log_is_read_and_patched(api: AxisCareApi, sandbox: AxisCareSandbox) -> None:
    client = walk(api, "clients", 500)[0]
    when = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    log = api.create_call_log(
        "Ruth", "+15551230001", when, "s", "n", tags=[("client", client["id"])]
    )
    assert api.get_call_log(log["id"]) == log
    patched = api.update_call_log(
        log["id"], subject="Missed call", notes="Call back", followUp=True
    )
    assert (patched["subject"], patched["notes"], patched["followUp"]) == (
        "Missed call",
        "Call back",
        True,
    )
    assert {k: patched[k] for k in ("callerName", "dateTime", "tags")} == {
        k: log[k] for k in ("callerName", "dateTime", "tags")
    }
    assert api.get_call_log(log["id"]) == patched == sandbox.call_logs()[-1]
    assert api.get_call_log(999_999) is None
    with pytest.raises(AxisCareApiError) as missing:
        api.update_call_log(999_999, subject="x")
    assert missing.value.status == 404 and "Call log was not found" in str(missing.value)
    with pytest.raises(ValueError, match="comments"):
        api.update_call_log(log["id"], comments=[{"comment": "c"}])


def test_errors_carry_status_and_never_the_token(sandbox: AxisCareSandbox) -> None:
    secret = "very-secret-token-123"
    with AxisCareApi(sandbox.url, secret) as api, pytest.raises(AxisCareApiError) as info:
        api.list_people("clients", 10)
    assert info.value.status == 401 and secret not in str(info.value)
    assert secret not in repr(info.value.args)
    with AxisCareApi(sandbox.url, TOKEN, api_version="2026-02-06") as api:
        with pytest.raises(AxisCareApiError, match="Unsupported version") as info:
            api.list_people("leads", 10)
        assert info.value.status == 400
    with AxisCareApi(sandbox.url, TOKEN) as api, pytest.raises(AxisCareApiError) as info:
        api.create_call_log("x", "1", datetime.now(UTC), "s", "n", tags=[("client", 999_999)])
    assert info.value.status == 400 and "not found" in info.value.message
    with AxisCareApi(sandbox.url, TOKEN) as api, pytest.raises(AxisCareApiError) as info:
        api.list_people("clients", 501)
    assert info.value.status == 400 and "limit" in info.value.message


def test_429_is_retried_through_the_throttle(sandbox: AxisCareSandbox, store: Store) -> None:
    governor = RecordingGovernor(store, TOKEN, 50, api="axiscare")
    sandbox.reset_stats()
    sandbox.inject_fault(429, count=2, retry_after="1")
    with AxisCareApi(sandbox.url, TOKEN, throttle=governor) as api:
        people, _ = api.list_people("clients", 5)
    stats = sandbox.stats()
    assert len(people) == 5
    assert stats["byStatus"] == {"200": 1, "429": 2}
    kinds = [kind for kind, _, _ in governor.events]
    assert kinds == ["send", "429", "send", "429", "send"]
    assert [retry_after for kind, _, retry_after in governor.events if kind == "429"] == [1, 1]
    assert_every_429_was_waited_out(governor.events)
    # The 429s did not push the key's schedule: its next slot is one interval after the last
    # request's, which only waited for its own Retry-After.
    next_at, slowdown = store.update_governor(
        governor_key(TOKEN, "axiscare"), lambda s: (s, (s.next_at, s.slowdown))
    )
    last_send = governor.events[-1][1]
    assert slowdown == 1.0 and next_at <= last_send + 1 / 50 + 0.005


def test_real_rate_limit_is_survived(tmp_path: Path, store: Store) -> None:
    # 2 tokens refilled at 2/s: the 8 requests of the walk, let go at up to 40/s, cannot all
    # pass unless the machine takes 3 s to send them.
    with AxisCareSandbox(tmp_path, records=200, rate_limit=2) as sb:
        governor = RecordingGovernor(store, TOKEN, 40, api="axiscare")
        with AxisCareApi(sb.url, TOKEN, throttle=governor) as api:
            people = walk(api, "clients", 10)
        stats = sb.stats()
    assert len(people) == stats["people"]["clients"] == 80
    assert stats["rateLimited"] >= 1 and stats["byStatus"]["200"] == 8
    assert stats["rateLimited"] == sum(1 for kind, _, _ in governor.events if kind == "429")
    assert_every_429_was_waited_out(governor.events)


def test_persistent_5xx_is_unavailable(api: AxisCareApi, sandbox: AxisCareSandbox) -> None:
    sandbox.inject_fault(503, count=2)
    flaky = AxisCareApi(sandbox.url, TOKEN, max_attempts=2)
    with flaky, pytest.raises(AxisCareUnavailable, match="Injected sandbox fault") as info:
        flaky.list_people("leads", 10)
    assert TOKEN not in str(info.value)
    assert api.list_people("leads", 3)[0]  # the next request is served again
