"""Faults injected into the running product, one test per fault, with no operator action.

One stack for the module, as `quo-sync demo` runs it: `dagster dev` (webserver + daemon with its
sensors and run monitoring), the Quo sandbox and CRM simulators as their own processes, runs
launched through GraphQL as the UI launches them. Each test syncs its own integration (its own
externalId namespace in the shared Quo sandbox), injects its fault through the simulators'
admin endpoints, and then only waits: the end state must be the Process COMPLETED and every
good person in Quo exactly once with current content.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from quo_sync_dagster.core.external_ids import crm_id_of, namespaced
from quo_sync_dagster.core.models import Integration, QuoContact
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, skipped_record_count
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.sync import open_connector, page_key
from quo_sync_dagster.orchestration.tags import TAG_PROCESS, TAG_RETRY
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster_tests.browser import rendered_page

RECORDS = 240
PAGE = {"page_size": 40, "pages_per_run": 2}  # 6 pages in 3 runs
QUO_TIMEOUT = 3  # seconds: the runs' Quo client timeout, so a timeout fault is quick
# Short backoffs (3, 6, 12, 15, 15 s): the outage test's 60 s fit inside the five retries.
RECOVERY = {"retry_backoff_seconds": 3, "retry_max_backoff_seconds": 15}

_RECONCILE_RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status tags { key value } } } }
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("faults") / "home", quo_rate_limit=50)
    stack.env["QUO_SYNC_QUO_TIMEOUT"] = str(QUO_TIMEOUT)
    with pytest.MonkeyPatch.context() as env, stack:
        # The simulators' tokens, for the test's own reads of the CRMs (expected_contacts).
        for name, value in stack.env.items():
            if name.startswith("QUO_SYNC_SANDBOX_"):
                env.setenv(name, value)
        yield stack


@pytest.fixture(autouse=True)
def no_fault_left(stack: LocalStack) -> Iterator[None]:
    yield
    clear_faults(stack.sandbox_url)  # a failed test must not fail the next one


# ---- the simulators' admin endpoints ---------------------------------------------------------
def inject(url: str, **fault: Any) -> None:
    response = httpx.post(f"{url}/_sandbox/faults", json=fault, timeout=30)
    assert response.status_code == 200, response.text


def clear_faults(url: str) -> None:
    httpx.delete(f"{url}/_sandbox/faults", timeout=30).raise_for_status()


def stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/_sandbox/stats", timeout=30).json()


def answered(url: str, status: int) -> int:
    return stats(url)["byStatus"].get(str(status), 0)


# ---- run workers, waiting -------------------------------------------------------------------
def cmdline(pid: int | str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def run_worker_pids(dagster_home: Path) -> list[int]:
    """Run workers of this Dagster home: its code server (`dagster api grpc`, whose command line
    names the home) starts each run as a spawned child."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and b"spawn_main" in cmdline(entry.name):
            try:
                parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            server = cmdline(parent)
            if b"grpc" in server and str(dagster_home).encode() in server:
                pids.append(int(entry.name))
    return pids


