"""Health checks of the syncs on `<crm>_sync_processes`, per integration of the CRM.

The first three read the latest closed Process (COMPLETED or ERROR) of each integration and
object type, so a failing one keeps failing until a later sync of that integration and type
ends well:

* `no_process_in_error`: it did not end in ERROR.
* `all_pages_synced`: every one of its pages is synced.
* `failed_share_below_max`: its failed records are at most the integration's
  `max_failed_share` (default 0.01) of the records it synced or tried to (skipped records are
  left out: they are not failures).
* `no_duplicate_contacts`: no Quo contact is linked from two externalIds of the integration
  (from the links). Run on demand, it also lists the integration's contacts in Quo (a request
  per LIST_PAGE_MAX contacts, for integrations of up to QUO_SCAN_MAX_LINKS links) and fails
  for an externalId held by more than one contact.
* `polling_fresh`: for every integration that polls, the last successful sync of each object
  type started within two polling intervals (one until the next cycle is due, one for it to
  run).

A failing check's description names each integration, its counts and what to do. The
completion sensor reports them all after each Process it closes; `<crm>_freshness_sensor`
reports `polling_fresh` whenever its outcome changes (time alone can make it fail); each runs
on demand from the asset's Checks tab.
"""

# No `from __future__ import annotations`: Dagster reads the resource types from the annotations.

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from quo_sync_dagster.core.external_ids import crm_id_of
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms.base import connector_class
from quo_sync_dagster.orchestration.polling import poll_interval
from quo_sync_dagster.orchestration.reconcile import IdSample
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster.quo.client import LIST_PAGE_MAX, QuoClient
from quo_sync_dagster.store.port import Store

ERROR_CHECK = "no_process_in_error"
PAGES_CHECK = "all_pages_synced"
FAILED_SHARE_CHECK = "failed_share_below_max"
DUPLICATES_CHECK = "no_duplicate_contacts"
FRESHNESS_CHECK = "polling_fresh"
DEFAULT_MAX_FAILED_SHARE = 0.01
QUO_SCAN_MAX_LINKS = 20_000  # ~400 list requests, under a minute at Quo's 10 requests/s
FRESHNESS_SENSOR_SECONDS = 60
_SAMPLE = 5  # ids or partition keys named in a finding's text

Key = tuple[str, str]  # (integration id, object type)


@dataclass(frozen=True)
class Finding:
    """What fails for one integration (and object type), with the counts."""

    integration_id: str
    object_type: str | None
    problem: str
    counts: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        kind = f" ({self.object_type})" if self.object_type else ""
        return f"integration {self.integration_id}{kind}: {self.problem}"


@dataclass(frozen=True)
class SyncView:
    """What the checks read, once per evaluation."""

    store: Store
    crm: str
    now: datetime
    integrations: dict[str, Integration]
    latest: dict[Key, Process]  # the latest closed Process
    last_completed: dict[Key, Process]
    # Opens a Quo client for an integration: given only where Quo may be listed (on demand).
    quo_client: Callable[[Integration], QuoClient] | None = None


def read_view(
    store: Store, crm: str, quo_client: Callable[[Integration], QuoClient] | None = None
) -> SyncView:
    integrations = {i.id: i for i in store.list_integrations(crm=crm)}
    latest: dict[Key, Process] = {}
    completed: dict[Key, Process] = {}
    closed = [ProcessState.COMPLETED, ProcessState.ERROR]
    for process in store.list_processes(crm=crm, states=closed):  # oldest first
        if process.integration_id not in integrations:  # a removed integration's history
            continue
        key = (process.integration_id, process.context["personObjectType"])
        latest[key] = process
        if process.state is ProcessState.COMPLETED:
            completed[key] = process
    return SyncView(store, crm, datetime.now(UTC), integrations, latest, completed, quo_client)


Found = tuple[list[Finding], dict[str, Any]]  # findings, and what was checked (metadata)


def _in_error(view: SyncView) -> Found:
    findings = [
        Finding(
            integration_id,
            object_type,
            f"Process {p.id} ({p.context.get('syncType', 'INITIAL').lower()} sync) ended in "
            f"ERROR: {p.context.get('error') or 'no reason recorded'}",
            {"process_id": p.id, "error": p.context.get("error")},
        )
        for (integration_id, object_type), p in view.latest.items()
        if p.state is ProcessState.ERROR
    ]
    return findings, {"processes_checked": len(view.latest)}


