"""Cleaning at the boundary: core.sanitize, QuoContact's limits and the connectors' field
helpers, for the values real CRMs send."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from quo_sync_dagster.core.models import (
    CustomFieldValue,
    InvalidRecord,
    LabeledValue,
    QuoContact,
)
from quo_sync_dagster.core.phones import PhoneRules
from quo_sync_dagster.core.sanitize import clean, clean_or_none, finite, has_unsafe
from quo_sync_dagster.crms import fields


# ---- sanitize -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Bad\ud800Name", "Bad\ufffdName"),  # a lone surrogate: UTF-8 cannot encode it
        ("\udfffx\ud83d", "\ufffdx\ufffd"),
        ("\ud83d\ude00 Smile\ud83d", "😀 Smile\ufffd"),  # a pair as two code points: one emoji
        ("\x00Nu\x00ll\x07\x1b[31m", "Null[31m"),  # C0 controls, NUL and ESC included
        ("C1\x80\x9f", "C1"),
        ("\u202eevil\u202c \u2066iso\u2069 \u202a\u202b\u202d\u2067\u2068", "evil iso"),
        ("  Ana \t\n\r María\x85\x0b\x0c\u00a0\u2028 ", "Ana María"),  # whitespace collapsed
        ("e\u0301\u0308", "e\u0301\u0308"),  # combining marks are text
        ("👩\u200d👩\u200d👧 Fam", "👩\u200d👩\u200d👧 Fam"),  # emoji and its zero-width joiner
        ("\u05e9\u05dc\u05d5\u05dd \u200fmark\u200e", "\u05e9\u05dc\u05d5\u05dd \u200fmark\u200e"),
        ("", ""),
        ("\x00\u202e \t", ""),
    ],
)
def test_clean(raw: str, expected: str) -> None:
    assert clean(raw) == expected
    assert clean(expected) == expected  # idempotent
    assert not has_unsafe(clean(raw))
    clean(raw).encode("utf-8")


def test_clean_caps_after_cleaning_and_strips_the_cut() -> None:
    assert clean("x" * 100_000) == "x" * 255
    assert clean("\x00" * 100_000 + "Ana") == "Ana"  # removed characters do not count
    assert clean("ab " * 40_000, 5) == "ab ab"
    assert clean("ab " * 40_000, 6) == "ab ab"  # the cut leaves no trailing space
    assert len(clean("x" * 100_000, None)) == 100_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" Zoë ", "Zoë"), ("\x00", None), (None, None), (math.nan, None), (7, None), (["a"], None)],
)
def test_clean_or_none(value: object, expected: str | None) -> None:
    assert clean_or_none(value) == expected


@pytest.mark.parametrize("value", ["a\x00", "a\tb", "\u202e", "\u2069", "\ud800", "\x85"])
def test_has_unsafe(value: str) -> None:
    assert has_unsafe(value)
    assert not has_unsafe("Zoë Nguyễn 👩\u200d👩 \u200b+1 (415)")


def test_finite() -> None:
    assert [finite(v) for v in (math.nan, math.inf, -math.inf)] == [None, None, None]
    assert [finite(v) for v in (1.5, 0, "nan", None, True)] == [1.5, 0, "nan", None, True]


# ---- QuoContact: the last line of defence ----------------------------------------------------
def _encodes(contact: QuoContact) -> None:
    """What the write does: httpx's JSON (no NaN, UTF-8) and the content hash."""
    json.dumps(contact.to_api_body(), ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert len(contact.content_hash()) == 64


def test_text_fields_are_cleaned_and_capped_at_255() -> None:
    contact = QuoContact(
        "crm-1",
        "acme",
        "Bad\ud800Name\x00",
        last_name="\u202eevil\u2066",
        company="C" * 100_000,
        role=" \t ",
    )
    assert (contact.first_name, contact.last_name) == ("Bad\ufffdName", "evil")
    assert contact.company == "C" * 255 and contact.role is None
    _encodes(contact)


@pytest.mark.parametrize("field", ["first_name", "last_name", "company", "role"])
@pytest.mark.parametrize("value", [["Ana"], {"name": "Ana"}, 7, math.nan])
def test_a_text_field_of_another_type_is_refused_naming_field_and_person(
    field: str, value: Any
) -> None:
    with pytest.raises(InvalidRecord) as info:
        QuoContact(**{"external_id": "crm-7", "source": "acme", "first_name": "Ana", field: value})
    api_name = {"first_name": "firstName", "last_name": "lastName"}.get(field, field)
    assert api_name in str(info.value) and "'crm-7'" in str(info.value)


@pytest.mark.parametrize(
    ("external_id", "needle"),
    [
        (["crm-1"], "not list"),
        ({"id": 1}, "not dict"),
        (None, "not NoneType"),
        (7, "not int"),
        ("", "1-75"),
        ("x" * 76, "1-75"),
        ("a\x00b", "control"),
        ("a\ud800", "surrogate"),
        ("a\u202eb", "bidi"),
    ],
)
def test_external_id_must_be_printable_text_of_1_to_75(external_id: Any, needle: str) -> None:
    with pytest.raises(InvalidRecord, match="externalId") as info:
        QuoContact(external_id, "acme", "Ana")
    assert needle in str(info.value)


def test_emails_without_the_shape_local_at_domain_tld_are_dropped() -> None:
    good = ["zoe@acme.example", "a.b+c@x.co.uk"]
    bad = ["no-at-sign", "a@b", "@x.com", "a@.com", "a@b.", "a b@x.com", "a@@x.com", ""]
    bad += ["a@" + "x" * 300 + ".com"]  # longer than SMTP's 254
    emails = [LabeledValue("work", v) for v in [bad[0], good[0], *bad[1:], good[1]]]
    contact = QuoContact("crm-1", "acme", "Ana", emails=(*emails, LabeledValue("x", None)))
    assert [e.value for e in contact.emails] == good
    _encodes(contact)


def test_emails_and_phones_are_cleaned_and_at_most_20_each() -> None:
    # The string-where-a-list-belongs bug: one character per "e-mail".
    letters = tuple(LabeledValue("email", c) for c in "zoe@acme.example" * 6307)
    assert QuoContact("crm-1", "acme", "Ana", emails=letters).emails == ()
    many = tuple(LabeledValue("work", f"p{i}@acme.example") for i in range(50))
    assert QuoContact("crm-1", "acme", "Ana", emails=many).emails == many[:20]
    phones = tuple(LabeledValue("mobile", f"+1212555{i:04d}") for i in range(30))
    assert QuoContact("crm-1", "acme", "Ana", phone_numbers=phones).phone_numbers == phones[:20]
    dirty = QuoContact(
        "crm-1",
        "acme",
        "Ana",
        emails=(LabeledValue("\x00", " \u202ezoe@acme.example\x00 "),),
        phone_numbers=(
            LabeledValue("", "+12125550100\x00"),
            LabeledValue("m", "555-01"),  # not E.164: every connector sends E.164
            LabeledValue("m", "+1" + "9" * 100_000),
        ),
    )
    assert dirty.emails == (LabeledValue("email", "zoe@acme.example"),)  # blank label: default
    assert dirty.phone_numbers == (LabeledValue("phone", "+12125550100"),)


def test_custom_field_values_json_cannot_carry_are_absent() -> None:
    contact = QuoContact(
        "crm-1",
        "acme",
        "Ana",
        custom_fields=(
            CustomFieldValue("nan", math.nan),
            CustomFieldValue("inf", -math.inf),
            CustomFieldValue("huge", 10**5000),  # json.dumps cannot even print it
            CustomFieldValue("obj", {"a": 1}),  # type: ignore[arg-type]
            CustomFieldValue("text", "\x00x" * 100_000),
            CustomFieldValue("tags", ["a\ud800", 3, None, " ", "b"]),  # type: ignore[list-item]
            CustomFieldValue("ok", 2.5),
            CustomFieldValue("flag", True),
        ),
    )
    values = {c.key: c.value for c in contact.custom_fields}
    assert values == {
        "nan": None,
        "inf": None,
        "huge": None,
        "obj": None,
        "text": "x" * 1000,
        "tags": ["a\ufffd", "b"],
        "ok": 2.5,
        "flag": True,
    }
    _encodes(contact)


def test_cleaning_is_stable_so_rebuilding_a_contact_changes_nothing() -> None:
    contact = QuoContact("crm-1", "acme", " Ana\x00 ", emails=(LabeledValue(" w ", "a@b.co"),))
    rebuilt = QuoContact(**contact.__dict__)
    assert rebuilt == contact and rebuilt.content_hash() == contact.content_hash()


# ---- the connectors' field helpers -----------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (["a@x.io", None, math.nan, "b@x.io"], str, ["a@x.io", "b@x.io"]),  # absent items
        ("a@x.io", str, ["a@x.io"]),  # a string where a list belongs: one item, not 6
        ("a" * 100_920, str, ["a" * 100_920]),
        ({"value": "1"}, dict, [{"value": "1"}]),  # an object where a list belongs
        (({"v": 1}, "x"), (dict, str), [{"v": 1}, "x"]),
        (None, str, []),
        (math.nan, dict, []),
        ([], str, []),
    ],
)
def test_items(value: Any, kind: type, expected: list[Any]) -> None:
    assert fields.items(value, "emails", kind) == expected


