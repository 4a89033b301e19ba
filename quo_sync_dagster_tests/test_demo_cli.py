"""`quo-sync demo` as its user sees it: the status line names its phase from the first second,
every figure printed has its unit, the last errors say how many more there are, and SIGTERM
or SIGINT stops every process the demo started (checked by PID and by port)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster import local_stack
from quo_sync_dagster.cli import (
    _last,
    _process_report,
    _Progress,
    _Stopped,
    _stopping,
    _sync_status,
)
from quo_sync_dagster.core.metrics import summarize
from quo_sync_dagster.core.process import ErrorDetail, Process, ProcessState

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _process(state: ProcessState, total: int | None, **counters: int) -> Process:
    process = Process(
        id=f"p-{state.lower()}",
        integration_id="demo-scalingtest",
        name="initial sync",
        type="INITIAL",
        state=state,
        context={
            "totalRecords": total,
            "totalPages": 20,
            "personObjectType": "persons",
            "startTime": (NOW - timedelta(seconds=100)).isoformat(),
        },
    )
    process.counters.update(counters)
    return process


def _status(*processes: Process) -> tuple[str, str, float]:
    return _sync_status([summarize(p, [], now=NOW) for p in processes], NOW)


@pytest.mark.parametrize(
    ("state", "done", "phase"),
    [
        (ProcessState.INITIALIZING, 0, "planning"),
        (ProcessState.QUEUING_PAGES, 0, "planning"),
        (ProcessState.PROCESSING_BATCHES, 0, "waiting for page runs"),
        (ProcessState.PROCESSING_BATCHES, 500, "syncing"),
        (ProcessState.COMPLETING, 2000, "closing"),
        (ProcessState.COMPLETED, 2000, "COMPLETED"),
        (ProcessState.ERROR, 1500, "ERROR"),
    ],
)
def test_the_status_names_the_phase_of_the_sync(state: ProcessState, done: int, phase: str) -> None:
    assert _status(_process(state, 2000, processed=done))[0] == phase


def test_syncing_shows_records_rate_and_eta_with_their_units() -> None:
    phase, figures, share = _status(_process(ProcessState.PROCESSING_BATCHES, 2000, processed=500))
    # 500 records in the 100 s since the start: 5 records/s, 1500 left: 300 s.
    assert (phase, figures, share) == (
        "syncing",
        "500/2000 records  5.0 records/s  ETA 300 s",
        0.25,
    )


def test_closing_shows_no_eta_all_records_being_done() -> None:
    phase, figures, share = _status(_process(ProcessState.COMPLETING, 2000, processed=2000))
    assert (phase, figures, share) == ("closing", "2000/2000 records  20.0 records/s", 1.0)


def test_the_least_advanced_process_names_the_phase_and_all_records_count() -> None:
    phase, figures, _ = _status(
        _process(ProcessState.COMPLETED, 300, processed=300),
        _process(ProcessState.PROCESSING_BATCHES, 700, processed=100),
    )
    assert phase == "syncing" and figures.startswith("400/1000 records")


def test_one_process_in_error_makes_the_result_an_error() -> None:
    phase, figures, _ = _status(
        _process(ProcessState.COMPLETED, 300, processed=300),
        _process(ProcessState.ERROR, 700, processed=700),
    )
    assert phase == "ERROR" and "ETA" not in figures


def test_the_last_errors_say_how_many_more_there_are() -> None:
    # The store keeps the last 100 of 160 failures: 157 more than the 3 shown.
    items = [f"e{i}" for i in range(100)]
    assert _last("failed", items, 160, 3) == [
        "  failed, the last 3:",
        "    e97",
        "    e98",
        "    e99",
        "    and 157 more",
    ]
    assert _last("failed", items[:3], 3, 3)[-1] == "    e2"  # none more: no "and 0 more"
    assert _last("failed", [], 0, 3) == []


def test_the_process_report_puts_units_on_every_figure() -> None:
    process = _process(
        ProcessState.COMPLETED, 2000, processed=2000, synced=1940, failed=60, created=1940
    )
    errors = [
        ErrorDetail(f"st-{i}", "invalid phone", NOW.isoformat(), page=str(i)) for i in range(60)
    ]
    lines = _process_report(process, summarize(process, errors, now=NOW))
    assert lines == [
        "Process p-completed (persons): COMPLETED",
        "  records: 2000 of 2000 processed: 1940 synced (1940 created, 0 updated, 0 unchanged,"
        " 0 adopted), 0 skipped, 60 failed",
        "  pages: 0 of 20 processed, 0 failed",
        "  time: 100.0 s syncing, 20.0 records/s",  # the metrics hold 100000 (ms)
        "  to check: 0 adoption candidates, 0 unverified phones",
        "  failed, the last 3:",
        "    st-57 (page 57): invalid phone",
        "    st-58 (page 58): invalid phone",
        "    st-59 (page 59): invalid phone",
        "    and 57 more",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)
    return found


def test_in_a_log_the_status_is_printed_at_each_new_phase_and_notes_go_between() -> None:
    out = io.StringIO()
    progress = _Progress(out, tick=3600, every=3600)
    with progress:
        progress.set("starting Dagster")
        progress.set("starting Dagster")  # the same phase: nothing new to log
        progress.note("Dagster UI: http://127.0.0.1:3000")
        progress.set("syncing", "340/2000 records", 0.17)
        progress.set("COMPLETED", "2000/2000 records", 1.0)
    lines = out.getvalue().splitlines()
    assert [re.sub(r"\] +\d+ s ", "] N s ", line) for line in lines] == [
        "[..............................] N s  starting Dagster",
        "Dagster UI: http://127.0.0.1:3000",
        "[#####.........................] N s  syncing  340/2000 records",
        "[##############################] N s  COMPLETED  2000/2000 records",
    ]


def test_on_a_terminal_the_status_line_moves_while_the_demo_waits() -> None:
    out = _Terminal()
    with _Progress(out, tick=0.01) as progress:
        progress.set("starting Dagster")
        # Redrawn by its thread, without another call: the clock goes on while Dagster starts.
        _wait_for("redraws", lambda: out.getvalue().count("\r") >= 3)
        progress.note("Dagster UI: http://127.0.0.1:3000")
    text = out.getvalue()
    # A note clears the status line, takes a line of its own, and the status is drawn below it.
    note = text.index("\r\x1b[KDagster UI: http://127.0.0.1:3000\n")
    assert "starting Dagster" in text[note:].split("\n", 1)[1]
    assert text.endswith("\n")  # the next output starts on a line of its own


def test_sigterm_and_sigint_raise_stopped_and_the_cleanup_runs_once() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stops: list[str] = []

    def stop() -> None:
        # A second signal while cleaning up is ignored: the cleanup is not cut short.
        os.kill(os.getpid(), signal.SIGINT)
        stops.append("stopped")

    with pytest.raises(_Stopped) as stopped, _stopping(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for("the signal", lambda: False, timeout=30)  # interrupted by _Stopped
    assert (stopped.value.signum, str(stopped.value)) == (signal.SIGTERM, "SIGTERM")
    assert stops == ["stopped"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_leaving_normally_runs_the_cleanup_too() -> None:
    stops: list[str] = []
    with _stopping(lambda: stops.append("stopped")):
        pass
    assert stops == ["stopped"]


def test_a_process_that_ignores_sigterm_is_killed_and_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(local_stack, "_STOP_SECONDS", 1.0)
    stack = local_stack.LocalStack(tmp_path / "home")
    stubborn = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM, "--store", "mongodb://user:secret@db"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    stack._procs.append(stubborn)
    with caplog.at_level(logging.WARNING, logger=local_stack.__name__):
        stack.stop()
    assert stubborn.returncode == -signal.SIGKILL
    [warning] = caplog.messages
    assert f"process group {stubborn.pid} still ran 1 s after SIGTERM" in warning
    assert f"{stubborn.pid} S -c import signal" in warning
    assert "secret" not in warning  # only the first arguments are named


def test_children_stop_on_sigterm_when_started_with_sigint_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As a background job of a non-interactive shell starts (SIGINT ignored), with a child
    that gives SIGTERM SIGINT's handler, as Dagster does: it must still end on SIGTERM."""
    monkeypatch.setattr(local_stack, "_STOP_SECONDS", 10.0)
    stack = local_stack.LocalStack(tmp_path / "home")
    stack.logs.mkdir(parents=True)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = stack._spawn("like-dagster", [sys.executable, "-c", SIGTERM_AS_SIGINT])
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for_line = (stack.logs / "like-dagster.log").read_text
    _wait_for("the child to start", lambda: "ready" in wait_for_line(), timeout=60)
    with caplog.at_level(logging.WARNING, logger=local_stack.__name__):
        stack.stop()
    assert "KeyboardInterrupt" in wait_for_line()  # SIGTERM reached SIGINT's default handler
    assert child.returncode == -signal.SIGINT and caplog.messages == []


