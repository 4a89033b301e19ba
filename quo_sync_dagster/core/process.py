"""The seed's Process: a long-running operation with an enforced state machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class ProcessState(StrEnum):
    INITIALIZING = "INITIALIZING"
    FETCHING_TOTAL = "FETCHING_TOTAL"
    QUEUING_PAGES = "QUEUING_PAGES"
    PROCESSING_BATCHES = "PROCESSING_BATCHES"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"


_FORWARD: dict[ProcessState, set[ProcessState]] = {
    ProcessState.INITIALIZING: {ProcessState.FETCHING_TOTAL},
    ProcessState.FETCHING_TOTAL: {ProcessState.QUEUING_PAGES},
    ProcessState.QUEUING_PAGES: {ProcessState.PROCESSING_BATCHES},
    ProcessState.PROCESSING_BATCHES: {ProcessState.COMPLETING},
    ProcessState.COMPLETING: {ProcessState.COMPLETED},
    # A process that failed because some pages failed resumes when those pages are re-run.
    ProcessState.ERROR: {ProcessState.PROCESSING_BATCHES},
    ProcessState.COMPLETED: set(),
}
TERMINAL_STATES = frozenset({ProcessState.COMPLETED, ProcessState.ERROR})


class IllegalTransition(ValueError):
    pass


def check_transition(current: ProcessState, new: ProcessState) -> None:
    """Raise unless `current -> new` is allowed: the seed's chain, or any live state -> ERROR."""
    allowed = _FORWARD[current] | (
        {ProcessState.ERROR} if current not in TERMINAL_STATES else set()
    )
    if new not in allowed:
        raise IllegalTransition(f"process cannot go from {current} to {new}")


COUNTER_NAMES = (
    "processed",  # CRM records handled (synced + failed + skipped)
    "synced",  # records now current in Quo (created + updated + unchanged)
    "failed",
    "created",
    "updated",
    "unchanged",  # same content hash as last sync, zero requests
    "skipped",  # not sent on purpose, with a reason (SkipReason)
    "adopted",  # synced by linking an earlier system's contact (counted in synced too)
    "adoption_candidates",  # created, though a contact not ours shares a phone number
    "unverified_phones",  # numbers kept as possible that libphonenumber does not call valid
    "pages_processed",
    "pages_failed",
)


class SkipReason(StrEnum):
    """Why a record was not sent to Quo on purpose (skipped, neither synced nor failed)."""

    NO_PHONE = "no phone"
    DUPLICATE = "duplicate in page"
    FILTERED = "excluded by a filter"
    DELETED = "deleted in the CRM"


MAX_ERROR_CHARS = 500  # one error text, stored and shown; a CRM can echo megabytes back


def cap_text(value: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`value` cut to `limit` characters, saying how much was cut."""
    if len(value) <= limit:
        return value
    note = f"... [{len(value) - limit} more characters]"
    return value[: max(limit - len(note), 0)] + note


@dataclass(frozen=True)
class ErrorDetail:
    """One record's failure, or its skip (`skipped` holds the SkipReason), with the text why."""

    external_id: str | None
    error: str
    timestamp: str
    page: str | None = None
    skipped: str | None = None

    def __post_init__(self) -> None:
        # Errors quote CRM data and API answers: capped here, so no store or metadata grows
        # with them.
        object.__setattr__(self, "error", cap_text(self.error))
        if self.external_id is not None:
            object.__setattr__(self, "external_id", cap_text(self.external_id, 100))


@dataclass(frozen=True)
class PageResult:
    """Outcome of one page; the store replaces a re-run page's result instead of adding to it."""

    records: int
    synced: int
    failed: int
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    adopted: int = 0
    adoption_candidates: int = 0
    unverified_phones: int = 0
    ok: bool = True  # False: the page as a whole failed (fetch error, Quo unreachable)
    errors: tuple[ErrorDetail, ...] = ()

    def counter_values(self) -> dict[str, int]:
        return {
            "processed": self.records if self.ok else 0,
            "synced": self.synced,
            "failed": self.failed,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "adopted": self.adopted,
            "adoption_candidates": self.adoption_candidates,
            "unverified_phones": self.unverified_phones,
            "pages_processed": int(self.ok),
            "pages_failed": int(not self.ok),
        }


# PageResult's counts, as the stores keep them; those from `skipped` on came after the first
# release (a page stored before has their default, 0).
PAGE_COUNTS = (
    "records",
    "synced",
    "failed",
    "created",
    "updated",
    "unchanged",
    "skipped",
    "adopted",
    "adoption_candidates",
    "unverified_phones",
)


@dataclass
class Process:
    id: str
    integration_id: str
    name: str
    type: str
    state: ProcessState
    context: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    parent_id: str | None = None
    children: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
