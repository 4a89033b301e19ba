"""The Quo webhook route of the receiver: `POST /webhooks/quo/{integration_id}`.

Checked in this order: an integration with a Quo webhook subscription (404), a body under the cap
(413: declared, then while streaming), an `openphone-signature` that verifies under one of the
integration's webhook keys (401) with a fresh timestamp (403), and an event envelope (400). The
event is then written to the integration's activity queue in the inbox, deduplicated by its id,
and only once it is stored does Quo get its 200 (a replay answers `duplicate`); a store or
secret outage answers 503, which Quo retries. Logs name the integration and the reason, never a
key, a header or the body.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.secrets import MissingSecret, resolve_secret
from quo_sync_dagster.store import NotFound, Store
from quo_sync_dagster.webhooks.app import LookupCache, ReceiverSettings, read_body
from quo_sync_dagster.webhooks.handler import Rejected
from quo_sync_dagster.webhooks.inbox import InboxEntry
from quo_sync_dagster.webhooks.quo_signature import HEADER, decode_key, verify
from quo_sync_dagster.webhooks.verify import iso, json_object

log = logging.getLogger(__name__)

QUO_PATH = "/webhooks/quo/{integration_id}"
SUBSCRIPTION_CRM = "quo"  # the "crm" of a stored Quo webhook subscription
API_VERSIONS = frozenset({"v2", "v3", "v4"})  # old app webhooks (v2/v3) and v1 API ones (v4)
MAX_EVENT_ID_CHARS = 255  # Quo's are "EV" + 32 hex digits; the id is the inbox's dedupe key


def webhook_keys(store: Store, integration_id: str) -> tuple[bytes, ...]:
    """The decoded signing keys of the integration's Quo webhooks. Rejected: 404 for an unknown
    integration or one without a Quo subscription (or keys), 503 for a store or secret outage."""
    try:
        store.get_integration(integration_id)
        subscription = store.get_webhook_subscription(activity_queue(integration_id))
    except NotFound:
        raise Rejected(404, "unknown integration") from None
    except Exception as exc:
        log.error("Quo webhook lookup of %r failed: %s", integration_id, type(exc).__name__)
        raise Rejected(503, "store unavailable") from None
    if subscription is None or subscription.get("crm") != SUBSCRIPTION_CRM:
        raise Rejected(404, "no Quo webhook subscription for this integration")
    webhooks = (subscription.get("details") or {}).get("webhooks") or []
    refs = [w["keyRef"] for w in webhooks if isinstance(w, dict) and w.get("keyRef")]
    if not refs:
        raise Rejected(404, "no Quo webhook subscription for this integration")
    try:
        return tuple(decode_key(resolve_secret(ref)) for ref in refs)
    except (MissingSecret, ValueError) as exc:  # texts name the reference only, never a key
        log.error("Quo webhooks of %r cannot be verified: %s", integration_id, exc)
    except Exception as exc:  # a secret backend failing otherwise: only the kind
        log.error("Quo webhook keys of %r unreadable: %s", integration_id, type(exc).__name__)
    raise Rejected(503, "verification secret unavailable")


def parse_envelope(body: bytes) -> dict[str, Any]:
    """The event envelope (quo-api.md §3.3), else Rejected 400. Only the envelope is checked:
    its object's shape differs by version and is the activity parser's business."""
    envelope = json_object(body)
    event_id = envelope.get("id")
    if not isinstance(event_id, str) or not event_id.strip():
        raise Rejected(400, "id is missing or not a string")
    if len(event_id) > MAX_EVENT_ID_CHARS:
        raise Rejected(400, "id is too long")
    event_type = envelope.get("type")
    if not isinstance(event_type, str) or not event_type.strip():
        raise Rejected(400, "type is missing or not a string")
    # Every sample carries apiVersion; one that is absent is taken as legacy, not refused.
    if "apiVersion" in envelope and envelope["apiVersion"] not in API_VERSIONS:
        raise Rejected(400, "unsupported apiVersion")
    data = envelope.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise Rejected(400, "data.object is missing or not an object")
    return envelope


def _check_declared_length(request: Request, cap: int) -> None:
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit():
        raise Rejected(400, "bad Content-Length")
    if int(declared) > cap:
        raise Rejected(413, f"body over {cap} bytes")


def quo_route(store: Store, settings: ReceiverSettings) -> Route:
    """The route, for an app whose `state.writer` is an InboxWriter (as create_app's is)."""
    keys: LookupCache[tuple[bytes, ...]] = LookupCache(settings, partial(webhook_keys, store))
    cap = settings.quo_max_body_bytes

    async def receive(request: Request) -> Response:
        integration_id = request.path_params["integration_id"]
        try:
            found = await keys.get(integration_id)
            _check_declared_length(request, cap)
            body = await read_body(request, cap)
            received_at = datetime.now(UTC)
            header = ",".join(request.headers.getlist(HEADER))  # each line may hold several
            verify(header, body, found, received_at, settings.timestamp_tolerance_seconds)
            envelope = parse_envelope(body)
        except Rejected as rejected:
            log.warning(
                "Quo webhook %r refused: %d %s", integration_id, rejected.status, rejected.reason
            )
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
        except Exception as exc:  # a bug: Quo retries a 500; the text may quote the body
            log.error("Quo webhook %r failed: %s", integration_id, type(exc).__name__)
            return JSONResponse({"error": "internal error"}, status_code=500)
        payload = {"event": envelope, "receivedAt": iso(received_at)}
        entry = InboxEntry(activity_queue(integration_id), envelope["id"], payload)
        try:
            (stored,) = await request.app.state.writer.enqueue([entry])
        except Exception as exc:
            log.error("Quo webhook %r not stored: %s", integration_id, type(exc).__name__)
            return JSONResponse({"error": "inbox unavailable"}, status_code=503)
        if not stored:
            return JSONResponse({"status": "duplicate"})
        return JSONResponse({"status": "enqueued"})

    return Route(QUO_PATH, receive, methods=["POST"])