@pytest.mark.parametrize(
    ("value", "kind", "needle"),
    [
        (["a@x.io", 7], str, "must hold text, not int"),
        ([["a@x.io"]], str, "must hold text, not list"),
        (42, str, "must hold text, not int"),
        ({"value": "1"}, str, "must hold text, not dict"),
        (["+1 212"], dict, "must hold objects, not str"),
        ([0], (dict, str), "must hold objects or text, not int"),  # a falsy item too
        (False, dict, "must hold objects, not bool"),
    ],
)
def test_items_of_a_wrong_type_are_refused_naming_the_field(
    value: Any, kind: type, needle: str
) -> None:
    with pytest.raises(InvalidRecord, match=r"^phones ") as info:
        fields.items(value, "phones", kind)
    assert needle in str(info.value)


@pytest.mark.parametrize(("value", "expected"), [("st-1", "st-1"), (1234, "1234"), (0, "0")])
def test_crm_id_takes_strings_and_integers(value: Any, expected: str) -> None:
    assert fields.crm_id(value, "id") == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (["st-1"], "a list"),
        ({"id": 1}, "a dict"),
        (None, "a NoneType"),
        (True, "a bool"),
        (12.0, "a float"),
        (math.nan, "a float"),
        ("  ", "blank"),
        pytest.param(10**5000, "more than 75 digits", id="huge-int"),
    ],
)
def test_crm_id_refuses_other_types_naming_the_field(value: Any, needle: str) -> None:
    with pytest.raises(InvalidRecord, match=r"^id\.record_id ") as info:
        fields.crm_id(value, "id.record_id")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("st-1", "st-1"),
        (1234, "1234"),
        (None, "None"),
        (["a", 1], "['a', 1]"),
        ("Bad\ud800\x00id", "Bad\ufffdid"),
        pytest.param(10**5000, "<int>", id="huge-int"),
        ("x" * 100_000, "x" * 100),
        ("\x00", "'\\x00'"),
    ],
)
def test_shown_id_names_any_id_without_raising(value: Any, expected: str) -> None:
    assert fields.shown_id(value) == expected


