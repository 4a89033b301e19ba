"""One function turns a CRM connector class into everything Dagster needs for it.

Per CRM `x`: the job `x_initial_sync` (its config is the launchpad form) plans a Process per
object type and adds one dynamic partition per page; `x_page_sensor` launches ranged runs of
`x_page_sync` over those pages; the assets `x_crm_pages` (fetch -> DataFrame, IO-managed) and
`x_quo_contacts` (transform -> upsert, in the `quo_api` pool) do the work; `x_completion_sensor`
re-runs failed pages after a backoff, closes each Process and records it on the
`x_sync_processes` asset, after `x_closing_pass` (closing_run.py) for full scans;
`x_reconcile` (reconcile.py) restores contacts deleted in Quo. Ongoing sync: `x_ongoing_sync`
schedules `x_poll` cycles (polling.py); for webhook CRMs `x_webhook_sensor` launches
`x_webhook_sync` runs from the inbox (webhook_sync.py).
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field, create_model

from quo_sync_dagster.core.process import IllegalTransition, Process, ProcessState
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.checks import build_checks
from quo_sync_dagster.orchestration.closing_run import build_closing_job
from quo_sync_dagster.orchestration.completion import (
    SENSOR_INTERVAL_SECONDS,
    build_completion_sensor,
)
from quo_sync_dagster.orchestration.launchpad import integration_id_field
from quo_sync_dagster.orchestration.metadata import (
    PageTiming,
    asset_attributes,
    event_tags,
    failed_page_metadata,
    identity_metadata,
    left_error_context,
    page_metadata,
    peak_rss_mb,
    process_run_tags,
    shared_tags,
)
from quo_sync_dagster.orchestration.namespacing import namespace_links
from quo_sync_dagster.orchestration.planning import (
    PLAN_RETRY,
    open_integration,
    queue_pages,
    report_planned,
)
from quo_sync_dagster.orchestration.polling import build_polling_definitions
from quo_sync_dagster.orchestration.reconcile import build_reconcile_definitions
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.retry_pages import build_retry_job
from quo_sync_dagster.orchestration.run_logs import (
    failed_pages_message,
    page_line,
    run_figures,
)
from quo_sync_dagster.orchestration.sync import (
    failed_page,
    fetch_page_frame,
    frame_records,
    open_connector,
    page_key,
    parse_page_key,
    plan_sync,
    sync_records,
)
from quo_sync_dagster.orchestration.sync_checks import build_freshness_sensor
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    SENSOR_NAME,
    TAG_CRM,
    TAG_INTEGRATION,
    TAG_INTERNAL,
    TAG_OBJECT_TYPE,
    TAG_PLANNED,
    TAG_PROCESS,
    TAG_RETRY,
)
from quo_sync_dagster.orchestration.webhook_subscriptions import build_subscription_definitions
from quo_sync_dagster.orchestration.webhook_sync import build_webhook_definitions
from quo_sync_dagster.quo.client import QuoUnavailable
from quo_sync_dagster.store.port import AlreadyRunning, Store

__all__ = [
    "RANGE_END",
    "RANGE_START",
    "TAG_CRM",
    "TAG_INTEGRATION",
    "TAG_PLANNED",
    "TAG_PROCESS",
    "build_crm_definitions",
]


def _initial_sync_config(connector_cls: type[CRMConnector]) -> type[dg.Config]:
    cfg = connector_cls.crm_config
    return create_model(
        f"{connector_cls.name.title()}InitialSyncConfig",
        __base__=dg.Config,
        integration_id=integration_id_field(connector_cls.name, "Id of the integration to sync"),
        object_types=(
            list[str] | None,
            Field(
                default=None,
                description="CRM object types to sync, one Process each; empty: the "
                "integration's object_types setting, else "
                f"{connector_cls.object_types_for({})} (all: "
                f"{[o.crm_object_name for o in cfg.person_object_types]})",
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
        raise dg.Failure(
            f"modified_since {value!r} is not an ISO 8601 date-time", allow_retries=False
        ) from None
    return since if since.tzinfo else since.replace(tzinfo=UTC)  # naive means UTC


def build_crm_definitions(connector_cls: type[CRMConnector]) -> dg.Definitions:
    crm = connector_cls.name
    cfg = connector_cls.crm_config
    pages = dg.DynamicPartitionsDefinition(name=f"{crm}_pages")
    policy = dg.BackfillPolicy.multi_run(cfg.queue_config.batch_size)
    run_tags = {TAG_CRM: crm, "dagster/max_runtime": str(cfg.queue_config.timeout)}
    InitialSyncConfig = _initial_sync_config(connector_cls)
    page_sensor_name = f"{crm}_page_sensor"
    known_types = [o.crm_object_name for o in cfg.person_object_types]

    @dg.op(
        name=f"{crm}_plan_initial_sync",
        description=f"Plan an initial {crm} -> Quo sync",
        retry_policy=PLAN_RETRY,
    )
    def plan(
        context: dg.OpExecutionContext,
        config: InitialSyncConfig,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        unknown = set(config.object_types or ()) - set(known_types)
        if unknown:
            raise dg.Failure(
                f"unknown object types {sorted(unknown)}; {crm} has {known_types}",
                allow_retries=False,
            )
        since = _parse_since(config.modified_since)
        s = store.get()
        context.instance.add_run_tags(context.run.run_id, {TAG_INTEGRATION: config.integration_id})
        connector, client = open_integration(s, quo, crm, config.integration_id)
        planned = []
        try:
            try:
                object_types = config.object_types or connector.object_types
            except ValueError as exc:
                raise dg.Failure(
                    f"integration {config.integration_id!r}: {exc}", allow_retries=False
                ) from None
            context.instance.add_run_tags(
                context.run.run_id, {TAG_OBJECT_TYPE: ",".join(object_types)}
            )
            if renamed := namespace_links(s, connector.integration):
                context.log.info(f"{renamed} contact links moved to namespaced externalIds")
            for object_type in object_types:
                process = plan_sync(
                    s,
                    connector,
                    client,
                    object_type,
                    config.page_size,
                    config.pages_per_run,
                    since,
                    plan_run_id=context.run_id,
                    last_attempt=context.retry_number >= PLAN_RETRY.max_retries,
                )
                planned.append(queue_pages(context, s, pages.name, process))
        except AlreadyRunning as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        finally:
            client.close()
            connector.close()
        report_planned(context, planned)

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
        kinds={crm, "pandas"},
        description=f"People pages fetched from {crm}, one DataFrame per page",
        **asset_attributes(crm),
    )
    def crm_pages(
        context: dg.AssetExecutionContext, store: StoreResource
    ) -> dg.Output[dict[str, pd.DataFrame | None]]:
        """A page whose fetch fails is recorded as failed and gets no frame (None); the other
        pages of the range go on. After two failures in a row the rest of the range is not
        fetched: the fault has been tried again once, and recovery re-runs those pages later."""
        s = store.get()
        connectors: dict[str, CRMConnector] = {}
        processes: dict[str, Process] = {}
        frames: dict[str, pd.DataFrame | None] = {}
        fault, in_a_row = "", 0
        try:
            for key in context.partition_keys:
                process_id, page = parse_page_key(key)
                frames[key] = None
                if in_a_row >= 2:
                    s.record_page(process_id, key, failed_page(0, key, f"not tried: {fault}"))
                    continue
                started = time.perf_counter()
                try:
                    process = processes.get(process_id) or s.get_process(process_id)
                    processes[process_id] = process
                    if process.integration_id not in connectors:
                        connectors[process.integration_id] = open_connector(
                            s, crm, process.integration_id
                        )
                    frame = fetch_page_frame(connectors[process.integration_id], process, page)
                    frames[key] = frame
                    in_a_row = 0
                    context.add_asset_metadata(
                        {
                            **identity_metadata(process),
                            "dagster/row_count": len(frame),
                            "fetch_s": dg.MetadataValue.float(
                                round(time.perf_counter() - started, 3)
                            ),
                        },
                        partition_key=key,
                    )
                except Exception as exc:  # this page's failure, shown with its reason
                    fault, in_a_row = f"{crm} still failing ({type(exc).__name__})", in_a_row + 1
                    context.log.warning(f"page {key}: fetch failed: {exc}")
                    s.record_page(process_id, key, failed_page(0, key, f"fetch failed: {exc}"))
        finally:
            for connector in connectors.values():
                connector.close()
        return dg.Output(frames, tags=event_tags(crm, processes.values()))

    @dg.asset(
        name=f"{crm}_quo_contacts",
        ins={"frames": dg.AssetIn(crm_pages.key)},
        partitions_def=pages,
        backfill_policy=policy,
        pool="quo_api",
        kinds={crm, "quo", "pandas"},
        description=f"{crm} people upserted into Quo, per page",
        **asset_attributes(crm),
    )
    def quo_contacts(
        context: dg.AssetExecutionContext,
        frames: dict[str, pd.DataFrame | None],
        store: StoreResource,
        quo: QuoResource,
    ) -> dg.MaterializeResult:
        """Pages without a frame were recorded as failed by the fetch. Only what makes a whole
        page impossible (Quo unreachable, credentials refused) fails a page; any record fails
        only itself (sync_records). After two Quo outages in a row the rest of the range is not
        tried: recovery re-runs those pages after a backoff. Each page's figures go on its own
        partition; the run's own figures on the run (tags and a log line)."""
        s = store.get()
        workers: dict[str, Any] = {}
        failures: dict[str, str] = {}
        totals: Counter[str] = Counter()
        processes: dict[str, Process] = {}
        unavailable_in_a_row = 0
        first_try = _first_try(context.run.tags, page_sensor_name)
        tried: dict[str, set[str]] = {}  # per Process: pages with a result before this run
        run_started = time.perf_counter()
        try:
            for key in context.partition_keys:
                process_id, _ = parse_page_key(key)
                if frames.get(key) is None:
                    process = processes.get(process_id) or s.get_process(process_id)
                    processes[process_id] = process
                    failures[key] = _fetch_error(s, process_id, key)
                    context.log.warning(f"page {key}: {failures[key]}")
                    _observe_failed_page(context, crm, key, failures[key], 0, process)
                    continue
                records = frame_records(frames[key])
                started_at, started = datetime.now(UTC), time.perf_counter()
                try:
                    process = _resume(s, process_id)
                    if process_id not in tried:
                        tried[process_id] = set(s.page_results(process_id))
                    if unavailable_in_a_row >= 2:
                        raise QuoUnavailable("not tried: Quo still unavailable")
                    upserter = _worker(workers, s, quo, crm, process.integration_id)
                    result = sync_records(
                        workers[process.integration_id][0],
                        upserter,
                        records,
                        process.context["personObjectType"],
                        key,
                        assume_absent=first_try(process) and key not in tried[process_id],
                        store=s,
                        match_phones=process.context.get("syncType") == "INITIAL",
                    )
                    unavailable_in_a_row = 0
                except QuoUnavailable as exc:
                    unavailable_in_a_row += 1
                    result = failed_page(len(records), key, str(exc))
                except Exception as exc:  # e.g. a refused credential: this page's failure
                    result = failed_page(len(records), key, f"{type(exc).__name__}: {exc}")
                seconds = time.perf_counter() - started
                s.record_page(process_id, key, result)
                # The completion sensor may have closed it meanwhile.
                process = processes[process_id] = _resume(s, process_id)
                totals.update(result.counter_values())
                if result.ok:
                    context.log.info(page_line(key, result, seconds))
                    context.add_asset_metadata(
                        page_metadata(result, process, PageTiming(started_at, seconds)),
                        partition_key=key,
                    )
                else:
                    failures[key] = result.errors[0].error
                    context.log.warning(page_line(key, result, seconds))
                    _observe_failed_page(context, crm, key, failures[key], len(records), process)
        finally:
            for connector, client, _ in workers.values():
                client.close()
                connector.close()
        pages_run = len(context.partition_keys)
        line, figures = run_figures(
            pages_run, len(failures), totals, time.perf_counter() - run_started, peak_rss_mb()
        )
        context.log.info(line)
        # A run launched without them (a UI backfill) gets the identity tags its pages share.
        identity = {
            k: v for k, v in shared_tags(processes.values()).items() if k not in context.run.tags
        }
        context.instance.add_run_tags(context.run.run_id, {**identity, **figures})
        if failures:
            raise dg.Failure(
                description=failed_pages_message(
                    failures, pages_run, context.asset_key.to_user_string()
                ),
                metadata={"failed_pages": dg.MetadataValue.json(failures)},
            )
        return dg.MaterializeResult(tags=event_tags(crm, processes.values()))

    page_sync = dg.define_asset_job(
        name=f"{crm}_page_sync",
        selection=[crm_pages, quo_contacts],
        executor_def=dg.in_process_executor,
        tags={**run_tags, TAG_INTERNAL: "true"},
        description=f"Internal: fetches and upserts a range of {crm} pages, launched by "
        f"{crm}_page_sensor and {crm}_completion_sensor. To sync, launch {crm}_initial_sync; "
        f"to re-run failed pages, launch {crm}_retry_failed_pages or backfill partitions of "
        f"{crm}_quo_contacts.",
    )

    @dg.sensor(
        name=page_sensor_name,
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
                            **process_run_tags(process),
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
        deps=[quo_contacts.key],
        kinds={crm, "quo"},
        description=f"One materialization per closed {crm} sync Process: its final state (and "
        "in ERROR why), integration and metrics; its checks tell each integration's health",
        **asset_attributes(crm),
    )

    reconciling = build_reconcile_definitions(connector_cls)
    (reconcile_job,) = reconciling.jobs
    closing_job = build_closing_job(connector_cls)
    completion_sensor = build_completion_sensor(
        crm, page_sync, quo_contacts, processes_asset.key, run_tags, reconcile_job, closing_job
    )
    ongoing = [build_polling_definitions(connector_cls, pages)]
    if cfg.sync_config.supports_webhooks:
        ongoing.append(build_webhook_definitions(connector_cls, run_tags))
        ongoing.append(build_subscription_definitions(connector_cls))

    return dg.Definitions.merge(
        dg.Definitions(
            assets=[crm_pages, quo_contacts, processes_asset],
            jobs=[initial_sync, page_sync, closing_job, build_retry_job(connector_cls)],
            sensors=[
                page_sensor,
                completion_sensor,
                build_freshness_sensor(crm, processes_asset.key),
            ],
            asset_checks=build_checks(crm, processes_asset.key),
        ),
        reconciling,
        *ongoing,
    )


