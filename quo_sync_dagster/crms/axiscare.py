"""AxisCare (home care): clients, leads, caregivers and applicants become Quo contacts.

Integration settings: `base_url`, the site (`https://{siteNumber}.axiscare.com`); the credential
is the API token. Paging and freshness follow what the API can do, not what the contract hopes:

* Order: AxisCare has no sort parameter and lists every kind by ascending id, so pages come in
  id order (oldest first) whatever `sort_desc` asks. Ids ascend with creation, so the last pages
  hold the newest people: `lists_oldest_first` makes the page sensor launch them first.
  Reversing within the API is impossible and reversing in memory would mean reading every page
  before writing any; the planner notes each page's cursor, so runs can still start anywhere.
* Paging: no total, so `total=None` and the page's `nextPage` URL is the cursor of the next page.
* `modified_since`: no person list has a modified-since filter (and records carry no update
  time), so it is ignored: every poll is a full scan, and the store's content hashes keep
  unchanged people from being written to Quo again.
* Ids overlap across kinds, so externalIds are "<type>-<id>" ("client-625").
* No record marks a deletion: an inactive `status` (Discharged, Deceased, a lost lead) is the
  person's state, and their family or they may still call, so everyone listed is synced.
* Activities: `POST /api/call-logs` tagged with the person, later versions of the call through
  `PATCH /api/call-logs/{id}` (same id). AxisCare has no SMS activity, so an SMS is a call log
  whose subject says it is an SMS. A missed incoming call says so in its subject and is
  flagged `followUp` (someone should call back).
* Webhooks exist but are configured by AxisCare support in the admin UI, with no API: polling.
* An unknown caller becomes a lead (`POST /api/leads`: a prospective client, as AxisCare keeps
  them) named "Unknown caller", with the number as mobile phone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from quo_sync_dagster.core.activity_text import call_lines, sms_lines
from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    InvalidRecord,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.core.sanitize import clean_or_none
from quo_sync_dagster.crms.axiscare_api import KINDS, AxisCareApi, AxisCareApiError
from quo_sync_dagster.crms.base import (
    CRMConfig,
    CRMConnector,
    PersonObjectType,
    QueueConfig,
    SyncConfig,
)
from quo_sync_dagster.crms.fields import (
    PhonePair,
    PhoneProblem,
    aware,
    crm_id,
    display_name,
    e164,
    emails,
    phones,
    shown_id,
    text,
)
from quo_sync_dagster.governed_http import OutcomeUnknown

MAX_PAGE = 500  # the spec's `limit` maximum (clients, leads); applicants use the server's size
_SINGULAR = {kind: kind.removesuffix("s") for kind in KINDS}  # "clients" -> "client"
_KIND_OF = {singular: kind for kind, singular in _SINGULAR.items()}
_EXTERNAL_ID = re.compile(r"(client|lead|caregiver|applicant)-([1-9][0-9]*)")
# Profile pages as the spec's call-log tag URLs show them; leads/applicants have none documented.
_PROFILE_PAGE = {"clients": "customers", "caregivers": "caregivers"}
_PHONES = (("homePhone", "home"), ("mobilePhone", "mobile"), ("otherPhone", "other"))
_PHONE_FIELD = {label: field for field, label in _PHONES}
_ALL_EMPTY = "homePhone, mobilePhone, otherPhone are empty"
_EMAILS = (("personalEmail", "personal"), ("billingEmail", "billing"))
# The name of a lead created for a caller nobody in AxisCare has (create_person_for_caller).
UNKNOWN_CALLER = ("Unknown", "caller")


class CallLogNotFound(AxisCareApiError, LookupError):
    """update_call_activity of a call log AxisCare does not have."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)


def _needs_call_back(call: CallActivity) -> bool:
    """A missed incoming call (voicemail or not) is flagged for follow-up: AxisCare's call log
    has no status, so this flag, with the subject, is how a missed call shows."""
    missed = call.outcome in (CallOutcome.MISSED, CallOutcome.VOICEMAIL)
    return missed and call.direction == "incoming"


def _phone_pairs(person: dict[str, Any]) -> list[PhonePair]:
    return [(label, text(person.get(field), field)) for field, label in _PHONES]


