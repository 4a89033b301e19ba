"""The real deployment path: `dagster dev` (webserver + daemon), runs launched through GraphQL as
the UI launches them, sensors ticking in the daemon, and the Quo sandbox as its own process.
Faults on the same path (a killed run, outages, ...) are in test_faults.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.crms.scalingtest import skipped_record_count


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
    assert first["totalSynced"] + first["totalFailed"] == first["totalRecords"]
    assert first["quoContacts"] == first["totalSynced"] and first["quoDuplicateExternalIds"] == 0
    code, second = _demo(tmp_path / "home", 150, crm)
    assert code == 0 and second["state"] == "COMPLETED"
    assert second["quoWriteRequests"] == 0 and second["quoContacts"] == first["quoContacts"]
