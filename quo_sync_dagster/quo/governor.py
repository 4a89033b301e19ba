"""One request schedule per API credential (Quo key or CRM token), shared by every thread, run
and process via the store."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from quo_sync_dagster.core.ratelimit import after_429, reserve
from quo_sync_dagster.store.port import Store


def governor_key(credential: str, api: str = "quo") -> str:
    """The store key for a credential: a hash, so the credential is never written anywhere."""
    return f"{api}:" + hashlib.sha256(credential.encode()).hexdigest()[:24]


class RateGovernor:
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

    def acquire(self) -> None:
        """Block until this caller's reserved slot comes up."""
        send_at = self._store.update_governor(
            self._key, lambda s: reserve(s, self._clock(), self._interval)
        )
        delay = send_at - self._clock()
        if delay > 0:
            self._sleep(delay)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429: push everyone's next slot past Retry-After and slow the schedule down."""
        self._store.update_governor(
            self._key,
            lambda s: (after_429(s, self._clock(), retry_after, self._interval), 0.0),
        )
