"""The pure domain: process state machine, page counters, metrics, phones, contacts, rate policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from quo_sync_dagster.core import ratelimit
from quo_sync_dagster.core.metrics import summarize
from quo_sync_dagster.core.models import (
    CustomFieldValue,
    InvalidRecord,
    LabeledValue,
    QuoContact,
)
from quo_sync_dagster.core.phones import to_e164
from quo_sync_dagster.core.process import (
    COUNTER_NAMES,
    ErrorDetail,
    IllegalTransition,
    PageResult,
    Process,
    ProcessState,
    check_transition,
)
from quo_sync_dagster.core.ratelimit import GovernorState, reserve, retry_at
from quo_sync_dagster.core.recovery import REQUESTED, RetryPolicy, Step, decide

S = ProcessState
CHAIN = [
    S.INITIALIZING,
    S.FETCHING_TOTAL,
    S.QUEUING_PAGES,
    S.PROCESSING_BATCHES,
    S.COMPLETING,
    S.COMPLETED,
]
LIVE = [s for s in S if s not in (S.COMPLETED, S.ERROR)]
LEGAL = {
    *itertools.pairwise(CHAIN),
    *((s, S.ERROR) for s in LIVE),
    (S.ERROR, S.PROCESSING_BATCHES),
}


# ---- process state machine -----------------------------------------------------------------
@pytest.mark.parametrize(("current", "new"), sorted(LEGAL))
def test_legal_transitions_pass(current: ProcessState, new: ProcessState) -> None:
    check_transition(current, new)


def test_whole_chain_walks_to_completed() -> None:
    state = S.INITIALIZING
    for nxt in CHAIN[1:]:
        check_transition(state, nxt)
        state = nxt
    assert state is S.COMPLETED


@pytest.mark.parametrize(
    ("current", "new"),
    [(a, b) for a in S for b in S if (a, b) not in LEGAL],
)
def test_illegal_transitions_raise_naming_both_states(
    current: ProcessState, new: ProcessState
) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(current, new)
    assert str(current) in str(info.value) and str(new) in str(info.value)


def test_completed_is_terminal() -> None:
    for new in S:
        with pytest.raises(IllegalTransition):
            check_transition(S.COMPLETED, new)


def test_error_only_resumes_processing() -> None:
    check_transition(S.ERROR, S.PROCESSING_BATCHES)
    for new in set(S) - {S.PROCESSING_BATCHES}:
        with pytest.raises(IllegalTransition):
            check_transition(S.ERROR, new)


# ---- page counters -------------------------------------------------------------------------
def test_counter_values_of_ok_page() -> None:
    page = PageResult(records=10, synced=8, failed=2, created=5, updated=2, unchanged=1)
    values = page.counter_values()
    assert set(values) == set(COUNTER_NAMES)
    assert values["processed"] == page.records
    assert (values["synced"], values["failed"]) == (page.synced, page.failed)
    assert (values["created"], values["updated"], values["unchanged"]) == (5, 2, 1)
    assert (values["pages_processed"], values["pages_failed"]) == (1, 0)


def test_counter_values_of_failed_page() -> None:
    error = ErrorDetail(None, "page failed: boom", "2026-01-01T00:00:00+00:00", "p3")
    values = PageResult(records=10, synced=0, failed=0, ok=False, errors=(error,)).counter_values()
    assert values["processed"] == 0  # its records will be processed by the re-run
    assert (values["pages_processed"], values["pages_failed"]) == (0, 1)
    assert values["synced"] == values["failed"] == values["created"] == 0


# ---- metrics -------------------------------------------------------------------------------
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _process(
    state: ProcessState = S.PROCESSING_BATCHES, total: int | None = 1000, **counters: int
) -> Process:
    context: dict = {"startTime": START.isoformat(), "totalPages": 5}
    if total is not None:
        context["totalRecords"] = total
    values = dict.fromkeys(COUNTER_NAMES, 0) | counters
    return Process("p-1", "int-1", "sync", "initial", state, context=context, counters=values)


def test_summarize_has_the_seed_result_shape() -> None:
    process = _process(processed=7, synced=6, failed=1, created=4, updated=1, unchanged=1)
    process.counters["pages_processed"], process.counters["pages_failed"] = 2, 1
    error = ErrorDetail("st-1", "no phone number", "2026-03-01T12:00:01+00:00", "page-0")
    out = summarize(process, [error], now=START + timedelta(seconds=10))
    assert out["processId"] == "p-1" and out["state"] == "PROCESSING_BATCHES"
    assert (out["totalRecords"], out["processedRecords"]) == (1000, 7)
    agg = out["aggregateData"]
    assert (agg["totalSynced"], agg["totalFailed"], agg["created"]) == (6, 1, 4)
    assert (agg["updated"], agg["skippedUnchanged"]) == (1, 1)
    assert agg["duration"] == 10_000
    assert agg["errors"] == [
        {"contactId": "st-1", "error": "no phone number", "timestamp": error.timestamp,
         "page": "page-0"}
    ]  # fmt: skip
    assert out["pages"] == {"totalPages": 5, "processedPages": 2, "failedPages": 1}


@pytest.mark.parametrize(("processed", "seconds"), [(250, 50), (1, 3), (999, 7)])
def test_rate_and_eta_come_from_throughput(processed: int, seconds: int) -> None:
    now = START + timedelta(seconds=seconds)
    out = summarize(_process(processed=processed), [], now=now)
    rate = processed / seconds
    assert out["aggregateData"]["recordsPerSecond"] == round(rate, 3)
    eta = datetime.fromisoformat(out["estimatedCompletion"])
    expected = now + timedelta(seconds=(1000 - processed) / rate)
    assert abs((eta - expected).total_seconds()) < 1e-3
    assert eta > now


def test_ended_at_fixes_the_elapsed_time() -> None:
    out = summarize(
        _process(S.COMPLETED, processed=100),
        [],
        now=START + timedelta(hours=1),
        ended_at=START + timedelta(seconds=20),
    )
    assert out["aggregateData"]["duration"] == 20_000
    assert out["aggregateData"]["recordsPerSecond"] == 5.0


@pytest.mark.parametrize("state", [S.COMPLETED, S.ERROR])
def test_no_eta_once_terminal(state: ProcessState) -> None:
    out = summarize(_process(state, processed=500), [], now=START + timedelta(seconds=10))
    assert out["estimatedCompletion"] is None


def test_no_eta_before_progress_or_without_total() -> None:
    later = START + timedelta(seconds=10)
    assert summarize(_process(processed=0), [], now=later)["estimatedCompletion"] is None
    no_total = summarize(_process(total=None, processed=5), [], now=later)
    assert no_total["estimatedCompletion"] is None and no_total["totalRecords"] is None


# ---- phones --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw", ["(212) 555-0123", "212.555.0123", "212-555-0123", "2125550123", "+1 212 555 0123",
            "1 (212) 555-0123", "  212 555 0123 "]
)  # fmt: skip
def test_us_formats_normalise_to_one_e164(raw: str) -> None:
    assert to_e164(raw) == "+12125550123"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("+44 20 7946 0018", "+442079460018"), ("+49 30 901820", "+4930901820")],
)
def test_international_numbers_keep_their_country(raw: str, expected: str) -> None:
    assert to_e164(raw) == expected
    assert to_e164(raw, "GB") == expected


def test_default_region_reads_national_numbers() -> None:
    assert to_e164("020 7946 0018", "GB") == "+442079460018"
    with pytest.raises(InvalidRecord):  # not a valid US number
        to_e164("020 7946 0018", "US")


@pytest.mark.parametrize("raw", ["555-01", "12", "abc", "", "+1 000 000 0000", "not a phone"])
def test_invalid_numbers_raise_naming_the_input(raw: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        to_e164(raw)
    assert repr(raw) in str(info.value)


# ---- QuoContact ----------------------------------------------------------------------------
def _contact(**overrides: object) -> QuoContact:
    fields: dict = {
        "external_id": "crm-1",
        "source": "acme-crm",
        "first_name": "Zoë",
        "last_name": "Müller",
        "company": "Acme",
        "role": "Buyer",
        "emails": (LabeledValue("email", "a@example.com"), LabeledValue("work", "b@example.com")),
        "phone_numbers": (
            LabeledValue("mobile", "+12125550123"),
            LabeledValue("work", "+442079460018"),
        ),
        "custom_fields": (CustomFieldValue("vip", True),),
        "source_url": "https://crm.example.com/people/1",
    }
    return QuoContact(**(fields | overrides))


@pytest.mark.parametrize("external_id", ["", "x" * 76])
def test_external_id_length_is_checked(external_id: str) -> None:
    with pytest.raises(InvalidRecord, match="externalId"):
        _contact(external_id=external_id)
    assert _contact(external_id="x" * 75).external_id == "x" * 75


@pytest.mark.parametrize(
    "source",
    ["openphone", "device", "csv", "zapier", "google-people", "other", "openphone-sync", "csv2",
     "", "s" * 73],
)  # fmt: skip
def test_reserved_or_bad_sources_are_rejected(source: str) -> None:
    with pytest.raises(InvalidRecord, match="source"):
        _contact(source=source)


def test_allowed_sources_pass() -> None:
    for source in ("public-api", "scalingtest", "s" * 72, "my-csv"):
        assert _contact(source=source).source == source


@pytest.mark.parametrize(
    "url", ["", "https://e.com/" + "a" * 187, "e.com/x", "ftp://e.com/x", "https://e.com/a b"]
)
def test_a_source_url_quo_cannot_take_is_dropped_not_the_contact(url: str) -> None:
    assert _contact(source_url=url).source_url is None
    assert _contact(source_url="https://e.com/" + "a" * 186).source_url is not None


def test_api_body_carries_all_default_fields_and_full_lists() -> None:
    contact = _contact()
    body = contact.to_api_body()
    assert (body["externalId"], body["source"]) == (contact.external_id, contact.source)
    assert body["sourceUrl"] == contact.source_url
    fields = body["defaultFields"]
    assert set(fields) == {"firstName", "lastName", "company", "role", "emails", "phoneNumbers"}
    assert (fields["firstName"], fields["lastName"]) == ("Zoë", "Müller")
    assert (fields["company"], fields["role"]) == ("Acme", "Buyer")
    assert fields["emails"] == [{"name": e.name, "value": e.value} for e in contact.emails]
    assert fields["phoneNumbers"] == [
        {"name": p.name, "value": p.value} for p in contact.phone_numbers
    ]
    assert body["customFields"] == [{"key": "vip", "value": True}]


def test_api_body_keeps_empty_fields_explicit() -> None:
    contact = QuoContact("crm-2", "acme-crm", "Ana")
    body = contact.to_api_body()
    fields = body["defaultFields"]
    assert set(fields) == {"firstName", "lastName", "company", "role", "emails", "phoneNumbers"}
    assert fields["lastName"] is None and fields["company"] is None and fields["role"] is None
    assert fields["emails"] == [] and fields["phoneNumbers"] == []  # PATCH clears removed items
    assert body["customFields"] == [] and "sourceUrl" not in body


def test_content_hash_is_stable_for_equal_contacts() -> None:
    assert _contact().content_hash() == _contact().content_hash()
    assert len(_contact().content_hash()) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"external_id": "crm-9"},
        {"source": "other-crm"},
        {"first_name": "Zoe"},
        {"last_name": None},
        {"company": "Acme Inc"},
        {"role": None},
        {"emails": (LabeledValue("email", "a@example.com"),)},
        {"emails": (LabeledValue("work", "b@example.com"), LabeledValue("email", "a@example.com"))},
        {"phone_numbers": (LabeledValue("work", "+442079460018"),
                           LabeledValue("mobile", "+12125550123"))},
        {"phone_numbers": (LabeledValue("home", "+12125550123"),
                           LabeledValue("work", "+442079460018"))},
        {"custom_fields": (CustomFieldValue("vip", False),)},
        {"custom_fields": ()},
        {"source_url": None},
    ],
)  # fmt: skip
def test_content_hash_changes_with_any_field(change: dict) -> None:
    base = _contact()
    changed = replace(base, **change)
    assert changed != base
    assert changed.content_hash() != base.content_hash()


# ---- rate policy ---------------------------------------------------------------------------
def test_reserve_spaces_slots_by_interval() -> None:
    state, now, interval = GovernorState(), 1000.0, 0.1
    slots = []
    for _ in range(5):
        state, send_at = reserve(state, now, interval)
        slots.append(send_at)
    assert slots[0] == now
    assert all(b - a == pytest.approx(interval) for a, b in itertools.pairwise(slots))
    assert state.next_at == pytest.approx(slots[-1] + interval)


def test_reserve_after_idle_sends_now() -> None:
    state, _ = reserve(GovernorState(), 1000.0, 0.1)
    later = 1005.0
    _, send_at = reserve(state, later, 0.1)
    assert send_at == later


@dataclass(frozen=True)
class _Send:
    at: float  # when the attempt was sent (its slot)
    request: int
    rejected: bool  # answered 429
    seen_at: float  # when its answer came back


def _simulate(
    requests: int,
    workers: int,
    interval: float,
    rejected: Callable[[int, int, int], bool],
    retry_after: float | None = 1.0,
    latency: float = 0.01,
) -> list[_Send]:
    """`workers` callers sharing one schedule, as GovernedHttp and RateGovernor use it: each
    takes a slot (reserve), sends, and `latency` later has its answer. `rejected(k, request,
    attempt)` says whether the k-th attempt sent (the request's attempt-th) is answered 429.
    A 429'd request takes a new slot once retry_at has passed; a caller whose request
    succeeded takes the next request at once. Attempts are handled in the order their
    callers ask for a slot, as the store would."""
    queue = iter(range(requests))
    ready = dict.fromkeys(range(workers), 0.0)  # worker -> when it next asks for a slot
    current: dict[int, int] = {}  # worker -> the request it is sending
    attempts: dict[int, int] = {}  # request -> attempts sent
    state, sends = GovernorState(), []
    while ready:
        worker = min(ready, key=lambda w: (ready[w], w))
        if worker not in current:
            request = next(queue, None)
            if request is None:
                del ready[worker]
                continue
            current[worker] = request
        state, send_at = reserve(state, ready[worker], interval)
        request = current[worker]
        attempt = attempts[request] = attempts.get(request, 0) + 1
        send = _Send(send_at, request, rejected(len(sends), request, attempt), send_at + latency)
        sends.append(send)
        if send.rejected:
            ready[worker] = retry_at(send.seen_at, retry_after)
        else:
            ready[worker] = send.seen_at
            del current[worker]
    return sends


def _gaps(sends: list[_Send]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(sends)]


def test_retry_at_is_the_requests_own_retry_after() -> None:
    assert retry_at(1000.0, 5.0) == 1005.0
    assert retry_at(1000.0, 0.0) == 1000.0
    assert retry_at(1000.0, -3.0) == 1000.0  # a date in the past: at once
    assert retry_at(1000.0, None) == 1000.0 + ratelimit.DEFAULT_RETRY_AFTER == 1001.0


@pytest.mark.parametrize("retry_after", [None, 0.0, 1.0, 2.5])
@pytest.mark.parametrize("n_429s", [1, 3])
def test_a_429_costs_the_key_only_the_slot_it_used(n_429s: int, retry_after: float | None) -> None:
    """Request 0's first n attempts are refused: each retry waits its own Retry-After, while
    the other callers keep every slot of the schedule, 1/rate apart."""
    interval = 0.1
    sends = _simulate(200, 3, interval, lambda _, r, a: r == 0 and a <= n_429s, retry_after)
    request_0 = [s for s in sends if s.request == 0]
    assert [s.rejected for s in request_0] == [True] * n_429s + [False]
    for refused, retry in itertools.pairwise(request_0):
        assert retry.at >= retry_at(refused.seen_at, retry_after)
    # No slot was lost or paused: the sends, 429s included, are exactly 1/rate apart...
    assert _gaps(sends) == pytest.approx([interval] * (len(sends) - 1))
    # ...so while request 0 waited, the others had every slot but those of its retries.
    waited = request_0[-1].at - request_0[0].at
    others = [s for s in sends if request_0[0].at < s.at < request_0[-1].at and s.request != 0]
    assert len(others) == round(waited / interval) - 1 - (n_429s - 1)


def test_random_429s_keep_the_schedule_at_the_limit_and_never_above() -> None:
    """1 attempt in 5 refused at random with Retry-After 1 s, 8 callers at 20 req/s."""
    rng = random.Random(429)
    refused = {k for k in range(5000) if rng.random() < 0.2}
    interval, retry_after = 0.05, 1.0
    sends = _simulate(800, 8, interval, lambda k, _, __: k in refused, retry_after, latency=0.02)
    assert 0.15 < sum(s.rejected for s in sends) / len(sends) < 0.25
    assert min(_gaps(sends)) >= interval - 1e-9  # never faster than the limit
    by_request: dict[int, list[_Send]] = {}
    for send in sends:
        by_request.setdefault(send.request, []).append(send)
    for attempts in by_request.values():
        assert [s.rejected for s in attempts] == [True] * (len(attempts) - 1) + [False]
        for refused_attempt, retry in itertools.pairwise(attempts):
            assert retry.at >= refused_attempt.seen_at + retry_after
    # A key-wide pause per 429 would take ~(0.8 * interval + 0.2 * retry_after) per attempt,
    # ~0.16 of the limit; per request, the schedule stays (nearly) full.
    rate = (len(sends) - 1) / (sends[-1].at - sends[0].at)
    assert rate >= 0.9 / interval


def test_once_the_429s_stop_the_rate_is_the_configured_one() -> None:
    interval = 0.05
    rng = random.Random(7)
    refused = {k for k in range(100) if rng.random() < 0.5}  # a burst, then no more 429s
    sends = _simulate(400, 8, interval, lambda k, _, __: k in refused, 1.0, latency=0.02)
    last_429 = max(s.seen_at for s in sends if s.rejected)
    after = [s for s in sends if s.at > last_429 + 1.0]  # every retry of the burst is due
    assert len(after) > 100
    assert _gaps(after) == pytest.approx([interval] * (len(after) - 1))


def test_reserve_keeps_spacing_slots_from_a_busy_schedule() -> None:
    """A retry asks for a slot when its Retry-After has passed and queues behind the slots
    already granted: it is never sent before them, nor are they pushed back for it."""
    state = GovernorState(next_at=1001.3)
    state, send_at = reserve(state, 1001.0, 0.1)
    assert send_at == 1001.3 and state.next_at == pytest.approx(1001.4)


def test_a_slowdown_stored_by_an_older_version_is_ignored_and_reset() -> None:
    state = GovernorState(next_at=1000.0, slowdown=4.0)
    slots = []
    for _ in range(5):
        state, send_at = reserve(state, 1000.0, 0.1)
        slots.append(send_at)
        assert state.slowdown == 1.0
    assert [b - a for a, b in itertools.pairwise(slots)] == pytest.approx([0.1] * 4)


def test_recovery_waits_a_backoff_retries_gives_up_and_obeys_a_requested_retry() -> None:
    policy, now = RetryPolicy(attempts=1, backoff_seconds=30), datetime(2026, 1, 1, tzinfo=UTC)
    first = decide(None, policy, now)
    assert first.step is Step.WAIT  # the backoff counts from the stall
    assert decide(first.state, policy, now + timedelta(seconds=29)).step is Step.WAIT
    retry = decide(first.state, policy, now + timedelta(seconds=30))
    assert (retry.step, retry.state["attempt"]) == (Step.RETRY, 1)
    exhausted = decide(retry.state, policy, now + timedelta(hours=1))
    assert exhausted.step is Step.GIVE_UP
    # An operator's retry runs at once, with the automatic attempts counted afresh after it.
    requested = decide(dict(REQUESTED), policy, now)
    assert (requested.step, requested.attempt, requested.state["attempt"]) == (Step.RETRY, 0, 1)
    assert "requested" not in requested.state
