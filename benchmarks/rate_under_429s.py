"""Rate under 429s: the Quo client, the shared rate governor and the upsert create contacts over
real HTTP (127.0.0.1) in a Quo sandbox limited to `--limit` req/s, once without faults and once
with a share of the requests (default 20%, at random) answered 429 with a Retry-After.

Run:  python benchmarks/rate_under_429s.py [--contacts 600] [--limit 20] [--share-429 0.2]
                                            [--retry-after 1] [--concurrency 8] [--seed 429]
Last line: BENCH <one-line JSON>. Both runs happen in this invocation on this machine; each gets
a fresh sandbox process and a fresh store.

`--concurrency` is the requests in flight against the key: QuoSettings lets each page run have 4
in flight and several page runs share one key, so the default 8 is two page runs.

`ratio` (the figure to compare with the 0.8 target) is `requestRatio`: every request the key
sent, 429s included, less the first, per second of the upsert (client clock, first request to
last answer), ÷ the limit: how much of the limit the governor used. `acceptedRatio` counts only
the 2xx answers; with 20% of the requests refused it is ~0.8 times `requestRatio` at best.
The governor honours each Retry-After for the request it answered only: `earlyRetries` counts
retries sent before their own Retry-After had passed (0 when every one is honoured).
`keyWidePauseCeiling` is, for reference, the best `acceptedRatio` a governor pausing the whole
key for every Retry-After could reach with the same counts (each accepted request one 1/limit
slot, each 429 its Retry-After, or one slot if shorter). `loadAverage`: os.getloadavg() before
and after the run (other work on the machine slows the client, never speeds it up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from quo_sync_dagster.core.models import LabeledValue, QuoContact, UpsertAction
from quo_sync_dagster.core.ratelimit import retry_at
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.store import open_store

CONCURRENCY = 8  # QuoSettings' default 4 in flight per page run, two page runs on one key
TARGET = 0.8  # of the limit, in requests/s: the figure under 20% injected 429s
MAX_ATTEMPTS = 12  # 6 (the client's default) fails ~1 create in 3,000 when 20% are refused
KEY = "bench-429-key"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu": model or platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


class RecordingGovernor(RateGovernor):
    """The real governor, noting each retry after a rate limit: (its own retry time, when it
    was let go), both on the governor's (wall) clock, and each 429's Retry-After."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retries: list[tuple[float, float]] = []
        self.retry_afters: list[float | None] = []

    def acquire(self, not_before: float | None = None) -> None:
        super().acquire(not_before)
        if not_before is not None:
            self.retries.append((not_before, time.time()))

    def on_rate_limited(self, retry_after: float | None) -> float:
        self.retry_afters.append(retry_after)
        return super().on_rate_limited(retry_after)


def contacts(n: int, source: str) -> list[QuoContact]:
    return [
        QuoContact(
            external_id=f"{source}-{i:05d}",
            source=source,
            first_name=f"Person{i}",
            last_name="Bench",
            emails=(LabeledValue("email", f"p{i}@example.com"),),
            phone_numbers=(LabeledValue("mobile", f"+1212555{i % 10000:04d}"),),
        )
        for i in range(n)
    ]


def fault_runs(rng: random.Random, entries: int, share: float) -> list[tuple[bool, int]]:
    """`entries` answers in arrival order, round(share * entries) of them 429s at random
    places, as runs of (is_429, length)."""
    hits = [True] * round(share * entries) + [False] * (entries - round(share * entries))
    rng.shuffle(hits)
    runs: list[tuple[bool, int]] = []
    for hit in hits:
        if runs and runs[-1][0] == hit:
            runs[-1] = (hit, runs[-1][1] + 1)
        else:
            runs.append((hit, 1))
    return runs


def queue_faults(admin: httpx.Client, runs: list[tuple[bool, int]], retry_after: str) -> None:
    """The sandbox's fault queue answers requests in order: a 429 fault for a 429 run, and a
    pass-through fault (served normally after a 1 µs delay) for the requests in between."""
    header = None if retry_after == "none" else retry_after
    for hit, length in runs:
        if hit:
            fault = {"status": 429, "count": length, "retryAfter": header}
        else:
            fault = {"status": None, "count": length, "delaySeconds": 1e-6}
        admin.post("/_sandbox/faults", json=fault).raise_for_status()


