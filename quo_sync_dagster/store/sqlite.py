"""Embedded store: one SQLite file shared by every thread and process on a host.

WAL lets readers run beside the single writer; every write is a `BEGIN IMMEDIATE` transaction, so
read-modify-write sequences (transition checks, page deltas, the governor) are atomic across
processes without any lock outside SQLite.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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

_BUSY_TIMEOUT_SECONDS = 30.0
_MAX_SQL_VARIABLES = 500  # below SQLite's limit for IN (...) lists, old builds included
_LINKS_PER_READ = 1000  # iter_contact_links reads this many links per query

_COUNTER_COLUMNS = ",\n".join(f"    {name} INTEGER NOT NULL DEFAULT 0" for name in COUNTER_NAMES)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS integrations (
    id TEXT PRIMARY KEY,
    crm TEXT NOT NULL,
    quo_api_key_ref TEXT NOT NULL,
    quo_base_url TEXT NOT NULL,
    default_region TEXT NOT NULL,
    crm_credential_ref TEXT,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS processes (
    id TEXT PRIMARY KEY,
    integration_id TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    context TEXT NOT NULL,
    parent_id TEXT,
    children TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
{_COUNTER_COLUMNS}
);
CREATE INDEX IF NOT EXISTS processes_by_integration ON processes (integration_id);
CREATE TABLE IF NOT EXISTS process_locks (
    key TEXT PRIMARY KEY,
    process_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pages (
    process_id TEXT NOT NULL,
    page_key TEXT NOT NULL,
    records INTEGER NOT NULL,
    synced INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    unchanged INTEGER NOT NULL,
    skipped INTEGER NOT NULL DEFAULT 0,
    ok INTEGER NOT NULL,
    PRIMARY KEY (process_id, page_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS process_errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    process_id TEXT NOT NULL,
    page_key TEXT NOT NULL,
    external_id TEXT,
    error TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    page TEXT
);
CREATE INDEX IF NOT EXISTS process_errors_by_page ON process_errors (process_id, page_key);
CREATE INDEX IF NOT EXISTS process_errors_by_age ON process_errors (process_id, id);
CREATE TABLE IF NOT EXISTS contact_links (
    integration_id TEXT NOT NULL,
    external_id TEXT NOT NULL,
    quo_id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    PRIMARY KEY (integration_id, external_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS governors (
    key TEXT PRIMARY KEY,
    next_at REAL NOT NULL,
    slowdown REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    integration_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    received_at TEXT NOT NULL,
    UNIQUE (integration_id, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_inbox_pending ON webhook_inbox (integration_id, id)
    WHERE acked = 0;
CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    integration_id TEXT PRIMARY KEY,
    subscription TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    integration_id TEXT NOT NULL,
    object_type TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (integration_id, object_type)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    integration_id TEXT NOT NULL,
    external_id TEXT NOT NULL,
    PRIMARY KEY (integration_id, external_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activity_records (
    integration_id TEXT NOT NULL,
    quo_object_id TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (integration_id, quo_object_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS phone_index (
    integration_id TEXT NOT NULL,
    phone TEXT NOT NULL,
    external_id TEXT NOT NULL,
    linked_at TEXT NOT NULL,
    PRIMARY KEY (integration_id, phone, external_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS phone_index_by_person ON phone_index (integration_id, external_id);
"""
_INBOX_COLUMNS = "id, integration_id, event_id, payload, received_at, attempts, last_error"
_LINK_COLUMNS = "external_id, quo_id, content_hash, phones"
_ROWID = re.compile(r"[1-9][0-9]{0,17}")  # str() of a rowid; 18 digits stay below 2**63
_T = TypeVar("_T")


