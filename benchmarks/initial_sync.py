"""Initial-sync benchmark: Dagster (webserver + daemon + ranged runs) against a plain loop doing
the same upsert work, and the request rate achieved against Quo's 10 req/s per-key limit.

Run:  python benchmarks/initial_sync.py [--records 10000] [--rate-records 2000]
Last line: BENCH <one-line JSON>. Absolute seconds depend on the machine (printed); the ratio is
the figure to compare, since both sides run here, in this run, against the same sandbox build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
import httpx

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.orchestration.sync import fetch_page_frame, frame_records, sync_records
from quo_sync_dagster.orchestration.tags import TAG_PEAK_RSS
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.store import open_store

UNLIMITED = 100_000.0  # governor rate when the sandbox limit is off, as LocalStack sets it
CONCURRENCY = 4  # QuoSettings' default requests in flight per page step
LIMIT = 10.0  # Quo's documented requests/s per API key


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    return (
        f"{platform.platform()}, {os.cpu_count()} cpu ({model}), Python {platform.python_version()}"
    )


def dagster_sync(
    home: Path, records: int, rate_limit: float | None, config: dict[str, Any]
) -> dict[str, Any]:
    """Launch the initial sync as the UI does; time it until every Process is COMPLETED."""
    with LocalStack(home, quo_rate_limit=rate_limit) as stack:
        stack.register_integration("bench", "scalingtest", records)
        started = time.monotonic()
        process_ids = stack.run_initial_sync("scalingtest", {"integration_id": "bench", **config})
        planning = stack.sandbox_stats()  # from here on the sandbox counts page-run requests only
        httpx.post(f"{stack.sandbox_url}/_sandbox/reset-stats").raise_for_status()
        processes = stack.wait_processes(process_ids)
        seconds = time.monotonic() - started
        states = [p.state for p in processes]
        assert states == [ProcessState.COMPLETED] * len(processes), states
        stats = stack.sandbox_stats()
        with dg.DagsterInstance.from_config(str(stack.dagster_home)) as instance:
            runs = instance.get_run_records(dg.RunsFilter(job_name="scalingtest_page_sync"))
            rss = [float(r.dagster_run.tags[TAG_PEAK_RSS]) for r in runs]
        return {
            "seconds": seconds,
            "planning": planning,
            "stats": stats,
            "synced": sum(p.counters["synced"] for p in processes),
            "peakRssMb": max(rss),
            "pageRuns": len(runs),
        }


def bare_loop(home: Path, records: int, page_size: int) -> dict[str, Any]:
    """The same fetch -> DataFrame -> transform -> upsert, page after page, without Dagster."""
    home.mkdir(parents=True)
    key = "bench-bare-key"
    argv = [sys.executable, "-m", "quo_sync_dagster.sandbox.quo_server"]
    argv += ["--data-dir", str(home / "quo"), "--port", "0", "--api-key", key, "--no-rate-limit"]
    sandbox = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert sandbox.stdout is not None
        url = sandbox.stdout.readline().decode().split()[1]
        store = open_store(f"sqlite:///{home}/store.sqlite")
        integration = Integration(
            "bare", "scalingtest", "env:-", url, settings={"records": records}
        )
        connector = connector_class("scalingtest")(integration)
        # The context the planned Process would carry.
        context = {"personObjectType": "MockPerson", "pageSize": page_size, "sortDesc": True}
        process = Process(
            "bare", "bare", "bare", "CRM_SYNC", ProcessState.PROCESSING_BATCHES, context
        )
        started = time.monotonic()
        synced = 0
        with QuoClient(url, key, RateGovernor(store, key, UNLIMITED)) as client:
            upserter = ContactUpserter(client, store, integration.id, CONCURRENCY)
            assume_absent = not client.has_contacts_from(connector.quo_source)
            for page in range(-(-records // page_size)):
                rows = frame_records(fetch_page_frame(connector, process, page))
                synced += sync_records(
                    connector, upserter, rows, "MockPerson", str(page), assume_absent
                ).synced
        return {"seconds": time.monotonic() - started, "synced": synced}
    finally:
        sandbox.terminate()
        sandbox.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--rate-records", type=int, default=2_000)
    args = parser.parse_args()
    page_size = connector_class("scalingtest").crm_config.sync_config.initial_batch_size
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="quo-bench-") as tmp:
        root = Path(tmp)
        dag = dagster_sync(root / "dagster", args.records, None, {})
        print(f"dagster: {args.records} people in {dag['seconds']:.1f} s, {dag['pageRuns']} runs")
        bare = bare_loop(root / "bare", args.records, page_size)
        print(f"bare loop: {args.records} people in {bare['seconds']:.1f} s")
        assert dag["synced"] == bare["synced"], (dag["synced"], bare["synced"])
        # ≥4 concurrent page runs against a sandbox limited like Quo.
        pages = -(-args.rate_records // 100)
        rated = dagster_sync(
            root / "rated",
            args.rate_records,
            LIMIT,
            {"page_size": 100, "pages_per_run": max(1, pages // 4)},
        )
    stats, planning = rated["stats"], rated["planning"]
    # The rate while the page runs send, from their first request to their last. Planning (one
    # probe request, then the sensor and run-launch latency) is reported separately.
    achieved = (stats["requests"] - 1) / (stats["lastRequestAt"] - stats["firstRequestAt"])
    requests = stats["requests"] + planning["requests"]
    end_to_end = (requests - 1) / (stats["lastRequestAt"] - planning["firstRequestAt"])
    rate429s = stats["rateLimited"] + planning["rateLimited"]
    creates = stats["byKind"]["create"] + planning["byKind"]["create"]
    print(
        f"rate: {stats['requests']} page-run requests at {achieved:.2f} req/s over "
        f"{rated['pageRuns']} runs ({end_to_end:.2f} req/s counting planning), {rate429s} x 429"
    )
    bench = {
        "dagsterSeconds": round(dag["seconds"], 2),
        "bareLoopSeconds": round(bare["seconds"], 2),
        "overheadRatio": round(dag["seconds"] / bare["seconds"], 3),
        "rateLimitFraction": round(achieved / LIMIT, 3),
        "rateLimitFractionEndToEnd": round(end_to_end / LIMIT, 3),
        "rate429s": rate429s,
        "rate429Share": round(rate429s / requests, 4),
        "requestsPerNewContact": round(requests / creates, 4),
        "pageRunPeakRssMb": max(dag["peakRssMb"], rated["peakRssMb"]),
        "records": args.records,
        "rateRecords": args.rate_records,
        "rateRuns": rated["pageRuns"],
    }
    print("BENCH " + json.dumps(bench, separators=(",", ":")))


if __name__ == "__main__":
    main()
