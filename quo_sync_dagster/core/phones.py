"""Phone numbers to E.164 with libphonenumber, using the integration's default region."""

from __future__ import annotations

import phonenumbers

from quo_sync_dagster.core.models import InvalidRecord


def to_e164(raw: str, default_region: str = "US") -> str:
    """Normalise `raw`; numbers without a country code are read in `default_region`."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidRecord(f"invalid phone number {raw!r}: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidRecord(f"invalid phone number {raw!r} for region {default_region}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
