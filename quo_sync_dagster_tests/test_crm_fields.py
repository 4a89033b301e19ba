"""The field helpers the CRM connectors share."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from quo_sync_dagster.core.models import Integration, InvalidRecord, LabeledValue
from quo_sync_dagster.crms import fields
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector


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
    assert fields.phones(pairs, "US") == (
        LabeledValue("work", "+14155552671"),
        LabeledValue("uk", "+442079460018"),
    )


def test_phones_with_none_valid_name_the_bad_numbers() -> None:
    with pytest.raises(InvalidRecord, match=r"'555-01'.*; .*'12'"):
        fields.phones([("work", "555-01"), ("mobile", "12")], "US")
    with pytest.raises(InvalidRecord, match=r"^no phone number$"):
        fields.phones([("work", None), ("mobile", "")], "US")
    with pytest.raises(InvalidRecord, match=r"^mobile 555-01$"):
        fields.phones(
            [("mobile", "555-01")], "US", lambda ps: "; ".join(f"{p.label} {p.raw}" for p in ps)
        )


def test_e164_returns_the_problems_without_raising() -> None:
    found, problems = fields.e164([("work", "555-01"), ("home", "4155552671")], "US")
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
