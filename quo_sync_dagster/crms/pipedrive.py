"""Pipedrive: v2 persons into Quo contacts; SMS as notes and calls as call activities written back
(and updated in place as Quo sends the call's recording, summary and transcript); a person
created for a caller nobody in Pipedrive has, where the integration asks for it.

A v2 person names its organization by id only: `prepare_page` reads the names of a page's
organizations in one request (per 100 new ones) and keeps them for the run, so a contact's
company costs at most one extra request per page. A person Pipedrive lists as deleted
(`is_deleted`) is skipped, not synced.

Integration settings: `base_url` (the API base, e.g. https://acme.pipedrive.com) and optionally
`custom_fields`, a map of Pipedrive person custom field key -> Quo custom field key. The
credential is the API token. Webhooks use HTTP Basic auth (Pipedrive signs nothing) with a
password derived from the token and integration id: `webhook_basic_auth()` gives the receiver
the same pair, nothing stores it, and a new token means setting the webhooks up again.
"""

from __future__ import annotations

import hmac
import html
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

from quo_sync_dagster.core.activity_text import call_lines, call_subject, sms_lines
from quo_sync_dagster.core.models import (
    MAX_SAFE_INTEGER,
    CallActivity,
    CallOutcome,
    CustomFieldValue,
    Excluded,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.crms.base import (
    CRMConfig,
    CRMConnector,
    PersonObjectType,
    QueueConfig,
    SyncConfig,
)
from quo_sync_dagster.crms.fields import aware, display_name, emails, items, phones, shown_id, text
from quo_sync_dagster.crms.pipedrive_api import PipedriveApi, PipedriveApiError

LIST_LIMIT_MAX = 500  # GET /api/v2/persons
# v2 webhooks have no `merged`: a merge arrives as `delete` (merged_to_id) plus `change`.
WEBHOOK_ACTIONS = ("create", "change", "delete")
WEBHOOK_USER = "quo-sync"
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def caller_name(number: str) -> str:
    """The name of a person created for an unknown caller: Pipedrive needs one."""
    return f"Unknown caller {number}"


class ActivityNotFound(PipedriveApiError, LookupError):
    """update_call_activity of an activity Pipedrive does not have (any more)."""


def _person_key(record_key: str) -> int:
    if not record_key.isdigit():
        raise ValueError(f"{record_key!r} is not a Pipedrive person id")
    return int(record_key)


def _html(lines: list[str]) -> str:
    """Notes are HTML: every line escaped, the first (the subject) bold, line breaks kept."""
    head, *rest = (html.escape(line).replace("\n", "<br>") for line in lines)
    return f"<p><strong>{head}</strong></p>" + (f"<p>{'<br>'.join(rest)}</p>" if rest else "")


def _talk_seconds(call: CallActivity) -> int | None:
    """An activity's duration: how long the call was answered; a missed call has none."""
    return call.duration_seconds if call.outcome is CallOutcome.ANSWERED else None


def _org_id(value: Any) -> int | None:
    """A v2 `org_id` (a positive integer); None for none, for v1's object (which holds the
    name), and for what no organization has: one bad id must not fail its page's read."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SAFE_INTEGER:
        return value
    return None


def _labeled(person: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """(label, value) of the non-blank items of `field` (emails, phones), primary first:
    Pipedrive's is not always first. A bare string is an item without a label."""
    found = [
        {"value": i} if isinstance(i, str) else i
        for i in items(person.get(field), field, (dict, str))
    ]
    labeled = []
    for item in sorted(found, key=lambda item: not item.get("primary")):
        if value := text(item.get("value"), f"{field}.value"):
            labeled.append((text(item.get("label"), f"{field}.label") or "work", value))
    return labeled


class PipedriveConnector(CRMConnector):
    name = "pipedrive"
    quo_source = "pipedrive"
    simulator = "quo_sync_dagster.sandbox.pipedrive_server"
    crm_config = CRMConfig(
        person_object_types=[PersonObjectType(crm_object_name="Person")],
        # A list call costs 10 tokens whatever its size: full pages spare the daily budget.
        # Webhooks carry changes; the hourly poll catches what a banned webhook lost.
        sync_config=SyncConfig(
            initial_batch_size=LIST_LIMIT_MAX, ongoing_batch_size=100, supports_webhooks=True
        ),
        queue_config=QueueConfig(max_workers=4, batch_size=5, timeout=1800),
        # Lite plan API-token burst: 20 per 2 s; half of it leaves room for other token users.
        requests_per_second=5.0,
    )

    @cached_property
    def _org_names(self) -> dict[int, str | None]:
        """Organization id -> name (None: Pipedrive did not return it), for this run: a run is
        short, and a renamed organization is read again by the next one."""
        return {}

    def make_api(self) -> PipedriveApi:
        if not self.credential:
            raise ValueError(f"integration {self.integration.id!r} has no Pipedrive API token")
        return PipedriveApi(
            self.integration.settings["base_url"], self.credential, throttle=self.throttle
        )

    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        # No total: the planner walks the cursors once and passes page k its cursor.
        records, next_cursor = self.api.list_persons(
            min(limit, LIST_LIMIT_MAX),
            cursor,
            sort_by="update_time",
            sort_direction="desc" if sort_desc else "asc",
            updated_since=modified_since,
        )
        return PersonPage(records, None, has_more=next_cursor is not None, next_cursor=next_cursor)

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        return self.api.get_persons(int(i) for i in ids)

    def person_id(self, person: dict[str, Any]) -> str:
        return shown_id(person.get("id"))

    def prepare_page(self, records: Sequence[dict[str, Any]], object_type: str) -> None:
        """Read the names of the organizations the page's people belong to that this run has
        not read yet: one request for up to 100 of them (a full page of 500 people of more than
        100 new organizations takes more). Ones Pipedrive does not return are remembered as
        nameless, so they are not asked for again."""
        wanted = {_org_id(r.get("org_id")) for r in records} - {None} - self._org_names.keys()
        if not wanted:
            return
        found = {org["id"]: org.get("name") for org in self.api.get_organizations(wanted)}
        self._org_names |= {org: found.get(org) for org in wanted}

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        pid = self.record_key(person, object_type)
        if person.get("is_deleted") is True:  # soft-deleted, still listed until purged
            raise Excluded("deleted in Pipedrive (is_deleted)")
        addresses = emails(_labeled(person, "emails"))
        # Possible numbers in E.164, once each; the others are dropped.
        numbers = phones(_labeled(person, "phones"), self.phone_rules)
        company = self._company(person)
        first, last = display_name(
            text(person.get("first_name"), "first_name"),
            text(person.get("last_name"), "last_name"),
            full=text(person.get("name"), "name"),  # a person created with a name only
            company=company,
            addresses=addresses,
            numbers=numbers,
        )
        mapping = self.integration.settings.get("custom_fields") or {}
        values = person.get("custom_fields")
        values = values if isinstance(values, dict) else {}
        return QuoContact(
            external_id=pid,
            source=self.quo_source,
            first_name=first,
            last_name=last,
            company=company,
            role=text(person.get("job_title"), "job_title"),  # present with Contact Sync only
            emails=addresses,
            phone_numbers=numbers,
            custom_fields=tuple(
                CustomFieldValue(quo_key, values[key])
                for key, quo_key in mapping.items()
                if isinstance(values.get(key), str | int | float)
            ),
            source_url=f"https://app.pipedrive.com/person/{pid}",
        )

    def _company(self, person: dict[str, Any]) -> str | None:
        """v1-shaped payloads name the organization (`org_name`, or `org_id` as an object); a
        v2 person only has its id, named by what prepare_page read (nothing when it was not
        read, or Pipedrive no longer has it)."""
        org = person.get("org_id")
        if isinstance(org, dict):
            return text(org.get("name"), "org_id.name")
        named = text(person.get("org_name"), "org_name")
        return named or text(self._org_names.get(_org_id(org)), "organization name")

    def create_person_for_caller(self, number: str) -> str:
        """A person named "Unknown caller <number>" holding the E.164 `number` as its primary
        work phone; its record key (the person id). PipedriveOutcomeUnknown, never a second
        POST, if Pipedrive's answer is lost."""
        if not _E164.fullmatch(number):
            raise ValueError(f"{number!r} is not an E.164 number")
        created = self.api.create_person(caller_name(number), [number], phone_label="work")
        return self.record_key(created, "Person")

    # ---- activity write-back -----------------------------------------------------------------
    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        note = self.api.create_note(
            _person_key(activity.contact_external_id),
            _html(sms_lines(activity)),
            add_time=aware(activity.timestamp),
        )
        return str(note["id"])

    def log_call_to_activity(self, activity: CallActivity) -> str:
        """A call-type v2 activity rather than a call log: Pipedrive can create, read and
        delete call logs but not change them, and Quo's recording, summary and transcript come
        after the call. Pipedrive activities have no outcome field, so a missed call says so in
        its subject and note, and has no duration. Needs no phone number (a call log does), so
        no person lookup either: the other party's number is in the note."""
        created = self.api.create_activity(
            _person_key(activity.contact_external_id),
            call_subject(activity),
            activity_type="call",
            done=activity.outcome is not CallOutcome.RINGING,
            note=_html(call_lines(activity)),
            due=aware(activity.timestamp),
            duration_seconds=_talk_seconds(activity),
        )
        return str(created["id"])

    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """PATCH the activity in place with the whole call as known now; same id."""
        if not activity_id.isdigit():
            raise ValueError(f"{activity_id!r} is not a Pipedrive activity id")
        try:
            self.api.update_activity(
                int(activity_id),
                subject=call_subject(activity),
                done=activity.outcome is not CallOutcome.RINGING,
                note=_html(call_lines(activity)),
                duration_seconds=_talk_seconds(activity),
            )
        except PipedriveApiError as exc:
            if exc.status == 404:
                raise ActivityNotFound(
                    404,
                    f"Pipedrive has no activity {activity_id} to update for Quo call "
                    f"{activity.quo_call_id} (deleted in Pipedrive?)",
                ) from exc
            raise
        return activity_id

    # ---- webhooks ----------------------------------------------------------------------------
    def webhook_basic_auth(self) -> tuple[str, str]:
        """The Basic-auth pair the receiver must check; derived, so it is never stored."""
        secret = hmac.new(
            (self.credential or "").encode(), f"quo-sync:{self.integration.id}".encode(), "sha256"
        )
        return WEBHOOK_USER, secret.hexdigest()

    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        user, password = self.webhook_basic_auth()
        ids: list[int] = []
        try:
            for action in WEBHOOK_ACTIONS:
                hook = self.api.create_webhook(
                    receiver_url, action, "person", f"Quo sync: person {action}", user, password
                )
                ids.append(hook["id"])
        except Exception:
            self.teardown_webhooks({"webhookIds": ids})  # leave no half subscription behind
            raise
        # No password in here: the subscription gets stored and logged.
        return {"receiverUrl": receiver_url, "webhookIds": ids, "httpAuthUser": user}

    def webhooks_gone(self, subscription: dict[str, Any]) -> bool:
        """Whether Pipedrive lost any of the webhooks: it deletes one after 3 days of failed
        deliveries, and lists only those it still has."""
        listed = {str(hook["id"]) for hook in self.api.list_webhooks()}
        return not {str(i) for i in subscription.get("webhookIds", [])} <= listed

    def teardown_webhooks(self, subscription: dict[str, Any]) -> None:
        for webhook_id in subscription.get("webhookIds", []):
            try:
                self.api.delete_webhook(webhook_id)
            except PipedriveApiError as exc:
                # Pipedrive itself deletes a webhook after 3 days of failed deliveries.
                if exc.status != 404:
                    raise
