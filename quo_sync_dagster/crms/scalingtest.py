"""ScalingTest: a deterministic synthetic CRM for load tests and the demo.

Integration settings: `records` (default 10,000), `revision` (default 0; revision r > 0 edits
every record whose index ends in r % 10 and makes it the newest) and `paging` ("index", the
default, with a total; or "cursor": no total, each page reached through the previous one's
cursor, as most real CRMs page). The same settings always give
the same people, so a second sync of an unchanged CRM writes nothing. Three records in every
hundred are awkward on purpose: no phone and an impossible phone, which the sync skips
(`skipped_record_count` says how many), and no name, synced under a fallback name.
`hostile_share` (default 0) makes that share of the other records hostile in one of the ways of
HOSTILE, as real CRMs send them: `hostile_kind(i)` says which.
`changes` (default none) is the CRM changing while it is synced: a list of
`{"op": "create"|"update"|"delete", "i": index, "at": ISO time}` (`change(settings, ...)` adds
one); a created person has an index >= `records`, an update renames the person and makes it
modified at `at`, a deleted one is gone from lists and reads by id.
`activity_db` (default none) is the SQLite file that keeps the activities logged on its people
(ActivityLog), so that every process of a sync sees the same timeline; without it the timeline is
in memory, shared by the process's connectors of the integration.
"""

from __future__ import annotations

