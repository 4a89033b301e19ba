"""HTTP with the behaviour every API client here needs: a shared throttle before each attempt,
rate-limit answers retried after their Retry-After, retries with backoff on 5xx and transport
errors.

A rate-limit answer holds back only the request it answered: that request is sent again no
earlier than its Retry-After (DEFAULT_RETRY_AFTER without one), then in the throttle's next free
slot, while the other requests sharing the throttle keep its rate (core.ratelimit explains why).

Used by the Quo client and by every CRM client, each with its own rate-limit signal (a 429, or
Pipedrive's 403 HTML page) and its own error type.

A request that is not safe to repeat (a create: `idempotent=False`) is retried only when the
server cannot have acted on it: a rate-limit answer, or a connection that failed before the
request was sent. When its outcome is unknown (a timeout or connection error after sending, or
a 5xx, after which the server may or may not have written) it is not retried: OutcomeUnknown
hands the decision to the caller, who can find out (e.g. look the record up) before sending it
again.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Any, Self

import httpx
import tenacity

from quo_sync_dagster.core.ratelimit import DEFAULT_RETRY_AFTER, Throttle


class ApiUnavailable(Exception):
    """An API kept failing (5xx, timeouts, rate limits) after every retry."""


class OutcomeUnknown(ApiUnavailable):
    """A request that is not safe to repeat was sent, and whether the server acted on it is
    unknown: its answer was lost (timeout, reset) or was a 5xx. It was not retried.

    An ApiUnavailable, so a caller that does not handle it fails as when the API is down,
    rather than repeating the request. `status` is the 5xx answered, None if no answer came.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failed attempt worth retrying. For a rate-limit answer, `retry_after` is the seconds to
    wait before the next attempt, and `retry_at` the throttle's time for it (with a throttle)."""

    def __init__(
        self, message: str, retry_after: float | None = None, retry_at: float | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.retry_at = retry_at


class _Unknown(Exception):
    """A non-idempotent attempt whose outcome is unknown: never retried."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# Transport errors raised before the request left: the server cannot have acted on it, so even a
# create is safe to send again. Any other transport error may come after (part of) the request
# was sent: a read timeout, a reset, a server that closed the connection without answering.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


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
        outcome_unknown: type[OutcomeUnknown] = OutcomeUnknown,
    ) -> None:
        self._http = http
        self._throttle = throttle
        self._max_attempts = max_attempts
        self._is_rate_limited = is_rate_limited
        self._unavailable = unavailable
        self._describe = describe
        self._outcome_unknown = outcome_unknown

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """The first answer that is neither a rate limit nor a 5xx, whatever its status.

        With `idempotent=False` (a create), only attempts the server cannot have acted on are
        retried (rate limits, connections that failed before sending); an attempt whose outcome
        is unknown raises `outcome_unknown` at once.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            reraise=True,
        )
        not_before: float | None = None  # when the next attempt may go, after a rate limit

        def attempt() -> httpx.Response:
            nonlocal not_before
            try:
                return self._attempt(method, path, idempotent, not_before, **kwargs)
            except _Transient as exc:
                not_before = exc.retry_at
                raise

        try:
            return retrying(attempt)
        except _Transient as exc:
            raise self._unavailable(
                f"{method} {path} failed after {self._max_attempts} attempts: {exc}"
            ) from None
        except _Unknown as exc:
            raise self._outcome_unknown(
                f"{method} {path} outcome unknown, not retried: {exc}", exc.status
            ) from None

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            # With a throttle, the next attempt's acquire() waits until Retry-After has passed
            # (on the throttle's clock), then takes a slot; it holds back no other request.
            return 0.0 if self._throttle else exc.retry_after
        return tenacity.wait_exponential_jitter(initial=0.5, max=20)(retry_state)

    def _attempt(
        self, method: str, path: str, idempotent: bool, not_before: float | None, **kwargs: Any
    ) -> httpx.Response:
        if self._throttle:
            self._throttle.acquire(not_before)
        try:
            response = self._http.request(method, path, **kwargs)
        except _NOT_SENT as exc:  # refused connections, no free connection: nothing was sent
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except httpx.TransportError as exc:  # timeouts, resets: maybe after the request was sent
            if not idempotent:
                raise _Unknown(f"{type(exc).__name__}: {exc}") from None
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if self._is_rate_limited(response):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            retry_at = self._throttle.on_rate_limited(retry_after) if self._throttle else None
            raise _Transient(
                f"rate limited ({response.status_code})",
                DEFAULT_RETRY_AFTER if retry_after is None else retry_after,
                retry_at,
            )
        if response.status_code >= 500:
            if not idempotent:  # the server may have written before it failed
                raise _Unknown(self._describe(response), response.status_code)
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
