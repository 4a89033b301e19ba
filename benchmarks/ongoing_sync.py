"""Ongoing-sync benchmark: how long a CRM change takes to reach Quo through its webhook, how fast
the receiver durably stores deliveries, and what a polling cycle costs per unchanged person.

1. `receiverDurablePerSecond`: benchmarks/receiver_throughput.py as is (its own receiver
   process and SQLite store, >= 8 concurrent senders; `lost` must be 0), run first.
2. `webhookToQuoP50Seconds` / `P95`: the stack of `quo-sync demo` on its embedded defaults
   (`dagster dev`, SQLite, the receiver process; the Quo sandbox at 10 req/s), a Pipedrive
   integration subscribed to webhooks and synced. Then `--changes` changes to distinct people
   (updates, creates and deletes in turn) at a steady `--pace` per second; a change's latency
   runs from the admin request that made it (the simulator sends its webhook as it answers) to
   the Quo sandbox's write of that person (its write log: create, patch or delete).
   Baseline, in the same run: as many changes, same pace, same simulator, receiver, store,
   Quo key and limit, with `pipedrive_webhook_sensor` stopped and this process claiming the
   inbox items as soon as they are there and applying them with the code a webhook run calls
   (change_sync.apply_changes): what the sensor ticks and run launches add. `ratio` =
   Dagster p50 / baseline p50.
3. `pollCycleRequestsPerUnchangedPerson`: once the webhook runs have applied everything, one
   polling cycle (a full scan: the gap-fill of a webhook integration); the product's Quo
   requests from its launch to its close, divided by the people it listed unchanged.

Run:  python benchmarks/ongoing_sync.py [--records 300] [--changes 200] [--pace 2]
Last line: BENCH <one-line JSON>.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rate_under_429s import machine

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.local_stack import CrmPeople, LocalStack
from quo_sync_dagster.orchestration.change_sync import apply_changes
from quo_sync_dagster.orchestration.resources import QuoResource, QuoSettings
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.sandbox.serving import AdminClient
from quo_sync_dagster.secrets import SECRETS_DIR_ENV

CRM = "pipedrive"
OBJECT = "Person"
QUO_LIMIT = 10.0
TARGET_P95 = 10.0  # seconds, the target
RECEIVER_BENCH = Path(__file__).with_name("receiver_throughput.py")

Change = tuple[float, str, str]  # (started at, expected Quo write kind, externalId)


def receiver_throughput(deliveries: int, senders: int) -> dict[str, Any]:
    argv = [sys.executable, str(RECEIVER_BENCH), "--deliveries", str(deliveries)]
    out = subprocess.run(
        [*argv, "--senders", str(senders)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1].removeprefix("BENCH "))


def make_changes(
    people: CrmPeople, count: int, pace: float, rng: random.Random, between: Any = None
) -> list[Change]:
    """`count` changes to distinct people, update/create/delete in turn, one every 1/pace s;
    `between()` runs while waiting for the next. Each with the Quo write it must cause (a
    change Quo cannot show, such as creating a person without a phone, is left out)."""
    pool = [(t, r) for t, r in people.people() if people.syncable([(t, r)])]
    rng.shuffle(pool)
    made: list[Change] = []
    next_at = time.monotonic()
    for n in range(count):
        while time.monotonic() < next_at:
            if between is None or not between():
                time.sleep(0.01)
        next_at += 1 / pace
        started = time.time()
        op = ("update", "create", "delete")[n % 3]
        if op == "create":
            record = people.create(OBJECT)
            if people.syncable([(OBJECT, record)]):
                made.append((started, "create", people.external_id(OBJECT, record)))
            continue
        _, record = pool.pop()
        ext = people.external_id(OBJECT, record)
        if op == "delete":
            people.delete(OBJECT, record)
            made.append((started, "delete", ext))
        elif people.syncable([(OBJECT, people.update(OBJECT, record))]):
            made.append((started, "patch", ext))
    return made


def latencies(stack: LocalStack, changes: list[Change], timeout: float) -> list[float]:
    """Seconds from each change to its write in Quo; waits up to `timeout` for the last."""
    deadline = time.monotonic() + timeout
    while True:
        writes: dict[tuple[str, str], list[float]] = {}
        for w in stack.quo.writes():
            writes.setdefault((w["kind"], w["externalId"]), []).append(w["at"])
        found = [
            min((at for at in writes.get((kind, ext), []) if at >= started), default=None)
            for started, kind, ext in changes
        ]
        if all(f is not None for f in found) or time.monotonic() > deadline:
            missing = sum(f is None for f in found)
            if missing:
                raise RuntimeError(f"{missing} of {len(changes)} changes never reached Quo")
            return [f - c[0] for f, c in zip(found, changes, strict=True) if f is not None]
        time.sleep(1)


def quantiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 2), "p95": round(cuts[94], 2), "max": round(max(values), 2)}


def baseline(stack: LocalStack, integration: Integration, args: argparse.Namespace) -> list[float]:
    """The same kind of changes applied without Dagster (see the module docstring)."""
    assert stack.store is not None
    store = stack.store
    stack.stop_sensor(f"{CRM}_webhook_sensor")
    quo, settings = QuoResource(), QuoSettings.from_env(stack.env)  # as the stack's runs
    connector = open_connector(store, CRM, integration.id)
    client = quo.client(integration, store, settings)
    upserter = quo.upserter(client, integration, store, settings)

    def apply_waiting() -> bool:
        items = store.claim_webhooks(integration.id, 500, 600)
        if items:
            apply_changes(store, connector, client, upserter, items, "baseline")
            store.ack_webhooks([item.id for item in items])
        return bool(items)

    try:
        with stack.crm_people(integration.id) as people:
            changes = make_changes(people, args.changes, args.pace, random.Random(2), apply_waiting)
        with AdminClient(integration.settings["base_url"]) as simulator:
            deadline = time.monotonic() + 120
            # A delivery counts as sent once the receiver has stored it: then none is left.
            while not (simulator.deliveries()["pending"] == 0 and not apply_waiting()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the baseline's deliveries did not arrive")
        return latencies(stack, changes, timeout=30)
    finally:
        client.close()
        connector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=300, help="Pipedrive people at the start")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--pace", type=float, default=2.0, help="changes per second")
    parser.add_argument("--deliveries", type=int, default=20_000, help="receiver benchmark")
    parser.add_argument("--senders", type=int, default=8)
    args = parser.parse_args()
    command = "python " + shlex.join(sys.argv)
    print(f"machine: {machine()}\ncommand: {command}", flush=True)
    load = {"start": round(os.getloadavg()[0], 2)}

    receiver = receiver_throughput(args.deliveries, args.senders)
    print(f"receiver: {receiver['receiverDurablePerSecond']}/s, lost {receiver['lost']}")
    load["afterReceiver"] = round(os.getloadavg()[0], 2)

    with tempfile.TemporaryDirectory(prefix="quo-bench-ongoing-") as tmp:
        os.environ[SECRETS_DIR_ENV] = str(Path(tmp, "secrets"))
        with LocalStack(Path(tmp) / "home", quo_rate_limit=QUO_LIMIT) as stack:
            # The baseline runs the product's code here: the runs' secrets, here too.
            os.environ.update({k: v for k, v in stack.env.items() if k.startswith("QUO_SYNC_")})
            integration = stack.register_integration(
                "bench", CRM, args.records, {"polling": False}, webhooks=True
            )
            (process_id,) = stack.run_initial_sync(CRM, {"integration_id": integration.id})
            stack.wait_processes([process_id])
            with stack.crm_people(integration.id) as people:
                changes = make_changes(people, args.changes, args.pace, random.Random(1))
            stack.wait_webhooks_applied(integration)
            dagster = latencies(stack, changes, timeout=60)
            load["afterWebhooks"] = round(os.getloadavg()[0], 2)
            print(f"webhook -> Quo through Dagster: {quantiles(dagster)} s", flush=True)

            before = stack.quo.stats()["byApiKey"][stack.sandbox_key]["requests"]
            (cycle,), listing = stack.poll_cycle(integration.id)
            cycle_requests = stack.quo.stats()["byApiKey"][stack.sandbox_key]["requests"] - before
            unchanged = cycle.counters["unchanged"]
            print(
                f"polling cycle ({listing}): {cycle_requests} Quo requests, "
                f"{unchanged} people unchanged, {cycle.counters['synced']} synced"
            )
            bare = baseline(stack, integration, args)
            print(f"webhook -> Quo without Dagster: {quantiles(bare)} s", flush=True)
            exact = stack.differential(integration.id).result()
    load["end"] = round(os.getloadavg()[0], 2)
    dag, base = quantiles(dagster), quantiles(bare)
    bench = {
        "webhookToQuoP50Seconds": dag["p50"],
        "webhookToQuoP95Seconds": dag["p95"],
        "webhookToQuoMaxSeconds": dag["max"],
        "webhookChangesMeasured": len(dagster),
        "baselineP50Seconds": base["p50"],
        "baselineP95Seconds": base["p95"],
        "ratio": round(dag["p50"] / base["p50"], 2),
        "ratioIs": "webhookToQuoP50Seconds / the same changes applied by apply_changes in this "
        "process, claimed from the inbox as they arrive (no sensor, no run launch)",
        "meetsTargetP95": dag["p95"] <= TARGET_P95,
        "receiverDurablePerSecond": receiver["receiverDurablePerSecond"],
        "receiverLost": receiver["lost"],
        "receiverSenders": receiver["senders"],
        "receiverRatio": receiver["ratio"],
        "pollCycleRequestsPerUnchangedPerson": round(cycle_requests / max(unchanged, 1), 4),
        "pollCycleQuoRequests": cycle_requests,
        "pollCycleUnchanged": unchanged,
        "pollCycleListing": listing,
        "differentialAfter": exact,
        "records": args.records,
        "changes": args.changes,
        "pacePerSecond": args.pace,
        "quoRequestsPerSecondLimit": QUO_LIMIT,
        "command": command,
        "machine": machine(),
        "loadAverage1m": load,
    }
    print("BENCH " + json.dumps(bench, separators=(",", ":")))


if __name__ == "__main__":
    main()
