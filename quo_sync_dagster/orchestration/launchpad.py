"""What the launchpad offers for `integration_id`: the CRM's registered integrations.

Dagster 1.13 opens a job's launchpad with the defaults of its config schema (the webserver's
`rootDefaultYaml`). So every per-integration config class takes its `integration_id` field
from `integration_id_field`: the description lists the integrations the store holds for the
CRM, and when it holds some, the first by id is the default, so the launchpad opens with a
valid config instead of a red "missing integration_id".

The store is read once per process, when the code location loads (a reload of the code
location reads it again). That read must never break or slow the load: it only reads what
exists (no SQLite file or schema is created, no Mongo index), with short timeouts, in one
query, and any failure is a warning and leaves the field without a default.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.orchestration.sync import listed

_log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 2.0  # a locked SQLite file or an unreachable MongoDB: give up, no default
MONGO_DATABASE = "quo_sync"  # MongoStore.from_uri's database


def integration_id_field(crm: str, purpose: str, default: bool = True) -> tuple[Any, Any]:
    """`(type, Field)` of an `integration_id` config field of a `crm` job, for pydantic's
    `create_model`: `purpose` starts the description ("Id of the integration to poll"), which
    then lists the registered integrations; `default`: the first of them by id is the default
    (jobs that must be told which integration, such as inbox runs, pass False)."""
    ids = registered_integrations(crm)
    add = f"To add one: `quo-sync integrations add --crm {crm}`, then reload the code location."
    if ids is None:
        registered = "The store could not be read when the code location loaded."
    elif not ids:
        registered = f"No {crm} integration is registered yet."
    else:
        registered = f"Registered {crm} integrations: {listed(ids)}."
    description = f"{purpose}. {registered} {add}"
    if default and ids:
        return str, Field(default=ids[0], description=description)
    return str, Field(description=description)


def with_integration_id(
    base: type[dg.Config], crm: str, purpose: str, default: bool = True
) -> type[dg.Config]:
    """`base` for `crm`'s jobs: its `integration_id` field from `integration_id_field`."""
    return create_model(
        f"{crm.title()}{base.__name__}",
        __base__=base,
        integration_id=integration_id_field(crm, purpose, default),
    )


def registered_integrations(crm: str) -> list[str] | None:
    """Ids of `crm`'s integrations in the store (`default_store_uri()`), sorted; [] without a
    store; None when it could not be read."""
    by_crm = _read(default_store_uri())
    return None if by_crm is None else by_crm.get(crm, [])


@functools.cache
def _read(uri: str) -> dict[str, list[str]] | None:
    """Every integration's id by CRM, sorted by id (one query, once per process and URI)."""
    try:
        rows = _read_sqlite(uri) if _is_sqlite(uri) else _read_mongo(uri)
    except Exception as exc:  # the load goes on: the field just has no default
        # The type and message only: a connection error could show the URI, and its password.
        _log.warning(
            "launchpad: could not read the integrations from the store (%s); integration_id "
            "fields have no default",
            type(exc).__name__,
        )
        return None
    by_crm: dict[str, list[str]] = {}
    for integration_id, crm in sorted(rows):
        by_crm.setdefault(crm, []).append(integration_id)
    return by_crm


def _is_sqlite(uri: str) -> bool:
    scheme, separator, _ = uri.partition("://")
    return not separator or scheme == "sqlite"


def _sqlite_path(uri: str) -> Path:
    # As open_store reads it: `sqlite:///abs` and `sqlite:////abs` both name /abs.
    _, separator, rest = uri.partition("://")
    if not separator:
        return Path(uri)
    return Path("/" + rest.lstrip("/") if rest.startswith("/") else rest)


def _read_sqlite(uri: str) -> list[tuple[str, str]]:
    path = _sqlite_path(uri)
    if not path.is_file():
        return []  # no store yet: nothing registered, and nothing is created here
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_TIMEOUT_SECONDS
    )
    try:
        return [(row[0], row[1]) for row in conn.execute("SELECT id, crm FROM integrations")]
    finally:
        conn.close()


def _read_mongo(uri: str) -> list[tuple[str, str]]:
    from pymongo import MongoClient  # as the store: only deployments on MongoDB import it

    timeout_ms = int(READ_TIMEOUT_SECONDS * 1000)
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=timeout_ms,
    )
    try:
        docs = client[MONGO_DATABASE]["integrations"].find({}, {"crm": 1})
        return [(doc["_id"], doc["crm"]) for doc in docs]
    finally:
        client.close()
