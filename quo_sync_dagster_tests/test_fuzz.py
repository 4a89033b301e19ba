"""Hostile CRM records, shaped like each connector's people, through the connector's transform
and `sync_records` with a real ContactUpserter into the Quo sandbox over HTTP (and, for
ScalingTest's hostile setting, once through the Dagster page path).

A deterministic generator (fixed seed) mixes good people with what CRMs really send: 100 KB
strings, lone surrogates, NUL, bidi overrides, zero-width and combining characters, NaN and
Infinity, lists and objects where text belongs, text where a list belongs, nulls everywhere,
ids of every type, repeated ids and absurd phone numbers. Every case knows its fate: it syncs
with known (cleaned) content, it is skipped for having no phone number, or it fails alone with a
reason naming the person and the field. Random damage ("chaos") may do any, but nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.external_ids import namespace, quo_external_id
from quo_sync_dagster.core.models import Integration, InvalidRecord
from quo_sync_dagster.core.phones import to_e164
from quo_sync_dagster.core.process import PageResult, ProcessState
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.crms.scalingtest import HOSTILE, ScalingTestConnector, skipped_record_count
from quo_sync_dagster.orchestration.sync import sync_records
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.store import open_store
from quo_sync_dagster_tests.pipeline import add_integration, pipeline, sync_everything

SEED = 20260601
PAGES, PAGE_SIZE = 6, 100  # per CRM, before repeated ids: 5 CRMs give 3,000+ records
MAX_NAME, MAX_ITEMS = 255, 20
# Independent of core.sanitize: what no stored contact may hold.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
E164 = re.compile(r"\+[1-9][0-9]{1,14}")

# (raw, what Quo must show): cleaned, never refused.
HOSTILE_TEXT = [
    ("Bad\ud800Name", "Bad\ufffdName"),
    ("\ud83d\ude00Smile\udfff", "😀Smile\ufffd"),  # a surrogate pair as two code points
    ("Nu\x00ll\x07\x1b\x9b", "Null"),
    ("\u202eevil\u202c", "evil"),
    ("\u2066iso\u2069late\u202a", "isolate"),
    ("  Ana \t\n María\x85 ", "Ana María"),
    ("Zoe\u0301\u0308\u0327", "Zoe\u0301\u0308\u0327"),
    ("👩\u200d👩\u200d👧 Fam", "👩\u200d👩\u200d👧 Fam"),
    ("Zero\u200bWidth\ufeff", "Zero\u200bWidth\ufeff"),  # zero-width characters are not controls
    ("שלום \u200fعلي", "שלום \u200fعلي"),  # right-to-left text and marks stay
    ("x" * 100_000, "x" * MAX_NAME),
    ("\x00" * 50_000 + "Ana", "Ana"),
    ("ab " * 40_000, ("ab " * 85).rstrip()),
]
# Absent: no value, never a failure of its own (NaN and Infinity are a page frame's gaps).
BLANK_TEXT: list[Any] = ["", "   ", "\x00\u202e\t", "\u202c\u2069", None, math.nan, math.inf]
# Where text belongs: a failure naming the field.
WRONG_TYPES: list[Any] = [["Ana"], {"name": "Ana"}, 7, True, 1.5, [], {}, 10**30]
# Text, or absent, that is no e-mail: dropped.
BAD_EMAILS: list[Any] = ["no-at-sign", "a@b", "@x.example", "a@.example", "a b@x.example"]
BAD_EMAILS += ["a@" + "x" * 300 + ".example", "", None, math.nan]
# Text, or absent, that is no phone number: dropped while a valid number remains.
ABSURD_PHONES: list[Any] = ["+" + "9" * 100_000, "☎☎☎", "1e308", "\x00\x00", "+", "555-01"]
ABSURD_PHONES += ["0" * 40, "+1 (415) 555-01\ud800", "abc", math.nan, None]
CHAOS: list[Any] = [None, math.nan, math.inf, -math.inf, "", " ", [], {}, 0, -1, True, 10**30]
CHAOS += ["x" * 100_000, "Bad\ud800", "\x00", "\u202e", ["a@b.example"], [[[]]], "+1" * 1000]
CHAOS += [{"value": "+12125550100"}, 1e308]


def _wrong(value: Any) -> bool:
    """Of a type no text field takes: neither text nor absent."""
    absent = value is None or (isinstance(value, float) and not math.isfinite(value))
    return not absent and not isinstance(value, str)


def _names(**names: str) -> dict[str, str | None]:
    """The fields errors name for a Spec's values; None: the shape does not read that value."""
    return dict.fromkeys(("first", "last", "full", "company", "role", "emails", "phones")) | names


