"""Watching syncs: a sync failed on purpose, found as an operator finds it, through Dagster's
GraphQL API and in the real webserver rendered by a real headless Chromium.

One stack for the module, as `quo-sync demo` runs it. `st-broken` (ScalingTest, 300 people in
6 pages of one page run, no automatic retries) meets a Quo outage after its first page: the
other pages fail and its Process closes as ERROR at once. Then, Quo back, `st-healthy` syncs
the same kind of people and its Process COMPLETES. Screenshots are written to each test's
tmp_path and, when QUO_SYNC_SCREENSHOTS names a directory, there too (the README shows them).
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from matplotlib.image import imread

from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster.orchestration.sync_checks import ERROR_CHECK, PAGES_CHECK
from quo_sync_dagster.orchestration.tags import TAG_PROCESS
from quo_sync_dagster.report_plot import PLOT_METADATA_KEY
from quo_sync_dagster_tests.browser import Browser
from quo_sync_dagster_tests.test_faults import wait_for

pytestmark = pytest.mark.timeout(1800)  # the module's stack and syncs are set up in the first

RECORDS, PAGE_SIZE = 300, 50
PAGES = RECORDS // PAGE_SIZE
BROKEN, HEALTHY = "st-broken", "st-healthy"
# Quo requests served before the outage: the planning run's one, then enough for the first
# page (at most one request per person) and not for the second.
SERVED = 1 + PAGE_SIZE + 10
CONTACTS, PROCESSES = "scalingtest_quo_contacts", "scalingtest_sync_processes"
WINDOW = (1400, 1000)

_PARTITIONS = """
query($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    assetPartitionStatuses { ... on DefaultPartitionStatuses {
      materializedPartitions failedPartitions } }
    assetObservations(partitions: $partitions) { partition metadataEntries {
      label ... on TextMetadataEntry { text } } } } } }"""
_CHECK = """
query($key: AssetKeyInput!, $check: String!, $limit: Int!) {
  assetCheckExecutions(assetKey: $key, checkName: $check, limit: $limit) {
    status timestamp evaluation { success severity description metadataEntries {
      label ... on TextMetadataEntry { text } } } } }"""
_MATERIALIZATIONS = """
query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations { timestamp description metadataEntries { label
    ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue }
    ... on MarkdownMetadataEntry { mdStr } } } } } }"""
_RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status jobName } } } }"""


@dataclass
class Scene:
    stack: LocalStack
    broken: Process
    healthy: Process
    failed: dict[str, str]  # the broken Process's failed pages, with the reason the store holds
    synced: list[str]  # its pages synced before the outage

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        return self.stack.graphql(query, variables)

    def page(self, path: str) -> str:
        return f"{self.stack.ui_url}{path}"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    with LocalStack(tmp_path_factory.mktemp("watching") / "home", quo_rate_limit=None) as stack:
        stack.graphql("mutation { setNuxSeen }")  # the UI's community pop-up, as "Skip" does
        config = {"page_size": PAGE_SIZE, "pages_per_run": PAGES}
        stack.register_integration(BROKEN, "scalingtest", RECORDS, {"retry_attempts": 0})
        stack.quo.inject_fault(delay_seconds=0.001, count=SERVED)  # served as usual
        stack.quo.inject_fault(status=503, count=10**7)  # then Quo is down
        (broken_id,) = stack.run_initial_sync("scalingtest", {"integration_id": BROKEN, **config})
        (broken,) = stack.wait_processes([broken_id], timeout=900)
        stack.quo.clear_faults()
        # No polling cycle of it during the tests: its latest Process stays the one shown.
        stack.register_integration(HEALTHY, "scalingtest", RECORDS, {"polling": False})
        (healthy_id,) = stack.run_initial_sync("scalingtest", {"integration_id": HEALTHY, **config})
        (healthy,) = stack.wait_processes([healthy_id], timeout=900)
        assert stack.store is not None
        failed = {
            e.page: e.error
            for e in stack.store.recent_errors(broken.id)
            if e.external_id is None and e.page
        }
        results = stack.store.page_results(broken.id)
        synced = [k for k, r in sorted(results.items()) if r.ok]
        scene = Scene(stack, broken, healthy, failed, synced)
        # The completion sensor reports a closed Process (and then the checks) a moment after
        # the store says it closed.
        wait_for(
            "both Processes reported with the checks after them",
            lambda: (
                {broken.id, healthy.id} <= set(_process_events(scene))
                and len(_check_runs(scene, ERROR_CHECK)) >= 2
            ),
        )
        yield scene


