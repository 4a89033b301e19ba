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

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import dagster as dg

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.orchestration.completion import LIVE_STATUSES
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION
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


def next_check(tick: float) -> float:
    """What a sensor keeps in its cursor as `since` for its next tick."""
    return tick - CHECK_OVERLAP_SECONDS


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
