"""Attio: the `people` object into Quo contacts, calls and SMS back as notes, record webhooks.
An unknown caller can be created as a person ("Unknown caller" with the number).

A person's `company` is a reference to a companies record: `prepare_page` reads the names of a
page's companies in one query and keeps them for the run. Attio records carry no deleted or
merged marker (such a record is gone: 404), so nothing is excluded here.

A call's note is replaced (create, then delete) each time Quo tells more about the call: Attio
has no note update. Its plain-text body ends with "Quo call id: <id>", which finds it again.

Integration settings: `base_url` (default Attio's API) and optionally `custom_fields`, a map of
Attio text attribute slug -> Quo custom field key (e.g. {"lead_source": "lead-source"}); only
mapped attributes are sent, since Quo rejects keys its workspace does not define.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

from quo_sync_dagster.core.activity_text import call_lines, sms_lines
from quo_sync_dagster.core.models import (
    CallActivity,
    CustomFieldValue,
    InvalidRecord,
    LabeledValue,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.crms.attio_api import COMPANIES, PEOPLE, AttioApi, AttioApiError
from quo_sync_dagster.crms.base import (
    CRMConfig,
    CRMConnector,
    PersonObjectType,
    QueueConfig,
    SyncConfig,
)
from quo_sync_dagster.crms.fields import crm_id, display_name, emails, items, phones, shown_id, text
from quo_sync_dagster.governed_http import OutcomeUnknown

DEFAULT_BASE_URL = "https://api.attio.com"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
# The name of a person created for a caller nobody in Attio has (create_person_for_caller).
UNKNOWN_CALLER = {"first_name": "Unknown", "last_name": "caller", "full_name": "Unknown caller"}


class _Subscription(dict[str, Any]):
    """The webhook subscription; its repr (and so str and logs) never shows the secret."""

    def __repr__(self) -> str:
        return repr({k: "***" if k == "secret" else v for k, v in self.items()})

    __str__ = __repr__


def _active(person: dict[str, Any], attribute: str) -> list[dict[str, Any]]:
    """Current values only: Attio keeps superseded ones with an `active_until`."""
    values = person.get("values")
    if not isinstance(values, dict):
        if values is None:
            return []
        raise InvalidRecord(f"values must be an object, not {type(values).__name__}")
    found = items(values.get(attribute), attribute, dict)
    return [v for v in found if v.get("active_until") is None]


def _text(value: dict[str, Any], attribute: str, key: str) -> str | None:
    """The text of `key` in a value of `attribute`; errors name it attribute.key."""
    return text(value.get(key), f"{attribute}.{key}")


def _company_id(person: dict[str, Any]) -> str | None:
    """The record id of the company the person's current `company` value points at."""
    for value in _active(person, "company"):
        target = value.get("target_record_id")
        # Record ids are UUIDs: anything else would make Attio refuse the page's whole query.
        if value.get("target_object") == COMPANIES and isinstance(target, str):
            return target if _UUID.fullmatch(target) else None
    return None


def _company_name(company: dict[str, Any]) -> Any:
    """A company's current name as Attio sent it; the transform that shows it checks it."""
    with contextlib.suppress(InvalidRecord):
        return next(iter(_active(company, "name")), {}).get("value")
    return None


class NoteNotFound(AttioApiError, LookupError):
    """update_call_activity of a call that has no note on the person."""

    def __init__(self, message: str) -> None:
        super().__init__(404, "not_found", message)


class NoteNotReplaced(Exception):
    """The call's new note was written but an old one is still there (its delete failed): the
    next update of the call removes it, so the item must be retried, not dropped."""


def call_marker(quo_call_id: str) -> str:
    """The last line core.activity_text gives every call's body: how a note is found by call
    (a test keeps the two the same)."""
    return f"Quo call id: {quo_call_id}"


def _plaintext(note: dict[str, Any]) -> str:
    return str(note.get("content_plaintext") or "")


def _lines(note: dict[str, Any]) -> list[str]:
    return _plaintext(note).splitlines()


def _record_id(person: dict[str, Any]) -> Any:
    ids = person.get("id")
    return ids.get("record_id") if isinstance(ids, dict) else None


