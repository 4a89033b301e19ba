"""`quo-sync`: the demo on embedded defaults, and integration management."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self, TextIO

from quo_sync_dagster.analytics import integration_summary, processes_frame
from quo_sync_dagster.core.adoption import AdoptionRules
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.phones import PhoneRules
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms import connector_class, registered_connectors
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.demo_calls import calls_result, simulate_calls
from quo_sync_dagster.local_stack import ChangeLog, LocalStack, legacy_source
from quo_sync_dagster.orchestration.metadata import process_summary
from quo_sync_dagster.orchestration.resources import default_store_uri, quo_rate_setting
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.orchestration.sync_checks import max_failed_share
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.report_plot import plot_png
from quo_sync_dagster.secrets import SECRETS_DIR_ENV, resolve_secret
from quo_sync_dagster.store import NotFound, Store, open_store
from quo_sync_dagster.webhooks import quo_subscriptions as quo_webhooks
from quo_sync_dagster.webhooks.subscriptions import (
    RECEIVER_URL_SETTING,
    receiver_base_url,
    receiver_url,
    subscribe,
    unsubscribe,
)

DEFAULT_HOME = ".quo-sync-home"


def _settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--setting takes KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


_PHASES = {
    ProcessState.INITIALIZING: "planning",
    ProcessState.FETCHING_TOTAL: "planning",
    ProcessState.QUEUING_PAGES: "planning",
    ProcessState.PROCESSING_BATCHES: "syncing",
    ProcessState.COMPLETING: "closing",
}


def _sync_status(summaries: list[dict[str, Any]], now: datetime) -> tuple[str, str, float]:
    """(phase, figures, share done) of a sync's Processes in the store: the phase of the least
    advanced open one ("waiting for page runs" while no record is done), or their result once
    all are closed; then records done of the total, throughput and the store's ETA."""
    total = sum(s["totalRecords"] or 0 for s in summaries)
    done = sum(s["processedRecords"] for s in summaries)
    rate = sum(s["aggregateData"]["recordsPerSecond"] for s in summaries)
    states = [ProcessState(s["state"]) for s in summaries]
    open_states = [state for state in states if state in _PHASES]
    if open_states:
        phase = _PHASES[min(open_states, key=list(ProcessState).index)]
        if phase == "syncing" and not done:
            phase = "waiting for page runs"
    else:
        completed = set(states) == {ProcessState.COMPLETED}
        phase = str(ProcessState.COMPLETED if completed else ProcessState.ERROR)
    figures = [f"{done}/{total} records"] if total else []
    if done:
        figures.append(f"{rate:.1f} records/s")
    etas = [datetime.fromisoformat(e) for s in summaries if (e := s["estimatedCompletion"])]
    if etas and phase == "syncing":  # closing, the records are done; closed, nothing is left
        figures.append(f"ETA {max((max(etas) - now).total_seconds(), 0):.0f} s")
    return phase, "  ".join(figures), done / total if total else 0.0


