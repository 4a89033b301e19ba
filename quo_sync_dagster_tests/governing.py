"""A rate governor that records what it let through, for the clients' rate-limit tests."""

from __future__ import annotations

import time
from typing import Any

from quo_sync_dagster.core.ratelimit import retry_at
from quo_sync_dagster.quo.governor import RateGovernor

# time.sleep counts on the monotonic clock while the governor schedules on the wall clock.
CLOCK_SLACK = 0.005

Event = tuple[str, float, float | None]  # ("send" or "429", wall-clock time, Retry-After)


class RecordingGovernor(RateGovernor):
    """A RateGovernor noting when it let each request go and when each 429 was reported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Event] = []

    def acquire(self, not_before: float | None = None) -> None:
        super().acquire(not_before)
        self.events.append(("send", time.time(), None))

    def on_rate_limited(self, retry_after: float | None) -> float:
        self.events.append(("429", time.time(), retry_after))
        return super().on_rate_limited(retry_after)


def assert_every_429_was_waited_out(events: list[Event]) -> None:
    """In one thread, no request (the refused one's retry first) went out before the
    Retry-After of a 429 before it (lower bounds only: a loaded machine makes waits longer,
    never shorter)."""
    for i, (kind, at, retry_after) in enumerate(events):
        if kind == "429":
            asked = retry_at(at, retry_after)
            sends = [t for k, t, _ in events[i + 1 :] if k == "send"]
            assert all(t >= asked - CLOCK_SLACK for t in sends), (asked, sends)
