"""Where verified deliveries go: the `Inbox` port, its store adapter, and the writer thread.

The receiver answers a CRM only after the inbox holds the delivery's changes. `InboxWriter` hands
every request's entries to one thread, which passes whatever queued up meanwhile to the inbox in
one call, then wakes each request. One writer means no two connections queue for SQLite's write
lock (each entry is still its own commit: ~20,000/s on one thread, far above what the HTTP side
serves, so a store method committing many at once was not needed); SQS gets batch calls.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from quo_sync_dagster.store import Store


@dataclass(frozen=True)
class InboxEntry:
    integration_id: str
    event_id: str
    payload: dict[str, Any]  # {"change": PersonChange.to_payload(), "receivedAt": ISO}


class Inbox(Protocol):
    def enqueue(self, entries: Sequence[InboxEntry]) -> list[bool]:
        """Store every entry durably before returning; per entry, False when its event id was
        already there (an inbox that cannot tell says True). Raise if any may be lost."""

    def close(self) -> None: ...


class StoreInbox:
    """The store's webhook inbox (dedupe by integration and event id); each entry commits."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def enqueue(self, entries: Sequence[InboxEntry]) -> list[bool]:
        return [
            self.store.enqueue_webhook(e.integration_id, e.event_id, e.payload) for e in entries
        ]

    def close(self) -> None:
        """The store belongs to whoever opened it."""


@dataclass
class _Job:
    entries: Sequence[InboxEntry]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[bool]]


def _settle(future: asyncio.Future[list[bool]], outcome: list[bool] | BaseException) -> None:
    if future.done():  # the request was cancelled (its sender hung up)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class InboxWriter:
    """One writer thread in front of an Inbox; `enqueue` returns once the entries are stored."""

    def __init__(self, inbox: Inbox, max_batch: int = 500) -> None:
        self.inbox = inbox
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
        self._thread.start()

    async def enqueue(self, entries: Sequence[InboxEntry]) -> list[bool]:
        loop = asyncio.get_running_loop()
        job = _Job(entries, loop, loop.create_future())
        self._jobs.put(job)
        return await job.future

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            jobs, size = [first], len(first.entries)
            while size < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                size += len(job.entries)
            self._write(jobs)

    def _write(self, jobs: list[_Job]) -> None:
        try:
            stored = self.inbox.enqueue([e for job in jobs for e in job.entries])
        except Exception as exc:  # every request of the batch answers 5xx; the CRM retries
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.entries)
            job.loop.call_soon_threadsafe(_settle, job.future, stored[start:end])
            start = end
