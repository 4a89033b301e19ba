"""What the inbox sensors share (`<crm>_webhook_sensor`, `quo_activity_sensor`): which
integrations have a live run, and giving back the items of runs that ended badly.

A run's claimed items are in its run config (`ops.<op>.config.item_ids`). Items of a run that
failed or was canceled become claimable at once; acknowledged ones are not affected, so
releasing twice is harmless."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import dagster as dg

from quo_sync_dagster.orchestration.completion import LIVE_STATUSES
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION
from quo_sync_dagster.store.port import Store

_ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
# Runs that end while a tick runs are seen by the next one: ticks look back this much further.
CHECK_OVERLAP_SECONDS = 60.0


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
