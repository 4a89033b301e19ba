"""Rate policy for one API key shared by every run: evenly spaced slots; Retry-After per request.

Slots are granted 1/rate apart from one schedule per key. A 429 (or another rate-limit answer)
does not touch that schedule: it only cost the key the slot its request used. The request that
got it is not sent again before its Retry-After has passed (delta-seconds or an HTTP date,
measured from when the 429 was seen; DEFAULT_RETRY_AFTER without the header), and then it takes
the next free slot like any other request. No multiplicative slowdown, and no key-wide pause.

Why per request and not per key: Retry-After is the server's instruction for retrying the
request it answered. Pausing the whole key for it costs rate x Retry-After slots per 429 (20
slots for a 1 s Retry-After at 20 req/s), so 20% random 429s would cut the throughput to ~0.16
of the limit, whatever the governor does between pauses. Per request, the other in-flight
requests keep the configured rate, and the rate is back at the limit as soon as the 429s stop.
A key that is truly over its limit is still not hammered: the requests in flight per run are
bounded by the upserter's concurrency, and each request waiting out a Retry-After holds its
worker, so when every request is refused the key sees at most `concurrency` requests per
Retry-After per run.

The state lives in the store so that all processes and runs see one schedule; these functions
only compute the next state, so the store can apply them atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# A rate-limit answer without (a readable) Retry-After: its request waits this long, one window
# of a per-second limit.
DEFAULT_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class GovernorState:
    next_at: float = 0.0  # earliest time (epoch seconds) the next request may be sent
    # Unused by the policy, which always writes 1.0: kept so that the stores' schema stays as it
    # is. A value left > 1 by an older version (a multiplicative slowdown) is ignored and reset.
    slowdown: float = 1.0


def reserve(state: GovernorState, now: float, interval: float) -> tuple[GovernorState, float]:
    """Grant the next slot; return the new state and the time the caller may send at."""
    send_at = max(state.next_at, now)
    return GovernorState(send_at + interval), send_at


def retry_at(seen_at: float, retry_after: float | None) -> float:
    """The earliest time a request answered with a rate limit at `seen_at` may be sent again:
    `retry_after` is the seconds parsed from its Retry-After (an HTTP date already converted),
    None without the header. Only that request waits; the key's schedule is not changed."""
    return seen_at + (DEFAULT_RETRY_AFTER if retry_after is None else max(0.0, retry_after))


class Throttle(Protocol):
    """What an API client needs from a rate governor (quo.governor.RateGovernor is one)."""

    def acquire(self, not_before: float | None = None) -> None:
        """Block until the caller may send: not before `not_before` (a time returned by
        on_rate_limited for this request's previous attempt), then in the next free slot."""
        ...

    def on_rate_limited(self, retry_after: float | None) -> float:
        """A rate-limit answer to the caller's request: return when that request may be sent
        again (pass it to acquire). Other requests are not held back."""
        ...
