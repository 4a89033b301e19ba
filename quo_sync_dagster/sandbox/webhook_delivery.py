"""How a simulator delivers its webhooks: after the change, in the background, with faults.

A CRM sends a webhook after the API call that changed a person has answered, and retries a
delivery its receiver did not accept. `WebhookDelivery` does the same from one background
thread, and can be told (`POST /_sandbox/webhook-faults`) to lose, duplicate, delay or reorder
deliveries, so tests and the demo can check that nothing depends on every delivery arriving once
and in order. `GET /_sandbox/deliveries` says what happened to each.
"""

from __future__ import annotations

import json
import math
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.sandbox.serving import camel

RETRIES = 3  # further tries of a delivery answered with 5xx or not answered
RETRY_WAIT_SECONDS = 0.5


@dataclass
class DeliveryFaults:
    drop: int = 0  # the next n deliveries are lost
    duplicate: int = 0  # the next n deliveries are sent twice
    reorder: int = 0  # the next n deliveries are held, then sent last first
    delay_seconds: float = 0.0  # every delivery waits this long before it is sent
    drop_rate: float = 0.0  # besides `drop`: each delivery is lost with this probability
    duplicate_rate: float = 0.0  # each delivery is sent twice with this probability

    @classmethod
    def from_json(cls, spec: Any) -> DeliveryFaults:
        """From camelCase JSON (`dropRate`); ValueError names what is wrong."""
        if not isinstance(spec, dict):
            raise ValueError("webhook faults are a JSON object")
        names = {camel(f.name): f.name for f in fields(cls)}
        if unknown := sorted(set(spec) - set(names)):
            raise ValueError(f"unknown webhook faults {unknown}; known: {sorted(names)}")
        faults = cls(**{names[key]: value for key, value in spec.items()})
        for name in ("drop", "duplicate", "reorder"):
            value = getattr(faults, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{camel(name)} must be an integer >= 0")
        for name in ("delay_seconds", "drop_rate", "duplicate_rate"):
            value = getattr(faults, name)
            # JSON parsing lets NaN and Infinity through; an infinite delay would end the sender.
            bad_type = not isinstance(value, int | float) or isinstance(value, bool)
            if bad_type or not math.isfinite(value) or value < 0:
                raise ValueError(f"{camel(name)} must be a finite number >= 0")
        if faults.drop_rate > 1 or faults.duplicate_rate > 1:
            raise ValueError("dropRate and duplicateRate are probabilities (0-1)")
        return faults

    def to_json(self) -> dict[str, Any]:
        return {camel(name): value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class _Delivery:
    url: str
    body: bytes
    headers: dict[str, str]


class WebhookDelivery:
    """Queues deliveries and sends them from one background thread, in order unless faults
    say otherwise. `send` never blocks the API request that caused the change."""

    def __init__(self, seed: int = 0) -> None:
        self.faults = DeliveryFaults()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Delivery | None] = queue.Queue()
        self._held: list[_Delivery] = []
        self._counts = {"queued": 0, "sent": 0, "dropped": 0, "duplicated": 0, "failed": 0}
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="webhook-delivery", daemon=True)
        self._thread.start()

    def send(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        """Deliver `body` to `url` (after the faults have had their say)."""
        delivery = _Delivery(url, body, dict(headers))
        with self._lock:
            self._counts["queued"] += 1
            faults = self.faults
            if faults.drop or self._random.random() < faults.drop_rate:
                faults.drop = max(faults.drop - 1, 0)
                self._counts["dropped"] += 1
                return
            copies = 1
            if faults.duplicate or self._random.random() < faults.duplicate_rate:
                faults.duplicate = max(faults.duplicate - 1, 0)
                self._counts["duplicated"] += 1
                copies = 2
            if faults.reorder:
                faults.reorder -= 1
                self._held.extend([delivery] * copies)
                if faults.reorder == 0:
                    released, self._held = self._held[::-1], []
                    self._enqueue(released)
                return
            self._enqueue([delivery] * copies)

    def _enqueue(self, deliveries: list[_Delivery]) -> None:
        self._busy += len(deliveries)
        for delivery in deliveries:
            self._queue.put(delivery)

    def set_faults(self, faults: DeliveryFaults) -> None:
        with self._lock:
            self.faults = faults
            if not faults.reorder and self._held:  # reordering switched off: release what waits
                released, self._held = self._held[::-1], []
                self._enqueue(released)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._counts,
                "pending": self._busy,
                "held": len(self._held),
                "faults": self.faults.to_json(),
            }

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once every queued delivery was sent or given up (held ones excepted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy == 0:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while (delivery := self._queue.get()) is not None:
                if self.faults.delay_seconds:
                    time.sleep(self.faults.delay_seconds)
                outcome = "failed"
                for attempt in range(RETRIES + 1):
                    try:
                        status = client.post(
                            delivery.url, content=delivery.body, headers=delivery.headers
                        ).status_code
                    except httpx.InvalidURL:
                        break  # no try can reach it; the sender must live on for the others
                    except httpx.HTTPError:
                        status = None
                    if status is not None and status < 500:
                        # A 4xx is the receiver refusing this delivery: a CRM does not retry it.
                        # Only a 2xx is delivered: a redirect is not followed (nor is it by CRMs).
                        outcome = "sent" if 200 <= status < 300 else "failed"
                        break
                    if attempt < RETRIES:
                        time.sleep(RETRY_WAIT_SECONDS * (attempt + 1))
                with self._lock:
                    self._counts[outcome] += 1
                    self._busy -= 1


def delivery_routes(attr: str = "delivery") -> list[Route]:
    """`POST /_sandbox/webhook-faults` (camelCase DeliveryFaults; they replace the current
    ones) and `GET /_sandbox/deliveries` on the WebhookDelivery at `app.state.<attr>`."""

    def delivery_of(request: Request) -> WebhookDelivery:
        return getattr(request.app.state, attr)

    async def set_faults(request: Request) -> Response:
        try:
            faults = DeliveryFaults.from_json(json.loads(await request.body() or b"{}"))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"message": str(exc)}, status_code=400)
        delivery_of(request).set_faults(faults)
        return JSONResponse(faults.to_json())

    async def deliveries(request: Request) -> Response:
        return JSONResponse(delivery_of(request).stats())

    return [
        Route("/_sandbox/webhook-faults", set_faults, methods=["POST"]),
        Route("/_sandbox/deliveries", deliveries, methods=["GET"]),
    ]
