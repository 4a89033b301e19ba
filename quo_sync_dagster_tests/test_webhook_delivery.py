"""WebhookDelivery sends after the fact, in the background, and its faults do what they say,
checked against a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.sandbox import webhook_delivery
from quo_sync_dagster.sandbox.serving import SandboxServer
from quo_sync_dagster.sandbox.webhook_delivery import RETRIES, WebhookDelivery, delivery_routes


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST and answers it with the next of
    `statuses` (200 once they run out). While `gate` is clear, it holds every answer."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.statuses: deque[int] = deque()
        self.gate = threading.Event()
        self.gate.set()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.gate.wait(30)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._changed:
                    receiver.received.append(Received(self.path, headers, body, time.monotonic()))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver._changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        serve = self._server.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.05,), daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """The first `count` deliveries, once that many arrived (AssertionError otherwise)."""
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.received) >= count, timeout)
            assert arrived, f"{len(self.received)} of {count} deliveries arrived"
            return list(self.received[:count])

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()


def settled(sandbox: SandboxServer, timeout: float = 15.0) -> dict[str, Any]:
    """The sandbox's delivery counts once nothing is on its way (held ones excepted)."""
    deadline = time.monotonic() + timeout
    while (stats := sandbox.deliveries())["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats["pending"] == 0, stats
    return stats


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def delivery(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookDelivery]:
    monkeypatch.setattr(webhook_delivery, "RETRY_WAIT_SECONDS", 0.01)
    d = WebhookDelivery(seed=1)
    yield d
    d.close()


def send_numbered(delivery: WebhookDelivery, url: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        delivery.send(f"{url}/hook", json.dumps({"n": n}).encode(), {"X-N": str(n)})


def numbers(received: list[Received]) -> list[int]:
    return [r.json()["n"] for r in received]


def counts(delivery: WebhookDelivery) -> dict[str, int]:
    stats = delivery.stats()
    return {k: stats[k] for k in ("queued", "sent", "dropped", "duplicated", "failed")}


def test_delivers_body_and_headers_in_order(delivery: WebhookDelivery, receiver: Receiver) -> None:
    send_numbered(delivery, receiver.url, 5)
    got = receiver.wait_for(5)
    assert delivery.wait_idle()
    assert numbers(got) == [0, 1, 2, 3, 4]
    assert got[2].path == "/hook" and got[2].headers["x-n"] == "2"
    assert counts(delivery) == {"queued": 5, "sent": 5, "dropped": 0, "duplicated": 0, "failed": 0}


def test_send_does_not_wait_for_the_receiver(delivery: WebhookDelivery, receiver: Receiver) -> None:
    receiver.gate.clear()
    send_numbered(delivery, receiver.url, 3)  # would hang here if send waited
    assert delivery.stats()["pending"] == 3 and receiver.received == []
    receiver.gate.set()
    assert numbers(receiver.wait_for(3)) == [0, 1, 2]


def test_drop_loses_the_next_n(delivery: WebhookDelivery, receiver: Receiver) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(drop=2))
    send_numbered(delivery, receiver.url, 4)
    assert numbers(receiver.wait_for(2)) == [2, 3]
    assert delivery.wait_idle() and len(receiver.received) == 2
    assert counts(delivery) == {"queued": 4, "sent": 2, "dropped": 2, "duplicated": 0, "failed": 0}


def test_duplicate_sends_the_next_n_twice(delivery: WebhookDelivery, receiver: Receiver) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(duplicate=1))
    send_numbered(delivery, receiver.url, 2)
    assert numbers(receiver.wait_for(3)) == [0, 0, 1]
    assert delivery.wait_idle() and len(receiver.received) == 3
    assert counts(delivery) == {"queued": 2, "sent": 3, "dropped": 0, "duplicated": 1, "failed": 0}


def test_reorder_holds_the_next_n_then_sends_them_last_first(
    delivery: WebhookDelivery, receiver: Receiver
) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(reorder=3))
    send_numbered(delivery, receiver.url, 2)
    assert delivery.stats()["held"] == 2 and delivery.wait_idle()
    assert receiver.received == []
    send_numbered(delivery, receiver.url, 3, start=2)  # n=2 is the third: it releases them all
    assert numbers(receiver.wait_for(5)) == [2, 1, 0, 3, 4]
    assert delivery.stats()["held"] == 0


def test_switching_reorder_off_releases_what_is_held(
    delivery: WebhookDelivery, receiver: Receiver
) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(reorder=5))
    send_numbered(delivery, receiver.url, 2)
    delivery.set_faults(webhook_delivery.DeliveryFaults())
    assert numbers(receiver.wait_for(2)) == [1, 0]


def test_delay_holds_every_delivery(delivery: WebhookDelivery, receiver: Receiver) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(delay_seconds=0.4))
    sent_at = time.monotonic()
    send_numbered(delivery, receiver.url, 2)
    got = receiver.wait_for(2)
    assert got[0].at - sent_at >= 0.4 and got[1].at - got[0].at >= 0.4


