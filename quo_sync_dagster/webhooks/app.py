"""The webhook receiver: `POST /webhooks/crm/{crm}/{integration_id}` (CRM changes),
`POST /webhooks/quo/{integration_id}` (Quo calls and messages, `webhooks.quo_route`) and
`GET /healthz`.

A delivery is checked in this order: a CRM with a webhook handler (else 404), a declared size
under the cap (413), an integration of that CRM with a webhook subscription (404), a body under
the cap (413, read as a stream so an oversized one is never held), the CRM's own verification
(401/403) and documented shape (400). Its changes are then written to the inbox, and only once
they are stored does the CRM get its 2xx; a failed write answers 503, which CRMs retry.
Answers carry a short JSON reason; logs name the CRM, integration and reason, never a secret,
a header or the body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.background_server import BackgroundServer
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.secrets import MissingSecret, resolve_secret
from quo_sync_dagster.store import NotFound, Store
from quo_sync_dagster.webhooks.handler import (
    DEFAULT_TIMESTAMP_TOLERANCE_SECONDS,
    Delivery,
    Rejected,
    WebhookContext,
    WebhookHandler,
    registered_handlers,
)
from quo_sync_dagster.webhooks.inbox import Inbox, InboxEntry, InboxWriter, StoreInbox
from quo_sync_dagster.webhooks.verify import iso

log = logging.getLogger(__name__)

PATH = "/webhooks/crm/{crm}/{integration_id}"
T = TypeVar("T")


@dataclass(frozen=True)
class ReceiverSettings:
    max_body_bytes: int = 256 * 1024
    # Quo events are larger: a call.transcript.completed holds the whole dialogue of the call.
    quo_max_body_bytes: int = 2 * 1024 * 1024
    timestamp_tolerance_seconds: float = DEFAULT_TIMESTAMP_TOLERANCE_SECONDS
    # Integrations, subscriptions and resolved secrets are reused this long: a changed
    # subscription or rotated secret takes effect within it.
    cache_ttl_seconds: float = 30.0
    cache_max_entries: int = 10_000  # unknown ids are cached too; this bounds what they cost


class LookupCache(Generic[T]):
    """What `lookup(*key)` found per key, or the 404 it ended in, kept for the cache TTL (the
    CRM route's verification contexts, the Quo route's keys). Lookups run off the event loop;
    any other Rejected (a store or secret outage) is raised and not remembered."""

    def __init__(self, settings: ReceiverSettings, lookup: Callable[..., T]) -> None:
        self.settings, self.lookup = settings, lookup
        self._cache: dict[tuple[str, ...], tuple[float, T | Rejected]] = {}

    async def get(self, *key: str) -> T:
        expires, found = self._cache.get(key, (0.0, None))
        if found is None or expires <= time.monotonic():
            try:
                found = await anyio.to_thread.run_sync(self.lookup, *key)
            except Rejected as rejected:
                if rejected.status != 404:
                    raise
                found = rejected
            self._remember(key, found)
        if isinstance(found, Rejected):
            raise Rejected(404, found.reason)
        return found

    def _remember(self, key: tuple[str, ...], found: T | Rejected) -> None:
        now = time.monotonic()
        if len(self._cache) >= self.settings.cache_max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= self.settings.cache_max_entries:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key] = (now + self.settings.cache_ttl_seconds, found)


class _Contexts(LookupCache[WebhookContext]):
    """Verification contexts per (crm, integration id)."""

    def __init__(
        self, store: Store, handlers: dict[str, WebhookHandler], settings: ReceiverSettings
    ) -> None:
        super().__init__(settings, self._lookup)
        self.store, self.handlers = store, handlers

    def _lookup(self, crm: str, integration_id: str) -> WebhookContext:
        try:
            integration = self.store.get_integration(integration_id)
            subscription = self.store.get_webhook_subscription(integration_id)
        except NotFound:
            raise Rejected(404, "unknown integration") from None
        except Exception as exc:
            log.error("webhook lookup of %r failed: %s", integration_id, type(exc).__name__)
            raise Rejected(503, "store unavailable") from None
        if integration.crm != crm:
            raise Rejected(404, "unknown integration")
        if subscription is None or subscription.get("crm") != crm:
            raise Rejected(404, "no webhook subscription for this integration")
        needs_credential = self.handlers[crm].needs_credential
        try:
            # MissingSecret's text names the reference only.
            ref = integration.crm_credential_ref
            credential = resolve_secret(ref) if ref and needs_credential else None
            secret = resolve_secret(ref) if (ref := subscription.get("secretRef")) else None
        except MissingSecret as exc:
            log.error("webhooks of %r cannot be verified: %s", integration_id, exc)
            raise Rejected(503, "verification secret unavailable") from None
        connector = connector_class(crm)(integration, credential)
        return WebhookContext(integration, connector, subscription, secret)


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refusing it as soon as it passes `cap` bytes (whatever Content-Length said)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise Rejected(413, f"body over {cap} bytes")
    return bytes(body)


def create_app(
    store: Store, inbox: Inbox | None = None, settings: ReceiverSettings | None = None
) -> Starlette:
    """The receiver on `store` (integrations and subscriptions), writing to `inbox` (default:
    the store's inbox). The caller closes both after the app has shut down."""
    # Imported here: quo_route imports this module's cache, settings and body reader.
    from quo_sync_dagster.webhooks.quo_route import quo_route

    settings = settings or ReceiverSettings()
    handlers: dict[str, WebhookHandler] = {
        crm: cls(settings.timestamp_tolerance_seconds) for crm, cls in registered_handlers().items()
    }
    contexts = _Contexts(store, handlers, settings)
    target: Inbox = inbox or StoreInbox(store)

    async def receive(request: Request) -> Response:
        crm, integration_id = request.path_params["crm"], request.path_params["integration_id"]
        try:
            handler = handlers.get(crm)
            if handler is None:
                raise Rejected(404, "unknown CRM")
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit():
                raise Rejected(400, "bad Content-Length")
            if int(declared) > settings.max_body_bytes:
                raise Rejected(413, f"body over {settings.max_body_bytes} bytes")
            context = await contexts.get(crm, integration_id)
            body = await read_body(request, settings.max_body_bytes)
            received_at = datetime.now(UTC)
            delivery = Delivery(body, request.headers, request.query_params, received_at)
            changes = handler.changes(delivery, context)
        except Rejected as rejected:
            log.warning(
                "webhook %r/%r refused: %d %s",
                crm,
                integration_id,
                rejected.status,
                rejected.reason,
            )
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
        except Exception as exc:  # a bug: the CRM retries a 500; the text may quote the body
            log.error("webhook %r/%r failed: %s", crm, integration_id, type(exc).__name__)
            return JSONResponse({"error": "internal error"}, status_code=500)
        if not changes:
            return JSONResponse({"status": "ignored"})
        payload_time = iso(received_at)
        entries = [
            InboxEntry(
                integration_id, c.event_id, {"change": c.to_payload(), "receivedAt": payload_time}
            )
            for c in changes
        ]
        try:
            stored = await request.app.state.writer.enqueue(entries)
        except Exception as exc:
            log.error("webhook %r/%r not stored: %s", crm, integration_id, type(exc).__name__)
            return JSONResponse({"error": "inbox unavailable"}, status_code=503)
        new = sum(stored)
        log.debug(
            "webhook %r/%r: %d changes stored, %d duplicates",
            crm,
            integration_id,
            new,
            len(stored) - new,
        )
        if not new:
            return JSONResponse({"status": "duplicate"})
        return JSONResponse({"status": "enqueued", "stored": new, "duplicates": len(stored) - new})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.writer = InboxWriter(target)
        try:
            yield
        finally:  # requests still waiting for their write get it before the writer stops
            await anyio.to_thread.run_sync(app.state.writer.close)

    return Starlette(
        routes=[
            Route(PATH, receive, methods=["POST"]),
            quo_route(store, settings),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )


class ReceiverServer(BackgroundServer):
    """Serves an ASGI app (with `GET /healthz`) with uvicorn in a background thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(app, host, port, ready_path="/healthz", name="the webhook receiver")
