"""`<crm>_completion_sensor`: closes each Process, and re-runs its failed pages first.

Per Process in PROCESSING_BATCHES: all pages synced -> COMPLETED, or, for a full scan, COMPLETING
while its closing pass runs (closing.py: people the pages missed, people deleted in the CRM);
pages failed or never ran while no run is working on them -> a retry of exactly those pages
after a backoff (core.recovery); attempts exhausted -> ERROR with the reason. A Process in
COMPLETING is COMPLETED once its closing run succeeded, and its closing run is retried the same
way when it failed. A COMPLETED Process moves the integration's polling watermark. One sensor
decides all of it, so no tick can close a Process that another sensor is about to retry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.core.recovery import (
    RECOVERY_KEY,
    RETRY_ROUND_KEY,
    RetryPolicy,
    Step,
    decide,
    page_ranges,
)
from quo_sync_dagster.orchestration.checks import check_evaluations
from quo_sync_dagster.orchestration.closing_run import CLOSING_KEY, closing_run_config
from quo_sync_dagster.orchestration.metadata import (
    event_tags,
    page_metadata,
    process_description,
    process_metadata,
    process_run_tags,
    process_summary,
)
from quo_sync_dagster.orchestration.reconcile import reconcile_run_request
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.sync import now_iso, page_key, parse_page_key
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    TAG_CRM,
    TAG_PROCESS,
    TAG_RETRY,
)
from quo_sync_dagster.report_plot import plot_metadata
from quo_sync_dagster.store.port import Store

CLOSING_RECOVERY_KEY = "closingRecovery"
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
    return parse_page_key(key)[0] if key else tags.get(TAG_PROCESS)


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
    closing_job: dg.JobDefinition,
) -> dg.SensorDefinition:
    jobs = [page_job, reconcile_job, closing_job]
    closing_request = closing_run_request(crm, closing_job.name)

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
        open_states = [ProcessState.PROCESSING_BATCHES, ProcessState.COMPLETING]
        for process in s.list_processes(states=open_states, crm=crm):
            if process.state is ProcessState.COMPLETING:
                closed, retries = _close(context.instance, s, process, closing_request)
            else:
                closed, retries = _step(
                    context.instance, s, process, page_job.name, run_tags, closing_request
                )
            requests += retries
            if closed is not None:
                final = s.get_process(process.id)
                if closed["state"] == str(ProcessState.COMPLETED):
                    advance_watermark(s, final)
                events += _unreported_pages(context.instance, s, final, contacts, crm)
                events.append(
                    dg.AssetMaterialization(
                        asset_key=processes_key,
                        description=process_description(final),
                        metadata={**process_metadata(closed, final), **plot_metadata(s, final)},
                        tags=event_tags(crm, [final]),
                    )
                )
                if _is_initial_full_sync(process):
                    requests.append(reconcile_run_request(crm, process.integration_id, process.id))
        if events:  # a Process closed: the checks may have changed
            events += check_evaluations(s, context.instance, crm, processes_key)
        if not events and not requests:
            return dg.SkipReason("no process finished or due for a retry")
        return dg.SensorResult(run_requests=requests, asset_events=events)

    return completion_sensor


def _unreported_pages(
    instance: dg.DagsterInstance,
    store: Store,
    process: Process,
    contacts: dg.AssetsDefinition,
    crm: str,
) -> list[dg.AssetMaterialization]:
    """Pages synced by a run that could not report them: a killed worker, or a run that
    failed for its other pages (a failed run materializes nothing). Their Quo writes and
    results are in the store, so the UI would show them failed, and a backfill of the failed
    partitions would re-run them. Reported here, from the store, marked as such."""
    keys = [page_key(process.id, i) for i in range(process.context["totalPages"])]
    pages = contacts.partitions_def
    status = (pages and instance.get_status_by_partition(contacts.key, keys, pages)) or {}
    results = store.page_results(process.id)
    return [
        dg.AssetMaterialization(
            asset_key=contacts.key,
            partition=key,
            metadata={
                **page_metadata(results[key], process, None),
                "reported_by": "completion sensor",
            },
            tags=event_tags(crm, [process]),
        )
        for key in keys
        if key in results
        and results[key].ok
        and status.get(key) is not dg.AssetPartitionStatus.MATERIALIZED
    ]


def _is_initial_full_sync(process: Process) -> bool:
    return process.context.get("syncType") == "INITIAL" and is_full_scan(process)


def is_full_scan(process: Process) -> bool:
    """Every person of the object type was listed (not only those modified since a time)."""
    return not process.context.get("modifiedSince")


def advance_watermark(store: Store, process: Process) -> None:
    """A COMPLETED Process has synced every change made before it started, if it listed
    everyone or everyone modified since no later than the watermark: the watermark moves to
    its start. It never moves back."""
    ctx = process.context
    object_type = ctx["personObjectType"]
    current = store.get_watermark(process.integration_id, object_type)
    since = ctx.get("modifiedSince")
    if since and (current is None or _at(current) < _at(since)):
        return  # it left a gap between the watermark and its own start point
    if current is None or _at(current) < _at(ctx["startTime"]):
        store.set_watermark(process.integration_id, object_type, ctx["startTime"])


def _at(iso: str) -> datetime:
    when = datetime.fromisoformat(iso)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def closing_run_request(crm: str, job_name: str) -> Callable[[Process, int], dg.RunRequest]:
    """A run of the closing pass of a full-scan Process (attempt n has its own run key)."""

    def request(process: Process, attempt: int) -> dg.RunRequest:
        return dg.RunRequest(
            run_key=f"closing:{process.id}:{_round(process)}{attempt}",
            job_name=job_name,
            run_config=closing_run_config(crm, process),
            tags={TAG_CRM: crm, **process_run_tags(process), TAG_RETRY: str(attempt)},
        )

    return request


def _round(process: Process) -> str:
    """Run keys of an operator's retry round differ from the earlier rounds' (a sensor never
    launches a run key twice)."""
    n = process.context.get(RETRY_ROUND_KEY, 0)
    return f"r{n}." if n else ""


def _step(
    instance: dg.DagsterInstance,
    store: Store,
    process: Process,
    page_job: str,
    run_tags: dict[str, str],
    closing_request: Callable[[Process, int], dg.RunRequest],
) -> tuple[dict[str, Any] | None, list[dg.RunRequest]]:
    """(summary of the Process if it was closed now, runs to launch: page retries or its
    closing pass)."""
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
        completing = store.transition(process.id, ProcessState.COMPLETING)
        if is_full_scan(process):
            return None, [closing_request(completing, 1)]
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
            run_key=f"{process.id}:{_round(process)}retry{attempt}:{first}-{last}",
            job_name=page_job,
            tags={
                **run_tags,
                RANGE_START: page_key(process.id, first),
                RANGE_END: page_key(process.id, last),
                **process_run_tags(process),
                TAG_RETRY: str(attempt),
            },
        )
        for first, last in page_ranges(unsynced, process.context["pagesPerRun"])
    ]


def _close(
    instance: dg.DagsterInstance,
    store: Store,
    process: Process,
    closing_request: Callable[[Process, int], dg.RunRequest],
) -> tuple[dict[str, Any] | None, list[dg.RunRequest]]:
    """A Process in COMPLETING: COMPLETED once its closing pass is done; a failed closing run
    is launched again after a backoff, and ERROR after the last attempt."""
    live = instance.get_run_records(dg.RunsFilter(statuses=LIVE_STATUSES))
    if any(process_of(r.dagster_run.tags) == process.id for r in live):
        return None, []
    process = store.get_process(process.id)  # read after the runs: a finished run's mark is seen
    if (process.context.get(CLOSING_KEY) or {}).get("done"):
        closed = store.transition(process.id, ProcessState.COMPLETED, {"endTime": now_iso()})
        return process_summary(store, closed), []
    try:
        policy = RetryPolicy.from_settings(store.get_integration(process.integration_id).settings)
    except ValueError as exc:
        return _closing_error(store, process, f"no automatic retry: {exc}"), []
    state = process.context.get(CLOSING_RECOVERY_KEY) or {"attempt": 1}
    decision = decide(state, policy, datetime.now(UTC))
    if decision.step is Step.GIVE_UP:
        return _closing_error(store, process, f"after {decision.attempt} attempts"), []
    store.update_context(process.id, {CLOSING_RECOVERY_KEY: decision.state})
    if decision.step is Step.WAIT:
        return None, []
    return None, [closing_request(process, decision.attempt + 1)]


def _closing_error(store: Store, process: Process, why: str) -> dict[str, Any]:
    closed = store.transition(
        process.id,
        ProcessState.ERROR,
        {"error": f"closing pass failed {why}; see its runs", "errorTimestamp": now_iso()},
    )
    return process_summary(store, closed)


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
