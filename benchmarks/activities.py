"""Activity-logging benchmark: how long a Quo event takes to show on its CRM activity, and how
many CRM requests each event costs.

The stack of `quo-sync demo` on its embedded defaults (`dagster dev`, SQLite, the receiver
process; the Quo sandbox at 10 req/s), a Pipedrive integration (`--records` people, polling
off) synced first, its Quo call and message webhooks subscribed to the receiver. Then calls
and messages are simulated through the Quo sandbox's admin API until `--events` Quo events
have been emitted, at a steady `--pace` events per second, in a fixed mix per ten objects:
four messages (1 event each), two answered calls with recording, summary and transcript (5:
ringing, completed, recording, summary, transcript; one of them outgoing with empty
`participants`), one answered call with a summary only (3), two missed calls (2) and a
voicemail (2); 23 events per ten objects. Each object's number belongs to exactly one synced
person (its activity has one place to be); no delivery faults.

Definitions:
- An event's *start*: the wall clock just before the admin request that simulated its object
  (the sandbox hands every event of the object to its delivery thread while answering it).
- An event is *reflected* once the CRM activity carrying its object's Quo id line ("Quo call
  id: …" / "Quo message id: …") holds its content: for call.recording/summary/transcript
  .completed the "Recording:" / "Summary:" / "Transcript:" line, for every other event
  (call.ringing, call.completed, message.*) the activity existing at all. A background thread
  reads the simulator's `GET /_sandbox/activities` every 0.5 s; the time of a content is the
  end of the first read that shows it (an upper bound: late by up to 0.5 s plus one read).
- `quoEventToCrmActivityP95Seconds`: the 95th percentile (inclusive method) over every event
  of (reflected - start).
- `crmRequestsPerEvent`: the Pipedrive simulator's API requests (`GET /_sandbox/stats`,
  every kind; the admin routes are not counted) from just before the first simulated object
  to when every event was logged (inbox drained, no live activity run), ÷ the Quo events.
- Baseline, in the same run: as many events, same mix and pace, same simulator, receiver and
  store, with `quo_activity_sensor` stopped and this process claiming the activity queue's
  inbox items as soon as they are there and logging them with the code an activity run calls
  (activity_logging.log_activities): what sensor ticks and run launches add. `ratio` =
  Dagster p50 / baseline p50.
- `activityCheck`: stack.activity_check over both phases (duplicateActivities and unenriched
  must be 0).

Run:  python benchmarks/activities.py [--records 200] [--events 1000] [--pace 10]
Last line: BENCH <one-line JSON>.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from ongoing_sync import quantiles
from rate_under_429s import machine

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.activity_logging import Workspace, log_activities
from quo_sync_dagster.orchestration.activity_sync import settle
from quo_sync_dagster.orchestration.resources import QuoResource, QuoSettings
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.sandbox.serving import AdminClient
from quo_sync_dagster.secrets import SECRETS_DIR_ENV

CRM = "pipedrive"
QUO_LIMIT = 10.0
POLL_SECONDS = 0.5
CREATED = "Quo id line"  # the marker of events that only need the activity to exist
ENRICHED = {
    "call.recording.completed": "Recording:",
    "call.summary.completed": "Summary:",
    "call.transcript.completed": "Transcript:",
}
_QUO_ID = re.compile(r"Quo (?:call|message) id: (AC[0-9A-Za-z]+)")
_FULL = {"recording": True, "summary": True, "transcript": True}
MIX: list[tuple[str, dict[str, Any]]] = [
    ("message", {"direction": "incoming"}),
    ("call", _FULL),
    ("message", {"direction": "outgoing"}),
    ("call", {"outcome": "missed"}),
    ("message", {"direction": "incoming"}),
    ("call", {"direction": "outgoing", "summary": True, "duration": 42}),
    ("message", {"direction": "outgoing"}),
    ("call", {"outcome": "voicemail"}),
    ("call", {"direction": "outgoing", "empty_participants": True, **_FULL}),
    ("call", {"outcome": "missed"}),
]

Emitted = tuple[float, str, list[str]]  # (start, Quo object id, one marker per event)


def event_count(kind: str, options: dict[str, Any]) -> int:
    if kind == "message":
        return 1
    return 2 + sum(bool(options.get(k)) for k in ("recording", "summary", "transcript"))


class Watcher(threading.Thread):
    """Reads the CRM simulator's activities every POLL_SECONDS; notes when each (Quo id,
    marker) first shows."""

    def __init__(self, url: str) -> None:
        super().__init__(name="activity-watcher", daemon=True)
        self.admin = AdminClient(url)
        self.seen: dict[tuple[str, str], float] = {}
        self.reads: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.wait(max(next_at - time.monotonic(), 0)):
            next_at += POLL_SECONDS
            started = time.time()
            try:
                activities = self.admin.activities()
            except httpx.HTTPError:
                continue
            now = time.time()
            self.reads.append(now - started)
            for activity in activities:
                text = json.dumps(activity, ensure_ascii=False)
                markers = [CREATED, *(m for m in ENRICHED.values() if m in text)]
                for quo_id in _QUO_ID.findall(text):
                    for marker in markers:
                        self.seen.setdefault((quo_id, marker), now)

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.admin.close()

    def latencies(self, made: list[Emitted], timeout: float) -> list[float]:
        """Seconds from each event's start to its content on the CRM activity."""
        wanted = [(at, (quo_id, m)) for at, quo_id, markers in made for m in markers]
        deadline = time.monotonic() + timeout
        while True:
            seen = dict(self.seen)
            missing = [key for _, key in wanted if key not in seen]
            if not missing:
                return [seen[key] - at for at, key in wanted]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(missing)} of {len(wanted)} events not on the CRM: {missing[:5]}"
                )
            time.sleep(POLL_SECONDS)


