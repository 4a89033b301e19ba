"""The factory's jobs, assets and sensors on a real (temporary) Dagster instance, a real SQLite
store and the Quo sandbox over HTTP. The daemon-driven path is in test_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, skipped_record_count
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.instance import render_instance_yaml
from quo_sync_dagster.orchestration.metadata import event_tags
from quo_sync_dagster.orchestration.sync import frame_records, page_key, sync_records
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    TAG_CRM,
    TAG_INTEGRATION,
    TAG_INTERNAL,
    TAG_OBJECT_TYPE,
    TAG_PROCESS,
    TAG_RETRY,
)
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    close_processes,
    evaluate_sensor,
    launch_initial_sync,
    pipeline,
    run_request,
    sync_range,
)

REPO = Path(__file__).resolve().parents[1]
CONTACTS = dg.AssetKey("scalingtest_quo_contacts")


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
    assert event.metadata["state"].value == "COMPLETED"
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


PAGE_FIGURES = {
    "integration_id",
    "object_type",
    "process_id",
    "records",
    "synced",
    "failed",
    "skipped",
    "skipped_unchanged",
    "created",
    "updated",
    "adopted",
    "adoption_candidates",
    "unverified_phones",
    "started_at",
    "finished_at",
    "duration_s",
    "records_per_second",
}


def test_a_page_partition_carries_its_own_figures_and_tags_and_the_run_its_totals(
    env: Pipeline,
) -> None:
    process_id = _plan(env, records=450, page_size=200, pages_per_run=3)
    (plan_run,) = env.instance.get_run_records(dg.RunsFilter(job_name="scalingtest_initial_sync"))
    assert plan_run.dagster_run.tags[TAG_INTEGRATION] == "it-1"
    assert plan_run.dagster_run.tags[TAG_OBJECT_TYPE] == "MockPerson"
    (output,) = env.instance.all_logs(
        plan_run.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT
    )
    links = output.dagster_event.step_output_data.metadata["page_runs"].value
    assert f"(/runs?q[]=tag:quo_sync/process={process_id})" in links

    result = _sync_range(env, process_id, 0, 2)  # one run of pages of 200, 200 and 50 people
    assert result.success
    stored = env.store.page_results(process_id)
    keys = [page_key(process_id, i) for i in range(3)]
    logs = [e.user_message for e in env.instance.all_logs(result.run_id)]
    for key, size in zip(keys, (200, 200, 50), strict=True):
        page = stored[key]
        assert page.synced + page.skipped == size and page.skipped > 0
        (record,) = env.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=CONTACTS, asset_partitions=[key]), limit=5
        ).records
        event = record.asset_materialization
        meta = {k: v.value for k, v in event.metadata.items()}
        assert set(meta) == PAGE_FIGURES | {"errors"}  # no run or Process totals
        assert (meta["records"], meta["synced"], meta["skipped"], meta["failed"]) == (
            size,
            page.synced,
            page.skipped,
            0,
        )
        # records/s over the page's own seconds (each rounded for display: 0.1/s, 1 ms)
        rate, seconds = meta["records_per_second"], meta["duration_s"]
        assert abs(rate * seconds - size) <= 0.0005 * rate + 0.05 * seconds + 1e-4
        assert meta["finished_at"] >= meta["started_at"]
        skips = event.metadata["errors"].records  # the page's skipped people, with the reason
        assert len(skips) == page.skipped and {r.data["outcome"] for r in skips} == {"skipped"}
        tags = {TAG_INTEGRATION: "it-1", TAG_OBJECT_TYPE: "MockPerson", TAG_PROCESS: process_id}
        assert tags.items() <= event.tags.items() and event.tags[TAG_CRM] == "scalingtest"
        (fetched,) = env.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("scalingtest_crm_pages"), asset_partitions=[key]
            ),
            limit=5,
        ).records
        assert fetched.asset_materialization.metadata["dagster/row_count"].value == size
        assert tags.items() <= fetched.asset_materialization.tags.items()
        # one log line per page
        (line,) = [m for m in logs if m.startswith(f"page {key}:")]
        assert line.startswith(f"page {key}: fetched {size}, synced {page.synced} (")
    # The run's totals are on the run; it was launched without the integration's tags.
    run_tags = env.instance.get_run_by_id(result.run_id).tags
    assert run_tags["quo_sync/synced"] == str(sum(stored[k].synced for k in keys))
    assert run_tags["quo_sync/pages"] == "3" and run_tags["quo_sync/pages_failed"] == "0"
    assert run_tags[TAG_INTEGRATION] == "it-1" and run_tags[TAG_OBJECT_TYPE] == "MockPerson"


def test_every_crm_has_kinds_owners_and_tags_and_its_processes_follow_its_contacts() -> None:
    graph = defs.resolve_asset_graph()
    for crm in registered_connectors():
        pages, contacts, processes = (
            graph.get(dg.AssetKey(f"{crm}_{name}"))
            for name in ("crm_pages", "quo_contacts", "sync_processes")
        )
        assert processes.parent_keys == {contacts.key}
        assert contacts.parent_keys == {pages.key}
        assert pages.kinds == {crm, "pandas"}
        assert contacts.kinds == {crm, "quo", "pandas"}
        assert processes.kinds == {crm, "quo"}
        for node in (pages, contacts, processes):
            assert node.owners == ["team:quo-sync"] and node.tags[TAG_CRM] == crm
        checks = {k.name for k in graph.asset_check_keys if k.asset_key == processes.key}
        assert {
            "no_process_in_error",
            "all_pages_synced",
            "failed_share_below_max",
            "no_duplicate_contacts",
            "polling_fresh",
            "deletions_not_held",
            "webhooks_delivering",
        } <= checks
        page_sync = defs.resolve_job_def(f"{crm}_page_sync")
        assert page_sync.tags[TAG_INTERNAL] == "true"
        assert (page_sync.description or "").startswith("Internal")


def test_event_tags_hold_any_integration_id_and_only_values_a_range_shares() -> None:
    def process(pid: str, integration_id: str, object_type: str) -> Process:
        return Process(
            pid,
            integration_id,
            "n",
            "CRM_SYNC",
            ProcessState.PROCESSING_BATCHES,
            {"personObjectType": object_type},
        )

    odd = process("p1", "Acme Corp/EU #1", "MockPerson")
    tags = event_tags("scalingtest", [odd])
    assert tags[TAG_INTEGRATION] == "Acme_Corp_EU__1"
    dg.AssetMaterialization(asset_key="x", tags=tags)  # Dagster refuses other characters
    mixed = event_tags("scalingtest", [odd, process("p2", "Acme Corp/EU #1", "Other")])
    assert mixed == {TAG_CRM: "scalingtest", TAG_INTEGRATION: "Acme_Corp_EU__1"}


def _fail_pages_3_to_5(
    p: Pipeline, records: int, **settings: Any
) -> tuple[str, dg.ExecuteInProcessResult]:
    """Six pages in runs of three; the second run meets a Quo outage; both runs are over.
    Returns the Process and the failed run."""
    _integration(p, records, **settings)
    config = {"integration_id": "it-1", "page_size": 100, "pages_per_run": 3}
    launch_initial_sync(p, "scalingtest", config)
    (process,) = p.store.list_processes(integration_id="it-1")
    assert _sync_range(p, process.id, 0, 2).success
    p.quo.inject_fault(status=503, count=10_000)
    failed = _sync_range(p, process.id, 3, 5)
    assert not failed.success
    _register_finished_page_runs(p.instance, process.id, 2)
    return process.id, failed


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
    process_id, _ = _fail_pages_3_to_5(env, records, retry_backoff_seconds=0)
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
    assert closed.asset_events[0].metadata["state"].value == "COMPLETED"
    _assert_exactly_once(env, process_id, records)


def test_pages_still_failing_after_the_last_retry_close_the_process_as_error(
    env: Pipeline,
) -> None:
    records = 600
    process_id, _ = _fail_pages_3_to_5(env, records, retry_attempts=0)
    closed = close_processes(env, "scalingtest")
    assert closed.asset_events[0].metadata["state"].value == "ERROR"
    process = env.store.get_process(process_id)
    assert process.state is ProcessState.ERROR
    assert "3 of 6 pages not synced after 0 automatic retries" in process.context["error"]
    assert process.counters["pages_failed"] == 3

    # It sat in ERROR for an hour (moved back in time: its start and its entering ERROR).
    hour = timedelta(hours=1)
    env.store.update_context(
        process_id,
        {
            key: (datetime.fromisoformat(process.context[key]) - hour).isoformat()
            for key in ("startTime", "errorTimestamp")
        },
    )
    # A later run of those pages (a backfill from the UI) reopens and completes it.
    env.quo.clear_faults()
    assert _sync_range(env, process_id, 3, 5).success
    closed = close_processes(env, "scalingtest")
    _assert_exactly_once(env, process_id, records)
    # Its duration and throughput count the syncing, not the hour in ERROR.
    (event,) = [e for e in closed.asset_events if isinstance(e, dg.AssetMaterialization)]
    meta = {k: v.value for k, v in event.metadata.items()}
    ctx = env.store.get_process(process_id).context
    lived = datetime.fromisoformat(ctx["endTime"]) - datetime.fromisoformat(ctx["startTime"])
    assert meta["seconds_in_error"] >= hour.total_seconds()
    assert meta["duration_s"] == pytest.approx(
        lived.total_seconds() - ctx["secondsInError"], abs=0.01
    )
    assert meta["records_per_second"] == pytest.approx(records / meta["duration_s"], rel=0.01)
    assert _check(closed, "no_process_in_error").passed


def test_only_the_page_sensors_first_run_skips_lookups_a_backfill_looks_contacts_up(
    env: Pipeline,
) -> None:
    """Quo held no contact of the source at planning, so the page sensor's own run of a new
    page sends creates without lookups. A backfill (tagged like a page run by the run
    coordinator, but not launched by the sensor) may follow a create whose outcome was lost:
    it looks unmapped contacts up first."""
    process_id = _plan(env, records=200, page_size=100, pages_per_run=1)
    assert env.store.get_process(process_id).context["quoSourceEmptyAtStart"]
    assets = [defs.get_assets_def(f"scalingtest_{name}") for name in ("crm_pages", "quo_contacts")]

    def lookups() -> int:
        return env.quo.stats()["byKind"]["lookup"]

    before = lookups()
    assert _sync_range(env, process_id, 0, 0).success  # as the page sensor launches it
    assert lookups() == before
    backfill = dg.materialize(
        assets,
        instance=env.instance,
        resources=env.resources,
        partition_key=page_key(process_id, 1),
        tags={TAG_PROCESS: process_id, "dagster/backfill": "abc123"},
    )
    assert backfill.success
    assert lookups() > before
    assert env.quo.stats()["duplicateExternalIds"] == 0


def _retry_failed_pages(p: Pipeline, **config: str) -> dg.ExecuteInProcessResult:
    return defs.get_job_def("scalingtest_retry_failed_pages").execute_in_process(
        run_config={"ops": {"scalingtest_request_page_retries": {"config": config}}},
        instance=p.instance,
        resources=p.resources,
        raise_on_error=False,
    )


def test_the_retry_job_reopens_an_error_process_and_its_pages_rerun_through_the_sensor(
    env: Pipeline,
) -> None:
    records = 600
    process_id, _ = _fail_pages_3_to_5(env, records, retry_attempts=0)
    keys = [page_key(process_id, i) for i in range(6)]
    assert close_processes(env, "scalingtest").asset_events[0].metadata["state"].value == "ERROR"
    automatic = env.instance.get_run_records(dg.RunsFilter(tags={TAG_PROCESS: process_id}))

    # The outage is still on: the operator's retry launches the failed pages once more, as
    # page runs of the sensor (the project's tags, the run queue), and they fail again.
    for round_ in (1, 2):
        retry = _retry_failed_pages(env, integration_id="it-1")
        assert retry.success
        assert retry.dagster_run.tags[TAG_INTEGRATION] == "it-1"
        assert env.store.get_process(process_id).state is ProcessState.PROCESSING_BATCHES
        (request,) = _evaluate(env, "scalingtest_completion_sensor").run_requests
        assert request.job_name == "scalingtest_page_sync"
        assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (keys[3], keys[5])
        assert request.tags[TAG_CRM] == "scalingtest" and "dagster/max_runtime" in request.tags
        assert request.tags[TAG_PROCESS] == process_id and request.tags[TAG_RETRY] == "1"
        # Each round has its own run key: the sensor launches a key only once.
        assert request.run_key == f"{process_id}:r{round_}.retry1:3-5"
        if round_ == 1:
            assert not run_request(env, request).success  # still failing: ERROR again
            (event,) = close_processes(env, "scalingtest").asset_events[:1]
            assert event.metadata["state"].value == "ERROR"
    # The outage over, the second round's run syncs them; the Process completes, each person
    # in Quo once.
    env.quo.clear_faults()
    assert run_request(env, request).success
    closed = close_processes(env, "scalingtest")
    assert closed.asset_events[0].metadata["state"].value == "COMPLETED"
    _assert_exactly_once(env, process_id, records)
    assert len(env.instance.get_run_records(dg.RunsFilter(tags={TAG_PROCESS: process_id}))) > (
        len(automatic)
    )
    # Nothing left to retry: the job says so and launches nothing.
    done = _retry_failed_pages(env, process_id=process_id)
    assert done.success
    (output,) = [e for e in done.all_events if e.is_successful_output]
    assert output.step_output_data.metadata["processes_retried"].value == 0
    assert isinstance(_evaluate(env, "scalingtest_completion_sensor"), dg.SkipReason)


def test_the_retry_job_refuses_unclear_or_foreign_targets(env: Pipeline) -> None:
    _integration(env, 100)
    add_integration(env, "pipedrive", {}, integration_id="pd-1")
    for config, why in [
        ({}, "give either integration_id or process_id"),
        ({"integration_id": "it-1", "process_id": "x"}, "give either"),
        ({"integration_id": "nope"}, "integration 'nope' is not registered for scalingtest"),
        ({"integration_id": "pd-1"}, "is a pipedrive integration, not scalingtest"),
        ({"process_id": "nope"}, "no Process 'nope'"),
    ]:
        result = _retry_failed_pages(env, **config)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert why in str(failure.step_failure_data.error.message), config


def test_failed_pages_show_why_on_their_partitions_and_an_error_process_fails_its_checks(
    env: Pipeline,
) -> None:
    process_id, failed_run = _fail_pages_3_to_5(env, 600, retry_attempts=0)
    keys = [page_key(process_id, i) for i in range(6)]
    # The failed run's message names its failed partitions.
    (failure,) = [e for e in failed_run.all_events if e.is_step_failure]
    message = str(failure.step_failure_data.error.message)
    assert "3 of 3 pages failed" in message and all(k in message for k in keys[3:])
    assert message.rstrip().endswith("/assets/scalingtest_quo_contacts?view=partitions")
    # Each failed partition has an observation saying why.
    stored = {e.page: e.error for e in env.store.recent_errors(process_id)}
    for key in keys[3:]:
        (observation,) = env.instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=CONTACTS, asset_partitions=[key]), limit=5
        ).records
        meta = observation.asset_observation.metadata
        assert meta["error"].value == stored[key] and stored[key].startswith("page failed")
        assert meta["integration_id"].value == "it-1"
        assert observation.asset_observation.tags[TAG_INTEGRATION] == "it-1"

    closed = close_processes(env, "scalingtest")
    # The ERROR Process's event says why and for which integration; its checks fail.
    (event,) = [e for e in closed.asset_events if isinstance(e, dg.AssetMaterialization)]
    error = env.store.get_process(process_id).context["error"]
    assert event.metadata["state"].value == "ERROR" and event.metadata["error"].value == error
    assert event.metadata["integration_id"].value == "it-1"
    assert event.tags[TAG_INTEGRATION] == "it-1" and event.tags[TAG_PROCESS] == process_id
    in_error = _check(closed, "no_process_in_error")
    assert not in_error.passed and in_error.severity is dg.AssetCheckSeverity.ERROR
    assert in_error.description is not None
    assert in_error.description.startswith(
        f"integration it-1 (MockPerson): Process {process_id} (initial sync) ended in ERROR: "
        f"{error}"
    )
    assert "launch scalingtest_retry_failed_pages for the integration" in in_error.description
    unsynced = _check(closed, "all_pages_synced")
    assert not unsynced.passed
    assert unsynced.description is not None
    assert f"3 of 6 pages of Process {process_id} not synced (3 failed, 0 never ran" in (
        unsynced.description
    )


def _check(result: Any, name: str) -> dg.AssetCheckEvaluation:
    """The evaluation of check `name` the completion sensor reported."""
    (evaluation,) = [
        e
        for e in result.asset_events
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == name
    ]
    return evaluation


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
