"""Ongoing sync end to end, on the path `quo-sync demo --changes` runs: `dagster dev` (webserver +
daemon with its sensors and run monitoring), the Quo sandbox, the webhook receiver and each
CRM's simulator as their own processes, runs launched through GraphQL as the UI launches them.

Per CRM, people are created, updated, deleted and merged (where the CRM merges) while the
initial sync walks 20 pages or more and after it closes; webhook CRMs lose and duplicate some of
their deliveries. Once the webhook runs have applied what arrived and one polling cycle has run,
Quo must equal the CRM (the differential check), and every Quo write must be accounted for:
one create per person nobody touched, at most one write per change afterwards. A webhook run
killed mid-write is run again from the inbox, exactly once in Quo.

One stack for the module, and the five CRMs' scenarios run at once in threads: they share the
daemon, the Quo sandbox and the machine, and one after the other would take five times longer.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.core.external_ids import crm_id_of
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import TERMINAL_STATES, Process, ProcessState
from quo_sync_dagster.differential import Differential
from quo_sync_dagster.local_stack import MERGING_SIMULATORS, ChangeLog, LocalStack
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.secrets import SECRETS_DIR_ENV
from quo_sync_dagster_tests.test_faults import run_worker_pids, wait_for


@dataclass(frozen=True)
class Shape:
    records: int
    page_size: int  # the largest object type takes >= 20 pages
    pages_per_run: int = 10
    further_poll: bool = False  # one CRM is enough: each cycle is three runs in a row


SHAPES = {
    "scalingtest": Shape(160, 8, further_poll=True),
    "pipedrive": Shape(160, 8),
    "zoho": Shape(180, 6),  # Contacts 120 (20 pages), Leads 60
    "attio": Shape(160, 8),
    "axiscare": Shape(100, 2),  # clients 40 (20 pages), leads, caregivers, applicants
}
# A quarter once the initial sync is planned (its pages not fetched yet: offsets and cursors
# move under them), a quarter once its first page is synced, half after it closed.
CHANGES = 20
DROPPED, DUPLICATED = 2, 3  # webhook deliveries
# No scheduled cycle besides the test's own; quick re-runs of a failed page.
SETTINGS = {"polling": False, "retry_backoff_seconds": 3, "retry_max_backoff_seconds": 15}
KILLED = "e2e-kill"  # the integration whose webhook run is killed
_LIVE_RUNS = """
{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED, CANCELING]}) {
    ... on Runs { results { runId } } } }"""


@dataclass
class Outcome:
    """What one CRM's scenario saw, for the tests to judge."""

    integration: Integration
    initial: list[Process]
    open_after_changes: bool  # the first half of the changes came while it ran
    untouched: set[str]  # syncable at the start, touched by no change before the close
    at_close: Differential  # Quo against the CRM when the initial sync had just closed
    closed_at: float
    log: ChangeLog
    deliveries: dict[str, Any] | None
    poll: list[Process]
    poll_listing: str
    final: Differential
    writes: dict[str, list[dict[str, Any]]]  # the integration's Quo writes, by externalId
    second_poll: list[Process] | None
    second_poll_writes: list[dict[str, Any]]


def writes_of(stack: LocalStack, integration: Integration) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for write in stack.quo.writes():
        if crm_id_of(integration, write["externalId"] or "") is not None:
            found[write["externalId"]].append(write)
    return found