def run(home: Path, args: argparse.Namespace, share: float) -> dict[str, Any]:
    """Create `args.contacts` contacts through the upsert; the sandbox's own limit is the
    governor's, so any 429 beyond the injected ones would be the governor's fault."""
    home.mkdir(parents=True)
    argv = [sys.executable, "-m", "quo_sync_dagster.sandbox.quo_server"]
    argv += ["--data-dir", str(home / "quo"), "--port", "0", "--api-key", KEY]
    argv += ["--rate-limit", str(args.limit)]
    sandbox = subprocess.Popen(argv, stdout=subprocess.PIPE)
    store = open_store(f"sqlite:///{home}/store.sqlite")
    try:
        assert sandbox.stdout is not None
        url = sandbox.stdout.readline().decode().split()[1]
        admin = httpx.Client(base_url=url, timeout=10.0)
        # Enough entries for twice the requests expected; counted below as consumed or not.
        entries = math.ceil(2 * args.contacts / (1 - share)) + 100 if share else 0
        runs = fault_runs(random.Random(args.seed), entries, share)
        queue_faults(admin, runs, args.retry_after)
        governor = RecordingGovernor(store, KEY, args.limit)
        people = contacts(args.contacts, "bench429")
        load_before = os.getloadavg()
        with QuoClient(url, KEY, governor, max_attempts=MAX_ATTEMPTS) as client:
            upserter = ContactUpserter(client, store, "bench", args.concurrency)
            started = time.monotonic()
            outcomes = upserter.upsert(people, assume_absent=True)
            ended = time.monotonic()
        load_after = os.getloadavg()
        stats = admin.get("/_sandbox/stats").json()
        admin.close()
    finally:
        store.close()
        sandbox.terminate()
        sandbox.wait()
    assert all(o.action is UpsertAction.CREATED for o in outcomes), outcomes
    assert stats["contacts"] == args.contacts and stats["duplicateExternalIds"] == 0, stats
    consumed = entries - stats["pendingFaults"]
    injected, seen = 0, 0
    for hit, length in runs:
        take = min(length, consumed - seen)
        injected += take if hit else 0
        seen += take
    assert stats["pendingFaults"] > 0 or not share, "the fault queue ran out: raise `entries`"
    seconds = ended - started
    requests, rejected = stats["requests"], stats["rateLimited"]
    accepted = sum(n for status, n in stats["byStatus"].items() if status.startswith("2"))
    # n requests in a row span n - 1 intervals: the first is sent at once, the last answered.
    request_rate = (requests - 1) / seconds
    accepted_rate = (accepted - 1) / seconds
    interval = 1 / args.limit
    pauses = [retry_at(0.0, ra) for ra in governor.retry_afters]
    key_wide_seconds = accepted * interval + sum(max(p, interval) for p in pauses)
    return {
        "requests": requests,
        "accepted": accepted,
        "rate429s": rejected,
        "injected429s": injected,
        "share429": round(rejected / requests, 4),
        "seconds": round(seconds, 2),
        "requestRate": round(request_rate, 3),
        "acceptedRate": round(accepted_rate, 3),
        "requestRatio": round(request_rate / args.limit, 3),
        "acceptedRatio": round(accepted_rate / args.limit, 3),
        "retries": len(governor.retries),
        # 1 ms of slack: time.sleep counts on the monotonic clock, the governor on the wall one.
        "earlyRetries": sum(1 for due, sent in governor.retries if sent < due - 0.001),
        "keyWidePauseCeiling": round(accepted / key_wide_seconds / args.limit, 3),
        "loadAverage": [round(x, 2) for x in (*load_before, *load_after)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=600)
    parser.add_argument("--limit", type=float, default=20.0, help="req/s: sandbox and governor")
    parser.add_argument("--share-429", type=float, default=0.2, help="share of requests 429'd")
    parser.add_argument(
        "--retry-after", default="1", help="the 429s' Retry-After header value, or 'none'"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help="requests in flight against the key (QuoSettings: 4 per page run)",
    )
    parser.add_argument("--seed", type=int, default=429, help="seed of the random 429s")
    args = parser.parse_args()
    if not 0 < args.share_429 < 1:
        parser.error("--share-429 must be between 0 and 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    command = shlex.join(["python", *sys.argv])
    print(f"machine: {machine()}")
    print(f"command: {command}")
    with tempfile.TemporaryDirectory(prefix="quo-bench-429-") as tmp:
        base = run(Path(tmp) / "baseline", args, 0.0)
        print(f"baseline: {base}")
        under = run(Path(tmp) / "under429s", args, args.share_429)
        print(f"under 429s: {under}")
    bench = {
        "command": command,
        "machine": machine(),
        "limit": args.limit,
        "contacts": args.contacts,
        "concurrency": args.concurrency,
        "share429": args.share_429,
        "retryAfter": args.retry_after,
        "baseline": base,
        "under429s": under,
        "ratio": under["requestRatio"],
        "ratioIs": "under429s.requestRatio: requests/s incl. 429s / limit",
        "target": TARGET,
        "meetsTarget": under["requestRatio"] >= TARGET,
        "acceptedRatio": under["acceptedRatio"],
        "baselineRatio": base["requestRatio"],
        "loadAverage1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"ratio = {bench['ratio']} (requests/s incl. 429s / limit, target >= {TARGET}); "
        f"acceptedRatio = {bench['acceptedRatio']}; baseline ratio = {bench['baselineRatio']}; "
        f"concurrency = {args.concurrency}; load average = {under['loadAverage']}"
    )
    print("BENCH " + json.dumps(bench, separators=(",", ":")))


if __name__ == "__main__":
    main()
