"""Attio: the `people` object into Quo contacts, calls and SMS back as notes, record webhooks.

Integration settings: `base_url` (default Attio's API) and optionally `custom_fields`, a map of
Attio text attribute slug -> Quo custom field key (e.g. {"lead_source": "lead-source"}); only
mapped attributes are sent, since Quo rejects keys its workspace does not define.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from quo_sync_dagster.core.models import (
    CallActivity,
    CustomFieldValue,
    InvalidRecord,
    LabeledValue,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.crms.attio_api import PEOPLE, AttioApi, AttioApiError
from quo_sync_dagster.crms.base import (
    CRMConfig,
    CRMConnector,
    PersonObjectType,
    QueueConfig,
    SyncConfig,
)
from quo_sync_dagster.crms.fields import crm_id, emails, items, phones, shown_id, text

DEFAULT_BASE_URL = "https://api.attio.com"


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

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        # A merge gives the surviving record a new record_id, so it arrives here as a new
        # contact; the webhook pipeline will delete the originals' contacts on record.merged.
        record_id = self.record_key(person, object_type)
        name = next(iter(_active(person, "name")), {})
        first, last = _text(name, "name", "first_name"), _text(name, "name", "last_name")
        if first is None and last is None:
            first, _, rest = (_text(name, "name", "full_name") or "").partition(" ")
            first, last = first or None, rest or None
        if first is None and last is None:
            raise InvalidRecord("no name: name has no first, last or full name")
        title = _text(next(iter(_active(person, "job_title")), {}), "job_title", "value")
        # No company: it is a reference to a companies record, which the client cannot read yet.
        return QuoContact(
            external_id=record_id,
            source=self.quo_source,
            first_name=first,
            last_name=last,
            role=title,
            emails=emails(
                ("email", _text(v, "email_addresses", "email_address"))
                for v in _active(person, "email_addresses")
            ),
            phone_numbers=self._phones(person),
            custom_fields=self._custom_fields(person),
            source_url=text(person.get("web_url"), "web_url", None),
        )

    def _phones(self, person: dict[str, Any]) -> tuple[LabeledValue, ...]:
        """E.164 numbers; invalid ones are dropped while one valid number remains. Attio's
        stored phone_number is E.164 already; a number is read in its own country_code."""
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
            self.integration.default_region,
        )

    def _custom_fields(self, person: dict[str, Any]) -> tuple[CustomFieldValue, ...]:
        mapping: dict[str, str] = self.integration.settings.get("custom_fields", {})
        fields = []
        for slug, key in mapping.items():
            value = next(iter(_active(person, slug)), {}).get("value")
            if value is not None:
                fields.append(CustomFieldValue(key, value))
        return tuple(fields)

    # Attio has no call or message activity: notes are its only write-back path. Plain text,
    # so that markdown characters in a message stay as the person typed them.
    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        title = f"{'Incoming' if activity.direction == 'incoming' else 'Outgoing'} SMS (Quo)"
        return self._note(activity.contact_external_id, title, activity.content, activity.timestamp)

    def log_call_to_activity(self, activity: CallActivity) -> str:
        minutes, seconds = divmod(activity.duration_seconds, 60)
        kind = "Incoming" if activity.direction == "incoming" else "Outgoing"
        content = f"Duration: {minutes}m {seconds:02d}s"
        if activity.summary:
            content += f"\n\nSummary: {activity.summary}"
        return self._note(
            activity.contact_external_id, f"{kind} call (Quo)", content, activity.timestamp
        )

    def _note(self, record_id: str, title: str, content: str, at: str) -> str:
        note = self.api.create_note(record_id, title, content, "plaintext", created_at=at)
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
