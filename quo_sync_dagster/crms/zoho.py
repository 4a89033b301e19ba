"""Zoho CRM: Contacts and Leads into Quo, and Accounts (companies, which Quo users call too) where
an integration's `object_types` names them; calls to the Calls module (updated in place as Quo
sends the call's recording, summary and transcript), SMS as Notes; a Lead created for a caller
nobody in Zoho has, where the integration asks for it (an unknown caller is a prospect).

Integration settings: `base_url`, the data centre's API domain (the OAuth token response's
`api_domain`, or the simulator's URL), and optionally `org_domain_name` (Zoho's org
`domain_name`) so that contacts link back to their CRM record.

Record keys are "<module>-<id>" ("Accounts-3652397000000123001"): the module tells activities
where a call or note goes, whether or not Zoho's ids are unique across modules.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from quo_sync_dagster.core.activity_text import call_lines, call_subject, sms_lines, sms_subject
from quo_sync_dagster.core.models import (
    CallActivity,
    CallOutcome,
    Excluded,
    LabeledValue,
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
from quo_sync_dagster.crms.fields import (
    PhoneProblem,
    aware,
    crm_id,
    display_name,
    emails,
    items,
    phones,
    shown_id,
    text,
)
from quo_sync_dagster.crms.zoho_api import (
    DEFAULT_FIELDS,
    MAX_PER_PAGE,
    PAGE_LIMIT,
    ZohoApi,
    ZohoApiError,
)

MODULES = ("Contacts", "Leads", "Accounts")
# Other_Phone is documented for Contacts only, and Zoho refuses fields a module lacks.
FIELDS = {
    "Contacts": (*DEFAULT_FIELDS["Contacts"], "Other_Phone"),
    "Leads": (*DEFAULT_FIELDS["Leads"], "Converted__s"),
    "Accounts": DEFAULT_FIELDS["Accounts"],
}
# An Account's Fax is left out as a Contact's is: Quo would offer a fax line for calls and texts.
PHONES = (("Phone", "work"), ("Mobile", "mobile"), ("Home_Phone", "home"), ("Other_Phone", "other"))
_PHONE_FIELD = {label: field for field, label in PHONES}
EMAILS = (("Email", "primary"), ("Secondary_Email", "secondary"))
# Zoho allows a week and silently turns anything longer into one hour: stay well inside it.
CHANNEL_TTL = timedelta(days=6)
MAX_TEXT = 32_000  # a Description (or Note_Content) textarea holds 32,000 characters
CALLER_MODULE = "Leads"  # where a person created for an unknown caller goes
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def caller_name(number: str) -> str:
    """The Last_Name (Zoho's one mandatory name field) of a Lead made for an unknown caller."""
    return f"Unknown caller {number}"


class CallNotFound(ZohoApiError, LookupError):
    """update_call_activity of a Calls record Zoho does not have (any more)."""


def _call(activity: CallActivity) -> dict[str, Any]:
    """The Calls fields a create and an update share. Call_Type is Zoho's own marker for a
    missed call, so any call nobody answered (or still ringing) is "Missed", whatever its
    direction (the subject says which); an answered one is Inbound or Outbound, and Zoho
    refuses those with a zero duration: an answered call lasted at least a second."""
    if activity.outcome is CallOutcome.ANSWERED:
        call_type = "Inbound" if activity.direction == "incoming" else "Outbound"
        seconds = max(activity.duration_seconds, 1)
    else:
        call_type, seconds = "Missed", max(activity.duration_seconds, 0)
    return {
        "subject": call_subject(activity),
        "call_type": call_type,
        "duration_seconds": seconds,
        "description": _text(call_lines(activity)),
    }


def _text(lines: list[str]) -> str:
    """Description and Note_Content are plain text, bounded: the rest is in Quo."""
    text = "\n".join(lines)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _no_phone(problems: Sequence[PhoneProblem]) -> str:
    """Zoho's message names the fields of the numbers that cannot be phone numbers."""
    why = "; ".join(f"{_PHONE_FIELD[p.label]}: {p}" for p in problems) or "none given"
    return f"no phone number ({why})"


def _events(modules: Sequence[str]) -> list[str]:
    return [f"{module}.all" for module in modules]


class ZohoConnector(CRMConnector):
    name = "zoho"
    quo_source = "zoho"
    simulator = "quo_sync_dagster.sandbox.zoho_server"
    stable_paging = "offset"  # `page` numbers
    max_offset = PAGE_LIMIT  # then only page_token, which is forward-only
    webhook_secret_key = "token"  # what setup_webhooks returns that Zoho echoes in callbacks
    crm_config = CRMConfig(
        person_object_types=[
            PersonObjectType(crm_object_name="Contacts"),
            PersonObjectType(crm_object_name="Leads"),
            PersonObjectType(crm_object_name="Accounts", default=False),
        ],
        # A list call costs one API credit whatever its size, so read Zoho's maximum page.
        sync_config=SyncConfig(
            initial_batch_size=MAX_PER_PAGE,
            ongoing_batch_size=100,
            supports_webhooks=True,
            poll_interval_minutes=60,
        ),
        queue_config=QueueConfig(max_workers=4, batch_size=10, timeout=900),
        # Zoho meters credits per day and concurrent calls (5 on the Free edition); at ~1 s per
        # call, 4 requests/s keeps even a Free org under its concurrency limit.
        requests_per_second=4.0,
    )

    def make_api(self) -> ZohoApi:
        base_url = self.integration.settings.get("base_url")
        if not base_url or not self.credential:
            raise ValueError("zoho needs settings.base_url (the api_domain) and an access token")
        return ZohoApi(base_url, self.credential, throttle=self.throttle)

    @staticmethod
    def _module(object_type: str) -> str:
        if object_type not in MODULES:
            raise ValueError(f"zoho has no person module {object_type!r}; known: {MODULES}")
        return object_type

    # ---- people ---------------------------------------------------------------------------
    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        """No total: the planner walks "page:N" cursors while Zoho's `page` paging reaches
        (record 2,000), then "token:T" with the next_page_token (bound to this query, 24 h)."""
        module, per_page = self._module(object_type), min(limit, MAX_PER_PAGE)
        kind, _, value = (cursor or f"page:{page + 1}").partition(":")
        if kind not in ("page", "token"):
            raise ValueError(f"not a zoho page cursor: {cursor!r}")
        number = int(value) if kind == "page" else None
        records, info = self.api.list_records(
            module,
            per_page,
            page=number,
            page_token=None if kind == "page" else value,
            fields=FIELDS[module],
            sort_order="desc" if sort_desc else "asc",
            modified_since=modified_since,
        )
        more = bool(info.get("more_records"))
        next_cursor = None
        if more and number is not None and (number + 1) * per_page <= PAGE_LIMIT:
            next_cursor = f"page:{number + 1}"
        elif more:
            next_cursor = f"token:{info['next_page_token']}"
        return PersonPage(records, None, has_more=more, next_cursor=next_cursor)

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Zoho ids or this connector's record keys ("Contacts-<id>"). A key of another module
        names no record of this one (a sweep asks every module about every key), so it is
        left out, not sent as an id; none left, no request."""
        module = self._module(object_type)
        raw = []
        for i in ids:
            prefix, dash, record_id = i.rpartition("-")
            if not dash:
                raw.append(i)
            elif prefix == module:
                raw.append(record_id)
        return self.api.get_records(module, raw, fields=FIELDS[module])

    def person_id(self, person: dict[str, Any]) -> str:
        return shown_id(person.get("id"))

    def record_key(self, record: dict[str, Any], object_type: str) -> str:
        return self.change_key(object_type, crm_id(record.get("id"), "id"))

    def change_key(self, object_type: str, person_id: str) -> str:
        return f"{self._module(object_type)}-{person_id}"

    @classmethod
    def earlier_key(cls, key: str) -> str:
        return key.partition("-")[2] or key  # the earlier sync wrote the bare record id

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        module = self._module(object_type)
        record_id = crm_id(person.get("id"), "id")
        if module == "Accounts":
            return self._account(person, record_id)
        if module == "Leads" and person.get("Converted__s") is True:
            # Zoho made a Contact of this lead (and keeps its data there): syncing the lead
            # too would give the person a second Quo contact.
            raise Excluded("a converted lead (Converted__s): the person is a Zoho Contact now")
        # Every field is read before the phones: a malformed record fails, whatever its phones.
        first = text(person.get("First_Name"), "First_Name")
        last = text(person.get("Last_Name"), "Last_Name")
        full = text(person.get("Full_Name"), "Full_Name")
        # Contacts name their company in a lookup (an object); Leads in the text field Company.
        account = items(person.get("Account_Name"), "Account_Name", dict)
        company = (
            text(account[0].get("name"), "Account_Name.name")
            if account
            else text(person.get("Company"), "Company")
        )
        role = text(person.get("Title"), "Title")
        addresses = emails((label, text(person.get(field), field)) for field, label in EMAILS)
        # Phone == Mobile: the number once, as work.
        numbers = phones(
            ((label, text(person.get(field), field)) for field, label in PHONES),
            self.phone_rules,
            _no_phone,
        )
        names = display_name(
            first, last, full=full, company=company, addresses=addresses, numbers=numbers
        )
        return self._contact(
            module, record_id, names, company, numbers, role=role, addresses=addresses
        )

    def _account(self, account: dict[str, Any], record_id: str) -> QuoContact:
        """A company as a contact: its name shown as the first name and as the company, its
        Phone as work (Accounts hold no e-mail)."""
        name = text(account.get("Account_Name"), "Account_Name")
        numbers = phones(
            [("work", text(account.get("Phone"), "Phone"))], self.phone_rules, _no_phone
        )
        names = display_name(None, None, company=name, numbers=numbers)
        return self._contact("Accounts", record_id, names, name, numbers)

    def _contact(
        self,
        module: str,
        record_id: str,
        names: tuple[str, str | None],
        company: str | None,
        numbers: tuple[LabeledValue, ...],
        role: str | None = None,
        addresses: tuple[LabeledValue, ...] = (),
    ) -> QuoContact:
        return QuoContact(
            external_id=self.change_key(module, record_id),
            source=self.quo_source,
            first_name=names[0],
            last_name=names[1],
            company=company,
            role=role,
            emails=addresses,
            phone_numbers=numbers,
            source_url=self._record_url(module, record_id),
        )

    def create_person_for_caller(self, number: str) -> str:
        """A Lead whose Last_Name is "Unknown caller <number>" and whose Phone is the E.164
        `number` (Company, optional unless a layout rule asks for it, is left empty); its
        record key, "Leads-<id>". ZohoOutcomeUnknown, never a second POST, if Zoho's answer
        is lost."""
        if not _E164.fullmatch(number):
            raise ValueError(f"{number!r} is not an E.164 number")
        lead = {"Last_Name": caller_name(number), "Phone": number}
        return self.change_key(CALLER_MODULE, self.api.create_record(CALLER_MODULE, lead))

    def _record_url(self, module: str, record_id: str) -> str | None:
        """Zoho's web UI lives at crm.zoho.<dc>/crm/<org domain_name>/tab/<module>/<id>."""
        org = self.integration.settings.get("org_domain_name")
        if not org:
            return None
        base = self.integration.settings["base_url"].rstrip("/")
        host = urlsplit(base).hostname or ""
        if host.startswith("www.zohoapis."):
            dc = host.removeprefix("www.zohoapis.")
            base = "https://crm.zohocloud.ca" if dc == "ca" else f"https://crm.zoho.{dc}"
        return f"{base}/crm/{org}/tab/{module}/{record_id}"

    # ---- activities -----------------------------------------------------------------------
    def _person_ref(self, external_id: str) -> tuple[str, str]:
        module, _, record_id = external_id.partition("-")
        if module not in MODULES or not record_id.isdigit():
            raise ValueError(f"{external_id!r} is not a zoho external id (Contacts-<id>)")
        return module, record_id

    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        # Zoho has no SMS module; a Note on the person is what its timeline shows.
        module, record_id = self._person_ref(activity.contact_external_id)
        return self.api.create_note(
            module, record_id, _text(sms_lines(activity)), title=sms_subject(activity)
        )

    def log_call_to_activity(self, activity: CallActivity) -> str:
        module, record_id = self._person_ref(activity.contact_external_id)
        return self.api.create_call(
            module, record_id, start_time=aware(activity.timestamp), **_call(activity)
        )

    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """PUT the Calls record with the whole call as known now; same id."""
        if not activity_id.isdigit():
            raise ValueError(f"{activity_id!r} is not a Zoho Calls record id")
        try:
            return self.api.update_call(activity_id, **_call(activity))
        except ZohoApiError as exc:
            if exc.record_missing:
                raise CallNotFound(
                    exc.status,
                    exc.code,
                    f"Zoho has no Calls record {activity_id} to update for Quo call "
                    f"{activity.quo_call_id} (deleted in Zoho?)",
                    exc.details,
                ) from exc
            raise

    # ---- notifications --------------------------------------------------------------------
    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        """A watch channel on the modules the integration syncs (Accounts only when it syncs
        them: every notification costs a read by id, and the token may lack the Accounts
        scope); Zoho echoes `token` in every notification (it signs nothing)."""
        # A random channel id per integration: a shared constant lets installs replace each other.
        channel_id, token = str(10**12 + secrets.randbelow(9 * 10**12)), secrets.token_hex(20)
        events = _events(self.object_types)
        granted = self.api.watch(
            channel_id, events, receiver_url, token, datetime.now(UTC) + CHANNEL_TTL
        )
        return {
            "channel_id": channel_id,
            "token": token,
            "notify_url": receiver_url,
            "events": events,
            "expires_at": granted[0]["channel_expiry"],
        }

    def renew_webhooks(self, subscription: dict[str, Any]) -> dict[str, Any]:
        """Move the channel's expiry; a channel that already lapsed is subscribed again. The
        events follow the integration's modules now, so a module added to (or dropped from)
        its `object_types` is watched (or not) from the next renewal on."""
        expires = datetime.now(UTC) + CHANNEL_TTL
        channel_id, token = subscription["channel_id"], subscription["token"]
        url, events = subscription["notify_url"], _events(self.object_types)
        try:
            granted = self.api.renew_watch(channel_id, events, expires, token, url)
        except ZohoApiError as exc:
            if exc.code != "NOT_SUBSCRIBED":
                raise
            granted = self.api.watch(channel_id, events, url, token, expires)
        return {**subscription, "events": events, "expires_at": granted[0]["channel_expiry"]}

    def webhooks_gone(self, subscription: dict[str, Any]) -> bool:
        """Whether Zoho no longer lists the channel as live (lapsed or unsubscribed)."""
        live = {str(channel.get("channel_id")) for channel in self.api.list_watches()}
        return str(subscription["channel_id"]) not in live

    def teardown_webhooks(self, subscription: dict[str, Any]) -> None:
        # Zoho answers an unknown channel in the body, not with an error status: gone is fine.
        self.api.unwatch([subscription["channel_id"]])