# ---- what a case must become ----------------------------------------------------------------
@dataclass
class Spec:
    """A person before a CRM shape renders it: each value is (raw, what Quo must show)."""

    id: Any
    first: tuple[Any, str | None]
    last: tuple[Any, str | None]
    company: tuple[Any, str | None] = (None, None)
    role: tuple[Any, str | None] = (None, None)
    emails: list[tuple[Any, str | None]] = field(default_factory=list)
    phones: list[tuple[Any, str | None]] = field(default_factory=list)
    full: Any = None  # Pipedrive's `name`, Attio's `full_name`: read only without first/last


@dataclass
class Expected:
    first: str | None
    last: str | None
    company: str | None
    role: str | None
    emails: list[str]
    phones: list[str]


@dataclass
class Case:
    """A record and its fate: it syncs as `expected`, fails with `needle` in the reason, or is
    `skipped` (no phone number); none of them (chaos): any fate."""

    kind: str
    record: dict[str, Any]
    ext: str | None = None  # the CRM part of the externalId, when the id is readable
    spec: Spec | None = None
    expected: Expected | None = None
    needle: str | None = None
    skipped: bool = False


# ---- the five CRM shapes ----------------------------------------------------------------------
class Shape:
    crm: str
    object_type: str
    id_path: tuple[str, ...] = ("id",)
    int_ids = False
    prefix = ""  # the externalId is prefix + id
    names: dict[str, str | None]
    settings: dict[str, Any] = {}

    @property
    def id_field(self) -> str:
        return ".".join(self.id_path)

    def good_id(self, n: int) -> Any:
        return 100_000 + n if self.int_ids else f"fz{n:06d}"

    def render(self, s: Spec) -> dict[str, Any]:
        raise NotImplementedError

    def email_field(self, k: int) -> str | None:
        """The field errors name for the k-th e-mail (phone: below)."""
        return self.names["emails"]

    def phone_field(self, k: int) -> str | None:
        return self.names["phones"]

    def kept(self, values: list[Any], kind: str) -> list[Any]:
        """The values the shape has room for."""
        return values

    def lone_email(self, record: dict[str, Any], raw: str) -> str | None:
        """`raw` where the e-mail list belongs (list shapes) or a list where a slot's text
        belongs (slot shapes): None if the person then has just that e-mail, else the needle."""
        raise NotImplementedError

    def email_chars(self, record: dict[str, Any], raw: str) -> str | None:
        """`raw` (no e-mail) in place of all e-mails: None if it is dropped, else the needle."""
        raise NotImplementedError

    def lone_phone(self, record: dict[str, Any], raw: str) -> str | None:
        raise NotImplementedError

    def expected(self, s: Spec) -> Expected | str | None:
        """What Quo must show, the needle of the reason it fails, or None: skipped for having
        no phone number. A value of a wrong type fails naming its field (the generator breaks
        one field, so the order connectors read them in does not matter); a person without a
        name is shown by their company, else their e-mail's local part, else their number."""
        names = self.names
        for attr in ("first", "last"):
            if _wrong(getattr(s, attr)[0]):
                return f"{names[attr]} must"
        first, last = s.first[1], s.last[1]
        if first is None and last is None and names["full"] and _wrong(s.full):
            return f"{names['full']} must"
        for attr in ("company", "role"):
            if names[attr] and _wrong(getattr(s, attr)[0]):
                return f"{names[attr]} must"
        emails, phones = self.kept(s.emails, "emails"), self.kept(s.phones, "phones")
        for values, name in ((emails, self.email_field), (phones, self.phone_field)):
            if wrong := [k for k, (raw, _) in enumerate(values) if _wrong(raw)]:
                return f"{name(wrong[0])} must"
        numbers = [e for _, e in phones if e is not None]
        if not numbers:
            return None
        company = s.company[1] if names["company"] else None
        addresses = [e for _, e in emails if e is not None]
        if first is None:  # Quo shows a contact by its first name: the fallback chain
            fallback = company or (addresses[0].partition("@")[0] if addresses else numbers[0])
            first, last = (last, None) if last else (fallback, None)
        return Expected(
            first=first,
            last=last,
            company=company,
            role=s.role[1] if names["role"] else None,
            emails=addresses[:MAX_ITEMS],
            phones=numbers[:MAX_ITEMS],
        )


