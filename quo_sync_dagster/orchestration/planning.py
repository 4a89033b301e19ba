"""What the ops that plan Processes share: the initial sync's and the polling cycle's."""

from __future__ import annotations

import dagster as dg

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.orchestration.resources import QuoResource
from quo_sync_dagster.orchestration.run_logs import log_planned
from quo_sync_dagster.orchestration.sync import open_connector, page_key
from quo_sync_dagster.orchestration.tags import TAG_OBJECT_TYPE, TAG_PLANNED
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.secrets import MissingSecret
from quo_sync_dagster.store.port import NotFound, Store

# A CRM or Quo fault during planning (the walk of a CRM without a total) is retried by Dagster
# in the same run; the walk resumes from its last checkpointed cursor.
PLAN_RETRY = dg.RetryPolicy(max_retries=4, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def open_integration(
    store: Store, quo: QuoResource, crm: str, integration_id: str
) -> tuple[CRMConnector, QuoClient]:
    """The integration's connector and Quo client; what the operator must fix (an unknown id,
    another CRM's integration, a missing secret) fails the run without retries."""
    try:
        connector = open_connector(store, crm, integration_id)
    except (NotFound, ValueError, MissingSecret) as exc:  # shown as is in the run's page
        raise dg.Failure(str(exc), allow_retries=False) from None
    try:
        return connector, quo.client(connector.integration, store)
    except (ValueError, MissingSecret) as exc:
        connector.close()
        raise dg.Failure(str(exc), allow_retries=False) from None


def queue_pages(
    context: dg.OpExecutionContext, store: Store, pages: str, process: Process
) -> Process:
    """Add the Process's page partitions and hand it to the page sensor."""
    keys = [page_key(process.id, p) for p in range(process.context["totalPages"])]
    context.instance.add_dynamic_partitions(pages, keys)
    if process.state is ProcessState.QUEUING_PAGES:
        process = store.transition(process.id, ProcessState.PROCESSING_BATCHES)
    return process


def report_planned(context: dg.OpExecutionContext, planned: list[Process]) -> None:
    """The planning run names its Processes (tags, metadata) and links to their page runs."""
    tags = {TAG_PLANNED: ",".join(p.id for p in planned)}
    if planned:
        tags[TAG_OBJECT_TYPE] = ",".join(p.context["personObjectType"] for p in planned)
    context.instance.add_run_tags(context.run.run_id, tags)
    log_planned(context, planned)
    context.add_output_metadata(
        {
            "processes": dg.MetadataValue.json(
                [
                    {
                        "id": p.id,
                        "objectType": p.context["personObjectType"],
                        "syncType": p.context["syncType"],
                        "modifiedSince": p.context.get("modifiedSince"),
                        "totalRecords": p.context["totalRecords"],
                        "totalPages": p.context["totalPages"],
                    }
                    for p in planned
                ]
            )
        }
    )
