"""The factory's jobs, assets and sensors on a real (temporary) Dagster instance, a real SQLite
store and the Quo sandbox over HTTP. The daemon-driven path is in test_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, skipped_record_count
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.instance import render_instance_yaml
from quo_sync_dagster.orchestration.sync import frame_records, page_key, sync_records
from quo_sync_dagster.orchestration.tags import RANGE_END, RANGE_START, TAG_PROCESS, TAG_RETRY
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    close_processes,
    evaluate_sensor,
    launch_initial_sync,
    pipeline,
    sync_range,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    with pipeline(tmp_path, monkeypatch) as p:
        yield p


def _integration(p: Pipeline, records: int, **settings: Any) -> None:
    add_integration(p, "scalingtest", {"records": records, **settings})


def _plan(p: Pipeline, records: int, page_size: int, pages_per_run: int) -> str:
    _integration(p, records)
    config = {"integration_id": "it-1", "page_size": page_size, "pages_per_run": pages_per_run}
    launch_initial_sync(p, "scalingtest", config)
    (process,) = p.store.list_processes(integration_id="it-1")
    return process.id


def _sync_range(p: Pipeline, process_id: str, first: int, last: int) -> dg.ExecuteInProcessResult:
    return sync_range(p, "scalingtest", process_id, first, last)


def _evaluate(p: Pipeline, name: str, cursor: str | None = None) -> Any:
    return evaluate_sensor(p, name, cursor)


def test_definitions_load_and_top_level_dagster_yaml_is_rendered() -> None:
    with dg.instance_for_test():  # never an instance an earlier test left behind
        dg.Definitions.validate_loadable(defs)
    assert (REPO / "dagster.yaml").read_text() == render_instance_yaml()


def test_plan_adds_one_partition_per_page_for_an_exact_multiple(env: Pipeline) -> None:
    process_id = _plan(env, records=1000, page_size=200, pages_per_run=2)
    process = env.store.get_process(process_id)
    assert process.state is ProcessState.PROCESSING_BATCHES
    assert process.context["totalRecords"] == 1000 and process.context["totalPages"] == 5
    keys = env.instance.get_dynamic_partitions("scalingtest_pages")
    assert keys == [page_key(process_id, i) for i in range(5)]


def test_page_sensor_launches_ranged_runs_once(env: Pipeline) -> None:
    process_id = _plan(env, records=1000, page_size=100, pages_per_run=4)
    result = _evaluate(env, "scalingtest_page_sensor")
    ranges = [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in result.run_requests]
    assert ranges == [
        (page_key(process_id, 0), page_key(process_id, 3)),
        (page_key(process_id, 4), page_key(process_id, 7)),
        (page_key(process_id, 8), page_key(process_id, 9)),
    ]
    assert len({r.run_key for r in result.run_requests}) == 3
    assert all(r.tags[TAG_PROCESS] == process_id for r in result.run_requests)
    again = _evaluate(env, "scalingtest_page_sensor", cursor=result.cursor)
    assert isinstance(again, dg.SkipReason)


def test_ranged_runs_sync_everything_and_the_completion_sensor_closes_the_process(
    env: Pipeline,
) -> None:
    records, page_size = 1000, 200  # an exact multiple: the production peer never completed it
    process_id = _plan(env, records=records, page_size=page_size, pages_per_run=3)
    assert isinstance(_evaluate(env, "scalingtest_completion_sensor"), dg.SkipReason)
    for first in range(0, 5, 3):
        assert _sync_range(env, process_id, first, min(first + 3, 5) - 1).success
    closed = close_processes(env, "scalingtest")
    (event,) = [e for e in closed.asset_events if isinstance(e, dg.AssetMaterialization)]
    assert event.metadata["process_state"].value == "COMPLETED"
    process = env.store.get_process(process_id)
    bad = skipped_record_count(records)
    assert process.state is ProcessState.COMPLETED
    assert process.counters["synced"] == records - bad and process.counters["skipped"] == bad
    assert process.counters["failed"] == 0
    assert process.counters["pages_processed"] == 5
    stats = env.quo.stats()
    assert stats["contactsBySource"]["scalingtest"] == records - bad
    assert stats["duplicateExternalIds"] == 0
    # per-page metadata reached the materializations of each partition
    mats = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("scalingtest_quo_contacts"),
            asset_partitions=[page_key(process_id, 0)],
        ),
        limit=1,
    ).records
    meta = mats[0].asset_materialization.metadata
    assert meta["records"].value == page_size
    assert meta["synced"].value + meta["skipped"].value == page_size


def _fail_pages_3_to_5(p: Pipeline, records: int, **settings: Any) -> str:
    """Six pages in runs of three; the second run meets a Quo outage; both runs are over."""
    _integration(p, records, **settings)
    config = {"integration_id": "it-1", "page_size": 100, "pages_per_run": 3}
    launch_initial_sync(p, "scalingtest", config)
    (process,) = p.store.list_processes(integration_id="it-1")
    assert _sync_range(p, process.id, 0, 2).success
    p.quo.inject_fault(status=503, count=10_000)
    assert not _sync_range(p, process.id, 3, 5).success
    _register_finished_page_runs(p.instance, process.id, 2)
    return process.id


def _assert_exactly_once(p: Pipeline, process_id: str, records: int) -> None:
    process = p.store.get_process(process_id)
    bad = skipped_record_count(records)
    assert process.state is ProcessState.COMPLETED
    assert process.counters["processed"] == records
    assert process.counters["synced"] + process.counters["skipped"] == records
    assert process.counters["skipped"] == bad and process.counters["failed"] == 0
    assert process.counters["pages_failed"] == 0 and process.counters["pages_processed"] == 6
    stats = p.quo.stats()
    assert stats["duplicateExternalIds"] == 0
    assert stats["contactsBySource"]["scalingtest"] == records - bad


def test_failed_pages_are_retried_by_the_completion_sensor_after_a_backoff(
    env: Pipeline,
) -> None:
    records = 600
    process_id = _fail_pages_3_to_5(env, records, retry_backoff_seconds=0)
    assets_def = defs.get_assets_def("scalingtest_quo_contacts")
    keys = [page_key(process_id, i) for i in range(6)]
    status = env.instance.get_status_by_partition(
        dg.AssetKey("scalingtest_quo_contacts"), keys, assets_def.partitions_def
    )
    assert [status[k].value for k in keys[3:]] == ["FAILED"] * 3
    assert [status[k].value for k in keys[:3]] == ["MATERIALIZED"] * 3

    # First tick: the stall is noted and the backoff starts; the Process stays open.
    assert isinstance(_evaluate(env, "scalingtest_completion_sensor"), dg.SkipReason)
    process = env.store.get_process(process_id)
    assert process.state is ProcessState.PROCESSING_BATCHES
    assert process.context["recovery"]["attempt"] == 0
    # Next tick, the backoff (0 s here) over: one retry run of exactly the failed pages.
    (retry,) = _evaluate(env, "scalingtest_completion_sensor").run_requests
    assert retry.job_name == "scalingtest_page_sync"
    assert (retry.tags[RANGE_START], retry.tags[RANGE_END]) == (keys[3], keys[5])
    assert retry.tags[TAG_RETRY] == "1"

    env.quo.clear_faults()  # the outage ends; the retry run does what the daemon would launch
    before = env.quo.stats()["byKind"]
    assert _sync_range(env, process_id, 3, 5).success
    after = env.quo.stats()["byKind"]
    # Only the failed pages' contacts were written; the good pages cost nothing again.
    assert after["create"] - before["create"] == 300 - skipped_record_count(300)
    closed = close_processes(env, "scalingtest")
    assert closed.asset_events[0].metadata["process_state"].value == "COMPLETED"
    _assert_exactly_once(env, process_id, records)


def test_pages_still_failing_after_the_last_retry_close_the_process_as_error(
    env: Pipeline,
) -> None:
    records = 600
    process_id = _fail_pages_3_to_5(env, records, retry_attempts=0)
    closed = close_processes(env, "scalingtest")
    assert closed.asset_events[0].metadata["process_state"].value == "ERROR"
    process = env.store.get_process(process_id)
    assert process.state is ProcessState.ERROR
    assert "3 of 6 pages not synced after 0 automatic retries" in process.context["error"]
    assert process.counters["pages_failed"] == 3

    # A later run of those pages (a backfill from the UI) reopens and completes it.
    env.quo.clear_faults()
    assert _sync_range(env, process_id, 3, 5).success
    close_processes(env, "scalingtest")
    _assert_exactly_once(env, process_id, records)


def _register_finished_page_runs(instance: dg.DagsterInstance, process_id: str, n: int) -> None:
    """materialize() runs are not page-job runs; record the sensor-launched runs the completion
    sensor counts before it declares a process failed, as finished."""
    for _ in range(n):
        run = instance.create_run_for_job(
            defs.get_job_def("scalingtest_page_sync"), tags={TAG_PROCESS: process_id}
        )
        instance.report_run_failed(run)


def test_dagster_definitions_validate_cli(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-w",
            str(REPO / "workspace.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed validation" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"integration_id": "nope"}, "'nope'"),
        ({"integration_id": "it-1", "modified_since": "last tuesday"}, "'last tuesday'"),
        ({"integration_id": "it-1", "object_types": ["Planet"]}, "Planet"),
        ({"integration_id": "no-key"}, "QUO_SYNC_UNSET_KEY"),
    ],
)
def test_bad_launch_config_fails_with_an_error_naming_it(
    env: Pipeline, config: dict, message: str
) -> None:
    _integration(env, 10)
    env.store.upsert_integration(
        Integration("no-key", "scalingtest", "env:QUO_SYNC_UNSET_KEY", env.quo.url)
    )
    result = launch_initial_sync(env, "scalingtest", config, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert message in str(failure.step_failure_data.error.message)
    assert env.store.list_processes() == []


def test_modified_since_syncs_only_people_changed_after_it(env: Pipeline) -> None:
    _integration(env, 500)
    config = {"integration_id": "it-1", "modified_since": "2025-12-31T23:00:00"}  # naive = UTC
    launch_initial_sync(env, "scalingtest", config)
    (process,) = env.store.list_processes()
    # ScalingTest people are one minute apart, newest at 2026-01-01T00:00Z: 60 are newer.
    assert process.context["totalRecords"] == 60


def test_a_crm_without_a_total_is_walked_once_then_synced_by_cursor(env: Pipeline) -> None:
    records = 450
    _integration(env, records, paging="cursor")
    launch_initial_sync(env, "scalingtest", {"integration_id": "it-1", "page_size": 100})
    (process,) = env.store.list_processes()
    assert process.context["totalRecords"] == records and process.context["totalPages"] == 5
    assert process.context["pageCursors"] == [None, "100", "200", "300", "400"]
    assert _sync_range(env, process.id, 0, 4).success
    close_processes(env, "scalingtest")
    process = env.store.get_process(process.id)
    bad = skipped_record_count(records)
    assert process.state is ProcessState.COMPLETED
    assert process.counters["synced"] == records - bad and process.counters["skipped"] == bad
    assert process.counters["failed"] == 0
    assert env.quo.stats()["contactsBySource"]["scalingtest"] == records - bad


def test_a_crm_that_lists_oldest_first_gets_its_last_pages_launched_first(
    env: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ScalingTestConnector.crm_config
    sync = config.sync_config.model_copy(update={"lists_oldest_first": True})
    monkeypatch.setattr(
        ScalingTestConnector, "crm_config", config.model_copy(update={"sync_config": sync})
    )
    process_id = _plan(env, records=1000, page_size=100, pages_per_run=4)
    result = _evaluate(env, "scalingtest_page_sensor")
    assert [r.tags[RANGE_START] for r in result.run_requests] == [
        page_key(process_id, 8),
        page_key(process_id, 4),
        page_key(process_id, 0),
    ]


def test_runs_of_a_single_page_sync_it(env: Pipeline) -> None:
    records = 150
    process_id = _plan(env, records=records, page_size=100, pages_per_run=1)
    assert _sync_range(env, process_id, 0, 0).success
    assert _sync_range(env, process_id, 1, 1).success
    close_processes(env, "scalingtest")
    process = env.store.get_process(process_id)
    assert process.state is ProcessState.COMPLETED
    assert process.counters["synced"] + process.counters["skipped"] == records


def test_a_record_that_breaks_the_transform_fails_alone(
    env: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    integration = add_integration(env, "scalingtest", {"records": 3})
    connector = ScalingTestConnector(integration)
    records = [connector.person(i) for i in range(3)]
    transform = connector.transform_person_to_quo

    def breaks_on_the_second(record: dict[str, Any], object_type: str) -> Any:
        if record["id"] == "st-0000001":  # a bug in the transform, not a bad value
            raise RuntimeError("transform bug")
        return transform(record, object_type)

    monkeypatch.setattr(connector, "transform_person_to_quo", breaks_on_the_second)
    with QuoClient(env.quo.url, "test-key") as client:
        result = sync_records(
            connector,
            ContactUpserter(client, env.store, integration.id),
            records,
            "MockPerson",
            "p0",
            False,
        )
    assert (result.records, result.synced, result.failed) == (3, 2, 1)
    (error,) = result.errors
    assert error.external_id == "st-0000001"
    assert error.error == "RuntimeError: transform bug"


def test_page_frames_give_back_records_as_the_crm_sent_them() -> None:
    records = [{"id": 1, "name": "A", "tags": ["x"]}, {"id": 2, "phone": None}]
    assert frame_records(pd.DataFrame(records, dtype=object)) == records


def test_production_dagster_yaml_keeps_the_per_crm_run_limits() -> None:
    production = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    rendered = yaml.safe_load(render_instance_yaml())
    assert (
        production["concurrency"]["runs"]["tag_concurrency_limits"]
        == rendered["concurrency"]["runs"]["tag_concurrency_limits"]
    )
