"""`<crm>_completion_sensor`: closes each Process, and re-runs its failed pages first.

Per Process in PROCESSING_BATCHES: all pages synced -> COMPLETED (and, after a full initial
sync, a reconciliation run); pages failed or never ran while no run is working on them -> a
retry of exactly those pages after a backoff (core.recovery); attempts exhausted -> ERROR with
the reason. One sensor decides all three, so no tick can close a Process that another sensor
is about to retry.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.core.recovery import RECOVERY_KEY, RetryPolicy, Step, decide, page_ranges
from quo_sync_dagster.orchestration.metadata import (
    page_metadata,
    process_metadata,
    process_summary,
)
from quo_sync_dagster.orchestration.reconcile import reconcile_run_request
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.sync import now_iso, page_key, parse_page_key
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    TAG_INTEGRATION,
    TAG_PROCESS,
    TAG_RETRY,
)
from quo_sync_dagster.store.port import Store

SENSOR_INTERVAL_SECONDS = 1  # the daemon still evaluates sensors at most every 5 s
LIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def process_of(tags: dict[str, str]) -> str | None:
    """The Process whose pages a run covers (sensor-launched, retried or a UI backfill)."""
    key = tags.get(RANGE_START) or tags.get("dagster/partition")
    return parse_page_key(key)[0] if key else None


def unsynced_pages(store: Store, process: Process) -> list[int]:
    """Pages that failed or never ran."""
    results = store.page_results(process.id)
    return [
        i
        for i in range(process.context["totalPages"])
        if not (r := results.get(page_key(process.id, i))) or not r.ok
    ]


def build_completion_sensor(
    crm: str,
    page_job: dg.JobDefinition | dg.UnresolvedAssetJobDefinition,
    contacts: dg.AssetsDefinition,  # the page asset whose partitions show the pages
    processes_key: dg.AssetKey,
    run_tags: dict[str, str],
    reconcile_job: dg.JobDefinition,
) -> dg.SensorDefinition:
    jobs = [page_job, reconcile_job]

    @dg.sensor(
        name=f"{crm}_completion_sensor",
        jobs=jobs,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Closes a Process when all its pages are synced (COMPLETED); re-runs "
        "failed pages with backoff; ERROR once the retries are exhausted",
    )
    def completion_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        s = store.get()
        events, requests = [], []
        for process in s.list_processes(states=[ProcessState.PROCESSING_BATCHES], crm=crm):
            closed, retries = _step(context.instance, s, process, page_job.name, run_tags)
            requests += retries
            if closed is not None:
                if closed["state"] == str(ProcessState.COMPLETED):
                    events += _unreported_pages(context.instance, s, process, contacts)
                events.append(
                    dg.AssetMaterialization(
                        asset_key=processes_key, metadata=process_metadata(closed)
                    )
                )
                if _is_full_sync(process):
                    requests.append(reconcile_run_request(crm, process.integration_id, process.id))
        if not events and not requests:
            return dg.SkipReason("no process finished or due for a retry")
        return dg.SensorResult(run_requests=requests, asset_events=events)

    return completion_sensor


def _unreported_pages(
    instance: dg.DagsterInstance, store: Store, process: Process, contacts: dg.AssetsDefinition
) -> list[dg.AssetMaterialization]:
    """Pages synced by a run that died before it could report them: their Quo writes and
    results are in the store, the materialization went down with the run (a killed worker),
    so the UI would show them failed. Reported here, from the store, marked as such."""
    keys = [page_key(process.id, i) for i in range(process.context["totalPages"])]
    pages = contacts.partitions_def
    status = (pages and instance.get_status_by_partition(contacts.key, keys, pages)) or {}
    results = store.page_results(process.id)
    return [
        dg.AssetMaterialization(
            asset_key=contacts.key,
            partition=key,
            metadata={**page_metadata(results[key], None), "reported_by": "completion sensor"},
        )
        for key in keys
        if status.get(key) is not dg.AssetPartitionStatus.MATERIALIZED
    ]


def _is_full_sync(process: Process) -> bool:
    return process.context.get("syncType") == "INITIAL" and not process.context.get("modifiedSince")


def _step(
    instance: dg.DagsterInstance,
    store: Store,
    process: Process,
    page_job: str,
    run_tags: dict[str, str],
) -> tuple[dict[str, Any] | None, list[dg.RunRequest]]:
    """(summary of the Process if it was closed now, retry runs to launch)."""
    if unsynced_pages(store, process):
        launched = instance.get_run_records(
            dg.RunsFilter(job_name=page_job, tags={TAG_PROCESS: process.id})
        )
        if len(launched) < math.ceil(
            process.context["totalPages"] / process.context["pagesPerRun"]
        ):
            return None, []  # the page sensor has not launched every range yet
    # No Process closes while a run of it is live, even with every page recorded: a killed
    # run is marked failed by run monitoring later, and its pages must be reported after
    # that failure, not before, for the UI to show them materialized. Runs are checked before
    # the pages are read again, so a page recorded by a run that has just finished is seen.
    live = instance.get_run_records(dg.RunsFilter(statuses=LIVE_STATUSES))
    if any(process_of(r.dagster_run.tags) == process.id for r in live):
        return None, []
    unsynced = unsynced_pages(store, process)
    if not unsynced:
        store.transition(process.id, ProcessState.COMPLETING)
        closed = store.transition(process.id, ProcessState.COMPLETED, {"endTime": now_iso()})
        return process_summary(store, closed), []
    try:
        policy = RetryPolicy.from_settings(store.get_integration(process.integration_id).settings)
    except ValueError as exc:
        return _error(store, process, unsynced, f"no automatic retry: {exc}"), []
    decision = decide(process.context.get(RECOVERY_KEY), policy, datetime.now(UTC))
    if decision.step is Step.GIVE_UP:
        return _error(store, process, unsynced, f"after {decision.attempt} automatic retries"), []
    store.update_context(process.id, {RECOVERY_KEY: decision.state})
    if decision.step is Step.WAIT:
        return None, []
    attempt = decision.attempt + 1
    return None, [
        dg.RunRequest(
            run_key=f"{process.id}:retry{attempt}:{first}-{last}",
            job_name=page_job,
            tags={
                **run_tags,
                RANGE_START: page_key(process.id, first),
                RANGE_END: page_key(process.id, last),
                TAG_PROCESS: process.id,
                TAG_INTEGRATION: process.integration_id,
                TAG_RETRY: str(attempt),
            },
        )
        for first, last in page_ranges(unsynced, process.context["pagesPerRun"])
    ]


def _error(store: Store, process: Process, unsynced: list[int], why: str) -> dict[str, Any]:
    results = store.page_results(process.id)
    keys = [page_key(process.id, i) for i in unsynced]
    failed = [k for k in keys if k in results]
    missing = [k for k in keys if k not in results]
    reason = (
        f"{len(unsynced)} of {process.context['totalPages']} pages not synced {why} "
        f"(failed: {failed[:20]}, never ran: {missing[:20]})"
    )
    closed = store.transition(
        process.id, ProcessState.ERROR, {"error": reason, "errorTimestamp": now_iso()}
    )
    return process_summary(store, closed)
