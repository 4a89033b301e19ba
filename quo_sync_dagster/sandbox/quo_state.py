"""State of the Quo sandbox.

Contacts live in memory (written through to SQLite); per-request bookkeeping (counters,
injected faults, rate-limit buckets) lives in memory only.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DB_FILENAME = "quo_sandbox.sqlite"
KINDS = ("create", "patch", "get", "delete", "list", "lookup", "custom_fields")

Contact = dict[str, Any]


def _key(contact: Contact) -> tuple[str | None, str] | None:
    """Uniqueness key: Quo rejects a second contact with the same source and externalId (unless
    the sandbox is told to accept duplicates, as a Quo that does not enforce it would)."""
    external_id = contact["externalId"]
    return None if external_id is None else (contact["source"], external_id)


class ContactStore:
    """Contacts in API shape, kept in memory for speed and persisted on every write.

    Ordering is by an insertion sequence number, which also backs the opaque page tokens, so
    pages stay stable while contacts are created or deleted between page requests.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            data_dir / DB_FILENAME, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS contacts "
            "(id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, body TEXT NOT NULL)"
        )
        self._contacts: dict[str, Contact] = {}
        self._seq_of: dict[str, int] = {}
        self._id_at: dict[int, str] = {}
        self._order: list[int] = []  # sorted sequence numbers of live contacts
        self._by_key: dict[tuple[str | None, str], set[str]] = {}  # >1 id: accepted duplicates
        self._by_external_id: dict[str, set[str]] = {}
        for seq, body in self._db.execute("SELECT seq, body FROM contacts ORDER BY seq"):
            self._index(json.loads(body), seq)
        self._next_seq = (self._order[-1] + 1) if self._order else 1

    def _index(self, contact: Contact, seq: int) -> None:
        contact_id = contact["id"]
        self._contacts[contact_id] = contact
        self._seq_of[contact_id] = seq
        self._id_at[seq] = contact_id
        self._order.append(seq)
        self._index_key(contact)

    def _index_key(self, contact: Contact) -> None:
        key = _key(contact)
        if key is not None:
            self._by_key.setdefault(key, set()).add(contact["id"])
            self._by_external_id.setdefault(key[1], set()).add(contact["id"])

    def _unindex_key(self, contact: Contact) -> None:
        key = _key(contact)
        if key is not None:
            owners = self._by_key[key]
            owners.discard(contact["id"])
            if not owners:
                del self._by_key[key]
            ids = self._by_external_id[key[1]]
            ids.discard(contact["id"])
            if not ids:
                del self._by_external_id[key[1]]

    def get(self, contact_id: str) -> Contact | None:
        return self._contacts.get(contact_id)

    def insert(self, contact: Contact, unique: bool = True) -> bool:
        """Add a new contact; False (nothing written) if `unique` and its source + externalId
        is taken."""
        with self._lock:
            key = _key(contact)
            if unique and key is not None and key in self._by_key:
                return False
            seq = self._next_seq
            self._next_seq += 1
            self._db.execute(
                "INSERT INTO contacts (id, seq, body) VALUES (?, ?, ?)",
                (contact["id"], seq, json.dumps(contact)),
            )
            self._index(contact, seq)
            return True

    def taken(self, keys: Iterable[tuple[str | None, str]]) -> bool:
        """Whether a contact holds any of these (source, externalId) pairs."""
        with self._lock:
            return any(key in self._by_key for key in keys)

    def replace(self, contact: Contact, unique: bool = True) -> bool:
        """Overwrite an existing contact; False if `unique` and its new key belongs to another
        contact."""
        with self._lock:
            old = self._contacts[contact["id"]]
            key = _key(contact)
            owners = self._by_key.get(key, set()) if key is not None else set()
            if unique and owners - {contact["id"]}:
                return False
            self._db.execute(
                "UPDATE contacts SET body = ? WHERE id = ?", (json.dumps(contact), contact["id"])
            )
            self._unindex_key(old)
            self._contacts[contact["id"]] = contact
            self._index_key(contact)
            return True

    def delete(self, contact_id: str) -> bool:
        with self._lock:
            contact = self._contacts.pop(contact_id, None)
            if contact is None:
                return False
            self._db.execute("DELETE FROM contacts WHERE id = ?", (contact_id,))
            seq = self._seq_of.pop(contact_id)
            del self._id_at[seq]
            del self._order[bisect.bisect_left(self._order, seq)]
            self._unindex_key(contact)
            return True

    def page(
        self, external_ids: list[str], sources: list[str], after_seq: int, limit: int
    ) -> tuple[list[Contact], int, int | None]:
        """One page of contacts in creation order: (contacts, total matching, next after_seq)."""
        with self._lock:
            if external_ids:
                ids = set().union(*(self._by_external_id.get(e, ()) for e in external_ids))
                seqs = sorted(self._seq_of[i] for i in ids)
            else:
                seqs = self._order
            if sources:
                wanted = set(sources)
                seqs = [s for s in seqs if self._contacts[self._id_at[s]]["source"] in wanted]
            start = bisect.bisect_right(seqs, after_seq)
            window = seqs[start : start + limit]
            more = start + limit < len(seqs)
            contacts = [self._contacts[self._id_at[s]] for s in window]
            return contacts, len(seqs), (window[-1] if more else None)

    def summary(self) -> dict[str, Any]:
        """Counts for the admin stats; duplicates are recounted from the records, not the index."""
        with self._lock:
            by_source = Counter(c["source"] or "(none)" for c in self._contacts.values())
            pairs = Counter(k for c in self._contacts.values() if (k := _key(c)) is not None)
            return {
                "contacts": len(self._contacts),
                "contactsBySource": dict(by_source),
                "duplicateExternalIds": sum(1 for n in pairs.values() if n > 1),
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()


class WriteLog:
    """The last `limit` contact writes (create, patch, delete), numbered from 1, with the time
    each was made: who was written how often, and how long after a CRM change (tests and the
    ongoing-sync benchmark). Memory only."""

    def __init__(self, limit: int = 200_000) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self._count = 0

    def add(self, kind: str, contact: Contact) -> None:
        self._count += 1
        self._entries.append(
            {
                "n": self._count,
                "at": time.time(),
                "kind": kind,
                "id": contact["id"],
                "externalId": contact["externalId"],
                "source": contact["source"],
            }
        )

    def after(self, n: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` writes numbered above `n`, oldest first."""
        first = self._entries[0]["n"] if self._entries else self._count + 1
        start = max(n + 1 - first, 0)
        return [self._entries[i] for i in range(start, min(start + limit, len(self._entries)))]


@dataclass
class RequestCounters:
    """Requests by kind and by status answered; status 0 is a connection dropped unanswered."""

    requests: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    first: float | None = None
    last: float | None = None

    def add(self, kind: str, status: int, at: float) -> None:
        self.requests += 1
        self.by_kind[kind] += 1
        self.by_status[status] += 1
        self.first = at if self.first is None else min(self.first, at)
        self.last = at if self.last is None else max(self.last, at)  # delayed requests end late

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "byKind": {k: self.by_kind[k] for k in KINDS},
            "byStatus": {str(s): n for s, n in sorted(self.by_status.items())},
            "rateLimited": self.by_status[429],
            "firstRequestAt": self.first,
            "lastRequestAt": self.last,
        }


class TokenBuckets:
    """Per-key token bucket: capacity = rate, refilled continuously (Kong's per-second limit)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, max(rate, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
