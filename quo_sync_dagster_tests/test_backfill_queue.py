"""A backfill of page partitions launched as the UI launches it keeps the rules: its runs carry
the product's tags from submission and are held by the CRM's run limit (issue 10).

The coordinator's tag derivation is tested on a real instance (no stack); the rest through the
real run queue of `dagster dev` (LocalStack, as `quo-sync demo` runs it) on the rendered
dagster.yaml, whose limits are the connectors' queue_config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.run_coordinator.base import SubmitRunContext
from dagster._core.test_utils import create_run_for_test

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.instance import instance_settings, render_instance_yaml
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.orchestration.run_coordinator import QuoSyncRunCoordinator
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster.orchestration.tags import (
    RANGE_END,
    RANGE_START,
    TAG_CRM,
    TAG_INTEGRATION,
    TAG_OBJECT_TYPE,
    TAG_PROCESS,
)
from quo_sync_dagster.store import Store, open_store

REPO = Path(__file__).resolve().parents[1]
MAX_RUNTIME = "dagster/max_runtime"


# ---- the coordinator on a real instance, without a stack -------------------------------------
def _instance(home: Path, coordinator_config: dict[str, Any] | None = None) -> dg.DagsterInstance:
    settings = instance_settings()
    settings["run_coordinator"]["config"].update(coordinator_config or {})
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return dg.DagsterInstance.from_config(str(home))


def _process(store: Store, process_id: str, integration_id: str = "acme") -> Process:
    return store.create_process(
        Process(
            id=process_id,
            integration_id=integration_id,
            name="sync",
            type="SYNC",
            state=ProcessState.PROCESSING_BATCHES,
            context={"personObjectType": "contact"},
        )
    )


_ORIGIN = RemoteJobOrigin(
    RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("quo_sync_dagster"), "__repository__"),
    "__ASSET_JOB",
)


def _submit(instance: dg.DagsterInstance, assets: list[str], tags: dict[str, str]) -> dg.DagsterRun:
    run = create_run_for_test(
        instance,
        job_name="__ASSET_JOB",
        asset_selection=frozenset(dg.AssetKey(a) for a in assets),
        tags=tags,
        remote_job_origin=_ORIGIN,  # a queued run must name its code location
    )
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, QuoSyncRunCoordinator)
    coordinator.submit_run(SubmitRunContext(run, workspace=None))  # type: ignore[arg-type]
    submitted = instance.get_run_by_id(run.run_id)
    assert submitted is not None and submitted.status is dg.DagsterRunStatus.QUEUED
    return submitted


def _tags(run: dg.DagsterRun) -> dict[str, str]:
    """The run's tags but the code location's, which Dagster adds to every run."""
    return {k: v for k, v in run.tags.items() if k != "dagster/code_location"}


def _range(process_id: str, first: int, last: int) -> dict[str, str]:
    return {RANGE_START: page_key(process_id, first), RANGE_END: page_key(process_id, last)}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Store]]:
    """A Dagster home whose process store is the embedded default (SQLite under the home)."""
    monkeypatch.delenv("QUO_SYNC_STORE_URI", raising=False)
    home = tmp_path / "dagster"
    home.mkdir()
    store = open_store(default_store_uri(str(home)))
    yield home, store
    store.close()


def test_the_rendered_instance_runs_the_coordinator_and_keeps_the_limits(
    home: tuple[Path, Store],
) -> None:
    path, _ = home
    (path / "dagster.yaml").write_text(render_instance_yaml())
    with dg.DagsterInstance.from_config(str(path)) as instance:
        assert isinstance(instance.run_coordinator, QuoSyncRunCoordinator)
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert "QUEUED_RUN_COORDINATOR" in instance.get_required_daemon_types()
        limits = instance.get_concurrency_config().run_queue_config
        assert limits is not None
        assert {(t["value"], t["limit"]) for t in limits.tag_concurrency_limits} == {
            (name, connector_class(name).crm_config.queue_config.max_workers)
            for name in ("attio", "axiscare", "pipedrive", "scalingtest", "zoho")
        }
    production = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert production["run_coordinator"] == instance_settings()["run_coordinator"]
    assert "run_queue" not in production


def test_a_ui_backfill_run_gets_the_crm_and_process_tags_at_submission(
    home: tuple[Path, Store],
) -> None:
    path, store = home
    _process(store, "p1")
    timeout = connector_class("scalingtest").crm_config.queue_config.timeout
    with _instance(path) as instance:
        run = _submit(
            instance,
            ["scalingtest_crm_pages", "scalingtest_quo_contacts"],
            {"dagster/backfill": "bf1", **_range("p1", 0, 24)},
        )
        assert _tags(run) == {
            "dagster/backfill": "bf1",
            **_range("p1", 0, 24),
            TAG_CRM: "scalingtest",
            MAX_RUNTIME: str(timeout),
            TAG_PROCESS: "p1",
            TAG_INTEGRATION: "acme",
            TAG_OBJECT_TYPE: "contact",
        }
        logs = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED)
        assert len(logs) == 1
        # One page, as a single-partition materialization launches it.
        one = _submit(
            instance, ["scalingtest_quo_contacts"], {"dagster/partition": page_key("p1", 3)}
        )
        assert one.tags[TAG_CRM] == "scalingtest" and one.tags[TAG_PROCESS] == "p1"


def test_tags_already_on_a_run_are_kept_and_other_runs_get_none(
    home: tuple[Path, Store],
) -> None:
    path, store = home
    _process(store, "p1")
    _process(store, "p2", integration_id="other")
    with _instance(path) as instance:
        # A sensor's run: every tag there already.
        sensor = {
            TAG_CRM: "scalingtest",
            MAX_RUNTIME: "1800",
            TAG_PROCESS: "p1",
            TAG_INTEGRATION: "acme",
            TAG_OBJECT_TYPE: "contact",
            "dagster/sensor_name": "scalingtest_page_sensor",
            **_range("p1", 0, 4),
        }
        assert _tags(_submit(instance, ["scalingtest_quo_contacts"], sensor)) == sensor
        # A backfill given a tag in the launch dialog keeps its value.
        given = _submit(
            instance, ["scalingtest_quo_contacts"], {MAX_RUNTIME: "60", **_range("p1", 0, 4)}
        )
        assert given.tags[MAX_RUNTIME] == "60" and given.tags[TAG_PROCESS] == "p1"
        # A range over two Processes: the CRM's tags, no Process's.
        both = _submit(
            instance,
            ["scalingtest_quo_contacts"],
            {RANGE_START: page_key("p1", 0), RANGE_END: page_key("p2", 1)},
        )
        assert TAG_CRM in both.tags and TAG_PROCESS not in both.tags
        assert TAG_INTEGRATION not in both.tags
        # Page assets of two CRMs, or not only page assets: no tags.
        for assets in (
            ["scalingtest_quo_contacts", "pipedrive_quo_contacts"],
            ["scalingtest_quo_contacts", "scalingtest_sync_processes"],
        ):
            other = _submit(instance, assets, _range("p1", 0, 4))
            assert _tags(other) == _range("p1", 0, 4)


def test_an_unreadable_store_leaves_the_process_tags_out_but_not_the_crm_tags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unreadable = f"sqlite:///{tmp_path / 'no-such-dir' / 'quo_sync.sqlite'}"
    config = {"store_uri": unreadable}
    with _instance(tmp_path / "dagster", config) as instance, caplog.at_level(logging.WARNING):
        run = _submit(instance, ["pipedrive_quo_contacts"], _range("p1", 0, 4))
    assert run.tags[TAG_CRM] == "pipedrive" and MAX_RUNTIME in run.tags
    assert TAG_PROCESS not in run.tags
    assert any("p1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_the_store_uri_comes_from_the_environment_before_the_dagster_home(
    home: tuple[Path, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = home
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    other = open_store(elsewhere)
    try:
        _process(other, "p9", integration_id="from-env")
    finally:
        other.close()
    monkeypatch.setenv("QUO_SYNC_STORE_URI", elsewhere)
    with _instance(path) as instance:
        run = _submit(instance, ["zoho_crm_pages"], _range("p9", 0, 0))
    assert run.tags[TAG_INTEGRATION] == "from-env" and run.tags[TAG_CRM] == "zoho"


# ---- a UI backfill through the real run queue --------------------------------------------------
CRM = "pipedrive"  # its real limit (4 runs) and pages per run (5): 5 runs are more than 4
PAGE_SIZE = 10
SLOW_FETCH_SECONDS = 2  # each delayed page fetch: a run outlasts the backfill's submission

_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
_BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } }
}"""
_RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status tags { key value } } } }
}"""
_ENDS = {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("backfill") / "home", quo_rate_limit=None) as stack:
        yield stack


def _backfill_runs(stack: LocalStack, backfill_id: str) -> list[dict[str, Any]]:
    filter_ = {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}
    runs = stack.graphql(_RUNS, {"filter": filter_})["runsOrError"]["results"]
    return [{**r, "tags": {t["key"]: t["value"] for t in r["tags"]}} for r in runs]


def _intervals(instance: dg.DagsterInstance, crm: str) -> dict[str, dict[str, float]]:
    """Per run of the CRM: when it was enqueued, dequeued and ended (event timestamps). The run
    queue daemon dequeues a run by reporting RUN_STARTING; from then to its end a run holds one
    of the CRM's run slots."""
    found = {}
    for run in instance.get_runs(dg.RunsFilter(tags={TAG_CRM: crm})):
        at = {}
        for entry in instance.all_logs(run.run_id):
            kind = entry.dagster_event_type
            if kind == dg.DagsterEventType.RUN_ENQUEUED:
                at["enqueued"] = entry.timestamp
            elif kind == dg.DagsterEventType.RUN_STARTING:
                at["dequeued"] = entry.timestamp
            elif kind in _ENDS:
                at["ended"] = entry.timestamp
        found[run.run_id] = at
    return found