@pytest.mark.parametrize(
    ("faults", "received", "expected"),
    [
        ({"drop_rate": 1.0}, 0, {"dropped": 4, "sent": 0}),
        ({"duplicate_rate": 1.0}, 8, {"duplicated": 4, "sent": 8}),
        ({"drop": 1, "duplicate": 1}, 4, {"dropped": 1, "duplicated": 1, "sent": 4}),
    ],
)
def test_rates_and_combinations(
    delivery: WebhookDelivery,
    receiver: Receiver,
    faults: dict[str, Any],
    received: int,
    expected: dict[str, int],
) -> None:
    delivery.set_faults(webhook_delivery.DeliveryFaults(**faults))
    send_numbered(delivery, receiver.url, 4)
    assert delivery.wait_idle()
    assert len(receiver.wait_for(received)) == received == len(receiver.received)
    assert {k: counts(delivery)[k] for k in expected} == expected


def test_a_5xx_is_retried_until_it_is_accepted(
    delivery: WebhookDelivery, receiver: Receiver
) -> None:
    receiver.statuses.extend([500, 503])
    send_numbered(delivery, receiver.url, 1)
    got = receiver.wait_for(3)
    assert delivery.wait_idle()
    assert [r.body for r in got] == [got[0].body] * 3 and len(receiver.received) == 3
    assert counts(delivery)["sent"] == 1 and counts(delivery)["failed"] == 0


def test_a_receiver_that_keeps_failing_is_given_up(
    delivery: WebhookDelivery, receiver: Receiver
) -> None:
    receiver.statuses.extend([500] * (RETRIES + 1))
    send_numbered(delivery, receiver.url, 2)
    receiver.wait_for(RETRIES + 2)  # every try of the first, then the second
    assert delivery.wait_idle()
    assert len(receiver.received) == RETRIES + 2
    assert counts(delivery)["failed"] == 1 and counts(delivery)["sent"] == 1


@pytest.mark.parametrize("status", [400, 401, 302])
def test_a_refusal_or_redirect_is_not_retried_nor_counted_sent(
    delivery: WebhookDelivery, receiver: Receiver, status: int
) -> None:
    receiver.statuses.append(status)
    send_numbered(delivery, receiver.url, 2)
    assert numbers(receiver.wait_for(2)) == [0, 1]
    assert delivery.wait_idle() and len(receiver.received) == 2
    assert counts(delivery)["failed"] == 1 and counts(delivery)["sent"] == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/hook", "https://hooks.example.com:x/hook"])
def test_an_unreachable_or_malformed_url_fails_alone(
    delivery: WebhookDelivery, receiver: Receiver, url: str
) -> None:
    delivery.send(url, b"{}", {})
    send_numbered(delivery, receiver.url, 1)  # the sender lives on
    assert numbers(receiver.wait_for(1)) == [0]
    assert delivery.wait_idle()
    assert counts(delivery)["failed"] == 1 and counts(delivery)["sent"] == 1


# ---- the admin routes, over HTTP ------------------------------------------------------------
class DeliveryOnly(SandboxServer):
    """Just a WebhookDelivery and its routes (plus the stats route start() probes)."""

    name = "Delivery"

    def _create_state(self) -> WebhookDelivery:
        return WebhookDelivery()

    def _create_app(self, state: WebhookDelivery) -> Starlette:
        async def stats(request: Request) -> Response:
            return JSONResponse(state.stats())

        app = Starlette(routes=[Route("/_sandbox/stats", stats), *delivery_routes("hooks")])
        app.state.hooks = state
        return app

    def _close_state(self, state: WebhookDelivery) -> None:
        state.close()

    def send(self, url: str, count: int) -> None:
        send_numbered(self._state, url, count)


@pytest.fixture
def server() -> Iterator[DeliveryOnly]:
    with DeliveryOnly() as s:
        yield s


def test_faults_are_set_and_counted_over_http(server: DeliveryOnly, receiver: Receiver) -> None:
    answer = server.webhook_faults(drop=1, delay_seconds=0.05, duplicate_rate=0.0)
    assert answer == {
        "drop": 1,
        "duplicate": 0,
        "reorder": 0,
        "delaySeconds": 0.05,
        "dropRate": 0,
        "duplicateRate": 0.0,
    }
    server.send(receiver.url, 3)
    assert numbers(receiver.wait_for(2)) == [1, 2]
    stats = settled(server)
    assert (stats["queued"], stats["dropped"], stats["sent"]) == (3, 1, 2)
    assert stats["faults"]["drop"] == 0  # used up
    server.webhook_faults()  # an empty object clears them
    assert server.deliveries()["faults"]["delaySeconds"] == 0


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        "null",
        "{not json",
        '{"loss": 1}',
        '{"drop": -1}',
        '{"drop": 1.5}',
        '{"drop": true}',
        '{"reorder": "2"}',
        '{"dropRate": 1.5}',
        '{"delaySeconds": -1}',
        '{"delaySeconds": Infinity}',
        '{"dropRate": NaN}',
    ],
)
def test_bad_faults_are_400_and_change_nothing(server: DeliveryOnly, body: str) -> None:
    server.webhook_faults(drop=2)
    assert server._admin_http is not None
    response = server._admin_http.post("/_sandbox/webhook-faults", content=body)
    assert response.status_code == 400 and response.json()["message"]
    assert server.deliveries()["faults"]["drop"] == 2
