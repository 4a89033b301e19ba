"""httpx client for Attio's REST API (v2): people queries and creates, companies read by id,
notes (create, list, get, delete: the spec has no note update) and webhooks, governed and
retried through GovernedHttp, errors parsed from Attio's `{status_code, type, code, message}`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from quo_sync_dagster.core.ratelimit import Throttle
from quo_sync_dagster.governed_http import ApiClient, ApiUnavailable, GovernedHttp

__all__ = ["AttioApi", "AttioApiError", "AttioUnavailable", "parse_error", "verify_signature"]

PEOPLE, COMPANIES = "people", "companies"
MAX_PAGE = 500  # Attio's default limit; the spec gives no maximum, so stay at the default
MAX_NOTES_PAGE = 50  # the spec's maximum `limit` of GET /v2/notes
PERSON_EVENTS = ("record.created", "record.updated", "record.deleted", "record.merged")


class AttioApiError(Exception):
    """A non-retryable answer from Attio: status and Attio's error code, never the key."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"Attio {status} {code or '-'}: {message}")
        self.status, self.code, self.message = status, code, message


class AttioUnavailable(ApiUnavailable):
    """Attio kept failing (5xx, timeouts, 429s) after every retry."""


def parse_error(response: httpx.Response) -> AttioApiError:
    request = f"{response.request.method} {response.request.url.path}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return AttioApiError(response.status_code, None, f"{request}: {response.text[:200]}")
    message = f"{request}: {body.get('message') or body}"
    return AttioApiError(response.status_code, body.get("code"), message)


def verify_signature(secret: str, raw_body: bytes, header: str | None) -> bool:
    """Attio-Signature is the hex HMAC-SHA256 of the raw body keyed with the webhook secret."""
    if not secret or not header:
        return False
    expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.strip().lower())