def test_text_cleans_and_caps() -> None:
    assert fields.text("\u202eZoë\x00 ", "f") == "Zoë"
    assert fields.text("x" * 1000, "f") == "x" * 255
    assert fields.text("x" * 1000, "f", None) == "x" * 1000
    assert [fields.text(v, "f") for v in (None, math.nan, -math.inf, "", " \x00")] == [None] * 5


@pytest.mark.parametrize("value", [["Ana"], {"name": "Ana"}, 7, 1.5, True, b"Ana"])
def test_text_of_a_wrong_type_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(
        InvalidRecord, match=rf"^Account_Name\.name must be text, not {type(value).__name__}$"
    ):
        fields.text(value, "Account_Name.name")


def test_phone_and_email_helpers_take_hostile_text() -> None:
    found, problems = fields.e164(
        [
            ("work", "+1" + "9" * 100_000),
            ("mobile", None),
            ("uk", "020 7946 0018", None),  # no region of its own: the default one
            ("other", "\x00(415)\u202e 555-2671"),
        ],
        PhoneRules("GB"),
    )
    assert found == (LabeledValue("uk", "+442079460018"),)
    assert [p.label for p in problems] == ["work", "other"]  # (415) is no GB number
    assert fields.emails([("w", None), ("h", "\x00a@x.io"), ("o", "A@X.IO")]) == (
        LabeledValue("h", "a@x.io"),
    )