class ListShape(Shape):
    """A CRM with a list of e-mails and a list of phones."""

    lists: dict[str, tuple[str, ...]]  # "emails", "phones": the path to the list
    bare_emails = True  # a string is an item of the e-mail list (not only an object)

    def item(self, kind: str, raw: Any) -> Any:
        """One e-mail or phone as an item of its list."""
        raise NotImplementedError

    def lone_email(self, record: dict[str, Any], raw: str) -> str | None:
        _put(record, self.lists["emails"], self.item("emails", raw))
        return None

    def email_chars(self, record: dict[str, Any], raw: str) -> str | None:
        _put(record, self.lists["emails"], raw)
        return None if self.bare_emails else f"{self.lists['emails'][-1]} must"

    def lone_phone(self, record: dict[str, Any], raw: str) -> str | None:
        _put(record, self.lists["phones"], self.item("phones", raw))
        return None


class ScalingTestShape(ListShape):
    crm, object_type = "scalingtest", "MockPerson"
    names = _names(
        first="first_name",
        last="last_name",
        company="company",
        role="title",
        emails="emails",
        phones="phones.number",
    )
    lists = {"emails": ("emails",), "phones": ("phones",)}

    def item(self, kind: str, raw: Any) -> Any:
        return raw if kind == "emails" else {"type": "mobile", "number": raw}

    def render(self, s: Spec) -> dict[str, Any]:
        return {
            "id": s.id,
            "first_name": s.first[0],
            "last_name": s.last[0],
            "company": s.company[0],
            "title": s.role[0],
            "emails": [self.item("emails", raw) for raw, _ in s.emails],
            "phones": [self.item("phones", raw) for raw, _ in s.phones],
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-02T00:00:00+00:00",
        }


class PipedriveShape(ListShape):
    crm, object_type, int_ids = "pipedrive", "Person", True
    names = _names(
        first="first_name",
        last="last_name",
        full="name",
        company="org_name",
        role="job_title",
        emails="emails.value",
        phones="phones.value",
    )
    lists = {"emails": ("emails",), "phones": ("phones",)}

    def item(self, kind: str, raw: Any, primary: bool = False) -> Any:
        return {"value": raw, "primary": primary, "label": "work"}

    def render(self, s: Spec) -> dict[str, Any]:
        return {
            "id": s.id,
            "name": s.full,
            "first_name": s.first[0],
            "last_name": s.last[0],
            "org_id": None,
            "org_name": s.company[0],
            "job_title": s.role[0],
            "emails": [self.item("emails", raw, k == 0) for k, (raw, _) in enumerate(s.emails)],
            "phones": [self.item("phones", raw, k == 0) for k, (raw, _) in enumerate(s.phones)],
            "custom_fields": {},
        }


class AttioShape(ListShape):
    crm, object_type, id_path = "attio", "people", ("id", "record_id")
    names = _names(  # no company: a reference to a companies record, not read
        first="name.first_name",
        last="name.last_name",
        full="name.full_name",
        role="job_title.value",
        emails="email_addresses.email_address",
        phones="phone_numbers.original_phone_number",
    )
    lists = {
        "emails": ("values", "email_addresses"),
        "phones": ("values", "phone_numbers"),
    }
    bare_emails = False

    def good_id(self, n: int) -> Any:
        return f"{n:08x}-f022-4a11-b000-{n:012x}"

    def item(self, kind: str, raw: Any) -> Any:
        key = "email_address" if kind == "emails" else "original_phone_number"
        return _attio_value(**{key: raw})

    def render(self, s: Spec) -> dict[str, Any]:
        return {
            "id": {"workspace_id": "14beef7a", "object_id": "97052eb9", "record_id": s.id},
            "created_at": "2024-01-01T00:00:00Z",
            "web_url": "https://app.attio.com/fuzz/person/x",
            "values": {
                "name": [
                    _attio_value(first_name=s.first[0], last_name=s.last[0], full_name=s.full)
                ],
                "email_addresses": [self.item("emails", raw) for raw, _ in s.emails],
                "phone_numbers": [self.item("phones", raw) for raw, _ in s.phones],
                "job_title": [_attio_value(value=s.role[0])],
            },
        }


def _attio_value(**fields: Any) -> dict[str, Any]:
    return {"active_from": "2024-01-01T00:00:00Z", "active_until": None, **fields}


