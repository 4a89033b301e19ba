"""`<crm>_webhook_sensor` and `<crm>_webhook_sync`: CRM webhooks from the inbox into Quo.

The receiver (quo_sync_dagster.webhooks) stores each verified delivery in the store's inbox
before it answers the CRM. Each tick, the sensor claims what arrived per integration (a lease
as long as the job's maximum runtime, so nothing else takes it meanwhile) and launches one run
per integration with a run key; an integration whose previous run is still live waits for the
next tick, so two runs never write one person at once. The run applies the changes
(change_sync.py) and only then acknowledges the items; then it lingers (inbox_runs.drain)
while more arrive. Items of a run that failed, was canceled or was killed are released by the
next tick (or, claimed while lingering, when their short lease ends) and delivered again:
at-least-once delivery, made
exactly-once in Quo by re-reading every person by id before writing.

Where the receiver runs apart from Dagster and writes to SQS (QUO_SYNC_WEBHOOK_QUEUE_URL), each
tick first moves what the queue holds into the store's inbox (a message leaves SQS only once
the store has it).
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

import os
import time
from typing import Any

import dagster as dg

from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.change_sync import apply_changes
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
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.store.port import InboxItem, Store

QUEUE_URL_ENV = "QUO_SYNC_WEBHOOK_QUEUE_URL"
MAX_DRAINED_PER_TICK = 5000


def webhook_job_name(crm: str) -> str:
    return f"{crm}_webhook_sync"


def webhook_changes_key(crm: str) -> dg.AssetKey:
    return dg.AssetKey(f"{crm}_webhook_changes")


def _op_name(crm: str) -> str:
    return f"{crm}_apply_webhook_changes"


def build_webhook_definitions(
    connector_cls: type[CRMConnector], run_tags: dict[str, str]
) -> dg.Definitions:
    crm = connector_cls.name
    changes_key = webhook_changes_key(crm)
    max_runtime = connector_cls.crm_config.queue_config.timeout
    lease_seconds = max_runtime + LEASE_MARGIN_SECONDS
    Config = inbox_run_config(crm)

    @dg.op(
        name=_op_name(crm),
        description=f"Re-read the {crm} people the webhooks name and make Quo equal to them",
    )
    def apply_webhook_changes(
        context: dg.OpExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        s = store.get()

        def applier(connector: CRMConnector, client: QuoClient) -> Any:
            upserter = quo.upserter(client, connector.integration, s)
            return lambda batch: _apply(context, s, connector, client, upserter, batch, config)

        run_claimed(s, quo, crm, config, config.integration_id, max_runtime, applier)

    @dg.job(
        name=webhook_job_name(crm),
        description=f"Apply {crm} webhook changes (launched by {crm}_webhook_sensor)",
        executor_def=dg.in_process_executor,
        tags=run_tags,
    )
    def webhook_sync() -> None:
        apply_webhook_changes()

    def _apply(
        context: dg.OpExecutionContext,
        s: Store,
        connector: CRMConnector,
        client: QuoClient,
        upserter: ContactUpserter,
        items: list[InboxItem],
        config: InboxRunConfig,
    ) -> None:
        started = time.perf_counter()
        report = apply_changes(s, connector, client, upserter, items, context.run.run_id)
        s.ack_webhooks([item.id for item in items])  # only now: a crash redelivers them
        seconds = time.perf_counter() - started
        context.log.info(
            f"{report.events} events on {report.people} people: {report.created} created, "
            f"{report.updated} updated, {report.unchanged} unchanged, {report.deleted} deleted, "
            f"{report.failed} failed in {seconds:.1f} s"
        )
        context.log_event(
            dg.AssetMaterialization(
                asset_key=changes_key,
                metadata={
                    "integration_id": config.integration_id,
                    **report.metadata(),
                    "duration_s": dg.MetadataValue.float(round(seconds, 3)),
                    "errors_first": dg.MetadataValue.json(
                        [f"{e.external_id}: {e.error}" for e in report.errors[:20]]
                    ),
                },
                tags={TAG_INTEGRATION: config.integration_id},
            )
        )

    @dg.sensor(
        name=f"{crm}_webhook_sensor",
        job=webhook_sync,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Claims {crm} webhook changes from the inbox and launches "
        f"{crm}_webhook_sync runs, one per integration at a time",
    )
    def webhook_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        s = store.get()
        if queue_url := os.environ.get(QUEUE_URL_ENV):
            from quo_sync_dagster.webhooks.sqs import drain_sqs  # boto3 only where it is used

            if moved := drain_sqs(queue_url, s, max_messages=MAX_DRAINED_PER_TICK):
                context.log.info(f"moved {moved} deliveries from SQS into the inbox")
        job = webhook_job_name(crm)

        def targets() -> list[InboxTarget]:
            pending = set(s.pending_webhook_integrations())
            return [
                InboxTarget(i.id, i, job, _op_name(crm), lease_seconds, run_tags)
                for i in s.list_integrations(crm=crm)
                if i.id in pending
            ]

        return inbox_tick(context, s, [job], targets, "no webhook changes waiting")

    changes_asset = dg.AssetSpec(
        key=changes_key,
        **asset_attributes(crm),
        kinds={crm, "quo"},
        description=f"One materialization per {crm}_webhook_sync run, per integration: events, "
        "people upserted and deleted, latency from receipt to Quo",
    )
    return dg.Definitions(assets=[changes_asset], jobs=[webhook_sync], sensors=[webhook_sensor])