def single_holder_numbers(stack: LocalStack, integration_id: str) -> list[str]:
    assert stack.store is not None
    holders = Counter(
        phone for _, link in stack.store.iter_contact_links(integration_id) for phone in link.phones
    )
    return sorted(phone for phone, n in holders.items() if n == 1)


def emit(
    stack: LocalStack,
    numbers: list[str],
    events: int,
    pace: float,
    rng: random.Random,
    between: Callable[[], bool] | None = None,
) -> list[Emitted]:
    """Objects of MIX in turn until `events` events, one event every 1/pace s on average;
    `between()` runs while waiting for the next object (True: it did some work)."""
    made: list[Emitted] = []
    emitted, next_at = 0, time.monotonic()
    while emitted < events:
        while time.monotonic() < next_at:
            if between is None or not between():
                time.sleep(0.01)
        kind, options = MIX[len(made) % len(MIX)]
        if event_count(kind, options) > events - emitted:  # the last few: messages
            kind, options = "message", {"direction": "incoming"}
        number = rng.choice(numbers)
        started = time.time()
        if kind == "message":
            record = stack.quo.simulate_message(number, f"Bench message {len(made)}", **options)
        else:
            record = stack.quo.simulate_call(number, **options)
        markers = [ENRICHED.get(e["type"], CREATED) for e in record["events"]]
        made.append((started, record.get("callId") or record["messageId"], markers))
        emitted += len(markers)
        next_at += len(markers) / pace
    return made


def counts(stack: LocalStack, crm: AdminClient) -> tuple[Counter[str], int]:
    """The CRM simulator's requests by kind, and the product's Quo requests."""
    by_kind = Counter({k: n for k, n in crm.stats()["byKind"].items() if n})
    return by_kind, stack.quo.stats()["byApiKey"][stack.sandbox_key]["requests"]


