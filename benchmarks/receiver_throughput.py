"""Receiver throughput: verified deliveries durably stored per second, from concurrent senders.

`quo-sync receiver` runs as its own process on a fresh SQLite store holding one subscribed
Pipedrive, Zoho and Attio integration. `--senders` keep-alive connections (default 8) post
`--deliveries` distinct deliveries, a third per CRM, each in its CRM's documented shape and
signed as it signs (Basic auth, channel token, Attio-Signature HMAC). A delivery counts when its
answer is 200 "enqueued" (the receiver answers only after the inbox committed it); `lost` is
those answers minus the rows then found in the store's inbox, and must be 0.
The baseline, in the same run with the same senders and deliveries, is a bare Starlette app on
the same uvicorn settings that keeps each body in a list, unverified and in memory: `ratio` is
receiver / baseline, the share of the bare server's rate that verification and storing leave.

Run:  python benchmarks/receiver_throughput.py [--deliveries 20000] [--senders 8]
Last line: BENCH <one-line JSON>.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rate_under_429s import machine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.secrets import store_secret
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.webhooks.app import ReceiverServer

TARGET = 1000.0  # deliveries/s, the figure
WARMUP = 300  # deliveries before the clock starts (connections, caches, SQLite pages)
PD_TOKEN_ENV = "QUO_BENCH_PD_TOKEN"
CHANNEL = "1000000068001"
PEOPLE_OBJECT_ID = "97052eb9-e65e-443f-a297-f2d9a4a7f795"  # as Attio's docs (and the sandbox)


def _subscription(crm: str, secret_ref: str | None, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "crm": crm,
        "receiverUrl": "http://127.0.0.1/",
        "createdAt": datetime.now(UTC).isoformat(),
        "expiresAt": None,
        "secretRef": secret_ref,
        "details": details,
    }


def subscribe(store: Store) -> dict[str, str]:
    """Three subscribed integrations; returns the secrets the senders sign with."""
    secrets = {"pd": "pd-bench-token", "zoho": "zoho-bench-token", "attio": "attio-bench-secret"}
    os.environ[PD_TOKEN_ENV] = secrets["pd"]  # the receiver process inherits it
    for iid, crm in (("pd", "pipedrive"), ("zoho", "zoho"), ("attio", "attio")):
        ref = f"env:{PD_TOKEN_ENV}" if crm == "pipedrive" else None
        store.upsert_integration(Integration(iid, crm, "env:UNUSED", crm_credential_ref=ref))
    store.put_webhook_subscription("pd", _subscription("pipedrive", None, {}))
    zoho_ref = store_secret("bench/zoho", secrets["zoho"])
    store.put_webhook_subscription("zoho", _subscription("zoho", zoho_ref, {"channel_id": CHANNEL}))
    attio_ref = store_secret("bench/attio", secrets["attio"])
    details = {"peopleObjectId": PEOPLE_OBJECT_ID}
    store.put_webhook_subscription("attio", _subscription("attio", attio_ref, details))
    pd = connector_class("pipedrive")(Integration("pd", "pipedrive", "env:UNUSED"), secrets["pd"])
    return {**secrets, "pdPassword": pd.webhook_basic_auth()[1]}


def deliveries(count: int, secrets: dict[str, str]) -> list[tuple[str, bytes, dict[str, str]]]:
    """(path, body, headers) of `count` distinct deliveries, one CRM after the other."""
    now = datetime.now(UTC)
    basic = base64.b64encode(f"quo-sync:{secrets['pdPassword']}".encode()).decode()
    made = []
    for i in range(count):
        person = str(10_000 + i)
        if i % 3 == 0:
            meta = {
                "action": "change",
                "entity": "person",
                "entity_id": person,
                "id": str(uuid.uuid4()),
                "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "version": "2.0",
            }
            body = json.dumps({"meta": meta, "data": {"id": int(person)}, "previous": None})
            made.append(("pipedrive/pd", body.encode(), {"Authorization": f"Basic {basic}"}))
        elif i % 3 == 1:
            callback = {
                "server_time": int(now.timestamp() * 1000),
                "module": "Contacts",
                "ids": [person],
                "operation": "update",
                "channel_id": CHANNEL,
                "token": secrets["zoho"],
            }
            made.append(("zoho/zoho", json.dumps(callback).encode(), {}))
        else:
            ids = {"workspace_id": "ws", "object_id": PEOPLE_OBJECT_ID, "record_id": person}
            event = {"event_type": "record.updated", "id": ids}
            raw = json.dumps({"webhook_id": "wh", "events": [event]}).encode()
            signature = hmac.new(secrets["attio"].encode(), raw, hashlib.sha256).hexdigest()
            headers = {"Attio-Signature": signature, "Idempotency-Key": str(uuid.uuid4())}
            made.append(("attio/attio", raw, headers))
    return made


def _request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST /webhooks/crm/{path} HTTP/1.1", f"Host: {host}"]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _sender(host: str, port: int, requests: list[bytes], answers: Counter[str]) -> None:
    """One keep-alive connection, one request at a time (as a CRM's delivery worker)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for raw in requests:
            writer.write(raw)
            status = (await reader.readline()).split()[1].decode()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            answers[status + (":enqueued" if b'"enqueued"' in body else "")] += 1
    finally:
        writer.close()


def send(
    url: str, made: list[tuple[str, bytes, dict[str, str]]], senders: int
) -> tuple[float, Counter[str]]:
    """Post `made` over `senders` connections; (seconds, answer counts)."""
    host, port = url.removeprefix("http://").split(":")
    requests = [_request(host, *d) for d in made]
    answers: Counter[str] = Counter()

    async def run() -> float:
        started = time.perf_counter()
        shares = [requests[i::senders] for i in range(senders)]
        await asyncio.gather(*(_sender(host, int(port), s, answers) for s in shares))
        return time.perf_counter() - started

    return asyncio.run(run()), answers


def serve(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(("RECEIVER_READY", "BASELINE_READY")):
        process.kill()
        raise RuntimeError(f"{argv} did not start: {line!r}")
    return process, line.split()[1]


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(timeout=30)


def measure(url: str, made: list, senders: int) -> dict[str, Any]:
    send(url, made[:WARMUP], senders)
    seconds, answers = send(url, made[WARMUP:], senders)
    timed = len(made) - WARMUP
    return {
        "seconds": round(seconds, 3),
        "perSecond": round(timed / seconds, 1),
        "answers": answers,
    }


def baseline_server() -> None:
    """The baseline: accept any POST body into a list, no verification, no store."""
    kept: list[bytes] = []

    async def accept(request: Request) -> Response:
        kept.append(await request.body())
        return JSONResponse({"status": "enqueued"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [Route("/webhooks/crm/{crm}/{integration_id}", accept, methods=["POST"])]
    app = Starlette(routes=[*routes, Route("/healthz", healthz)])
    with ReceiverServer(app) as server:
        print(f"BASELINE_READY {server.url}", flush=True)
        while True:  # until the benchmark terminates us
            time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server()
        return
    command = "python " + shlex.join(sys.argv)
    print(f"machine: {machine()}\ncommand: {command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="quo-bench-receiver-") as tmp:
        os.environ["QUO_SYNC_SECRETS_DIR"] = str(Path(tmp, "secrets"))
        uri = f"sqlite:///{tmp}/store.sqlite"
        store = open_store(uri)
        secrets = subscribe(store)
        made = deliveries(args.deliveries + WARMUP, secrets)
        env = {**os.environ, "QUO_SYNC_STORE_URI": uri}
        receiver, url = serve(
            [sys.executable, "-m", "quo_sync_dagster", "receiver", "--port", "0"], env
        )
        try:
            got = measure(url, made, args.senders)
        finally:
            stop(receiver)
        stored = sum(
            len(store.claim_webhooks(iid, len(made) + 1, lease_seconds=0))
            for iid in ("pd", "zoho", "attio")
        )
        store.close()
        baseline, url = serve([sys.executable, __file__, "--baseline-server"], env)
        try:
            base = measure(url, made, args.senders)
        finally:
            stop(baseline)
    enqueued = got["answers"]["200:enqueued"] + WARMUP  # warm-up deliveries are stored too
    lost = enqueued - stored
    rate = got["perSecond"]
    print(
        f"receiver: {args.deliveries} deliveries in {got['seconds']} s = {rate}/s "
        f"(answers {dict(got['answers'])}, stored {stored}, lost {lost}); "
        f"bare baseline {base['perSecond']}/s"
    )
    bench = {
        "receiverDurablePerSecond": rate,
        "lost": lost,
        "deliveries": args.deliveries,
        "senders": args.senders,
        "answers": dict(got["answers"]),
        "storedInInbox": stored,
        "baselinePerSecond": base["perSecond"],
        "ratio": round(rate / base["perSecond"], 3),
        "ratioIs": "receiverDurablePerSecond / bare unverified in-memory Starlette on uvicorn",
        "target": TARGET,
        "meetsTarget": rate >= TARGET and lost == 0,
        "command": command,
        "machine": machine(),
        "loadAverage1m": round(os.getloadavg()[0], 2),
    }
    print("BENCH " + json.dumps(bench, separators=(",", ":")))


if __name__ == "__main__":
    main()