def _no_phone(external_id: str, problems: Sequence[PhoneProblem]) -> str:
    """The NoPhone reason: the fields whose numbers cannot be phone numbers, or that all are
    empty."""
    why = "; ".join(f"{_PHONE_FIELD[p.label]}: {p}" for p in problems) or _ALL_EMPTY
    return f"{external_id}: no phone number ({why})"


def parse_external_id(external_id: str) -> tuple[str, int]:
    """("client", 625) from "client-625". Anything else is refused rather than logged untagged
    (the peer wrote untagged call logs that no person shows)."""
    match = _EXTERNAL_ID.fullmatch(external_id or "")
    if match is None:
        raise ValueError(f"{external_id!r} is not an AxisCare externalId like 'client-625'")
    return match[1], int(match[2])


class AxisCareConnector(CRMConnector):
    name = "axiscare"
    quo_source = "axiscare"
    simulator = "quo_sync_dagster.sandbox.axiscare_server"
    crm_config = CRMConfig(
        person_object_types=[PersonObjectType(crm_object_name=kind) for kind in KINDS],
        # Big pages: each page is read twice (planning walk, then sync) under a low rate limit.
        sync_config=SyncConfig(
            lists_oldest_first=True,
            initial_batch_size=200,
            ongoing_batch_size=200,
            supports_webhooks=False,
            supports_modified_since=False,
            poll_interval_minutes=60,
        ),
        queue_config=QueueConfig(max_workers=4, batch_size=5, timeout=1800),
        # Unpublished; third parties report ~5 requests/s per token, so stay below it.
        requests_per_second=4.0,
    )

    def make_api(self) -> AxisCareApi:
        if not self.credential:
            raise ValueError(f"integration {self.integration.id} has no AxisCare API token")
        return AxisCareApi(self._base_url, self.credential, throttle=self.throttle)

    @property
    def _base_url(self) -> str:
        return str(self.integration.settings["base_url"]).rstrip("/")

    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        # Ascending ids whatever sort_desc says, and no modified filter: see the module docstring.
        people, next_page = self.api.list_people(
            object_type, min(limit, MAX_PAGE), next_page_url=cursor
        )
        return PersonPage(people, None, has_more=next_page is not None, next_cursor=next_page)

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        """`ids` are AxisCare ids ("625") or externalIds ("client-625"); those of another kind
        are not among the `object_type` people, so they are left out."""
        numbers = []
        for raw in ids:
            if raw.isdigit():
                numbers.append(int(raw))
                continue
            kind, number = parse_external_id(raw)
            if _KIND_OF[kind] == object_type:
                numbers.append(number)
        if not numbers:
            return []
        return self.api.get_people(object_type, numbers)

    def person_id(self, person: dict[str, Any]) -> str:
        return shown_id(person.get("id"))

    def record_key(self, record: dict[str, Any], object_type: str) -> str:
        return self.change_key(object_type, crm_id(record.get("id"), "id"))

    def change_key(self, object_type: str, person_id: str) -> str:
        return f"{_SINGULAR[object_type]}-{person_id}"

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        pid = crm_id(person.get("id"), "id")
        external_id = self.change_key(object_type, pid)
        # The name people use on the phone; AxisCare keeps it in goesBy (clients, caregivers).
        first = text(person.get("goesBy"), "goesBy") or text(person.get("firstName"), "firstName")
        last = text(person.get("lastName"), "lastName")
        addresses = emails((label, text(person.get(field), field)) for field, label in _EMAILS)
        numbers = phones(_phone_pairs(person), self.phone_rules, partial(_no_phone, external_id))
        first, last = display_name(first, last, addresses=addresses, numbers=numbers)
        # Profile pages exist only on a real AxisCare site (a simulator has none, and a new port
        # per start would change every link, so every contact, on each restart).
        site = urlsplit(self._base_url).hostname or ""
        profile = _PROFILE_PAGE.get(object_type) if site.endswith(".axiscare.com") else None
        return QuoContact(
            external_id=external_id,
            source=self.quo_source,
            first_name=first,
            last_name=last,
            company=None,  # people of a care agency have no employer field
            role=_SINGULAR[object_type].capitalize(),  # their role towards the agency
            emails=addresses,
            phone_numbers=numbers,
            source_url=f"{self._base_url}?{profile}-profile.php&id={pid}" if profile else None,
        )

    def create_person_for_caller(self, number: str) -> str:
        """A lead named "Unknown caller" whose mobile phone is the E.164 `number` (a caller is
        a prospective client: AxisCare's leads); returns its key, "lead-<id>".

        The create is never re-sent blindly: when its outcome is unknown (a 5xx, a lost
        answer) the leads are read (no list filters by phone: a full walk, only then) and the
        newest "Unknown caller" with `number` is the one it made; none found (or the walk
        failing too) raises OutcomeUnknown."""
        first, last = UNKNOWN_CALLER
        try:
            lead = self.api.create_lead(first, last, mobilePhone=number)
        except OutcomeUnknown as unknown:
            try:
                made = self._unknown_callers(number)
            except Exception as failed:
                unknown.add_note(f"looking for the person it may have made failed too: {failed}")
                raise unknown from None
            if not made:
                raise
            lead = max(made, key=lambda p: p["id"])  # ids ascend with creation
        return self.record_key(lead, "leads")

    def _unknown_callers(self, number: str) -> list[dict[str, Any]]:
        """The leads named "Unknown caller" that hold `number`."""
        found, cursor = [], None
        while True:
            leads, cursor = self.api.list_people("leads", MAX_PAGE, next_page_url=cursor)
            found += [
                lead
                for lead in leads
                if (lead.get("firstName"), lead.get("lastName")) == UNKNOWN_CALLER
                and self._holds(lead, number)
            ]
            if cursor is None:
                return found

    def _holds(self, person: dict[str, Any], number: str) -> bool:
        # The number as it was written, whatever the integration's policy keeps for syncing.
        possible = replace(self.phone_rules, require_valid=False)
        try:
            return number in {phone.value for phone in e164(_phone_pairs(person), possible)[0]}
        except InvalidRecord:
            return False

    def _log(self, activity: CallActivity | SmsActivity, lines: list[str], follow_up: bool) -> str:
        """A call log tagged with the person: subject = the first line, notes = the others.
        The caller is who placed the call: the person (named as in AxisCare, with the number
        Quo saw, else their first phone) when it came in, else the Quo user and number."""
        tag_type, entity_id = parse_external_id(activity.contact_external_id)
        found = self.api.get_people(_KIND_OF[tag_type], [entity_id])
        if not found:
            raise LookupError(f"AxisCare has no {tag_type} {entity_id}")
        if activity.direction == "incoming":
            person = found[0]
            name = " ".join(
                n for f in ("firstName", "lastName") if (n := clean_or_none(person.get(f)))
            )
            numbers, _ = e164(_phone_pairs(person), self.phone_rules)
            caller_name = name or activity.contact_external_id
            caller_phone = activity.external_number or (numbers[0].value if numbers else "")
        else:
            caller_name = f"{activity.quo_user} (Quo)" if activity.quo_user else "Quo"
            caller_phone = activity.quo_number or ""
        created = self.api.create_call_log(
            caller_name=caller_name,
            caller_phone=caller_phone,
            date_time=aware(activity.timestamp),
            subject=lines[0],
            notes="\n".join(lines[1:]),
            tags=[(tag_type, entity_id)],
            follow_up=follow_up,
        )
        return str(created["id"])

    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        # AxisCare has no SMS activity; a call log is the only timeline entry the API writes.
        return self._log(activity, sms_lines(activity), follow_up=False)

    def log_call_to_activity(self, activity: CallActivity) -> str:
        return self._log(activity, call_lines(activity), _needs_call_back(activity))

    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """PATCH the call log in place (subject, notes and followUp: the rest does not change
        as Quo tells more about a call); the id stays. Raises CallLogNotFound for an id
        AxisCare does not have."""
        if not activity_id.isdigit():
            raise CallLogNotFound(f"{activity_id!r} is not an AxisCare call log id")
        lines = call_lines(activity)
        try:
            self.api.update_call_log(
                int(activity_id),
                subject=lines[0],
                notes="\n".join(lines[1:]),
                followUp=_needs_call_back(activity),
            )
        except AxisCareApiError as exc:
            if exc.status == 404:
                message = (
                    f"AxisCare has no call log {activity_id} (Quo call {activity.quo_call_id})"
                )
                raise CallLogNotFound(message) from exc
            raise
        return activity_id

    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        raise NotImplementedError(
            "AxisCare has no webhook API (AxisCare support configures webhooks in its admin UI), "
            "so AxisCare people are synced by polling"
        )