def scenario(stack: LocalStack, crm: str) -> Outcome:
    shape = SHAPES[crm]
    integration = stack.register_integration(
        f"e2e-{crm}", crm, shape.records, SETTINGS, webhooks=True
    )
    assert stack.store is not None
    store = stack.store
    webhooks = store.get_webhook_subscription(integration.id) is not None
    rng, log = random.Random(crm), ChangeLog()
    with stack.crm_people(integration.id) as people:
        at_start = people.syncable()
        if webhooks:
            people.admin.webhook_faults(drop=DROPPED, duplicate=DUPLICATED)
        config = {"page_size": shape.page_size, "pages_per_run": shape.pages_per_run}
        process_ids = stack.run_initial_sync(crm, {"integration_id": integration.id, **config})
        people.random_changes(CHANGES // 4, rng, log)
        assert stack.wait_first_page(process_ids)
        people.random_changes(CHANGES // 2 - CHANGES // 4, rng, log)
        open_after = any(store.get_process(p).state not in TERMINAL_STATES for p in process_ids)
        initial = stack.wait_processes(process_ids, timeout=600)
        closed_at = time.time()
        at_close = stack.differential(integration.id)
        untouched = at_start - set(log.touched)
        people.random_changes(CHANGES - CHANGES // 2, rng, log)
        deliveries = None
        if webhooks:
            stack.wait_webhooks_applied(integration)
            deliveries = people.admin.deliveries()
    poll, listing = stack.poll_cycle(integration.id)
    final = stack.differential(integration.id)
    writes = writes_of(stack, integration)
    # Nothing changed since: a further cycle writes nothing (the write log is per person, so
    # the other scenarios' writes meanwhile do not count).
    second_poll = stack.poll_cycle(integration.id)[0] if shape.further_poll else None
    again = [w for ws in writes_of(stack, integration).values() for w in ws]
    known = {w["n"] for ws in writes.values() for w in ws}
    return Outcome(
        integration,
        initial,
        open_after,
        untouched,
        at_close,
        closed_at,
        log,
        deliveries,
        poll,
        listing,
        final,
        writes,
        second_poll,
        [w for w in again if w["n"] not in known],
    )


def prepare_kill(stack: LocalStack) -> Integration:
    """A synced webhook integration for the killed-run test."""
    integration = stack.register_integration(KILLED, "pipedrive", 60, SETTINGS, webhooks=True)
    (process_id,) = stack.run_initial_sync("pipedrive", {"integration_id": integration.id})
    (process,) = stack.wait_processes([process_id], timeout=600)
    assert process.state is ProcessState.COMPLETED
    return integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("ongoing") / "home"
    stack = LocalStack(home, quo_rate_limit=None)
    with pytest.MonkeyPatch.context() as env, stack:
        env.setenv(SECRETS_DIR_ENV, str(home / "secrets"))  # the webhook secrets subscribe writes
        yield stack


@pytest.fixture(scope="module")
def outcomes(stack: LocalStack) -> Iterator[dict[str, Future[Any]]]:
    """The scenarios of every CRM, and the killed-run test's preparation, all at once."""
    with ThreadPoolExecutor(len(SHAPES) + 1, thread_name_prefix="scenario") as pool:
        futures = {crm: pool.submit(scenario, stack, crm) for crm in SHAPES}
        futures[KILLED] = pool.submit(prepare_kill, stack)
        yield futures
        for future in futures.values():  # none may outlive the stack
            future.exception()


def test_the_quo_sandbox_write_log_holds_every_write_once_in_order(tmp_path: Path) -> None:
    """The instrument the tests below count writes with."""
    with QuoSandbox(tmp_path, rate_limit=None) as sandbox:
        with QuoClient(sandbox.url, sandbox.api_key) as quo:
            body = {"defaultFields": {"firstName": "A"}, "source": "t", "externalId": "x:1"}
            first = quo.create_contact(body)
            quo.patch_contact(first["id"], {"defaultFields": {"firstName": "B"}})
            second = quo.create_contact({**body, "externalId": "x:2"})
            quo.delete_contact(first["id"])
            list(quo.iter_contacts("t"))  # a read: not a write
        writes = sandbox.writes()
        assert [(w["n"], w["kind"], w["externalId"]) for w in writes] == [
            (1, "create", "x:1"),
            (2, "patch", "x:1"),
            (3, "create", "x:2"),
            (4, "delete", "x:1"),
        ]
        assert writes[2]["id"] == second["id"]
        assert [w["at"] for w in writes] == sorted(w["at"] for w in writes)
        assert sandbox.writes(after=3) == writes[3:]
        for bad in ("-1", "x"):
            response = httpx.get(f"{sandbox.url}/_sandbox/writes", params={"after": bad})
            assert response.status_code == 400


@pytest.mark.parametrize("crm", SHAPES)
def test_everyone_untouched_is_in_quo_when_the_initial_sync_closes(
    outcomes: dict[str, Future[Outcome]], crm: str
) -> None:
    o = outcomes[crm].result(timeout=900)
    assert {p.state for p in o.initial} == {ProcessState.COMPLETED}
    assert max(p.context["totalPages"] for p in o.initial) >= 20
    assert o.open_after_changes, "the changes came after the initial sync, not during it"
    assert len(o.untouched) >= SHAPES[crm].records * 0.6
    # The CRM was read at the close: people touched since may differ; nobody else may.
    assert not o.untouched & set(o.at_close.missing), o.at_close.result()
    assert not o.untouched & set(o.at_close.stale), o.at_close.result()


@pytest.mark.parametrize("crm", SHAPES)
def test_webhooks_and_one_poll_leave_quo_equal_to_the_crm_writing_only_changes(
    outcomes: dict[str, Future[Outcome]], crm: str
) -> None:
    o = outcomes[crm].result(timeout=900)
    assert {p.state for p in o.poll} == {ProcessState.COMPLETED}, o.poll_listing
    assert o.final.exact, o.final.result()
    assert o.final.crm_people == o.final.quo_contacts > 0
    kinds = {"create", "update", "delete"} | ({"merge"} if crm in MERGING_SIMULATORS else set())
    assert set(o.log.ops) == kinds and o.log.ops.total() >= CHANGES
    if o.deliveries is not None:
        assert (o.deliveries["dropped"], o.deliveries["duplicated"]) == (DROPPED, DUPLICATED)
        assert o.deliveries["queued"] >= CHANGES and o.deliveries["failed"] == 0
    # Writes: a person nobody touched was created once and never written again (the poll's
    # full scan included); nobody outside the CRM's people was written; since the initial
    # sync closed, a changed person was written at most once per change.
    for ext in o.untouched - set(o.log.touched):
        assert [w["kind"] for w in o.writes[ext]] == ["create"], ext
    assert set(o.writes) <= o.untouched | set(o.log.touched)
    for ext, writes in o.writes.items():
        later = [w for w in writes if w["at"] > o.closed_at]
        assert len(later) <= o.log.touched[ext], (ext, writes)
    # Nothing changed since: a further polling cycle writes nothing.
    if o.second_poll is not None:
        assert {p.state for p in o.second_poll} == {ProcessState.COMPLETED}
    assert o.second_poll_writes == []


def test_a_killed_webhook_run_is_redelivered_and_applied_once(
    stack: LocalStack, outcomes: dict[str, Future[Any]]
) -> None:
    integration = outcomes[KILLED].result(timeout=900)
    for future in outcomes.values():  # the Quo faults below must slow this test's run only
        future.exception()
    wait_for("no live run", lambda: not stack.graphql(_LIVE_RUNS)["runsOrError"]["results"])
    stack.quo.inject_fault(delay_seconds=2, count=10, kinds=["create", "patch"])
    with stack.crm_people(integration.id) as people:
        records = [r for _, r in people.people()][:6]
        for _ in range(4):
            people.create("Person")
        for record in records:
            people.update("Person", record)
    # The run is mid-write once it has met a delayed Quo request.
    wait_for("a slow webhook run", lambda: stack.quo.stats()["pendingFaults"] < 10, timeout=120)
    (running,) = [r for r in stack.webhook_runs(integration) if r["status"] == "STARTED"]
    victims = run_worker_pids(stack.dagster_home)
    assert victims, "no run worker found to kill"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    stack.quo.clear_faults()
    # Run monitoring fails the dead run, the sensor releases its items, a new run applies them.
    stack.wait_webhooks_applied(integration)
    runs = {r["runId"]: r for r in stack.webhook_runs(integration)}
    assert runs[running["runId"]]["status"] == "FAILURE"
    redone = {i for r in runs.values() if r["status"] == "SUCCESS" for i in r["itemIds"]}
    assert set(running["itemIds"]) <= redone
    diff = stack.differential(integration.id)
    assert diff.exact and not diff.duplicates, diff.result()
    assert stack.quo.stats()["duplicateExternalIds"] == 0
    # Whatever the killed run had written, the redelivery created no second contact.
    for ext, writes in writes_of(stack, integration).items():
        assert [w["kind"] for w in writes].count("create") == 1, (ext, writes)
