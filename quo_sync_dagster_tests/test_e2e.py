"""The real deployment path: `dagster dev` (webserver + daemon), runs launched through GraphQL as
the UI launches them, sensors ticking in the daemon, and the Quo sandbox as its own process.
Faults on the same path (a killed run, outages, ...) are in test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from quo_sync_dagster.analytics import pages_frame, processes_frame
from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.crms.scalingtest import skipped_record_count
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.store import open_store
from quo_sync_dagster_tests.pipeline import run_demo
from quo_sync_dagster_tests.test_analytics import PNG_MAGIC, SUMMED, _report_rows, _store_totals


def _demo(home: Path, records: int, crm: str = "scalingtest") -> tuple[int, dict[str, Any]]:
    return run_demo(home, "--crm", crm, "--records", str(records), timeout=600)


def test_demo_syncs_everything_once_and_a_second_run_writes_nothing(tmp_path: Path) -> None:
    records = 1000  # an exact multiple of the page size (200)
    code, first = _demo(tmp_path / "home", records)
    assert code == 0 and first["state"] == "COMPLETED"
    assert first["totalRecords"] == records
    assert first["totalSynced"] + first["totalSkipped"] == records
    assert first["totalSkipped"] == skipped_record_count(records)
    assert first["totalFailed"] == 0
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
    assert first["totalSynced"] + first["totalSkipped"] == first["totalRecords"]
    assert first["totalFailed"] == 0  # every simulator's people are messy, none malformed
    assert first["quoContacts"] == first["totalSynced"] and first["quoDuplicateExternalIds"] == 0
    code, second = _demo(tmp_path / "home", 150, crm)
    assert code == 0 and second["state"] == "COMPLETED"
    assert second["quoWriteRequests"] == 0 and second["quoContacts"] == first["quoContacts"]


def test_report_and_frames_of_demos_of_two_crms_match_the_store(tmp_path: Path) -> None:
    """Two demo runs (two CRMs, so two integrations) in one home, then `quo-sync report` as a
    user runs it (DAGSTER_HOME set) and the analytics frames: the store's totals, per
    integration."""
    home = tmp_path / "home"
    for crm, records in (("scalingtest", 300), ("pipedrive", 120)):
        code, result = _demo(home, records, crm)
        assert code == 0 and result["state"] == "COMPLETED", result
    dagster_home = home / "dagster"
    plot = tmp_path / "report.png"
    report = subprocess.run(
        [sys.executable, "-m", "quo_sync_dagster.cli", "report", "--plot", str(plot)],
        env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    store = open_store(default_store_uri(str(dagster_home)))
    try:
        expected = _store_totals(store)
        processes = processes_frame(store)
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            pages = pages_frame(store, instance=instance)
    finally:
        store.close()
    assert sorted(expected.index) == ["demo-pipedrive", "demo-scalingtest"]
    assert expected.loc["demo-scalingtest", "skipped"] == skipped_record_count(300)
    rows = _report_rows(report.stdout)
    for integration in expected.index:
        for name in ("records", "synced", "skipped", "failed"):
            assert int(rows[integration][name]) == expected.loc[integration, name]
    by_integration = processes.groupby("integration_id")[SUMMED].sum()
    pd.testing.assert_frame_equal(by_integration, expected)
    pd.testing.assert_frame_equal(pages.groupby("integration_id")[SUMMED].sum(), expected)
    assert pages["seconds"].gt(0).all()  # every page measured by the run that synced it
    assert plot.read_bytes().startswith(PNG_MAGIC)
