"""httpx client for Quo's v1 contacts API: raw-key auth, governed, retried, errors parsed.

Every request but a create is retried on 5xx and transport errors. A create is not idempotent
(Quo's spec does not promise a 409 for a second contact with the same source and externalId),
so it is retried only when Quo cannot have processed it (a 429, a connection refused before
sending); when its outcome is unknown it raises QuoOutcomeUnknown and the caller decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

    def iter_contacts(self, source: str) -> Iterator[dict[str, Any]]:
        """Every contact of `source`, paged by nextPageToken (totalItems is unreliable)."""
        yield from self._list({"sources": [source], "maxResults": LIST_PAGE_MAX})

    def has_contacts_from(self, source: str) -> bool:
        body = self._request("GET", "/v1/contacts", params={"sources": [source], "maxResults": 1})
        return bool(body.json()["data"])

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