import math
import random
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from quo_sync_dagster.core.activity_text import call_lines, sms_lines
from quo_sync_dagster.core.models import (
    CallActivity,
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
from quo_sync_dagster.crms.fields import display_name, emails, items, phones, shown_id, text

_BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
_FIRST = ["Ana", "José", "Zoë", "Łukasz", "Mei", "Oluwaseun", "Siobhán", "Kenji", "Amara", "Björn"]
_LAST = ["García", "Nguyen", "O'Brien", "Müller", "Okafor", "Tanaka", "Silva", "Kowalski", "Ng"]
_AREA = ["212", "415", "617", "312", "206", "303", "512", "646"]
_NO_PHONE, _BAD_PHONE, _NO_NAME = 13, 47, 81  # index % 100 of the bad records


Person = dict[str, Any]
# Each kind breaks one thing of a good record; the person must sync cleaned, or fail alone
# naming the field (a wrong type, no valid phone).
HOSTILE: dict[str, Callable[[Person], Person]] = {
    "control_chars": lambda p: {
        **p,
        "first_name": f"\x00Bad\ud800{p['first_name']}\x07",
        "last_name": f"\u202e{p['last_name']}\u2066\n",
    },
    "huge_company": lambda p: {**p, "company": "Acme " * 20_000},  # 100 KB
    "email_as_string": lambda p: {**p, "emails": p["emails"][0]},
    "bad_emails": lambda p: {**p, "emails": ["no-at-sign", "", None, "a@b", *p["emails"]]},
    "email_as_list": lambda p: {**p, "emails": [*p["emails"], ["x@y.example"]]},
    "phone_as_object": lambda p: {**p, "phones": p["phones"][0]},
    "absurd_phone": lambda p: {**p, "phones": [{"type": "mobile", "number": "+1" + "9" * 100_000}]},
    "non_finite": lambda p: {**p, "title": math.nan, "company": math.inf},
    "int_id": lambda p: {**p, "id": 10**9 + int(p["id"].removeprefix("st-"))},
    "list_id": lambda p: {**p, "id": [p["id"]]},
    "bool_id": lambda p: {**p, "id": True},
    "name_as_object": lambda p: {**p, "first_name": None, "last_name": {"name": "x"}},
}


class ActivityNotFound(LookupError):
    """update_call_activity of an activity the synthetic CRM does not have."""


class ActivityLog:
    """The synthetic CRM's activity timeline: a row per activity, updated in place, with a
    fresh id per create (so a call logged twice shows as two activities, as in a real CRM).

    A SQLite file when `path` is given (every process sees it; SQLite locks writers); else a
    named in-memory database, kept alive by one connection held for the process's lifetime.
    """

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS activities (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " kind TEXT NOT NULL, quo_id TEXT NOT NULL, person TEXT NOT NULL, subject TEXT NOT NULL,"
        " body TEXT NOT NULL, outcome TEXT, at TEXT NOT NULL, revisions INTEGER NOT NULL)"
    )
    _KEEP_ALIVE: dict[str, sqlite3.Connection] = {}
    _LOCK = threading.Lock()

    def __init__(self, integration_id: str, path: str | None = None) -> None:
        if path:
            self._target, self._uri = str(path), False
        else:
            self._target, self._uri = (
                f"file:scalingtest-{integration_id}?mode=memory&cache=shared",
                True,
            )
            with self._LOCK:
                if self._target not in self._KEEP_ALIVE:
                    self._KEEP_ALIVE[self._target] = self._connect()
        with self._session() as db:
            db.execute(self._SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._target, uri=self._uri, timeout=30, check_same_thread=False)

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction (committed unless it raised), then closed."""
        db = self._connect()
        try:
            with db:
                yield db
        finally:
            db.close()

    def add(
        self, kind: str, quo_id: str, person: str, lines: list[str], at: str, outcome: str | None
    ) -> str:
        with self._session() as db:
            row = db.execute(
                "INSERT INTO activities (kind, quo_id, person, subject, body, outcome, at,"
                " revisions) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (kind, quo_id, person, lines[0], "\n".join(lines[1:]), outcome, at),
            )
        return f"st-{kind}-{row.lastrowid}"

    def replace(self, activity_id: str, lines: list[str], outcome: str | None) -> None:
        match = re.fullmatch(r"st-call-([1-9][0-9]*)", activity_id)
        changed = 0
        if match is not None:
            with self._session() as db:
                changed = db.execute(
                    "UPDATE activities SET subject = ?, body = ?, outcome = ?,"
                    " revisions = revisions + 1 WHERE id = ? AND kind = 'call'",
                    (lines[0], "\n".join(lines[1:]), outcome, int(match[1])),
                ).rowcount
        if not changed:
            raise ActivityNotFound(f"ScalingTest has no call activity {activity_id!r}")

    def all(self) -> list[dict[str, Any]]:
        """Every activity, oldest first."""
        with self._session() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM activities ORDER BY id").fetchall()
        return [{**dict(r), "id": f"st-{r['kind']}-{r['id']}"} for r in rows]


def change(settings: dict[str, Any], op: str, i: int) -> dict[str, Any]:
    """`settings` with one more change of person `i`, made now."""
    if op not in ("create", "update", "delete"):
        raise ValueError(f"not a change: {op!r}")
    entry = {"op": op, "i": i, "at": datetime.now(UTC).isoformat()}
    return {**settings, "changes": [*(settings.get("changes") or ()), entry]}


def skipped_record_count(records: int) -> int:
    """The people without a phone number among the first `records` (skipped by a sync)."""
    return sum(records // 100 + (records % 100 > k) for k in (_NO_PHONE, _BAD_PHONE))


def _phone(i: int) -> str:
    if i % 10 == 9:  # an international number now and then
        return f"+44 20 7946 {i % 1000:04d}"
    local = f"{200 + (i // 10000) % 700}-{i % 10000:04d}"
    return (
        f"({_AREA[i % len(_AREA)]}) {local}"
        if i % 2
        else f"{_AREA[i % len(_AREA)]}.{local.replace('-', '.')}"
    )


class ScalingTestConnector(CRMConnector):
    name = "scalingtest"
    quo_source = "scalingtest"
    stable_paging = "offset"  # an index into the list, like offset-paged CRMs
    crm_config = CRMConfig(
        person_object_types=[PersonObjectType(crm_object_name="MockPerson")],
        sync_config=SyncConfig(initial_batch_size=200, ongoing_batch_size=100),
        queue_config=QueueConfig(max_workers=8, batch_size=25, timeout=1800),
    )

    @property
    def _records(self) -> int:
        return int(self.integration.settings.get("records", 10_000))

    @property
    def _cursor_paging(self) -> bool:
        return self.integration.settings.get("paging", "index") == "cursor"

    @property
    def _revision(self) -> int:
        return int(self.integration.settings.get("revision", 0))

    @property
    def _hostile_share(self) -> float:
        return float(self.integration.settings.get("hostile_share", 0))

    def hostile_kind(self, i: int) -> str | None:
        """The HOSTILE kind of record i, if hostile: the same for the same settings."""
        if not self._hostile_share or i % 100 in (_NO_PHONE, _BAD_PHONE, _NO_NAME):
            return None
        rng = random.Random(i)
        return rng.choice(list(HOSTILE)) if rng.random() < self._hostile_share else None

    def _edited(self, i: int) -> bool:
        return self._revision > 0 and i % 10 == self._revision % 10

    @cached_property
    def _changed(self) -> tuple[set[int], dict[int, datetime], dict[int, int]]:
        """(people alive, when each changed person last changed, updates per person)."""
        alive, at, updates = set(range(self._records)), {}, Counter[int]()
        for change in self.integration.settings.get("changes") or ():
            i, when = int(change["i"]), datetime.fromisoformat(change["at"])
            if change["op"] == "delete":
                alive.discard(i)
            else:
                alive.add(i)
                at[i] = when
                updates[i] += change["op"] == "update"
        return alive, at, updates

    def _updated_at(self, i: int) -> datetime:
        if i in self._changed[1]:
            return self._changed[1][i]
        if self._edited(i):
            return _BASE_TIME + timedelta(hours=self._revision, seconds=-i)
        return _BASE_TIME - timedelta(minutes=i)

    @cached_property
    def _newest_first(self) -> list[int]:
        return sorted(self._changed[0], key=lambda i: (self._updated_at(i), -i), reverse=True)

    def person(self, i: int) -> dict[str, Any]:
        first, last = _FIRST[i % len(_FIRST)], _LAST[(i // len(_FIRST)) % len(_LAST)]
        if self._edited(i):
            last = f"{last}-{self._revision}"
        if updates := self._changed[2][i]:
            last = f"{last}-u{updates}"
        phones = [{"type": "mobile", "number": _phone(i)}]
        if i % 100 == _NO_PHONE:
            phones = []
        elif i % 100 == _BAD_PHONE:
            phones = [{"type": "mobile", "number": "555-01"}]
        if i % 100 == _NO_NAME:
            first = last = ""
        if i % 5 == 0:
            phones.append(
                {"type": "work", "number": f"+1 {_AREA[(i + 3) % len(_AREA)]} 555 {i % 10000:04d}"}
            )
        person = {
            "id": f"st-{i:07d}",
            "first_name": first,
            "last_name": last,
            "company": f"Company {i % 97}" if i % 3 else None,
            "title": "Buyer" if i % 4 == 0 else None,
            "emails": [f"person{i}@example.com"] + ([f"p{i}@work.example"] if i % 6 == 0 else []),
            "phones": phones,
            "created_at": (_BASE_TIME - timedelta(minutes=i, days=30)).isoformat(),
            "updated_at": self._updated_at(i).isoformat(),
        }
        kind = self.hostile_kind(i)
        return HOSTILE[kind](person) if kind else person

    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        order = self._newest_first
        if modified_since is not None:  # newest first, so the matches are a prefix
            order = [i for i in order if self._updated_at(i) > modified_since]
        if not sort_desc:
            order = order[::-1]
        if not self._cursor_paging:
            start = page * limit
            rows = [self.person(i) for i in order[start : start + limit]]
            return PersonPage(rows, total=len(order), has_more=start + limit < len(order))
        # Like cursor-paged CRMs: no total, and page k only through page k-1's cursor.
        start = int(cursor or 0)
        more = start + limit < len(order)
        rows = [self.person(i) for i in order[start : start + limit]]
        return PersonPage(
            rows, None, has_more=more, next_cursor=str(start + limit) if more else None
        )

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        wanted = (pid.removeprefix("st-") for pid in ids)
        alive = self._changed[0]
        return [self.person(int(i)) for i in wanted if i.isdigit() and int(i) in alive]

    def person_id(self, person: dict[str, Any]) -> str:
        return shown_id(person.get("id"))

    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        # Every field read with .get: a page frame leaves out a field that held NaN.
        external_id = self.record_key(person, object_type)
        company = text(person.get("company"), "company")
        addresses = emails(
            ("email", text(e, "emails")) for e in items(person.get("emails"), "emails")
        )
        numbers = phones(
            (
                (
                    text(p.get("type"), "phones.type") or "phone",
                    text(p.get("number"), "phones.number"),
                )
                for p in items(person.get("phones"), "phones", dict)
            ),
            self.phone_rules,
        )
        first, last = display_name(
            text(person.get("first_name"), "first_name"),
            text(person.get("last_name"), "last_name"),
            company=company,
            addresses=addresses,
            numbers=numbers,
        )
        return QuoContact(
            external_id=external_id,
            source=self.quo_source,
            first_name=first,
            last_name=last,
            company=company,
            role=text(person.get("title"), "title"),
            emails=addresses,
            phone_numbers=numbers,
        )

    # ---- activities: the synthetic timeline (ActivityLog) -----------------------------------
    @cached_property
    def activity_log(self) -> ActivityLog:
        return ActivityLog(self.integration.id, self.integration.settings.get("activity_db"))

    def _person_key(self, external_id: str) -> str:
        """The person's id if they exist now, as a real CRM refuses an activity on no one."""
        if not self.fetch_persons_by_ids("MockPerson", [external_id]):
            raise LookupError(f"ScalingTest has no person {external_id!r}")
        return external_id

    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        person = self._person_key(activity.contact_external_id)
        lines = sms_lines(activity)
        return self.activity_log.add(
            "sms", activity.quo_message_id, person, lines, activity.timestamp, None
        )

    def log_call_to_activity(self, activity: CallActivity) -> str:
        person = self._person_key(activity.contact_external_id)
        lines = call_lines(activity)
        return self.activity_log.add(
            "call", activity.quo_call_id, person, lines, activity.timestamp, activity.outcome
        )

    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """In place: the same id, its subject, body and outcome rewritten."""
        self.activity_log.replace(activity_id, call_lines(activity), activity.outcome)
        return activity_id

    def activities(self) -> list[dict[str, Any]]:
        """The timeline, oldest first: what a test or the demo reads back."""
        return self.activity_log.all()

    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        return {"receiverUrl": receiver_url}
