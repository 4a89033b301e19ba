"""The store port: integrations, processes, the externalId -> Quo id map, the rate governor's
shared state, the webhook inbox, webhook subscriptions, polling watermarks, tombstones and the
activity map. Adapters: SQLite (embedded) and MongoDB."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from quo_sync_dagster.core.models import ContactLink, Integration
from quo_sync_dagster.core.process import ErrorDetail, PageResult, Process, ProcessState
from quo_sync_dagster.core.ratelimit import GovernorState

MAX_STORED_ERRORS = 100  # the seed keeps the last 100 errors per process


class NotFound(KeyError):
    """An integration or process id the store does not know; the message names it."""

    def __str__(self) -> str:
        return str(self.args[0])


class AlreadyRunning(Exception):
    """Another live Process holds the exclusive key a new Process asked for."""

    def __init__(self, process_id: str, key: str) -> None:
        super().__init__(f"process {process_id!r} is still running for {key!r}")
        self.process_id = process_id
        self.key = key


def check_renames(renames: Mapping[str, str]) -> dict[str, str]:
    """`renames` without no-op pairs; a chain (a new id that is also renamed) has no single
    meaning when the renames are applied one document at a time, so it is refused."""
    moves = {old: new for old, new in renames.items() if old != new}
    if chained := sorted(set(moves.values()) & set(moves)):
        raise ValueError(f"rename targets are also renamed: {chained[:5]}")
    return moves


@dataclass(frozen=True)
class InboxItem:
    id: str
    integration_id: str
    event_id: str
    payload: dict[str, Any]
    received_at: str  # ISO 8601 UTC, stamped by the store when the item was enqueued
    attempts: int = 0  # how often it was deferred after a failure
    last_error: str | None = None  # why it was last deferred


@dataclass(frozen=True)
class ActivityRecord:
    """One Quo call or message as logged: everything Quo sent about it so far, merged
    (core.activities), and the CRM activity made for each person it is logged on."""

    state: dict[str, Any]
    crm_ids: dict[str, str] = field(default_factory=dict)  # person externalId -> activity id


class Store(ABC):
    # ---- integrations -------------------------------------------------------------------
    @abstractmethod
    def upsert_integration(self, integration: Integration) -> None: ...

    @abstractmethod
    def get_integration(self, integration_id: str) -> Integration:
        """Raise NotFound for an unknown id."""

    @abstractmethod
    def list_integrations(self, crm: str | None = None) -> list[Integration]: ...

    @abstractmethod
    def delete_integration(self, integration_id: str) -> None:
        """Forget the integration with its webhook subscription, watermarks, tombstones and
        unacknowledged webhooks. Its contact links and Process history stay, so adding it
        again links the contacts it wrote instead of creating twins. Unknown ids: no-op."""

    # ---- processes ------------------------------------------------------------------------
    @abstractmethod
    def create_process(self, process: Process, exclusive_key: str | None = None) -> Process:
        """Insert; sets created_at/updated_at; a parent_id also appends the id to the parent's
        children. With `exclusive_key`, raise AlreadyRunning (and insert nothing) while another
        Process created with that key is live (not in TERMINAL_STATES); of concurrent creators
        with one key exactly one succeeds."""

    @abstractmethod
    def get_process(self, process_id: str) -> Process:
        """Raise NotFound for an unknown id."""

    @abstractmethod
    def list_processes(
        self,
        integration_id: str | None = None,
        states: Iterable[ProcessState] | None = None,
        crm: str | None = None,
    ) -> list[Process]:
        """Oldest first. `crm` matches `context["crm"]`."""

    @abstractmethod
    def transition(
        self,
        process_id: str,
        new_state: ProcessState,
        context_updates: Mapping[str, Any] | None = None,
    ) -> Process:
        """Atomically move to `new_state` (core.process.check_transition decides legality; an
        illegal one raises IllegalTransition and changes nothing) and merge `context_updates`
        into the context at the top level."""

    @abstractmethod
    def update_context(self, process_id: str, updates: Mapping[str, Any]) -> Process:
        """Merge `updates` into the context at the top level, atomically per key."""

    @abstractmethod
    def increment_counters(self, process_id: str, deltas: Mapping[str, int]) -> None:
        """Atomic increments of the named counters (core.process.COUNTER_NAMES), never a
        read-modify-write in Python."""

    @abstractmethod
    def record_page(self, process_id: str, page_key: str, result: PageResult) -> None:
        """Idempotent per page: replace the page's earlier result (if any), apply only the
        difference to the process counters, and replace that page's errors in the error log."""

    @abstractmethod
    def page_results(self, process_id: str) -> dict[str, PageResult]:
        """Latest result per page key (errors not included)."""

    @abstractmethod
    def recent_errors(self, process_id: str, limit: int = MAX_STORED_ERRORS) -> list[ErrorDetail]:
        """The last `limit` errors, oldest first."""

    # ---- externalId -> Quo id map ----------------------------------------------------------
    @abstractmethod
    def get_contact_links(
        self, integration_id: str, external_ids: Iterable[str]
    ) -> dict[str, ContactLink]: ...

    @abstractmethod
    def put_contact_links(self, integration_id: str, links: Mapping[str, ContactLink]) -> None: ...

    @abstractmethod
    def delete_contact_links(self, integration_id: str, external_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def count_contact_links(self, integration_id: str) -> int: ...

    @abstractmethod
    def iter_contact_links(self, integration_id: str) -> Iterator[tuple[str, ContactLink]]:
        """Every link of the integration in external id order, read a page at a time (links
        written or deleted meanwhile may or may not be seen)."""

    @abstractmethod
    def rename_contact_links(self, integration_id: str, renames: Mapping[str, str]) -> int:
        """Move links from old to new external ids, keeping quo_id and content_hash; a link
        already at a new id is overwritten. Returns how many links moved (old ids without a link
        are ignored). A link is never lost on the way: it is at its old id or at its new one.
        Raises ValueError for chained renames (see check_renames)."""

    # ---- rate governor ------------------------------------------------------------------------
    @abstractmethod
    def update_governor(
        self, key: str, fn: Callable[[GovernorState], tuple[GovernorState, float]]
    ) -> float:
        """Atomically replace the governor state of `key` (a hash, never a secret) by
        `fn(current)[0]` and return `fn(current)[1]`. `fn` may be called more than once (for
        optimistic retries) and must be pure. A missing key starts as GovernorState()."""

    # ---- webhook inbox (durable, at-least-once, deduplicated by event id) -----------------
    @abstractmethod
    def enqueue_webhook(self, integration_id: str, event_id: str, payload: dict[str, Any]) -> bool:
        """False (and nothing stored) when this event id was already enqueued."""

    @abstractmethod
    def claim_webhooks(
        self, integration_id: str, limit: int, lease_seconds: float = 300.0
    ) -> list[InboxItem]:
        """Oldest unacknowledged items; a claimed item is not returned again until its lease
        expires (then it is redelivered: at-least-once)."""

    @abstractmethod
    def ack_webhooks(self, item_ids: Iterable[str]) -> None:
        """Acknowledged items are never returned again; unknown ids are ignored."""

    @abstractmethod
    def get_webhooks(self, item_ids: Iterable[str]) -> list[InboxItem]:
        """The unacknowledged items among `item_ids` (leased or not), in inbox order; acked and
        unknown ids are left out. Reading changes no lease."""

    @abstractmethod
    def release_webhooks(self, item_ids: Iterable[str]) -> None:
        """End the lease of the unacknowledged items among `item_ids`: they are claimable at
        once. Acked and unknown ids are ignored."""

    @abstractmethod
    def pending_webhook_integrations(self) -> list[str]:
        """Sorted ids of the integrations that have an item claim_webhooks would return now
        (unacknowledged, lease expired or never leased)."""

    @abstractmethod
    def defer_webhooks(self, item_ids: Iterable[str], seconds: float, reason: str) -> None:
        """Items that failed: claimable again after `seconds`, with `attempts` counted up and
        `reason` kept as `last_error`. Acked and unknown ids are ignored."""

    @abstractmethod
    def webhook_backlog(self, integration_id: str) -> int:
        """How many of the integration's items are not acknowledged yet, leased or not."""

    # ---- webhook subscriptions (one per integration; references to secrets, never secrets) --
    @abstractmethod
    def put_webhook_subscription(self, integration_id: str, subscription: dict[str, Any]) -> None:
        """Replace the integration's subscription by `subscription`, a JSON-serialisable dict
        (read back as its JSON round trip: tuples become lists)."""

    @abstractmethod
    def get_webhook_subscription(self, integration_id: str) -> dict[str, Any] | None:
        """None when the integration has no subscription."""

    @abstractmethod
    def delete_webhook_subscription(self, integration_id: str) -> None:
        """No-op when there is none."""

    @abstractmethod
    def list_webhook_subscriptions(self) -> dict[str, dict[str, Any]]:
        """Every subscription by integration id, in id order."""

    # ---- polling watermarks (ISO 8601 text), per integration and object type ----------------
    @abstractmethod
    def get_watermark(self, integration_id: str, object_type: str) -> str | None:
        """None until one is set."""

    @abstractmethod
    def set_watermark(self, integration_id: str, object_type: str, value: str) -> None:
        """Replace the watermark, also by an earlier one (a reset re-reads): whether it may
        move back is the caller's decision."""

    # ---- tombstones: CRM people (namespaced external ids) confirmed deleted -------------------
    @abstractmethod
    def put_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        """Idempotent: an id already tombstoned stays so."""

    @abstractmethod
    def get_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> set[str]:
        """The tombstoned ids among `external_ids`."""

    @abstractmethod
    def delete_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        """Ids without a tombstone are ignored."""

    # ---- activity map (Quo message/call id -> what was logged on the CRM) -------------------
    @abstractmethod
    def get_activity_records(
        self, integration_id: str, quo_object_ids: Iterable[str]
    ) -> dict[str, ActivityRecord]:
        """The records of those Quo objects that have one."""

    @abstractmethod
    def put_activity_record(
        self, integration_id: str, quo_object_id: str, record: ActivityRecord
    ) -> None:
        """Replace the object's record (JSON values only)."""

    # ---- phone index (from the contact links) ------------------------------------------------
    @abstractmethod
    def people_by_phone(self, integration_id: str, phones: Iterable[str]) -> dict[str, list[str]]:
        """E.164 number -> the externalIds of the linked people who have it, the most recently
        linked first; numbers nobody has are left out."""

    def close(self) -> None:
        """Release connections."""
