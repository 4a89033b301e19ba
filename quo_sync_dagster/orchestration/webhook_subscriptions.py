"""`<crm>_webhooks` (job) and `<crm>_renew_webhooks` (schedule): webhook subscriptions of the
CRMs that have webhooks, kept by webhooks/subscriptions.py.

`<crm>_webhooks` subscribes an integration (launchpad: integration_id) to its receiver route
under the receiver's public URL (the integration's `receiver_url` setting, else
$QUO_SYNC_RECEIVER_URL); an existing subscription is replaced and torn down, so launching it is
also how a changed receiver URL or CRM credential takes effect. `<crm>_renew_webhooks` ticks
hourly and, when the CRM has subscriptions, launches `<crm>_renew_webhook_subscriptions`: each
one that expires within `margin_hours` (Zoho channels) is renewed, and each that the CRM reports
gone (Pipedrive deletes a webhook after 3 days of failed deliveries; a lapsed Zoho channel) is
subscribed again.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.launchpad import with_integration_id
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION
from quo_sync_dagster.secrets import MissingSecret
from quo_sync_dagster.store.port import NotFound, Store
from quo_sync_dagster.webhooks.subscriptions import (
    DEFAULT_RENEW_MARGIN,
    receiver_base_url,
    renew,
    subscribe,
)

RENEW_CRON = "0 * * * *"  # hourly: a Zoho channel is renewed a day before it lapses


def subscribe_job_name(crm: str) -> str:
    return f"{crm}_webhooks"


def renew_job_name(crm: str) -> str:
    return f"{crm}_renew_webhook_subscriptions"


class SubscribeConfig(dg.Config):
    integration_id: str = Field(description="Id of the integration to subscribe (again)")


class RenewConfig(dg.Config):
    margin_hours: float = Field(
        default=DEFAULT_RENEW_MARGIN.total_seconds() / 3600,
        gt=0,
        description="Renew subscriptions that expire within this many hours",
    )


def build_subscription_definitions(connector_cls: type[CRMConnector]) -> dg.Definitions:
    crm = connector_cls.name
    tags = {TAG_CRM: crm}
    Config = with_integration_id(SubscribeConfig, crm, "Id of the integration to subscribe (again)")

    @dg.op(
        name=f"{crm}_subscribe_webhooks",
        description=f"Subscribe a {crm} integration's person events to the webhook receiver",
    )
    def subscribe_op(
        context: dg.OpExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: StoreResource,
    ) -> None:
        s = store.get()
        context.instance.add_run_tags(context.run.run_id, {TAG_INTEGRATION: config.integration_id})
        try:  # what the operator must fix fails the run without retries
            connector = open_connector(s, crm, config.integration_id)
        except (NotFound, ValueError, MissingSecret) as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        try:
            base_url = receiver_base_url(connector.integration)
            subscription = subscribe(s, connector, base_url)
        except ValueError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        finally:
            connector.close()
        context.log.info(f"{config.integration_id} subscribed at {subscription['receiverUrl']}")
        context.add_output_metadata(
            {
                "integration_id": config.integration_id,
                "receiver_url": subscription["receiverUrl"],
                "expires_at": subscription["expiresAt"] or "never",
                "details": dg.MetadataValue.json(subscription["details"]),  # holds no secret
            }
        )

    @dg.job(
        name=subscribe_job_name(crm),
        description=f"Subscribe (or subscribe again) a {crm} integration's webhooks. "
        "Launch it here with the integration id.",
        executor_def=dg.in_process_executor,
        tags=tags,
    )
    def subscribe_job() -> None:
        subscribe_op()

    @dg.op(
        name=f"{crm}_renew_subscriptions",
        description=f"Renew expiring {crm} webhook subscriptions; subscribe again gone ones",
    )
    def renew_op(context: dg.OpExecutionContext, config: RenewConfig, store: StoreResource) -> None:
        s = store.get()
        margin = timedelta(hours=config.margin_hours)
        outcomes: dict[str, str] = {}
        failures: dict[str, str] = {}
        for integration_id in _subscribed(s, crm):
            try:  # one integration's failure must not hold up the others
                connector = open_connector(s, crm, integration_id)
                try:
                    outcomes[integration_id] = renew(s, connector, margin)
                finally:
                    connector.close()
            except Exception as exc:  # connector and secret errors never hold a secret
                failures[integration_id] = f"{type(exc).__name__}: {exc}"
                context.log.warning(f"{integration_id}: {failures[integration_id]}")
        for integration_id, outcome in outcomes.items():
            context.log.info(f"{integration_id}: {outcome}")
        metadata = {
            "outcomes": dg.MetadataValue.json(outcomes),
            "failures": dg.MetadataValue.json(failures),
        }
        if failures:
            raise dg.Failure(
                description=f"{len(failures)} {crm} webhook subscriptions could not be renewed",
                metadata=metadata,
            )
        context.add_output_metadata(metadata)

    @dg.job(
        name=renew_job_name(crm),
        description=f"Renew or subscribe again every {crm} webhook subscription that needs it "
        f"(launched by {crm}_renew_webhooks)",
        executor_def=dg.in_process_executor,
        tags=tags,
    )
    def renew_job() -> None:
        renew_op()

    @dg.schedule(
        name=f"{crm}_renew_webhooks",
        job=renew_job,
        cron_schedule=RENEW_CRON,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Hourly: renew {crm} webhook subscriptions before they expire and "
        "subscribe again those the CRM reports gone",
    )
    def renew_schedule(context: dg.ScheduleEvaluationContext, store: StoreResource):
        if not _subscribed(store.get(), crm):
            return dg.SkipReason(f"no {crm} webhook subscription")
        now = context.scheduled_execution_time or datetime.now(UTC)
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        return dg.RunRequest(run_key=f"{crm}:{now.astimezone(UTC):%Y-%m-%dT%H:%M}", tags=tags)

    return dg.Definitions(jobs=[subscribe_job, renew_job], schedules=[renew_schedule])


def _subscribed(store: Store, crm: str) -> list[str]:
    return [i for i, sub in store.list_webhook_subscriptions().items() if sub.get("crm") == crm]
