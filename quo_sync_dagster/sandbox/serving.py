"""What every simulator shares: running in-process on 127.0.0.1, the admin client (also of a
simulator running as its own process, by URL), the CLI loop.

A simulator subclasses `SandboxServer`, saying how to create its state and its Starlette app
(and, if the state holds resources, how to close it); its `main()` ends with
`serve_until_signalled(sandbox, "..._READY")`.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.background_server import BackgroundServer


@dataclass
class Fault:
    status: int | None
    remaining: int
    retry_after: str | None
    delay: float
    kinds: frozenset[str] | None = None  # only requests of these kinds (None: any request)
    after_write: bool = False  # serve the request (a create is written), then fail its answer
    drop: bool = False  # close the connection instead of answering


class FaultQueue:
    """Injected faults, served in order; a fault with `count` n answers the next n requests
    (of its kinds, if it names any)."""

    def __init__(self) -> None:
        self._faults: deque[Fault] = deque()

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, kind: str | None = None) -> Fault | None:
        """The fault for the next request, of `kind` (None: serve it normally). A fault for
        other kinds neither answers this request nor holds back the faults behind it."""
        for index, fault in enumerate(self._faults):
            if fault.kinds is None or kind in fault.kinds:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[index]
                return fault
        return None

    @property
    def pending(self) -> int:
        return sum(f.remaining for f in self._faults)


def admin_routes(
    fault_statuses: Collection[int],
    *,
    state_attr: str = "sandbox",
    reset_stats: bool = True,
    retry_after: bool = True,
    fault_kinds: Collection[str] = (),
    write_faults: bool = False,
    settings: Collection[str] = (),
) -> list[Route]:
    """`GET /_sandbox/stats`, `POST /_sandbox/reset-stats` (if `reset_stats`),
    `POST|DELETE /_sandbox/faults` and, with `settings`, `GET|POST /_sandbox/settings`, on the
    state at `request.app.state.<state_attr>`.

    The state has `stats()`, `faults: FaultQueue`, with `reset_stats` a `reset_stats()`, and with
    `settings` those boolean attributes (snake_case; camelCase in the JSON).
    Without `retry_after` a fault's `retryAfter` is ignored (the API sends no Retry-After).
    With `fault_kinds` a fault may name the request kinds it answers (`kinds`); with
    `write_faults` it may be `afterWrite` (the request is served, then its answer fails: the
    client cannot know whether it was written) and `drop` the connection instead of answering.
    """
    statuses = sorted(fault_statuses)
    known_kinds = frozenset(fault_kinds)
    setting_names = {camel(name): name for name in settings}

    def state_of(request: Request) -> Any:
        return getattr(request.app.state, state_attr)

    async def stats(request: Request) -> Response:
        return JSONResponse(state_of(request).stats())

    async def reset(request: Request) -> Response:
        state_of(request).reset_stats()
        return Response(status_code=204)

    async def faults(request: Request) -> Response:
        queue: FaultQueue = state_of(request).faults
        if request.method == "DELETE":
            queue.clear()
            return Response(status_code=204)
        try:
            spec = json.loads(await request.body())
            status, delay = spec.get("status"), float(spec.get("delaySeconds") or 0)
            count = int(spec.get("count", 1))
            after = spec.get("retryAfter") if retry_after else None
            kinds, after_write, drop = _write_fault_options(spec, known_kinds, write_faults)
            if (status is None and not delay and not drop) or (
                status is not None and status not in statuses
            ):
                raise ValueError(
                    f"status must be one of {statuses} or delaySeconds > 0"
                    + (" or drop true" if write_faults else "")
                )
            if drop and status is not None:
                raise ValueError("a dropped connection has no status")
            if not retry_after and (count < 1 or delay < 0):
                raise ValueError("count >= 1, delaySeconds >= 0")
            if count < 1 or delay < 0 or not isinstance(after, str | None):
                raise ValueError("count >= 1, delaySeconds >= 0, retryAfter string or null")
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"message": str(exc)}, status_code=400)
        queue.add(Fault(status, count, after, delay, kinds, after_write, drop))
        return JSONResponse({"pendingFaults": queue.pending})

    async def settings_handler(request: Request) -> Response:
        state = state_of(request)
        if request.method == "POST":
            try:
                spec = json.loads(await request.body())
                if not isinstance(spec, dict) or not spec:
                    raise ValueError("a JSON object of settings")
                for key, value in spec.items():
                    if key not in setting_names or not isinstance(value, bool):
                        raise ValueError(f"settings are booleans among {sorted(setting_names)}")
            except ValueError as exc:
                return JSONResponse({"message": str(exc)}, status_code=400)
            for key, value in spec.items():
                setattr(state, setting_names[key], value)
        return JSONResponse({key: getattr(state, name) for key, name in setting_names.items()})

    routes = [Route("/_sandbox/stats", stats, methods=["GET"])]
    if reset_stats:
        routes.append(Route("/_sandbox/reset-stats", reset, methods=["POST"]))
    routes.append(Route("/_sandbox/faults", faults, methods=["POST", "DELETE"]))
    if setting_names:
        routes.append(Route("/_sandbox/settings", settings_handler, methods=["GET", "POST"]))
    return routes


def camel(name: str) -> str:
    """snake_case -> camelCase, for admin JSON."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _write_fault_options(
    spec: dict[str, Any], known_kinds: frozenset[str], write_faults: bool
) -> tuple[frozenset[str] | None, bool, bool]:
    """A fault's `kinds`, `afterWrite` and `drop`, refused where the simulator has none."""
    kinds = spec.get("kinds")
    if kinds is not None:
        if not known_kinds:
            raise ValueError("this simulator's faults take no kinds")
        if not isinstance(kinds, list) or not kinds or not set(kinds) <= known_kinds:
            raise ValueError(f"kinds must be a non-empty list among {sorted(known_kinds)}")
        kinds = frozenset(kinds)
    after_write, drop = spec.get("afterWrite", False), spec.get("drop", False)
    if not isinstance(after_write, bool) or not isinstance(drop, bool):
        raise ValueError("afterWrite and drop are booleans")
    if (after_write or drop) and not write_faults:
        raise ValueError("this simulator's faults take no afterWrite nor drop")
    return kinds, after_write, drop


