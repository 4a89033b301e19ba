"""httpx client for the Zoho CRM v8 API: listing and batch read of people (Contacts, Leads) and
Accounts, insert, Calls (create, update), Notes, watch channels.

Throttling, the 429 signal (Zoho sends no Retry-After) and retries are GovernedHttp's. Errors
carry Zoho's `code` (INVALID_TOKEN tells the caller to refresh the 1-hour access token) and
never the token itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx

from quo_sync_dagster.core.ratelimit import Throttle
from quo_sync_dagster.governed_http import ApiClient, ApiUnavailable, GovernedHttp, OutcomeUnknown

__all__ = ["DEFAULT_FIELDS", "ZohoApi", "ZohoApiError", "ZohoOutcomeUnknown", "ZohoUnavailable"]

API = "/crm/v8"
MAX_PER_PAGE = 200
PAGE_LIMIT = 2000  # beyond this many records `page` is refused; page_token carries on
MAX_IDS = 100
_PERSON = (
    "First_Name",
    "Last_Name",
    "Full_Name",
    "Email",
    "Secondary_Email",
    "Phone",
    "Mobile",
    "Home_Phone",
    "Title",
    "Created_Time",
    "Modified_Time",
)
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "Contacts": (*_PERSON, "Account_Name"),  # on Contacts a lookup: {name, id}
    "Leads": (*_PERSON, "Company"),
    "Accounts": ("Account_Name", "Phone", "Created_Time", "Modified_Time"),  # here the name
}


class ZohoApiError(Exception):
    """A non-retryable answer from Zoho, with its status and error code; never the token."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"Zoho {status} {code or '-'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def record_missing(self) -> bool:
        """Zoho's answer to a record id in the URL that it does not have (or no longer has)."""
        return self.code == "INVALID_DATA" and (
            "resource_path_index" in self.details or self.message.startswith("the id given")
        )


class ZohoUnavailable(ApiUnavailable):
    """Zoho kept failing (5xx, timeouts, 429s) after every retry."""


class ZohoOutcomeUnknown(OutcomeUnknown, ZohoUnavailable):
    """A create (call, note, person) was sent and its answer lost or a 5xx: Zoho may have
    written it, so it was not sent again."""


def _error_of(status: int, item: Any, request: str) -> ZohoApiError:
    if not isinstance(item, dict):
        return ZohoApiError(status, None, f"{str(item)[:200]} on {request}")
    details = item.get("details")
    suffix = f" {json.dumps(details, ensure_ascii=False)}" if details else ""
    return ZohoApiError(
        status,
        item.get("code"),
        f"{item.get('message')}{suffix} on {request}",
        details if isinstance(details, dict) else None,
    )


def parse_error(response: httpx.Response) -> ZohoApiError:
    """Zoho's `{code, message, details, status}`, top level or as the first per-record result."""
    request = f"{response.request.method} {response.request.url.path}"
    try:
        body = response.json()
    except ValueError:
        return ZohoApiError(response.status_code, None, f"{response.text[:200]!r} on {request}")
    for key in ("data", "watch"):
        if isinstance(body, dict) and isinstance(body.get(key), list) and body[key]:
            failed = [i for i in body[key] if isinstance(i, dict) and i.get("status") == "error"]
            return _error_of(response.status_code, (failed or body[key])[0], request)
    return _error_of(response.status_code, body, request)


def _duration(seconds: int) -> str:
    """Zoho's Call_Duration, mm:ss (minutes may exceed 59)."""
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _call_fields(
    subject: str, call_type: str, duration_seconds: int, description: str | None
) -> dict[str, Any]:
    """What a call says, the same in a create and an update."""
    call: dict[str, Any] = {
        "Subject": subject,
        "Call_Type": call_type,
        "Call_Duration": _duration(duration_seconds),
    }
    if call_type == "Outbound":
        call["Outbound_Call_Status"] = "Completed"
    if description is not None:
        call["Description"] = description
    return call


def _zoho_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("Zoho needs times with an offset; got a naive datetime")
    return moment.isoformat(timespec="seconds")


class ZohoApi(ApiClient):
    def __init__(
        self,
        api_domain: str,
        access_token: str,
        throttle: Throttle | None = None,
        max_attempts: int = 6,
        timeout_seconds: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = GovernedHttp(
            httpx.Client(
                base_url=api_domain.rstrip("/") + API,
                # Zoho's own scheme; "Bearer" is answered with 401 INVALID_TOKEN.
                headers={"Authorization": f"Zoho-oauthtoken {access_token}"},
                timeout=timeout_seconds,
                transport=transport,
            ),
            throttle,
            max_attempts,
            unavailable=ZohoUnavailable,
            outcome_unknown=ZohoOutcomeUnknown,
            describe=lambda r: str(parse_error(r)),
        )

    # ---- people ---------------------------------------------------------------------------
    def list_records(
        self,
        module: str,
        per_page: int = MAX_PER_PAGE,
        page: int | None = None,
        page_token: str | None = None,
        fields: Sequence[str] | None = None,
        sort_by: str = "Modified_Time",
        sort_order: str = "desc",
        modified_since: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One page and its `info`. Zoho's 204 (nothing matches) is an empty last page."""
        params: dict[str, Any] = {
            "fields": ",".join(fields or DEFAULT_FIELDS[module]),
            "per_page": per_page,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
        if page_token is not None:
            params["page_token"] = page_token
        elif page is not None:
            params["page"] = page
        headers = {"If-Modified-Since": _zoho_time(modified_since)} if modified_since else {}
        body = self._json("GET", f"/{module}", params=params, headers=headers)
        if body is None:
            return [], {"per_page": per_page, "count": 0, "more_records": False}
        return body["data"], body["info"]

    def iter_records(
        self,
        module: str,
        per_page: int = MAX_PER_PAGE,
        fields: Sequence[str] | None = None,
        sort_by: str = "Modified_Time",
        sort_order: str = "desc",
        modified_since: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every matching record: `page` while Zoho allows it, then `page_token`."""
        page, token = 1, None
        query = {"fields": fields, "sort_by": sort_by, "sort_order": sort_order}
        while True:
            records, info = self.list_records(
                module,
                per_page,
                page=None if token else page,
                page_token=token,
                modified_since=modified_since,
                **query,
            )
            yield from records
            if not info.get("more_records"):
                return
            page += 1
            if token or page * per_page > PAGE_LIMIT:
                token = info["next_page_token"]

    def count(self, module: str) -> int:
        body = self._json("GET", f"/{module}/actions/count")
        return 0 if body is None else int(body["count"])

    def get_records(
        self, module: str, ids: Sequence[str], fields: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """The records that exist among `ids`, up to 100 ids per request (Zoho's limit)."""
        found: list[dict[str, Any]] = []
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), MAX_IDS):
            params = {
                "ids": ",".join(unique[start : start + MAX_IDS]),
                "fields": ",".join(fields or DEFAULT_FIELDS[module]),
            }
            body = self._json("GET", f"/{module}", params=params)
            found.extend(body["data"] if body else [])
        return found

    def create_record(self, module: str, record: dict[str, Any]) -> str:
        """Insert one record (POST /{module}, `{"data": [record]}`); its id. Zoho checks the
        module's mandatory fields (Last_Name for Contacts and Leads) and answers a refused
        record with a per-record error, raised as ZohoApiError. Not retried once its outcome
        is unknown (ZohoOutcomeUnknown): a second POST would be a second record."""
        return self._create(f"/{module}", record)

    # ---- activities -----------------------------------------------------------------------
    def create_call(
        self,
        person_module: str,
        person_id: str,
        subject: str,
        call_type: str,
        start_time: datetime,
        duration_seconds: int,
        description: str | None = None,
    ) -> str:
        """Log a call on a Contact, Lead or Account; returns the Calls record id.

        Zoho refuses a zero Call_Duration for Inbound/Outbound calls; that is the caller's call.
        Not retried once its outcome is unknown (ZohoOutcomeUnknown): a second POST would log
        the call twice.
        """
        call = _call_fields(subject, call_type, duration_seconds, description)
        call["Call_Start_Time"] = _zoho_time(start_time)
        if person_module == "Contacts":
            call["Who_Id"] = {"id": person_id}
        else:  # Who_Id only takes Contacts; a Lead or Account is the call's "Related To"
            call["$se_module"], call["What_Id"] = person_module, {"id": person_id}
        return self._create("/Calls", call)

    def update_call(
        self,
        call_id: str,
        subject: str,
        call_type: str,
        duration_seconds: int,
        description: str | None = None,
    ) -> str:
        """PUT /Calls/{id}: rewrite what the call says (its person and start stay); returns
        its id. A ZohoApiError whose `record_missing` is true if Zoho has no such call."""
        call = {"id": call_id, **_call_fields(subject, call_type, duration_seconds, description)}
        response = self._request("PUT", f"/Calls/{call_id}", json={"data": [call]})
        result = response.json()["data"][0]
        if result.get("status") != "success":
            raise parse_error(response)
        return result["details"]["id"]

    def create_note(
        self, parent_module: str, parent_id: str, content: str, title: str | None = None
    ) -> str:
        note: dict[str, Any] = {
            "Note_Content": content,
            "Parent_Id": {"module": {"api_name": parent_module}, "id": parent_id},
        }
        if title is not None:
            note["Note_Title"] = title
        return self._create("/Notes", note)

    def _create(self, path: str, record: dict[str, Any]) -> str:
        response = self._request("POST", path, json={"data": [record]}, idempotent=False)
        result = response.json()["data"][0]
        if result.get("status") != "success":  # a 2xx can still carry a per-record error
            raise parse_error(response)
        return result["details"]["id"]

    # ---- notifications --------------------------------------------------------------------
    def watch(
        self,
        channel_id: str,
        events: Sequence[str],
        notify_url: str,
        token: str,
        expires_at: datetime,
    ) -> list[dict[str, Any]]:
        """Subscribe; returns Zoho's per-event details, whose channel_expiry says what Zoho
        granted (an expiry over a week ahead silently becomes one hour)."""
        channel = {
            "channel_id": channel_id,
            "events": list(events),
            "notify_url": notify_url,
            "token": token,
            "channel_expiry": _zoho_time(expires_at),
            "return_affected_field_values": True,
            "notify_on_related_action": False,
        }
        return self._watch("POST", channel)

    def renew_watch(
        self,
        channel_id: str,
        events: Sequence[str],
        expires_at: datetime,
        token: str | None = None,
        notify_url: str | None = None,
    ) -> list[dict[str, Any]]:
        """Move a live channel's expiry; ZohoApiError NOT_SUBSCRIBED if it already lapsed."""
        channel: dict[str, Any] = {
            "channel_id": channel_id,
            "events": list(events),
            "channel_expiry": _zoho_time(expires_at),
        }
        if token is not None:
            channel["token"] = token
        if notify_url is not None:
            channel["notify_url"] = notify_url
        return self._watch("PATCH", channel)

    def list_watches(self) -> list[dict[str, Any]]:
        """The live channels (Zoho answers 204 when there are none)."""
        body = self._json("GET", "/actions/watch")
        return body["watch"] if body else []

    def unwatch(self, channel_ids: Sequence[str]) -> None:
        self._request("DELETE", "/actions/watch", params={"channel_ids": ",".join(channel_ids)})

    def _watch(self, method: str, channel: dict[str, Any]) -> list[dict[str, Any]]:
        response = self._request(method, "/actions/watch", json={"watch": [channel]})
        result = response.json()["watch"][0]
        if result.get("status") != "success":
            raise parse_error(response)
        return result["details"]["events"]

    # ---- transport ------------------------------------------------------------------------
    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        """The body, or None for Zoho's empty answers (204, or a 200 without a body)."""
        response = self._request(method, path, **kwargs)
        if response.status_code == 204 or not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError:  # a truncated page must not pass for the last one
            raise ZohoApiError(response.status_code, None, "response is not JSON") from None

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        response = self._http.request(method, path, idempotent=idempotent, **kwargs)
        if response.status_code >= 400:
            raise parse_error(response)
        return response