def _key(name: str) -> dict[str, list[str]]:
    return {"path": [name]}


def _metadata(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """label -> the entry's value (text, int or markdown)."""
    return {
        e["label"]: next((e[f] for f in ("text", "intValue", "mdStr") if f in e), None)
        for e in entries
    }


def _process_events(scene: Scene) -> dict[str, dict[str, Any]]:
    """Process id -> its `<crm>_sync_processes` materialization: metadata and timestamp."""
    data = scene.graphql(_MATERIALIZATIONS, key=_key(PROCESSES))["assetOrError"]
    events = {}
    for event in data["assetMaterializations"]:
        metadata = _metadata(event["metadataEntries"])
        events[metadata["process_id"]] = {
            **metadata,
            "timestamp": event["timestamp"],
            "description": event["description"],
        }
    return events


def _check_runs(scene: Scene, check: str, limit: int = 10) -> list[dict[str, Any]]:
    """The check's latest executions, newest first."""
    return scene.graphql(_CHECK, key=_key(PROCESSES), check=check, limit=limit)[
        "assetCheckExecutions"
    ]


def _partitions(scene: Scene, partitions: list[str] | None = None) -> dict[str, Any]:
    return scene.graphql(_PARTITIONS, key=_key(CONTACTS), partitions=partitions)["assetNodeOrError"]


def _save(shot: Path) -> Path:
    """Also into QUO_SYNC_SCREENSHOTS, if set (the README's pictures)."""
    if target := os.environ.get("QUO_SYNC_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
    return shot


def _pixels(png: Path | bytes) -> np.ndarray:
    """An RGB(A) image as floats in [0, 1], decoded by matplotlib (PNG files only)."""
    if isinstance(png, bytes):
        return imread(BytesIO(png), format="png")
    return imread(png)


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def _flat(text: str) -> str:
    """A page's text with every run of white space as one space (table cells, line breaks)."""
    return " ".join(text.split())


def _status_in_list(checks: str, name: str) -> str:
    """The status the list of checks shows beside `name` (Failed, Succeeded, ...)."""
    after = checks.split(f"{name} ", 1)[1].removeprefix(f"{name} ")
    return after.split(" ", 1)[0]


def _assert_not_blank(image: np.ndarray) -> None:
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "a blank image"
    assert len(np.unique(rgb.reshape(-1, 3).round(2), axis=0)) > 20, "hardly any colours"


# ---- the scene -------------------------------------------------------------------------------
def test_the_outage_failed_pages_and_closed_the_process_as_error(scene: Scene) -> None:
    assert scene.broken.state is ProcessState.ERROR
    assert scene.healthy.state is ProcessState.COMPLETED, scene.healthy.context.get("error")
    # The outage came after the first page: some pages synced, the others failed.
    assert scene.synced and scene.synced[0] == page_key(scene.broken.id, 0)
    keys = [page_key(scene.broken.id, i) for i in range(PAGES)]
    assert sorted([*scene.synced, *scene.failed]) == keys
    assert all("Quo" in reason for reason in scene.failed.values()), scene.failed
    error = scene.broken.context["error"]
    assert f"{len(scene.failed)} of {PAGES} pages not synced" in error
    assert "after 0 automatic retries" in error


# ---- through GraphQL ---------------------------------------------------------------------------
def test_graphql_lists_the_failed_pages_with_their_reason(scene: Scene) -> None:
    node = _partitions(scene, sorted(scene.failed))
    statuses = node["assetPartitionStatuses"]
    failed, materialized = (
        set(statuses["failedPartitions"]),
        set(statuses["materializedPartitions"]),
    )
    assert set(scene.failed) <= failed
    assert not set(scene.failed) & materialized
    healthy_pages = {page_key(scene.healthy.id, i) for i in range(PAGES)}
    assert healthy_pages <= materialized
    assert not healthy_pages & failed
    # Each failed page's observation on its partition says why it failed.
    observed: dict[str, dict[str, Any]] = {}
    for observation in node["assetObservations"]:
        observed.setdefault(observation["partition"], _metadata(observation["metadataEntries"]))
    assert set(observed) == set(scene.failed)
    for key, reason in scene.failed.items():
        assert observed[key]["error"] == reason
        assert observed[key]["integration_id"] == BROKEN
        assert observed[key]["process_id"] == scene.broken.id


def test_graphql_shows_the_failing_checks_naming_the_integration(scene: Scene) -> None:
    (latest,) = _check_runs(scene, ERROR_CHECK, limit=1)
    evaluation = latest["evaluation"]
    assert latest["status"] == "FAILED"
    assert evaluation["success"] is False
    assert evaluation["severity"] == "ERROR"
    description = evaluation["description"]
    assert f"integration {BROKEN} " in description
    assert f"Process {scene.broken.id}" in description
    assert f"ended in ERROR: {scene.broken.context['error']}" in description
    assert HEALTHY not in description  # the integration that synced well is not blamed
    assert _metadata(evaluation["metadataEntries"])["integrations"] == BROKEN

    (pages,) = _check_runs(scene, PAGES_CHECK, limit=1)
    assert pages["status"] == "FAILED"
    assert pages["evaluation"]["success"] is False
    text = pages["evaluation"]["description"]
    assert f"integration {BROKEN} " in text
    assert f"{len(scene.failed)} of {PAGES} pages of Process {scene.broken.id} not synced" in text
    assert min(scene.failed) in text
    assert HEALTHY not in text


def test_graphql_shows_the_error_process_as_error_not_success(scene: Scene) -> None:
    events = _process_events(scene)
    broken, healthy = events[scene.broken.id], events[scene.healthy.id]
    assert broken["state"] == "ERROR"
    assert broken["integration_id"] == BROKEN
    assert broken["error"] == scene.broken.context["error"]
    assert broken["pages_failed"] == len(scene.failed)
    assert broken["pages_synced"] == len(scene.synced)
    # Dagster shows every materialization as "Materialized": its first line says ERROR.
    assert broken["description"] == f"ERROR: {scene.broken.context['error']}"
    assert healthy["description"].startswith("COMPLETED: ")
    assert healthy["state"] == "COMPLETED"
    assert "error" not in healthy
    assert healthy["pages_synced"] == PAGES
    # Its page run failed (a success shows only on the Processes that synced everything).
    runs = scene.graphql(_RUNS, filter={"tags": [{"key": TAG_PROCESS, "value": scene.broken.id}]})[
        "runsOrError"
    ]["results"]
    page_runs = [r for r in runs if r["jobName"] == "scalingtest_page_sync"]
    assert page_runs and {r["status"] for r in page_runs} == {"FAILURE"}


def test_a_page_synced_before_the_outage_is_not_shown_failed(scene: Scene) -> None:
    """Its run failed for the other pages, so Dagster recorded no materialization of it; the
    completion sensor reports it from the store when the Process closes."""
    statuses = _partitions(scene)["assetPartitionStatuses"]
    assert set(scene.synced) <= set(statuses["materializedPartitions"])
    assert not set(scene.synced) & set(statuses["failedPartitions"])


# ---- in the webserver, in Chromium --------------------------------------------------------------
def test_the_ui_shows_failed_pages_their_reason_the_failing_checks_and_the_error(
    scene: Scene, tmp_path: Path
) -> None:
    statuses = _partitions(scene)["assetPartitionStatuses"]
    failed_count = len(statuses["failedPartitions"])
    materialized_count = len(statuses["materializedPartitions"])
    first_failed = min(scene.failed)
    error_event = _process_events(scene)[scene.broken.id]
    with Browser(tmp_path / "browser", *WINDOW) as browser:
        # The page asset's Partitions tab: how many pages failed, and which.
        browser.open(scene.page(f"/assets/{CONTACTS}?view=partitions"))
        text = browser.wait_for_text(f"Failed ({failed_count})", first_failed)
        assert f"Materialized ({materialized_count})" in text
        assert all(key in text for key in scene.failed)
        _save(browser.screenshot(tmp_path / "watching-partitions.png"))

        # A failed page's event: its observation, with the reason.
        browser.open(scene.page(f"/assets/{CONTACTS}?view=events&partition={first_failed}"))
        text = browser.wait_for_text("observed in run", scene.failed[first_failed])
        assert BROKEN in text and scene.broken.id in text
        _save(browser.screenshot(tmp_path / "watching-failed-page.png"))

        # The Processes asset's Checks tab: the failing check names the integration.
        browser.open(scene.page(f"/assets/{PROCESSES}?view=checks&checkDetail={ERROR_CHECK}"))
        text = _flat(
            browser.wait_for_text(
                f"integration {BROKEN} (",
                f"Process {scene.broken.id}",
                "ended in ERROR",
                "Evaluation result",
                f"{PAGES_CHECK}\n",  # the list of checks beside it
                "Succeeded",
            )
        )
        checks = text.split(" Execute all ", 1)[1].split(" Execute ", 1)[0]  # the list of checks
        assert PAGES_CHECK in checks, text
        assert _status_in_list(checks, ERROR_CHECK) == "Failed"
        assert _status_in_list(checks, PAGES_CHECK) == "Failed"
        assert "Evaluation result Failed" in text
        _save(browser.screenshot(tmp_path / "watching-checks.png"))

        # The ERROR Process's event: its state and why.
        browser.open(scene.page(f"/assets/{PROCESSES}?view=events&time={error_event['timestamp']}"))
        text = _flat(browser.wait_for_text(scene.broken.id, scene.broken.context["error"]))
        assert f"integration_id {BROKEN}" in text
        assert "state ERROR" in text
        assert f"ERROR: {scene.broken.context['error']}" in text  # under "Materialized"
        assert f"pages_failed {len(scene.failed)}" in text
        _save(browser.screenshot(tmp_path / "watching-error-process.png"))

        # Its runs: the page run failed.
        tag = quote(f"tag:{TAG_PROCESS}={scene.broken.id}", safe="")
        browser.open(scene.page(f"/runs?q%5B0%5D={tag}"))
        text = browser.wait_for_text("scalingtest_page_sync", "Failure")
        assert "Success" not in text.split("Duration", 1)[1]
        _save(browser.screenshot(tmp_path / "watching-runs.png"))


def test_the_throughput_plot_is_shown_as_an_image(scene: Scene, tmp_path: Path) -> None:
    """The screenshot test: the COMPLETED Process's plot, opened from its event's metadata."""
    event = _process_events(scene)[scene.healthy.id]
    markdown = event[PLOT_METADATA_KEY]
    prefix = f"![{HEALTHY}: throughput and failures](data:image/png;base64,"
    assert markdown.startswith(prefix) and markdown.endswith(")")
    data_uri = markdown[markdown.index("](") + 2 : -1]
    png = base64.b64decode(data_uri.split(",", 1)[1], validate=True)
    width, height = _png_size(png)
    plot = _pixels(png)
    assert plot.shape[:2] == (height, width)
    _assert_not_blank(plot)
    # The ERROR Process has its plot too.
    assert "data:image/png;base64," in _process_events(scene)[scene.broken.id][PLOT_METADATA_KEY]

    with Browser(tmp_path / "browser", *WINDOW) as browser:
        browser.open(scene.page(f"/assets/{PROCESSES}?view=events&time={event['timestamp']}"))
        browser.wait_for_text(scene.healthy.id, "COMPLETED", PLOT_METADATA_KEY, "[Show Markdown]")
        browser.click_text("[Show Markdown]")
        shown = browser.wait_for(
            "the plot drawn in the metadata dialog",
            """(() => {
                const img = document.querySelector('[role="dialog"] img[src^="data:image/png"]')
                    || document.querySelector('img[src^="data:image/png"]');
                if (!img || !img.complete || !img.naturalWidth) return null;
                // The dialog opens with a fade and a zoom: wait until they have finished.
                if (document.getAnimations().some(a => a.playState === 'running')) return null;
                const r = img.getBoundingClientRect();
                return {src: img.src, alt: img.alt, w: img.naturalWidth, h: img.naturalHeight,
                        x: r.left, y: r.top, width: r.width, height: r.height};
            })()""",
        )
        shot = _save(browser.screenshot(tmp_path / "watching-throughput-plot.png"))
    # The DOM: an <img> whose source is the metadata's PNG, decoded by the browser at its size.
    assert shown["src"] == data_uri
    assert shown["alt"] == f"{HEALTHY}: throughput and failures"
    assert (shown["w"], shown["h"]) == (width, height)
    # The screenshot: a real PNG of the window, the plot drawn where the <img> is.
    assert _png_size(shot.read_bytes()) == WINDOW
    screen = _pixels(shot)
    _assert_not_blank(screen)
    x, y = round(shown["x"]), round(shown["y"])
    assert (round(shown["width"]), round(shown["height"])) == (width, height)  # unscaled
    region = screen[y : y + height, x : x + width, :3]
    assert region.shape == (height, width, 3), "the plot is outside the window"
    _assert_not_blank(region)
    assert np.abs(region - plot[..., :3]).mean() < 0.03, "the screenshot does not show the plot"