def _timestamp(at: datetime | str) -> str:
    if isinstance(at, str):
        return at
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AttioApi(ApiClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        throttle: Throttle | None = None,
        max_attempts: int = 6,
        timeout_seconds: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = GovernedHttp(
            httpx.Client(
                base_url=base_url.rstrip("/"),
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=timeout_seconds,
                transport=transport,
            ),
            throttle,
            max_attempts,
            unavailable=AttioUnavailable,
            describe=lambda r: str(parse_error(r)),
        )

    # ---- people ----------------------------------------------------------------------------
    def query_people(
        self,
        limit: int,
        offset: int,
        sort_desc: bool = True,
        filter: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """One page ordered by created_at (Attio has no updated_at); shorter than `limit` = last."""
        body: dict[str, Any] = {
            "limit": limit,
            "offset": offset,
            # record_id breaks created_at ties, so offsets stay stable between pages.
            "sorts": [
                {"attribute": "created_at", "direction": "desc" if sort_desc else "asc"},
                {"attribute": "record_id", "direction": "asc"},
            ],
        }
        if filter is not None:
            body["filter"] = filter
        return self._query(PEOPLE, body)

    def iter_people(self, page_size: int = MAX_PAGE, sort_desc: bool = True) -> Iterator[dict]:
        offset = 0
        while True:
            page = self.query_people(page_size, offset, sort_desc)
            yield from page
            if len(page) < page_size:
                return
            offset += page_size

    def get_people(self, record_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The people that exist among `record_ids` (no batch GET: a `record_id $in` query)."""
        return self._by_ids(PEOPLE, record_ids)

    def get_companies(self, record_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The companies that exist among `record_ids`: one query per 500 of them."""
        return self._by_ids(COMPANIES, record_ids)

    def _by_ids(self, object_slug: str, record_ids: Iterable[str]) -> list[dict[str, Any]]:
        ids = list(dict.fromkeys(record_ids))
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), MAX_PAGE):
            chunk = ids[start : start + MAX_PAGE]
            body = {"filter": {"record_id": {"$in": chunk}}, "limit": len(chunk), "offset": 0}
            found += self._query(object_slug, body)
        return found

    def _query(self, object_slug: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        return self._request("POST", f"/v2/objects/{object_slug}/records/query", json=body)["data"]

    def get_person(self, record_id: str) -> dict[str, Any] | None:
        """None when the person is gone (deleted or merged away)."""
        try:
            return self._request("GET", f"/v2/objects/{PEOPLE}/records/{record_id}")["data"]
        except AttioApiError as exc:
            if exc.status == 404:
                return None
            raise

    def people_object_id(self) -> str | None:
        """The workspace's id of the people object, read off a person's `id.object_id` (no
        object-configuration scope needed); None while the workspace has no people."""
        people = self.query_people(1, 0)
        return people[0]["id"]["object_id"] if people else None

    def find_people_by_phone(self, e164: str, limit: int = 10) -> list[dict[str, Any]]:
        return self.query_people(limit, 0, filter={"phone_numbers": e164})

    def create_person(self, values: dict[str, list[Any]]) -> dict[str, Any]:
        """POST /v2/objects/people/records: the new person. `values` maps attribute slugs to
        arrays of values in their write form (the spec takes arrays only). Never re-sent when
        its outcome is unknown (a 5xx, a lost answer): OutcomeUnknown, so that the caller
        looks for the person before creating another."""
        body = {"data": {"values": values}}
        path = f"/v2/objects/{PEOPLE}/records"
        return self._request("POST", path, json=body, idempotent=False)["data"]

    # ---- notes -----------------------------------------------------------------------------
    def create_note(
        self,
        parent_record_id: str,
        title: str,
        content: str,
        format: str = "markdown",
        created_at: datetime | str | None = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """Notes are Attio's only write-back path for calls and messages. `idempotent=False`:
        a create whose outcome is unknown (a 5xx, a lost answer) is not sent again but raises
        OutcomeUnknown, for callers that find such a note themselves afterwards."""
        data: dict[str, Any] = {
            "parent_object": PEOPLE,
            "parent_record_id": parent_record_id,
            "title": title,
            "format": format,
            "content": content,
        }
        if created_at is not None:
            data["created_at"] = _timestamp(created_at)
        body = {"data": data}
        return self._request("POST", "/v2/notes", json=body, idempotent=idempotent)["data"]

    def list_notes(
        self, parent_record_id: str, limit: int = MAX_NOTES_PAGE, offset: int = 0
    ) -> list[dict[str, Any]]:
        """One page of a person's notes; shorter than `limit` = the last."""
        params = {
            "parent_object": PEOPLE,
            "parent_record_id": parent_record_id,
            "limit": limit,
            "offset": offset,
        }
        return self._request("GET", "/v2/notes", params=params)["data"]

    def iter_notes(self, parent_record_id: str) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self.list_notes(parent_record_id, MAX_NOTES_PAGE, offset)
            yield from page
            if len(page) < MAX_NOTES_PAGE:
                return
            offset += MAX_NOTES_PAGE

    def get_note(self, note_id: str) -> dict[str, Any] | None:
        """None when there is no such note."""
        try:
            return self._request("GET", f"/v2/notes/{note_id}")["data"]
        except AttioApiError as exc:
            if exc.status == 404:
                return None
            raise

    def delete_note(self, note_id: str) -> bool:
        """False when the note was already gone (deleting is idempotent: a retried delete
        whose first attempt went through answers 404)."""
        try:
            self._request("DELETE", f"/v2/notes/{note_id}")
        except AttioApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ---- webhooks --------------------------------------------------------------------------
    def create_webhook(
        self, target_url: str, event_types: Sequence[str] = PERSON_EVENTS
    ) -> dict[str, Any]:
        """The created webhook, including its `secret` (Attio shows it only this once)."""
        subscriptions = [{"event_type": e, "filter": None} for e in event_types]
        body = {"data": {"target_url": target_url, "subscriptions": subscriptions}}
        return self._request("POST", "/v2/webhooks", json=body)["data"]

    def get_webhook(self, webhook_id: str) -> dict[str, Any] | None:
        """The webhook (without its secret), or None when Attio no longer has it."""
        try:
            return self._request("GET", f"/v2/webhooks/{webhook_id}")["data"]
        except AttioApiError as exc:
            if exc.status == 404:
                return None
            raise

    def delete_webhook(self, webhook_id: str) -> None:
        self._request("DELETE", f"/v2/webhooks/{webhook_id}")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise parse_error(response)
        return response.json()
