"""MongoDB store for deployments where runs span hosts.

MongoDB is atomic per document and this adapter uses no multi-document transactions (mongomock
has none), so every invariant rests on single-document operations: `$inc` for counters,
compare-and-set on `state` for transitions, a version field for the governor, and
`find_one_and_update` to swap a page's result while reading the one it replaces, and a lock
document per exclusive key whose holder is swapped only once it has ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TypeVar

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument, UpdateMany
from pymongo.errors import BulkWriteError, DuplicateKeyError

from quo_sync_dagster.core.models import ContactLink, Integration
from quo_sync_dagster.core.process import (
    COUNTER_NAMES,
    PAGE_COUNTS,
    TERMINAL_STATES,
    ErrorDetail,
    PageResult,
    Process,
    ProcessState,
    check_transition,
)
from quo_sync_dagster.core.ratelimit import GovernorState
from quo_sync_dagster.store.port import (
    MAX_STORED_ERRORS,
    ActivityRecord,
    AlreadyRunning,
    InboxItem,
    NotFound,
    Store,
    check_renames,
)

_T = TypeVar("_T")
_MAX_IDS_PER_QUERY = 1000  # keeps `$in` lists far below the 16 MB command limit
_LINKS_PER_READ = 1000  # iter_contact_links reads this many links per query
_DUPLICATE_KEY = 11000
_INBOX_ORDER = [("enqueued_at", ASCENDING), ("_id", ASCENDING)]


def _now() -> str:
    # ISO text like the SQLite adapter: BSON dates would drop the microseconds.
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _check_counters(names: Iterable[str]) -> None:
    # Counter names become field paths, so only the known ones may reach an update.
    if unknown := sorted(set(names) - set(COUNTER_NAMES)):
        raise ValueError(f"unknown process counters: {unknown}")


def _context_paths(updates: Mapping[str, Any]) -> dict[str, Any]:
    """`$set` paths that merge `updates` into the context key by key."""
    for key in updates:
        if not key or "." in key or key.startswith("$"):
            raise ValueError(f"context key {key!r} cannot be a MongoDB field name")
    return {f"context.{key}": value for key, value in updates.items()}


def _chunks(items: Iterable[_T]) -> Iterator[list[_T]]:
    unique = list(dict.fromkeys(items))
    for start in range(0, len(unique), _MAX_IDS_PER_QUERY):
        yield unique[start : start + _MAX_IDS_PER_QUERY]


def _object_ids(item_ids: Iterable[str]) -> list[ObjectId]:
    # Inbox item ids are ObjectIds as text; other text names no item.
    return [ObjectId(item_id) for item_id in item_ids if ObjectId.is_valid(item_id)]


def _inbox_item(doc: Mapping[str, Any]) -> InboxItem:
    return InboxItem(
        id=str(doc["_id"]),
        integration_id=doc["integration_id"],
        event_id=doc["event_id"],
        payload=doc["payload"],
        # Derived from the enqueue time every item has had, so older documents need no migration.
        received_at=datetime.fromtimestamp(doc["enqueued_at"], UTC).isoformat(
            timespec="microseconds"
        ),
        attempts=doc.get("attempts", 0),
        last_error=doc.get("last_error"),
    )


def _link(doc: Mapping[str, Any]) -> ContactLink:
    return ContactLink(doc["quo_id"], doc["content_hash"], tuple(doc.get("phones", ())))


def _process(doc: Mapping[str, Any]) -> Process:
    return Process(
        id=doc["_id"],
        integration_id=doc["integration_id"],
        name=doc["name"],
        type=doc["type"],
        state=ProcessState(doc["state"]),
        context=doc["context"],
        counters={name: doc["counters"].get(name, 0) for name in COUNTER_NAMES},
        parent_id=doc["parent_id"],
        children=doc["children"],
        created_at=datetime.fromisoformat(doc["created_at"]),
        updated_at=datetime.fromisoformat(doc["updated_at"]),
    )


_PAGE_FIELDS = (*PAGE_COUNTS, "ok")


def _page_result(doc: Mapping[str, Any]) -> PageResult:
    # A page stored before a field existed has the field's default (`skipped` = 0).
    return PageResult(**{name: doc[name] for name in _PAGE_FIELDS if name in doc})


class MongoStore(Store):
    def __init__(self, client: MongoClient[dict[str, Any]], database: str = "quo_sync") -> None:
        """`client` may also be a `mongomock.MongoClient`; the caller keeps ownership of it."""
        self._client = client
        self._owns_client = False
        db = client[database]
        self._integrations = db["integrations"]
        self._processes = db["processes"]
        self._pages = db["pages"]
        self._errors = db["process_errors"]
        self._links = db["contact_links"]
        self._governors = db["governors"]
        self._inbox = db["webhook_inbox"]
        self._activities = db["activity_records"]
        self._locks = db["locks"]  # _id: exclusive key, process_id: the Process holding it
        self._subscriptions = db["webhook_subscriptions"]  # _id: integration id
        self._watermarks = db["watermarks"]
        self._tombstones = db["tombstones"]
        self._integrations.create_index("crm")
        self._processes.create_index([("integration_id", ASCENDING), ("created_at", ASCENDING)])
        self._processes.create_index("created_at")
        self._pages.create_index([("process_id", ASCENDING), ("page_key", ASCENDING)], unique=True)
        self._errors.create_index([("process_id", ASCENDING), ("page_key", ASCENDING)])
        self._errors.create_index([("process_id", ASCENDING), ("seq", ASCENDING)])
        self._links.create_index(
            [("integration_id", ASCENDING), ("external_id", ASCENDING)], unique=True
        )
        self._inbox.create_index(
            [("integration_id", ASCENDING), ("event_id", ASCENDING)], unique=True
        )
        self._inbox.create_index(
            [("integration_id", ASCENDING), ("acked", ASCENDING), ("enqueued_at", ASCENDING)]
        )
        self._activities.create_index(
            [("integration_id", ASCENDING), ("quo_object_id", ASCENDING)], unique=True
        )
        self._links.create_index([("integration_id", ASCENDING), ("phones", ASCENDING)])
        self._watermarks.create_index(
            [("integration_id", ASCENDING), ("object_type", ASCENDING)], unique=True
        )
        self._tombstones.create_index(
            [("integration_id", ASCENDING), ("external_id", ASCENDING)], unique=True
        )

    @classmethod
    def from_uri(cls, uri: str, database: str = "quo_sync") -> MongoStore:
        store = cls(MongoClient(uri), database)
        store._owns_client = True
        return store

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # ---- integrations ---------------------------------------------------------------------------
    def upsert_integration(self, integration: Integration) -> None:
        doc = asdict(integration)
        self._integrations.replace_one({"_id": doc.pop("id")}, doc, upsert=True)

    def delete_integration(self, integration_id: str) -> None:
        self._integrations.delete_one({"_id": integration_id})
        self._subscriptions.delete_one({"_id": integration_id})
        for collection in (self._watermarks, self._tombstones):
            collection.delete_many({"integration_id": integration_id})
        self._inbox.delete_many({"integration_id": integration_id, "acked": False})

    @staticmethod
    def _integration(doc: dict[str, Any]) -> Integration:
        return Integration(id=doc.pop("_id"), **doc)

    def get_integration(self, integration_id: str) -> Integration:
        doc = self._integrations.find_one({"_id": integration_id})
        if doc is None:
            raise NotFound(f"unknown integration {integration_id!r}")
        return self._integration(doc)

    def list_integrations(self, crm: str | None = None) -> list[Integration]:
        query = {} if crm is None else {"crm": crm}
        return [
            self._integration(doc)
            for doc in self._integrations.find(query, sort=[("_id", ASCENDING)])
        ]

    # ---- processes ------------------------------------------------------------------------------
    def create_process(self, process: Process, exclusive_key: str | None = None) -> Process:
        _check_counters(process.counters)
        now = _now()
        doc = {
            "_id": process.id,
            "integration_id": process.integration_id,
            "name": process.name,
            "type": process.type,
            "state": str(process.state),
            "context": process.context,
            "counters": {name: process.counters.get(name, 0) for name in COUNTER_NAMES},
            "parent_id": process.parent_id,
            "children": process.children,
            "created_at": now,
            "updated_at": now,
            "error_seq": 0,  # allocates the order of this process's stored errors
        }
        try:
            self._processes.insert_one(doc)
        except DuplicateKeyError:
            raise ValueError(f"process {process.id!r} already exists") from None
        if exclusive_key is not None:
            try:
                self._take_lock(exclusive_key, process.id)
            except AlreadyRunning:
                self._processes.delete_one({"_id": process.id})
                raise
        if process.parent_id is not None:
            # Without transactions the child exists first; it is removed if the parent is missing.
            parent = self._processes.update_one(
                {"_id": process.parent_id}, {"$addToSet": {"children": process.id}}
            )
            if parent.matched_count == 0:
                self._processes.delete_one({"_id": process.id})
                raise NotFound(f"unknown process {process.parent_id!r}")
        return self.get_process(process.id)

    def _take_lock(self, key: str, process_id: str) -> None:
        """Make `process_id` (already inserted) the holder of `key`, or raise AlreadyRunning.

        The Process exists before it takes the lock, so a holder that cannot be found was
        removed after a failed creation and holds nothing."""
        while True:
            lock = self._locks.find_one({"_id": key})
            if lock is None:
                try:
                    self._locks.insert_one({"_id": key, "process_id": process_id})
                    return
                except DuplicateKeyError:
                    continue  # another creator took it first: look at its holder
            holder = self._processes.find_one({"_id": lock["process_id"]}, {"state": 1})
            if holder is not None and ProcessState(holder["state"]) not in TERMINAL_STATES:
                raise AlreadyRunning(holder["_id"], key)
            # Compare-and-swap: only one of the creators that saw this ended holder replaces it.
            if self._locks.find_one_and_update(
                {"_id": key, "process_id": lock["process_id"]},
                {"$set": {"process_id": process_id}},
            ):
                return

    def get_process(self, process_id: str) -> Process:
        doc = self._processes.find_one({"_id": process_id})
        if doc is None:
            raise NotFound(f"unknown process {process_id!r}")
        return _process(doc)

    def list_processes(
        self,
        integration_id: str | None = None,
        states: Iterable[ProcessState] | None = None,
        crm: str | None = None,
    ) -> list[Process]:
        query: dict[str, Any] = {}
        if integration_id is not None:
            query["integration_id"] = integration_id
        if states is not None:
            query["state"] = {"$in": [str(state) for state in states]}
        if crm is not None:
            query["context.crm"] = crm
        docs = self._processes.find(query, sort=[("created_at", ASCENDING), ("_id", ASCENDING)])
        return [_process(doc) for doc in docs]

    def transition(
        self,
        process_id: str,
        new_state: ProcessState,
        context_updates: Mapping[str, Any] | None = None,
    ) -> Process:
        new_state = ProcessState(new_state)
        paths = _context_paths(context_updates or {})
        while True:
            current = self._processes.find_one({"_id": process_id}, {"state": 1})
            if current is None:
                raise NotFound(f"unknown process {process_id!r}")
            check_transition(ProcessState(current["state"]), new_state)
            # Compare-and-set: applies only if nobody moved the state since it was checked.
            doc = self._processes.find_one_and_update(
                {"_id": process_id, "state": current["state"]},
                {"$set": {**paths, "state": str(new_state), "updated_at": _now()}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return _process(doc)

    def update_context(self, process_id: str, updates: Mapping[str, Any]) -> Process:
        doc = self._processes.find_one_and_update(
            {"_id": process_id},
            {"$set": {**_context_paths(updates), "updated_at": _now()}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFound(f"unknown process {process_id!r}")
        return _process(doc)

    def increment_counters(self, process_id: str, deltas: Mapping[str, int]) -> None:
        _check_counters(deltas)
        if not deltas:
            return
        updated = self._processes.update_one(
            {"_id": process_id},
            {
                "$inc": {f"counters.{name}": delta for name, delta in deltas.items()},
                "$set": {"updated_at": _now()},
            },
        )
        if updated.matched_count == 0:
            raise NotFound(f"unknown process {process_id!r}")

    def record_page(self, process_id: str, page_key: str, result: PageResult) -> None:
        # Checked first: the page document must not be written for a process that does not exist.
        if self._processes.count_documents({"_id": process_id}, limit=1) == 0:
            raise NotFound(f"unknown process {process_id!r}")
        previous = self._pages.find_one_and_update(
            {"process_id": process_id, "page_key": page_key},
            {"$set": {name: getattr(result, name) for name in _PAGE_FIELDS}},
            upsert=True,
            return_document=ReturnDocument.BEFORE,
        )
        # Concurrent re-runs of one page each add (their result - the one they replaced): the
        # sum telescopes to the last written result whatever order the `$inc`s land in.
        before = _page_result(previous).counter_values() if previous else {}
        deltas = {
            f"counters.{name}": value - before.get(name, 0)
            for name, value in result.counter_values().items()
        }
        # The same update reserves a block of error sequence numbers for this page's errors.
        process = self._processes.find_one_and_update(
            {"_id": process_id},
            {"$inc": {**deltas, "error_seq": len(result.errors)}, "$set": {"updated_at": _now()}},
            projection={"error_seq": 1},
            return_document=ReturnDocument.AFTER,
        )
        self._errors.delete_many({"process_id": process_id, "page_key": page_key})
        if not result.errors:
            return
        first_seq = process["error_seq"] - len(result.errors)
        self._errors.insert_many(
            [
                {"process_id": process_id, "page_key": page_key, "seq": first_seq + i, **asdict(e)}
                for i, e in enumerate(result.errors)
            ]
        )
        oldest_kept = next(
            self._errors.find(
                {"process_id": process_id},
                {"seq": 1},
                sort=[("seq", DESCENDING)],
                skip=MAX_STORED_ERRORS,
                limit=1,
            ),
            None,
        )
        if oldest_kept is not None:
            self._errors.delete_many(
                {"process_id": process_id, "seq": {"$lte": oldest_kept["seq"]}}
            )

    def page_results(self, process_id: str) -> dict[str, PageResult]:
        docs = self._pages.find({"process_id": process_id}, sort=[("page_key", ASCENDING)])
        return {doc["page_key"]: _page_result(doc) for doc in docs}

    def recent_errors(self, process_id: str, limit: int = MAX_STORED_ERRORS) -> list[ErrorDetail]:
        if limit <= 0:
            return []  # limit=0 means "no limit" to MongoDB
        docs = self._errors.find(
            {"process_id": process_id},
            {"_id": 0, "external_id": 1, "error": 1, "timestamp": 1, "page": 1, "skipped": 1},
            sort=[("seq", DESCENDING)],
            limit=limit,
        )
        return [ErrorDetail(**doc) for doc in reversed(list(docs))]

    # ---- externalId -> Quo id map -------------------------------------------------------------
    def get_contact_links(
        self, integration_id: str, external_ids: Iterable[str]
    ) -> dict[str, ContactLink]:
        links: dict[str, ContactLink] = {}
        for chunk in _chunks(external_ids):
            docs = self._links.find(
                {"integration_id": integration_id, "external_id": {"$in": chunk}}
            )
            links.update((doc["external_id"], _link(doc)) for doc in docs)
        return links

    def put_contact_links(self, integration_id: str, links: Mapping[str, ContactLink]) -> None:
        if not links:
            return  # bulk_write rejects an empty batch
        now = time.time()
        # UpdateMany, not UpdateOne: mongomock 4.3 cannot take the `sort` that pymongo >= 4.10
        # sends with UpdateOne. The filter is the unique key, so each matches at most one link.
        upserts = [
            UpdateMany(
                {"integration_id": integration_id, "external_id": external_id},
                {
                    "$set": {
                        "quo_id": link.quo_id,
                        "content_hash": link.content_hash,
                        "phones": list(link.phones),
                        "linked_at": now,
                    }
                },
                upsert=True,
            )
            for external_id, link in links.items()
        ]
        try:
            self._links.bulk_write(upserts, ordered=False)
        except BulkWriteError as exc:
            # A concurrent upsert can win the race to insert a new key; then ours must update.
            if any(e["code"] != _DUPLICATE_KEY for e in exc.details["writeErrors"]):
                raise
            self._links.bulk_write(upserts, ordered=False)

    def delete_contact_links(self, integration_id: str, external_ids: Iterable[str]) -> None:
        for chunk in _chunks(external_ids):
            self._links.delete_many(
                {"integration_id": integration_id, "external_id": {"$in": chunk}}
            )

    def people_by_phone(self, integration_id: str, phones: Iterable[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for chunk in _chunks(phones):
            wanted = set(chunk)
            docs = self._links.find(
                {"integration_id": integration_id, "phones": {"$in": chunk}},
                {"_id": 0, "external_id": 1, "phones": 1, "linked_at": 1},
            )
            for doc in sorted(docs, key=lambda d: (-d.get("linked_at", 0.0), d["external_id"])):
                for phone in wanted.intersection(doc.get("phones", [])):
                    found.setdefault(phone, []).append(doc["external_id"])
        return found

    def count_contact_links(self, integration_id: str) -> int:
        return self._links.count_documents({"integration_id": integration_id})

    def iter_contact_links(self, integration_id: str) -> Iterator[tuple[str, ContactLink]]:
        # Keyset paging on the unique (integration_id, external_id) index; no cursor stays open
        # (and times out on the server) while the caller works between pages.
        after = ""
        while True:
            docs = list(
                self._links.find(
                    {"integration_id": integration_id, "external_id": {"$gt": after}},
                    {"_id": 0, "external_id": 1, "quo_id": 1, "content_hash": 1, "phones": 1},
                    sort=[("external_id", ASCENDING)],
                    limit=_LINKS_PER_READ,
                )
            )
            for doc in docs:
                yield doc["external_id"], _link(doc)
            if len(docs) < _LINKS_PER_READ:
                return
            after = docs[-1]["external_id"]

    def rename_contact_links(self, integration_id: str, renames: Mapping[str, str]) -> int:
        # Each link moves by one update of its own document (no transactions here), so it is
        # always at its old id or its new one, never lost.
        moves = check_renames(renames)
        renamed = 0
        for olds in _chunks(moves):
            pending = olds
            while pending:
                ops = [
                    UpdateMany(
                        {"integration_id": integration_id, "external_id": old},
                        {"$set": {"external_id": moves[old]}},
                    )
                    for old in pending
                ]
                try:
                    renamed += self._links.bulk_write(ops, ordered=False).modified_count
                    break
                except BulkWriteError as exc:
                    errors = exc.details["writeErrors"]
                    if any(e["code"] != _DUPLICATE_KEY for e in errors):
                        raise
                    renamed += exc.details["nModified"]
                    # The new id already has a link: it is overwritten, so drop it and move again.
                    pending = [pending[e["index"]] for e in errors]
                    self._links.delete_many(
                        {
                            "integration_id": integration_id,
                            "external_id": {"$in": [moves[old] for old in pending]},
                        }
                    )
        return renamed

    # ---- rate governor --------------------------------------------------------------------------
    def update_governor(
        self, key: str, fn: Callable[[GovernorState], tuple[GovernorState, float]]
    ) -> float:
        # Optimistic concurrency: write only over the version that was read, else read again.
        while True:
            doc = self._governors.find_one({"_id": key})
            current = (
                GovernorState(next_at=doc["next_at"], slowdown=doc["slowdown"])
                if doc
                else GovernorState()
            )
            state, value = fn(current)
            fields = {"next_at": state.next_at, "slowdown": state.slowdown}
            if doc is None:
                try:
                    self._governors.insert_one({"_id": key, **fields, "version": 1})
                except DuplicateKeyError:
                    continue  # another writer created it first
                return value
            written = self._governors.update_one(
                {"_id": key, "version": doc["version"]},
                {"$set": fields, "$inc": {"version": 1}},
            )
            if written.matched_count:
                return value

    # ---- webhook inbox --------------------------------------------------------------------------
    def enqueue_webhook(self, integration_id: str, event_id: str, payload: dict[str, Any]) -> bool:
        try:
            self._inbox.insert_one(
                {
                    "integration_id": integration_id,
                    "event_id": event_id,
                    "payload": payload,
                    "enqueued_at": time.time(),
                    "lease_until": 0.0,
                    "acked": False,
                }
            )
        except DuplicateKeyError:
            return False
        return True

    def claim_webhooks(
        self, integration_id: str, limit: int, lease_seconds: float = 300.0
    ) -> list[InboxItem]:
        now = time.time()
        items: list[InboxItem] = []
        claimed: list[ObjectId] = []
        # One item per atomic claim, so concurrent claimers never lease the same item. `$nin`:
        # with a lease of 0 an item just claimed would still match and be handed out again.
        for _ in range(limit):
            doc = self._inbox.find_one_and_update(
                {
                    "integration_id": integration_id,
                    "acked": False,
                    "lease_until": {"$lte": now},
                    "_id": {"$nin": claimed},
                },
                {"$set": {"lease_until": now + lease_seconds}},
                sort=_INBOX_ORDER,
            )
            if doc is None:
                break
            claimed.append(doc["_id"])
            items.append(_inbox_item(doc))
        return items

    def ack_webhooks(self, item_ids: Iterable[str]) -> None:
        # Acknowledged documents stay: they remember the event id for deduplication.
        for chunk in _chunks(_object_ids(item_ids)):
            self._inbox.update_many({"_id": {"$in": chunk}}, {"$set": {"acked": True}})

    def get_webhooks(self, item_ids: Iterable[str]) -> list[InboxItem]:
        docs: list[Mapping[str, Any]] = []
        for chunk in _chunks(_object_ids(item_ids)):
            docs += self._inbox.find({"_id": {"$in": chunk}, "acked": False})
        return [
            _inbox_item(doc) for doc in sorted(docs, key=lambda d: (d["enqueued_at"], d["_id"]))
        ]

    def release_webhooks(self, item_ids: Iterable[str]) -> None:
        for chunk in _chunks(_object_ids(item_ids)):
            self._inbox.update_many(
                {"_id": {"$in": chunk}, "acked": False}, {"$set": {"lease_until": 0.0}}
            )

    def pending_webhook_integrations(self) -> list[str]:
        return sorted(
            self._inbox.distinct(
                "integration_id", {"acked": False, "lease_until": {"$lte": time.time()}}
            )
        )

    def defer_webhooks(self, item_ids: Iterable[str], seconds: float, reason: str) -> None:
        until = time.time() + seconds
        for chunk in _chunks(_object_ids(item_ids)):
            self._inbox.update_many(
                {"_id": {"$in": chunk}, "acked": False},
                {"$set": {"lease_until": until, "last_error": reason}, "$inc": {"attempts": 1}},
            )

    def webhook_backlog(self, integration_id: str) -> int:
        return self._inbox.count_documents({"integration_id": integration_id, "acked": False})

    # ---- webhook subscriptions ------------------------------------------------------------------
    def put_webhook_subscription(self, integration_id: str, subscription: dict[str, Any]) -> None:
        # The JSON round trip gives the SQLite adapter's contract: refused if not JSON, tuples
        # read back as lists, non-text keys as text.
        self._subscriptions.replace_one(
            {"_id": integration_id},
            {"subscription": json.loads(json.dumps(subscription))},
            upsert=True,
        )

    def get_webhook_subscription(self, integration_id: str) -> dict[str, Any] | None:
        doc = self._subscriptions.find_one({"_id": integration_id})
        return doc["subscription"] if doc else None

    def delete_webhook_subscription(self, integration_id: str) -> None:
        self._subscriptions.delete_one({"_id": integration_id})

    def list_webhook_subscriptions(self) -> dict[str, dict[str, Any]]:
        docs = self._subscriptions.find({}, sort=[("_id", ASCENDING)])
        return {doc["_id"]: doc["subscription"] for doc in docs}

    # ---- polling watermarks ---------------------------------------------------------------------
    def get_watermark(self, integration_id: str, object_type: str) -> str | None:
        doc = self._watermarks.find_one(
            {"integration_id": integration_id, "object_type": object_type}
        )
        return doc["value"] if doc else None

    def set_watermark(self, integration_id: str, object_type: str, value: str) -> None:
        # An upsert by equality on the unique index: the server retries a lost insert race.
        self._watermarks.update_one(
            {"integration_id": integration_id, "object_type": object_type},
            {"$set": {"value": value}},
            upsert=True,
        )

    # ---- tombstones -----------------------------------------------------------------------------
    def put_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        for chunk in _chunks(external_ids):
            try:
                self._tombstones.insert_many(
                    [{"integration_id": integration_id, "external_id": e} for e in chunk],
                    ordered=False,
                )
            except BulkWriteError as exc:
                # Already tombstoned ids are the only failures allowed: the put is idempotent.
                if any(e["code"] != _DUPLICATE_KEY for e in exc.details["writeErrors"]):
                    raise

    def get_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(external_ids):
            docs = self._tombstones.find(
                {"integration_id": integration_id, "external_id": {"$in": chunk}},
                {"_id": 0, "external_id": 1},
            )
            found.update(doc["external_id"] for doc in docs)
        return found

    def delete_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        for chunk in _chunks(external_ids):
            self._tombstones.delete_many(
                {"integration_id": integration_id, "external_id": {"$in": chunk}}
            )

    # ---- activity map ---------------------------------------------------------------------------
    def get_activity_records(
        self, integration_id: str, quo_object_ids: Iterable[str]
    ) -> dict[str, ActivityRecord]:
        records: dict[str, ActivityRecord] = {}
        for chunk in _chunks(quo_object_ids):
            docs = self._activities.find(
                {"integration_id": integration_id, "quo_object_id": {"$in": chunk}}
            )
            for doc in docs:
                records[doc["quo_object_id"]] = ActivityRecord(doc["state"], doc["crm_ids"])
        return records

    def put_activity_record(
        self, integration_id: str, quo_object_id: str, record: ActivityRecord
    ) -> None:
        # The JSON round trip gives the SQLite adapter's contract (JSON values only).
        value = json.loads(json.dumps({"state": record.state, "crm_ids": record.crm_ids}))
        self._activities.replace_one(
            {"integration_id": integration_id, "quo_object_id": quo_object_id},
            {"integration_id": integration_id, "quo_object_id": quo_object_id, **value},
            upsert=True,
        )