def _unsynced_pages(view: SyncView) -> Found:
    findings = []
    for (integration_id, object_type), p in view.latest.items():
        total = p.context.get("totalPages") or 0
        if p.counters["pages_processed"] >= total:
            continue
        results = view.store.page_results(p.id)
        keys = [page_key(p.id, i) for i in range(total)]
        failed = [k for k in keys if k in results and not results[k].ok]
        never_ran = [k for k in keys if k not in results]
        unsynced = failed + never_ran
        findings.append(
            Finding(
                integration_id,
                object_type,
                f"{len(unsynced)} of {total} pages of Process {p.id} not synced "
                f"({len(failed)} failed, {len(never_ran)} never ran; first: "
                f"{', '.join(unsynced[:_SAMPLE])})",
                {
                    "process_id": p.id,
                    "pages": total,
                    "failed_pages": len(failed),
                    "never_ran": len(never_ran),
                },
            )
        )
    return findings, {"processes_checked": len(view.latest)}


def max_failed_share(settings: dict[str, Any]) -> float:
    """The integration's `max_failed_share`; ValueError when it is not a share."""
    raw = settings.get("max_failed_share", DEFAULT_MAX_FAILED_SHARE)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        raise ValueError(f"setting max_failed_share {raw!r} must be a number from 0 to 1")
    return float(raw)


def _failed_share(view: SyncView) -> Found:
    findings = []
    for (integration_id, object_type), p in view.latest.items():
        try:
            limit = max_failed_share(view.integrations[integration_id].settings)
        except ValueError as exc:
            findings.append(Finding(integration_id, object_type, str(exc)))
            continue
        failed, skipped = p.counters["failed"], p.counters["skipped"]
        tried = p.counters["synced"] + failed
        if tried and failed / tried > limit:
            findings.append(
                Finding(
                    integration_id,
                    object_type,
                    f"{failed} of {tried} records failed ({failed / tried:.1%}, more than "
                    f"{limit:.1%}; {skipped} skipped records not counted) in Process {p.id}",
                    {"process_id": p.id, "failed": failed, "tried": tried, "max_share": limit},
                )
            )
    return findings, {"processes_checked": len(view.latest)}


def _linked_twice(store: Store, integration_id: str) -> IdSample:
    """Quo contacts the links name for more than one externalId ("first & other" pairs)."""
    first_of: dict[str, str] = {}
    twice = IdSample()
    for external_id, link in store.iter_contact_links(integration_id):
        first = first_of.setdefault(link.quo_id, external_id)
        if first != external_id:
            twice.add(f"{first} & {external_id}")
    return twice


def _doubled_in_quo(client: QuoClient, integration: Integration, source: str) -> IdSample:
    """externalIds of the integration held by more than one contact in Quo."""
    seen: set[str] = set()
    doubled: set[str] = set()
    for contact in client.iter_contacts(source):
        external_id = contact.get("externalId")
        if external_id is None or crm_id_of(integration, external_id) is None:
            continue  # another integration's contact, or not one a sync wrote
        if external_id in seen:
            doubled.add(external_id)
        seen.add(external_id)
    sample = IdSample()
    for external_id in sorted(doubled):
        sample.add(external_id)
    return sample


def _duplicates(view: SyncView) -> Found:
    findings = []
    listed, not_listed = [], []
    source = connector_class(view.crm).quo_source
    for integration in view.integrations.values():
        problems, counts = [], {}
        twice = _linked_twice(view.store, integration.id)
        if twice.count:
            counts["contacts_linked_twice"] = twice.count
            problems.append(
                f"{twice.count} Quo contacts are linked from two externalIds "
                f"({', '.join(twice.first[:_SAMPLE])})"
            )
        if view.quo_client is not None:
            links = view.store.count_contact_links(integration.id)
            if links > QUO_SCAN_MAX_LINKS:
                not_listed.append(f"{integration.id} ({links} links)")
            else:
                with view.quo_client(integration) as client:
                    doubled = _doubled_in_quo(client, integration, source)
                listed.append(integration.id)
                if doubled.count:
                    counts["external_ids_doubled_in_quo"] = doubled.count
                    problems.append(
                        f"{doubled.count} externalIds are held by more than one Quo contact "
                        f"({', '.join(doubled.first[:_SAMPLE])})"
                    )
        if problems:
            findings.append(Finding(integration.id, None, "; ".join(problems), counts))
    checked: dict[str, Any] = {"integrations_checked": len(view.integrations)}
    if view.quo_client is not None:
        checked["listed_in_quo"] = ", ".join(listed)
        checked["not_listed_in_quo"] = ", ".join(not_listed)
    return findings, checked


