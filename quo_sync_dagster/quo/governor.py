"""One request schedule per API credential (Quo key or CRM token), shared by every thread, run
and process via the store."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from quo_sync_dagster.core.ratelimit import reserve, retry_at
from quo_sync_dagster.store.port import Store


def governor_key(credential: str, api: str = "quo") -> str:
    """The store key for a credential: a hash, so the credential is never written anywhere."""
    return f"{api}:" + hashlib.sha256(credential.encode()).hexdigest()[:24]


class RateGovernor:
    """Slots 1/rate apart from the shared schedule. A 429 holds back only the request it
    answered, until its Retry-After; the schedule, and every other request, goes on at the
    configured rate (core.ratelimit holds the policy and the reasons)."""

    def __init__(
        self,
        store: Store,
        credential: str,
        requests_per_second: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        api: str = "quo",
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0, got {requests_per_second}")
        self._store = store
        self._key = governor_key(credential, api)
        self._interval = 1.0 / requests_per_second
        self._clock = clock
        self._sleep = sleep

    def acquire(self, not_before: float | None = None) -> None:
        """Block until this caller may send: first until `not_before` (the retry time of a
        rate-limited request), then until the slot it reserves from the shared schedule.

        The slot is reserved only once `not_before` has passed: reserving it ahead would push
        the shared schedule past the Retry-After for every other request of the key.
        """
        if not_before is not None:
            self._wait_until(not_before)
        send_at = self._store.update_governor(
            self._key, lambda s: reserve(s, self._clock(), self._interval)
        )
        self._wait_until(send_at)

    def on_rate_limited(self, retry_after: float | None) -> float:
        """A 429 to the caller's request: when that request may be sent again. The slot it used
        is all it cost the key; the shared schedule is left as it is."""
        return retry_at(self._clock(), retry_after)

    def _wait_until(self, when: float) -> None:
        delay = when - self._clock()
        if delay > 0:
            self._sleep(delay)
