"""Field helpers the CRM connectors share: text, ids, lists, phones, e-mails and timestamps.

A connector reads a person's fields with `text`, `items` and `crm_id`: a value is cleaned
(core.sanitize), absent (None, NaN, Infinity), or of a wrong type, which fails the person with
an InvalidRecord naming the field (guessing what a list or an object where text belongs meant
would sync wrong data). It then hands over phones and e-mails as (label, text) pairs, the label
being what Quo shows (and, for phones, an optional third item: the region to read that one
number in); the policy of where those pairs come from stays in the connector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from quo_sync_dagster.core.models import MAX_EXTERNAL_ID, InvalidRecord, LabeledValue, NoPhone
from quo_sync_dagster.core.phones import PhoneRules, to_e164
from quo_sync_dagster.core.sanitize import MAX_TEXT, clean, clean_or_none, finite

# (label, text) or (label, text, region): a region of None means the default one.
PhonePair = tuple[str, str | None] | tuple[str, str | None, str | None]
_NOUNS = {str: "text", dict: "objects"}


def _absent(value: Any) -> bool:
    """JSON's null, and the NaN (or Infinity) a page frame or a spreadsheet puts in a gap."""
    return value is None or finite(value) is None


def text(value: Any, field: str, limit: int | None = MAX_TEXT) -> str | None:
    """The CRM field `field` as cleaned text cut to `limit` characters (None: no cap); None
    when it is blank or absent. Any other type is an InvalidRecord naming the field."""
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise InvalidRecord(f"{field} must be text, not {type(value).__name__}")
    return clean(value, limit) or None


def items(value: Any, field: str, kind: type | tuple[type, ...] = str) -> list[Any]:
    """The CRM list field `field` as a list of `kind`: a list's (or tuple's) items, absent ones
    skipped; a lone `kind` is one item (a string is never read character by character); an
    absent value is none. Any other value or item is an InvalidRecord naming the field."""
    if _absent(value):
        return []
    found = [i for i in value if not _absent(i)] if isinstance(value, list | tuple) else [value]
    for item in found:
        if not isinstance(item, kind):
            nouns = " or ".join(_NOUNS[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise InvalidRecord(f"{field} must hold {nouns}, not {type(item).__name__}")
    return found


def crm_id(value: Any, field: str) -> str:
    """A person's CRM id as text: a non-blank string, or an integer. Anything else (None, a
    bool, a float, a list, an object) is an InvalidRecord naming `field`."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10**MAX_EXTERNAL_ID:  # str() of a huge int raises, and is no id anyway
            raise InvalidRecord(f"{field} is an integer of more than {MAX_EXTERNAL_ID} digits")
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    kind = "blank" if isinstance(value, str) else f"a {type(value).__name__}"
    raise InvalidRecord(f"{field} must be a string or an integer, not {kind}")


def shown_id(value: Any) -> str:
    """How an error names a person whatever their id holds; never raises."""
    try:
        shown = value if isinstance(value, str) else repr(value)
    except Exception:  # e.g. an int too long to print, a self-referencing list
        shown = f"<{type(value).__name__}>"
    return clean(shown[:100], None) or repr(shown[:100])


def aware(timestamp: str) -> datetime:
    """An ISO 8601 timestamp as an aware datetime; a naive one is UTC, as Quo's times are."""
    moment = datetime.fromisoformat(timestamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def emails(pairs: Iterable[tuple[str, str | None]]) -> tuple[LabeledValue, ...]:
    """The non-blank addresses, once each ignoring case; the first label and spelling win."""
    found: dict[str, LabeledValue] = {}
    for label, raw in pairs:
        if (email := clean_or_none(raw)) is not None:
            found.setdefault(email.lower(), LabeledValue(label, email))
    return tuple(found.values())


@dataclass(frozen=True)
class PhoneProblem:
    """A number that is not kept: its label, the raw text, and why (to_e164's message)."""

    label: str
    raw: str
    reason: str

    def __str__(self) -> str:
        return self.reason


def e164(
    pairs: Iterable[PhonePair], rules: PhoneRules
) -> tuple[tuple[LabeledValue, ...], list[PhoneProblem]]:
    """The numbers `rules` keep, in E.164, once each (the first label wins), and the others.
    Blank values are skipped; `rules.region` reads numbers without a country code."""
    phones: dict[str, LabeledValue] = {}
    problems: list[PhoneProblem] = []
    for pair in pairs:
        label, value, *rest = pair
        own = clean_or_none(rest[0]) if rest else None
        if (raw := clean_or_none(value)) is None:
            continue
        try:
            number = to_e164(raw, own or rules.region, rules.require_valid)
        except InvalidRecord as exc:
            problems.append(PhoneProblem(label, raw, str(exc)))
            continue
        phones.setdefault(number, LabeledValue(label, number))
    return tuple(phones.values()), problems


def _joined(problems: Sequence[PhoneProblem]) -> str:
    return "; ".join(map(str, problems)) or "no phone number"


def phones(
    pairs: Iterable[PhonePair],
    rules: PhoneRules,
    explain: Callable[[Sequence[PhoneProblem]], str] = _joined,
) -> tuple[LabeledValue, ...]:
    """e164's kept numbers; the others are dropped. None kept raises NoPhone with
    `explain(problems)` (by default the problems, joined, or "no phone number" when there
    were none), unless the rules allow people without a phone."""
    found, problems = e164(pairs, rules)
    if not found and not rules.allow_none:
        raise NoPhone(explain(problems))
    return found


def display_name(
    first: str | None,
    last: str | None,
    *,
    full: str | None = None,
    company: str | None = None,
    addresses: Sequence[LabeledValue] = (),
    numbers: Sequence[LabeledValue] = (),
) -> tuple[str, str | None]:
    """(firstName, lastName) for Quo, which shows contacts by a first name it requires: the
    person's own names (a lone last name moves to first); else `full` split at its first space;
    else the company; else the first e-mail's local part; else the first phone number.
    InvalidRecord when the record holds none of these."""
    if first:
        return first, last
    if last:
        return last, None
    if full:
        given, _, family = full.partition(" ")
        return given, family.strip() or None
    for fallback in (company, *(a.value.partition("@")[0] for a in addresses)):
        if fallback:
            return fallback, None
    if numbers:
        return numbers[0].value, None
    raise InvalidRecord("no name: no name, full name, company, e-mail or phone number to show")
