"""Quo's `openphone-signature` header (quo-api.md §3.4), verified without I/O.

The header is `hmac;1;<ms timestamp>;<base64 signature>`, possibly several comma-separated (Quo
may add versions); the signature is base64(HMAC-SHA256(base64-decoded webhook key,
f"{timestamp}.".encode() + raw body)). A delivery passes when any signature of scheme `hmac`,
version `1` verifies against any of the keys (each Quo webhook has its own) and the timestamp
it signs is within the tolerance of receipt. Reasons never echo the header, keys or body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from quo_sync_dagster.webhooks.handler import Rejected

HEADER = "openphone-signature"
SCHEME, VERSION = "hmac", "1"
MAX_SIGNATURES = 8  # bounds the HMACs a forged header can make the receiver compute
_MAX_TIMESTAMP_DIGITS = 15  # ms since 1970 has 13 digits until the year 2286
_DIGEST_BYTES = hashlib.sha256().digest_size


@dataclass(frozen=True)
class Signature:
    timestamp: str  # the digits as sent: the signed bytes hold them verbatim
    digest: bytes  # the decoded HMAC

    @property
    def millis(self) -> int:
        return int(self.timestamp)


def decode_key(key: str) -> bytes:
    """A webhook's signing key (base64, as Quo's `key` field holds it) as HMAC key bytes;
    ValueError, naming nothing of the key, when it is not base64."""
    try:
        decoded = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Quo webhook key is not base64") from None
    if not decoded:
        raise ValueError("a Quo webhook key is empty")
    return decoded


def parse(header: str | None) -> list[Signature]:
    """The well-formed `hmac;1;…` signatures of `header` (at most MAX_SIGNATURES); others
    (another scheme or version, a bad timestamp or base64) are skipped."""
    found: list[Signature] = []
    for part in (header or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        if len(fields) != 4 or fields[0].lower() != SCHEME or fields[1] != VERSION:
            continue
        timestamp, encoded = fields[2], fields[3]
        if not (timestamp.isascii() and timestamp.isdigit()):
            continue
        if len(timestamp) > _MAX_TIMESTAMP_DIGITS:
            continue
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == _DIGEST_BYTES:
            found.append(Signature(timestamp, digest))
            if len(found) == MAX_SIGNATURES:
                break
    return found


def expected_digest(key: bytes, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).digest()


def _matches(signature: Signature, keys: Iterable[bytes], body: bytes) -> bool:
    # Every key is tried (no early exit), so timing does not tell which one matched.
    matched = False
    for key in keys:
        expected = expected_digest(key, signature.timestamp, body)
        matched |= hmac.compare_digest(expected, signature.digest)
    return matched


def verify(
    header: str | None,
    body: bytes,
    keys: Sequence[bytes],
    received_at: datetime,
    tolerance_seconds: float,
) -> None:
    """Return when a signature of `header` verifies `body` under one of `keys` with a fresh
    timestamp. Raise Rejected 401 when none verifies (or there is none), 403 when only
    signatures with a timestamp outside `tolerance_seconds` of `received_at` (aware) verify."""
    signatures = parse(header)
    if not signatures:
        raise Rejected(401, "missing or malformed openphone-signature")
    now_ms = received_at.timestamp() * 1000
    verified = [s for s in signatures if _matches(s, keys, body)]
    if not verified:
        raise Rejected(401, "signature does not verify")
    if not any(abs(now_ms - s.millis) <= tolerance_seconds * 1000 for s in verified):
        raise Rejected(403, "stale delivery: its timestamp is outside the allowed window")
