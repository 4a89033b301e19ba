"""The field helpers the CRM connectors share."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from quo_sync_dagster.core.models import Integration, InvalidRecord, LabeledValue, NoPhone
from quo_sync_dagster.core.phones import PhoneRules
from quo_sync_dagster.crms import fields
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector

US = PhoneRules("US")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" Zoë ", "Zoë"), ("  ", None), ("", None), (None, None), (math.nan, None)],
)
def test_text(value: object, expected: str | None) -> None:
    assert fields.text(value, "title") == expected


def test_aware_makes_naive_times_utc_and_keeps_offsets() -> None:
    assert fields.aware("2026-03-01T10:00:00") == datetime(2026, 3, 1, 10, tzinfo=UTC)
    kept = fields.aware("2026-03-01T10:00:00+02:00")
    assert kept.utcoffset() == timedelta(hours=2)
    assert kept == datetime(2026, 3, 1, 10, tzinfo=timezone(timedelta(hours=2)))


def test_emails_deduplicate_ignoring_case_first_wins() -> None:
    pairs = [("work", " Zoe@Acme.example "), ("home", None), ("other", "zoe@acme.EXAMPLE")]
    assert fields.emails([*pairs, ("home", "z@home.example")]) == (
        LabeledValue("work", "Zoe@Acme.example"),
        LabeledValue("home", "z@home.example"),
    )
    assert fields.emails([]) == ()


def test_phones_normalise_deduplicate_and_drop_invalid_while_one_is_valid() -> None:
    pairs = [
        ("work", "(415) 555-2671"),
        ("mobile", "555-01"),  # invalid, dropped
        ("home", "+1 415 555 2671"),  # the work number again
        ("other", " "),
        ("uk", "020 7946 0018", "GB"),  # read in its own region
    ]
    assert fields.phones(pairs, US) == (
        LabeledValue("work", "+14155552671"),
        LabeledValue("uk", "+442079460018"),
    )


def test_phones_with_none_valid_name_the_bad_numbers() -> None:
    with pytest.raises(InvalidRecord, match=r"'555-01'.*; .*'12'"):
        fields.phones([("work", "555-01"), ("mobile", "12")], US)
    with pytest.raises(InvalidRecord, match=r"^no phone number$"):
        fields.phones([("work", None), ("mobile", "")], US)
    with pytest.raises(InvalidRecord, match=r"^mobile 555-01$"):
        fields.phones(
            [("mobile", "555-01")], US, lambda ps: "; ".join(f"{p.label} {p.raw}" for p in ps)
        )


def test_possible_numbers_are_kept_and_only_the_valid_policy_drops_them() -> None:
    fictional = [("work", "(555) 123-4567"), ("home", "+1 212 055 0100")]  # not assigned
    kept = (LabeledValue("work", "+15551234567"), LabeledValue("home", "+12120550100"))
    assert fields.phones(fictional, US) == kept
    with pytest.raises(NoPhone, match="for region US"):
        fields.phones(fictional, PhoneRules("US", require_valid=True))
    assert fields.phones([("work", None)], PhoneRules("US", allow_none=True)) == ()


def test_display_name_falls_back_along_the_chain() -> None:
    mail = (LabeledValue("work", "j.doe@acme.example"),)
    tel = (LabeledValue("mobile", "+14155552671"),)
    assert fields.display_name("Jo", "Doe") == ("Jo", "Doe")
    assert fields.display_name(None, "Doe", full="Jo Doe") == ("Doe", None)
    assert fields.display_name(None, None, full="Jo van Doe") == ("Jo", "van Doe")
    assert fields.display_name(None, None, full="Cher", company="Acme") == ("Cher", None)
    assert fields.display_name(None, None, company="Acme", addresses=mail) == ("Acme", None)
    assert fields.display_name(None, None, addresses=mail, numbers=tel) == ("j.doe", None)
    assert fields.display_name(None, None, numbers=tel) == ("+14155552671", None)
    with pytest.raises(InvalidRecord, match="no name"):
        fields.display_name(None, None)


def test_e164_returns_the_problems_without_raising() -> None:
    found, problems = fields.e164([("work", "555-01"), ("home", "4155552671")], US)
    assert found == (LabeledValue("home", "+14155552671"),)
    assert [(p.label, p.raw) for p in problems] == [("work", "555-01")]
    assert "invalid phone number '555-01'" in str(problems[0])


class _Client:
    closed = 0

    def close(self) -> None:
        self.closed += 1


def test_lazy_api_is_built_once_and_closed_only_if_built() -> None:
    connector = ScalingTestConnector(Integration("int-st", "scalingtest", "env:QUO_KEY"))
    with pytest.raises(NotImplementedError, match="scalingtest has no API client"):
        _ = connector.api
    connector.close()  # no client: nothing to close
    built: list[_Client] = []
    connector.make_api = lambda: built.append(_Client()) or built[-1]  # type: ignore[method-assign]
    connector.close()  # not built yet: nothing to close
    assert built == []
    assert connector.api is connector.api
    connector.close()
    assert len(built) == 1 and built[0].closed == 1
    connector.close()
    assert built[0].closed == 1
