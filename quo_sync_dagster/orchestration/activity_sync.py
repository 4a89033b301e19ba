"""`quo_activity_sensor` and `<crm>_log_activities`: Quo calls and messages onto CRM people.

The receiver stores each verified Quo event in the inbox under the integration's activity
queue (core.activities.activity_queue). Each tick, `quo_activity_sensor` claims what waits per
integration and launches one `<crm>_log_activities` run per integration with a run key (an
integration whose previous run is live waits). The run logs the events
(activity_logging.log_activities), acknowledges what it logged, and defers what failed with
its reason and a growing back-off, so a CRM outage heals by itself and a failure is never
dropped silently; then it lingers while more arrive (inbox_runs.drain). Items of a run that
failed or was killed are released by the next tick.
Each run materializes `<crm>_crm_activities` per integration with its counts and a table of
failures.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

import time
from collections.abc import Sequence
from typing import Any

import dagster as dg

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.activity_logging import (
    ActivityReport,
    Workspace,
    log_activities,
)
from quo_sync_dagster.orchestration.completion import SENSOR_INTERVAL_SECONDS
from quo_sync_dagster.orchestration.inbox_runs import (
    LEASE_MARGIN_SECONDS,
    InboxRunConfig,
    InboxTarget,
    inbox_run_config,
    inbox_tick,
    run_claimed,
)
from quo_sync_dagster.orchestration.metadata import asset_attributes
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.store.port import InboxItem, Store

RETRY_BASE_SECONDS = 30.0  # a failed item waits 30 s, 60 s, 120 s, ... up to an hour
RETRY_MAX_SECONDS = 3600.0
MAX_FAILURES_SHOWN = 50


def activity_job_name(crm: str) -> str:
    return f"{crm}_log_activities"


def activities_key(crm: str) -> dg.AssetKey:
    return dg.AssetKey(f"{crm}_crm_activities")


def _op_name(crm: str) -> str:
    return f"{crm}_log_quo_activities"


def retry_delay(attempts: int) -> float:
    """How long an item that failed `attempts` times before waits for its next try."""
    return min(RETRY_BASE_SECONDS * 2 ** min(attempts, 16), RETRY_MAX_SECONDS)


def settle(store: Store, items: list[InboxItem], report: ActivityReport) -> None:
    """Acknowledge what a batch logged; defer what failed, with its reason and back-off."""
    store.ack_webhooks(report.done)
    attempts = {item.id: item.attempts for item in items}
    for item_id, reason in report.retry.items():
        store.defer_webhooks([item_id], retry_delay(attempts.get(item_id, 0)), reason)


def build_activity_definitions(connectors: Sequence[type[CRMConnector]]) -> dg.Definitions:
    """Every CRM's `<crm>_log_activities` job and `<crm>_crm_activities` asset, and the one
    `quo_activity_sensor` that launches them."""
    built = [_build_activity_job(c) for c in connectors]
    jobs = [job for job, _ in built]
    return dg.Definitions(
        assets=[asset for _, asset in built], jobs=jobs, sensors=[_build_activity_sensor(jobs)]
    )


def _build_activity_job(
    connector_cls: type[CRMConnector],
) -> tuple[dg.JobDefinition, dg.AssetSpec]:
    crm = connector_cls.name
    key = activities_key(crm)
    max_runtime = connector_cls.crm_config.queue_config.timeout
    run_tags = {TAG_CRM: crm, "dagster/max_runtime": str(max_runtime)}
    Config = inbox_run_config(crm)

    @dg.op(
        name=_op_name(crm),
        description=f"Log Quo calls and messages on {crm} people, one activity per call",
    )
    def log_quo_activities(
        context: dg.OpExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        s = store.get()

        def applier(connector: CRMConnector, client: QuoClient) -> Any:
            workspace = Workspace(client)  # the numbers are read once per run
            return lambda batch: _log_batch(context, s, connector, workspace, batch, config)

        queue = activity_queue(config.integration_id)
        run_claimed(s, quo, crm, config, queue, max_runtime, applier)

    def _log_batch(
        context: dg.OpExecutionContext,
        s: Store,
        connector: CRMConnector,
        workspace: Workspace,
        items: list[InboxItem],
        config: InboxRunConfig,
    ) -> None:
        started = time.perf_counter()
        report = log_activities(s, connector, workspace.quo, items, workspace)
        settle(s, items, report)
        seconds = time.perf_counter() - started
        context.log.info(
            f"{report.events} Quo events: {report.created} activities created, "
            f"{report.enriched} enriched, {report.duplicates} duplicates dropped, "
            f"{report.unmatched} unmatched, {report.waiting} waiting, {report.failed} failed, "
            f"{len(report.retry)} to retry in {seconds:.1f} s"
        )
        context.log_event(
            dg.AssetMaterialization(
                asset_key=key,
                metadata=_metadata(config.integration_id, report, seconds),
                tags={TAG_INTEGRATION: config.integration_id},
            )
        )

    @dg.job(
        name=activity_job_name(crm),
        description=f"Log Quo calls and messages on {crm} (launched by quo_activity_sensor)",
        executor_def=dg.in_process_executor,
        tags=run_tags,
    )
    def log_activities_job() -> None:
        log_quo_activities()

    asset = dg.AssetSpec(
        key=key,
        **asset_attributes(crm),
        kinds={crm, "quo"},
        description=f"One materialization per {crm}_log_activities run, per integration: "
        "activities created and enriched, duplicates dropped, unmatched numbers, failures",
    )
    return log_activities_job, asset


def _build_activity_sensor(jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    # Each job's maximum runtime: the lease of what the sensor claims for it.
    timeouts = {job.name: float(job.tags["dagster/max_runtime"]) for job in jobs}

    @dg.sensor(
        name="quo_activity_sensor",
        jobs=list(jobs),
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Claims Quo call and message events from the inbox and launches "
        "<crm>_log_activities runs, one per integration at a time",
    )
    def quo_activity_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        s = store.get()

        def targets() -> list[InboxTarget]:
            pending = set(s.pending_webhook_integrations())
            return [
                InboxTarget(
                    queue,
                    integration,
                    activity_job_name(integration.crm),
                    _op_name(integration.crm),
                    timeouts[activity_job_name(integration.crm)] + LEASE_MARGIN_SECONDS,
                    {TAG_CRM: integration.crm},
                )
                for integration in s.list_integrations()
                if (queue := activity_queue(integration.id)) in pending
                and activity_job_name(integration.crm) in timeouts
            ]

        return inbox_tick(context, s, list(timeouts), targets, "no Quo events waiting")

    return quo_activity_sensor


def _metadata(integration_id: str, report: ActivityReport, seconds: float) -> dict[str, Any]:
    failures = report.failures[:MAX_FAILURES_SHOWN]
    return {
        "integration_id": integration_id,
        **report.metadata(),
        "duration_s": dg.MetadataValue.float(round(seconds, 3)),
        "unmatched_numbers": dg.MetadataValue.json(sorted(set(report.unmatched_numbers))[:100]),
        "failures": dg.MetadataValue.table(
            records=[dg.TableRecord({"event_id": e, "reason": r}) for e, r in failures],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("event_id", "string"),
                    dg.TableColumn("reason", "string"),
                ]
            ),
        ),
        "failures_not_shown": max(len(report.failures) - MAX_FAILURES_SHOWN, 0),
    }
