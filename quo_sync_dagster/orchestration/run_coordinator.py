"""The run queue, with the product's tags added to page runs launched without them.

A backfill of page partitions launched from the UI (or GraphQL `launchPartitionBackfill`) runs
as `__ASSET_JOB` with none of the tags the sensors set. The per-CRM run limits key on
`quo_sync/crm` and are applied when a run is dequeued, so the tags must be on the run when it
is enqueued: the page run's own tagging (`shared_tags` in quo_contacts) comes too late.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from contextlib import closing
from typing import Any, Self

import dagster as dg
from dagster._core.run_coordinator.base import SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._serdes import ConfigurableClassData

from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.orchestration.metadata import process_run_tags
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.orchestration.sync import parse_page_key
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    TAG_CRM,
    TAG_INTEGRATION,
    TAG_OBJECT_TYPE,
    TAG_PROCESS,
)
from quo_sync_dagster.store import open_store

MAX_RUNTIME = "dagster/max_runtime"
_PROCESS_TAGS = (TAG_PROCESS, TAG_INTEGRATION, TAG_OBJECT_TYPE)
_log = logging.getLogger(__name__)


class QuoSyncRunCoordinator(QueuedRunCoordinator):
    """Dagster's run queue; before a run is enqueued, a run of one CRM's page assets that lacks
    them gets that CRM's run tags and, when its partitions lie in one Process, that Process's
    tags. Tags already on a run are never changed."""

    def __init__(self, store_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store_uri = store_uri

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            **QueuedRunCoordinator.config_type(),
            "store_uri": dg.Field(
                dg.StringSource,
                is_required=False,
                description="The process store; default QUO_SYNC_STORE_URI, else SQLite under "
                "the Dagster home (as the runs find it)",
            ),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        config = dict(config_value)
        store_uri = config.pop("store_uri", None)
        coordinator = super().from_config_value(inst_data, config)
        coordinator._store_uri = store_uri
        return coordinator

    def submit_run(self, context: SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        if run.status == dg.DagsterRunStatus.NOT_STARTED:
            tags = self.missing_tags(run)
            if tags:
                self._instance.add_run_tags(run.run_id, tags)
                run = self._instance.get_run_by_id(run.run_id) or run
        return super().submit_run(context._replace(dagster_run=run))

    def missing_tags(self, run: dg.DagsterRun) -> dict[str, str]:
        """The tags to add to `run`: none unless its assets are one CRM's page assets."""
        crm = page_assets_crm(run.asset_selection or ())
        if crm is None:
            return {}
        timeout = registered_connectors()[crm].crm_config.queue_config.timeout
        # As build_crm_definitions' run_tags, which its page sensor's runs carry.
        tags = {TAG_CRM: crm, MAX_RUNTIME: str(timeout)}
        process_id = range_process(run.tags)
        if process_id and any(key not in run.tags for key in _PROCESS_TAGS):
            tags.update(self._process_tags(process_id, run.run_id))
        return {key: value for key, value in tags.items() if key not in run.tags}

    def _process_tags(self, process_id: str, run_id: str) -> dict[str, str]:
        uri = self._store_uri or default_store_uri(self._instance.root_directory)
        try:
            with closing(open_store(uri)) as store:
                return process_run_tags(store.get_process(process_id))
        except Exception as exc:  # an unreadable store must not keep the run out of the queue
            _log.warning(
                f"run {run_id}: no Process tags (Process {process_id!r} not read from the "
                f"store: {type(exc).__name__}); the CRM tags are added"  # no URI, no password
            )
            return {}


def page_assets_crm(asset_keys: Iterable[dg.AssetKey]) -> str | None:
    """The CRM whose page assets (`<crm>_crm_pages`, `<crm>_quo_contacts`) are all of
    `asset_keys`, if one is."""
    page_assets = {
        f"{crm}_{asset}": crm
        for crm in registered_connectors()
        for asset in ("crm_pages", "quo_contacts")
    }
    crms = {page_assets.get(key.to_user_string()) for key in asset_keys}
    return crms.pop() if len(crms) == 1 else None


def range_process(tags: Mapping[str, str]) -> str | None:
    """The Process whose pages the run's partition range lies in: the range's first and last
    page are of one Process (a Process's pages are added to the partitions together)."""
    start = tags.get(RANGE_START) or tags.get("dagster/partition")
    end = tags.get(RANGE_END) or start
    try:
        processes = {parse_page_key(start)[0], parse_page_key(end)[0]} if start and end else ()
    except ValueError:  # not page partitions
        return None
    return next(iter(processes)) if len(processes) == 1 else None
