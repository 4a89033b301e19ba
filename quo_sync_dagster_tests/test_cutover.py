"""Cutover from an earlier sync: the adoption settings, and the demo on a Quo workspace the
earlier production sync filled, through the real deployment path (`dagster dev`, runs launched
as the UI launches them). The upserter's adoption itself is tested in test_upsert.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.adoption import AdoptionRules
from quo_sync_dagster.crms.scalingtest import skipped_record_count
from quo_sync_dagster_tests.pipeline import run_demo


def test_adoption_settings_default_to_none_and_parse() -> None:
    assert AdoptionRules.from_settings({}) == AdoptionRules()
    assert not AdoptionRules().configured and AdoptionRules().rewrite_ids
    rules = AdoptionRules.from_settings(
        {
            "legacy_sources": ["openphone-pipedrive", "openphone-pipedrive", "axiscare"],
            "legacy_external_id": "pd-{id}",
            "adopt_rewrites_ids": False,
        }
    )
    assert rules.legacy_sources == ("openphone-pipedrive", "axiscare")
    assert rules.configured and not rules.rewrite_ids and not rules.by_phone
    assert rules.legacy_id("42") == "pd-42"
    assert rules.legacy_id("9" * 73) is None  # longer than Quo's 75 characters
    assert rules.fits_legacy_id("pd-7") and not rules.fits_legacy_id("pd-")
    assert AdoptionRules.from_settings({"adopt_by_phone": True}).configured


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("legacy_sources", "openphone-pipedrive"),  # a string, not a list
        ("legacy_sources", [""]),
        ("legacy_sources", ["s" * 76]),
        ("legacy_sources", [7]),
        ("legacy_external_id", "pd-"),
        ("legacy_external_id", "{id}-{id}"),
        ("legacy_external_id", "x" * 75 + "{id}"),
        ("legacy_external_id", 5),
        ("adopt_rewrites_ids", "false"),
        ("adopt_by_phone", 1),
    ],
)
def test_a_bad_adoption_setting_is_an_error_naming_it(setting: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"setting {setting} "):
        AdoptionRules.from_settings({setting: value})


def test_demo_on_a_workspace_an_earlier_sync_filled_adopts_it_without_duplicates(
    tmp_path: Path,
) -> None:
    records = 1100  # 1,000 the earlier sync wrote, the rest new since
    legacy = ["--records", str(records), "--legacy-contacts", "1000", "--legacy-changed", "50"]
    code, first = run_demo(tmp_path / "home", *legacy)
    with_phone = records - skipped_record_count(records)
    assert code == 0 and first["state"] == "COMPLETED", first
    assert (first["legacyContacts"], first["adopted"]) == (1000, 1000)
    assert first["quoContacts"] == first["crmPeople"] == with_phone == first["totalSynced"]
    assert first["quoLegacyContacts"] == 0  # every one moved to this product's source and ids
    assert first["quoDuplicateExternalIds"] == first["duplicates"] == 0
    assert (first["missing"], first["stale"], first["orphans"]) == (0, 0, 0)  # the 50 applied
    assert first["quoWriteRequests"] == with_phone  # a PATCH per adopted, a create per new
    assert first["adoptionCandidates"] == 0

    code, second = run_demo(tmp_path / "home", *legacy)  # Quo holds contacts now: no prefill
    assert code == 0 and second["state"] == "COMPLETED", second
    assert (second["legacyContacts"], second["adopted"], second["quoWriteRequests"]) == (0, 0, 0)
    assert second["skippedUnchanged"] == with_phone
    assert second["quoContacts"] == with_phone and second["stale"] == 0
