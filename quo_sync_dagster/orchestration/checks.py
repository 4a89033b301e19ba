"""Asset checks on `<crm>_sync_processes`, per integration of the CRM: those of ongoing sync
below, and the health of every sync (sync_checks.py).

* `deletions_not_held`: no integration has deletions the mass-delete guard held back in its
  last full scan (closing.py); a failure names each integration, the counts and what to do.
* `webhooks_delivering`: no integration with webhooks had its last gap-fill poll find changes
  while no webhook run applied anything since the poll before: its deliveries have stopped.

The completion sensor reports all of them after every Process it closes; each can also be run
on demand from the asset's Checks tab.
"""

# No `from __future__ import annotations`: Dagster reads the context type from the annotation.

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.orchestration.closing_run import CLOSING_KEY
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.sync_checks import build_sync_checks, sync_check_evaluations
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION
from quo_sync_dagster.store.port import Store

DELETIONS_CHECK = "deletions_not_held"
WEBHOOKS_CHECK = "webhooks_delivering"


def _latest(processes: list[Process], keep: Callable[[Process], bool]) -> Process | None:
    kept = [p for p in processes if keep(p)]
    return kept[-1] if kept else None  # list_processes is oldest first


def held_deletions(store: Store, crm: str) -> list[dict[str, Any]]:
    held = []
    for integration in store.list_integrations(crm=crm):
        done = store.list_processes(integration_id=integration.id, states=[ProcessState.COMPLETED])
        last = _latest(done, lambda p: CLOSING_KEY in p.context)
        report = (last.context[CLOSING_KEY].get("report") or {}) if last else {}
        if report.get("held"):
            held.append(
                {
                    "integration_id": integration.id,
                    "process_id": last.id if last else None,
                    "held": report["held"],
                    "reason": report.get("held_reason"),
                }
            )
    return held


def deletions_evaluation(store: Store, crm: str) -> tuple[bool, dict[str, Any], str]:
    held = held_deletions(store, crm)
    if not held:
        return True, {"held_integrations": 0}, "no deletions held back"
    text = "; ".join(
        f"integration {h['integration_id']}: {h['held']} deletions held ({h['reason']})"
        for h in held
    )
    return (
        False,
        {"held_integrations": len(held), "held": dg.MetadataValue.json(held)},
        f"{text}. Check the people in the closing-pass run, then launch {crm}_poll for the "
        "integration with confirm_deletes: true (or fix the CRM if they were deleted by mistake).",
    )


def silent_webhooks(store: Store, instance: dg.DagsterInstance, crm: str) -> list[dict[str, Any]]:
    silent = []
    for integration in store.list_integrations(crm=crm):
        if store.get_webhook_subscription(integration.id) is None:
            continue
        cycles = [
            p
            for p in store.list_processes(
                integration_id=integration.id, states=[ProcessState.COMPLETED]
            )
            if p.context.get("syncType") == "ONGOING" and p.context.get("webhooks")
        ]
        if len(cycles) < 2:
            continue
        last, before = cycles[-1], cycles[-2]
        found = last.counters.get("created", 0) + last.counters.get("updated", 0)
        if not found:
            continue
        since = datetime.fromisoformat(before.context["startTime"]).astimezone(UTC)
        runs = instance.get_run_records(
            dg.RunsFilter(
                job_name=f"{crm}_webhook_sync",
                tags={TAG_INTEGRATION: integration.id},
                created_after=since,
            ),
            limit=1,
        )
        if not runs:
            silent.append(
                {
                    "integration_id": integration.id,
                    "changes_found_by_poll": found,
                    "since": since.isoformat(),
                }
            )
    return silent


def webhooks_evaluation(
    store: Store, instance: dg.DagsterInstance, crm: str
) -> tuple[bool, dict[str, Any], str]:
    silent = silent_webhooks(store, instance, crm)
    if not silent:
        return True, {"silent_integrations": 0}, "webhooks deliver"
    text = "; ".join(
        f"integration {s['integration_id']}: polling found {s['changes_found_by_poll']} changes "
        f"and no webhook arrived since {s['since']}"
        for s in silent
    )
    return (
        False,
        {"silent_integrations": len(silent), "silent": dg.MetadataValue.json(silent)},
        f"{text}. The CRM may have dropped the subscription: run {crm}_webhooks for it to "
        "subscribe again, and check the receiver is reachable.",
    )


def check_evaluations(
    store: Store, instance: dg.DagsterInstance, crm: str, processes_key: dg.AssetKey
) -> list[dg.AssetCheckEvaluation]:
    """Every check, as events the completion sensor reports."""
    results = [
        (DELETIONS_CHECK, *deletions_evaluation(store, crm)),
        (WEBHOOKS_CHECK, *webhooks_evaluation(store, instance, crm)),
    ]
    return [
        dg.AssetCheckEvaluation(
            asset_key=processes_key,
            check_name=name,
            passed=passed,
            metadata={**metadata, "summary": summary},
            severity=dg.AssetCheckSeverity.ERROR,
            description=summary,
        )
        for name, passed, metadata, summary in results
    ] + sync_check_evaluations(store, crm, processes_key)


def build_checks(crm: str, processes_key: dg.AssetKey) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=processes_key,
        name=DELETIONS_CHECK,
        description="No integration has deletions held back by the mass-delete guard",
    )
    def deletions_not_held(store: StoreResource) -> dg.AssetCheckResult:
        passed, metadata, summary = deletions_evaluation(store.get(), crm)
        return dg.AssetCheckResult(
            passed=passed, metadata={**metadata, "summary": summary}, description=summary
        )

    @dg.asset_check(
        asset=processes_key,
        name=WEBHOOKS_CHECK,
        description="Webhooks still arrive for every integration whose polls find changes",
    )
    def webhooks_delivering(
        context: dg.AssetCheckExecutionContext, store: StoreResource
    ) -> dg.AssetCheckResult:
        passed, metadata, summary = webhooks_evaluation(store.get(), context.instance, crm)
        return dg.AssetCheckResult(
            passed=passed, metadata={**metadata, "summary": summary}, description=summary
        )

    return [deletions_not_held, webhooks_delivering, *build_sync_checks(crm, processes_key)]
