"""httpx client for AxisCare's API: Bearer token plus the required version header, governed,
retried, errors parsed. People are read per kind (clients, leads, caregivers, applicants) by
following `nextPage`; ids overlap across kinds, so callers must key people by (kind, id). Leads
can be created (`POST /api/leads`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from quo_sync_dagster.core.ratelimit import Throttle
from quo_sync_dagster.governed_http import ApiClient, ApiUnavailable, GovernedHttp

__all__ = ["KINDS", "AxisCareApi", "AxisCareApiError", "AxisCareUnavailable"]

API_VERSION = "2023-10-01"  # the only value the spec's X-AxisCare-Api-Version enums allow
KINDS = ("clients", "leads", "caregivers", "applicants")
_IDS_PARAM = {
    "clients": "clientIds",
    "leads": "leadIds",
    "caregivers": "caregiverIds",
    "applicants": "applicantIds",
}
LOOKUP_CHUNK = 100  # ids per batch read; keeps the query string short


class AxisCareApiError(Exception):
    """A non-retryable answer from AxisCare. Carries the status; never the token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"AxisCare {status}: {message}")
        self.status = status
        self.message = message


class AxisCareUnavailable(ApiUnavailable):
    """AxisCare kept failing (5xx, timeouts, 429s) after every retry."""


def _describe(response: httpx.Response) -> str:
    request = f"{response.request.method} {response.request.url.path}"
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        errors = None
    detail = "; ".join(map(str, errors)) if isinstance(errors, list) and errors else None
    return f"{detail or response.text[:200] or 'no body'} ({request})"


def _people(body: dict[str, Any], kind: str) -> tuple[list[dict[str, Any]], str | None]:
    """Both shapes: the spec's (`results.<kind>` array for clients/leads, bare `<kind>` array
    for caregivers/applicants) and the live one (`results.<kind>` object keyed by id)."""
    container = body["results"] if isinstance(body.get("results"), dict) else body
    people = container.get(kind) or []
    if isinstance(people, dict):
        people = list(people.values())
    return people, container.get("nextPage") or None


