"""HTTP with the behaviour every API client here needs: a shared throttle before each attempt,
rate-limit answers fed back to it, retries with backoff on 5xx and transport errors.

Used by the Quo client and by every CRM client, each with its own rate-limit signal (a 429, or
Pipedrive's 403 HTML page) and its own error type.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Any, Self

import httpx
import tenacity

from quo_sync_dagster.core.ratelimit import Throttle


class ApiUnavailable(Exception):
    """An API kept failing (5xx, timeouts, rate limits) after every retry."""


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_429(response: httpx.Response) -> bool:
    return response.status_code == 429


class GovernedHttp:
    def __init__(
        self,
        http: httpx.Client,
        throttle: Throttle | None = None,
        max_attempts: int = 6,
        is_rate_limited: Callable[[httpx.Response], bool] = is_429,
        unavailable: type[ApiUnavailable] = ApiUnavailable,
        describe: Callable[[httpx.Response], str] = lambda r: f"HTTP {r.status_code}",
    ) -> None:
        self._http = http
        self._throttle = throttle
        self._max_attempts = max_attempts
        self._is_rate_limited = is_rate_limited
        self._unavailable = unavailable
        self._describe = describe

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The first answer that is neither a rate limit nor a 5xx, whatever its status."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, **kwargs)
        except _Transient as exc:
            raise self._unavailable(
                f"{method} {path} failed after {self._max_attempts} attempts: {exc}"
            ) from None

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            # With a throttle, it already holds every caller back until Retry-After.
            return 0.0 if self._throttle else exc.retry_after
        return tenacity.wait_exponential_jitter(initial=0.5, max=20)(retry_state)

    def _attempt(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._throttle:
            self._throttle.acquire()
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # timeouts, resets, refused connections
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if self._is_rate_limited(response):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if self._throttle:
                self._throttle.on_rate_limited(retry_after)
            raise _Transient(
                f"rate limited ({response.status_code})", retry_after if retry_after else 1.0
            )
        if response.status_code >= 500:
            raise _Transient(self._describe(response))
        return response


class ApiClient:
    """Base of every API client here: it owns one GovernedHttp and closes it, also as a
    context manager."""

    _http: GovernedHttp

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
