from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quo_sync_dagster.cli import main
from quo_sync_dagster.store import open_store


def test_integrations_add_stores_references_and_typed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path}/store.sqlite"
    args = ["integrations", "add", "--store", uri, "--id", "acme", "--crm", "scalingtest"]
    args += ["--quo-key-ref", "env:ACME_QUO_KEY", "--region", "GB"]
    args += ["--setting", "records=5000", "--setting", "label=west"]
    assert main(args) == 0
    integration = open_store(uri).get_integration("acme")
    assert integration.quo_api_key_ref == "env:ACME_QUO_KEY"
    assert integration.default_region == "GB"
    assert integration.settings == {"records": 5000, "label": "west"}

    assert main(["integrations", "list", "--store", uri]) == 0
    assert "acme\tscalingtest" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["integrations", "add", "--crm", "scalingtest"], "--id"),
        (["integrations", "add", "--id", "x", "--crm", "hubspot"], "hubspot"),
        (["demo", "--crm", "nope"], "nope"),
        (["demo", "--changes", "-3"], "'-3'"),
    ],
)
def test_bad_arguments_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_malformed_setting_is_named(tmp_path: Path) -> None:
    args = ["integrations", "add", "--store", f"sqlite:///{tmp_path}/s.sqlite", "--id", "a"]
    args += ["--crm", "scalingtest", "--quo-key-ref", "env:K", "--setting", "records"]
    with pytest.raises(SystemExit, match="KEY=VALUE, got 'records'"):
        main(args)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("phone_policy=strict", "phone_policy must be one of"),
        ("sync_people_without_phone=1", "sync_people_without_phone must be true or false"),
        ('legacy_sources="openphone-zoho"', "legacy_sources must be a list"),
        ('object_types=["Planets"]', "object_types must be a non-empty list of"),
    ],
)
def test_a_setting_every_run_would_refuse_is_refused_when_added(
    tmp_path: Path, setting: str, message: str
) -> None:
    uri = f"sqlite:///{tmp_path}/s.sqlite"
    args = ["integrations", "add", "--store", uri, "--id", "a", "--crm", "scalingtest"]
    args += ["--quo-key-ref", "env:K", "--setting", setting]
    with pytest.raises(SystemExit, match=f"integration 'a': setting {message}"):
        main(args)
    assert open_store(uri).list_integrations() == []


def test_demo_with_changes_ends_with_quo_equal_to_the_crm(tmp_path: Path) -> None:
    """`demo --changes`: Attio (webhooks, merges) changed during and after the initial sync;
    webhooks and one polling cycle; the RESULT line's differential is exact."""
    args = ["demo", "--crm", "attio", "--records", "60", "--changes", "8", "--seed", "3"]
    args += ["--home", str(tmp_path / "home"), "--quo-rate-limit", "0", "--exit-when-done"]
    proc = subprocess.run(
        [sys.executable, "-m", "quo_sync_dagster", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(last.removeprefix("RESULT "))
    assert proc.returncode == 0, result
    assert (result["state"], result["pollState"]) == ("COMPLETED", "COMPLETED")
    assert [result[k] for k in ("missing", "stale", "duplicates", "orphans")] == [0, 0, 0, 0]
    assert result["crmPeople"] == result["quoContacts"] > 0
    assert set(result["changes"]) == {"create", "update", "delete", "merge"}
    assert result["changesDuringInitialSync"] == 4
    assert "full scan" in result["pollListing"]
