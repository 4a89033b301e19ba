"""CRM values made safe at the boundary: for Quo, for JSON and for UTF-8.

CRMs hand back whatever was typed or imported: UTF-16 surrogates (UTF-8 cannot encode them,
so the whole request fails), NUL and other control characters, bidi overrides that
reorder what Quo shows ("Trojan Source"), runs of whitespace, megabytes of text, and NaN or
Infinity where a number belongs (JSON has neither).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

MAX_TEXT = 255  # the default cap on one free-text value (see QuoContact for why 255)

# C0 and C1 controls, NUL included (Unicode category Cc).
CONTROLS = "".join(chr(cp) for cp in range(0x100) if unicodedata.category(chr(cp)) == "Cc")
# Bidi embeddings and overrides (U+202A-U+202E) and isolates (U+2066-U+2069).
BIDI_CONTROLS = "".join(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
# A surrogate code point never encodes to UTF-8 (a str holds code points, not UTF-16 units).
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSAFE = re.compile(f"[{re.escape(CONTROLS + BIDI_CONTROLS)}\ud800-\udfff]")
# The whitespace controls (tab, newline, ...) are left to str.split, so that the words they
# separated stay apart; every other control and bidi character goes.
_DROPPED = re.compile(
    f"[{re.escape(''.join(c for c in CONTROLS + BIDI_CONTROLS if not c.isspace()))}]"
)


def clean(value: str, limit: int | None = MAX_TEXT) -> str:
    """`value` with surrogate pairs joined into the character they encode and lone surrogates
    replaced by U+FFFD, control and bidi characters removed, whitespace collapsed to single
    spaces and stripped, then cut to `limit` characters (None: no cap). Cleaning a cleaned
    value changes nothing."""
    if _SURROGATE.search(value):  # a round trip through UTF-16 joins pairs, replaces the rest
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = " ".join(_DROPPED.sub("", value).split())
    return text if limit is None else text[:limit].rstrip()


def clean_or_none(value: Any, limit: int | None = MAX_TEXT) -> str | None:
    """`clean(value, limit)`, or None for a non-string and for what cleans to nothing."""
    return (clean(value, limit) or None) if isinstance(value, str) else None


def has_unsafe(value: str) -> bool:
    """True when `value` holds a surrogate, a control or a bidi character."""
    return _UNSAFE.search(value) is not None


def finite(value: Any) -> Any:
    """None for NaN and +-Infinity (absent: JSON cannot carry them), else `value` itself."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