class SlotShape(Shape):
    """A CRM with one text field per e-mail and per phone (Zoho, AxisCare)."""

    slots: dict[str, tuple[str, ...]]  # "emails", "phones": the fields, in order

    def email_field(self, k: int) -> str:
        return self.slots["emails"][k]

    def phone_field(self, k: int) -> str:
        return self.slots["phones"][k]

    def kept(self, values: list[Any], kind: str) -> list[Any]:
        return values[: len(self.slots[kind])]

    def slot_values(self, s: Spec) -> dict[str, Any]:
        return {
            name: values[k][0] if k < len(values) else None
            for kind, values in (("emails", s.emails), ("phones", s.phones))
            for k, name in enumerate(self.slots[kind])
        }

    def lone_email(self, record: dict[str, Any], raw: str) -> str | None:
        record[self.slots["emails"][1]] = [raw]
        return f"{self.slots['emails'][1]} must"

    def email_chars(self, record: dict[str, Any], raw: str) -> str | None:
        first, *others = self.slots["emails"]
        record |= dict.fromkeys(others) | {first: raw}
        return None

    def lone_phone(self, record: dict[str, Any], raw: str) -> str | None:
        record[self.slots["phones"][1]] = {"number": raw}
        return f"{self.slots['phones'][1]} must"


class ZohoShape(SlotShape):
    crm, object_type, prefix = "zoho", "Contacts", "Contacts-"
    names = _names(first="First_Name", last="Last_Name", company="Account_Name.name", role="Title")
    slots = {
        "emails": ("Email", "Secondary_Email"),
        "phones": ("Phone", "Mobile", "Home_Phone", "Other_Phone"),
    }

    def good_id(self, n: int) -> Any:
        return f"36523970001{n:08d}"

    def render(self, s: Spec) -> dict[str, Any]:
        return {
            "id": s.id,
            "First_Name": s.first[0],
            "Last_Name": s.last[0],
            "Account_Name": {"name": s.company[0], "id": "3652397000000000001"},
            "Title": s.role[0],
        } | self.slot_values(s)


class AxisCareShape(SlotShape):
    crm, object_type, int_ids, prefix = "axiscare", "clients", True, "client-"
    names = _names(first="firstName", last="lastName")
    settings = {"base_url": "http://127.0.0.1:9"}
    slots = {
        "emails": ("personalEmail", "billingEmail"),
        "phones": ("homePhone", "mobilePhone", "otherPhone"),
    }

    def render(self, s: Spec) -> dict[str, Any]:
        record = {"id": s.id, "firstName": s.first[0], "lastName": s.last[0], "goesBy": None}
        return record | self.slot_values(s)

    def expected(self, s: Spec) -> Expected | str | None:
        out = super().expected(s)
        if isinstance(out, Expected):
            out.role = "Client"  # the role towards the agency, whatever the CRM says
        return out


SHAPES = [ScalingTestShape(), PipedriveShape(), ZohoShape(), AttioShape(), AxisCareShape()]


# ---- the generator ------------------------------------------------------------------------------
HOSTILE_KINDS = [
    "text_first",
    "text_last",
    "text_company_role",
    "non_finite",
    "wrong_type_name",
    "wrong_type_value",
    "blank_names",
    "emails_mixed",
    "many_items",
    "phones_mixed",
    "absurd_phones_only",
    "no_phones",
    "lone_email",
    "email_chars",
    "lone_phone",
    "id_wrong_type",
    "id_other_type",
    "id_unsafe",
    "id_huge",
    "id_too_long_for_namespace",
    "nulls_everywhere",
]


