"""Verification and parsing helpers the CRM webhook handlers share.

Every comparison with a secret is constant-time over bytes (hmac.compare_digest refuses
non-ASCII str, and a header is whatever the sender put in it). Reasons never echo input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from quo_sync_dagster.core.models import InvalidRecord
from quo_sync_dagster.webhooks.handler import Rejected


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def same_secret(given: str | bytes | None, expected: str | bytes) -> bool:
    """Constant-time equality; an absent value or an empty expected secret never matches."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(_bytes(given), _bytes(expected))


def basic_auth_matches(header: str | None, user: str, password: str) -> bool:
    """`Authorization: Basic base64(user:password)` against the expected pair."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, colon, given_password = decoded.partition(b":")
    # `&`, not `and`: both compares always run, so timing does not tell which part was wrong.
    return bool(colon) & same_secret(given_user, user) & same_secret(given_password, password)


def hmac_sha256_hex_matches(secret: str, body: bytes, signature: str | None) -> bool:
    """A hex HMAC-SHA256 of `body` keyed with `secret` (either case of hex digits)."""
    if not secret or signature is None:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return same_secret(signature.strip().lower(), expected)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, else 400."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Rejected(400, "body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise Rejected(400, "body is not a JSON object")
    return parsed


def member(container: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """`container[key]` when it is a `kind` (bools are never numbers), else 400 naming `key`."""
    value = container.get(key)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None
    if not isinstance(value, kind):
        raise Rejected(400, f"{key} is missing or of the wrong type")
    return value


def person_id(value: Any, field: str) -> str:
    """A CRM id (non-blank string or integer) as text, else 400 naming `field`."""
    # Imported here: importing crms imports the handler modules, which import this one.
    from quo_sync_dagster.crms.fields import crm_id

    try:
        return crm_id(value, field)
    except InvalidRecord:
        raise Rejected(400, f"{field} is not an id") from None


def iso_time(value: str, field: str) -> datetime:
    """An ISO 8601 time (a naive one is UTC), else 400 naming `field`."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(400, f"{field} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def epoch_millis(value: int, field: str) -> datetime:
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise Rejected(400, f"{field} is not a time") from None


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def digest(*parts: Any) -> str:
    """A stable id for a delivery the CRM gives no id: a hash of its identifying fields."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:32]
