"""One contract for every Store adapter: SQLite, mongomock and (with QUO_SYNC_MONGO_URI) MongoDB.

The concurrency tests run real processes against SQLite and MongoDB; mongomock lives in one
interpreter, so there the same jobs run on threads.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import queue
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import pytest
from mongomock.collection import Cursor

from quo_sync_dagster.core.models import ContactLink, Integration
from quo_sync_dagster.core.process import (
    COUNTER_NAMES,
    MAX_ERROR_CHARS,
    ErrorDetail,
    IllegalTransition,
    PageResult,
    Process,
    ProcessState,
)
from quo_sync_dagster.core.ratelimit import GovernorState, reserve
from quo_sync_dagster.store import NotFound, Store, open_store
from quo_sync_dagster.store import mongo as mongo_store
from quo_sync_dagster.store import sqlite as sqlite_store
from quo_sync_dagster.store.mongo import MongoStore
from quo_sync_dagster.store.port import ActivityRecord, AlreadyRunning, InboxItem
from quo_sync_dagster.store.sqlite import SqliteStore

MONGO_URI = os.environ.get("QUO_SYNC_MONGO_URI")
WORKERS = 8
S = ProcessState


@dataclass
class Backend:
    store: Store
    # Opens another handle on the same data in a spawned process; None: share `store` on threads.
    opener: Callable[[], Store] | None


class AtomicMongomock:
    """A mongomock client, database or collection whose calls run one at a time.

    A server applies each single-document operation atomically; mongomock runs one as several
    Python steps that threads interleave (a filtered find_one_and_update can even update a
    document that no longer matches). Serialising calls restores the server's guarantee, so the
    thread tests check the adapter's logic, not mongomock's.
    """

    def __init__(self, target: Any, lock: threading.Lock) -> None:
        self._target, self._lock = target, lock

    def __getitem__(self, name: str) -> AtomicMongomock:
        return AtomicMongomock(self._target[name], self._lock)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                result = method(*args, **kwargs)
                # A cursor evaluates lazily: read it while the lock is held.
                return iter(list(result)) if isinstance(result, Cursor) else result

        return call


@pytest.fixture(
    params=[
        "sqlite",
        "mongomock",
        pytest.param(
            "mongodb",
            marks=pytest.mark.skipif(not MONGO_URI, reason="QUO_SYNC_MONGO_URI is not set"),
        ),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'nested' / 'store.sqlite'}"
        backend = Backend(open_store(uri), partial(open_store, uri))
    elif request.param == "mongomock":
        backend = Backend(
            MongoStore(AtomicMongomock(mongomock.MongoClient(), threading.Lock())), None
        )
    else:
        database = f"quo_sync_test_{uuid.uuid4().hex}"
        backend = Backend(
            MongoStore.from_uri(MONGO_URI, database),
            partial(MongoStore.from_uri, MONGO_URI, database),
        )
    yield backend
    backend.store.close()
    if request.param == "mongodb":
        with pymongo.MongoClient(MONGO_URI) as client:
            client.drop_database(database)


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


def integration(integration_id: str = "int-1", crm: str = "hubspot") -> Integration:
    return Integration(
        id=integration_id,
        crm=crm,
        quo_api_key_ref="env:QUO_KEY",
        crm_credential_ref="aws-sm:crm/secret",
        settings={"pageSize": 50, "fields": ["email", "phone"]},
    )


def new_process(
    store: Store, process_id: str, exclusive_key: str | None = None, **kwargs: Any
) -> Process:
    fields = {"integration_id": "int-1", "name": "sync", "type": "SYNC", "state": S.INITIALIZING}
    return store.create_process(Process(id=process_id, **(fields | kwargs)), exclusive_key)


def error(n: int, page: str = "p1") -> ErrorDetail:
    return ErrorDetail(external_id=f"ext-{n}", error=f"bad {n}", timestamp=f"t{n}", page=page)


# ---- integrations ---------------------------------------------------------------------------
def test_integration_round_trip_and_not_found(store: Store) -> None:
    first, other = integration(), integration("int-2", crm="salesforce")
    store.upsert_integration(first)
    store.upsert_integration(other)
    assert store.get_integration("int-1") == first
    changed = replace(first, default_region="GB", settings={"pageSize": 10})
    store.upsert_integration(changed)
    assert store.get_integration("int-1") == changed
    assert store.list_integrations() == [changed, other]
    assert store.list_integrations(crm="salesforce") == [other]
    assert store.list_integrations(crm="pipedrive") == []
    with pytest.raises(NotFound, match="int-missing"):
        store.get_integration("int-missing")


def test_deleting_an_integration_keeps_its_links_and_other_integrations(store: Store) -> None:
    store.upsert_integration(integration())
    store.upsert_integration(integration("int-2"))
    for iid in ("int-1", "int-2"):
        store.put_contact_links(iid, {"e1": ContactLink("q1", "h1")})
        store.put_webhook_subscription(iid, {"crm": "pipedrive"})
        store.set_watermark(iid, "Person", "2026-01-01T00:00:00+00:00")
        store.put_tombstones(iid, ["e9"])
        store.enqueue_webhook(iid, "ev-1", {"n": 1})
    store.delete_integration("int-1")
    store.delete_integration("int-unknown")  # a no-op
    with pytest.raises(NotFound):
        store.get_integration("int-1")
    assert store.get_webhook_subscription("int-1") is None
    assert store.get_watermark("int-1", "Person") is None
    assert store.get_tombstones("int-1", ["e9"]) == set()
    assert store.claim_webhooks("int-1", 10) == []
    assert store.get_contact_links("int-1", ["e1"]) == {"e1": ContactLink("q1", "h1")}
    # The other integration keeps everything.
    assert store.get_integration("int-2").id == "int-2"
    assert store.get_webhook_subscription("int-2") == {"crm": "pipedrive"}
    assert store.get_tombstones("int-2", ["e9"]) == {"e9"}
    assert len(store.claim_webhooks("int-2", 10)) == 1


# ---- processes ------------------------------------------------------------------------------
def test_create_get_and_timestamps(store: Store) -> None:
    created = new_process(store, "p-1", context={"crm": "hubspot", "total": 3})
    assert created.created_at is not None and created.updated_at is not None
    assert created.created_at.utcoffset() == timedelta(0)
    assert created.created_at == created.updated_at
    assert created.counters == dict.fromkeys(COUNTER_NAMES, 0)
    assert store.get_process("p-1") == created
    assert created.context == {"crm": "hubspot", "total": 3}
    with pytest.raises(NotFound, match="p-missing"):
        store.get_process("p-missing")
    with pytest.raises(ValueError, match="p-1"):
        new_process(store, "p-1")


def test_list_processes_filters_oldest_first(store: Store) -> None:
    new_process(store, "a", context={"crm": "hubspot"})
    new_process(store, "b", integration_id="int-2", context={"crm": "salesforce"})
    new_process(store, "c", context={"crm": "salesforce"})
    store.transition("c", S.ERROR)

    def ids(**filters: Any) -> list[str]:
        return [p.id for p in store.list_processes(**filters)]

    assert ids() == ["a", "b", "c"]
    assert ids(integration_id="int-1") == ["a", "c"]
    assert ids(states=[S.ERROR]) == ["c"]
    assert ids(states=[S.INITIALIZING, S.ERROR]) == ["a", "b", "c"]
    assert ids(states=[]) == []
    assert ids(crm="salesforce") == ["b", "c"]
    assert ids(integration_id="int-1", crm="salesforce", states=[S.ERROR]) == ["c"]


def test_parent_children_linkage(store: Store) -> None:
    new_process(store, "parent")
    new_process(store, "child-1", parent_id="parent")
    new_process(store, "child-2", parent_id="parent")
    assert store.get_process("parent").children == ["child-1", "child-2"]
    assert store.get_process("child-2").parent_id == "parent"
    with pytest.raises(NotFound, match="no-parent"):
        new_process(store, "orphan", parent_id="no-parent")
    assert [p.id for p in store.list_processes()] == ["parent", "child-1", "child-2"]


def test_transitions_legal_illegal_and_context_merge(store: Store) -> None:
    created = new_process(store, "p", context={"crm": "hubspot", "keep": 1})
    fetched = store.transition("p", S.FETCHING_TOTAL, {"total": 10, "keep": 2})
    assert fetched.state is S.FETCHING_TOTAL
    assert fetched.context == {"crm": "hubspot", "keep": 2, "total": 10}
    assert fetched.updated_at is not None and created.updated_at is not None
    assert fetched.updated_at > created.updated_at
    assert fetched.created_at == created.created_at

    with pytest.raises(IllegalTransition):
        store.transition("p", S.COMPLETED, {"total": 99})
    assert store.get_process("p") == fetched  # neither state nor context changed

    for state in (S.QUEUING_PAGES, S.PROCESSING_BATCHES, S.ERROR, S.PROCESSING_BATCHES):
        assert store.transition("p", state).state is state
    store.transition("p", S.COMPLETING)
    done = store.transition("p", S.COMPLETED)
    for state in (S.ERROR, S.PROCESSING_BATCHES):
        with pytest.raises(IllegalTransition):
            store.transition("p", state)
    assert store.get_process("p") == done
    with pytest.raises(NotFound, match="p-missing"):
        store.transition("p-missing", S.ERROR)


def test_update_context_merges_top_level(store: Store) -> None:
    new_process(store, "p", context={"crm": "hubspot", "cursor": {"page": 1, "size": 50}})
    updated = store.update_context("p", {"cursor": {"page": 2}, "total": 7})
    assert updated.context == {"crm": "hubspot", "cursor": {"page": 2}, "total": 7}
    assert store.get_process("p").context == updated.context
    assert updated.state is S.INITIALIZING
    with pytest.raises(NotFound, match="p-missing"):
        store.update_context("p-missing", {"x": 1})


def test_exclusive_key_allows_one_live_process(store: Store) -> None:
    new_process(store, "first", exclusive_key="initial:int-1:Person")
    with pytest.raises(AlreadyRunning, match=r"'first' .* 'initial:int-1:Person'") as raised:
        new_process(store, "second", exclusive_key="initial:int-1:Person")
    assert raised.value.process_id == "first"
    with pytest.raises(NotFound):
        store.get_process("second")  # a refused Process is not stored
    new_process(store, "other-key", exclusive_key="initial:int-1:Lead")
    new_process(store, "no-key")

    # Refused for other reasons, a creation does not take the key either.
    store.transition("first", S.ERROR)
    with pytest.raises(ValueError, match="other-key"):
        new_process(store, "other-key", exclusive_key="initial:int-1:Person")
    with pytest.raises(NotFound, match="no-parent"):
        new_process(store, "orphan", parent_id="no-parent", exclusive_key="initial:int-1:Person")

    # The holder ended (ERROR, then COMPLETED): the key is free again.
    new_process(store, "third", exclusive_key="initial:int-1:Person")
    with pytest.raises(AlreadyRunning, match="'third'"):
        new_process(store, "fourth", exclusive_key="initial:int-1:Person")
    for state in (S.FETCHING_TOTAL, S.QUEUING_PAGES, S.PROCESSING_BATCHES, S.COMPLETING):
        store.transition("third", state)
        with pytest.raises(AlreadyRunning, match="'third'"):
            new_process(store, "fourth", exclusive_key="initial:int-1:Person")
    store.transition("third", S.COMPLETED)
    assert new_process(store, "fourth", exclusive_key="initial:int-1:Person").id == "fourth"
    assert [p.id for p in store.list_processes()] == [
        "first",
        "other-key",
        "no-key",
        "third",
        "fourth",
    ]


def test_increment_counters(store: Store) -> None:
    new_process(store, "p")
    store.increment_counters("p", {"synced": 3, "failed": 1})
    store.increment_counters("p", {"synced": 2, "pages_processed": 1})
    store.increment_counters("p", {})
    counters = store.get_process("p").counters
    assert counters == dict.fromkeys(COUNTER_NAMES, 0) | {
        "synced": 5,
        "failed": 1,
        "pages_processed": 1,
    }
    with pytest.raises(ValueError, match="bogus"):
        store.increment_counters("p", {"bogus": 1})
    with pytest.raises(NotFound, match="p-missing"):
        store.increment_counters("p-missing", {"synced": 1})


# ---- pages and errors -----------------------------------------------------------------------
def test_record_page_is_idempotent_per_page(store: Store) -> None:
    new_process(store, "p")
    first = PageResult(
        records=10, synced=8, failed=2, created=5, updated=3, errors=(error(1), error(2))
    )
    store.record_page("p", "p1", first)
    store.record_page("p", "p1", first)
    assert store.get_process("p").counters == first.counter_values()
    assert store.recent_errors("p") == [error(1), error(2)]

    rerun = PageResult(records=10, synced=10, failed=0, unchanged=10, errors=(error(3),))
    store.record_page("p", "p1", rerun)
    other = PageResult(records=0, synced=0, failed=0, ok=False, errors=(error(4, "p2"),))
    store.record_page("p", "p2", other)

    expected = {
        name: rerun.counter_values()[name] + other.counter_values()[name] for name in COUNTER_NAMES
    }
    assert store.get_process("p").counters == expected
    assert store.recent_errors("p") == [error(3), error(4, "p2")]
    assert store.page_results("p") == {
        "p1": replace(rerun, errors=()),
        "p2": replace(other, errors=()),
    }
    assert store.page_results("other") == {}
    with pytest.raises(NotFound, match="p-missing"):
        store.record_page("p-missing", "p1", first)
    assert store.page_results("p-missing") == {}


def test_skipped_counter_is_replaced_on_rerun(store: Store) -> None:
    new_process(store, "p")
    first = PageResult(records=10, synced=6, failed=1, created=6, skipped=3)
    store.record_page("p", "p1", first)
    store.record_page("p", "p2", PageResult(records=5, synced=5, failed=0, unchanged=3, skipped=2))
    assert store.get_process("p").counters["skipped"] == 5
    rerun = PageResult(records=10, synced=8, failed=1, unchanged=6, updated=2, skipped=1)
    store.record_page("p", "p1", rerun)
    store.record_page("p", "p1", rerun)
    counters = store.get_process("p").counters
    assert counters == dict.fromkeys(COUNTER_NAMES, 0) | {
        "processed": 15,
        "synced": 13,
        "failed": 1,
        "updated": 2,
        "unchanged": 9,
        "skipped": 3,
        "pages_processed": 2,
    }
    assert store.page_results("p")["p1"] == rerun
    assert store.page_results("p")["p2"].skipped == 2


def test_long_error_texts_are_stored_capped(store: Store) -> None:
    new_process(store, "p")
    huge = ErrorDetail(external_id="e" * 5000, error="x" * 75_000, timestamp="t", page="p1")
    store.record_page("p", "p1", PageResult(records=1, synced=0, failed=1, errors=(huge,)))
    [stored] = store.recent_errors("p")
    assert len(stored.error) == MAX_ERROR_CHARS
    assert stored.error.startswith("xxx") and stored.error.endswith("more characters]")
    assert stored.external_id is not None and len(stored.external_id) == 100


def test_recent_errors_keeps_last_100_in_order(store: Store) -> None:
    new_process(store, "p")
    new_process(store, "q")
    for page in range(13):  # 130 errors over 13 pages
        errors = tuple(error(page * 10 + i, f"page-{page}") for i in range(10))
        store.record_page(
            "p", f"page-{page}", PageResult(records=10, synced=0, failed=10, errors=errors)
        )
    store.record_page(
        "q", "page-0", PageResult(records=1, synced=0, failed=1, errors=(error(999),))
    )

    kept = store.recent_errors("p")
    assert [e.external_id for e in kept] == [f"ext-{n}" for n in range(30, 130)]
    assert store.recent_errors("p", limit=3) == kept[-3:]
    assert store.recent_errors("q") == [error(999)]

    # Re-running an old page replaces its errors and makes them the newest.
    store.record_page("p", "page-5", PageResult(records=10, synced=10, failed=0))
    store.record_page(
        "p", "page-12", PageResult(records=10, synced=9, failed=1, errors=(error(7),))
    )
    after = [e.external_id for e in store.recent_errors("p")]
    assert after == [f"ext-{n}" for n in range(30, 120) if not 50 <= n < 60] + ["ext-7"]


# ---- contact links ----------------------------------------------------------------------------
def test_contact_links_are_per_integration(store: Store) -> None:
    store.put_contact_links("int-1", {"e1": ContactLink("q1", "h1"), "e2": ContactLink("q2", "h2")})
    store.put_contact_links("int-2", {"e1": ContactLink("other", "hx")})
    assert store.get_contact_links("int-1", ["e1", "e2", "e3"]) == {
        "e1": ContactLink("q1", "h1"),
        "e2": ContactLink("q2", "h2"),
    }
    assert store.get_contact_links("int-2", ["e1", "e2"]) == {"e1": ContactLink("other", "hx")}

    store.put_contact_links("int-1", {"e1": ContactLink("q1", "h1-new")})
    assert store.get_contact_links("int-1", ["e1"]) == {"e1": ContactLink("q1", "h1-new")}
    assert store.count_contact_links("int-1") == 2
    assert store.count_contact_links("int-3") == 0

    store.delete_contact_links("int-1", ["e1", "missing"])
    assert store.get_contact_links("int-1", ["e1", "e2"]) == {"e2": ContactLink("q2", "h2")}
    assert store.get_contact_links("int-2", ["e1"]) == {"e1": ContactLink("other", "hx")}
    assert store.count_contact_links("int-1") == 1
    store.put_contact_links("int-1", {})
    assert store.get_contact_links("int-1", []) == {}


def test_contact_links_span_query_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks stand in for thousands of ids (mongomock matches `$in` in quadratic time).
    monkeypatch.setattr(sqlite_store, "_MAX_SQL_VARIABLES", 7)
    monkeypatch.setattr(mongo_store, "_MAX_IDS_PER_QUERY", 7)
    links = {f"e{i}": ContactLink(f"q{i}", f"h{i}") for i in range(30)}
    store.put_contact_links("int-1", links)
    assert store.get_contact_links("int-1", [*links, "nope", "e1"]) == links
    store.delete_contact_links("int-1", list(links)[:18])
    assert store.count_contact_links("int-1") == 12
    assert store.get_contact_links("int-1", links) == dict(list(links.items())[18:])


def test_iter_contact_links_pages_through_all(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_LINKS_PER_READ", 4)
    monkeypatch.setattr(mongo_store, "_LINKS_PER_READ", 4)
    assert list(store.iter_contact_links("int-1")) == []
    links = {f"e{i:02d}": ContactLink(f"q{i}", f"h{i}") for i in range(12)}  # 3 full pages
    store.put_contact_links("int-1", links)
    store.put_contact_links(
        "int-2", {"e05": ContactLink("other", "hx"), "zz": ContactLink("o", "")}
    )
    assert list(store.iter_contact_links("int-1")) == sorted(links.items())
    store.put_contact_links("int-1", {"e12": ContactLink("q12", "h12")})  # one past a full page
    assert [e for e, _ in store.iter_contact_links("int-1")] == [f"e{i:02d}" for i in range(13)]
    assert dict(store.iter_contact_links("int-2")) == {
        "e05": ContactLink("other", "hx"),
        "zz": ContactLink("o", ""),
    }


def test_rename_contact_links(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_MAX_SQL_VARIABLES", 3)
    monkeypatch.setattr(mongo_store, "_MAX_IDS_PER_QUERY", 3)
    store.put_contact_links("int-1", {f"{i}": ContactLink(f"q{i}", f"h{i}") for i in range(8)})
    store.put_contact_links("int-1", {"ns:5": ContactLink("stale", "old")})
    store.put_contact_links("int-2", {"1": ContactLink("other", "hx")})
    renames = {f"{i}": f"ns:{i}" for i in range(7)} | {"missing": "ns:missing", "7": "7"}
    assert store.rename_contact_links("int-1", renames) == 7
    assert dict(store.iter_contact_links("int-1")) == {
        "7": ContactLink("q7", "h7"),  # renamed to itself: untouched
        **{f"ns:{i}": ContactLink(f"q{i}", f"h{i}") for i in range(7)},  # ns:5 overwritten
    }
    assert dict(store.iter_contact_links("int-2")) == {"1": ContactLink("other", "hx")}
    assert store.rename_contact_links("int-1", renames) == 0  # nothing left at the old ids
    assert store.rename_contact_links("int-1", {}) == 0
    with pytest.raises(ValueError, match="ns:0"):
        store.rename_contact_links("int-1", {"7": "ns:0", "ns:0": "ns:00"})
    assert store.count_contact_links("int-1") == 8


# ---- governor --------------------------------------------------------------------------------
def test_update_governor_defaults_and_returns_value(store: Store) -> None:
    seen: list[GovernorState] = []

    def bump(state: GovernorState) -> tuple[GovernorState, float]:
        seen.append(state)
        return GovernorState(state.next_at + 1.5, state.slowdown * 2), state.next_at + 100

    assert store.update_governor("k1", bump) == 100.0
    assert seen[-1] == GovernorState()
    assert store.update_governor("k1", bump) == 101.5
    assert seen[-1] == GovernorState(1.5, 2.0)
    assert store.update_governor("k2", bump) == 100.0  # keys are independent
    assert seen[-1] == GovernorState()


# ---- webhook inbox ---------------------------------------------------------------------------
def test_webhook_inbox_dedup_claim_lease_ack(store: Store) -> None:
    assert store.enqueue_webhook("int-1", "ev-1", {"type": "message.received", "n": 1})
    assert not store.enqueue_webhook("int-1", "ev-1", {"type": "changed", "n": 99})
    assert store.enqueue_webhook("int-1", "ev-2", {"n": 2})
    assert store.enqueue_webhook("int-1", "ev-3", {"n": 3})
    assert store.enqueue_webhook("int-2", "ev-1", {"n": "other tenant"})

    first = store.claim_webhooks("int-1", limit=2, lease_seconds=0.2)
    assert [(i.event_id, i.payload, i.integration_id) for i in first] == [
        ("ev-1", {"type": "message.received", "n": 1}, "int-1"),
        ("ev-2", {"n": 2}, "int-1"),
    ]
    second = store.claim_webhooks("int-1", limit=10, lease_seconds=0.2)
    assert [i.event_id for i in second] == ["ev-3"]
    assert store.claim_webhooks("int-1", limit=10) == []

    store.ack_webhooks([first[0].id])
    time.sleep(0.25)
    redelivered = store.claim_webhooks("int-1", limit=10, lease_seconds=60)
    assert [i.event_id for i in redelivered] == ["ev-2", "ev-3"]
    assert [i.id for i in redelivered] == [first[1].id, second[0].id]
    store.ack_webhooks([i.id for i in redelivered])
    time.sleep(0.05)
    assert store.claim_webhooks("int-1", limit=10, lease_seconds=0) == []
    assert not store.enqueue_webhook("int-1", "ev-2", {})  # acked ids still deduplicate

    other = store.claim_webhooks("int-2", limit=10)
    assert [(i.event_id, i.payload) for i in other] == [("ev-1", {"n": "other tenant"})]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_inbox_items_carry_the_enqueue_time(store: Store) -> None:
    before = datetime.now(UTC)
    assert store.enqueue_webhook("int-1", "ev-1", {"n": 1})
    after = datetime.now(UTC)
    [item] = store.claim_webhooks("int-1", limit=10, lease_seconds=0)
    received = datetime.fromisoformat(item.received_at)
    assert received.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= received <= after + timedelta(milliseconds=1)
    assert not store.enqueue_webhook("int-1", "ev-1", {"n": "again"})  # keeps the first time
    assert store.get_webhooks([item.id]) == [item]
    assert store.claim_webhooks("int-1", limit=10) == [item]


def test_get_webhooks_returns_unacked_items_in_inbox_order(store: Store) -> None:
    for n in range(4):
        store.enqueue_webhook("int-1", f"ev-{n}", {"n": n})
    store.enqueue_webhook("int-2", "ev-x", {"n": "x"})
    items = [*store.claim_webhooks("int-1", limit=10, lease_seconds=0)]
    items += store.claim_webhooks("int-2", limit=10, lease_seconds=0)
    leased = store.claim_webhooks("int-1", limit=2, lease_seconds=300)
    assert leased == items[:2]

    # Leased or not, any integration, in inbox order whatever the order asked.
    asked = [items[4].id, items[3].id, items[0].id, "nope", "", "999999", items[1].id]
    assert store.get_webhooks(asked) == [items[0], items[1], items[3], items[4]]
    assert store.get_webhooks([]) == []
    # Reading is not claiming: the leased two stay leased, the others stay claimable.
    assert store.claim_webhooks("int-1", limit=10, lease_seconds=300) == items[2:4]

    store.ack_webhooks([items[0].id, items[3].id])
    assert store.get_webhooks([i.id for i in items]) == [items[1], items[2], items[4]]
    store.ack_webhooks([i.id for i in items])
    assert store.get_webhooks([i.id for i in items]) == []


def test_release_makes_unacked_items_claimable_at_once(store: Store) -> None:
    for n in range(3):
        store.enqueue_webhook("int-1", f"ev-{n}", {"n": n})
    first, second, _third = store.claim_webhooks("int-1", limit=10, lease_seconds=300)
    assert store.claim_webhooks("int-1", limit=10) == []
    assert store.pending_webhook_integrations() == []

    store.ack_webhooks([second.id])
    store.release_webhooks([first.id, second.id, "nope", "12345678901234567890123"])
    assert store.pending_webhook_integrations() == ["int-1"]
    assert store.claim_webhooks("int-1", limit=10, lease_seconds=300) == [first]  # not acked 2nd
    assert store.get_webhooks([second.id]) == []
    store.release_webhooks([])
    assert store.claim_webhooks("int-1", limit=10) == []  # `_third` is still leased


def test_pending_webhook_integrations_follow_leases_and_acks(store: Store) -> None:
    assert store.pending_webhook_integrations() == []
    for integration_id in ("int-b", "int-a", "int-c", "int-d"):
        store.enqueue_webhook(integration_id, "ev-1", {})
        store.enqueue_webhook(integration_id, "ev-2", {})
    assert store.pending_webhook_integrations() == ["int-a", "int-b", "int-c", "int-d"]

    store.claim_webhooks("int-a", limit=10, lease_seconds=300)
    [one_of_b] = store.claim_webhooks("int-b", limit=1, lease_seconds=300)
    store.ack_webhooks(i.id for i in store.claim_webhooks("int-d", limit=10))
    # int-a: all leased; int-b: one item still claimable; int-d: all acked.
    assert store.pending_webhook_integrations() == ["int-b", "int-c"]

    # A lease that runs out makes its items claimable again: redelivery.
    expiring = store.claim_webhooks("int-c", limit=10, lease_seconds=0.3)
    store.claim_webhooks("int-b", limit=10, lease_seconds=300)
    wait_for(lambda: store.pending_webhook_integrations() == ["int-c"])
    assert store.claim_webhooks("int-c", limit=10, lease_seconds=300) == expiring
    assert store.pending_webhook_integrations() == []
    store.release_webhooks([one_of_b.id])
    assert store.pending_webhook_integrations() == ["int-b"]


def test_the_webhook_backlog_counts_unacknowledged_items_leased_or_not(store: Store) -> None:
    assert store.webhook_backlog("int-1") == 0
    for n in range(4):
        store.enqueue_webhook("int-1", f"ev-{n}", {})
    store.enqueue_webhook("int-2", "ev-0", {})
    first, second = store.claim_webhooks("int-1", limit=2)
    assert store.webhook_backlog("int-1") == 4  # claimed is not done
    store.ack_webhooks([first.id])
    assert store.webhook_backlog("int-1") == 3
    store.ack_webhooks([first.id, second.id])
    assert (store.webhook_backlog("int-1"), store.webhook_backlog("int-2")) == (2, 1)


def _claim_all_job(store: Store, index: int, integration_id: str) -> list[str]:
    claimed: list[str] = []
    while batch := store.claim_webhooks(integration_id, limit=3, lease_seconds=600):
        claimed += [item.event_id for item in batch]
    return claimed


def _assert_each_claimed_once(claims: list[list[str]], events: list[str]) -> None:
    flat = [event for claimed in claims for event in claimed]
    assert sorted(flat) == sorted(events)  # none lost, none handed out twice
    for claimed in claims:
        assert claimed == sorted(claimed, key=events.index)  # each claimer sees inbox order


def test_concurrent_claims_hand_out_each_item_once(backend: Backend) -> None:
    events = [f"ev-{n:03d}" for n in range(150)]
    for event in events:
        backend.store.enqueue_webhook("int-1", event, {"event": event})
    claims = run_concurrently(backend, partial(_claim_all_job, integration_id="int-1"))
    _assert_each_claimed_once(claims, events)


def test_sqlite_threads_sharing_one_store_claim_each_item_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    events = [f"ev-{n:03d}" for n in range(300)]
    for event in events:
        store.enqueue_webhook("int-1", event, {"event": event})
    # Both threads call claim_webhooks together in every round (SQLite's busy wait would let one
    # thread take every batch otherwise); a few spare rounds find the inbox empty.
    rounds = len(events) // (2 * 3) + 3
    barrier = threading.Barrier(2)
    claims: list[list[str]] = [[], []]

    def claim(index: int) -> None:
        for _ in range(rounds):
            barrier.wait(timeout=30)
            batch = store.claim_webhooks("int-1", limit=3, lease_seconds=600)
            claims[index] += [item.event_id for item in batch]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        store.close()
    assert all(claims), "both threads claimed"
    _assert_each_claimed_once(claims, events)


# ---- webhook subscriptions -----------------------------------------------------------------------
def subscription(crm: str, **details: Any) -> dict[str, Any]:
    return {
        "crm": crm,
        "receiverUrl": f"https://hooks.example.com/webhooks/crm/{crm}/int",
        "createdAt": "2026-03-01T10:00:00+00:00",
        "expiresAt": None,
        "secretRef": "file:/secrets/attio%2Fint",
        "details": details,
    }


def test_webhook_subscriptions_put_replaces_and_delete(store: Store) -> None:
    assert store.get_webhook_subscription("int-1") is None
    assert store.list_webhook_subscriptions() == {}
    attio = subscription("attio", webhookId="wh-1", events=("record.created", "record.deleted"))
    store.put_webhook_subscription("int-2", subscription("zoho", channelId=7, nested={"a": [1]}))
    store.put_webhook_subscription("int-1", attio)
    got = store.get_webhook_subscription("int-1")
    assert got == subscription(
        "attio", webhookId="wh-1", events=["record.created", "record.deleted"]
    )
    assert list(store.list_webhook_subscriptions()) == ["int-1", "int-2"]

    got["details"]["webhookId"] = "changed by the caller"  # a copy, not the stored value
    assert store.get_webhook_subscription("int-1")["details"]["webhookId"] == "wh-1"

    renewed = {"crm": "attio", "expiresAt": "2026-04-01T00:00:00+00:00", "details": {"v": 2}}
    store.put_webhook_subscription("int-1", renewed)
    assert store.get_webhook_subscription("int-1") == renewed  # replaced, not merged
    with pytest.raises(TypeError):
        store.put_webhook_subscription("int-1", {"details": {"when": datetime.now(UTC)}})
    assert store.get_webhook_subscription("int-1") == renewed

    store.delete_webhook_subscription("int-1")
    store.delete_webhook_subscription("int-1")  # already gone: fine
    assert store.get_webhook_subscription("int-1") is None
    assert store.list_webhook_subscriptions() == {
        "int-2": subscription("zoho", channelId=7, nested={"a": [1]})
    }


# ---- polling watermarks --------------------------------------------------------------------------
def test_watermarks_per_integration_and_object_type(store: Store) -> None:
    assert store.get_watermark("int-1", "person") is None
    store.set_watermark("int-1", "person", "2026-03-01T10:00:00+00:00")
    store.set_watermark("int-1", "lead", "2026-02-01T00:00:00+00:00")
    store.set_watermark("int-2", "person", "2025-12-31T23:59:59+00:00")
    assert store.get_watermark("int-1", "person") == "2026-03-01T10:00:00+00:00"
    assert store.get_watermark("int-1", "lead") == "2026-02-01T00:00:00+00:00"
    assert store.get_watermark("int-2", "person") == "2025-12-31T23:59:59+00:00"
    assert store.get_watermark("int-2", "lead") is None
    store.set_watermark("int-1", "person", "2026-03-02T00:00:00+00:00")
    store.set_watermark("int-1", "person", "2026-03-02T00:00:00+00:00")  # idempotent
    assert store.get_watermark("int-1", "person") == "2026-03-02T00:00:00+00:00"
    store.set_watermark("int-1", "person", "2020-01-01T00:00:00+00:00")  # a reset moves back
    assert store.get_watermark("int-1", "person") == "2020-01-01T00:00:00+00:00"
    assert store.get_watermark("int-1", "lead") == "2026-02-01T00:00:00+00:00"


# ---- tombstones ----------------------------------------------------------------------------------
def test_tombstones_are_idempotent_and_per_integration(store: Store) -> None:
    assert store.get_tombstones("int-1", ["pd:1"]) == set()
    store.put_tombstones("int-1", ["pd:1", "pd:2", "pd:2"])
    store.put_tombstones("int-1", (e for e in ["pd:1", "pd:3"]))  # again, from a generator
    store.put_tombstones("int-1", [])
    store.put_tombstones("int-2", ["pd:9"])
    assert store.get_tombstones("int-1", ["pd:1", "pd:2", "pd:3", "pd:9", "pd:x"]) == {
        "pd:1",
        "pd:2",
        "pd:3",
    }
    assert store.get_tombstones("int-2", ["pd:1", "pd:2", "pd:9"]) == {"pd:9"}
    assert store.get_tombstones("int-1", []) == set()

    store.delete_tombstones("int-1", ["pd:1", "pd:9", "never"])  # a person came back
    store.delete_tombstones("int-1", [])
    assert store.get_tombstones("int-1", ["pd:1", "pd:2", "pd:3"]) == {"pd:2", "pd:3"}
    assert store.get_tombstones("int-2", ["pd:9"]) == {"pd:9"}


def test_tombstones_span_query_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_MAX_SQL_VARIABLES", 7)
    monkeypatch.setattr(mongo_store, "_MAX_IDS_PER_QUERY", 7)
    ids = [f"e{i}" for i in range(30)]
    store.put_tombstones("int-1", ids[:20])
    store.put_tombstones("int-1", ids)  # two-thirds already there, across several chunks
    assert store.get_tombstones("int-1", [*ids, "nope"]) == set(ids)
    store.delete_tombstones("int-1", ids[:18])
    assert store.get_tombstones("int-1", ids) == set(ids[18:])


# ---- activity map ----------------------------------------------------------------------------
def test_activity_records_are_replaced_per_quo_object_and_integration(store: Store) -> None:
    assert store.get_activity_records("int-1", ["AC1"]) == {}
    first = ActivityRecord({"call": {"id": "AC1", "status": "ringing"}}, {"p-1": "act-1"})
    store.put_activity_record("int-1", "AC1", first)
    store.put_activity_record("int-2", "AC1", ActivityRecord({"other": True}))
    assert store.get_activity_records("int-1", ["AC1", "AC2"]) == {"AC1": first}
    later = ActivityRecord({"call": {"id": "AC1", "status": "completed"}}, {"p-1": "act-9"})
    store.put_activity_record("int-1", "AC1", later)
    assert store.get_activity_records("int-1", ["AC1"])["AC1"] == later
    assert store.get_activity_records("int-2", ["AC1"])["AC1"].state == {"other": True}


def test_the_phone_index_follows_every_link_write(store: Store) -> None:
    store.put_contact_links("int-1", {"a": ContactLink("q1", "h1", ("+14155550101",))})
    store.put_contact_links(
        "int-1", {"b": ContactLink("q2", "h2", ("+14155550101", "+14155550102"))}
    )
    store.put_contact_links("int-2", {"c": ContactLink("q3", "h3", ("+14155550101",))})
    found = store.people_by_phone("int-1", ["+14155550101", "+14155550102", "+1999"])
    assert found == {"+14155550101": ["b", "a"], "+14155550102": ["b"]}  # latest link first
    assert store.get_contact_links("int-1", ["b"])["b"].phones == ("+14155550101", "+14155550102")
    # A new number replaces the old ones; a deleted or renamed link moves its numbers.
    store.put_contact_links("int-1", {"a": ContactLink("q1", "h4", ("+14155550103",))})
    store.delete_contact_links("int-1", ["b"])
    assert store.people_by_phone("int-1", ["+14155550101", "+14155550103"]) == {
        "+14155550103": ["a"]
    }
    store.rename_contact_links("int-1", {"a": "a2"})
    assert store.people_by_phone("int-1", ["+14155550103"]) == {"+14155550103": ["a2"]}
    assert store.people_by_phone("int-2", ["+14155550101"]) == {"+14155550101": ["c"]}


def test_deferred_webhooks_come_back_later_with_their_reason(store: Store) -> None:
    store.enqueue_webhook("int-1", "ev-1", {})
    store.enqueue_webhook("int-1", "ev-2", {})
    first, second = store.claim_webhooks("int-1", limit=10)
    assert (first.attempts, first.last_error) == (0, None)
    store.defer_webhooks([first.id], 0.3, "crm said 500")
    store.defer_webhooks([second.id], 300, "later")
    store.ack_webhooks([second.id])
    store.defer_webhooks([second.id], 0, "acked items stay acked")
    claimed: list[InboxItem] = []
    wait_for(lambda: bool(claimed.extend(store.claim_webhooks("int-1", limit=10)) or claimed))
    (again,) = claimed
    assert (again.id, again.attempts, again.last_error) == (first.id, 1, "crm said 500")
    assert store.webhook_backlog("int-1") == 1


# ---- migrations ------------------------------------------------------------------------------
def test_sqlite_file_from_before_skipped_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_counters = [n for n in COUNTER_NAMES if n != "skipped"]
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE processes (id TEXT PRIMARY KEY, integration_id TEXT NOT NULL, "
            "name TEXT NOT NULL, type TEXT NOT NULL, state TEXT NOT NULL, context TEXT NOT NULL, "
            "parent_id TEXT, children TEXT NOT NULL, created_at TEXT NOT NULL, "
            "updated_at TEXT NOT NULL, "
            + ", ".join(f"{n} INTEGER NOT NULL DEFAULT 0" for n in old_counters)
            + ")"
        )
        conn.execute(
            "CREATE TABLE pages (process_id TEXT NOT NULL, page_key TEXT NOT NULL, "
            "records INTEGER NOT NULL, synced INTEGER NOT NULL, failed INTEGER NOT NULL, "
            "created INTEGER NOT NULL, updated INTEGER NOT NULL, unchanged INTEGER NOT NULL, "
            "ok INTEGER NOT NULL, PRIMARY KEY (process_id, page_key)) WITHOUT ROWID"
        )
        now = "2026-01-01T00:00:00.000000+00:00"
        conn.execute(
            "INSERT INTO processes (id, integration_id, name, type, state, context, children, "
            "created_at, updated_at, processed, synced, created, pages_processed) "
            "VALUES ('p', 'int-1', 'sync', 'SYNC', 'PROCESSING_BATCHES', ?, '[]', ?, ?, "
            "4, 4, 4, 1)",
            (json.dumps({"crm": "hubspot"}), now, now),
        )
        conn.execute("INSERT INTO pages VALUES ('p', 'p1', 4, 4, 0, 4, 0, 0, 1)")
    conn.close()

    store = SqliteStore(path)
    try:
        assert store.page_results("p") == {
            "p1": PageResult(records=4, synced=4, failed=0, created=4)
        }
        assert store.get_process("p").counters["skipped"] == 0
        store.record_page(
            "p", "p1", PageResult(records=4, synced=3, failed=0, created=3, skipped=1)
        )
        store.record_page("p", "p2", PageResult(records=2, synced=2, failed=0, created=2))
        assert store.page_results("p")["p1"].skipped == 1
        counters = store.get_process("p").counters
        assert (counters["processed"], counters["created"], counters["skipped"]) == (6, 5, 1)
    finally:
        store.close()


def test_sqlite_inbox_from_before_received_at_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE webhook_inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "integration_id TEXT NOT NULL, event_id TEXT NOT NULL, payload TEXT NOT NULL, "
            "lease_until REAL NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0, "
            "UNIQUE (integration_id, event_id))"
        )
        conn.execute(
            "INSERT INTO webhook_inbox (integration_id, event_id, payload) "
            "VALUES ('int-1', 'old', '{\"n\": 0}')"
        )
    conn.close()

    before = datetime.now(UTC)
    store = SqliteStore(path)
    try:
        assert store.enqueue_webhook("int-1", "new", {"n": 1})
        old, new = store.claim_webhooks("int-1", limit=10)
        assert (old.event_id, old.payload, new.event_id) == ("old", {"n": 0}, "new")
        # The old item gets the migration time: it was received no later than that.
        assert before <= datetime.fromisoformat(old.received_at) <= datetime.now(UTC)
        assert old.received_at <= new.received_at
        assert not store.enqueue_webhook("int-1", "old", {})
    finally:
        store.close()
    reopened = SqliteStore(path)  # a second open migrates nothing more
    try:
        assert reopened.get_webhooks([old.id]) == [old]
    finally:
        reopened.close()


def test_mongo_page_from_before_skipped_reads_as_zero() -> None:
    client = mongomock.MongoClient()
    store = MongoStore(client)
    new_process(store, "p")
    store.record_page("p", "p1", PageResult(records=4, synced=4, failed=0, created=4))
    # What an older adapter stored: no `skipped` field on the page nor among the counters.
    client["quo_sync"]["pages"].update_many({}, {"$unset": {"skipped": ""}})
    client["quo_sync"]["processes"].update_many({}, {"$unset": {"counters.skipped": ""}})
    assert store.page_results("p")["p1"].skipped == 0
    assert store.get_process("p").counters["skipped"] == 0
    store.record_page("p", "p1", PageResult(records=4, synced=3, failed=0, created=3, skipped=1))
    assert store.page_results("p")["p1"].skipped == 1
    assert store.get_process("p").counters["skipped"] == 1


# ---- open_store ------------------------------------------------------------------------------
def test_open_store_schemes(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "plain.sqlite"), f"sqlite:///{tmp_path}/uri.sqlite"):
        opened = open_store(uri)
        assert isinstance(opened, SqliteStore)
        opened.close()
    assert (tmp_path / "plain.sqlite").exists() and (tmp_path / "uri.sqlite").exists()
    with pytest.raises(ValueError, match="'postgres'") as raised:
        open_store("postgres://user:hunter2@db/quo")
    assert "hunter2" not in str(raised.value)


# ---- concurrency -------------------------------------------------------------------------------
def _worker(
    job: Callable[[Store, int], Any],
    opener: Callable[[], Store],
    index: int,
    barrier: Any,
    results: Any,
) -> None:
    store = opener()
    try:
        barrier.wait(timeout=60)  # everyone starts together, so the jobs really overlap
        results.put((index, job(store, index)))
    except BaseException:
        results.put((index, RuntimeError(traceback.format_exc())))
    finally:
        store.close()


def run_concurrently(backend: Backend, job: Callable[[Store, int], Any]) -> list[Any]:
    """Run `job(store, index)` in WORKERS spawned processes (threads for mongomock)."""
    switch_interval = sys.getswitchinterval()
    if backend.opener is None:
        # Switch threads often, so the jobs' store calls really interleave.
        sys.setswitchinterval(1e-5)
        barrier, results = threading.Barrier(WORKERS), queue.Queue()
        shared = backend.store
        workers: list[Any] = [
            threading.Thread(target=_worker, args=(job, lambda: shared, i, barrier, results))
            for i in range(WORKERS)
        ]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
        workers = [
            ctx.Process(target=_worker, args=(job, backend.opener, i, barrier, results))
            for i in range(WORKERS)
        ]
    try:
        for worker in workers:
            worker.start()
        outcomes = dict(results.get(timeout=120) for _ in workers)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        sys.setswitchinterval(switch_interval)
    failures = [o for o in outcomes.values() if isinstance(o, BaseException)]
    assert not failures, failures[0]
    return [outcomes[i] for i in range(WORKERS)]


def _increment_job(store: Store, index: int, process_id: str) -> None:
    for _ in range(200):
        store.increment_counters(process_id, {"synced": 1, "failed": 2})


def _own_page(index: int, page: int, rerun: bool) -> PageResult:
    synced = index + page + (5 if rerun else 0)
    return PageResult(records=synced + 1, synced=synced, failed=1, created=synced)


def _shared_page(index: int) -> PageResult:
    return PageResult(records=index, synced=index, failed=0, updated=index, ok=index % 2 == 0)


def _record_pages_job(store: Store, index: int, process_id: str) -> None:
    for rerun in (False, True, True):
        for page in range(4):
            store.record_page(process_id, f"w{index}-{page}", _own_page(index, page, rerun))
            store.record_page(process_id, f"shared-{page}", _shared_page(index))


def _reserve_job(store: Store, index: int, key: str, t0: float) -> list[float]:
    # Times relative to t0 keep float spacing exact to ~1e-15 s (epoch seconds: only ~1e-7 s).
    return [
        store.update_governor(key, partial(reserve, now=time.time() - t0, interval=0.01))
        for _ in range(25)
    ]


def _create_exclusive_job(store: Store, index: int, key: str, prefix: str) -> str:
    try:
        return new_process(store, f"{prefix}{index}", exclusive_key=key).id
    except AlreadyRunning as exc:
        return f"refused, held by {exc.process_id}"


def test_concurrent_exclusive_creates_admit_exactly_one(backend: Backend) -> None:
    store = backend.store
    for prefix in ("first-", "second-"):
        outcomes = run_concurrently(
            backend, partial(_create_exclusive_job, key="initial:int-1:Person", prefix=prefix)
        )
        [winner] = [o for o in outcomes if not o.startswith("refused")]
        assert outcomes.count(f"refused, held by {winner}") == WORKERS - 1
        assert [p.id for p in store.list_processes() if p.id.startswith(prefix)] == [winner]
        store.transition(winner, S.ERROR)  # ended: the next round may take the key


def test_concurrent_increments_are_exact(backend: Backend) -> None:
    new_process(backend.store, "p")
    run_concurrently(backend, partial(_increment_job, process_id="p"))
    counters = backend.store.get_process("p").counters
    assert (counters["synced"], counters["failed"]) == (WORKERS * 200, WORKERS * 400)


def test_concurrent_record_page_counters_are_exact(backend: Backend) -> None:
    new_process(backend.store, "p")
    run_concurrently(backend, partial(_record_pages_job, process_id="p"))
    pages = backend.store.page_results("p")
    assert len(pages) == WORKERS * 4 + 4
    for index in range(WORKERS):
        for page in range(4):
            assert pages[f"w{index}-{page}"] == _own_page(index, page, rerun=True)
    for page in range(4):
        assert pages[f"shared-{page}"] in [_shared_page(i) for i in range(WORKERS)]
    expected = {
        name: sum(p.counter_values()[name] for p in pages.values()) for name in COUNTER_NAMES
    }
    assert backend.store.get_process("p").counters == expected


def test_concurrent_governor_slots_are_spaced(backend: Backend) -> None:
    send_times = sorted(
        t
        for times in run_concurrently(backend, partial(_reserve_job, key="gov-key", t0=time.time()))
        for t in times
    )
    assert len(set(send_times)) == WORKERS * 25
    gaps = [b - a for a, b in itertools.pairwise(send_times)]
    assert min(gaps) >= 0.01 - 1e-9
