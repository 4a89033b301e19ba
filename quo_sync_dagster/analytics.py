"""Sync history as pandas DataFrames for analysts: one row per Process, per page, per error.

Every frame is read from the process store alone (the embedded default, or the Store given) and
takes the same filters: `crm=`, `integration=` and `since=`/`until=`, which select Processes by
their start time (UTC; a naive time is taken as UTC). Per integration is one call away:
`processes_frame().groupby("integration_id")[["synced", "failed"]].sum()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import dagster as dg
import pandas as pd

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.orchestration.metadata import finished_at, process_summary
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.orchestration.sync import parse_page_key
from quo_sync_dagster.store import Store, open_store

When = datetime | str | None
UTC_TIME = "datetime64[ns, UTC]"
TEXT = "str"  # pandas' string dtype: a missing text (no error, no skip reason) is NaN
# Column -> dtype, so that an empty frame has the same columns and types as any other.
_COUNTS = ("records", "synced", "failed", "skipped", "created", "updated", "unchanged")
PROCESS_COLUMNS: dict[str, str] = {
    "process_id": TEXT,
    "integration_id": TEXT,
    "crm": TEXT,
    "object_type": TEXT,
    "sync_type": TEXT,
    "state": TEXT,
    "started_at": UTC_TIME,
    "ended_at": UTC_TIME,  # NaT while the Process is live
    "seconds": "float64",  # syncing time: time spent in ERROR before a re-run is left out
    **dict.fromkeys(_COUNTS, "int64"),  # records: handled (synced + skipped + failed)
    "adopted": "int64",
    "records_per_second": "float64",
    "pages": "int64",
    "pages_failed": "int64",
    "error": TEXT,  # why a Process in ERROR stopped
}
PAGE_COLUMNS: dict[str, str] = {
    "process_id": TEXT,
    "integration_id": TEXT,
    "crm": TEXT,
    "page_key": TEXT,  # the page's partition key in Dagster
    "page": "int64",
    **dict.fromkeys(_COUNTS, "int64"),
    "ok": "bool",  # False: the page failed as a whole
}
# Added by pages_frame(instance=...): from the page's latest materialization.
PAGE_TIMING_COLUMNS: dict[str, str] = {"started_at": UTC_TIME, "seconds": "float64"}
ERROR_COLUMNS: dict[str, str] = {
    "process_id": TEXT,
    "integration_id": TEXT,
    "crm": TEXT,
    "contact_id": TEXT,
    "error": TEXT,
    "skipped": TEXT,  # the skip reason (core.process.SkipReason); NaN for a failure
    "page": TEXT,  # the key of the page the record was on
    "timestamp": UTC_TIME,
}
_MATERIALIZATIONS_PER_READ = 1000
_PARTITIONS_PER_READ = 500


def processes_frame(
    store: Store | None = None,
    *,
    crm: str | None = None,
    integration: str | None = None,
    since: When = None,
    until: When = None,
    last: int | None = None,
) -> pd.DataFrame:
    """One row per Process (PROCESS_COLUMNS), oldest first (only the `last` N of them when
    given); the figures the Process shows on `<crm>_sync_processes`."""
    with _opened(store) as s:
        selected = _selected(s, crm, integration, since, until)
        rows = [_process_row(s, p) for p in (selected[-last:] if last else selected)]
    return _frame(rows, PROCESS_COLUMNS)


def pages_frame(
    store: Store | None = None,
    *,
    crm: str | None = None,
    integration: str | None = None,
    since: When = None,
    until: When = None,
    instance: dg.DagsterInstance | None = None,
) -> pd.DataFrame:
    """One row per page of the selected Processes (PAGE_COLUMNS: its latest result), in
    Process and page order. With the Dagster `instance`, also when each page was synced and
    how long it took (PAGE_TIMING_COLUMNS; NaT/NaN for a page no run measured)."""
    with _opened(store) as s:
        rows = [
            {
                **_identity(process),
                "page_key": key,
                "page": parse_page_key(key)[1],
                **{name: getattr(result, name) for name in _COUNTS},
                "ok": result.ok,
            }
            for process in _selected(s, crm, integration, since, until)
            for key, result in sorted(s.page_results(process.id).items())
        ]
    if instance is None:
        return _frame(rows, PAGE_COLUMNS)
    timings = _page_timings(instance, rows)
    for row in rows:
        row["started_at"], row["seconds"] = timings.get(row["page_key"], (None, None))
    return _frame(rows, {**PAGE_COLUMNS, **PAGE_TIMING_COLUMNS})


def errors_frame(
    store: Store | None = None,
    *,
    crm: str | None = None,
    integration: str | None = None,
    since: When = None,
    until: When = None,
) -> pd.DataFrame:
    """One row per failed or skipped record of the selected Processes (ERROR_COLUMNS), as the
    store keeps them: the last 100 of each Process, oldest first."""
    with _opened(store) as s:
        rows = [
            {
                **_identity(process),
                "contact_id": e.external_id,
                "error": e.error,
                "skipped": e.skipped,
                "page": e.page,
                "timestamp": e.timestamp,
            }
            for process in _selected(s, crm, integration, since, until)
            for e in s.recent_errors(process.id)
        ]
    return _frame(rows, ERROR_COLUMNS)


def integration_summary(processes: pd.DataFrame) -> pd.DataFrame:
    """Per integration of a processes_frame: Processes, record outcomes, syncing time and the
    throughput over that time (records over seconds, not a mean of the Processes' rates)."""
    summary = processes.groupby("integration_id").agg(
        processes=("process_id", "count"),
        records=("records", "sum"),
        synced=("synced", "sum"),
        skipped=("skipped", "sum"),
        failed=("failed", "sum"),
        seconds=("seconds", "sum"),
    )
    summary["records_per_second"] = summary["records"] / summary["seconds"].where(
        summary["seconds"] > 0
    )
    return summary


@contextmanager
def _opened(store: Store | None) -> Iterator[Store]:
    """The given store, or the embedded default opened for this call only."""
    if store is not None:
        yield store
        return
    opened = open_store(default_store_uri())
    try:
        yield opened
    finally:
        opened.close()


def _utc(value: datetime | str) -> pd.Timestamp:
    when = pd.Timestamp(value)
    return when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")


def _started(process: Process) -> pd.Timestamp:
    return _utc(process.context.get("startTime") or process.created_at)


def _selected(
    store: Store, crm: str | None, integration: str | None, since: When, until: When
) -> list[Process]:
    """The Processes of the CRM and integration that started in [since, until), oldest first."""
    start = None if since is None else _utc(since)
    end = None if until is None else _utc(until)
    return [
        p
        for p in store.list_processes(integration_id=integration, crm=crm)
        if (start is None or _started(p) >= start) and (end is None or _started(p) < end)
    ]


def _identity(process: Process) -> dict[str, Any]:
    return {
        "process_id": process.id,
        "integration_id": process.integration_id,
        "crm": process.context.get("crm"),
    }


def _process_row(store: Store, process: Process) -> dict[str, Any]:
    # The summary the UI shows, so its duration and throughput are the same figures.
    summary = process_summary(store, process)
    counters, ctx = process.counters, process.context
    return {
        **_identity(process),
        "object_type": ctx.get("personObjectType"),
        "sync_type": ctx.get("syncType"),
        "state": str(process.state),
        "started_at": _started(process),
        "ended_at": finished_at(process),
        "seconds": summary["aggregateData"]["duration"] / 1000,
        "records": counters["processed"],
        **{name: counters[name] for name in _COUNTS[1:]},
        "adopted": counters["adopted"],
        "records_per_second": summary["aggregateData"]["recordsPerSecond"],
        "pages": ctx.get("totalPages") or 0,
        "pages_failed": counters["pages_failed"],
        "error": ctx.get("error") if process.state is ProcessState.ERROR else None,
    }


def _page_timings(
    instance: dg.DagsterInstance, rows: list[dict[str, Any]]
) -> dict[str, tuple[float, float]]:
    """Page key -> (start as a POSIX time, seconds) from the latest materialization of each
    page's partition of `<crm>_quo_contacts` that measured it."""
    keys_by_crm: dict[str, list[str]] = {}
    for row in rows:
        keys_by_crm.setdefault(row["crm"], []).append(row["page_key"])
    timings: dict[str, tuple[float, float]] = {}
    for crm, keys in keys_by_crm.items():
        # A bounded number of partitions per query: each is a bound SQL parameter.
        for first in range(0, len(keys), _PARTITIONS_PER_READ):
            records_filter = dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(f"{crm}_quo_contacts"),
                asset_partitions=keys[first : first + _PARTITIONS_PER_READ],
            )
            timings.update(_measured(instance, records_filter))
    return timings