def baseline(
    stack: LocalStack,
    integration: Integration,
    numbers: list[str],
    args: argparse.Namespace,
) -> list[Emitted]:
    """The same kind of events logged without Dagster (see the module docstring)."""
    assert stack.store is not None
    store, queue = stack.store, activity_queue(integration.id)
    stack.stop_sensor("quo_activity_sensor")
    connector = open_connector(store, CRM, integration.id)
    settings = QuoSettings.from_env(stack.env)  # as the stack's runs: QUO_LIMIT
    client = QuoResource().client(integration, store, settings)
    workspace = Workspace(client)  # as a run keeps it across its batches

    def log_waiting() -> bool:
        items = store.claim_webhooks(queue, 500, 600)
        if items:
            settle(store, items, log_activities(store, connector, client, items, workspace))
        return bool(items)

    try:
        made = emit(stack, numbers, args.events, args.pace, random.Random(2), log_waiting)
        deadline = time.monotonic() + 300
        while True:  # every delivery sent, stored and logged
            sent = stack.quo.deliveries()
            busy = log_waiting() or sent["pending"] or sent["held"]
            if not (busy or store.webhook_backlog(queue)):
                return made
            if time.monotonic() > deadline:
                raise TimeoutError("the baseline's events were not all logged")
            time.sleep(0.05)
    finally:
        client.close()
        connector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200, help="Pipedrive people at the start")
    parser.add_argument("--events", type=int, default=1000, help="Quo events per phase")
    parser.add_argument("--pace", type=float, default=10.0, help="Quo events per second")
    args = parser.parse_args()
    command = "python " + shlex.join(sys.argv)
    print(f"machine: {machine()}\ncommand: {command}", flush=True)
    load = {"start": round(os.getloadavg()[0], 2)}

    with tempfile.TemporaryDirectory(prefix="quo-bench-activities-") as tmp:
        os.environ[SECRETS_DIR_ENV] = str(Path(tmp, "secrets"))
        with LocalStack(Path(tmp) / "home", quo_rate_limit=QUO_LIMIT) as stack:
            # The baseline runs the product's code here: the runs' secrets, here too.
            os.environ.update({k: v for k, v in stack.env.items() if k.startswith("QUO_SYNC_")})
            integration = stack.register_integration(
                "bench", CRM, args.records, {"polling": False}, activities=True
            )
            (process_id,) = stack.run_initial_sync(CRM, {"integration_id": integration.id})
            stack.wait_processes([process_id])
            numbers = single_holder_numbers(stack, integration.id)
            print(f"synced; {len(numbers)} numbers held by one person each", flush=True)
            load["afterSync"] = round(os.getloadavg()[0], 2)
            watcher = Watcher(integration.settings["base_url"])
            watcher.start()
            try:
                with AdminClient(integration.settings["base_url"]) as crm:
                    crm_before, quo_before = counts(stack, crm)
                    made = emit(stack, numbers, args.events, args.pace, random.Random(1))
                    stack.wait_activities_logged(integration)
                    crm_after, quo_after = counts(stack, crm)
                    dagster = watcher.latencies(made, timeout=60)
                    load["afterDagster"] = round(os.getloadavg()[0], 2)
                    print(f"Quo event -> CRM through Dagster: {quantiles(dagster)} s", flush=True)

                    base_crm_before, _ = counts(stack, crm)
                    base_made = baseline(stack, integration, numbers, args)
                    base_crm_after, _ = counts(stack, crm)
                    bare = watcher.latencies(base_made, timeout=60)
                    print(f"Quo event -> CRM without Dagster: {quantiles(bare)} s", flush=True)
            finally:
                watcher.stop()
            check = stack.activity_check(integration).result()
    load["end"] = round(os.getloadavg()[0], 2)
    dag, base = quantiles(dagster), quantiles(bare)
    crm_requests = crm_after - crm_before
    base_requests = base_crm_after - base_crm_before
    bench = {
        "quoEventToCrmActivityP50Seconds": dag["p50"],
        "quoEventToCrmActivityP95Seconds": dag["p95"],
        "quoEventToCrmActivityMaxSeconds": dag["max"],
        "quoEvents": len(dagster),
        "quoObjects": len(made),
        "crmRequestsPerEvent": round(crm_requests.total() / len(dagster), 3),
        "crmRequestsByKind": dict(crm_requests),
        "quoRequestsPerEvent": round((quo_after - quo_before) / len(dagster), 3),
        "baselineP50Seconds": base["p50"],
        "baselineP95Seconds": base["p95"],
        "baselineCrmRequestsPerEvent": round(base_requests.total() / len(bare), 3),
        "baselineCrmRequestsByKind": dict(base_requests),
        "ratio": round(dag["p50"] / base["p50"], 2),
        "ratioIs": "quoEventToCrmActivityP50Seconds / the same mix logged by log_activities in "
        "this process, claimed from the inbox as it arrives (no sensor, no run launch)",
        "activityCheck": check,
        "pollSeconds": POLL_SECONDS,
        "pollReadP50Seconds": round(statistics.median(watcher.reads), 3),
        "records": args.records,
        "pacePerSecond": args.pace,
        "quoRequestsPerSecondLimit": QUO_LIMIT,
        "command": command,
        "machine": machine(),
        "loadAverage1m": load,
    }
    print("BENCH " + json.dumps(bench, separators=(",", ":")))


if __name__ == "__main__":
    main()
