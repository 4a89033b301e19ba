"""What the inbox sensors and their runs share (`<crm>_webhook_sensor` and `<crm>_webhook_sync`,
`quo_activity_sensor` and `<crm>_log_activities`): which integrations have a live run, giving
back the items of runs that ended badly, and runs that linger.

A run's claimed items are in its run config (`ops.<op>.config.item_ids`). Items of a run that
failed or was canceled become claimable at once; acknowledged ones are not affected, so
releasing twice is harmless.

A run lingers: after its items, it claims and applies the integration's new ones for as long
as each arrives within `webhook_linger_seconds` (an integration setting) of the last, so a
steady stream is applied within a second instead of paying a sensor tick and a run start each
(5-10 s on the local launcher). Items it claims itself have a short lease: if it dies, run
monitoring fails it within a minute, and by then they are claimable again."""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.completion import LIVE_STATUSES
from quo_sync_dagster.orchestration.launchpad import with_integration_id
from quo_sync_dagster.orchestration.planning import open_integration
from quo_sync_dagster.orchestration.resources import QuoResource
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.store.port import InboxItem, Store

_ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
# Runs that end while a tick runs are seen by the next one: ticks look back this much further.
CHECK_OVERLAP_SECONDS = 60.0
LINGER_SETTING = "webhook_linger_seconds"
DEFAULT_LINGER_SECONDS = 10.0
MAX_LINGER_SHARE = 0.5  # of the job's maximum runtime: a lingering run ends, the next takes over
LINGER_POLL_SECONDS = 0.25
LINGER_LEASE_SECONDS = 60.0
MAX_ITEMS_PER_RUN = 500  # inbox items one batch applies; more wait for the next claim
LEASE_MARGIN_SECONDS = 120  # a sensor's claim: beyond the job's maximum runtime


class InboxRunConfig(dg.Config):
    integration_id: str = Field(description="The integration whose inbox items to apply")
    item_ids: list[str] = Field(description="Inbox items claimed for this run by the sensor")
    linger_seconds: float = Field(
        0.0,
        ge=0,
        description="After its items, keep applying the integration's new ones while each "
        "arrives within this many seconds of the last (the sensor sets it from the "
        "integration's webhook_linger_seconds)",
    )


def inbox_run_config(crm: str) -> type[InboxRunConfig]:
    """InboxRunConfig of `crm`'s inbox runs: `integration_id` lists the CRM's integrations but
    has no default, since the sensor names it with the items it claimed for it."""
    return with_integration_id(  # type: ignore[return-value]
        InboxRunConfig, crm, "The integration whose inbox items to apply", default=False
    )


@dataclass(frozen=True)
class InboxTarget:
    """An integration's inbox queue as a sensor sees it: the run it launches for what waits."""

    queue: str
    integration: Integration
    job_name: str
    op_name: str
    lease_seconds: float  # the claim's: the job's maximum runtime and a margin
    tags: dict[str, str]


def inbox_tick(
    context: dg.SensorEvaluationContext,
    store: Store,
    job_names: list[str],
    targets: Callable[[], Iterable[InboxTarget]],
    idle: str,
) -> dg.SensorResult:
    """One tick of an inbox sensor: release the items of its jobs' runs that ended badly,
    then claim what waits per target (`targets()`, asked after the release) and request one
    run each (an integration with a live run waits). The cursor keeps the run-key sequence and
    when runs were last checked."""
    cursor: dict[str, Any] = json.loads(context.cursor or "{}")
    tick = datetime.now(UTC).timestamp()
    release_items_of_failed_runs(context.instance, store, job_names, cursor.get("checkedAt"))
    busy = busy_integrations(context.instance, job_names)
    seq, requests = int(cursor.get("seq", 0)), []
    for target in targets():
        integration = target.integration
        if integration.id in busy:
            continue
        items = store.claim_webhooks(target.queue, MAX_ITEMS_PER_RUN, target.lease_seconds)
        if not items:
            continue
        seq += 1
        config = {
            "integration_id": integration.id,
            "item_ids": [item.id for item in items],
            "linger_seconds": linger_seconds(integration),
        }
        requests.append(
            dg.RunRequest(
                run_key=f"{target.queue}:{seq}",
                job_name=target.job_name,
                run_config={"ops": {target.op_name: {"config": config}}},
                tags={**target.tags, TAG_INTEGRATION: integration.id},
            )
        )
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"seq": seq, "checkedAt": tick - CHECK_OVERLAP_SECONDS}),
        skip_reason=None if requests else idle,
    )


def run_claimed(
    store: Store,
    quo: QuoResource,
    crm: str,
    config: InboxRunConfig,
    queue: str,
    max_runtime: float,
    applier: Callable[[CRMConnector, QuoClient], Callable[[list[InboxItem]], None]],
) -> None:
    """The body of an inbox run: the integration's connector and Quo client open, its claimed
    items (acknowledged ones are done already), then what keeps arriving, each batch given to
    `applier(connector, client)`."""
    items = store.get_webhooks(config.item_ids)
    connector, client = open_integration(store, quo, crm, config.integration_id)
    try:
        with client:
            drain(
                items,
                lambda limit, lease: store.claim_webhooks(queue, limit, lease),
                applier(connector, client),
                config.linger_seconds,
                max_runtime,
            )
    finally:
        connector.close()


def busy_integrations(instance: dg.DagsterInstance, job_names: Iterable[str]) -> set[str]:
    """Integrations with a queued or running run of one of these jobs."""
    busy: set[str] = set()
    for job_name in job_names:
        records = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=LIVE_STATUSES))
        busy |= {r.dagster_run.tags.get(TAG_INTEGRATION, "") for r in records}
    return busy


def release_items_of_failed_runs(
    instance: dg.DagsterInstance, store: Store, job_names: Iterable[str], since: float | None
) -> None:
    """Release the items of these jobs' runs that failed or were canceled since `since`
    (a POSIX time; None: ever)."""
    after = datetime.fromtimestamp(since, UTC) if since else None
    for job_name in job_names:
        records = instance.get_run_records(
            dg.RunsFilter(job_name=job_name, statuses=_ENDED_BADLY, updated_after=after)
        )
        for record in records:
            ops = record.dagster_run.run_config.get("ops", {})
            ids = [i for op in ops.values() for i in op.get("config", {}).get("item_ids", [])]
            if ids:
                store.release_webhooks(ids)


def linger_seconds(integration: Integration) -> float:
    """The integration's `webhook_linger_seconds` (a bad value costs only speed)."""
    value = integration.settings.get(LINGER_SETTING, DEFAULT_LINGER_SECONDS)
    try:
        return max(float(value), 0.0)
    except (TypeError, ValueError):
        return DEFAULT_LINGER_SECONDS


def drain(
    first: list[InboxItem],
    claim: Callable[[int, float], list[InboxItem]],
    apply: Callable[[list[InboxItem]], None],
    linger: float,
    max_runtime: float,
) -> None:
    """Apply `first`, then what `claim(limit, lease)` finds, while items keep coming within
    `linger` seconds of the last batch (and for at most a share of `max_runtime`)."""
    started = last = time.monotonic()
    items = first
    while True:
        if items:
            apply(items)
            last = time.monotonic()
        now = time.monotonic()
        if now - last >= linger or now - started >= max_runtime * MAX_LINGER_SHARE:
            return
        if not items:
            time.sleep(LINGER_POLL_SECONDS)
        items = claim(MAX_ITEMS_PER_RUN, LINGER_LEASE_SECONDS)
