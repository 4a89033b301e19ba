"""Restore what Quo lost: compare an integration's contacts in Quo with its contact links.

A contact the sync created and a Quo user then deleted stays deleted: its content hash is
unchanged, so later syncs send nothing. `reconcile` lists the integration's contacts in Quo and
drops the link of every linked contact that is gone, so the next sync creates it again; a
contact in Quo in this integration's namespace without a link (a stray: a run killed between a
create and storing its link, a store restored from a backup) is adopted with an empty content
hash, so the next sync PATCHes it instead of creating a twin.

Per CRM `x`: the job `x_reconcile` (launchpad: `integration_id`) and the hourly
`x_reconcile_schedule`, which launches it for every integration of `x` whose setting
`reconcile_interval_hours` (default 24; 0 turns it off) has passed since its last reconcile run;
`reconcile_run_request` asks for one after a full initial sync.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from quo_sync_dagster.core.adoption import AdoptionRules
from quo_sync_dagster.core.external_ids import crm_id_of
from quo_sync_dagster.core.models import ContactLink, Integration
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.launchpad import with_integration_id
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.sync import integration_of
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.secrets import MissingSecret
from quo_sync_dagster.store.port import NotFound, Store

SAMPLE_IDS = 20  # ids shown per finding; the counts are exact
DEFAULT_INTERVAL_HOURS = 24.0
_LINK_CHECK_BATCH = 500  # Quo contacts whose links are looked up in one store query
# A failed or canceled run does not count as the last reconcile: the next tick tries again.
_COUNTED_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
    dg.DagsterRunStatus.SUCCESS,
]


@dataclass
class IdSample:
    """How many ids, and the first SAMPLE_IDS of them."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, item: str) -> None:
        self.count += 1
        if len(self.first) < SAMPLE_IDS:
            self.first.append(item)


@dataclass
class ReconcileReport:
    linked: int = 0  # links the integration had
    in_quo: int = 0  # contacts of the source in Quo under this integration's namespace
    missing_in_quo: IdSample = field(default_factory=IdSample)  # linked, gone from Quo
    restored_links_dropped: int = 0  # their links, dropped: the next sync creates them again
    strays: IdSample = field(default_factory=IdSample)  # in the namespace, without a link
    adopted: int = 0  # strays now linked with an empty hash: the next sync PATCHes them
    foreign: int = 0  # contacts of the source outside the namespace (or without externalId)

    def metadata(self) -> dict[str, Any]:
        return {
            "linked": self.linked,
            "in_quo": self.in_quo,
            "missing_in_quo": self.missing_in_quo.count,
            "restored_links_dropped": self.restored_links_dropped,
            "strays": self.strays.count,
            "adopted": self.adopted,
            "foreign": self.foreign,
            "missing_in_quo_first": dg.MetadataValue.json(self.missing_in_quo.first),
            "strays_first": dg.MetadataValue.json(self.strays.first),
        }


def reconcile(
    store: Store, client: QuoClient, integration: Integration, source: str
) -> ReconcileReport:
    """Drop the links of contacts deleted in Quo and adopt unlinked ones of this integration.

    Holds the Quo ids of the source, the strays and the missing external ids; contacts and links
    are streamed. A sync running meanwhile costs at most a lookup or one extra PATCH next time:
    a link dropped for a contact created after the listing is found again by externalId."""
    report = ReconcileReport()
    seen_quo_ids: set[str] = set()
    strays: dict[str, str] = {}  # externalId -> Quo id
    batch: dict[str, str] = {}

    def find_strays() -> None:
        linked = store.get_contact_links(integration.id, batch)
        for external_id, quo_id in batch.items():
            if external_id not in linked:
                strays[external_id] = quo_id
                report.strays.add(external_id)
        batch.clear()

    for contact in client.iter_contacts(source):
        seen_quo_ids.add(contact["id"])
        external_id = contact.get("externalId")
        if external_id is None or crm_id_of(integration, external_id) is None:
            report.foreign += 1
            continue
        report.in_quo += 1
        batch[external_id] = contact["id"]
        if len(batch) >= _LINK_CHECK_BATCH:
            find_strays()
    find_strays()
    rules = AdoptionRules.from_settings(integration.settings)
    if not rules.rewrite_ids:  # adopted contacts kept the earlier system's source and ids
        for legacy in rules.legacy_sources:
            seen_quo_ids.update(contact["id"] for contact in client.iter_contacts(legacy))

    missing: list[str] = []
    for external_id, link in store.iter_contact_links(integration.id):
        report.linked += 1
        if link.quo_id not in seen_quo_ids:
            missing.append(external_id)
            report.missing_in_quo.add(external_id)
    store.delete_contact_links(integration.id, missing)
    report.restored_links_dropped = len(missing)

    # Adopted last, so `linked` counts only the links that were there before.
    store.put_contact_links(
        integration.id, {ext: ContactLink(quo_id, "") for ext, quo_id in strays.items()}
    )
    report.adopted = len(strays)
    return report