def _poll_interval(store: Store, integration: Integration, crm_minutes: int) -> timedelta:
    """How often polling cycles of the integration start; never more often than the CRM's
    schedule ticks."""
    return max(poll_interval(store, integration, crm_minutes), timedelta(minutes=crm_minutes))


def _minutes(delta: timedelta) -> float:
    return delta.total_seconds() / 60


def _stale(view: SyncView) -> Found:
    connector_cls = connector_class(view.crm)
    crm_minutes = connector_cls.crm_config.sync_config.poll_interval_minutes
    findings, checked = [], 0
    for integration in view.integrations.values():
        if integration.settings.get("polling") is False:
            continue
        try:
            interval = _poll_interval(view.store, integration, crm_minutes)
            object_types = connector_cls.object_types_for(integration.settings)
        except ValueError as exc:
            findings.append(Finding(integration.id, None, f"polling cannot run: {exc}"))
            continue
        for object_type in object_types:
            last = view.last_completed.get((integration.id, object_type))
            if last is None:
                continue  # no sync has completed yet: polling starts after the first one
            checked += 1
            started = datetime.fromisoformat(last.context["startTime"])
            age = view.now - started
            if age > 2 * interval:
                findings.append(
                    Finding(
                        integration.id,
                        object_type,
                        f"the last successful sync started {_minutes(age):.0f} minutes ago "
                        f"({started:%Y-%m-%d %H:%M} UTC, Process {last.id}); polling is due "
                        f"every {_minutes(interval):g} minutes",
                        {
                            "process_id": last.id,
                            "age_minutes": round(_minutes(age), 1),
                            "interval_minutes": _minutes(interval),
                        },
                    )
                )
    return findings, {"object_types_checked": checked}


@dataclass(frozen=True)
class Outcome:
    findings: list[Finding]
    metadata: dict[str, Any]
    summary: str

    @property
    def passed(self) -> bool:
        return not self.findings


@dataclass(frozen=True)
class SyncCheck:
    name: str
    description: str
    passed_text: str
    remedy: str  # what to do, `{crm}` is the CRM
    find: Callable[[SyncView], Found]
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
    lists_quo: bool = False  # run on demand, it lists Quo too (the `quo` resource)

    def evaluate(self, view: SyncView) -> Outcome:
        findings, checked = self.find(view)
        if not findings:
            return Outcome([], checked, self.passed_text)
        rows = [
            {"integration_id": f.integration_id, "object_type": f.object_type, **f.counts}
            for f in findings
        ]
        summary = "; ".join(f.text() for f in findings) + ". " + self.remedy.format(crm=view.crm)
        metadata = {
            **checked,
            "failing": len(findings),
            "integrations": ", ".join(sorted({f.integration_id for f in findings})),
            "findings": dg.MetadataValue.json(rows),
        }
        return Outcome(findings, metadata, summary)

    def evaluation(self, outcome: Outcome, asset_key: dg.AssetKey) -> dg.AssetCheckEvaluation:
        """The outcome as an event a sensor reports."""
        return dg.AssetCheckEvaluation(
            asset_key=asset_key, check_name=self.name, **self._fields(outcome)
        )

    def result(self, outcome: Outcome) -> dg.AssetCheckResult:
        """The outcome as the result of the check run on demand."""
        return dg.AssetCheckResult(**self._fields(outcome))

    def _fields(self, outcome: Outcome) -> dict[str, Any]:
        return {
            "passed": outcome.passed,
            "metadata": {**outcome.metadata, "summary": outcome.summary},
            "severity": self.severity,
            "description": outcome.summary,
        }


