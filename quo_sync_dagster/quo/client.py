"""httpx client for Quo's v1 API (contacts; webhooks, calls and messages): raw-key auth,
governed, retried, errors parsed.

Every request but a create is retried on 5xx and transport errors. A create is not idempotent
(Quo's spec does not promise a 409 for a second contact with the same source and externalId),
so it is retried only when Quo cannot have processed it (a 429, a connection refused before
sending); when its outcome is unknown it raises QuoOutcomeUnknown and the caller decides.
Creating a webhook is not idempotent either (a second one would double every event), so it is
treated the same way. A missing webhook, call, summary, transcript, voicemail or message reads
as None (a 404 is an answer, not an error).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import httpx

from quo_sync_dagster.governed_http import (
    ApiClient,
    ApiUnavailable,
    GovernedHttp,
    OutcomeUnknown,
    parse_retry_after,
)
from quo_sync_dagster.quo.governor import RateGovernor

__all__ = [
    "QuoApiError",
    "QuoClient",
    "QuoOutcomeUnknown",
    "QuoUnavailable",
    "parse_error",
    "parse_retry_after",
]

LOOKUP_CHUNK = 20  # Quo's query parser rejects more than 20 repeated externalIds
LIST_PAGE_MAX = 50
USERS_PAGE_MAX = 50
WEBHOOK_KINDS = ("messages", "calls", "call-summaries", "call-transcripts")
TOO_MANY_PARTICIPANTS = "0101400"  # GET /v1/calls/{id} of a call with more than two parties


class QuoApiError(Exception):
    """A non-retryable answer from Quo. Carries status and Quo's 7-digit code; never the key."""

    def __init__(self, status: int, code: str | None, message: str, request: str) -> None:
        super().__init__(f"Quo {status} {code or '-'} on {request}: {message}")
        self.status = status
        self.code = code


class QuoUnavailable(ApiUnavailable):
    """Quo kept failing (5xx, timeouts, 429s) after every retry, or refused our credentials."""


class QuoOutcomeUnknown(OutcomeUnknown, QuoUnavailable):
    """A create was sent and Quo may or may not have made the contact: the answer was lost (a
    timeout or connection error after sending), was a 5xx, or was a 2xx without a readable
    contact. Not retried. A caller that does not handle it fails as if Quo were unavailable;
    the upserter looks the externalId up before creating again."""


