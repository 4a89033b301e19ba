"""Automatic recovery of failed pages, free of Dagster: when to retry, and which page ranges.

A Process whose pages failed (Quo or the CRM down, a run worker killed) is not closed as ERROR
at once: its unsynced pages are re-run after a backoff, a bounded number of times, so a
transient outage ends COMPLETED without anyone touching it. Only what still fails after the
last attempt ends in ERROR. The state lives in the Process context under `recovery`.
An operator's retry (the `<crm>_retry_failed_pages` job) asks for one now, in a new round
whose automatic retries start afresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

RECOVERY_KEY = "recovery"
RETRY_ROUND_KEY = "retryRound"  # Process context: operator retries so far (run keys differ)


@dataclass(frozen=True)
class RetryPolicy:
    """Per integration: settings `retry_attempts` (default 5) and `retry_backoff_seconds`
    (default 30, doubling per attempt up to `retry_max_backoff_seconds`, default 600). The
    defaults wait ~15 minutes in all before giving up: longer than a typical API outage."""

    attempts: int = 5
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 600.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RetryPolicy:
        try:
            policy = cls(
                int(settings.get("retry_attempts", cls.attempts)),
                float(settings.get("retry_backoff_seconds", cls.backoff_seconds)),
                float(settings.get("retry_max_backoff_seconds", cls.max_backoff_seconds)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad retry setting: {exc}") from None
        if policy.attempts < 0 or policy.backoff_seconds < 0 or policy.max_backoff_seconds < 0:
            raise ValueError(f"retry settings must not be negative: {policy}")
        return policy

    def delay(self, attempt: int) -> timedelta:
        """The wait before retry number `attempt + 1`."""
        return timedelta(seconds=min(self.backoff_seconds * 2**attempt, self.max_backoff_seconds))


class Step(StrEnum):
    WAIT = "wait"  # a backoff is running
    RETRY = "retry"  # re-run the unsynced pages now
    GIVE_UP = "give_up"  # attempts exhausted: close as ERROR


@dataclass(frozen=True)
class Decision:
    step: Step
    state: dict[str, Any]  # the new `recovery` context value
    attempt: int  # retries already launched before this decision


REQUESTED = {"attempt": 0, "stalledSince": None, "requested": True}  # an operator's retry


def decide(state: Mapping[str, Any] | None, policy: RetryPolicy, now: datetime) -> Decision:
    """What to do with a Process whose pages are unsynced and which no run is working on.
    The backoff starts when the stall is first seen, so it counts from the failure. A
    requested retry runs now, whatever the automatic attempts left."""
    attempt = int((state or {}).get("attempt", 0))
    stalled = (state or {}).get("stalledSince")
    if (state or {}).get("requested"):
        return Decision(Step.RETRY, {"attempt": attempt + 1, "stalledSince": None}, attempt)
    if attempt >= policy.attempts:
        return Decision(Step.GIVE_UP, dict(state or {}), attempt)
    if stalled is None:
        return Decision(Step.WAIT, {"attempt": attempt, "stalledSince": now.isoformat()}, attempt)
    if now < datetime.fromisoformat(stalled) + policy.delay(attempt):
        return Decision(Step.WAIT, dict(state or {}), attempt)
    return Decision(Step.RETRY, {"attempt": attempt + 1, "stalledSince": None}, attempt)


def page_ranges(pages: Iterable[int], per_run: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) ranges over the given page indices: contiguous runs only (a
    range re-runs every page between its ends), each at most `per_run` pages."""
    ranges: list[tuple[int, int]] = []
    for page in sorted(set(pages)):
        if ranges and ranges[-1][1] == page - 1 and page - ranges[-1][0] < per_run:
            ranges[-1] = (ranges[-1][0], page)
        else:
            ranges.append((page, page))
    return ranges
