"""`<crm>_ongoing_sync` (schedule) and `<crm>_poll` (job): polling cycles from a watermark.

A cycle is an ONGOING Process per object type, with the same page partitions, page runs,
recovery and completion as an initial sync. It reads the people modified since the stored
watermark minus `poll_overlap_minutes` (clock skew, equal timestamps); the watermark moves to
the cycle's start only when the whole cycle completed (completion.advance_watermark), so a
failed cycle is read again by the next. A cycle is a full scan instead (everyone listed, the
unchanged at no Quo cost, then the closing pass: missed people synced, deleted ones swept) when
the CRM cannot filter by modification time, when the integration has webhooks (the poll is
then the gap-fill for lost deliveries, including lost deletes), when the last full scan is
older than `full_scan_interval_hours`, or when the launchpad asks for one.

The schedule ticks every `poll_interval_minutes` of the CRM and starts a cycle for each of its
integrations that is due: one whose last cycle began at least its interval ago
(`poll_interval_minutes` setting; with webhooks, `gap_fill_interval_minutes`), that has
completed a sync before (a watermark) and has not turned polling off (`polling: false`).
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms.base import CRMConnector, connector_class
from quo_sync_dagster.orchestration.closing_run import CONFIRM_DELETES_KEY
from quo_sync_dagster.orchestration.launchpad import with_integration_id
from quo_sync_dagster.orchestration.planning import (
    PLAN_RETRY,
    open_integration,
    queue_pages,
    report_planned,
)
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.sync import plan_sync
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION
from quo_sync_dagster.store.port import AlreadyRunning, Store

DEFAULT_OVERLAP_MINUTES = 10.0
DEFAULT_GAP_FILL_MINUTES = 360.0
DEFAULT_FULL_SCAN_HOURS = 24.0
_DUE_TOLERANCE = timedelta(seconds=30)  # a tick a little early is still due


def poll_job_name(crm: str) -> str:
    return f"{crm}_poll"


def _op_name(crm: str) -> str:
    return f"{crm}_plan_poll"


def poll_cron(minutes: int) -> str:
    """A cron that ticks every `minutes` where cron can say it; else every 5 minutes (the due
    check then keeps each integration to its interval)."""
    if minutes < 60 and 60 % minutes == 0:
        return f"*/{minutes} * * * *"
    if minutes % 60 == 0 and 24 % (minutes // 60) == 0:
        return f"0 */{minutes // 60} * * *"
    return "*/5 * * * *"


def _number(settings: dict[str, Any], name: str, default: float) -> float:
    raw = settings.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError(f"setting {name} {raw!r} must be a number >= 0")
    return float(raw)


def _at(iso: str) -> datetime:
    when = datetime.fromisoformat(iso)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _cycles(store: Store, integration_id: str) -> list[Process]:
    return [
        p
        for p in store.list_processes(integration_id=integration_id)
        if p.context.get("syncType") == "ONGOING"
    ]


def needs_full_scan(
    connector_cls: type[CRMConnector], integration: Integration, store: Store, now: datetime
) -> str | None:
    """Why the next cycle of `integration` lists everyone (None: modified-since is enough)."""
    if not connector_cls.crm_config.sync_config.supports_modified_since:
        return f"{connector_cls.name} cannot list people by modification time"
    if store.get_webhook_subscription(integration.id) is not None:
        return "gap-fill for webhooks, which can lose deliveries (deletes too)"
    hours = _number(integration.settings, "full_scan_interval_hours", DEFAULT_FULL_SCAN_HOURS)
    full = [
        _at(p.context["endTime"])
        for p in store.list_processes(
            integration_id=integration.id, states=[ProcessState.COMPLETED]
        )
        if not p.context.get("modifiedSince") and p.context.get("endTime")
    ]
    if hours and (not full or now - max(full) >= timedelta(hours=hours)):
        return f"no full scan completed in the last {hours:g} hours"
    return None


class PollConfig(dg.Config):
    integration_id: str = Field(description="Id of the integration to poll")  # per CRM: below
    full_scan: bool = Field(
        default=False, description="List everyone (and sweep deletions), not only changes"
    )
    confirm_deletes: bool = Field(
        default=False,
        description="Let this cycle delete more people than the mass-delete guard allows "
        "(after checking the held deletions in the last closing pass)",
    )


def build_polling_definitions(
    connector_cls: type[CRMConnector], pages: dg.DynamicPartitionsDefinition
) -> dg.Definitions:
    crm = connector_cls.name
    cfg = connector_cls.crm_config
    Config = with_integration_id(PollConfig, crm, "Id of the integration to poll")

    @dg.op(
        name=_op_name(crm),
        description=f"Plan a polling cycle of a {crm} integration",
        retry_policy=PLAN_RETRY,
    )
    def plan_poll(
        context: dg.OpExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        s = store.get()
        context.instance.add_run_tags(context.run.run_id, {TAG_INTEGRATION: config.integration_id})
        connector, client = open_integration(s, quo, crm, config.integration_id)
        integration = connector.integration
        now = datetime.now(UTC)
        try:
            why_full = "asked for in the launchpad" if config.full_scan else None
            why_full = why_full or needs_full_scan(connector_cls, integration, s, now)
            overlap = timedelta(
                minutes=_number(
                    integration.settings, "poll_overlap_minutes", DEFAULT_OVERLAP_MINUTES
                )
            )
            object_types = connector.object_types
        except ValueError as exc:
            connector.close()
            client.close()
            raise dg.Failure(
                f"integration {integration.id!r}: {exc}", allow_retries=False
            ) from None
        planned = []
        try:
            for object_type in object_types:
                watermark = s.get_watermark(integration.id, object_type)
                since = None if why_full or watermark is None else _at(watermark) - overlap
                context.log.info(
                    f"{object_type}: "
                    + (f"people modified since {since.isoformat()}" if since else "full scan")
                    + (f" ({why_full})" if why_full else "")
                    + ("" if watermark else " (no watermark yet: no sync has completed)")
                )
                try:
                    process = plan_sync(
                        s,
                        connector,
                        client,
                        object_type,
                        cfg.sync_config.initial_batch_size
                        if since is None
                        else cfg.sync_config.ongoing_batch_size,
                        cfg.queue_config.batch_size,
                        since,
                        plan_run_id=context.run.run_id,
                        last_attempt=context.retry_number >= PLAN_RETRY.max_retries,
                        sync_type="ONGOING",
                        context={
                            CONFIRM_DELETES_KEY: config.confirm_deletes,
                            "webhooks": s.get_webhook_subscription(integration.id) is not None,
                        },
                    )
                except AlreadyRunning as exc:  # the last cycle is still at work: not a failure
                    context.log.info(f"{exc}; this cycle leaves {object_type} to it")
                    continue
                planned.append(queue_pages(context, s, pages.name, process))
        finally:
            client.close()
            connector.close()
        report_planned(context, planned)

    @dg.job(
        name=poll_job_name(crm),
        description=f"One polling cycle of a {crm} integration (launched by "
        f"{crm}_ongoing_sync; launch it here to poll now or to confirm held deletions)",
        executor_def=dg.in_process_executor,
        tags={TAG_CRM: crm},
    )
    def poll_job() -> None:
        plan_poll()

    minutes = cfg.sync_config.poll_interval_minutes

    @dg.schedule(
        name=f"{crm}_ongoing_sync",
        job=poll_job,
        cron_schedule=poll_cron(minutes),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Every {minutes} minutes: a polling cycle for each {crm} integration "
        "that is due",
    )
    def ongoing_sync(context: dg.ScheduleEvaluationContext, store: StoreResource):
        s = store.get()
        now = context.scheduled_execution_time or datetime.now(UTC)
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        requests = []
        for integration in s.list_integrations(crm=crm):
            try:
                if not _due(s, integration, minutes, now):
                    continue
            except ValueError as exc:  # one bad setting must not stop the other integrations
                context.log.warning(f"integration {integration.id!r}: {exc}")
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"{integration.id}:{now.astimezone(UTC):%Y-%m-%dT%H:%M}",
                    run_config={
                        "ops": {_op_name(crm): {"config": {"integration_id": integration.id}}}
                    },
                    tags={TAG_CRM: crm, TAG_INTEGRATION: integration.id},
                )
            )
        return requests or dg.SkipReason(f"no {crm} integration is due for a polling cycle")

    return dg.Definitions(jobs=[poll_job], schedules=[ongoing_sync])


def _due(store: Store, integration: Integration, minutes: int, now: datetime) -> bool:
    settings = integration.settings
    if settings.get("polling") is False:
        return False
    types = connector_class(integration.crm).object_types_for(settings)
    if all(store.get_watermark(integration.id, t) is None for t in types):
        return False  # the initial sync has not completed: it comes first
    starts = [_at(p.context["startTime"]) for p in _cycles(store, integration.id)]
    interval = poll_interval(store, integration, minutes)
    return not starts or now - max(starts) >= interval - _DUE_TOLERANCE


def poll_interval(store: Store, integration: Integration, crm_minutes: int) -> timedelta:
    """How often polling cycles of the integration start: its gap-fill interval when it has
    webhooks, else its poll interval (default: the CRM's, `crm_minutes`). ValueError names a
    bad setting."""
    settings = integration.settings
    if store.get_webhook_subscription(integration.id) is not None:
        return timedelta(
            minutes=_number(settings, "gap_fill_interval_minutes", DEFAULT_GAP_FILL_MINUTES)
        )
    return timedelta(minutes=_number(settings, "poll_interval_minutes", crm_minutes))