class AxisCareApi(ApiClient):
    def __init__(
        self,
        base_url: str,
        token: str,
        api_version: str = API_VERSION,
        throttle: Throttle | None = None,
        max_attempts: int = 6,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._http = GovernedHttp(
            httpx.Client(
                base_url=self._base_url,
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-AxisCare-Api-Version": api_version,
                    "Accept": "application/json",
                },
                timeout=timeout_seconds,
            ),
            throttle,
            max_attempts,
            unavailable=AxisCareUnavailable,
            describe=_describe,
        )

    def _get(self, url: str, params: dict[str, Any] | None = None) -> httpx.Response:
        response = self._http.request("GET", url, params=params)
        # Caregivers/applicants answer 404 (with the list body) when nothing matches, and
        # production saw 404 for a cursor past the last page: both mean "no more people".
        if response.status_code in (200, 207, 404):
            return response
        raise AxisCareApiError(response.status_code, _describe(response))

    def _page_url(self, next_page_url: str) -> str:
        """`nextPage` is a full URL (one client saw a relative one); never follow it elsewhere."""
        url = urljoin(self._base_url + "/", next_page_url)
        if urlsplit(url).netloc != urlsplit(self._base_url).netloc:
            raise ValueError(f"nextPage points to another host: {urlsplit(url).netloc}")
        return url

    def list_people(
        self,
        kind: str,
        limit: int = 100,
        start_after_id: int | None = None,
        next_page_url: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of `kind` ascending by id, and the URL of the next page (None at the end).

        Pass `next_page_url` from the previous page, or `start_after_id` to resume; applicants
        ignore `limit` (the spec gives them none) and come in pages of the server's size."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if next_page_url is not None:
            response = self._get(self._page_url(next_page_url))
        else:
            params: dict[str, Any] = {"limit": limit}
            if start_after_id is not None:
                params["startAfterId"] = start_after_id
            response = self._get(f"/api/{kind}", params)
        if response.status_code == 404:
            return [], None
        return _people(response.json(), kind)

    def get_people(self, kind: str, ids: Iterable[int]) -> list[dict[str, Any]]:
        """The people of `kind` with these ids (batch read via `<kind>Ids`); unknown ids are
        left out."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        wanted = sorted(set(ids))
        found: list[dict[str, Any]] = []
        for i in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[i : i + LOOKUP_CHUNK]
            params = {_IDS_PARAM[kind]: ",".join(map(str, chunk)), "limit": len(chunk)}
            response = self._get(f"/api/{kind}", params)
            # Applicants have no limit: a chunk larger than their page continues on nextPage.
            while response.status_code != 404:
                people, next_page = _people(response.json(), kind)
                found.extend(people)
                if next_page is None:
                    break
                response = self._get(self._page_url(next_page))
        return found

    def create_lead(self, first_name: str, last_name: str, **fields: Any) -> dict[str, Any]:
        """POST /api/leads: the new lead (AxisCare makes it Active). `fields` are the spec's
        other camelCase keys (mobilePhone, homePhone, personalEmail, priorityNote, ...). Never
        re-sent when its outcome is unknown (a 5xx, a lost answer): OutcomeUnknown, so that
        the caller looks for the lead before creating another."""
        body = {"firstName": first_name, "lastName": last_name, **fields}
        response = self._http.request("POST", "/api/leads", json=body, idempotent=False)
        if response.status_code not in (200, 201):  # the spec says 201
            raise AxisCareApiError(response.status_code, _describe(response))
        results = response.json()["results"]
        # The spec's `results` is the lead; call-log answers nest theirs in `data`.
        return results["data"] if "id" not in results and "data" in results else results

    def create_call_log(
        self,
        caller_name: str,
        caller_phone: str,
        date_time: datetime,
        subject: str,
        notes: str,
        tags: Sequence[tuple[str, int]] = (),
        follow_up: bool = False,
    ) -> dict[str, Any]:
        """POST /api/call-logs; `tags` are (type, entityId) with type client/lead/caregiver/
        applicant. Returns the created call log (its `id` is the activity id)."""
        if date_time.tzinfo is None:
            raise ValueError("date_time must be timezone-aware (AxisCare wants an offset)")
        body = {
            "callerName": caller_name,
            "callerPhone": caller_phone,
            "followUp": follow_up,
            "dateTime": date_time.replace(microsecond=0).isoformat(),
            "subject": subject,
            "notes": notes,
            "tags": [{"type": t, "entityId": int(i)} for t, i in tags],
        }
        response = self._http.request("POST", "/api/call-logs", json=body)
        if response.status_code != 200:
            raise AxisCareApiError(response.status_code, _describe(response))
        return response.json()["results"]["data"]

    def get_call_log(self, call_log_id: int) -> dict[str, Any] | None:
        """GET /api/call-logs/{id}; None when there is no such call log."""
        response = self._http.request("GET", f"/api/call-logs/{int(call_log_id)}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise AxisCareApiError(response.status_code, _describe(response))
        return response.json()["results"]["data"]

    def update_call_log(self, call_log_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH /api/call-logs/{id} with only the given keys (the spec's camelCase names:
        subject, notes, followUp, ...); returns the updated call log. Raises AxisCareApiError
        with status 404 for an unknown id. Setting the same values again changes nothing, so
        the PATCH is retried like a read; `comments` (appended, not set) are not taken."""
        if "comments" in fields:
            raise ValueError("comments are appended by each PATCH: not safe to retry")
        response = self._http.request("PATCH", f"/api/call-logs/{int(call_log_id)}", json=fields)
        if response.status_code != 200:
            raise AxisCareApiError(response.status_code, _describe(response))
        return response.json()["results"]["data"]
