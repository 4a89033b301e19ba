"""`<crm>_closing_pass`: the job that runs a full scan's closing pass (closing.py).

The completion sensor launches it when every page of a full-scan Process is synced, and
completes the Process once it has succeeded (it marks the Process context `closing.done`).
Deletions the mass-delete guard held back are in the run's metadata, the Process context and
the `<crm>_deletions_not_held` asset check; launching `<crm>_poll` with `confirm_deletes: true`
(or this job for the Process, with `confirm_deletes: true`) lets them through.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

from typing import Any

import dagster as dg
from pydantic import Field

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.closing import closing_pass
from quo_sync_dagster.orchestration.planning import open_integration
from quo_sync_dagster.orchestration.resources import QuoResource, StoreResource
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION, TAG_PROCESS
from quo_sync_dagster.store.port import NotFound

CLOSING_KEY = "closing"  # Process context: {"done": bool, "report": {...}}
CONFIRM_DELETES_KEY = "confirmDeletes"  # Process context: set by a confirmed poll


def closing_job_name(crm: str) -> str:
    return f"{crm}_closing_pass"


def _op_name(crm: str) -> str:
    return f"{crm}_close_full_scan"


def closing_run_config(crm: str, process: Process) -> dict[str, Any]:
    return {"ops": {_op_name(crm): {"config": {"process_id": process.id}}}}


class ClosingConfig(dg.Config):
    process_id: str = Field(description="The full-scan Process whose closing pass to run")
    confirm_deletes: bool = Field(
        default=False,
        description="Delete from Quo even more people than the mass-delete guard allows",
    )


def build_closing_job(connector_cls: type[CRMConnector]) -> dg.JobDefinition:
    crm = connector_cls.name

    @dg.op(
        name=_op_name(crm),
        description=f"Sync the {crm} people a full scan's pages missed; delete from Quo the "
        "people the CRM no longer has",
    )
    def close_full_scan(
        context: dg.OpExecutionContext,
        config: ClosingConfig,
        store: StoreResource,
        quo: QuoResource,
    ) -> None:
        s = store.get()
        try:
            process = s.get_process(config.process_id)
        except NotFound as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        if process.context.get("crm") != crm:
            raise dg.Failure(f"process {process.id!r} is not a {crm} sync", allow_retries=False)
        context.instance.add_run_tags(
            context.run.run_id,
            {TAG_PROCESS: process.id, TAG_INTEGRATION: process.integration_id},
        )
        connector, client = open_integration(s, quo, crm, process.integration_id)
        confirm = config.confirm_deletes or bool(process.context.get(CONFIRM_DELETES_KEY))
        try:
            with client:
                report = closing_pass(
                    s,
                    connector,
                    client,
                    quo.upserter(client, connector.integration, s),
                    process,
                    sweep=True,
                    confirm_deletes=confirm,
                )
        finally:
            connector.close()
        summary = report.metadata()
        if process.state is ProcessState.COMPLETING:
            s.update_context(process.id, {CLOSING_KEY: {"done": True, "report": summary}})
        context.log.info(
            f"closing pass of {process.id}: walked {report.walked} people in {report.pages} "
            f"pages; synced {report.created} missed and {report.updated} changed; "
            f"{report.gone} gone from {crm}, {report.deleted} deleted from Quo"
            + (f"; {report.held} deletions HELD: {report.held_reason}" if report.held else "")
        )
        if report.held:
            context.log.warning(
                f"deletions held back for integration {process.integration_id!r}: "
                f"{report.held_reason}. To let them through, launch {crm}_poll for it with "
                "confirm_deletes: true."
            )
        context.add_output_metadata(
            {
                "integration_id": process.integration_id,
                "process_id": process.id,
                **summary,
                "errors_first": dg.MetadataValue.json(
                    [f"{e.external_id}: {e.error}" for e in report.errors[:20]]
                ),
            }
        )

    @dg.job(
        name=closing_job_name(crm),
        description=f"Closing pass of a full {crm} scan (launched by {crm}_completion_sensor)",
        executor_def=dg.in_process_executor,
        tags={TAG_CRM: crm},
    )
    def closing_job() -> None:
        close_full_scan()

    return closing_job