class _Progress:
    """The demo's status line from its first second: a bar, the seconds since the demo
    started, the phase it is in and that phase's figures. A thread redraws it every `tick`
    seconds, so the clock moves while the main thread blocks (starting Dagster takes ~30 s).
    On a terminal it is one line rewritten in place; in a log, a line at each new phase and
    every `every` seconds. `note` prints a message above it."""

    WIDTH = 30

    def __init__(self, out: TextIO, tick: float = 1.0, every: float = 10.0) -> None:
        self.out, self.tty, self.tick, self.every = out, out.isatty(), tick, every
        self._started = time.monotonic()
        self._phase, self._figures, self._done = "", "", 0.0
        self._logged_at = 0.0  # when a log got its last status line
        self._shown = False  # the status line is on the terminal, the cursor at its end
        self._live = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._redraw, name="demo-progress", daemon=True)

    def __enter__(self) -> Self:
        self._live = True
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._live = False
            if self._shown:
                self._write("\n")
                self._shown = False

    def set(self, phase: str, figures: str = "", done: float = 0.0) -> None:
        with self._lock:
            new_phase = phase != self._phase
            self._phase, self._figures, self._done = phase, figures, done
            self._draw(force=new_phase)

    def note(self, message: str) -> None:
        with self._lock:
            self._write(("\r\x1b[K" if self._shown else "") + message + "\n")
            self._shown = False
            if self.tty and self._live:
                self._draw()

    def line(self) -> str:
        filled = int(self.WIDTH * min(self._done, 1.0))
        elapsed = time.monotonic() - self._started
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {elapsed:4.0f} s  {self._phase}"
        return f"{line}  {self._figures}" if self._figures else line

    def _draw(self, force: bool = False) -> None:
        if not self._phase:
            return
        if self.tty:
            self._write(f"\r{self.line()}\x1b[K")
            self._shown = True
        elif force or time.monotonic() - self._logged_at >= self.every:
            self._write(self.line() + "\n")
            self._logged_at = time.monotonic()

    def _redraw(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                self._draw()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _process_report(process: Process, summary: dict[str, Any], shown: int = 3) -> list[str]:
    """A closed Process's figures, each with its unit, and its last `shown` failures and
    skips with how many more there are."""
    agg, pages = summary["aggregateData"], summary["pages"]
    object_type = process.context.get("personObjectType", "people")
    return [
        f"Process {process.id} ({object_type}): {summary['state']}",
        f"  records: {summary['processedRecords']} of {summary['totalRecords'] or 0} processed:"
        f" {agg['totalSynced']} synced ({agg['created']} created, {agg['updated']} updated,"
        f" {agg['skippedUnchanged']} unchanged, {agg['adopted']} adopted),"
        f" {agg['totalSkipped']} skipped, {agg['totalFailed']} failed",
        f"  pages: {pages['processedPages']} of {pages['totalPages'] or 0} processed,"
        f" {pages['failedPages']} failed",
        f"  time: {agg['duration'] / 1000:.1f} s syncing, {agg['recordsPerSecond']:.1f} records/s",
        f"  to check: {agg['adoptionCandidates']} adoption candidates,"
        f" {agg['unverifiedPhones']} unverified phones",
        *_last(
            "failed",
            [f"{e['contactId']} (page {e['page']}): {e['error']}" for e in agg["errors"]],
            agg["totalFailed"],
            shown,
        ),
        *_last(
            "skipped",
            [f"{s['contactId']} (page {s['page']}): {s['reason']}" for s in agg["skipped"]],
            agg["totalSkipped"],
            shown,
        ),
    ]


def _last(what: str, items: list[str], total: int, shown: int) -> list[str]:
    """The last `shown` of `items` (the store keeps the last 100 of `total`) and how many
    more there are."""
    if not items:
        return []
    last = items[-shown:]
    more = max(total, len(items)) - len(last)
    return [
        f"  {what}, the last {len(last)}:",
        *(f"    {item}" for item in last),
        *([f"    and {more} more"] if more else []),
    ]


def demo(args: argparse.Namespace) -> int:
    connector_class(args.crm)  # fail fast, naming the known CRMs
    stack = LocalStack(
        Path(args.home), quo_rate_limit=args.quo_rate_limit or None, ui_port=args.port
    )
    if args.changes or args.calls:  # the webhook subscriptions' secrets stay in its home
        os.environ.setdefault(SECRETS_DIR_ENV, str(stack.home / "secrets"))
    try:
        with _stopping(lambda: _stop_stack(stack)):
            result = _run_demo(args, stack)
    except _Stopped as stopped:
        print(f"{stopped}: everything the demo started is stopped", flush=True)
        return 128 + stopped.signum
    print("RESULT " + json.dumps(result, separators=(",", ":")), flush=True)
    states = {result["state"], result.get("pollState", result["state"])}
    findings = ("missing", "stale", "duplicates", "orphans", "missingActivities")
    findings += ("duplicateActivities", "unenriched", "wrongOutcome")
    exact = not any(result.get(k) for k in findings)
    return 0 if states == {ProcessState.COMPLETED} and exact else 1


def _run_demo(args: argparse.Namespace, stack: LocalStack) -> dict[str, Any]:
    """Start the stack, run the initial sync (and what --changes, --calls and
    --legacy-contacts add) under a status line; the RESULT line's figures."""
    crm = args.crm
    integration_id = f"demo-{crm}"
    with _Progress(sys.stdout) as progress:
        progress.note(f"Starting the Quo sandbox and Dagster (home: {stack.home}) ...")
        progress.set("starting Dagster")
        stack.start()
        source = connector_class(crm).quo_source
        before = stack.sandbox_stats()
        progress.set(f"registering {integration_id}")
        # The earlier sync's contacts are found under its source and ids (CRM id as is).
        legacy = {"legacy_sources": [legacy_source(crm)]} if args.legacy_contacts else {}
        stack.register_integration(
            integration_id,
            crm,
            args.records,
            settings=legacy,
            webhooks=bool(args.changes),
            activities=bool(args.calls),
        )
        prefilled = 0  # an earlier sync left contacts only in a workspace nothing else wrote
        if args.legacy_contacts and not before["contacts"]:
            progress.set("prefilling Quo")
            prefilled = stack.prefill_legacy(
                integration_id, args.legacy_contacts, args.legacy_changed
            )
            progress.note(f"Quo prefilled as an earlier sync left it: {prefilled} contacts")
        progress.note(f"Dagster UI: {stack.ui_url}  (launching {crm}_initial_sync)")
        progress.set("planning")
        started = time.monotonic()
        process_ids = stack.run_initial_sync(crm, {"integration_id": integration_id})
        progress.set("waiting for page runs")
        changes = _DemoChanges(stack, integration_id, args.changes, args.seed, progress.note)
        changes.during(process_ids)
        store = stack.store
        assert store is not None

        def show(processes: list[Process]) -> None:
            summaries = [process_summary(store, p) for p in processes]
            progress.set(*_sync_status(summaries, datetime.now(UTC)))

        processes = stack.wait_processes(process_ids, show)  # its last `show`: the result
    duration = time.monotonic() - started
    for process in processes:
        print("\n".join(_process_report(process, process_summary(store, process))))
    ongoing = changes.after()
    after = stack.sandbox_stats()
    result = {**_result(processes, before, after, source, duration), **ongoing}
    if args.legacy_contacts:
        result["legacyContacts"] = prefilled
        result["quoLegacyContacts"] = after["contactsBySource"].get(legacy_source(crm), 0)
    if args.changes or args.legacy_contacts:
        result.update(stack.differential(integration_id).result())
    if args.calls:
        made = simulate_calls(stack, integration_id, args.calls, random.Random(args.seed))
        result.update(calls_result(stack, integration_id, made))
    if not args.exit_when_done:
        print(f"Sync done. Dagster UI up at {stack.ui_url}; Ctrl-C or SIGTERM stops everything.")
        with suppress(_Stopped):  # the wanted way out: the RESULT line follows
            while True:
                time.sleep(3600)
    return result


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stopping(stop: Callable[[], None]) -> Iterator[None]:
    """Run `stop` on leaving however the block ends, SIGTERM and SIGINT included: they raise
    `_Stopped` in the main thread (the default SIGTERM would end the process with no cleanup,
    and the stack's processes, each in its own session, would keep running). From the first
    of them on, and while `stop` runs, both are ignored: a second Ctrl-C must not cut the
    cleanup short."""

    def raise_stopped(signum: int, _frame: FrameType | None) -> None:
        _ignore_stop_signals()
        raise _Stopped(signum)

    previous = {signum: signal.signal(signum, raise_stopped) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        try:
            _ignore_stop_signals()
        finally:  # even when a signal lands just as the block ends
            stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _ignore_stop_signals() -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _stop_stack(stack: LocalStack) -> None:
    print("Stopping the Quo sandbox, the simulators, the receiver and Dagster ...", flush=True)
    stack.stop()


def _change_count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a number of changes >= 0, not {value!r}")
    return int(value)


class _DemoChanges:
    """`--changes N`: half of N random changes while the initial sync runs (once its first
    page is synced), the rest after it; then the webhook runs apply what the simulator sent and
    one polling cycle runs. Nothing without --changes."""

    def __init__(
        self,
        stack: LocalStack,
        integration_id: str,
        count: int,
        seed: int | None,
        say: Callable[[str], None],
    ) -> None:
        self.stack, self.integration_id, self.count, self.say = stack, integration_id, count, say
        self.seed = random.randrange(10**6) if seed is None else seed
        self.rng, self.log = random.Random(self.seed), ChangeLog()
        self.during_sync = 0

    def _change(self, count: int, when: str) -> None:
        with self.stack.crm_people(self.integration_id) as people:
            people.random_changes(count, self.rng, self.log)
        self.say(f"{count} random changes {when}; so far {dict(self.log.ops)}")

    def during(self, process_ids: list[str]) -> None:
        if not self.count:
            return
        if self.stack.wait_first_page(process_ids):
            self.during_sync = self.count // 2
            self._change(self.during_sync, "while the initial sync runs")
        else:
            self.say("the initial sync closed before its first page was seen: no change during it")

    def after(self) -> dict[str, Any]:
        if not self.count:
            return {}
        self._change(self.count - self.during_sync, "after the initial sync")
        store = self.stack.store
        assert store is not None
        integration = store.get_integration(self.integration_id)
        if store.get_webhook_subscription(self.integration_id) is not None:
            self.say("Waiting for the webhook runs to apply what the CRM sent ...")
            self.stack.wait_webhooks_applied(integration)
        crm = integration.crm
        self.say(f"One polling cycle ({crm}_poll) ...")
        processes, how = self.stack.poll_cycle(self.integration_id)
        self.say(f"polling cycle: {how}")
        states = {p.state for p in processes}
        return {
            "seed": self.seed,
            "changes": dict(self.log.ops),
            "changesDuringInitialSync": self.during_sync,
            "pollProcessIds": [p.id for p in processes],
            "pollState": str(
                ProcessState.COMPLETED if states == {ProcessState.COMPLETED} else ProcessState.ERROR
            ),
            "pollListing": how,
        }


def _result(
    processes: list[Process],
    before: dict[str, Any],
    after: dict[str, Any],
    source: str,
    duration: float,
) -> dict[str, Any]:
    def delta(*kinds: str) -> int:
        return sum(after["byKind"].get(k, 0) - before["byKind"].get(k, 0) for k in kinds)

    states = {p.state for p in processes}
    return {
        "state": str(
            ProcessState.COMPLETED if states == {ProcessState.COMPLETED} else ProcessState.ERROR
        ),
        "processIds": [p.id for p in processes],
        "totalRecords": sum(p.context.get("totalRecords") or 0 for p in processes),
        "totalSynced": sum(p.counters["synced"] for p in processes),
        "totalFailed": sum(p.counters["failed"] for p in processes),
        "totalSkipped": sum(p.counters["skipped"] for p in processes),
        "skippedUnchanged": sum(p.counters["unchanged"] for p in processes),
        "adopted": sum(p.counters["adopted"] for p in processes),
        "adoptionCandidates": sum(p.counters["adoption_candidates"] for p in processes),
        "quoContacts": after["contactsBySource"].get(source, 0),
        "quoDuplicateExternalIds": after["duplicateExternalIds"],
        "quoWriteRequests": delta("create", "patch"),
        "quoRequests": after["requests"] - before["requests"],
        "rate429s": after["rateLimited"] - before["rateLimited"],
        "durationSeconds": round(duration, 1),
    }


def integrations(args: argparse.Namespace) -> int:
    store = open_store(args.store or default_store_uri())
    if args.action == "add":
        settings = _settings(args.setting)
        if args.receiver_url:
            settings[RECEIVER_URL_SETTING] = args.receiver_url
        integration = Integration(
            id=args.id,
            crm=args.crm,
            quo_api_key_ref=args.quo_key_ref,
            quo_base_url=args.quo_base_url,
            default_region=args.region,
            crm_credential_ref=args.crm_credential_ref,
            settings=settings,
        )
        connector_cls = connector_class(args.crm)
        try:  # settings every run reads, refused now rather than by the first run
            PhoneRules.from_settings(integration.default_region, settings)
            AdoptionRules.from_settings(settings)
            connector_cls.object_types_for(settings)
            max_failed_share(settings)
            quo_rate_setting(settings)
        except ValueError as exc:
            raise SystemExit(f"integration {args.id!r}: {exc}") from None
        webhooks = connector_cls.crm_config.sync_config.supports_webhooks
        webhooks = webhooks and not args.no_webhooks
        base_url = None
        try:  # before saving: an integration that cannot be subscribed is not half added
            base_url = None if args.no_webhooks else receiver_base_url(integration)
            if base_url:
                receiver_url(integration, base_url)
        except ValueError as exc:
            if webhooks:
                hint = "or pass --receiver-url (--no-webhooks: polling only)"
                raise SystemExit(f"{exc}, {hint}") from None
            base_url = None
        store.upsert_integration(integration)
        print(f"integration {args.id!r} ({args.crm}) saved")
        if base_url is None:  # a CRM without webhooks and no receiver
            print("no receiver URL: Quo calls and messages are not logged on the CRM")
            return 0
        if webhooks and (
            failed := _with_connector(store, integration, lambda c: _subscribe(store, c, base_url))
        ):
            return failed
        return _with_quo(integration, lambda q: _quo_subscribe(store, integration, q, base_url))
    elif args.action == "remove":
        integration_id = args.integration_id
        try:
            integration = store.get_integration(integration_id)
        except NotFound:
            raise SystemExit(f"no integration {integration_id!r}") from None
        if failed := _with_connector(store, integration, lambda c: _unsubscribe(store, c)):
            return failed
        if failed := _with_quo(integration, lambda q: _quo_unsubscribe(store, integration, q)):
            return failed
        store.delete_integration(integration_id)
        print(f"integration {integration_id!r} removed (its contact links stay)")
    else:
        for i in store.list_integrations():
            print(f"{i.id}\t{i.crm}\t{i.quo_base_url}\tquo key: {i.quo_api_key_ref}")
    return 0


def _with_connector(
    store: Store, integration: Integration, action: Callable[[CRMConnector], None]
) -> int:
    """Run `action` on the integration's connector; 1 (and the reason) if it fails."""
    try:
        connector = open_connector(store, integration.crm, integration.id)
        try:
            action(connector)
        finally:
            connector.close()
    except Exception as exc:  # connector and secret errors name no secret
        print(f"{integration.id!r} webhooks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _subscribe(store: Store, connector: CRMConnector, base_url: str) -> None:
    subscription = subscribe(store, connector, base_url)
    print(f"webhooks subscribed: {subscription['receiverUrl']}")


def _unsubscribe(store: Store, connector: CRMConnector) -> None:
    removed = unsubscribe(store, connector)
    print("webhooks torn down" if removed else "no webhook subscription to tear down")


def _with_quo(integration: Integration, action: Callable[[QuoClient], None]) -> int:
    """Run `action` with a client of the integration's Quo workspace; 1 (and why) if it fails."""
    try:
        with QuoClient(integration.quo_base_url, resolve_secret(integration.quo_api_key_ref)) as q:
            action(q)
    except Exception as exc:  # client and secret errors name no secret
        print(f"{integration.id!r} Quo webhooks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _quo_subscribe(store: Store, integration: Integration, quo: QuoClient, base: str) -> None:
    subscription = quo_webhooks.subscribe(store, integration, quo, base)
    print(f"Quo call and message webhooks subscribed: {subscription['receiverUrl']}")


def _quo_unsubscribe(store: Store, integration: Integration, quo: QuoClient) -> None:
    removed = quo_webhooks.unsubscribe(store, integration, quo)
    print("Quo webhooks torn down" if removed else "no Quo webhooks to tear down")


def receiver(args: argparse.Namespace) -> int:
    """Serve the CRM webhook receiver until SIGINT/SIGTERM, on the configured store."""
    from quo_sync_dagster.webhooks.app import ReceiverServer, create_app
    from quo_sync_dagster.webhooks.inbox import Inbox, StoreInbox
    from quo_sync_dagster.webhooks.sqs import SqsInbox

    store = open_store(args.store or default_store_uri())
    inbox: Inbox = SqsInbox(args.sqs_queue_url) if args.sqs_queue_url else StoreInbox(store)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with ReceiverServer(create_app(store, inbox), args.host, args.port) as server:
            print(f"RECEIVER_READY {server.url}", flush=True)
            stop.wait()
    finally:
        inbox.close()
        store.close()
    return 0


# integration_summary's columns as `quo-sync report` heads them, with their units.
_REPORT_HEADINGS = {"seconds": "sync time (s)", "records_per_second": "records/s"}


def report(args: argparse.Namespace) -> int:
    """Per integration: Processes, record outcomes and throughput; with --plot, a PNG of
    throughput and failures over time."""
    store = open_store(args.store or default_store_uri())
    try:
        processes = processes_frame(store, crm=args.crm, integration=args.integration)
    finally:
        store.close()
    if processes.empty:
        print("no Processes in the store match")
    else:
        summary = integration_summary(processes).rename_axis("integration").reset_index()
        table = summary.rename(columns=_REPORT_HEADINGS)
        print(table.to_string(index=False, float_format="{:.1f}".format, na_rep="-"))
    if args.plot:
        Path(args.plot).write_bytes(plot_png(processes))
        print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quo-sync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run an initial sync on embedded defaults, UI included")
    d.add_argument("--crm", default="scalingtest", choices=sorted(registered_connectors()))
    d.add_argument(
        "--records", type=int, default=2000, help="people in the CRM (default %(default)s)"
    )
    d.add_argument("--home", default=DEFAULT_HOME, help="state folder (default %(default)s)")
    d.add_argument("--exit-when-done", action="store_true", help="stop everything at the end")
    d.add_argument("--port", type=int, help="Dagster UI port (default: a free one)")
    d.add_argument(
        "--quo-rate-limit", type=float, default=10.0, help="sandbox requests/s per key (0: off)"
    )
    d.add_argument(
        "--changes",
        type=_change_count,
        default=0,
        metavar="N",
        help="then N random creates/updates/deletes/merges in the CRM (half during the initial "
        "sync), webhooks and one polling cycle, and the differential check of Quo against it",
    )
    d.add_argument(
        "--calls",
        type=_change_count,
        default=0,
        metavar="N",
        help="then N Quo calls and messages with the synced people (and unknown numbers), "
        "logged on the CRM as activities, and the check of the CRM's activities against them",
    )
    d.add_argument(
        "--legacy-contacts",
        type=_change_count,
        default=0,
        metavar="N",
        help="first fill Quo as an earlier sync left it (its source and ids) for the CRM's first "
        "N people, and let the sync adopt them",
    )
    d.add_argument(
        "--legacy-changed",
        type=_change_count,
        default=0,
        metavar="M",
        help="of those, M with values the CRM has changed since (default %(default)s)",
    )
    d.add_argument("--seed", type=int, help="of the random changes (default: a random one)")
    d.set_defaults(func=demo)
    i = sub.add_parser("integrations", help="add, list or remove integrations in the store")
    i.add_argument("action", choices=["add", "list", "remove"])
    i.add_argument("integration_id", nargs="?", metavar="ID", help="the integration to remove")
    i.add_argument(
        "--store", help="store URI (default: QUO_SYNC_STORE_URI or SQLite in DAGSTER_HOME)"
    )
    i.add_argument("--id")
    i.add_argument("--crm", choices=sorted(registered_connectors()))
    i.add_argument("--quo-key-ref", help="env:NAME or aws-sm:SECRET_ID holding the Quo API key")
    i.add_argument("--quo-base-url", default="https://api.openphone.com")
    i.add_argument("--region", default="US", help="default region for phone numbers")
    i.add_argument("--crm-credential-ref", help="env:NAME or aws-sm:SECRET_ID")
    i.add_argument("--setting", action="append", default=[], help="KEY=VALUE (JSON values)")
    i.add_argument(
        "--receiver-url",
        help="public base URL of the webhook receiver (else setting receiver_url, else "
        "QUO_SYNC_RECEIVER_URL); webhook CRMs are subscribed to it",
    )
    i.add_argument("--no-webhooks", action="store_true", help="add without webhooks (polling)")
    i.set_defaults(func=integrations)
    r = sub.add_parser("receiver", help="serve the CRM webhook receiver")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8787, help="0: a free port (default %(default)s)")
    r.add_argument(
        "--store", help="store URI (default: QUO_SYNC_STORE_URI or SQLite in DAGSTER_HOME)"
    )
    r.add_argument(
        "--sqs-queue-url",
        default=os.environ.get("QUO_SYNC_WEBHOOK_QUEUE_URL"),
        help="write deliveries to this SQS queue, not the store (QUO_SYNC_WEBHOOK_QUEUE_URL)",
    )
    r.set_defaults(func=receiver)
    rp = sub.add_parser("report", help="sync totals and throughput per integration")
    rp.add_argument("--integration", metavar="ID", help="only this integration")
    rp.add_argument("--crm", choices=sorted(registered_connectors()), help="only this CRM")
    rp.add_argument("--plot", metavar="FILE.png", help="also plot throughput and failures")
    rp.add_argument(
        "--store", help="store URI (default: QUO_SYNC_STORE_URI or SQLite in DAGSTER_HOME)"
    )
    rp.set_defaults(func=report)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.legacy_changed > args.legacy_contacts:
        parser.error("--legacy-changed M counts some of the --legacy-contacts N: M <= N")
    if args.command == "integrations" and args.action == "add":
        missing = [
            f"--{n.replace('_', '-')}" for n in ("id", "crm", "quo_key_ref") if not getattr(args, n)
        ]
        if missing:
            parser.error(f"integrations add needs {', '.join(missing)}")
    if args.command == "integrations" and args.action == "remove":
        args.integration_id = args.integration_id or args.id
        if not args.integration_id:
            parser.error("integrations remove needs the integration's ID")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