class Generator:
    """Cases for one shape; the same seed gives the same cases."""

    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape, self.rng, self.n = shape, random.Random(seed), 0

    def uid(self) -> int:
        self.n += 1
        return self.n

    def phone(self) -> tuple[str, str]:
        n = self.uid() % 10_000
        raw = self.rng.choice(
            [
                f"(415) 555-{n:04d}",
                f"+1 212 555 {n:04d}",
                f"646.555.{n:04d}",
                f"+44 20 7946 {n:04d}",
            ]
        )
        return raw, to_e164(raw, "US")

    def email(self) -> tuple[str, str]:
        address = f"p{self.uid()}.{self.rng.randrange(100)}@example.com"
        return address, address

    def good_spec(self) -> Spec:
        first = self.rng.choice(["Zoë", "José", "Łukasz", "李", "Siobhán", "Mei", "Oluwaseun"])
        last = self.rng.choice(["O'Brien", "Nguyễn", "Müller", "Okafor", None])
        company = self.rng.choice(["Acme GmbH", "Ørsted A/S", None])
        role = self.rng.choice(["Buyer", "CTO", None])
        return Spec(
            id=self.shape.good_id(self.uid()),
            first=(first, first),
            last=(last, last),
            company=(company, company),
            role=(role, role),
            emails=[self.email() for _ in range(self.rng.randrange(3))],
            phones=[self.phone() for _ in range(1 + self.rng.randrange(2))],
        )

    def case(self, kind: str, spec: Spec, record: dict[str, Any] | None = None) -> Case:
        """The case of `spec` (rendered unless `record` is given) as the shape must treat it."""
        out = self.shape.expected(spec)
        record = self.shape.render(spec) if record is None else record
        case = Case(kind, record, self.shape.prefix + str(spec.id), spec)
        if isinstance(out, str):
            case.needle = out
        elif out is None:
            case.skipped = True
        else:
            case.expected = out
        return case

    def good(self) -> Case:
        return self.case("good", self.good_spec())

    def hostile(self, kind: str) -> Case:
        rng, shape, s = self.rng, self.shape, self.good_spec()
        if kind in ("text_first", "text_last", "text_company_role"):
            name = {"text_first": "first", "text_last": "last"}.get(kind)
            for attr in [name] if name else ["company", "role"]:
                setattr(s, attr, rng.choice(HOSTILE_TEXT))
        elif kind == "non_finite":
            s.last, s.company, s.role = (math.nan, None), (math.inf, None), (-math.inf, None)
        elif kind == "wrong_type_name":
            attr = rng.choice(
                ["first", "last", "full"] if shape.names["full"] else ["first", "last"]
            )
            if attr == "full":
                s.first, s.last, s.full = (None, None), (None, None), rng.choice(WRONG_TYPES)
            else:
                setattr(s, attr, (rng.choice(WRONG_TYPES), None))
        elif kind == "wrong_type_value":
            attr = rng.choice(
                [a for a in ("company", "role") if shape.names[a]] + ["emails", "phones"]
            )
            wrong = (rng.choice(WRONG_TYPES), None)
            if attr in ("company", "role"):
                setattr(s, attr, wrong)
            elif attr == "emails":
                s.emails = [self.email(), wrong]
            else:
                s.phones = [self.phone(), wrong]
        elif kind == "blank_names":
            s.first, s.last = (rng.choice(BLANK_TEXT), None), (rng.choice(BLANK_TEXT), None)
            s.full = rng.choice(BLANK_TEXT)
        elif kind == "emails_mixed":
            good = [self.email() for _ in range(2)]
            bad = [(b, None) for b in rng.sample(BAD_EMAILS, 4)]
            dirty = ("\u202e" + good[1][0] + "\x00", good[1][1])
            s.emails = [bad[0], good[0], *bad[1:], dirty]
            if isinstance(shape, SlotShape):
                s.emails = [bad[0], dirty]
        elif kind == "many_items":
            s.emails = [self.email() for _ in range(30)]
            s.phones = [self.phone() for _ in range(25)]
        elif kind == "phones_mixed":
            absurd = [(p, None) for p in rng.sample(ABSURD_PHONES, 2)]
            s.phones = [absurd[0], self.phone(), absurd[1]]
        elif kind == "absurd_phones_only":
            s.phones = [(p, None) for p in rng.sample(ABSURD_PHONES, 3)]
        elif kind == "no_phones":
            s.phones = []
        elif kind in ("lone_email", "email_chars", "lone_phone"):
            return self.lone(kind, s)
        else:
            return self.bad_id(kind, s)
        return self.case(kind, s)

    def lone(self, kind: str, s: Spec) -> Case:
        """One value where a list belongs, or a list or object where one value belongs."""
        record = self.shape.render(s)
        if kind == "lone_phone":
            raw, number = self.phone()
            needle = self.shape.lone_phone(record, raw)
            s.phones = [(raw, number)]
        elif kind == "lone_email":
            raw = self.email()[0]
            needle = self.shape.lone_email(record, raw)
            s.emails = [(raw, raw)]
        else:  # the string that became 100,920 one-letter "e-mails"
            needle = self.shape.email_chars(record, "a" * 100_920)
            s.emails = []
        case = self.case(kind, s, record)
        if needle is not None:
            case.expected, case.needle = None, needle
        return case

    def bad_id(self, kind: str, s: Spec) -> Case:
        shape, n = self.shape, self.uid()
        if kind == "id_other_type":  # ints for string ids and strings for integer ids: both fine
            return self.case(kind, replace(s, id=f"x{n}" if shape.int_ids else 700_000 + n))
        if kind == "nulls_everywhere":
            return Case(kind, dict.fromkeys(shape.render(s)), needle=f"{shape.id_field} must be")
        bad_id, needle = {
            "id_wrong_type": (
                self.rng.choice([[s.id], {"id": s.id}, None, True, 1.5, math.nan]),
                f"{shape.id_field} must be",
            ),
            "id_unsafe": (
                self.rng.choice([f"a\x00{n}", f"\u202e{n}", f"{n}\ud800", f"a\t{n}"]),
                "externalId",
            ),
            "id_huge": ("i" * 100_000, "externalId"),
            # Fits Quo's 75 characters on its own; not with the integration's namespace.
            "id_too_long_for_namespace": (f"{n}".rjust(75 - len(shape.prefix), "L"), "too long"),
        }[kind]
        record = shape.render(s)
        _put(record, shape.id_path, bad_id)
        return Case(kind, record, needle=needle)

    def chaos(self) -> Case:
        """A good person with one to three random spots replaced by random junk: either fate."""
        case = self.good()
        id_path = self.shape.id_path
        for _ in range(self.rng.randint(1, 3)):
            # Listed anew each time: junk may have replaced a whole subtree.
            spots = [p for p in _paths(case.record) if p != id_path[: len(p)]]
            # A copy: a shared list could be put inside itself, or mutated through another case.
            _put(case.record, self.rng.choice(spots), copy.deepcopy(self.rng.choice(CHAOS)))
        return Case("chaos", case.record, case.ext)

    def repeats(self, page: list[Case]) -> list[Case]:
        """Some good people again, later in the page: a new version (it is the one synced) or
        one without a phone (it is skipped, and the earlier good one is synced)."""
        out = list(page)
        goods = [c for c in page if c.kind == "good"]
        for original in self.rng.sample(goods, min(len(goods), 6)):
            assert original.spec is not None
            if self.rng.random() < 0.3:
                repeat = self.case("repeat_broken", replace(original.spec, phones=[]))
            else:
                name = f"Again{self.uid()}"
                repeat = self.case("repeat", replace(original.spec, first=(name, name)))
            out.insert(self.rng.randint(out.index(original) + 1, len(out)), repeat)
        return out

    def pages(self) -> Iterator[list[Case]]:
        for _ in range(PAGES):
            page: list[Case] = []
            for slot in range(PAGE_SIZE):
                roll = self.rng.random()
                if roll < 0.3:
                    page.append(self.good())
                elif roll < 0.88:
                    page.append(self.hostile(HOSTILE_KINDS[(self.n + slot) % len(HOSTILE_KINDS)]))
                else:
                    page.append(self.chaos())
            yield self.repeats(page)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    children = value.items() if isinstance(value, dict) else ()
    children = enumerate(value) if isinstance(value, list) else children
    for key, child in children:
        yield (*path, key)
        yield from _paths(child, (*path, key))