class AdminClient:
    """The admin API (`/_sandbox/...`) of a simulator at `url`: its own process (as `quo-sync
    demo` and the end-to-end tests run them) or in-process (`SandboxServer` is one).

    Every simulator serves `GET /_sandbox/stats` and `POST|DELETE /_sandbox/faults`; those that
    hold people serve the people and webhook routes below."""

    name: ClassVar[str] = "Sandbox"  # "Quo", "Zoho", ...: in errors and the thread name

    def __init__(self, url: str = "") -> None:
        self.url = url
        # One client: tests call the admin API a lot. None while a SandboxServer is stopped.
        self._admin_http = httpx.Client(base_url=url, timeout=10.0) if url else None

    def close(self) -> None:
        if self._admin_http is not None:
            self._admin_http.close()
            self._admin_http = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the admin API ---------------------------------------------------------------------
    def _admin_request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """`method /_sandbox/<path>`, raising for an error status."""
        if self._admin_http is None:
            raise RuntimeError(f"the {self.name} sandbox is not running")
        response = self._admin_http.request(method, f"/_sandbox/{path}", **kwargs)
        response.raise_for_status()
        return response

    def stats(self) -> dict[str, Any]:
        return self._admin_request("GET", "stats").json()

    def inject_fault(
        self,
        status: int | None = None,
        count: int = 1,
        retry_after: str | None = None,
        delay_seconds: float = 0.0,
        *,
        kinds: Collection[str] | None = None,
        after_write: bool = False,
        drop: bool = False,
    ) -> None:
        """Queue a fault. `kinds`, `after_write` and `drop` only where the simulator has them
        (see `admin_routes`)."""
        fault: dict[str, Any] = {"status": status, "count": count, "retryAfter": retry_after}
        if kinds is not None:
            fault["kinds"] = sorted(kinds)
        if after_write:
            fault["afterWrite"] = True
        if drop:
            fault["drop"] = True
        self._admin_request("POST", "faults", json={**fault, "delaySeconds": delay_seconds})

    def clear_faults(self) -> None:
        self._admin_request("DELETE", "faults")

    def settings(self, **changes: bool) -> dict[str, bool]:
        """The simulator's switches (camelCase names), after setting `changes` (snake_case)."""
        if not changes:
            return self._admin_request("GET", "settings").json()
        body = {camel(name): value for name, value in changes.items()}
        return self._admin_request("POST", "settings", json=body).json()

    # ---- people and their webhooks (simulators that hold people) ----------------------------
    # `kind` names the object where a simulator has several (Zoho "Contacts"/"Leads", AxisCare
    # "clients"/...); each change emits the CRM's webhook to its subscriptions, if any.
    def people(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every current person, in the shape the CRM's API returns it."""
        return self._admin_request("GET", "people", params=_kind(kind)).json()

    def create_person(
        self, fields: dict[str, Any] | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        body = {"fields": fields or {}}
        return self._admin_request("POST", "people", params=_kind(kind), json=body).json()

    def update_person(
        self, person_id: str, fields: dict[str, Any] | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """`fields` replace the person's; none: a generated change of name and phone."""
        body = {"fields": fields or {}}
        path = f"people/{person_id}"
        return self._admin_request("PATCH", path, params=_kind(kind), json=body).json()

    def delete_person(self, person_id: str, kind: str | None = None) -> None:
        self._admin_request("DELETE", f"people/{person_id}", params=_kind(kind))

    def merge_people(self, person_id: str, into: str, kind: str | None = None) -> dict[str, Any]:
        """Merge `person_id` into `into` (the survivor, returned), where the CRM has merges."""
        path = f"people/{person_id}/merge"
        return self._admin_request("POST", path, params=_kind(kind), json={"into": into}).json()

    def activities(self) -> list[dict[str, Any]]:
        """What was logged on people, one shape for every CRM simulator: `{id, kind, person
        (the connector's record key), subject, body}` (`GET /_sandbox/activities`)."""
        return self._admin_request("GET", "activities").json()["activities"]

    def webhook_faults(self, **faults: float) -> dict[str, Any]:
        """Replace the delivery faults (sandbox.webhook_delivery.DeliveryFaults, snake_case)."""
        body = {camel(name): value for name, value in faults.items()}
        return self._admin_request("POST", "webhook-faults", json=body).json()

    def deliveries(self) -> dict[str, Any]:
        return self._admin_request("GET", "deliveries").json()


class SandboxServer(AdminClient):
    """Runs a simulator in-process on 127.0.0.1 (uvicorn in a background thread), and is its
    admin client (`GET /_sandbox/stats` is the readiness probe)."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.port = port
        self._state: Any = None
        self._server: BackgroundServer | None = None

    # ---- what a simulator says ------------------------------------------------------------
    def _create_state(self) -> Any:
        raise NotImplementedError

    def _create_app(self, state: Any) -> Starlette:
        raise NotImplementedError

    def _close_state(self, state: Any) -> None:
        """Release what the state holds (database connections); called once the server stopped."""

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Self:
        self._state = self._create_state()
        self._server = BackgroundServer(
            self._create_app(self._state),
            port=self.port,
            ready_path="/_sandbox/stats",
            name=f"{self.name.lower()}-sandbox",
            lifespan="off",
        )
        try:
            self._server.start(timeout)
        except RuntimeError:
            self.stop()
            raise
        self.url = self._server.url
        self._admin_http = httpx.Client(base_url=self.url, timeout=10.0)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._state is not None:
            self._close_state(self._state)
        self.close()
        self._server = self._state = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _kind(kind: str | None) -> dict[str, str]:
    return {"kind": kind} if kind else {}


def serve_until_signalled(sandbox: SandboxServer, ready_line_prefix: str) -> None:
    """Serve until SIGINT/SIGTERM, printing `<ready_line_prefix> <url>` once serving."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with sandbox:
        print(f"{ready_line_prefix} {sandbox.url}", flush=True)
        while not stop.wait(0.5):
            pass