def parse_error(response: httpx.Response) -> QuoApiError:
    """Both documented shapes: the spec's `{message, code, ...}` and `{"error": {message, key}}`."""
    request = f"{response.request.method} {response.request.url.path}"
    try:
        body = response.json()
    except ValueError:
        return QuoApiError(response.status_code, None, response.text[:200] or "no body", request)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        inner = body["error"]
        return QuoApiError(
            response.status_code, inner.get("key"), str(inner.get("message")), request
        )
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("title") or body)
        details = body.get("errors") or []
        if details:
            message += (
                " (" + "; ".join(f"{e.get('path')}: {e.get('message')}" for e in details) + ")"
            )
        return QuoApiError(response.status_code, body.get("code"), message, request)
    return QuoApiError(response.status_code, None, str(body)[:200], request)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class QuoClient(ApiClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        governor: RateGovernor | None = None,
        timeout_seconds: float = 30.0,
        max_attempts: int = 6,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = GovernedHttp(
            httpx.Client(
                base_url=base_url.rstrip("/"),
                headers={"Authorization": api_key},  # Quo takes the raw key, no "Bearer"
                timeout=timeout_seconds,
                transport=transport,
            ),
            governor,
            max_attempts,
            unavailable=QuoUnavailable,
            describe=lambda r: str(parse_error(r)),
            outcome_unknown=QuoOutcomeUnknown,
        )

    # ---- contacts ------------------------------------------------------------------------
    def create_contact(self, body: dict[str, Any]) -> dict[str, Any]:
        """The created contact. Raises QuoOutcomeUnknown, without retrying, when Quo may or may
        not have created it."""
        response = self._request("POST", "/v1/contacts", json=body, idempotent=False)
        try:
            contact = response.json()["data"]
            if not isinstance(contact, dict) or not isinstance(contact.get("id"), str):
                raise ValueError("no contact id")
        except (ValueError, KeyError, TypeError) as exc:  # created, but which contact?
            raise QuoOutcomeUnknown(
                f"POST /v1/contacts answered {response.status_code} without a readable "
                f"contact ({type(exc).__name__}: {exc})",
                response.status_code,
            ) from None
        return contact

    def patch_contact(self, contact_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("PATCH", f"/v1/contacts/{contact_id}", json=body).json()["data"]

    def get_contact(self, contact_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/contacts/{contact_id}").json()["data"]

    def delete_contact(self, contact_id: str) -> None:
        self._request("DELETE", f"/v1/contacts/{contact_id}")

    def find_by_external_ids(
        self, external_ids: Iterable[str], source: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """externalId -> contact for those that exist, ≤20 ids per request (Quo's limit)."""
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(set(external_ids)), LOOKUP_CHUNK):
            params: dict[str, Any] = {"externalIds": chunk, "maxResults": LIST_PAGE_MAX}
            if source:
                params["sources"] = [source]
            for contact in self._list(params):
                if contact.get("externalId") in chunk and source in (None, contact.get("source")):
                    found[contact["externalId"]] = contact
        return found

    def iter_contacts(self, source: str | None = None) -> Iterator[dict[str, Any]]:
        """Every contact of `source` (None: of the workspace, whatever wrote it), paged by
        nextPageToken (totalItems is unreliable)."""
        params: dict[str, Any] = {"maxResults": LIST_PAGE_MAX}
        if source is not None:
            params["sources"] = [source]
        yield from self._list(params)

    def has_contacts_from(self, source: str) -> bool:
        body = self._request("GET", "/v1/contacts", params={"sources": [source], "maxResults": 1})
        return bool(body.json()["data"])

    # ---- webhooks ------------------------------------------------------------------------
    def create_webhook(
        self,
        kind: str,
        url: str,
        events: Sequence[str],
        label: str | None = None,
        resource_ids: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """`POST /v1/webhooks/<kind>` (messages, calls, call-summaries, call-transcripts): the
        webhook, with its signing `key`. Raises QuoOutcomeUnknown, without retrying, when Quo
        may or may not have created it (list_webhooks finds out)."""
        if kind not in WEBHOOK_KINDS:
            raise ValueError(f"webhook kind must be one of {WEBHOOK_KINDS}, not {kind!r}")
        body: dict[str, Any] = {"url": url, "events": list(events)}
        if label is not None:
            body["label"] = label
        if resource_ids is not None:
            body["resourceIds"] = list(resource_ids)
        path = f"/v1/webhooks/{kind}"
        response = self._request("POST", path, json=body, idempotent=False)
        try:
            webhook = response.json()["data"]
            if not isinstance(webhook, dict) or not isinstance(webhook.get("id"), str):
                raise ValueError("no webhook id")
        except (ValueError, KeyError, TypeError) as exc:
            raise QuoOutcomeUnknown(
                f"POST {path} answered {response.status_code} without a readable webhook "
                f"({type(exc).__name__})",
                response.status_code,
            ) from None
        return webhook

    def list_webhooks(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """The webhooks of `user_id` (Quo's default: the workspace owner)."""
        params = {"userId": user_id} if user_id else None
        return self._request("GET", "/v1/webhooks", params=params).json()["data"]

    def get_webhook(self, webhook_id: str) -> dict[str, Any] | None:
        return self._data_or_none(f"/v1/webhooks/{webhook_id}")

    def delete_webhook(self, webhook_id: str) -> bool:
        """True if deleted, False if there was no such webhook (already gone is fine)."""
        try:
            self._request("DELETE", f"/v1/webhooks/{webhook_id}")
        except QuoApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ---- calls, messages, workspace -----------------------------------------------------
    def get_call(self, call_id: str) -> dict[str, Any] | None:
        """The call; None if Quo has none, or cannot serve it (its 400 "Too Many
        Participants" for calls of more than two parties)."""
        try:
            return self._data_or_none(f"/v1/calls/{call_id}")
        except QuoApiError as exc:
            if exc.status == 400 and exc.code == TOO_MANY_PARTICIPANTS:
                return None
            raise

    def get_call_summary(self, call_id: str) -> dict[str, Any] | None:
        """`{callId, status, summary[], nextSteps[], jobs}`; None if the call has none."""
        return self._data_or_none(f"/v1/call-summaries/{call_id}")

    def get_call_transcript(self, call_id: str) -> dict[str, Any] | None:
        """`{callId, createdAt, duration, status, dialogue[]}`; None if the call has none."""
        return self._data_or_none(f"/v1/call-transcripts/{call_id}")

    def get_call_recordings(self, call_id: str) -> list[dict[str, Any]]:
        """The call's recordings, oldest first; [] if none (or no such call)."""
        return self._data_or_none(f"/v1/call-recordings/{call_id}") or []

    def get_call_voicemail(self, call_id: str) -> dict[str, Any] | None:
        """`{id, status, duration, transcript, recordingUrl}`; None if no voicemail was left."""
        return self._data_or_none(f"/v1/call-voicemails/{call_id}")

    def get_message(self, message_id: str) -> dict[str, Any] | None:
        return self._data_or_none(f"/v1/messages/{message_id}")

    def list_phone_numbers(self) -> list[dict[str, Any]]:
        """The workspace's Quo numbers (not paginated)."""
        return self._request("GET", "/v1/phone-numbers").json()["data"]

    def list_users(self) -> list[dict[str, Any]]:
        """Every user of the workspace, paged by nextPageToken."""
        users: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"maxResults": USERS_PAGE_MAX}
            if token:
                params["pageToken"] = token
            body = self._request("GET", "/v1/users", params=params).json()
            users += body["data"]
            token = body.get("nextPageToken")
            if not token:
                return users

    def _data_or_none(self, path: str) -> Any:
        """`data` of a GET; None for a 404."""
        try:
            return self._request("GET", path).json()["data"]
        except QuoApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _list(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            page_params = {**params, **({"pageToken": token} if token else {})}
            body = self._request("GET", "/v1/contacts", params=page_params).json()
            yield from body["data"]
            token = body.get("nextPageToken")
            if not token:
                return

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        response = self._http.request(method, path, idempotent=idempotent, **kwargs)
        if response.status_code in (401, 403):
            raise QuoUnavailable(str(parse_error(response)))
        if response.status_code >= 400:
            raise parse_error(response)
        return response