def _now() -> str:
    # Fixed width (always microseconds) so the text sorts like the time it encodes.
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _added_columns() -> Iterator[tuple[str, str, str]]:
    """Columns added after a table's first release: (table, column, declaration). The constant
    default fills the rows that predate the column: an inbox item gets the migration time."""
    for name in COUNTER_NAMES:
        yield "processes", name, "INTEGER NOT NULL DEFAULT 0"
    for name in PAGE_COUNTS[PAGE_COUNTS.index("skipped") :]:
        yield "pages", name, "INTEGER NOT NULL DEFAULT 0"
    yield "process_errors", "skipped", "TEXT"
    yield "webhook_inbox", "received_at", f"TEXT NOT NULL DEFAULT '{_now()}'"
    yield "webhook_inbox", "attempts", "INTEGER NOT NULL DEFAULT 0"
    yield "webhook_inbox", "last_error", "TEXT"
    # Links made before numbers were kept get theirs at the next upsert (ContactUpserter).
    yield "contact_links", "phones", "TEXT NOT NULL DEFAULT '[]'"


def _check_counters(names: Iterable[str]) -> None:
    # Counter names become column names, so only the known ones may reach the SQL.
    if unknown := sorted(set(names) - set(COUNTER_NAMES)):
        raise ValueError(f"unknown process counters: {unknown}")


def _chunks(items: Iterable[_T]) -> Iterator[list[_T]]:
    unique = list(dict.fromkeys(items))
    for start in range(0, len(unique), _MAX_SQL_VARIABLES):
        yield unique[start : start + _MAX_SQL_VARIABLES]


