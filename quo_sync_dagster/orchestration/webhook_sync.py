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

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.change_sync import apply_changes
from quo_sync_dagster.orchestration.completion import SENSOR_INTERVAL_SECONDS
from quo_sync_dagster.orchestration.inbox_runs import (
    LEASE_MARGIN_SECONDS,
    MAX_ITEMS_PER_RUN,
    busy_integrations,
    drain,
    linger_seconds,
    next_check,
    release_items_of_failed_runs,
)
from quo_sync_dagster.orchestration.planning import open_integration
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


class WebhookSyncConfig(dg.Config):
    integration_id: str = Field(description="The integration whose inbox items to apply")
    item_ids: list[str] = Field(description="Inbox items claimed for this run by the sensor")
    linger_seconds: float = Field(
        0.0,
        ge=0,
        description="After its items, keep applying the integration's new ones while each "
        "arrives within this many seconds of the last (the sensor sets it from the "
        "integration's webhook_linger_seconds)",
    )


def build_webhook_definitions(
    connector_cls: type[CRMConnector], run_tags: dict[str, str]
) -> dg.Definitions:
    crm = connector_cls.name
    changes_key = webhook_changes_key(crm)
    max_runtime = connector_cls.crm_config.queue_config.timeout
    lease_seconds = max_runtime + LEASE_MARGIN_SECONDS

    @dg.op(
        name=_op_name(crm),
        description=f"Re-read the {crm} people the webhooks name and make Quo equal to them",
    )
    def apply_webhook_changes(
        context: dg.OpExecutionContext,
        config: WebhookSyncConfig,
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        s = store.get()
        items = s.get_webhooks(config.item_ids)  # acknowledged ones are done already
        connector, client = open_integration(s, quo, crm, config.integration_id)
        try:
            with client:
                upserter = quo.upserter(client, connector.integration, s)
                drain(
                    items,
                    lambda limit, lease: s.claim_webhooks(config.integration_id, limit, lease),
                    lambda batch: _apply(context, s, connector, client, upserter, batch, config),
                    config.linger_seconds,
                    max_runtime,
                )
        finally:
            connector.close()

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
        config: WebhookSyncConfig,
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
        cursor: dict[str, Any] = json.loads(context.cursor or "{}")
        tick = datetime.now(UTC).timestamp()
        jobs = [webhook_job_name(crm)]
        release_items_of_failed_runs(context.instance, s, jobs, cursor.get("checkedAt"))
        mine = {i.id: i for i in s.list_integrations(crm=crm)}
        busy = busy_integrations(context.instance, jobs)
        seq, requests = int(cursor.get("seq", 0)), []
        for integration_id in s.pending_webhook_integrations():
            if integration_id not in mine or integration_id in busy:
                continue
            items = s.claim_webhooks(integration_id, MAX_ITEMS_PER_RUN, lease_seconds)
            if not items:
                continue
            seq += 1
            requests.append(
                dg.RunRequest(
                    run_key=f"{integration_id}:{seq}",
                    run_config={
                        "ops": {
                            _op_name(crm): {
                                "config": {
                                    "integration_id": integration_id,
                                    "item_ids": [item.id for item in items],
                                    "linger_seconds": linger_seconds(mine[integration_id]),
                                }
                            }
                        }
                    },
                    tags={**run_tags, TAG_INTEGRATION: integration_id},
                )
            )
        new_cursor = json.dumps({"seq": seq, "checkedAt": next_check(tick)})
        return dg.SensorResult(
            run_requests=requests,
            cursor=new_cursor,
            skip_reason=None if requests else "no webhook changes waiting",
        )

    changes_asset = dg.AssetSpec(
        key=changes_key,
        group_name=crm,
        kinds={crm, "quo"},
        description=f"One materialization per {crm}_webhook_sync run, per integration: events, "
        "people upserted and deleted, latency from receipt to Quo",
    )
    return dg.Definitions(assets=[changes_asset], jobs=[webhook_sync], sensors=[webhook_sensor])
