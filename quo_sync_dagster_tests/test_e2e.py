"""The real deployment path: `dagster dev` (webserver + daemon), runs launched through GraphQL as
the UI launches them, sensors ticking in the daemon, and the Quo sandbox as its own process.
Faults on the same path (a killed run, outages, ...) are in test_faults.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.crms.scalingtest import skipped_record_count
from quo_sync_dagster_tests.pipeline import run_demo


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