def reconcile_interval(integration: Integration) -> timedelta | None:
    """The integration's `reconcile_interval_hours` (None: turned off); ValueError if bad."""
    raw = integration.settings.get("reconcile_interval_hours", DEFAULT_INTERVAL_HOURS)
    try:
        hours = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"reconcile_interval_hours {raw!r} is not a number") from None
    return timedelta(hours=hours) if hours > 0 else None


def reconcile_job_name(crm: str) -> str:
    return f"{crm}_reconcile"


def _op_name(crm: str) -> str:
    return f"{crm}_reconcile_contacts"


def _run_config(crm: str, integration_id: str) -> dict[str, Any]:
    return {"ops": {_op_name(crm): {"config": {"integration_id": integration_id}}}}


def _run_tags(crm: str, integration_id: str) -> dict[str, str]:
    return {TAG_CRM: crm, TAG_INTEGRATION: integration_id}


def reconcile_run_request(crm: str, integration_id: str, process_id: str) -> dg.RunRequest:
    """A reconcile run of the integration once its full initial sync `process_id` completed
    (one per Process: the run key names it)."""
    return dg.RunRequest(
        run_key=f"reconcile-after:{process_id}",
        job_name=reconcile_job_name(crm),
        run_config=_run_config(crm, integration_id),
        tags=_run_tags(crm, integration_id),
    )


def last_reconcile_at(
    instance: dg.DagsterInstance, crm: str, integration_id: str
) -> datetime | None:
    """When the integration's newest reconcile run that did not fail was created."""
    records = instance.get_run_records(
        dg.RunsFilter(
            job_name=reconcile_job_name(crm),
            tags={TAG_INTEGRATION: integration_id},
            statuses=_COUNTED_STATUSES,
        ),
        limit=1,
    )
    if not records:
        return None
    created = records[0].create_timestamp
    return created if created.tzinfo else created.replace(tzinfo=UTC)


class ReconcileConfig(dg.Config):
    integration_id: str = Field(description="Id of the integration to reconcile")  # per CRM


def build_reconcile_definitions(connector_cls: type[CRMConnector]) -> dg.Definitions:
    """The CRM's `x_reconcile` job (in `jobs[0]`, for sensors that launch it) and its
    `x_reconcile_schedule`; the `store` and `quo` resources come from the caller."""
    crm = connector_cls.name
    Config = with_integration_id(ReconcileConfig, crm, "Id of the integration to reconcile")

    @dg.op(
        name=_op_name(crm),
        description=f"Drop links of {crm} contacts deleted in Quo; adopt unlinked ones",
    )
    def reconcile_contacts(
        context: dg.OpExecutionContext,
        config: Config,  # type: ignore[valid-type]
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        # Runs launched from the launchpad get the integration tag too: the schedule reads it.
        context.instance.add_run_tags(context.run_id, {TAG_INTEGRATION: config.integration_id})
        s = store.get()
        try:
            integration = integration_of(s, crm, config.integration_id)
            client = quo.client(integration, s)
        except (NotFound, ValueError, MissingSecret) as exc:  # shown as is in the run's page
            raise dg.Failure(str(exc), allow_retries=False) from None
        with client:
            report = reconcile(s, client, integration, connector_cls.quo_source)
        context.log.info(
            f"{report.missing_in_quo.count} linked contacts missing in Quo (links dropped), "
            f"{report.strays.count} unlinked contacts adopted"
        )
        context.add_output_metadata(report.metadata())

    @dg.job(
        name=reconcile_job_name(crm),
        description=f"Find {crm} contacts deleted in Quo (the next sync restores them) and "
        "adopt unlinked ones",
        executor_def=dg.in_process_executor,
        tags={TAG_CRM: crm},
    )
    def reconcile_job() -> None:
        reconcile_contacts()

    @dg.schedule(
        name=f"{crm}_reconcile_schedule",
        job=reconcile_job,
        cron_schedule="0 * * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Hourly: a reconcile run per integration whose reconcile_interval_hours "
        f"(default {DEFAULT_INTERVAL_HOURS:g}) has passed since its last one",
    )
    def reconcile_schedule(context: dg.ScheduleEvaluationContext, store: StoreResource):
        now = context.scheduled_execution_time or datetime.now(UTC)
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
        requests = []
        for integration in store.get().list_integrations(crm=crm):
            try:
                interval = reconcile_interval(integration)
            except ValueError as exc:  # one bad setting must not stop the other integrations
                context.log.warning(f"integration {integration.id!r}: {exc}")
                continue
            last = last_reconcile_at(context.instance, crm, integration.id)
            if interval is None or (last is not None and now - last < interval):
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"{integration.id}:{now.astimezone(UTC):%Y-%m-%dT%H:%M}",
                    run_config=_run_config(crm, integration.id),
                    tags=_run_tags(crm, integration.id),
                )
            )
        return requests or dg.SkipReason("no integration is due for a reconcile")

    return dg.Definitions(jobs=[reconcile_job], schedules=[reconcile_schedule])
