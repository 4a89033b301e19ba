"""httpx client for the Pipedrive endpoints the sync uses: v2 persons (list, read, create), v2
organizations (read by ids), v2 activities (create, update, read), v1 call logs, notes and
webhooks. Governed and retried by
GovernedHttp; both of Pipedrive's rate-limit answers (a 429, and the Cloudflare 403 HTML page
sent to clients that keep going) count as one. Creates are not retried once their outcome is
unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from quo_sync_dagster.core.ratelimit import Throttle
from quo_sync_dagster.governed_http import ApiClient, ApiUnavailable, GovernedHttp, OutcomeUnknown

__all__ = [
    "BATCH_READ_MAX",
    "PipedriveApi",
    "PipedriveApiError",
    "PipedriveOutcomeUnknown",
    "PipedriveUnavailable",
]

BATCH_READ_MAX = 100  # ids per GET /api/v2/persons?ids= and /api/v2/organizations?ids=
_V1_TIME = "%Y-%m-%d %H:%M:%S"


class PipedriveApiError(Exception):
    """A non-retryable answer from Pipedrive (4xx). Carries the status; never the token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Pipedrive {status}: {message}")
        self.status = status
        self.message = message


class PipedriveUnavailable(ApiUnavailable):
    """Pipedrive kept failing (5xx, timeouts, rate limits) after every retry."""


class PipedriveOutcomeUnknown(OutcomeUnknown, PipedriveUnavailable):
    """A create (activity, note) was sent and its answer lost or a 5xx: Pipedrive may have
    written it, so it was not sent again."""


def is_rate_limited(response: httpx.Response) -> bool:
    """A 429, or the 403 HTML page Pipedrive's Cloudflare sends instead of JSON."""
    if response.status_code == 429:
        return True
    return response.status_code == 403 and "text/html" in response.headers.get("content-type", "")


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"{when!r} has no time zone; Pipedrive times are UTC")
    return when.astimezone(UTC)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _hhmm(seconds: int | None) -> str | None:
    """An activity's `duration`, HH:MM; Pipedrive rejects a zero one, so under a minute (or
    none) is left out."""
    minutes = (seconds or 0) // 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}" if minutes else None


