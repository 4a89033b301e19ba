"""The sync health checks on `<crm>_sync_processes` (sync_checks.py) on a real temporary Dagster
instance, a real SQLite store and the Quo sandbox: as the completion sensor reports them when a
Process closes, as they run on demand from the UI, and as the freshness sensor reports them.
The ERROR and unsynced-pages checks are in test_orchestration.py, beside the failed pages."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from quo_sync_dagster.core.models import ContactLink
from quo_sync_dagster.core.process import Process
from quo_sync_dagster.crms.scalingtest import skipped_record_count
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.sync_checks import (
    DUPLICATES_CHECK,
    FAILED_SHARE_CHECK,
    FRESHNESS_CHECK,
    sync_check_evaluations,
)
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    evaluate_sensor,
    launch_initial_sync,
    pipeline,
    sync_everything,
    sync_planned,
)

CRM = "scalingtest"
KEY = dg.AssetKey(f"{CRM}_sync_processes")


@pytest.fixture
def p(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    with pipeline(tmp_path, monkeypatch) as p:
        yield p


def _reported(result: Any, name: str) -> dg.AssetCheckEvaluation:
    """The evaluation of check `name` among a sensor result's events."""
    (evaluation,) = [
        e
        for e in result.asset_events
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == name
    ]
    return evaluation


def _on_demand(p: Pipeline, name: str) -> dg.AssetCheckEvaluation:
    """Run the check as the asset's Checks tab does: a run of just that check."""
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(), asset_check_selection={dg.AssetCheckKey(KEY, name)}
    )
    result = job.execute_in_process(instance=p.instance, resources=p.resources)
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def _change_settings(p: Pipeline, integration_id: str, **settings: Any) -> None:
    integration = p.store.get_integration(integration_id)
    p.store.upsert_integration(
        dataclasses.replace(integration, settings={**integration.settings, **settings})
    )


def _initial_sync(p: Pipeline, integration_id: str) -> tuple[Process, Any]:
    """The integration's initial sync, closed; with the completion sensor's last result."""
    known = {q.id for q in p.store.list_processes()}
    assert launch_initial_sync(p, CRM, {"integration_id": integration_id}).success
    planned = [q for q in p.store.list_processes() if q.id not in known]
    (process,), closed = sync_planned(p, CRM, planned)
    return process, closed


def test_failed_records_above_the_max_share_fail_the_check_skipped_ones_do_not(
    p: Pipeline,
) -> None:
    records = 100
    add_integration(p, CRM, {"records": records})
    clean, closed = _initial_sync(p, "it-1")
    # 2% of the people have no usable phone: skipped, more than the 1% default, not failures.
    assert clean.counters["skipped"] == skipped_record_count(records) > records * 0.01
    assert _reported(closed, FAILED_SHARE_CHECK).passed

    # it-2's CRM sends malformed people (an id that is a list, a name that is an object...).
    add_integration(p, CRM, {"records": records, "hostile_share": 0.3}, integration_id="it-2")
    faulty, closed = _initial_sync(p, "it-2")
    failed = faulty.counters["failed"]
    tried = faulty.counters["synced"] + failed
    assert failed > tried * 0.01
    evaluation = _reported(closed, FAILED_SHARE_CHECK)
    assert not evaluation.passed
    assert evaluation.severity is dg.AssetCheckSeverity.WARN
    assert evaluation.description is not None
    assert (
        f"integration it-2 (MockPerson): {failed} of {tried} records failed"
        in evaluation.description
    )
    assert "integration it-1" not in evaluation.description
    assert "max_failed_share" in evaluation.description  # what to do
    (finding,) = evaluation.metadata["findings"].value
    assert (finding["integration_id"], finding["failed"]) == ("it-2", failed)

    # The threshold is the integration's setting.
    _change_settings(p, "it-2", max_failed_share=failed / tried + 0.01)
    assert _on_demand(p, FAILED_SHARE_CHECK).passed


def test_duplicate_contacts_are_found_in_the_links_and_in_quo_on_demand(p: Pipeline) -> None:
    add_integration(p, CRM, {"records": 30})
    sync_everything(p, CRM, {"integration_id": "it-1"})
    assert _on_demand(p, DUPLICATES_CHECK).passed
    links = dict(p.store.iter_contact_links("it-1"))
    (first, link), (second, _) = list(links.items())[:2]

    # A twin in Quo under an existing externalId (Quo does not promise to refuse one): the
    # links cannot see it, the listing does.
    p.quo.accept_duplicates()
    p.quo.prefill_contacts(
        [{"defaultFields": {"firstName": "Twin"}, "source": CRM, "externalId": first}]
    )
    assert p.quo.stats()["duplicateExternalIds"] == 1
    from_links = {e.check_name: e for e in sync_check_evaluations(p.store, CRM, KEY)}
    assert from_links[DUPLICATES_CHECK].passed
    on_demand = _on_demand(p, DUPLICATES_CHECK)
    assert not on_demand.passed
    assert on_demand.description is not None
    assert (
        f"integration it-1: 1 externalIds are held by more than one Quo contact ({first})"
        in on_demand.description
    )
    assert on_demand.metadata["listed_in_quo"].value == "it-1"

    # One Quo contact linked from two externalIds: seen from the links alone.
    p.store.put_contact_links("it-1", {second: ContactLink(link.quo_id, "")})
    from_links = {e.check_name: e for e in sync_check_evaluations(p.store, CRM, KEY)}
    evaluation = from_links[DUPLICATES_CHECK]
    assert not evaluation.passed
    assert evaluation.description is not None
    assert "integration it-1: 1 Quo contacts are linked from two externalIds" in (
        evaluation.description
    )
    assert f"{first} & {second}" in evaluation.description


def test_polling_freshness_fails_when_the_last_successful_sync_is_older_than_two_intervals(
    p: Pipeline,
) -> None:
    add_integration(p, CRM, {"records": 20, "poll_interval_minutes": 30})
    add_integration(p, CRM, {"records": 20}, integration_id="never-synced")
    (process,) = sync_everything(p, CRM, {"integration_id": "it-1"})
    sensor = f"{CRM}_freshness_sensor"
    first = evaluate_sensor(p, sensor)
    assert _reported(first, FRESHNESS_CHECK).passed  # the first tick reports
    assert isinstance(evaluate_sensor(p, sensor, first.cursor), dg.SkipReason)  # no change

    # The sync ran three hours ago: ScalingTest's schedule ticks hourly, so one is overdue.
    started = datetime.now(UTC) - timedelta(hours=3)
    p.store.update_context(process.id, {"startTime": started.isoformat()})
    stale = evaluate_sensor(p, sensor, first.cursor)
    evaluation = _reported(stale, FRESHNESS_CHECK)
    assert not evaluation.passed
    assert evaluation.description is not None
    assert evaluation.description.startswith("integration it-1 (MockPerson): the last successful")
    assert "polling is due every 60 minutes" in evaluation.description
    assert f"{CRM}_poll" in evaluation.description  # what to do
    assert "never-synced" not in evaluation.description  # its initial sync comes first
    assert json.loads(stale.cursor) == [["it-1", "MockPerson"]]
    assert isinstance(evaluate_sensor(p, sensor, stale.cursor), dg.SkipReason)

    # An integration that does not poll is never stale.
    _change_settings(p, "it-1", polling=False)
    assert _on_demand(p, FRESHNESS_CHECK).passed