class AttioConnector(CRMConnector):
    name = "attio"
    quo_source = "attio"
    simulator = "quo_sync_dagster.sandbox.attio_server"
    stable_paging = "offset"  # limit/offset, created_at ascending
    webhook_secret_key = "secret"  # what setup_webhooks returns that signs every delivery
    crm_config = CRMConfig(
        person_object_types=[PersonObjectType(crm_object_name=PEOPLE)],
        # Attio's query default is 500 (no documented maximum); 200 keeps a page's Quo writes short.
        sync_config=SyncConfig(
            initial_batch_size=200,
            ongoing_batch_size=100,
            supports_webhooks=True,
            # No modified-since filter: a poll is a full scan, only a safety net for webhooks.
            supports_modified_since=False,
            poll_interval_minutes=720,
        ),
        # Quo's 10 writes/s per key bound throughput, so more concurrent runs would only wait.
        queue_config=QueueConfig(max_workers=4, batch_size=5, timeout=1800),
        # Attio allows 100 reads/s and 25 writes/s per workspace, plus score-based limits on
        # queries; one governor for both kinds stays under the write limit with headroom.
        requests_per_second=20.0,
    )

    @cached_property
    def _company_names(self) -> dict[str, str | None]:
        """Company record id -> name (None: Attio did not return it), for this run: a run is
        short, and a renamed company is read again by the next one."""
        return {}

    def make_api(self) -> AttioApi:
        if not self.credential:
            raise ValueError(f"integration {self.integration.id!r} has no Attio credential")
        base_url = self.integration.settings.get("base_url", DEFAULT_BASE_URL)
        return AttioApi(base_url, self.credential, throttle=self.throttle)

    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        """Offset paging by index (`cursor` unused), newest-created first: Attio has no
        updated_at, so `modified_since` cannot be honoured and every sync is a full scan.
        One extra row tells whether another page exists, so no empty trailing page is made."""
        rows = self.api.query_people(limit + 1, page * limit, sort_desc)
        return PersonPage(rows[:limit], total=None, has_more=len(rows) > limit)

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        return self.api.get_people(ids)  # no batch GET: a `record_id $in` query

    def person_id(self, person: dict[str, Any]) -> str:
        return shown_id(_record_id(person))

    def record_key(self, record: dict[str, Any], object_type: str) -> str:
        return crm_id(_record_id(record), "id.record_id")

    def prepare_page(self, records: Sequence[dict[str, Any]], object_type: str) -> None:
        """Read the names of the companies the page's people belong to that this run has not
        read yet: one `record_id $in` query per 500 of them (a page holds at most 200 people).
        Ones Attio does not return are remembered as nameless, so they are not asked for
        again."""
        wanted: set[str] = set()
        for record in records:
            with contextlib.suppress(InvalidRecord):  # its transform names what is wrong
                company = _company_id(record)
                if company is not None and company not in self._company_names:
                    wanted.add(company)
        if not wanted:
            return
        found = {
            company["id"]["record_id"]: _company_name(company)
            for company in self.api.get_companies(sorted(wanted))
        }
        self._company_names |= {rid: found.get(rid) for rid in wanted}

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        # A merge gives the surviving record a new record_id, so it arrives here as a new
        # contact; the webhook pipeline will delete the originals' contacts on record.merged.
        record_id = self.record_key(person, object_type)
        addresses = emails(
            ("email", _text(v, "email_addresses", "email_address"))
            for v in _active(person, "email_addresses")
        )
        numbers = self._phones(person)
        # Named by what prepare_page read: nothing when it was not read or is gone.
        company = text(self._company_names.get(_company_id(person)), "company name")
        name = next(iter(_active(person, "name")), {})
        first, last = display_name(
            _text(name, "name", "first_name"),
            _text(name, "name", "last_name"),
            full=_text(name, "name", "full_name"),
            company=company,
            addresses=addresses,
            numbers=numbers,
        )
        title = _text(next(iter(_active(person, "job_title")), {}), "job_title", "value")
        return QuoContact(
            external_id=record_id,
            source=self.quo_source,
            first_name=first,
            last_name=last,
            company=company,
            role=title,
            emails=addresses,
            phone_numbers=numbers,
            custom_fields=self._custom_fields(person),
            source_url=text(person.get("web_url"), "web_url", None),
        )

    def _phones(self, person: dict[str, Any]) -> tuple[LabeledValue, ...]:
        """E.164 numbers the phone rules keep; the others are dropped. Attio's stored
        phone_number is E.164 already; a number is read in its own country_code."""
        return phones(
            (
                (
                    "phone",
                    _text(value, "phone_numbers", "phone_number")
                    or _text(value, "phone_numbers", "original_phone_number"),
                    _text(value, "phone_numbers", "country_code"),
                )
                for value in _active(person, "phone_numbers")
            ),
            self.phone_rules,
        )

    def _custom_fields(self, person: dict[str, Any]) -> tuple[CustomFieldValue, ...]:
        mapping: dict[str, str] = self.integration.settings.get("custom_fields", {})
        fields = []
        for slug, key in mapping.items():
            value = next(iter(_active(person, slug)), {}).get("value")
            if value is not None:
                fields.append(CustomFieldValue(key, value))
        return tuple(fields)

    def create_person_for_caller(self, number: str) -> str:
        """A person named "Unknown caller" holding the E.164 `number`; returns its record id.

        The create is never re-sent blindly: when its outcome is unknown (a 5xx, a lost
        answer) the people holding `number` under that name are looked up, and the newest is
        the one it made; none found (or the lookup failing too) raises OutcomeUnknown."""
        values = {"name": [UNKNOWN_CALLER], "phone_numbers": [{"original_phone_number": number}]}
        try:
            person = self.api.create_person(values)
        except OutcomeUnknown as unknown:
            try:
                made = self.api.query_people(
                    1,
                    0,
                    filter={
                        "phone_numbers": number,
                        "name": {"full_name": {"$eq": UNKNOWN_CALLER["full_name"]}},
                    },
                )
            except Exception as failed:
                unknown.add_note(f"looking for the person it may have made failed too: {failed}")
                raise unknown from None
            if not made:
                raise
            person = made[0]  # newest created first
        return self.record_key(person, PEOPLE)

    # Attio has no call or message activity: notes are its only write-back path. Plain text,
    # so that markdown characters in a message stay as the person typed them. The title is
    # the activity's subject; the body its other lines, ending with the Quo object's id.
    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        lines = sms_lines(activity)
        return self._note(activity.contact_external_id, lines[0], lines[1:], activity.timestamp)

    def log_call_to_activity(self, activity: CallActivity) -> str:
        lines = call_lines(activity)
        return self._note(activity.contact_external_id, lines[0], lines[1:], activity.timestamp)

    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """Attio cannot edit a note (its spec has create, get, list and delete only), so the
        call's note is replaced: the new note is created first, then the old one deleted. A
        failed create leaves the old note; a failed delete leaves both and raises
        NoteNotReplaced. Nothing here ever deletes the last note of the call.

        Two notes are repaired by the next update: the person's notes are read first, and
        every note of this call counts (`activity_id`, and any note whose body ends with the
        call's Quo id: one a failed delete left, or a run killed between create and delete).
        One that already reads as it should is kept and the others deleted; otherwise all but
        one are deleted before the new note is created, so failures never pile notes up.
        Raises NoteNotFound when the person has no note of the call."""
        record_id, call_id = activity.contact_external_id, activity.quo_call_id
        marker = call_marker(call_id)
        notes = [
            n
            for n in self.api.iter_notes(record_id)
            if n["id"]["note_id"] == activity_id or (_lines(n) or [""])[-1] == marker
        ]
        if not notes:
            raise NoteNotFound(
                f"person {record_id} has no note {activity_id} of Quo call {call_id}"
            )
        lines = call_lines(activity)
        title, content = lines[0], "\n".join(lines[1:])
        current = [n for n in notes if (n["title"], _plaintext(n)) == (title, content)]
        mapped = [n for n in notes if n["id"]["note_id"] == activity_id]
        keep = (current or mapped or notes)[0]["id"]["note_id"]
        for note in notes:
            if note["id"]["note_id"] != keep:
                self.api.delete_note(note["id"]["note_id"])  # False (already gone) is fine
        if current:
            return keep  # it already reads as it should (e.g. a replayed update)
        # Not re-sent when its outcome is unknown: the next update finds such a note by its
        # last line and deletes it.
        new_id = self._note(record_id, title, lines[1:], activity.timestamp, idempotent=False)
        try:
            self.api.delete_note(keep)
        except Exception as exc:
            raise NoteNotReplaced(
                f"note {new_id} of Quo call {call_id} was written, but the old note {keep} "
                f"could not be deleted ({exc}); the next update of the call deletes it"
            ) from exc
        return new_id

    def _note(
        self, record_id: str, title: str, lines: list[str], at: str, idempotent: bool = True
    ) -> str:
        note = self.api.create_note(
            record_id, title, "\n".join(lines), "plaintext", created_at=at, idempotent=idempotent
        )
        return note["id"]["note_id"]

    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        """record.created/updated/deleted/merged. The client subscribes without a filter, so the
        receiver skips events whose id.object_id is not `peopleObjectId` (None while the
        workspace has no people: then every record event counts as a person's). Attio shows
        the signing secret only once: it is returned (to verify Attio-Signature) but never
        shown."""
        people_object_id = self.api.people_object_id()
        webhook = self.api.create_webhook(receiver_url)
        return _Subscription(
            webhook_id=webhook["id"]["webhook_id"],
            target_url=webhook["target_url"],
            event_types=[s["event_type"] for s in webhook["subscriptions"]],
            peopleObjectId=people_object_id,
            secret=webhook["secret"],
        )

    def webhooks_gone(self, subscription: dict[str, Any]) -> bool:
        """Whether Attio lost the webhook or stopped delivering to it: it marks a webhook
        inactive after 7 days of failed deliveries (active and degraded ones still deliver)."""
        webhook = self.api.get_webhook(subscription["webhook_id"])
        return webhook is None or webhook.get("status") == "inactive"

    def teardown_webhooks(self, subscription: dict[str, Any]) -> None:
        try:
            self.api.delete_webhook(subscription["webhook_id"])
        except AttioApiError as exc:
            if exc.status != 404:  # already gone is what teardown wants
                raise