class PipedriveApi(ApiClient):
    def __init__(
        self,
        base_url: str,
        api_token: str,
        throttle: Throttle | None = None,
        max_attempts: int = 6,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._token = api_token
        self._http = GovernedHttp(
            httpx.Client(
                base_url=base_url.rstrip("/"),
                # The header, not the ?api_token= query: URLs end up in logs and exceptions.
                headers={"x-api-token": api_token},
                timeout=timeout_seconds,
            ),
            throttle,
            max_attempts,
            is_rate_limited=is_rate_limited,
            unavailable=PipedriveUnavailable,
            outcome_unknown=PipedriveOutcomeUnknown,
            describe=lambda r: str(self._error(r)),
        )

    # ---- persons ---------------------------------------------------------------------------
    def list_persons(
        self,
        limit: int,
        cursor: str | None = None,
        sort_by: str = "update_time",
        sort_direction: str = "desc",
        updated_since: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of persons and the cursor of the next (None on the last page)."""
        params: dict[str, Any] = {"limit": limit, "sort_by": sort_by}
        params["sort_direction"] = sort_direction
        if cursor:
            params["cursor"] = cursor
        if updated_since is not None:
            params["updated_since"] = _utc(updated_since).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = self._request("GET", "/api/v2/persons", params=params).json()
        return body["data"] or [], (body.get("additional_data") or {}).get("next_cursor")

    def get_persons(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """The persons that exist among `ids` (missing or invisible ones are left out)."""
        return self._by_ids("/api/v2/persons", ids)

    def get_organizations(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """The organizations that exist among `ids` (deleted or invisible ones are left out):
        one request per 100 ids."""
        return self._by_ids("/api/v2/organizations", ids)

    def _by_ids(self, path: str, ids: Iterable[int]) -> list[dict[str, Any]]:
        """A v2 list endpoint's batch read: `ids` takes at most 100 per request."""
        found: list[dict[str, Any]] = []
        for chunk in _chunks(sorted(set(ids)), BATCH_READ_MAX):
            params = {"ids": ",".join(map(str, chunk)), "limit": BATCH_READ_MAX}
            found += self._request("GET", path, params=params).json()["data"] or []
        return found

    def create_person(
        self,
        name: str,
        phones: Sequence[str] = (),
        phone_label: str = "work",
        owner_id: int | None = None,
    ) -> dict[str, Any]:
        """POST /api/v2/persons: a person named `name` holding `phones` (the first primary,
        all labelled `phone_label`: work, home, mobile or other); the person as Pipedrive
        answers it.

        Not retried once its outcome is unknown (PipedriveOutcomeUnknown): a second POST would
        be a second person."""
        body = {
            "name": name,
            "owner_id": owner_id,
            "phones": [
                {"value": phone, "primary": n == 0, "label": phone_label}
                for n, phone in enumerate(phones)
            ]
            or None,
        }
        response = self._request(
            "POST", "/api/v2/persons", json=_without_none(body), idempotent=False
        )
        return response.json()["data"]

    # ---- activity write-back ---------------------------------------------------------------
    def create_call_log(
        self,
        person_id: int,
        outcome: str,
        to_phone_number: str,
        start_time: datetime,
        end_time: datetime,
        from_phone_number: str | None = None,
        subject: str | None = None,
        note: str | None = None,
        user_id: int | None = None,
    ) -> dict[str, Any]:
        """A call log (shows as a done call activity); duration is derived from the times."""
        start, end = _utc(start_time), _utc(end_time)
        body = {
            "person_id": person_id,
            "outcome": outcome,
            "to_phone_number": to_phone_number,
            "from_phone_number": from_phone_number,
            "start_time": start.strftime(_V1_TIME),
            "end_time": end.strftime(_V1_TIME),
            "duration": str(int((end - start).total_seconds())),  # seconds, as a string
            "subject": subject,
            "note": note,
            "user_id": user_id,
        }
        response = self._request("POST", "/v1/callLogs", json=_without_none(body), idempotent=False)
        return response.json()["data"]

    def create_activity(
        self,
        person_id: int,
        subject: str,
        activity_type: str = "call",
        done: bool = True,
        note: str | None = None,
        due: datetime | None = None,
        duration_seconds: int | None = None,
        owner_id: int | None = None,
    ) -> dict[str, Any]:
        """A v2 activity linked through a primary participant (v2 `person_id` is read-only).

        Not retried once its outcome is unknown (PipedriveOutcomeUnknown): a second POST would
        be a second activity."""
        due_utc = _utc(due) if due is not None else None
        body = {
            "subject": subject,
            "type": activity_type,
            "done": done,
            "note": note,
            "owner_id": owner_id,
            "participants": [{"person_id": person_id, "primary": True}],
            "due_date": due_utc.strftime("%Y-%m-%d") if due_utc else None,
            "due_time": due_utc.strftime("%H:%M") if due_utc else None,
            "duration": _hhmm(duration_seconds),
        }
        response = self._request(
            "POST", "/api/v2/activities", json=_without_none(body), idempotent=False
        )
        return response.json()["data"]

    def update_activity(
        self,
        activity_id: int,
        subject: str | None = None,
        done: bool | None = None,
        note: str | None = None,
        duration_seconds: int | None = None,
    ) -> dict[str, Any]:
        """PATCH /api/v2/activities/{id}: only the fields given change (a rewrite, so retrying
        it is safe). PipedriveApiError 404 if Pipedrive has no such activity."""
        body = {
            "subject": subject,
            "done": done,
            "note": note,
            "duration": _hhmm(duration_seconds),
        }
        path = f"/api/v2/activities/{activity_id}"
        return self._request("PATCH", path, json=_without_none(body)).json()["data"]

    def get_activity(self, activity_id: int) -> dict[str, Any] | None:
        """The activity, or None if Pipedrive has no such activity."""
        try:
            return self._request("GET", f"/api/v2/activities/{activity_id}").json()["data"]
        except PipedriveApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create_note(
        self,
        person_id: int,
        content: str,
        user_id: int | None = None,
        add_time: datetime | None = None,
    ) -> dict[str, Any]:
        body = {
            "person_id": person_id,
            "content": content,
            "user_id": user_id,
            "add_time": _utc(add_time).strftime(_V1_TIME) if add_time else None,
        }
        # Not retried once its outcome is unknown: a second POST would be a second note.
        response = self._request("POST", "/v1/notes", json=_without_none(body), idempotent=False)
        return response.json()["data"]

    # ---- webhooks --------------------------------------------------------------------------
    def create_webhook(
        self,
        subscription_url: str,
        event_action: str = "*",
        event_object: str = "person",
        name: str = "Quo sync",
        http_auth_user: str | None = None,
        http_auth_password: str | None = None,
    ) -> dict[str, Any]:
        """A v2 webhook; Pipedrive signs nothing, so Basic auth is the only way to verify it."""
        body = {
            "subscription_url": subscription_url,
            "event_action": event_action,
            "event_object": event_object,
            "name": name,
            "version": "2.0",
            "http_auth_user": http_auth_user,
            "http_auth_password": http_auth_password,
        }
        return self._request("POST", "/v1/webhooks", json=_without_none(body)).json()["data"]

    def list_webhooks(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/webhooks").json()["data"] or []

    def delete_webhook(self, webhook_id: int | str) -> None:
        self._request("DELETE", f"/v1/webhooks/{webhook_id}")

    # ---- plumbing --------------------------------------------------------------------------
    def _error(self, response: httpx.Response) -> PipedriveApiError:
        try:
            body = response.json()
            message = str(body.get("error") or body) if isinstance(body, dict) else str(body)
        except ValueError:
            message = response.text[:200] or "no body"
        request = f"{response.request.method} {response.request.url.path}"
        # Defence in depth: an echoed token must not reach logs through the message.
        return PipedriveApiError(
            response.status_code, f"{message} ({request})".replace(self._token, "***")
        )

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        response = self._http.request(method, path, idempotent=idempotent, **kwargs)
        if response.status_code >= 400:
            raise self._error(response)
        return response