def _resume(store: Store, process_id: str) -> Process:
    """A run syncing pages of a Process closed as ERROR (a re-run of its failed pages) reopens
    it, so the completion sensor can close it again with what the pages now say."""
    process = store.get_process(process_id)
    if process.state is ProcessState.ERROR:
        try:
            process = store.transition(
                process_id,
                ProcessState.PROCESSING_BATCHES,
                left_error_context(process, datetime.now(UTC)),
            )
        except IllegalTransition:  # another run reopened it first
            process = store.get_process(process_id)
    return process


def _fetch_error(store: Store, process_id: str, key: str) -> str:
    """Why the fetch of page `key` failed, as the fetch recorded it."""
    errors = store.recent_errors(process_id)
    return next((e.error for e in reversed(errors) if e.page == key), "fetch failed")


def _observe_failed_page(
    context: dg.AssetExecutionContext,
    crm: str,
    key: str,
    reason: str,
    records: int,
    process: Process,
) -> None:
    """An observation on the failed page's partition, so the partition view says why (the
    failed run materializes nothing)."""
    context.log_event(
        dg.AssetObservation(
            asset_key=context.asset_key,
            partition=key,
            metadata=failed_page_metadata(reason, records, process),
            tags=event_tags(crm, [process]),
        )
    )


def _first_try(tags: Mapping[str, str], page_sensor: str) -> Callable[[Process], bool]:
    """Whether unmapped contacts may skip the lookup: only in the page sensor's own run of a
    page never tried before, while Quo had no contact of the source at planning. Any other try
    (a retry, a UI backfill or re-execution) may follow a create whose outcome was lost (a
    killed run, an outage): that contact must be looked up, not sent again."""
    sensor_run = (
        tags.get(SENSOR_NAME) == page_sensor
        and TAG_RETRY not in tags
        and "dagster/parent_run_id" not in tags  # a re-execution from the UI
    )
    return lambda process: sensor_run and process.context.get("quoSourceEmptyAtStart", False)


def _worker(
    workers: dict[str, Any], store: Store, quo: QuoResource, crm: str, integration_id: str
) -> Any:
    """The integration's (connector, Quo client, upserter), opened once per run."""
    if integration_id not in workers:
        connector = open_connector(store, crm, integration_id)
        try:
            client = quo.client(connector.integration, store)
        except Exception:
            connector.close()
            raise
        workers[integration_id] = (
            connector,
            client,
            quo.upserter(client, connector.integration, store),
        )
    return workers[integration_id][2]