def wait_for(what: str, check: Callable[[], Any], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


# ---- one sync and its end state --------------------------------------------------------------
def start_sync(
    stack: LocalStack, integration_id: str, crm: str = "scalingtest", records: int = RECORDS
) -> tuple[Integration, str]:
    integration = stack.register_integration(integration_id, crm, records, dict(RECOVERY))
    (process_id,) = stack.run_initial_sync(crm, {"integration_id": integration_id, **PAGE})
    return integration, process_id


def wait_completed(stack: LocalStack, process_id: str) -> Process:
    (process,) = stack.wait_processes([process_id], timeout=600)
    assert process.state is ProcessState.COMPLETED, process.context.get("error")
    return process


def quo_contacts(stack: LocalStack, integration: Integration, source: str) -> list[dict]:
    with QuoClient(stack.sandbox_url, stack.sandbox_key) as quo:
        return [
            c
            for c in quo.iter_contacts(source)
            if crm_id_of(integration, c.get("externalId") or "") is not None
        ]


def expected_contacts(stack: LocalStack, integration: Integration) -> dict[str, QuoContact]:
    """The integration's CRM people as the sync must have written them, by externalId."""
    assert stack.store is not None
    connector = open_connector(stack.store, integration.crm, integration.id)
    [object_type] = [o.crm_object_name for o in connector.crm_config.person_object_types]
    expected: dict[str, QuoContact] = {}
    try:
        page, n = connector.fetch_person_page(object_type, 0, 100, None, False), 0
        while True:
            connector.prepare_page(page.records, object_type)  # as the sync does
            for record in page.records:
                try:
                    contact = connector.transform_person_to_quo(record, object_type)
                except Exception:  # a person the sync must report as failed, not write
                    continue
                contact = namespaced(contact, integration)
                expected[contact.external_id] = contact
            if not page.has_more:
                return expected
            n += 1  # index paging (ScalingTest) or the cursor (Pipedrive)
            page = connector.fetch_person_page(
                object_type, n, 100, None, False, cursor=page.next_cursor
            )
    finally:
        connector.close()


def assert_exactly_once(stack: LocalStack, integration: Integration, process: Process) -> None:
    """Every good person in Quo once, with the content the CRM holds now; the counters exact."""
    counters = process.counters
    assert counters["processed"] == process.context["totalRecords"]
    assert counters["synced"] + counters["failed"] + counters["skipped"] == counters["processed"]
    assert counters["pages_failed"] == 0
    assert counters["pages_processed"] == process.context["totalPages"]
    expected = expected_contacts(stack, integration)
    source = next(iter(expected.values())).source
    contacts = quo_contacts(stack, integration, source)
    ids = [c["externalId"] for c in contacts]
    assert len(ids) == len(set(ids)), "a person is in Quo twice"
    assert sorted(ids) == sorted(expected)
    assert counters["synced"] == len(expected)
    for contact in contacts:
        want = expected[contact["externalId"]].to_api_body()["defaultFields"]
        got = contact["defaultFields"]
        assert (got.get("firstName"), got.get("lastName")) == (
            want.get("firstName"),
            want.get("lastName"),
        )
    assert stats(stack.sandbox_url)["duplicateExternalIds"] == 0
    if integration.crm == "scalingtest":
        assert counters["skipped"] == skipped_record_count(process.context["totalRecords"])
        assert counters["failed"] == 0


def when(check: Callable[[], bool], then: Callable[[], None]) -> threading.Thread:
    """Run `then` as soon as `check` holds (polled), in the background."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while not check() and time.monotonic() < deadline:
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def creates(stack: LocalStack) -> int:
    return stats(stack.sandbox_url)["byKind"]["create"]


def retry_runs(stack: LocalStack, process_id: str) -> list[dict[str, Any]]:
    runs = stack.graphql(
        _RECONCILE_RUNS, {"filter": {"tags": [{"key": TAG_PROCESS, "value": process_id}]}}
    )["runsOrError"]["results"]
    return [r for r in runs if any(t["key"] == TAG_RETRY for t in r["tags"])]


# ---- Quo faults ------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_quo_429s_are_waited_out(stack: LocalStack, form: str) -> None:
    before = answered(stack.sandbox_url, 429)
    retry_after = (
        "1"
        if form == "seconds"
        else format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    )
    base = creates(stack)
    waiter = when(
        lambda: creates(stack) >= base + 20,
        lambda: inject(stack.sandbox_url, status=429, count=25, retryAfter=retry_after),
    )
    integration, process_id = start_sync(stack, f"q429-{form}")
    process = wait_completed(stack, process_id)
    waiter.join()
    assert answered(stack.sandbox_url, 429) - before == 25
    assert_exactly_once(stack, integration, process)


def test_quo_5xx_on_reads_and_writes(stack: LocalStack) -> None:
    before = sum(answered(stack.sandbox_url, s) for s in (500, 502, 503))
    base = creates(stack)

    def burst() -> None:
        for status in (500, 502, 503):
            inject(stack.sandbox_url, status=status, count=4)
        inject(stack.sandbox_url, status=500, count=4, kinds=["create"], afterWrite=True)

    waiter = when(lambda: creates(stack) >= base + 20, burst)
    integration, process_id = start_sync(stack, "q5xx")
    process = wait_completed(stack, process_id)
    waiter.join()
    assert sum(answered(stack.sandbox_url, s) for s in (500, 502, 503)) - before == 16
    assert_exactly_once(stack, integration, process)


def test_quo_timeouts_before_and_after_a_write(stack: LocalStack) -> None:
    base = creates(stack)
    late = QUO_TIMEOUT + 2

    def stall() -> None:
        inject(stack.sandbox_url, delaySeconds=late, count=3)  # answered after the timeout
        inject(stack.sandbox_url, delaySeconds=late, count=3, kinds=["create"], afterWrite=True)

    waiter = when(lambda: creates(stack) >= base + 20, stall)
    integration, process_id = start_sync(stack, "qtimeout")
    process = wait_completed(stack, process_id)
    waiter.join()
    assert stats(stack.sandbox_url)["pendingFaults"] == 0  # every timeout was met
    assert_exactly_once(stack, integration, process)


def test_a_60_second_quo_outage_mid_sync_is_retried_to_completion(stack: LocalStack) -> None:
    base = creates(stack)
    outage: dict[str, float] = {}

    def go_down() -> None:
        inject(stack.sandbox_url, status=503, count=10**7)
        outage["start"] = time.monotonic()
        time.sleep(60)
        clear_faults(stack.sandbox_url)

    waiter = when(lambda: creates(stack) >= base + 30, go_down)
    integration, process_id = start_sync(stack, "qoutage")
    waiter.join(timeout=400)
    process = wait_completed(stack, process_id)
    assert "start" in outage
    # The outage failed pages; the completion sensor re-ran them after backoffs by itself.
    assert process.context["recovery"]["attempt"] >= 1
    assert retry_runs(stack, process_id)
    assert_exactly_once(stack, integration, process)


def test_a_sigkilled_page_run_is_detected_and_its_pages_rerun(
    stack: LocalStack, tmp_path: Path
) -> None:
    base = creates(stack)
    integration, process_id = start_sync(stack, "qkill", records=600)
    wait_for("contacts to be created", lambda: creates(stack) >= base + 60)
    victims = run_worker_pids(stack.dagster_home)
    assert victims, "no run worker found to kill"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert creates(stack) - base < 600 - skipped_record_count(600)
    # Run monitoring marks the dead runs failed; the completion sensor re-runs their pages.
    process = wait_completed(stack, process_id)
    assert retry_runs(stack, process_id)
    assert_exactly_once(stack, integration, process)
    # The instance, and the real webserver in a real browser, show this Process's pages all
    # materialized, the killed runs' failures replaced by the re-runs.
    # The completion sensor marks the Process COMPLETED in the store, then the daemon records
    # the sensor's reports of the pages the killed runs synced: wait for those events.
    keys = [page_key(process_id, i) for i in range(process.context["totalPages"])]

    def partition_status() -> dict[str, str]:
        with dg.DagsterInstance.from_config(str(stack.dagster_home)) as instance:
            status = instance.get_status_by_partition(
                dg.AssetKey("scalingtest_quo_contacts"),
                instance.get_dynamic_partitions("scalingtest_pages"),
                dg.DynamicPartitionsDefinition(name="scalingtest_pages"),
            )
        return {k: v.value for k, v in status.items()}

    deadline = time.monotonic() + 120
    while (status := partition_status()) and time.monotonic() < deadline:
        if all(status[k] == "MATERIALIZED" for k in keys):
            break
        time.sleep(0.5)
    assert {k: status[k] for k in keys if status[k] != "MATERIALIZED"} == {}
    counts = Counter(status.values())
    partitions_page = f"{stack.ui_url}/assets/scalingtest_quo_contacts?view=partitions"
    dom = rendered_page(partitions_page, tmp_path / "browser")
    assert f"Materialized ({counts['MATERIALIZED']})" in dom
    assert f"Failed ({counts['FAILED']})" in dom


def test_a_409_race_with_contacts_created_outside_the_sync(stack: LocalStack) -> None:
    integration = stack.register_integration("qrace", "scalingtest", RECORDS, dict(RECOVERY))
    outside = list(expected_contacts(stack, integration).values())[::4]
    with QuoClient(stack.sandbox_url, stack.sandbox_key) as quo:
        # Someone else writes a quarter of the people first, with stale names.
        for contact in outside:
            body = contact.to_api_body()
            body["defaultFields"] = {**body["defaultFields"], "firstName": "Stale"}
            quo.create_contact(body)
    (process_id,) = stack.run_initial_sync("scalingtest", {"integration_id": "qrace", **PAGE})
    process = wait_completed(stack, process_id)
    assert process.counters["updated"] == len(outside)  # found, PATCHed with current content
    assert_exactly_once(stack, integration, process)


def test_contacts_deleted_in_quo_are_restored_by_reconcile_and_the_next_sync(
    stack: LocalStack,
) -> None:
    integration, process_id = start_sync(stack, "qdelete")
    first = wait_completed(stack, process_id)
    wait_for("the reconcile run after the full sync", lambda: _reconcile_runs(stack, "qdelete"))
    wait_for(
        "that reconcile run to finish",
        lambda: all(r["status"] == "SUCCESS" for r in _reconcile_runs(stack, "qdelete")),
    )
    contacts = quo_contacts(stack, integration, ScalingTestConnector.quo_source)
    with QuoClient(stack.sandbox_url, stack.sandbox_key) as quo:
        for contact in contacts[:20]:
            quo.delete_contact(contact["id"])
    run_id = stack.launch(
        "scalingtest_reconcile",
        {"ops": {"scalingtest_reconcile_contacts": {"config": {"integration_id": "qdelete"}}}},
    )
    stack.wait_run(run_id)
    (again,) = stack.run_initial_sync("scalingtest", {"integration_id": "qdelete", **PAGE})
    process = wait_completed(stack, again)
    assert process.counters["created"] == 20
    assert process.counters["unchanged"] == first.counters["synced"] - 20
    assert_exactly_once(stack, integration, process)


def _reconcile_runs(stack: LocalStack, integration_id: str) -> list[dict[str, Any]]:
    runs = stack.graphql(
        _RECONCILE_RUNS,
        {
            "filter": {
                "pipelineName": "scalingtest_reconcile",
                "tags": [{"key": "quo_sync/integration", "value": integration_id}],
            }
        },
    )["runsOrError"]["results"]
    return runs


# ---- CRM faults ------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [403, 429, 500])
def test_crm_faults_mid_walk_and_mid_page(stack: LocalStack, status: int) -> None:
    """Pipedrive has no total: the plan run walks its cursor pages. The fault comes after three
    good pages, more times than the client retries, so the plan op fails and Dagster's retry of
    it resumes the walk from its checkpoint. Then the page runs meet it: the pages whose fetch
    still fails fail alone, and the completion sensor re-runs them. (403 is the Cloudflare page
    Pipedrive sends to clients that keep going.)"""
    integration = stack.register_integration(f"crm{status}", "pipedrive", RECORDS, dict(RECOVERY))
    url = integration.settings["base_url"]
    inject(url, delaySeconds=0.01, count=3)  # three requests served as usual, then the fault
    inject(url, status=status, count=8, retryAfter="1")
    (process_id,) = stack.run_initial_sync(
        "pipedrive", {"integration_id": integration.id, "page_size": 20, "pages_per_run": 3}
    )
    assert answered(url, status) == 8
    inject(url, status=status, count=8, retryAfter="1")  # the page runs meet it
    process = wait_completed(stack, process_id)
    assert answered(url, status) == 16
    assert_exactly_once(stack, integration, process)
