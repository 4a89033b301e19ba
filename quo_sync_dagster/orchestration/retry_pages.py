"""`<crm>_retry_failed_pages`: an operator's "try again now" for an integration or a Process.

Automatic recovery (completion.py) re-runs failed pages with backoff and closes a Process as
ERROR once its attempts are spent. This job reopens such Processes (and cuts the backoff of
those still waiting) and asks the completion sensor for a retry now, in a new round whose
automatic retries start afresh. The sensor launches the page runs, so they carry the same tags
and wait behind the same per-CRM run limit and max runtime as every other page run.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the annotation.

from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from quo_sync_dagster.core.process import IllegalTransition, Process, ProcessState
from quo_sync_dagster.core.recovery import RECOVERY_KEY, REQUESTED, RETRY_ROUND_KEY
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.completion import CLOSING_RECOVERY_KEY, unsynced_pages
from quo_sync_dagster.orchestration.metadata import left_error_context
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.run_logs import page_runs_url
from quo_sync_dagster.orchestration.sync import integration_of
from quo_sync_dagster.orchestration.tags import TAG_CRM, TAG_INTEGRATION, TAG_PROCESS
from quo_sync_dagster.store.port import NotFound, Store

RETRYABLE = [ProcessState.ERROR, ProcessState.PROCESSING_BATCHES]


class RetryFailedPagesConfig(dg.Config):
    integration_id: str | None = Field(
        default=None, description="Retry every Process of this integration that has failed pages"
    )
    process_id: str | None = Field(default=None, description="Or retry this one Process")


def retry_job_name(crm: str) -> str:
    return f"{crm}_retry_failed_pages"


def build_retry_job(connector_cls: type[CRMConnector]) -> dg.JobDefinition:
    crm = connector_cls.name

    @dg.op(name=f"{crm}_request_page_retries")
    def request_retries(
        context: dg.OpExecutionContext, config: RetryFailedPagesConfig, store: StoreResource
    ) -> None:
        s = store.get()
        targets = _targets(s, crm, config)
        context.instance.add_run_tags(context.run.run_id, _identity(config))
        retried = []
        for process in targets:
            if process.state not in RETRYABLE:
                context.log.info(f"Process {process.id} is {process.state}: nothing to retry")
                continue
            pages = unsynced_pages(s, process)
            failed_closing = process.state is ProcessState.ERROR and not pages
            if not pages and not failed_closing:
                context.log.info(f"Process {process.id}: every page is synced, nothing to retry")
                continue
            _request(s, process)
            what = f"{len(pages)} unsynced pages" if pages else "its closing pass"
            context.log.info(
                f"Process {process.id} ({process.integration_id}, was {process.state}): "
                f"{what} re-run by {crm}_completion_sensor within seconds; its page runs: "
                f"{page_runs_url(process.id)}"
            )
            retried.append(f"- [{process.id}]({page_runs_url(process.id)}): {what}")
        context.add_output_metadata(
            {
                "processes_retried": len(retried),
                "retried": dg.MetadataValue.md("\n".join(retried) or "nothing to retry"),
            }
        )

    @dg.job(
        name=retry_job_name(crm),
        description=f"Re-run the failed pages of an integration's (or one) {crm} Process now; "
        f"the runs go through the run queue like every page run",
        executor_def=dg.in_process_executor,
        tags={TAG_CRM: crm},
    )
    def retry_job() -> None:
        request_retries()

    return retry_job


def _identity(config: RetryFailedPagesConfig) -> dict[str, str]:
    if config.process_id:
        return {TAG_PROCESS: config.process_id}
    return {TAG_INTEGRATION: config.integration_id or ""}


def _targets(store: Store, crm: str, config: RetryFailedPagesConfig) -> list[Process]:
    if bool(config.integration_id) == bool(config.process_id):
        raise dg.Failure("give either integration_id or process_id", allow_retries=False)
    if config.process_id:
        try:
            process = store.get_process(config.process_id)
        except NotFound:
            raise dg.Failure(f"no Process {config.process_id!r}", allow_retries=False) from None
        if process.context.get("crm") != crm:
            raise dg.Failure(f"Process {process.id!r} is not a {crm} sync", allow_retries=False)
        return [process]
    try:
        integration = integration_of(store, crm, config.integration_id or "")
    except (NotFound, ValueError) as exc:
        raise dg.Failure(str(exc), allow_retries=False) from None
    return store.list_processes(integration_id=integration.id, crm=crm)


def _request(store: Store, process: Process) -> None:
    """A new round: the completion sensor re-runs the unsynced pages (or the closing pass) at
    its next tick, then retries automatically as after any failure."""
    updates = {
        RETRY_ROUND_KEY: process.context.get(RETRY_ROUND_KEY, 0) + 1,
        RECOVERY_KEY: dict(REQUESTED),
        CLOSING_RECOVERY_KEY: None,
    }
    if process.state is ProcessState.ERROR:
        try:
            store.transition(
                process.id,
                ProcessState.PROCESSING_BATCHES,
                {**left_error_context(process, datetime.now(UTC)), **updates},
            )
            return
        except IllegalTransition:  # a page run reopened it meanwhile
            pass
    store.update_context(process.id, updates)