def _row_ids(item_ids: Iterable[str]) -> list[int]:
    # Inbox item ids are the text of rowids; other text names no item (and never reaches SQL).
    return [int(item_id) for item_id in item_ids if _ROWID.fullmatch(item_id)]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _process(row: sqlite3.Row) -> Process:
    return Process(
        id=row["id"],
        integration_id=row["integration_id"],
        name=row["name"],
        type=row["type"],
        state=ProcessState(row["state"]),
        context=json.loads(row["context"]),
        counters={name: row[name] for name in COUNTER_NAMES},
        parent_id=row["parent_id"],
        children=json.loads(row["children"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _page_result(row: sqlite3.Row) -> PageResult:
    return PageResult(**{name: row[name] for name in PAGE_COUNTS}, ok=bool(row["ok"]))


class SqliteStore(Store):
    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []  # (owning pid, connection)
        self._connections_lock = threading.Lock()
        with self._write() as conn:
            # Not executescript(): it would commit the IMMEDIATE transaction first.
            for statement in _SCHEMA.split(";"):
                conn.execute(statement)
            # A file created before a column existed gets it.
            for table, name, declaration in _added_columns():
                present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
                if name not in present:
                    conn.execute(f"ALTER TABLE {table} ADD {name} {declaration}")

    # ---- connections and transactions -----------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        local = self._local
        # A forked child must not reuse its parent's connection; the pid tells them apart.
        if getattr(local, "pid", None) != os.getpid():
            conn = sqlite3.connect(
                self._path,
                timeout=_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # used by one thread only, but close() may run elsewhere
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; no fsync per commit
            local.conn, local.pid = conn, os.getpid()
            with self._connections_lock:
                self._connections.append((local.pid, conn))
        return local.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so what the
        # transaction reads cannot change before it writes.
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        # Connections inherited through fork belong to the parent, which closes them itself.
        with self._connections_lock:
            for pid, conn in self._connections:
                if pid == os.getpid():
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    # ---- integrations ---------------------------------------------------------------------------
    def upsert_integration(self, integration: Integration) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO integrations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    integration.id,
                    integration.crm,
                    integration.quo_api_key_ref,
                    integration.quo_base_url,
                    integration.default_region,
                    integration.crm_credential_ref,
                    json.dumps(integration.settings),
                ),
            )

    @staticmethod
    def _integration(row: sqlite3.Row) -> Integration:
        return Integration(**{**dict(row), "settings": json.loads(row["settings"])})

    def get_integration(self, integration_id: str) -> Integration:
        row = (
            self._conn()
            .execute("SELECT * FROM integrations WHERE id = ?", (integration_id,))
            .fetchone()
        )
        if row is None:
            raise NotFound(f"unknown integration {integration_id!r}")
        return self._integration(row)

    def delete_integration(self, integration_id: str) -> None:
        with self._write() as conn:
            for table in ("integrations", "webhook_subscriptions", "watermarks", "tombstones"):
                column = "id" if table == "integrations" else "integration_id"
                conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (integration_id,))
            conn.execute(
                "DELETE FROM webhook_inbox WHERE integration_id = ? AND acked = 0",
                (integration_id,),
            )

    def list_integrations(self, crm: str | None = None) -> list[Integration]:
        rows = self._conn().execute(
            "SELECT * FROM integrations WHERE ? IS NULL OR crm = ? ORDER BY id", (crm, crm)
        )
        return [self._integration(row) for row in rows]

    # ---- processes ------------------------------------------------------------------------------
    @staticmethod
    def _fetch_process(conn: sqlite3.Connection, process_id: str) -> Process:
        row = conn.execute("SELECT * FROM processes WHERE id = ?", (process_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown process {process_id!r}")
        return _process(row)

    def create_process(self, process: Process, exclusive_key: str | None = None) -> Process:
        _check_counters(process.counters)
        columns = ["id", "integration_id", "name", "type", "state", "context", "parent_id"]
        columns += ["children", "created_at", "updated_at", *process.counters]
        values = [process.id, process.integration_id, process.name, process.type]
        values += [str(process.state), json.dumps(process.context), process.parent_id]
        with self._write() as conn:
            if exclusive_key is not None:
                self._take_lock(conn, exclusive_key, process.id)
            # Stamped under the write lock, so creation times follow rowid order.
            now = _now()
            values += [json.dumps(process.children), now, now, *process.counters.values()]
            try:
                conn.execute(
                    f"INSERT INTO processes ({', '.join(columns)}) "
                    f"VALUES ({_placeholders(len(values))})",
                    values,
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"process {process.id!r} already exists") from None
            if process.parent_id is not None:
                appended = conn.execute(
                    "UPDATE processes SET children = json_insert(children, '$[#]', ?) WHERE id = ?",
                    (process.id, process.parent_id),
                )
                if appended.rowcount == 0:
                    raise NotFound(f"unknown process {process.parent_id!r}")
            return self._fetch_process(conn, process.id)

    @staticmethod
    def _take_lock(conn: sqlite3.Connection, key: str, process_id: str) -> None:
        # Inside create_process's write transaction: the check and the take are one atomic step,
        # and a failed insert of the process rolls the lock back with it.
        holder = conn.execute(
            "SELECT p.id, p.state FROM process_locks AS l JOIN processes AS p "
            "ON p.id = l.process_id WHERE l.key = ?",
            (key,),
        ).fetchone()
        if holder is not None and ProcessState(holder["state"]) not in TERMINAL_STATES:
            raise AlreadyRunning(holder["id"], key)
        conn.execute("INSERT OR REPLACE INTO process_locks VALUES (?, ?)", (key, process_id))

    def get_process(self, process_id: str) -> Process:
        return self._fetch_process(self._conn(), process_id)

    def list_processes(
        self,
        integration_id: str | None = None,
        states: Iterable[ProcessState] | None = None,
        crm: str | None = None,
    ) -> list[Process]:
        where, params = ["1"], []
        if integration_id is not None:
            where.append("integration_id = ?")
            params.append(integration_id)
        if states is not None:
            state_values = [str(state) for state in states]
            where.append(f"state IN ({_placeholders(len(state_values))})")
            params += state_values
        if crm is not None:
            where.append("json_extract(context, '$.crm') = ?")
            params.append(crm)
        # rowid follows insertion order, which is creation order.
        rows = self._conn().execute(
            f"SELECT * FROM processes WHERE {' AND '.join(where)} ORDER BY rowid", params
        )
        return [_process(row) for row in rows]

    def _rewrite(
        self,
        process_id: str,
        updates: Mapping[str, Any] | None,
        new_state: ProcessState | None = None,
    ) -> Process:
        with self._write() as conn:
            process = self._fetch_process(conn, process_id)
            if new_state is not None:
                check_transition(process.state, new_state)
                process.state = new_state
            conn.execute(
                "UPDATE processes SET state = ?, context = ?, updated_at = ? WHERE id = ?",
                (
                    str(process.state),
                    json.dumps({**process.context, **(updates or {})}),
                    _now(),
                    process_id,
                ),
            )
            return self._fetch_process(conn, process_id)

    def transition(
        self,
        process_id: str,
        new_state: ProcessState,
        context_updates: Mapping[str, Any] | None = None,
    ) -> Process:
        return self._rewrite(process_id, context_updates, ProcessState(new_state))

    def update_context(self, process_id: str, updates: Mapping[str, Any]) -> Process:
        return self._rewrite(process_id, updates)

    @staticmethod
    def _increment(conn: sqlite3.Connection, process_id: str, deltas: Mapping[str, int]) -> None:
        assignments = ", ".join(f"{name} = {name} + ?" for name in deltas)
        updated = conn.execute(
            f"UPDATE processes SET {assignments}, updated_at = ? WHERE id = ?",
            (*deltas.values(), _now(), process_id),
        )
        if updated.rowcount == 0:
            raise NotFound(f"unknown process {process_id!r}")

    def increment_counters(self, process_id: str, deltas: Mapping[str, int]) -> None:
        _check_counters(deltas)
        if deltas:
            with self._write() as conn:
                self._increment(conn, process_id, deltas)

    def record_page(self, process_id: str, page_key: str, result: PageResult) -> None:
        with self._write() as conn:
            previous = conn.execute(
                "SELECT * FROM pages WHERE process_id = ? AND page_key = ?",
                (process_id, page_key),
            ).fetchone()
            before = _page_result(previous).counter_values() if previous else {}
            after = result.counter_values()
            # Every counter is named (zeros included), so the UPDATE also proves the process exists.
            self._increment(
                conn, process_id, {name: after[name] - before.get(name, 0) for name in after}
            )
            # Columns named: a file migrated by ALTER TABLE has them in another order.
            conn.execute(
                f"INSERT OR REPLACE INTO pages (process_id, page_key, {', '.join(PAGE_COUNTS)}, "
                f"ok) VALUES ({_placeholders(len(PAGE_COUNTS) + 3)})",
                (
                    process_id,
                    page_key,
                    *(getattr(result, name) for name in PAGE_COUNTS),
                    int(result.ok),
                ),
            )
            conn.execute(
                "DELETE FROM process_errors WHERE process_id = ? AND page_key = ?",
                (process_id, page_key),
            )
            conn.executemany(
                "INSERT INTO process_errors (process_id, page_key, external_id, error, timestamp, "
                "page, skipped) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (process_id, page_key, e.external_id, e.error, e.timestamp, e.page, e.skipped)
                    for e in result.errors
                ],
            )
            conn.execute(
                "DELETE FROM process_errors WHERE process_id = ? AND id <= ("
                "SELECT id FROM process_errors WHERE process_id = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (process_id, process_id, MAX_STORED_ERRORS),
            )

    def page_results(self, process_id: str) -> dict[str, PageResult]:
        rows = self._conn().execute(
            "SELECT * FROM pages WHERE process_id = ? ORDER BY page_key", (process_id,)
        )
        return {row["page_key"]: _page_result(row) for row in rows}

    def recent_errors(self, process_id: str, limit: int = MAX_STORED_ERRORS) -> list[ErrorDetail]:
        rows = self._conn().execute(
            "SELECT external_id, error, timestamp, page, skipped FROM process_errors "
            "WHERE process_id = ? ORDER BY id DESC LIMIT ?",
            (process_id, max(limit, 0)),
        )
        return [ErrorDetail(**row) for row in reversed(rows.fetchall())]

    # ---- externalId -> Quo id map and the phone index -------------------------------------------
    def get_contact_links(
        self, integration_id: str, external_ids: Iterable[str]
    ) -> dict[str, ContactLink]:
        links: dict[str, ContactLink] = {}
        conn = self._conn()
        for chunk in _chunks(external_ids):
            rows = conn.execute(
                f"SELECT {_LINK_COLUMNS} FROM contact_links "
                f"WHERE integration_id = ? AND external_id IN ({_placeholders(len(chunk))})",
                (integration_id, *chunk),
            )
            links.update((row[0], _link(row)) for row in rows)
        return links

    def put_contact_links(self, integration_id: str, links: Mapping[str, ContactLink]) -> None:
        now = _now()
        with self._write() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO contact_links (integration_id, {_LINK_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (integration_id, ext, link.quo_id, link.content_hash, json.dumps(link.phones))
                    for ext, link in links.items()
                ],
            )
            self._unindex(conn, integration_id, list(links))
            conn.executemany(
                "INSERT OR REPLACE INTO phone_index VALUES (?, ?, ?, ?)",
                [
                    (integration_id, phone, ext, now)
                    for ext, link in links.items()
                    for phone in link.phones
                ],
            )

    def delete_contact_links(self, integration_id: str, external_ids: Iterable[str]) -> None:
        ids = list(external_ids)
        with self._write() as conn:
            conn.executemany(
                "DELETE FROM contact_links WHERE integration_id = ? AND external_id = ?",
                [(integration_id, external_id) for external_id in ids],
            )
            self._unindex(conn, integration_id, ids)

    @staticmethod
    def _unindex(conn: sqlite3.Connection, integration_id: str, external_ids: list[str]) -> None:
        conn.executemany(
            "DELETE FROM phone_index WHERE integration_id = ? AND external_id = ?",
            [(integration_id, external_id) for external_id in external_ids],
        )

    def people_by_phone(self, integration_id: str, phones: Iterable[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        conn = self._conn()
        for chunk in _chunks(phones):
            rows = conn.execute(
                "SELECT phone, external_id FROM phone_index "
                f"WHERE integration_id = ? AND phone IN ({_placeholders(len(chunk))}) "
                "ORDER BY linked_at DESC, external_id",
                (integration_id, *chunk),
            )
            for phone, external_id in rows:
                found.setdefault(phone, []).append(external_id)
        return found

    def count_contact_links(self, integration_id: str) -> int:
        return (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM contact_links WHERE integration_id = ?", (integration_id,)
            )
            .fetchone()[0]
        )

    def iter_contact_links(self, integration_id: str) -> Iterator[tuple[str, ContactLink]]:
        # Keyset paging on the primary key: each page is one short read, so no read transaction
        # stays open while the caller works (or writes) between pages.
        after = ""
        while True:
            rows = (
                self._conn()
                .execute(
                    f"SELECT {_LINK_COLUMNS} FROM contact_links "
                    "WHERE integration_id = ? AND external_id > ? ORDER BY external_id LIMIT ?",
                    (integration_id, after, _LINKS_PER_READ),
                )
                .fetchall()
            )
            for row in rows:
                yield row[0], _link(row)
            if len(rows) < _LINKS_PER_READ:
                return
            after = rows[-1][0]

    def rename_contact_links(self, integration_id: str, renames: Mapping[str, str]) -> int:
        moves = check_renames(renames)
        renamed = 0
        # One transaction per batch: a batch moves entirely or not at all.
        for olds in _chunks(moves):
            with self._write() as conn:
                rows = conn.execute(
                    f"SELECT {_LINK_COLUMNS} FROM contact_links WHERE "
                    f"integration_id = ? AND external_id IN ({_placeholders(len(olds))})",
                    (integration_id, *olds),
                ).fetchall()
                conn.executemany(
                    "DELETE FROM contact_links WHERE integration_id = ? AND external_id = ?",
                    [(integration_id, row[0]) for row in rows],
                )
                conn.executemany(
                    f"INSERT OR REPLACE INTO contact_links (integration_id, {_LINK_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(integration_id, moves[row[0]], row[1], row[2], row[3]) for row in rows],
                )
                conn.executemany(
                    "UPDATE OR REPLACE phone_index SET external_id = ? "
                    "WHERE integration_id = ? AND external_id = ?",
                    [(moves[row[0]], integration_id, row[0]) for row in rows],
                )
            renamed += len(rows)
        return renamed

    # ---- rate governor --------------------------------------------------------------------------
    def update_governor(
        self, key: str, fn: Callable[[GovernorState], tuple[GovernorState, float]]
    ) -> float:
        with self._write() as conn:
            row = conn.execute(
                "SELECT next_at, slowdown FROM governors WHERE key = ?", (key,)
            ).fetchone()
            state, value = fn(GovernorState(**row) if row else GovernorState())
            conn.execute(
                "INSERT OR REPLACE INTO governors VALUES (?, ?, ?)",
                (key, state.next_at, state.slowdown),
            )
        return value

    # ---- webhook inbox --------------------------------------------------------------------------
    @staticmethod
    def _inbox_item(row: sqlite3.Row) -> InboxItem:
        return InboxItem(
            id=str(row["id"]),
            integration_id=row["integration_id"],
            event_id=row["event_id"],
            payload=json.loads(row["payload"]),
            received_at=row["received_at"],
            attempts=row["attempts"],
            last_error=row["last_error"],
        )

    def enqueue_webhook(self, integration_id: str, event_id: str, payload: dict[str, Any]) -> bool:
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO webhook_inbox (integration_id, event_id, payload, "
                "received_at) VALUES (?, ?, ?, ?)",
                (integration_id, event_id, json.dumps(payload), _now()),
            )
        return inserted.rowcount == 1

    def claim_webhooks(
        self, integration_id: str, limit: int, lease_seconds: float = 300.0
    ) -> list[InboxItem]:
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_INBOX_COLUMNS} FROM webhook_inbox "
                "WHERE integration_id = ? AND acked = 0 AND lease_until <= ? ORDER BY id LIMIT ?",
                (integration_id, now, max(limit, 0)),  # a negative LIMIT would mean "all"
            ).fetchall()
            conn.executemany(
                "UPDATE webhook_inbox SET lease_until = ? WHERE id = ?",
                [(now + lease_seconds, row["id"]) for row in rows],
            )
        return [self._inbox_item(row) for row in rows]

    def ack_webhooks(self, item_ids: Iterable[str]) -> None:
        # Acknowledged rows stay: they remember the event id for deduplication.
        with self._write() as conn:
            conn.executemany(
                "UPDATE webhook_inbox SET acked = 1 WHERE id = ?",
                [(row_id,) for row_id in _row_ids(item_ids)],
            )

    def get_webhooks(self, item_ids: Iterable[str]) -> list[InboxItem]:
        rows: list[sqlite3.Row] = []
        conn = self._conn()
        for chunk in _chunks(_row_ids(item_ids)):
            rows += conn.execute(
                f"SELECT {_INBOX_COLUMNS} FROM webhook_inbox "
                f"WHERE acked = 0 AND id IN ({_placeholders(len(chunk))})",
                chunk,
            ).fetchall()
        return [self._inbox_item(row) for row in sorted(rows, key=lambda row: row["id"])]

    def release_webhooks(self, item_ids: Iterable[str]) -> None:
        with self._write() as conn:
            conn.executemany(
                "UPDATE webhook_inbox SET lease_until = 0 WHERE id = ? AND acked = 0",
                [(row_id,) for row_id in _row_ids(item_ids)],
            )

    def pending_webhook_integrations(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT DISTINCT integration_id FROM webhook_inbox "
            "WHERE acked = 0 AND lease_until <= ? ORDER BY integration_id",
            (time.time(),),
        )
        return [row[0] for row in rows]

    def defer_webhooks(self, item_ids: Iterable[str], seconds: float, reason: str) -> None:
        until = time.time() + seconds
        with self._write() as conn:
            conn.executemany(
                "UPDATE webhook_inbox SET lease_until = ?, attempts = attempts + 1, "
                "last_error = ? WHERE id = ? AND acked = 0",
                [(until, reason, row_id) for row_id in _row_ids(item_ids)],
            )

    def webhook_backlog(self, integration_id: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM webhook_inbox WHERE integration_id = ? AND acked = 0",
                (integration_id,),
            )
            .fetchone()
        )
        return int(row[0])

    # ---- webhook subscriptions ------------------------------------------------------------------
    def put_webhook_subscription(self, integration_id: str, subscription: dict[str, Any]) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO webhook_subscriptions VALUES (?, ?)",
                (integration_id, json.dumps(subscription)),
            )

    def get_webhook_subscription(self, integration_id: str) -> dict[str, Any] | None:
        row = (
            self._conn()
            .execute(
                "SELECT subscription FROM webhook_subscriptions WHERE integration_id = ?",
                (integration_id,),
            )
            .fetchone()
        )
        return json.loads(row[0]) if row else None

    def delete_webhook_subscription(self, integration_id: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM webhook_subscriptions WHERE integration_id = ?", (integration_id,)
            )

    def list_webhook_subscriptions(self) -> dict[str, dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT integration_id, subscription FROM webhook_subscriptions ORDER BY integration_id"
        )
        return {row[0]: json.loads(row[1]) for row in rows}

    # ---- polling watermarks ---------------------------------------------------------------------
    def get_watermark(self, integration_id: str, object_type: str) -> str | None:
        row = (
            self._conn()
            .execute(
                "SELECT value FROM watermarks WHERE integration_id = ? AND object_type = ?",
                (integration_id, object_type),
            )
            .fetchone()
        )
        return row[0] if row else None

    def set_watermark(self, integration_id: str, object_type: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?)",
                (integration_id, object_type, value),
            )

    # ---- tombstones -----------------------------------------------------------------------------
    def put_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        with self._write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO tombstones VALUES (?, ?)",
                [(integration_id, external_id) for external_id in external_ids],
            )

    def get_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        conn = self._conn()
        for chunk in _chunks(external_ids):
            rows = conn.execute(
                "SELECT external_id FROM tombstones "
                f"WHERE integration_id = ? AND external_id IN ({_placeholders(len(chunk))})",
                (integration_id, *chunk),
            )
            found.update(row[0] for row in rows)
        return found

    def delete_tombstones(self, integration_id: str, external_ids: Iterable[str]) -> None:
        with self._write() as conn:
            conn.executemany(
                "DELETE FROM tombstones WHERE integration_id = ? AND external_id = ?",
                [(integration_id, external_id) for external_id in external_ids],
            )

    # ---- activity map ---------------------------------------------------------------------------
    def get_activity_records(
        self, integration_id: str, quo_object_ids: Iterable[str]
    ) -> dict[str, ActivityRecord]:
        records: dict[str, ActivityRecord] = {}
        conn = self._conn()
        for chunk in _chunks(quo_object_ids):
            rows = conn.execute(
                "SELECT quo_object_id, record FROM activity_records "
                f"WHERE integration_id = ? AND quo_object_id IN ({_placeholders(len(chunk))})",
                (integration_id, *chunk),
            )
            for quo_object_id, record in rows:
                records[quo_object_id] = ActivityRecord(**json.loads(record))
        return records

    def put_activity_record(
        self, integration_id: str, quo_object_id: str, record: ActivityRecord
    ) -> None:
        value = json.dumps({"state": record.state, "crm_ids": record.crm_ids})
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO activity_records VALUES (?, ?, ?)",
                (integration_id, quo_object_id, value),
            )


def _link(row: sqlite3.Row) -> ContactLink:
    return ContactLink(row[1], row[2], tuple(json.loads(row[3])))