def _put(record: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        record = record[key]
    record[path[-1]] = value


def _generated(shape: Shape) -> list[list[Case]]:
    return list(Generator(shape, SEED + SHAPES.index(shape)).pages())


# ---- checks -------------------------------------------------------------------------------------
def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)


def assert_clean(contact: dict[str, Any]) -> None:
    """Nothing Quo stores may hold a surrogate, control or bidi character, or exceed a limit."""
    assert not [s for s in _strings(contact) if UNSAFE.search(s)], contact["externalId"]
    fields = contact["defaultFields"]
    for name in ("firstName", "lastName", "company", "role"):
        assert fields[name] is None or 1 <= len(fields[name]) <= MAX_NAME
    assert len(fields["emails"]) <= MAX_ITEMS and len(fields["phoneNumbers"]) <= MAX_ITEMS
    assert all(EMAIL.fullmatch(e["value"]) for e in fields["emails"])
    assert all(E164.fullmatch(p["value"]) for p in fields["phoneNumbers"])


def who(shape: Shape, connector: CRMConnector, case: Case) -> str:
    """How the page's errors must name the person: by their CRM id when it is a usable one."""
    return case.ext.removeprefix(shape.prefix) if case.ext else connector.person_id(case.record)


def test_the_generator_is_deterministic_and_covers_every_kind() -> None:
    shape = SHAPES[3]
    first, second = _generated(shape), _generated(shape)
    assert repr([c.record for p in first for c in p]) == repr([c.record for p in second for c in p])
    kinds = Counter(c.kind for page in first for c in page)
    assert set(kinds) == {"good", "chaos", "repeat", "repeat_broken", *HOSTILE_KINDS}
    hostile = sum(c.kind != "good" for s in SHAPES for page in _generated(s) for c in page)
    assert hostile >= 2_000


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.crm)
def test_hostile_records_fail_alone_and_good_ones_land_once(
    shape: Shape, sandbox: QuoSandbox, tmp_path: Path
) -> None:
    integration = Integration(
        f"fz-{shape.crm}", shape.crm, "env:UNUSED", sandbox.url, settings=shape.settings
    )
    connector = connector_class(shape.crm)(integration, "unused-token")
    pages = _generated(shape)
    cases = [c for page in pages for c in page]
    # Whatever a record holds, its transform gives a contact or an InvalidRecord (whose reason
    # the page keeps), never another exception.
    for case in cases:
        with contextlib.suppress(InvalidRecord):
            connector.transform_person_to_quo(case.record, shape.object_type)

    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    try:
        with QuoClient(sandbox.url, sandbox.api_key, max_attempts=2) as client:
            upserter = ContactUpserter(client, store, integration.id)

            def run() -> list[PageResult]:
                return [
                    sync_records(
                        connector,
                        upserter,
                        [c.record for c in page],
                        shape.object_type,
                        f"p{k}",
                        False,
                    )
                    for k, page in enumerate(pages)
                ]

            results = run()
            ns = namespace(integration)
            stored = [
                c
                for c in client.iter_contacts(connector.quo_source)
                if c["externalId"].startswith(ns)
            ]
            # Hostile content hashes as stably as any: a second run writes nothing.
            before = sandbox.stats()["byKind"]
            again = run()
            after = sandbox.stats()["byKind"]
    finally:
        store.close()

    # No page lost, and every record counted once.
    assert len(results) == PAGES
    for result, page in zip(results, pages, strict=True):
        assert result.ok and result.records == len(page)
        assert result.records == result.synced + result.failed + result.skipped
        assert result.synced == result.created + result.updated + result.unchanged
    assert (after["create"], after["patch"]) == (before["create"], before["patch"])
    assert [(r.synced, r.unchanged, r.failed, r.skipped) for r in again] == [
        (r.synced, r.synced, r.failed, r.skipped) for r in results
    ]

    # Every contact Quo holds is clean, and there is one per person synced.
    by_ext = {c["externalId"].removeprefix(ns): c for c in stored}
    assert len(by_ext) == len(stored) == sum(r.synced for r in results)
    for contact in stored:
        assert_clean(contact)

    # The people that must sync are there, exactly as expected (a repeat: its last version).
    must_sync = {c.ext: c.expected for c in cases if c.ext and c.expected}
    for ext, want in must_sync.items():
        fields = by_ext[ext]["defaultFields"]
        got = Expected(
            fields["firstName"],
            fields["lastName"],
            fields["company"],
            fields["role"],
            [e["value"] for e in fields["emails"]],
            [p["value"] for p in fields["phoneNumbers"]],
        )
        assert got == want, ext

    # Every error is the failure of a record that must (or, chaos, may) fail, named and with
    # the field in the reason; every skip is a person without a phone number (or, chaos, one
    # who lost it to junk) or a repeated person's earlier version.
    errors: dict[str, list[str]] = {}
    skips: Counter[tuple[str, str]] = Counter()
    for result in results:
        for error in result.errors:
            if error.skipped:
                skips[(error.external_id or "", error.skipped)] += 1
            else:
                errors.setdefault(error.external_id or "", []).append(error.error)
    repeated = Counter(
        (who(shape, connector, earlier), "duplicate in page")
        for page in pages
        for k, earlier in enumerate(page)
        if earlier.expected
        and any(later.ext == earlier.ext and later.expected for later in page[k + 1 :])
    )
    phoneless = Counter((who(shape, connector, c), "no phone") for c in cases if c.skipped)
    chaos = [c for c in cases if c.kind == "chaos"]
    chaos_names = {who(shape, connector, c) for c in chaos}
    chaos_skips = Counter({k: n for k, n in skips.items() if k[0] in chaos_names})
    assert skips - chaos_skips == repeated + phoneless
    assert sum(r.skipped for r in results) == skips.total()
    must_fail = [c for c in cases if c.needle is not None]
    for case in must_fail:
        name = who(shape, connector, case)
        reasons = [m for m in errors.get(name, []) if case.needle in m]
        assert reasons, (case.kind, name, case.needle, errors.get(name))
        errors[name].remove(reasons[0])
    for case in chaos:  # exactly one fate each
        name = who(shape, connector, case)
        failed = errors.pop(name, [])
        skipped = chaos_skips[(name, "no phone")]
        assert len(failed) + skipped == (case.ext not in by_ext), (name, failed, skipped)
    assert [(n, m) for n, msgs in errors.items() for m in msgs] == []
    chaos_synced = {c.ext for c in chaos} & set(by_ext)
    assert set(by_ext) == set(must_sync) | chaos_synced
    assert sum(r.failed for r in results) == (
        len(must_fail) + len(chaos) - len(chaos_synced) - chaos_skips.total()
    )


