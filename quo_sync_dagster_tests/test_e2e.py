"""The real deployment path: `dagster dev` (webserver + daemon), runs launched through GraphQL as
the UI launches them, sensors ticking in the daemon, and the Quo sandbox as its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.crms.scalingtest import bad_record_count
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.factory import TAG_PROCESS
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster_tests.browser import rendered_page

_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}"""


def _demo(home: Path, records: int, crm: str = "scalingtest") -> tuple[int, dict]:
    args = ["--crm", crm, "--records", str(records), "--home", str(home), "--quo-rate-limit", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "quo_sync_dagster.cli", "demo", *args, "--exit-when-done"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, json.loads(last.removeprefix("RESULT "))


def test_demo_syncs_everything_once_and_a_second_run_writes_nothing(tmp_path: Path) -> None:
    records = 1000  # an exact multiple of the page size (200)
    code, first = _demo(tmp_path / "home", records)
    assert code == 0 and first["state"] == "COMPLETED"
    assert first["totalRecords"] == records
    assert first["totalSynced"] + first["totalFailed"] == records
    assert first["totalFailed"] == bad_record_count(records)
    assert first["quoContacts"] == first["totalSynced"]
    assert first["quoDuplicateExternalIds"] == 0
    assert first["quoWriteRequests"] == first["totalSynced"]

    code, second = _demo(tmp_path / "home", records)
    assert code == 0 and second["state"] == "COMPLETED"
    assert second["quoWriteRequests"] == 0
    assert second["skippedUnchanged"] == first["totalSynced"]
    assert second["quoContacts"] == first["quoContacts"]


@pytest.mark.parametrize(
    "crm", sorted(name for name, c in registered_connectors().items() if c.simulator)
)
def test_demo_of_each_real_crm_syncs_against_its_simulator(tmp_path: Path, crm: str) -> None:
    code, first = _demo(tmp_path / "home", 150, crm)
    assert code == 0 and first["state"] == "COMPLETED", first
    assert first["totalRecords"] > 0
    assert first["totalSynced"] + first["totalFailed"] == first["totalRecords"]
    assert first["quoContacts"] == first["totalSynced"] and first["quoDuplicateExternalIds"] == 0
    code, second = _demo(tmp_path / "home", 150, crm)
    assert code == 0 and second["state"] == "COMPLETED"
    assert second["quoWriteRequests"] == 0 and second["quoContacts"] == first["quoContacts"]


def _cmdline(pid: int | str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _run_worker_pids(dagster_home: Path) -> list[int]:
    """Run workers of this Dagster home: its code server (`dagster api grpc`, whose command line
    names the home) starts each run as a spawned child."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and b"spawn_main" in _cmdline(entry.name):
            try:
                parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            server = _cmdline(parent)
            if b"grpc" in server and str(dagster_home).encode() in server:
                pids.append(int(entry.name))
    return pids


def _wait_for(what: str, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def test_a_run_killed_part_way_is_backfilled_without_duplicates(tmp_path: Path) -> None:
    records, page_size = 600, 100
    with LocalStack(tmp_path / "home", quo_rate_limit=40) as stack:
        stack.register_integration("kill-test", "scalingtest", records)
        (process_id,) = stack.run_initial_sync(
            "scalingtest",
            {"integration_id": "kill-test", "page_size": page_size, "pages_per_run": 3},
        )
        _wait_for("contacts to be created", lambda: stack.sandbox_stats()["byKind"]["create"] >= 80)
        victims = _run_worker_pids(stack.dagster_home)
        assert victims, "no run worker found to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        created_before_kill = stack.sandbox_stats()["byKind"]["create"]
        assert created_before_kill < records - bad_record_count(records)

        # What run monitoring does when a launcher reports a dead run worker (EcsRunLauncher
        # does; the local DefaultRunLauncher cannot tell): mark its runs failed.
        with dg.DagsterInstance.from_config(str(stack.dagster_home)) as instance:
            for record in instance.get_run_records(dg.RunsFilter(tags={TAG_PROCESS: process_id})):
                if not record.dagster_run.is_finished:
                    instance.report_run_failed(record.dagster_run, "run worker killed (SIGKILL)")
        assert stack.store is not None
        store = stack.store
        _wait_for(
            "the process to be closed as ERROR",
            lambda: store.get_process(process_id).state is ProcessState.ERROR,
        )
        process = store.get_process(process_id)
        assert "pages not synced" in process.context["error"]
        # The UI (real webserver, real browser) shows the pages of the killed runs as failed.
        partitions_page = f"{stack.ui_url}/assets/scalingtest_quo_contacts?view=partitions"
        assert "Failed (6)" in rendered_page(partitions_page, tmp_path / "browser-1")

        # The UI's "backfill failed and missing partitions", through the same GraphQL call.
        results = store.page_results(process_id)
        redo = [
            page_key(process_id, i)
            for i in range(6)
            if not (r := results.get(page_key(process_id, i))) or not r.ok
        ]
        launched = stack.graphql(
            _BACKFILL,
            {
                "params": {
                    "partitionNames": redo,
                    "assetSelection": [
                        {"path": ["scalingtest_crm_pages"]},
                        {"path": ["scalingtest_quo_contacts"]},
                    ],
                    "title": "re-run killed pages",
                }
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        _wait_for(
            "the process to complete",
            lambda: store.get_process(process_id).state is ProcessState.COMPLETED,
            timeout=400,
        )
        process = store.get_process(process_id)
        bad = bad_record_count(records)
        assert process.counters["processed"] == records
        assert process.counters["synced"] == records - bad and process.counters["failed"] == bad
        assert process.counters["pages_processed"] == 6 and process.counters["pages_failed"] == 0
        stats = stack.sandbox_stats()
        assert stats["duplicateExternalIds"] == 0
        assert stats["contactsBySource"]["scalingtest"] == records - bad
        dom = rendered_page(partitions_page, tmp_path / "browser-2")
        assert "Failed (0)" in dom and "Materialized (6)" in dom
