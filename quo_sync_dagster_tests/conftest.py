from __future__ import annotations

from collections.abc import Iterator

import pytest

from quo_sync_dagster.sandbox.quo_server import QuoSandbox


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuoSandbox]:
    """A Quo sandbox on 127.0.0.1 for one test module, limit off; it must never hold two
    contacts with one (source, externalId)."""
    with QuoSandbox(tmp_path_factory.mktemp("quo"), rate_limit=None) as sb:
        yield sb
        assert sb.stats()["duplicateExternalIds"] == 0