def _holding(intervals: dict[str, dict[str, float]], at: float, but: str = "") -> int:
    return sum(
        1
        for run_id, i in intervals.items()
        if run_id != but and i.get("dequeued", float("inf")) <= at < i.get("ended", float("inf"))
    )


def test_a_ui_backfill_of_pages_is_tagged_from_submission_and_held_by_the_crm_limit(
    stack: LocalStack,
) -> None:
    queue = connector_class(CRM).crm_config.queue_config
    limit, per_run = queue.max_workers, queue.batch_size
    pages = (limit + 1) * per_run  # one run more than the limit
    integration = stack.register_integration("bf", CRM, pages * PAGE_SIZE, {"polling": False})
    (process_id,) = stack.run_initial_sync(CRM, {"integration_id": "bf", "page_size": PAGE_SIZE})
    (process,) = stack.wait_processes([process_id], timeout=600)
    assert process.state is ProcessState.COMPLETED, process.context.get("error")
    simulator = integration.settings["base_url"]
    # The first runs' page fetches then take 2 s each (5 x 2 s a run at least), while the
    # backfill daemon submits all the runs in one pass: the last one waits for a slot, and not
    # by luck of timing.
    fault = {"delaySeconds": SLOW_FETCH_SECONDS, "count": pages}
    httpx.post(f"{simulator}/_sandbox/faults", json=fault, timeout=30).raise_for_status()
    try:
        params = {
            "assetSelection": [{"path": [f"{CRM}_crm_pages"]}, {"path": [f"{CRM}_quo_contacts"]}],
            "partitionNames": [page_key(process_id, i) for i in range(pages)],
        }
        launched = stack.graphql(_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        seen_queued: dict[str, dict[str, str]] = {}  # run -> its tags when first seen QUEUED
        deadline = time.monotonic() + 600
        while True:
            for run in _backfill_runs(stack, backfill_id):
                if run["status"] == "QUEUED":
                    seen_queued.setdefault(run["runId"], run["tags"])
            status = stack.graphql(_BACKFILL_STATUS, {"id": backfill_id})
            status = status["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            assert time.monotonic() < deadline, f"backfill {backfill_id} still {status}"
            time.sleep(0.25)
    finally:
        httpx.delete(f"{simulator}/_sandbox/faults", timeout=30).raise_for_status()
    assert status == "COMPLETED_SUCCESS"

    expected = {
        TAG_CRM: CRM,
        MAX_RUNTIME: str(queue.timeout),
        TAG_PROCESS: process_id,
        TAG_INTEGRATION: "bf",
        TAG_OBJECT_TYPE: process.context["personObjectType"],
        "dagster/backfill": backfill_id,
    }
    runs = _backfill_runs(stack, backfill_id)
    assert len(runs) == pages // per_run  # BackfillPolicy.multi_run(batch_size), both assets
    for run in runs:
        assert run["status"] == "SUCCESS"
        assert expected.items() <= run["tags"].items()
    # Seen while queued, so before any step of theirs could tag them.
    assert seen_queued
    for tags in seen_queued.values():
        assert expected.items() <= tags.items()

    with dg.DagsterInstance.from_config(str(stack.dagster_home)) as instance:
        intervals = _intervals(instance, CRM)  # every run of the CRM, the sync's too
    for run in runs:
        at = intervals[run["runId"]]
        assert at["enqueued"] <= at["dequeued"] < at["ended"]  # through the queue
    starts = [i["dequeued"] for i in intervals.values() if "dequeued" in i]
    assert max(_holding(intervals, t) for t in starts) <= limit
    held = []
    for run in runs:
        at = intervals[run["runId"]]
        moments = [at["enqueued"], *starts]
        waiting = [t for t in moments if at["enqueued"] <= t < at["dequeued"]]
        if max(_holding(intervals, t, but=run["runId"]) for t in waiting) == limit:
            held.append(run["runId"])  # a full CRM kept it in the queue
    assert held
    assert set(held) <= set(seen_queued)
