"""Rate policy for one API key shared by every run: evenly spaced slots, slowed after a 429.

The state lives in the store so that all processes and runs see one schedule; these functions
only compute the next state, so the store can apply them atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_SLOWDOWN = 4.0
SLOWDOWN_AFTER_429 = 1.5
# Per granted slot the slowdown shrinks by this factor, so ~35 clean requests undo one 429.
RECOVERY = 0.988


@dataclass(frozen=True)
class GovernorState:
    next_at: float = 0.0  # earliest time (epoch seconds) the next request may be sent
    slowdown: float = 1.0  # multiplier on the base interval; >1 after 429s


def reserve(state: GovernorState, now: float, interval: float) -> tuple[GovernorState, float]:
    """Grant the next slot; return the new state and the time the caller may send at."""
    send_at = max(state.next_at, now)
    slowdown = max(1.0, state.slowdown * RECOVERY)
    return GovernorState(send_at + interval * slowdown, slowdown), send_at


def after_429(
    state: GovernorState, now: float, retry_after: float | None, interval: float
) -> GovernorState:
    """Nobody sends before the server's Retry-After (or one slowed interval) has passed."""
    slowdown = min(MAX_SLOWDOWN, state.slowdown * SLOWDOWN_AFTER_429)
    pause = retry_after if retry_after is not None else interval * slowdown
    return GovernorState(max(state.next_at, now + pause), slowdown)


class Throttle(Protocol):
    """What an API client needs from a rate governor (quo.governor.RateGovernor is one)."""

    def acquire(self) -> None: ...

    def on_rate_limited(self, retry_after: float | None) -> None: ...