def test_hostile_scalingtest_people_through_the_dagster_page_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, share = 600, 0.25
    settings = {"records": records, "hostile_share": share}
    crm = ScalingTestConnector(Integration("x", "scalingtest", "env:X", settings=settings))
    plain = ScalingTestConnector(Integration("x", "scalingtest", "env:X"))
    kinds = {i: crm.hostile_kind(i) for i in range(records)}
    assert set(kinds.values()) == {None, *HOSTILE}
    assert sum(k is not None for k in kinds.values()) > records * share * 0.8
    # The kinds that fail, with what the reason must name; an absurd phone leaves no phone.
    failing = {
        "list_id": "id must be",
        "bool_id": "id must be",
        "name_as_object": "last_name must be text",
        "email_as_list": "emails must hold text",
    }
    must_fail = {i: failing[kind] for i, kind in kinds.items() if kind in failing}
    phoneless = {i for i, kind in kinds.items() if kind == "absurd_phone"}
    expect_failed = len(must_fail)
    expect_skipped = skipped_record_count(records) + len(phoneless)
    # The Process keeps the last 100 failures and skips: all of them here.
    assert expect_failed + expect_skipped <= 100
    config = {"integration_id": "it-1", "page_size": 70, "pages_per_run": 3}
    with pipeline(tmp_path, monkeypatch) as p:
        integration = add_integration(p, "scalingtest", settings)
        (process,) = sync_everything(p, "scalingtest", config)
        errors = p.store.recent_errors(process.id)
        with QuoClient(p.quo.url, "test-key") as quo:
            stored = {c["externalId"]: c for c in quo.iter_contacts("scalingtest")}

    assert process.state is ProcessState.COMPLETED
    counters = process.counters
    assert (counters["pages_failed"], counters["processed"]) == (0, records)
    assert (counters["failed"], counters["skipped"]) == (expect_failed, expect_skipped)
    assert counters["synced"] == counters["created"] == records - expect_failed - expect_skipped
    assert len(stored) == counters["synced"]
    for contact in stored.values():
        assert_clean(contact)

    # Each hostile person that must fail failed alone, named, with the field in the reason.
    reasons = [(e.external_id, e.error) for e in errors if e.skipped is None]
    assert len(reasons) == expect_failed
    skips = {e.external_id: e for e in errors if e.skipped is not None}
    assert len(skips) == expect_skipped
    for i in phoneless:
        skip = skips[crm.person_id(crm.person(i))]
        assert skip.skipped == "no phone" and "phone number" in skip.error
    for i, needle in must_fail.items():
        name = crm.person_id(crm.person(i))
        match = next((r for r in reasons if r[0] == name and needle in r[1]), None)
        assert match, (i, kinds[i], name)
        reasons.remove(match)

    # The hostile people that sync land cleaned, under their namespaced id.
    for i, kind in kinds.items():
        if kind is None or kind in failing or i in phoneless:
            continue
        person, good = crm.person(i), plain.person(i)
        fields = stored[quo_external_id(integration, str(person["id"]))]["defaultFields"]
        emails = [e["value"] for e in fields["emails"]]
        phones = [p["value"] for p in fields["phoneNumbers"]]
        good_phones = [to_e164(p["number"], "US") for p in good["phones"]]
        if kind == "control_chars":
            assert fields["firstName"] == "Bad\ufffd" + good["first_name"]
            assert fields["lastName"] == good["last_name"]
        elif kind == "huge_company":
            assert fields["company"] == ("Acme " * 51).rstrip()
        elif kind in ("email_as_string", "bad_emails"):
            assert emails == good["emails"][: 1 if kind == "email_as_string" else None]
        elif kind == "phone_as_object":
            assert phones == good_phones[:1]
        elif kind == "non_finite":
            assert (fields["company"], fields["role"]) == (None, None)
        else:  # int_id: the person as is, under the integer id
            assert (fields["firstName"], emails, phones) == (
                good["first_name"],
                good["emails"],
                good_phones,
            )