SIGTERM_AS_SIGINT = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT)); "
    "print('ready', flush=True); time.sleep(600)"
)
IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(600)"
)


# ---- the demo itself, by PID -------------------------------------------------------------------
MARK_ENV = "QUO_SYNC_TEST_DEMO_MARK"  # inherited by every process the demo starts


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has ended, its parent not reaped it


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        if stat := _stat(pid):
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _marked(mark: str) -> set[int]:
    """Live processes holding the test's mark in their environment: the demo's descendants,
    whoever their parent is now (an orphan is re-parented and leaves the tree)."""
    needle = f"{MARK_ENV}={mark}\0".encode()
    found = set()
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ and _alive(pid):
            found.add(pid)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _listeners() -> dict[int, set[int]]:
    """TCP port -> inodes of the sockets listening on it now."""
    ports: dict[int, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                ports.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(int(fields[9]))
    return ports


def _ports_of(pids: set[int]) -> set[int]:
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    return {port for port, held in _listeners().items() if held & inodes}


def _owners(inodes: set[int]) -> set[int]:
    return {pid for pid in _pids() if _socket_inodes(pid) & inodes}


_LIVE_RUNS = "{ runsOrError(filter: {statuses: [STARTED]}) { ... on Runs { results { runId } } } }"


def _a_run_is_live(ui_url: str) -> bool:
    try:
        response = httpx.post(f"{ui_url}/graphql", json={"query": _LIVE_RUNS}, timeout=30)
        return bool(response.json()["data"]["runsOrError"]["results"])
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    ("signum", "moment"),
    [(signal.SIGTERM, "while a run is live"), (signal.SIGINT, "once the sync is done")],
)
def test_a_signal_stops_every_process_the_demo_started(
    tmp_path: Path, signum: int, moment: str
) -> None:
    """SIGTERM while Dagster runs a page (or the plan) run, SIGINT (Ctrl-C) once the UI stays
    up after the sync: the demo exits and none of the processes it started (the Quo sandbox,
    the Pipedrive simulator, the receiver, dagster dev with its webserver, daemon, code
    servers and run workers) is left, nor anything listening on their ports."""
    mark, out = uuid.uuid4().hex, tmp_path / "demo.out"
    argv = [sys.executable, "-m", "quo_sync_dagster.cli", "demo", "--crm", "pipedrive"]
    argv += ["--records", "300", "--home", str(tmp_path / "home"), "--quo-rate-limit", "0"]
    with out.open("wb") as log:
        demo = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, MARK_ENV: mark},
            start_new_session=True,
        )
    started: set[int] = set()

    def running(what: str, check: Callable[[str], Any], timeout: float = 600) -> Any:
        def ready() -> Any:
            assert demo.poll() is None, f"the demo ended waiting for {what}:\n{out.read_text()}"
            return check(out.read_text())

        return _wait_for(what, ready, timeout)

    try:
        ui = running("the Dagster UI", lambda text: re.search(r"Dagster UI: (\S+)", text))[1]
        if signum == signal.SIGTERM:
            running("a live run", lambda text: "Sync done" not in text and _a_run_is_live(ui))
        else:
            running("the end of the sync", lambda text: "Sync done" in text)
        started = _descendants(demo.pid)
        ports = _ports_of(started)
        # What must go: the sandbox, simulator and receiver listen, and so does the UI.
        assert len(started) >= 7 and int(ui.rsplit(":", 1)[1]) in ports, (started, ports)

        os.kill(demo.pid, signum)
        code = demo.wait(timeout=300)

        output = out.read_text()
        left = {pid for pid in started | _marked(mark) if _alive(pid)}
        assert not left, f"still running: {left}\n{output}"
        ours = started | {demo.pid}
        listening = {
            port: owners
            for port, inodes in _listeners().items()
            if port in ports
            # a port the kernel gave again to a process the demo did not start is not the demo's
            and (not (owners := _owners(inodes)) or owners & ours or owners & _marked(mark))
        }
        assert not listening, f"still listening: {listening}\n{output}"
        if signum == signal.SIGTERM:
            assert code == 128 + signum, output
            assert "SIGTERM: everything the demo started is stopped" in output
        else:  # Ctrl-C is the way out of the UI left up: the result follows
            assert code == 0, output
            last = output.strip().splitlines()[-1]
            assert json.loads(last.removeprefix("RESULT "))["state"] == "COMPLETED", output
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        for pid in (started | _marked(mark)) - {demo.pid}:  # what a failed run left
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
