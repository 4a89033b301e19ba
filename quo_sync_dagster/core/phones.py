"""Phone numbers to E.164 with libphonenumber, and the integration's phone policy.

A number is kept when it is *possible* for its country (its length and shape fit a number
there: a US area code cannot start with 0 or 1), read in the integration's default region when
it has no country code: real CRMs hold numbers in ranges
libphonenumber does not call *valid* (fictional 555 numbers, new or unassigned ranges), and
validity changes with every metadata release, which would make the same person's contact, and
so its content hash, flip between runs. The `valid` policy keeps only valid numbers for those
who want that. Whether a kept number is valid is counted apart (`is_valid`), never hashed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import phonenumbers
from phonenumbers import PhoneMetadata, ValidationResult

from quo_sync_dagster.core.models import InvalidRecord

POLICIES = ("possible", "valid")
_WHY_NOT = {
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "has no area code",
    ValidationResult.INVALID_COUNTRY_CODE: "has an unknown country code",
    ValidationResult.TOO_SHORT: "is too short",
    ValidationResult.INVALID_LENGTH: "has a length no number there has",
    ValidationResult.TOO_LONG: "is too long",
}


@dataclass(frozen=True)
class PhoneRules:
    """How one integration reads phone numbers: `region` for numbers without a country code,
    `require_valid` (the `valid` policy), and `allow_none` (`sync_people_without_phone`: a person
    without a number is still a contact)."""

    region: str = "US"
    require_valid: bool = False
    allow_none: bool = False

    @classmethod
    def from_settings(cls, region: str, settings: dict[str, Any]) -> PhoneRules:
        """An integration's rules; a setting holding anything else is a ValueError naming it."""
        policy = settings.get("phone_policy", "possible")
        if policy not in POLICIES:
            raise ValueError(f"setting phone_policy must be one of {POLICIES}, not {policy!r}")
        allow_none = settings.get("sync_people_without_phone", False)
        if not isinstance(allow_none, bool):
            raise ValueError(
                f"setting sync_people_without_phone must be true or false, not {allow_none!r}"
            )
        return cls(region, policy == "valid", allow_none)


def to_e164(raw: str, default_region: str = "US", require_valid: bool = False) -> str:
    """Normalise `raw` (vanity letters read as digits, an extension dropped: Quo holds E.164);
    numbers without a country code are read in `default_region`. InvalidRecord says why a
    number cannot be one (or, with `require_valid`, is not a valid one)."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidRecord(f"invalid phone number {raw!r}: {exc}") from None
    verdict = phonenumbers.is_possible_number_with_reason(parsed)
    if verdict != ValidationResult.IS_POSSIBLE:
        raise InvalidRecord(f"invalid phone number {raw!r}: it {_WHY_NOT[verdict]}")
    if not _shaped(parsed):
        raise InvalidRecord(f"invalid phone number {raw!r}: no number there is shaped like it")
    if require_valid and not phonenumbers.is_valid_number(parsed):
        raise InvalidRecord(f"invalid phone number {raw!r} for region {default_region}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _shaped(parsed: phonenumbers.PhoneNumber) -> bool:
    """Whether the number fits its country's general pattern (the union of every kind of
    number there, assigned or not), a rule of the numbering plan rather than of assignment."""
    region = phonenumbers.region_code_for_country_code(parsed.country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(parsed.country_code, region)
    pattern = metadata.general_desc.national_number_pattern if metadata else None
    national = phonenumbers.national_significant_number(parsed)
    return pattern is not None and re.fullmatch(pattern, national) is not None


def is_valid(e164: str) -> bool:
    """Whether libphonenumber's metadata calls the E.164 number `e164` assigned today."""
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:
        return False
