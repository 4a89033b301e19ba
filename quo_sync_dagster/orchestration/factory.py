"""One function turns a CRM connector class into everything Dagster needs for it.

Per CRM `x`: the job `x_initial_sync` (its config is the launchpad form) plans a Process per
object type and adds one dynamic partition per page; `x_page_sensor` launches ranged runs of
`x_page_sync` over those pages; the assets `x_crm_pages` (fetch -> DataFrame, IO-managed) and
`x_quo_contacts` (transform -> upsert, in the `quo_api` pool) do the work; `x_completion_sensor`
closes each Process and records it on the `x_sync_processes` asset.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

import json
import math
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field, create_model

from quo_sync_dagster.core.process import IllegalTransition, Process, ProcessState
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.metadata import (
    page_metadata,
    peak_rss_mb,
    process_metadata,
    process_summary,
)
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.sync import (
    failed_page,
    fetch_page_frame,
    frame_records,
    now_iso,
    open_connector,
    page_key,
    parse_page_key,
    plan_initial_sync,
    sync_records,
)
from quo_sync_dagster.quo.client import QuoUnavailable
from quo_sync_dagster.secrets import MissingSecret
from quo_sync_dagster.store.port import NotFound, Store

TAG_CRM = "quo_sync/crm"
TAG_INTEGRATION = "quo_sync/integration"
TAG_PROCESS = "quo_sync/process"  # on page runs: the Process whose pages they sync
TAG_PLANNED = "quo_sync/planned_processes"  # on initial-sync runs: the Processes they planned
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
SENSOR_INTERVAL_SECONDS = 1  # the daemon still evaluates sensors at most every 5 s
_LIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _initial_sync_config(connector_cls: type[CRMConnector]) -> type[dg.Config]:
    cfg = connector_cls.crm_config
    return create_model(
        f"{connector_cls.name.title()}InitialSyncConfig",
        __base__=dg.Config,
        integration_id=(
            str,
            Field(description="Id of the integration to sync (quo-sync integrations)"),
        ),
        object_types=(
            list[str],
            Field(
                default=[o.crm_object_name for o in cfg.person_object_types],
                description="CRM object types to sync; one Process each",
            ),
        ),
        page_size=(
            int,
            Field(default=cfg.sync_config.initial_batch_size, ge=1, description="People per page"),
        ),
        pages_per_run=(
            int,
            Field(default=cfg.queue_config.batch_size, ge=1, description="Pages per Dagster run"),
        ),
        modified_since=(
            str | None,
            Field(default=None, description="ISO 8601; only people changed after it (empty: all)"),
        ),
    )


def _parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        since = datetime.fromisoformat(value)
    except ValueError:
        raise dg.Failure(f"modified_since {value!r} is not an ISO 8601 date-time") from None
    return since if since.tzinfo else since.replace(tzinfo=UTC)  # naive means UTC


def _process_of(tags: dict[str, str]) -> str | None:
    key = tags.get(RANGE_START) or tags.get("dagster/partition")
    return parse_page_key(key)[0] if key else None


def build_crm_definitions(connector_cls: type[CRMConnector]) -> dg.Definitions:
    crm = connector_cls.name
    cfg = connector_cls.crm_config
    pages = dg.DynamicPartitionsDefinition(name=f"{crm}_pages")
    policy = dg.BackfillPolicy.multi_run(cfg.queue_config.batch_size)
    run_tags = {TAG_CRM: crm, "dagster/max_runtime": str(cfg.queue_config.timeout)}
    InitialSyncConfig = _initial_sync_config(connector_cls)
    known_types = [o.crm_object_name for o in cfg.person_object_types]

    @dg.op(name=f"{crm}_plan_initial_sync", description=f"Plan an initial {crm} -> Quo sync")
    def plan(
        context: dg.OpExecutionContext,
        config: InitialSyncConfig,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        unknown = set(config.object_types) - set(known_types)
        if unknown:
            raise dg.Failure(f"unknown object types {sorted(unknown)}; {crm} has {known_types}")
        since = _parse_since(config.modified_since)
        s = store.get()
        try:
            connector = open_connector(s, crm, config.integration_id)
            client = quo.client(connector.integration, s)
        except (NotFound, ValueError, MissingSecret) as exc:  # shown as is in the run's page
            raise dg.Failure(str(exc)) from None
        planned = []
        try:
            for object_type in config.object_types:
                process = plan_initial_sync(
                    s, connector, client, object_type, config.page_size, config.pages_per_run, since
                )
                keys = [page_key(process.id, p) for p in range(process.context["totalPages"])]
                context.instance.add_dynamic_partitions(pages.name, keys)
                planned.append(s.transition(process.id, ProcessState.PROCESSING_BATCHES))
        finally:
            client.close()
            connector.close()
        context.instance.add_run_tags(
            context.run.run_id, {TAG_PLANNED: ",".join(p.id for p in planned)}
        )
        context.add_output_metadata(
            {
                "processes": dg.MetadataValue.json(
                    [
                        {
                            "id": p.id,
                            "objectType": p.context["personObjectType"],
                            "totalRecords": p.context["totalRecords"],
                            "totalPages": p.context["totalPages"],
                        }
                        for p in planned
                    ]
                )
            }
        )

    @dg.job(
        name=f"{crm}_initial_sync",
        description=f"Initial sync of every {crm} person into Quo. Launch it from here.",
        executor_def=dg.in_process_executor,
        tags={TAG_CRM: crm},
    )
    def initial_sync() -> None:
        plan()

    @dg.asset(
        name=f"{crm}_crm_pages",
        partitions_def=pages,
        backfill_policy=policy,
        io_manager_key="page_frames",
        pool=f"{crm}_api",
        group_name=crm,
        kinds={"pandas"},
        description=f"People pages fetched from {crm}, one DataFrame per page",
    )
    def crm_pages(
        context: dg.AssetExecutionContext, store: StoreResource
    ) -> dict[str, pd.DataFrame]:
        s = store.get()
        connectors: dict[str, CRMConnector] = {}
        frames = {}
        try:
            for key in context.partition_keys:
                process_id, page = parse_page_key(key)
                process = s.get_process(process_id)
                if process.integration_id not in connectors:
                    connectors[process.integration_id] = open_connector(
                        s, crm, process.integration_id
                    )
                try:
                    frames[key] = fetch_page_frame(
                        connectors[process.integration_id], process, page
                    )
                except Exception as exc:  # shown as this page's error; the range fails
                    s.record_page(process_id, key, failed_page(0, key, f"fetch failed: {exc}"))
                    raise
        finally:
            for connector in connectors.values():
                connector.close()
        return frames

    @dg.asset(
        name=f"{crm}_quo_contacts",
        ins={"frames": dg.AssetIn(crm_pages.key)},
        partitions_def=pages,
        backfill_policy=policy,
        pool="quo_api",
        group_name=crm,
        description=f"{crm} people upserted into Quo, per page",
    )
    def quo_contacts(
        context: dg.AssetExecutionContext,
        frames: dict[str, pd.DataFrame],
        store: StoreResource,
        quo: QuoResource,
    ) -> dg.MaterializeResult:
        s = store.get()
        workers: dict[str, Any] = {}
        failures: dict[str, str] = {}
        totals: Counter[str] = Counter()
        touched: dict[str, None] = {}
        try:
            for key in context.partition_keys:
                process_id, _ = parse_page_key(key)
                process = _resume(s, process_id)
                touched[process_id] = None
                if process.integration_id not in workers:
                    connector = open_connector(s, crm, process.integration_id)
                    client = quo.client(connector.integration, s)
                    workers[process.integration_id] = (
                        connector,
                        client,
                        quo.upserter(client, connector.integration, s),
                    )
                connector, _, upserter = workers[process.integration_id]
                records = frame_records(frames[key])
                started = time.perf_counter()
                if failures:  # Quo is unreachable: the rest of the range would only wait
                    result = failed_page(len(records), key, "not tried: Quo unavailable")
                    failures[key] = "not tried: Quo unavailable"
                else:
                    try:
                        result = sync_records(
                            connector,
                            upserter,
                            records,
                            process.context["personObjectType"],
                            key,
                            assume_absent=process.context.get("quoSourceEmptyAtStart", False),
                        )
                    except QuoUnavailable as exc:
                        result = failed_page(len(records), key, str(exc))
                        failures[key] = str(exc)
                s.record_page(process_id, key, result)
                _resume(s, process_id)  # the completion sensor may have closed it meanwhile
                totals.update(result.counter_values())
                context.add_asset_metadata(
                    page_metadata(result, time.perf_counter() - started), partition_key=key
                )
        finally:
            for connector, client, _ in workers.values():
                client.close()
                connector.close()
        if failures:
            raise dg.Failure(
                description=f"{len(failures)} of {len(context.partition_keys)} pages failed; "
                "re-run them (backfill the failed partitions): nothing is written twice",
                metadata={"failed_pages": dg.MetadataValue.json(failures)},
            )
        summaries = [process_summary(s, s.get_process(pid)) for pid in touched]
        return dg.MaterializeResult(
            metadata={
                "run_pages": len(context.partition_keys),
                "run_synced": totals["synced"],
                "run_failed": totals["failed"],
                "run_peak_rss_mb": dg.MetadataValue.float(peak_rss_mb()),
                **(process_metadata(summaries[0]) if len(summaries) == 1 else {}),
            }
        )

    page_sync = dg.define_asset_job(
        name=f"{crm}_page_sync",
        selection=[crm_pages, quo_contacts],
        executor_def=dg.in_process_executor,
        tags=run_tags,
        description=f"Fetch and upsert a range of {crm} pages (launched by {crm}_page_sensor)",
    )

    @dg.sensor(
        name=f"{crm}_page_sensor",
        job=page_sync,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Launches ranged runs of up to {cfg.queue_config.batch_size} planned pages",
    )
    def page_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        s = store.get()
        launched: dict[str, int] = json.loads(context.cursor or "{}")
        active = s.list_processes(states=[ProcessState.PROCESSING_BATCHES], crm=crm)
        requests = []
        for process in active:
            total, per_run = process.context["totalPages"], process.context["pagesPerRun"]
            firsts = list(range(launched.get(process.id, 0), total, per_run))
            if process.context.get("launchLastPageFirst"):
                firsts.reverse()  # the run queue starts the newest people's pages first
            for first in firsts:
                last = min(first + per_run, total) - 1
                requests.append(
                    dg.RunRequest(
                        run_key=f"{process.id}:{first}-{last}",
                        tags={
                            **run_tags,
                            RANGE_START: page_key(process.id, first),
                            RANGE_END: page_key(process.id, last),
                            TAG_PROCESS: process.id,
                            TAG_INTEGRATION: process.integration_id,
                        },
                    )
                )
            launched[process.id] = total
        cursor = json.dumps({p.id: launched[p.id] for p in active})
        if not requests:
            return dg.SkipReason("no pages waiting for a run")
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    processes_asset = dg.AssetSpec(
        key=f"{crm}_sync_processes",
        group_name=crm,
        description=f"One materialization per closed {crm} sync Process, with its final metrics",
    )

    @dg.sensor(
        name=f"{crm}_completion_sensor",
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Closes a Process when all its pages are done (COMPLETED) or failed (ERROR)",
    )
    def completion_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        s = store.get()
        events = [
            dg.AssetMaterialization(
                asset_key=processes_asset.key, metadata=process_metadata(summary)
            )
            for process in s.list_processes(states=[ProcessState.PROCESSING_BATCHES], crm=crm)
            if (summary := _close_if_finished(context.instance, s, process.id, page_sync.name))
        ]
        if not events:
            return dg.SkipReason("no process finished")
        return dg.SensorResult(asset_events=events)

    return dg.Definitions(
        assets=[crm_pages, quo_contacts, processes_asset],
        jobs=[initial_sync, page_sync],
        sensors=[page_sensor, completion_sensor],
    )


def _resume(store: Store, process_id: str) -> Process:
    """A run syncing pages of a Process closed as ERROR (a re-run of its failed pages) reopens
    it, so the completion sensor can close it again with what the pages now say."""
    process = store.get_process(process_id)
    if process.state is ProcessState.ERROR:
        try:
            process = store.transition(process_id, ProcessState.PROCESSING_BATCHES)
        except IllegalTransition:  # another run reopened it first
            process = store.get_process(process_id)
    return process


def _unsynced_pages(store: Store, process: Process) -> tuple[list[str], list[str]]:
    """(failed, never ran) page keys of the Process."""
    results = store.page_results(process.id)
    keys = [page_key(process.id, i) for i in range(process.context["totalPages"])]
    failed = [k for k in keys if k in results and not results[k].ok]
    return failed, [k for k in keys if k not in results]


def _close_if_finished(
    instance: dg.DagsterInstance, store: Store, process_id: str, page_job: str
) -> dict[str, Any] | None:
    """COMPLETED when every page succeeded; ERROR (with the reason) when some did not and no run
    that could still sync them is queued or running. None while work is outstanding."""
    process = store.get_process(process_id)
    failed, missing = _unsynced_pages(store, process)
    if failed or missing:
        launched = instance.get_run_records(
            dg.RunsFilter(job_name=page_job, tags={TAG_PROCESS: process_id})
        )
        if len(launched) < math.ceil(
            process.context["totalPages"] / process.context["pagesPerRun"]
        ):
            return None  # the page sensor has not launched every range yet
        # Any live run over this Process's pages (sensor-launched or a UI backfill) may still
        # sync them. Runs are checked before the pages are read again, so a page recorded by a
        # run that has just finished is seen.
        live = instance.get_run_records(dg.RunsFilter(statuses=_LIVE))
        if any(_process_of(r.dagster_run.tags) == process_id for r in live):
            return None
        failed, missing = _unsynced_pages(store, process)
    if not failed and not missing:
        store.transition(process_id, ProcessState.COMPLETING)
        process = store.transition(process_id, ProcessState.COMPLETED, {"endTime": now_iso()})
        return process_summary(store, process)
    reason = (
        f"{len(failed) + len(missing)} of {process.context['totalPages']} pages not synced "
        f"(failed: {failed[:20]}, never ran: {missing[:20]})"
    )
    process = store.transition(
        process_id, ProcessState.ERROR, {"error": reason, "errorTimestamp": now_iso()}
    )
    return process_summary(store, process)
