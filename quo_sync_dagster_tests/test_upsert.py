"""ContactUpserter against the Quo sandbox over HTTP and a real SQLite store."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.models import (
    CustomFieldValue,
    LabeledValue,
    QuoContact,
    UpsertAction,
)
from quo_sync_dagster.quo.client import LOOKUP_CHUNK, QuoClient, QuoUnavailable
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.store import Store, open_store

INTEGRATION = "int-up"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    yield s
    s.close()


@pytest.fixture
def client(sandbox: QuoSandbox) -> Iterator[QuoClient]:
    sandbox.clear_faults()
    with QuoClient(sandbox.url, sandbox.api_key, max_attempts=2) as c:
        yield c
    sandbox.clear_faults()


@pytest.fixture
def upserter(client: QuoClient, store: Store) -> ContactUpserter:
    return ContactUpserter(client, store, INTEGRATION)


@pytest.fixture
def source() -> str:
    """A source of its own per test, so the sandbox's per-source counts are this test's."""
    return f"up-{uuid.uuid4().hex[:10]}"


def make(source: str, n: int, version: int = 0, phones: int = 2) -> list[QuoContact]:
    return [
        QuoContact(
            external_id=f"{source}-{i:04d}",
            source=source,
            first_name=f"Person{i}",
            last_name=f"V{version}",
            company="Acme" if i % 2 else None,
            emails=(LabeledValue("email", f"p{i}@example.com"),),
            phone_numbers=tuple(
                LabeledValue("mobile" if k == 0 else "work", f"+1212555{(i * 7 + k) % 10000:04d}")
                for k in range(phones)
            ),
        )
        for i in range(n)
    ]


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    out = {k: after["byKind"][k] - before["byKind"][k] for k in after["byKind"]}
    out["requests"] = after["requests"] - before["requests"]
    statuses = set(before["byStatus"]) | set(after["byStatus"])
    out |= {s: after["byStatus"].get(s, 0) - before["byStatus"].get(s, 0) for s in statuses}
    return out


def actions(outcomes: list) -> list[UpsertAction]:
    return [o.action for o in outcomes]


def test_first_upsert_creates_and_links(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, store: Store, source: str
) -> None:
    contacts = make(source, 30)  # more than one link flush
    before = sandbox.stats()
    outcomes = upserter.upsert(contacts)
    after = sandbox.stats()
    assert [o.external_id for o in outcomes] == [c.external_id for c in contacts]
    assert actions(outcomes) == [UpsertAction.CREATED] * len(contacts)
    assert delta(before, after)["create"] == len(contacts)
    assert after["contactsBySource"][source] == len(contacts)
    links = store.get_contact_links(INTEGRATION, [c.external_id for c in contacts])
    remote = client.find_by_external_ids([c.external_id for c in contacts], source)
    assert {e: link.quo_id for e, link in links.items()} == {e: c["id"] for e, c in remote.items()}
    assert all(links[c.external_id].content_hash == c.content_hash() for c in contacts)


def test_identical_second_upsert_makes_no_requests(
    sandbox: QuoSandbox, upserter: ContactUpserter, source: str
) -> None:
    upserter.upsert(make(source, 12))
    before = sandbox.stats()
    outcomes = upserter.upsert(make(source, 12))
    after = sandbox.stats()
    assert after["requests"] == before["requests"]
    assert actions(outcomes) == [UpsertAction.UNCHANGED] * 12


def test_changed_contact_is_patched_with_full_lists(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, store: Store, source: str
) -> None:
    original = make(source, 3, phones=2)
    upserter.upsert(original)
    changed = make(source, 3, phones=2)
    changed[1] = make(source, 3, version=1, phones=1)[1]  # new last name, one phone dropped
    before = sandbox.stats()
    outcomes = upserter.upsert(changed)
    d = delta(before, sandbox.stats())
    assert actions(outcomes) == [UpsertAction.UNCHANGED, UpsertAction.UPDATED,
                                 UpsertAction.UNCHANGED]  # fmt: skip
    assert (d["requests"], d["patch"]) == (1, 1)
    link = store.get_contact_links(INTEGRATION, [changed[1].external_id])[changed[1].external_id]
    fields = client.get_contact(link.quo_id)["defaultFields"]
    assert fields["lastName"] == "V1"
    assert [p["value"] for p in fields["phoneNumbers"]] == [changed[1].phone_numbers[0].value]
    assert original[1].phone_numbers[1].value not in str(fields)
    assert link.content_hash == changed[1].content_hash()
    # The new hash is remembered: the same content again costs nothing.
    before = sandbox.stats()
    assert actions(upserter.upsert(changed)) == [UpsertAction.UNCHANGED] * 3
    assert sandbox.stats()["requests"] == before["requests"]


def test_unmapped_existing_contacts_are_found_and_patched(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, store: Store, source: str
) -> None:
    n_existing, n_new = 25, 5
    contacts = make(source, n_existing + n_new, version=1)
    existing = {
        c.external_id: client.create_contact(c.to_api_body() | {"defaultFields": {
            "firstName": "Old"}})["id"]
        for c in make(source, n_existing)
    }  # fmt: skip
    before = sandbox.stats()
    outcomes = upserter.upsert(contacts)
    after = sandbox.stats()
    d = delta(before, after)
    assert actions(outcomes) == [UpsertAction.UPDATED] * n_existing + [UpsertAction.CREATED] * n_new
    assert d["lookup"] == math.ceil(len(contacts) / LOOKUP_CHUNK)
    assert (d["patch"], d["create"]) == (n_existing, n_new)
    assert after["contactsBySource"][source] == len(contacts)
    assert after["duplicateExternalIds"] == 0
    links = store.get_contact_links(INTEGRATION, existing)
    assert {e: link.quo_id for e, link in links.items()} == existing
    first = client.get_contact(existing[contacts[0].external_id])["defaultFields"]
    assert first["firstName"] == contacts[0].first_name and first["lastName"] == "V1"


def test_assume_absent_recovers_from_409(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, store: Store, source: str
) -> None:
    contacts = make(source, 3, version=2)
    existing = {c.external_id: client.create_contact(c.to_api_body())["id"]
                for c in make(source, 3)}  # fmt: skip
    before = sandbox.stats()
    outcomes = upserter.upsert(contacts, assume_absent=True)
    after = sandbox.stats()
    d = delta(before, after)
    assert actions(outcomes) == [UpsertAction.UPDATED] * 3
    assert d["409"] == 3 and d["patch"] == 3
    assert after["contactsBySource"][source] == 3
    assert after["duplicateExternalIds"] == 0
    links = store.get_contact_links(INTEGRATION, existing)
    assert {e: link.quo_id for e, link in links.items()} == existing
    assert (
        client.get_contact(existing[contacts[2].external_id])["defaultFields"]["lastName"] == "V2"
    )


def test_link_to_contact_deleted_in_quo_is_recreated(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, store: Store, source: str
) -> None:
    upserter.upsert(make(source, 2))
    ext = f"{source}-0001"
    old_id = store.get_contact_links(INTEGRATION, [ext])[ext].quo_id
    client.delete_contact(old_id)
    before = sandbox.stats()
    outcomes = upserter.upsert(make(source, 2, version=3))
    d = delta(before, sandbox.stats())
    assert actions(outcomes) == [UpsertAction.UPDATED, UpsertAction.CREATED]
    assert d["404"] == 1 and d["create"] == 1
    new_id = store.get_contact_links(INTEGRATION, [ext])[ext].quo_id
    assert new_id != old_id
    assert client.get_contact(new_id)["defaultFields"]["lastName"] == "V3"
    assert sandbox.stats()["contactsBySource"][source] == 2


def test_contact_quo_rejects_fails_alone(
    sandbox: QuoSandbox, upserter: ContactUpserter, store: Store, source: str
) -> None:
    contacts = make(source, 5)
    bad = QuoContact(
        **{**contacts[2].__dict__, "custom_fields": (CustomFieldValue("no-such-field", "x"),)}
    )
    contacts[2] = bad
    outcomes = upserter.upsert(contacts)
    assert (
        actions(outcomes)
        == [UpsertAction.CREATED] * 2 + [UpsertAction.FAILED] + [UpsertAction.CREATED] * 2
    )
    error = outcomes[2].error or ""
    assert "400" in error and "Unknown custom field 'no-such-field'" in error
    assert all(o.error is None for o in outcomes if o is not outcomes[2])
    assert bad.external_id not in store.get_contact_links(INTEGRATION, [bad.external_id])
    assert store.count_contact_links(INTEGRATION) == 4
    assert sandbox.stats()["contactsBySource"][source] == 4


@pytest.mark.parametrize("assume_absent", [False, True])
def test_quo_unavailable_propagates(
    sandbox: QuoSandbox, upserter: ContactUpserter, store: Store, source: str, assume_absent: bool
) -> None:
    sandbox.inject_fault(500, count=100)
    with pytest.raises(QuoUnavailable):
        upserter.upsert(make(source, 3), assume_absent=assume_absent)
    sandbox.clear_faults()
    assert store.count_contact_links(INTEGRATION) == 0
    assert source not in sandbox.stats()["contactsBySource"]


def test_repeated_external_id_keeps_the_last_version(
    sandbox: QuoSandbox, upserter: ContactUpserter, client: QuoClient, source: str
) -> None:
    first, second = make(source, 1)[0], make(source, 1, version=4)[0]
    outcomes = upserter.upsert([first, second])
    assert [(o.external_id, o.action) for o in outcomes] == [
        (first.external_id, UpsertAction.CREATED)
    ]
    remote = client.find_by_external_ids([first.external_id], source)[first.external_id]
    assert remote["defaultFields"]["lastName"] == "V4"


@pytest.mark.parametrize(("assume_absent", "limit"), [(True, 1.0), (False, 1.05)])
def test_requests_per_new_contact(
    sandbox: QuoSandbox, upserter: ContactUpserter, source: str, assume_absent: bool, limit: float
) -> None:
    n = 200
    before = sandbox.stats()
    outcomes = upserter.upsert(make(source, n), assume_absent=assume_absent)
    after = sandbox.stats()
    assert actions(outcomes) == [UpsertAction.CREATED] * n
    per_contact = (after["requests"] - before["requests"]) / n
    if assume_absent:
        assert per_contact == 1.0
    else:
        assert per_contact <= limit
        assert delta(before, after)["lookup"] == math.ceil(n / LOOKUP_CHUNK)
    assert after["contactsBySource"][source] == n