FRESHNESS = SyncCheck(
    FRESHNESS_CHECK,
    "Every integration that polls completed a sync of each object type within two polling "
    "intervals",
    "every polling integration synced recently",
    "Check that {crm}_ongoing_sync is on (Automation tab) and why the integration's last "
    "{crm}_poll runs failed; launch {crm}_poll for it to poll now.",
    _stale,
)
SYNC_CHECKS = (
    SyncCheck(
        ERROR_CHECK,
        "The latest sync of every integration and object type did not end in ERROR",
        "no latest sync ended in ERROR",
        "Fix the cause the error names, then launch {crm}_retry_failed_pages for the "
        "integration or backfill the failed partitions of {crm}_quo_contacts (the Process "
        "reopens and closes again; nothing is written twice); a polling cycle is read again "
        "by the next one.",
        _in_error,
    ),
    SyncCheck(
        PAGES_CHECK,
        "Every page of the latest sync of every integration and object type is synced",
        "every page synced",
        "Once the cause is fixed, launch {crm}_retry_failed_pages for the integration or "
        "backfill the failed partitions of {crm}_quo_contacts from its Partitions tab (their "
        "observations say why they failed); nothing is written twice.",
        _unsynced_pages,
    ),
    SyncCheck(
        FAILED_SHARE_CHECK,
        "Failed records are at most the integration's max_failed_share (default "
        f"{DEFAULT_MAX_FAILED_SHARE:g}) of the records its latest sync tried; skipped records "
        "do not count",
        "failed records within each integration's max_failed_share",
        "Read the errors table of the Process's {crm}_sync_processes event; fix those people "
        "in the CRM (or the cause in Quo), then launch {crm}_poll with full_scan: true to sync "
        "them again. Raise the integration's max_failed_share only if such failures are "
        "expected.",
        _failed_share,
        severity=dg.AssetCheckSeverity.WARN,
    ),
    SyncCheck(
        DUPLICATES_CHECK,
        "No Quo contact is linked from two externalIds of an integration; run on demand, no "
        f"externalId is held by two contacts in Quo (integrations up to {QUO_SCAN_MAX_LINKS} "
        f"links; a request per {LIST_PAGE_MAX} contacts)",
        "no duplicate contacts",
        "Keep one contact per externalId in Quo (delete the others), then launch "
        "{crm}_reconcile for the integration: it drops links to deleted contacts and the next "
        "sync writes each person to their own contact. Contacts linked twice come from "
        "adoption: check the integration's legacy_external_id and adopt_by_phone settings.",
        _duplicates,
        lists_quo=True,
    ),
    FRESHNESS,
)


def _asset_check(crm: str, asset_key: dg.AssetKey, check: SyncCheck) -> dg.AssetChecksDefinition:
    if check.lists_quo:

        @dg.asset_check(asset=asset_key, name=check.name, description=check.description)
        def with_quo(store: StoreResource, quo: QuoResource) -> dg.AssetCheckResult:
            s = store.get()
            view = read_view(s, crm, lambda integration: quo.client(integration, s))
            return check.result(check.evaluate(view))

        return with_quo

    @dg.asset_check(asset=asset_key, name=check.name, description=check.description)
    def from_store(store: StoreResource) -> dg.AssetCheckResult:
        return check.result(check.evaluate(read_view(store.get(), crm)))

    return from_store


def build_sync_checks(crm: str, asset_key: dg.AssetKey) -> list[dg.AssetChecksDefinition]:
    return [_asset_check(crm, asset_key, check) for check in SYNC_CHECKS]


def sync_check_evaluations(
    store: Store, crm: str, asset_key: dg.AssetKey
) -> list[dg.AssetCheckEvaluation]:
    """Every sync check from the store (Quo is listed only on demand)."""
    view = read_view(store, crm)
    return [check.evaluation(check.evaluate(view), asset_key) for check in SYNC_CHECKS]


def build_freshness_sensor(crm: str, asset_key: dg.AssetKey) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{crm}_freshness_sensor",
        minimum_interval_seconds=FRESHNESS_SENSOR_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Reports {FRESHNESS_CHECK} on {asset_key.to_user_string()} when it "
        "changes: no Process closing can tell that polling stopped",
    )
    def freshness_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
        outcome = FRESHNESS.evaluate(read_view(store.get(), crm))
        # What failed, not how late: a check failing a minute longer is no news.
        state = json.dumps(
            sorted([f.integration_id, f.object_type or ""] for f in outcome.findings)
        )
        if state == context.cursor:
            return dg.SkipReason(f"{FRESHNESS_CHECK}: no change")
        return dg.SensorResult(
            asset_events=[FRESHNESS.evaluation(outcome, asset_key)], cursor=state
        )

    return freshness_sensor
