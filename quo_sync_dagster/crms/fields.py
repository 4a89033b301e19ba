"""Field helpers the CRM connectors share: text, phones, e-mails and timestamps.

A connector hands over its values as (label, raw value) pairs, the label being what Quo shows
(and, for phones, an optional third item: the region to read that one number in); the policy
of where those pairs come from stays in the connector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from quo_sync_dagster.core.models import InvalidRecord, LabeledValue
from quo_sync_dagster.core.phones import to_e164

# (label, raw value) or (label, raw value, region): a region of None means the default one.
PhonePair = tuple[str, Any] | tuple[str, Any, str | None]


def text(value: Any) -> str | None:
    """Stripped text, or None for blanks and non-strings (page frames turn gaps into NaN)."""
    return (value.strip() or None) if isinstance(value, str) else None


def aware(timestamp: str) -> datetime:
    """An ISO 8601 timestamp as an aware datetime; a naive one is UTC, as Quo's times are."""
    moment = datetime.fromisoformat(timestamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def emails(pairs: Iterable[tuple[str, Any]]) -> tuple[LabeledValue, ...]:
    """The non-blank addresses, once each ignoring case; the first label and spelling win."""
    found: dict[str, LabeledValue] = {}
    for label, raw in pairs:
        if (email := text(raw)) is not None:
            found.setdefault(email.lower(), LabeledValue(label, email))
    return tuple(found.values())


@dataclass(frozen=True)
class PhoneProblem:
    """A number that is not valid: its label, the raw text, and why (to_e164's message)."""

    label: str
    raw: str
    reason: str

    def __str__(self) -> str:
        return self.reason


def e164(
    pairs: Iterable[PhonePair], region: str
) -> tuple[tuple[LabeledValue, ...], list[PhoneProblem]]:
    """The valid numbers in E.164, once each (the first label wins), and the invalid ones.
    Blank and non-string values are skipped; `region` reads numbers without a country code."""
    phones: dict[str, LabeledValue] = {}
    problems: list[PhoneProblem] = []
    for pair in pairs:
        label, value, *rest = pair
        own = rest[0] if rest else None
        if (raw := text(value)) is None:
            continue
        try:
            number = to_e164(raw, own or region)
        except InvalidRecord as exc:
            problems.append(PhoneProblem(label, raw, str(exc)))
            continue
        phones.setdefault(number, LabeledValue(label, number))
    return tuple(phones.values()), problems


def _joined(problems: Sequence[PhoneProblem]) -> str:
    return "; ".join(map(str, problems)) or "no phone number"


def phones(
    pairs: Iterable[PhonePair],
    region: str,
    explain: Callable[[Sequence[PhoneProblem]], str] = _joined,
) -> tuple[LabeledValue, ...]:
    """e164's valid numbers: invalid ones are dropped while at least one valid one remains.
    None valid raises InvalidRecord with `explain(problems)` (by default the problems, joined,
    or "no phone number" when there were none)."""
    found, problems = e164(pairs, region)
    if not found:
        raise InvalidRecord(explain(problems))
    return found