def _measured(
    instance: dg.DagsterInstance, records_filter: dg.AssetRecordsFilter
) -> dict[str, tuple[float, float]]:
    found: dict[str, tuple[float, float]] = {}
    cursor = None
    while True:  # oldest first: a re-run page's later timing replaces the earlier one
        result = instance.fetch_materializations(
            records_filter, limit=_MATERIALIZATIONS_PER_READ, cursor=cursor, ascending=True
        )
        for record in result.records:
            event = record.asset_materialization
            if event is not None and event.partition and "duration_s" in event.metadata:
                found[event.partition] = (
                    event.metadata["started_at"].value,
                    event.metadata["duration_s"].value,
                )
        if not result.has_more:
            return found
        cursor = result.cursor


def _frame(rows: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    for name, dtype in columns.items():
        frame[name] = _to_utc(frame[name]) if dtype == UTC_TIME else frame[name].astype(dtype)
    return frame


def _to_utc(column: pd.Series) -> pd.Series:
    """ISO texts, Timestamps or POSIX seconds (None: NaT) as UTC times."""
    if pd.api.types.is_numeric_dtype(column):
        times = pd.to_datetime(column, unit="s", utc=True)
    else:
        times = pd.to_datetime(column, utc=True, format="ISO8601")
    return times.astype(UTC_TIME)  # one resolution, whatever pandas inferred
