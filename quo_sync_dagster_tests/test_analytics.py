"""The analysts' view: `analytics` frames, `quo-sync report` and the plot on closed Processes.

Frames from a store written directly (fast, exact times), then two integrations synced through
the real Dagster pipeline against the Quo sandbox."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from quo_sync_dagster.analytics import (
    ERROR_COLUMNS,
    PAGE_COLUMNS,
    PAGE_TIMING_COLUMNS,
    PROCESS_COLUMNS,
    errors_frame,
    pages_frame,
    processes_frame,
)
from quo_sync_dagster.cli import main
from quo_sync_dagster.core.process import (
    ErrorDetail,
    PageResult,
    Process,
    ProcessState,
    SkipReason,
)
from quo_sync_dagster.crms.scalingtest import skipped_record_count
from quo_sync_dagster.orchestration.sync import page_key, parse_page_key
from quo_sync_dagster.report_plot import MIN_SPAN, PLOT_METADATA_KEY, plot_figure, plot_metadata
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster_tests.pipeline import (
    Pipeline,
    add_integration,
    launch_initial_sync,
    sync_planned,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DAY1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
SUMMED = ["records", "synced", "failed", "skipped", "created", "updated", "unchanged"]


def _page(synced: int, failed: int = 0, skipped: int = 0, ok: bool = True) -> PageResult:
    at = DAY1.isoformat()
    errors = tuple(ErrorDetail(f"f{i}", "Quo said 400", at) for i in range(failed)) + tuple(
        ErrorDetail(f"s{i}", "no number", at, skipped=SkipReason.NO_PHONE) for i in range(skipped)
    )
    return PageResult(
        records=synced + failed + skipped,
        synced=synced,
        failed=failed,
        skipped=skipped,
        created=synced,
        ok=ok,
        errors=errors,
    )


def _process(
    store: Store,
    integration: str,
    crm: str,
    start: datetime,
    pages: list[PageResult],
    seconds: float,
    error: str | None = None,
) -> Process:
    """A Process that ran `seconds` from `start` over `pages`, then closed (ERROR with
    `error`)."""
    process = store.create_process(
        Process(
            id=f"{integration}-{start:%d%H}",
            integration_id=integration,
            name="sync",
            type="CRM_SYNC",
            state=ProcessState.INITIALIZING,
            context={
                "crm": crm,
                "personObjectType": "Person",
                "syncType": "INITIAL",
                "startTime": start.isoformat(),
            },
        )
    )
    for state in ("FETCHING_TOTAL", "QUEUING_PAGES", "PROCESSING_BATCHES"):
        store.transition(process.id, ProcessState(state), {"totalPages": len(pages)})
    for i, result in enumerate(pages):
        store.record_page(process.id, page_key(process.id, i), result)
    end = (start + timedelta(seconds=seconds)).isoformat()
    if error:
        return store.transition(
            process.id, ProcessState.ERROR, {"error": error, "errorTimestamp": end}
        )
    store.transition(process.id, ProcessState.COMPLETING)
    return store.transition(process.id, ProcessState.COMPLETED, {"endTime": end})


@pytest.fixture
def history(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    """acme (scalingtest): a completed Process on day 1, one in ERROR on day 2 (one page
    failed as a whole); globex (pipedrive): a completed Process on day 2."""
    uri = f"sqlite:///{tmp_path}/store.sqlite"
    store = open_store(uri)
    _process(store, "acme", "scalingtest", DAY1, [_page(90, 4, 6), _page(50)], seconds=20)
    _process(
        store,
        "acme",
        "scalingtest",
        DAY2,
        [_page(30, 1), _page(0, ok=False)],
        seconds=10,
        error="1 of 2 pages not synced",
    )
    _process(store, "globex", "pipedrive", DAY2, [_page(70, 0, 2)], seconds=8)
    yield uri, store
    store.close()


def _store_totals(store: Store) -> pd.DataFrame:
    """The store's own counters, summed per integration, under the frames' names."""
    rows = [
        {"integration_id": p.integration_id, "records": p.counters["processed"]}
        | {name: p.counters[name] for name in SUMMED[1:]}
        for p in store.list_processes()
    ]
    return pd.DataFrame(rows).groupby("integration_id").sum()


def test_frames_add_up_to_the_store_counters_per_integration(
    history: tuple[str, Store],
) -> None:
    _, store = history
    expected = _store_totals(store)
    assert expected.loc["acme", "records"] == 90 + 4 + 6 + 50 + 30 + 1  # the failed page: none

    processes = processes_frame(store)
    assert list(processes.columns) == list(PROCESS_COLUMNS)
    pd.testing.assert_frame_equal(processes.groupby("integration_id")[SUMMED].sum(), expected)

    pages = pages_frame(store)
    assert list(pages.columns) == list(PAGE_COLUMNS)
    # A page that failed as a whole handled no record; its records are still listed.
    synced_pages = pages[pages["ok"]].groupby("integration_id")[SUMMED].sum()
    pd.testing.assert_frame_equal(synced_pages, expected)
    assert pages.loc[~pages["ok"], ["integration_id", "page"]].values.tolist() == [["acme", 1]]

    errors = errors_frame(store)
    assert list(errors.columns) == list(ERROR_COLUMNS)
    outcome = errors["skipped"].notna().map({True: "skipped", False: "failed"})
    per_integration = errors.groupby(["integration_id", outcome]).size().unstack(fill_value=0)
    assert per_integration.to_dict("index") == {
        "acme": {"failed": 5, "skipped": 6},
        "globex": {"failed": 0, "skipped": 2},
    }
    assert set(errors["skipped"].dropna()) == {str(SkipReason.NO_PHONE)}


def test_process_rows_carry_state_times_and_throughput(history: tuple[str, Store]) -> None:
    _, store = history
    rows = processes_frame(store).set_index(["integration_id", "started_at"])
    done = rows.loc[("acme", pd.Timestamp(DAY1))]
    assert (done["state"], done["crm"], done["object_type"]) == (
        "COMPLETED",
        "scalingtest",
        "Person",
    )
    assert done["ended_at"] == pd.Timestamp(DAY1 + timedelta(seconds=20))
    assert (done["seconds"], done["records_per_second"]) == (20.0, 150 / 20)
    assert (done["pages"], done["pages_failed"]) == (2, 0) and pd.isna(done["error"])
    failed = rows.loc[("acme", pd.Timestamp(DAY2))]
    assert (failed["state"], failed["error"], failed["pages_failed"]) == (
        "ERROR",
        "1 of 2 pages not synced",
        1,
    )
    assert failed["ended_at"] == pd.Timestamp(DAY2 + timedelta(seconds=10))


def test_filters_select_by_crm_integration_and_start_time(history: tuple[str, Store]) -> None:
    _, store = history
    for frame in (processes_frame, pages_frame, errors_frame):
        assert set(frame(store, crm="pipedrive")["integration_id"]) == {"globex"}
        assert set(frame(store, integration="acme")["crm"]) == {"scalingtest"}
        assert frame(store, integration="acme", crm="pipedrive").empty
        on_day2 = frame(store, since=DAY2)
        assert set(on_day2["integration_id"]) == {"acme", "globex"}
        assert set(on_day2["process_id"]) == {"acme-0209", "globex-0209"}
        # A naive time is UTC; `until` is exclusive.
        assert set(frame(store, until="2026-03-02T09:00:00")["process_id"]) == {"acme-0109"}
    assert len(processes_frame(store, integration="acme", last=1)) == 1
    assert processes_frame(store, integration="acme", last=1)["process_id"].item() == "acme-0209"
    empty = processes_frame(store, integration="nobody")
    assert empty.empty and list(empty.columns) == list(PROCESS_COLUMNS)
    assert str(empty["started_at"].dtype) == "datetime64[ns, UTC]"


def test_frames_read_the_default_store_without_one_given(
    history: tuple[str, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, store = history
    monkeypatch.setenv("QUO_SYNC_STORE_URI", uri)
    pd.testing.assert_frame_equal(processes_frame(), processes_frame(store))


def _report_rows(output: str) -> dict[str, list[str]]:
    """`quo-sync report`'s table: integration -> its cells, by heading."""
    lines = output.strip().splitlines()
    headings = re.split(r"\s{2,}", lines[0].strip())
    assert headings == [
        "integration",
        "processes",
        "records",
        "synced",
        "skipped",
        "failed",
        "sync time (s)",
        "records/s",
    ]
    rows = {}
    for line in lines[1:]:
        if line.startswith("plot written"):
            break
        cells = dict(zip(headings, line.split(), strict=True))
        rows[cells["integration"]] = cells
    return rows


