"""Persistence: the `Store` port and `open_store`, which picks the adapter from a URI.

`sqlite:///abs/path.sqlite` (or a plain filesystem path) opens the embedded SQLite store;
`mongodb://...` and `mongodb+srv://...` open the MongoDB store.
"""

from __future__ import annotations

from quo_sync_dagster.store.port import AlreadyRunning, NotFound, Store

__all__ = ["AlreadyRunning", "NotFound", "Store", "open_store"]


def open_store(uri: str) -> Store:
    scheme, separator, rest = uri.partition("://")
    if not separator:
        scheme, rest = "sqlite", uri
    # Adapters are imported on demand so the embedded store never loads pymongo.
    if scheme == "sqlite":
        from quo_sync_dagster.store.sqlite import SqliteStore

        # `sqlite:///abs` and `sqlite:////abs` both name /abs; no leading slash: relative.
        return SqliteStore("/" + rest.lstrip("/") if rest.startswith("/") else rest)
    if scheme in ("mongodb", "mongodb+srv"):
        from quo_sync_dagster.store.mongo import MongoStore

        return MongoStore.from_uri(uri)
    # Only the scheme is named: the rest of the URI may hold a password.
    raise ValueError(f"unsupported store URI scheme {scheme!r}")