def test_report_prints_the_store_totals_and_writes_a_png(
    history: tuple[str, Store], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, store = history
    plot = tmp_path / "report.png"
    assert main(["report", "--store", uri, "--plot", str(plot)]) == 0
    rows = _report_rows(capsys.readouterr().out)
    expected = _store_totals(store)
    for integration in ("acme", "globex"):
        for name in ("records", "synced", "skipped", "failed"):
            assert int(rows[integration][name]) == expected.loc[integration, name]
    assert rows["acme"]["processes"] == "2"
    assert rows["acme"]["sync time (s)"] == "30.0"
    assert rows["acme"]["records/s"] == f"{181 / 30:.1f}"  # over syncing time, not a mean
    assert plot.read_bytes().startswith(PNG_MAGIC)

    assert main(["report", "--store", uri, "--integration", "globex"]) == 0
    assert list(_report_rows(capsys.readouterr().out)) == ["globex"]
    assert main(["report", "--store", uri, "--crm", "zoho"]) == 0
    assert "no Processes" in capsys.readouterr().out


def _inline_png(markdown: str) -> bytes:
    found = re.fullmatch(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert found, markdown[:200]
    return base64.b64decode(found.group(1), validate=True)


def test_a_closed_process_gets_its_integrations_plot_inline(history: tuple[str, Store]) -> None:
    _, store = history
    [process] = store.list_processes(integration_id="globex")
    value = plot_metadata(store, process)[PLOT_METADATA_KEY]
    assert isinstance(value, dg.MarkdownMetadataValue)
    assert _inline_png(value.value).startswith(PNG_MAGIC)


# ---- through the Dagster pipeline ---------------------------------------------------------

CRM = "scalingtest"


def test_two_synced_integrations_read_back_alike_in_frames_report_and_ui(
    p: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # hostile records make some people fail: failures as well as skips to count.
    settings = {"acct-a": {"records": 300}, "acct-b": {"records": 240, "hostile_share": 0.2}}
    events = {}
    for integration, values in settings.items():
        add_integration(p, CRM, values, integration_id=integration)
        config = {"integration_id": integration, "page_size": 100}
        assert launch_initial_sync(p, CRM, config).success
        planned = p.store.list_processes(integration_id=integration)
        [process], closed = sync_planned(p, CRM, planned)
        assert process.state is ProcessState.COMPLETED
        events[integration] = [
            e
            for e in closed.asset_events
            if isinstance(e, dg.AssetMaterialization)
            and e.asset_key == dg.AssetKey(f"{CRM}_sync_processes")
        ]

    expected = _store_totals(p.store)
    assert expected.loc["acct-a", "skipped"] == skipped_record_count(300)
    assert expected.loc["acct-b", "failed"] > 0
    processes = processes_frame(p.store, crm=CRM)
    pd.testing.assert_frame_equal(processes.groupby("integration_id")[SUMMED].sum(), expected)
    pages = pages_frame(p.store, instance=p.instance)
    assert list(pages.columns) == [*PAGE_COLUMNS, *PAGE_TIMING_COLUMNS]
    pd.testing.assert_frame_equal(pages.groupby("integration_id")[SUMMED].sum(), expected)
    assert pages.groupby("integration_id").size().to_dict() == {"acct-a": 3, "acct-b": 3}
    # Every page was synced by a run that measured it, which only the Dagster instance knows.
    assert pages["seconds"].gt(0).all() and pages["started_at"].notna().all()
    errors = errors_frame(p.store, integration="acct-b")
    failed = errors[errors["skipped"].isna()]
    assert len(failed) == expected.loc["acct-b", "failed"]
    pages_of = failed["page"].map(lambda key: parse_page_key(key)[0])
    assert pages_of.eq(failed["process_id"]).all()

    uri = f"sqlite:///{tmp_path}/store.sqlite"
    assert main(["report", "--store", uri, "--crm", CRM]) == 0
    rows = _report_rows(capsys.readouterr().out)
    for integration in settings:
        for name in ("records", "synced", "skipped", "failed"):
            assert int(rows[integration][name]) == expected.loc[integration, name]

    for integration in settings:
        [event] = events[integration]
        assert event.metadata["integration_id"] == dg.MetadataValue.text(integration)
        plot = event.metadata[PLOT_METADATA_KEY]
        assert isinstance(plot, dg.MarkdownMetadataValue)
        assert _inline_png(plot.value).startswith(PNG_MAGIC)


def test_the_plot_leaves_quiet_processes_out_of_throughput_and_widens_a_single_instant() -> None:
    frame = pd.DataFrame(
        {
            "integration_id": ["a", "a"],
            "started_at": pd.to_datetime([DAY1, DAY1 + timedelta(minutes=5)]),
            "records": [100, 0],  # the second: a polling cycle that found no change
            "records_per_second": [9.0, 0.0],
            "failed": [1, 0],
        }
    )
    figure = plot_figure(frame, (6.0, 3.0), 80)
    throughput, failures = figure.axes[:2]
    (line,) = throughput.lines
    assert list(line.get_ydata()) == [9.0]  # no fall to 0 records/s for the quiet cycle
    assert list(failures.lines[0].get_ydata()) == [1, 0]  # both still count their failures
    # Five minutes apart: the axis spans MIN_SPAN around them, not the years a tiny span gets.
    low, high = failures.get_xlim()
    assert high - low == pytest.approx(MIN_SPAN / pd.Timedelta(days=1))
