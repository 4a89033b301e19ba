"""ContactUpserter against the Quo sandbox over HTTP and a real SQLite store."""

from __future__ import annotations

import math
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.core.adoption import Adoption
from quo_sync_dagster.core.models import (
    CustomFieldValue,
    Integration,
    LabeledValue,
    QuoContact,
    UpsertAction,
)
from quo_sync_dagster.quo.client import LOOKUP_CHUNK, QuoClient, QuoOutcomeUnknown, QuoUnavailable
from quo_sync_dagster.quo.upsert import MAX_CREATE_ATTEMPTS, ContactUpserter, _holds
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


# ---- exactly once without Quo's 409: creates whose outcome is unknown ------------------------
def rich(source: str, n: int) -> list[QuoContact]:
    """make()'s contacts with custom fields and a link, so a found contact is compared on all."""
    return [
        QuoContact(
            **{
                **c.__dict__,
                "custom_fields": (
                    CustomFieldValue("vip", i % 2 == 0),
                    CustomFieldValue("interests", ["sms", "calls"]),
                    CustomFieldValue("lifetime-value", i * 1.5),
                    CustomFieldValue("inbound-lead", None),
                ),
                "source_url": f"https://crm.example.com/people/{i}",
            }
        )
        for i, c in enumerate(make(source, n))
    ]


@pytest.fixture
def no_uniqueness(sandbox: QuoSandbox) -> Iterator[None]:
    """The sandbox takes a second contact with the same source and externalId (no 409)."""
    sandbox.accept_duplicates()
    yield
    sandbox.accept_duplicates(False)


def patient_client(sandbox: QuoSandbox, timeout: float = 30.0) -> QuoClient:
    return QuoClient(sandbox.url, sandbox.api_key, max_attempts=2, timeout_seconds=timeout)


def assert_each_once(
    sandbox: QuoSandbox, store: Store, source: str, contacts: list[QuoContact]
) -> None:
    """Every contact is in Quo exactly once, linked to that one, holding what was sent."""
    stats = sandbox.stats()
    assert stats["duplicateExternalIds"] == 0
    assert stats["contactsBySource"][source] == len(contacts)
    ext_ids = [c.external_id for c in contacts]
    with QuoClient(sandbox.url, sandbox.api_key) as client:
        remote = client.find_by_external_ids(ext_ids, source)
    links = store.get_contact_links(INTEGRATION, ext_ids)
    assert {e: link.quo_id for e, link in links.items()} == {e: c["id"] for e, c in remote.items()}
    for contact in contacts:
        assert links[contact.external_id].content_hash == contact.content_hash()
        body = contact.to_api_body()
        fields = remote[contact.external_id]["defaultFields"]
        assert fields["lastName"] == body["defaultFields"]["lastName"]
        assert remote[contact.external_id]["sourceUrl"] == body.get("sourceUrl")


@pytest.mark.parametrize(
    "lost",
    [
        pytest.param({"status": 500}, id="500-after-write"),
        pytest.param({"status": 503}, id="503-after-write"),
        pytest.param({"drop": True}, id="connection-dropped-after-write"),
        pytest.param({"delay_seconds": 1.5}, id="answer-after-client-timeout"),
    ],
)
def test_lost_creates_make_each_contact_once_without_409(
    sandbox: QuoSandbox, store: Store, source: str, no_uniqueness: None, lost: dict[str, Any]
) -> None:
    n, written_lost, unwritten_lost = 12, 4, 2
    contacts = rich(source, n)
    bad = QuoContact(
        **{**contacts[5].__dict__, "custom_fields": (CustomFieldValue("no-such-field", "x"),)}
    )
    contacts[5] = bad
    # Creates whose answer is lost after Quo wrote them, then creates that failed before.
    sandbox.inject_fault(count=written_lost, kinds=["create"], after_write=True, **lost)
    sandbox.inject_fault(500, count=unwritten_lost, kinds=["create"])
    timeout = 0.5 if "delay_seconds" in lost else 30.0
    with patient_client(sandbox, timeout) as client:
        # One worker: contacts are written in order, so which one meets which fault is known
        # (0-3 the lost answers, 4 both failed creates, 5 Quo's 400 alone).
        upserter = ContactUpserter(client, store, INTEGRATION, concurrency=1, settle_seconds=0.01)
        before = sandbox.stats()
        outcomes = upserter.upsert(contacts, assume_absent=True)
        assert sandbox.stats()["pendingFaults"] == 0
        expected = {"lookup": written_lost + unwritten_lost, "create": n + unwritten_lost}
        for _ in range(100):  # a late answer is counted once it went out, after the client left
            d = delta(before, sandbox.stats())
            if {k: d[k] for k in expected} == expected:
                break
            time.sleep(0.05)
        assert (
            actions(outcomes)
            == [UpsertAction.CREATED] * 5 + [UpsertAction.FAILED] + [UpsertAction.CREATED] * 6
        )
        error = outcomes[5].error or ""
        assert "400" in error and "Unknown custom field 'no-such-field'" in error
        assert all(o.error is None for o in outcomes if o is not outcomes[5])
        # Each lost create was looked up once; only those Quo never wrote were sent again.
        assert {k: d[k] for k in expected} == expected
        assert d["patch"] == 0  # a found contact held what was sent: nothing to PATCH
        assert d["400"] == 1 and d.get("409", 0) == 0
        assert_each_once(sandbox, store, source, contacts[:5] + contacts[6:])
        assert bad.external_id not in store.get_contact_links(INTEGRATION, [bad.external_id])
        # The links are exact: a second run has nothing to do but try the rejected one again.
        before = sandbox.stats()
        again = upserter.upsert(contacts, assume_absent=True)
        assert (
            actions(again)
            == [UpsertAction.UNCHANGED] * 5 + [UpsertAction.FAILED] + [UpsertAction.UNCHANGED] * 6
        )
        assert delta(before, sandbox.stats())["requests"] == 1


def test_lost_create_on_a_quo_that_enforces_uniqueness_is_found_not_409(
    sandbox: QuoSandbox, store: Store, source: str
) -> None:
    contacts = make(source, 6)
    sandbox.inject_fault(500, count=3, kinds=["create"], after_write=True)
    with patient_client(sandbox) as client:
        before = sandbox.stats()
        outcomes = ContactUpserter(client, store, INTEGRATION, settle_seconds=0.01).upsert(
            contacts, assume_absent=True
        )
        d = delta(before, sandbox.stats())
        assert actions(outcomes) == [UpsertAction.CREATED] * 6
        assert (d["create"], d["lookup"], d.get("409", 0), d["patch"]) == (6, 3, 0, 0)
        assert_each_once(sandbox, store, source, contacts)


class LaggingLookups(QuoClient):
    """Its first lookup of each externalId misses, like a list index lagging behind writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.looked_up: set[str] = set()

    def find_by_external_ids(
        self, external_ids: Iterable[str], source: str | None = None
    ) -> dict[str, dict[str, Any]]:
        ids = set(external_ids)
        found = super().find_by_external_ids(ids, source)
        first_time, self.looked_up = ids - self.looked_up, self.looked_up | ids
        return {e: c for e, c in found.items() if e not in first_time}


def test_409_after_our_own_lost_create_counts_created(
    sandbox: QuoSandbox, store: Store, source: str
) -> None:
    contacts = make(source, 5)
    sandbox.inject_fault(502, count=2, kinds=["create"], after_write=True)
    with LaggingLookups(sandbox.url, sandbox.api_key, max_attempts=2) as client:
        before = sandbox.stats()
        outcomes = ContactUpserter(client, store, INTEGRATION, settle_seconds=0.01).upsert(
            contacts, assume_absent=True
        )
        d = delta(before, sandbox.stats())
        # create (written, answer lost) -> lookup misses -> create -> 409 -> lookup -> linked
        assert actions(outcomes) == [UpsertAction.CREATED] * 5
        assert (d["create"], d["409"], d["lookup"], d["patch"]) == (7, 2, 4, 0)
        assert_each_once(sandbox, store, source, contacts)


def test_create_never_confirmed_fails_that_record_only(
    sandbox: QuoSandbox, store: Store, source: str, no_uniqueness: None
) -> None:
    contacts = make(source, 4)
    sandbox.inject_fault(503, count=MAX_CREATE_ATTEMPTS, kinds=["create"])
    with patient_client(sandbox) as client:
        slept: list[float] = []
        upserter = ContactUpserter(
            client, store, INTEGRATION, concurrency=1, settle_seconds=0.5, sleep=slept.append
        )
        before = sandbox.stats()
        outcomes = upserter.upsert(contacts, assume_absent=True)  # in order: one worker
        d = delta(before, sandbox.stats())
        assert actions(outcomes) == [UpsertAction.FAILED] + [UpsertAction.CREATED] * 3
        error = outcomes[0].error or ""
        assert f"did not confirm the create of {contacts[0].external_id!r}" in error
        assert f"in {MAX_CREATE_ATTEMPTS} attempts" in error and "503" in error
        assert slept == [0.5 * k for k in range(1, MAX_CREATE_ATTEMPTS + 1)]
        assert (d["create"], d["lookup"]) == (MAX_CREATE_ATTEMPTS + 3, MAX_CREATE_ATTEMPTS)
        assert_each_once(sandbox, store, source, contacts[1:])
        assert store.count_contact_links(INTEGRATION) == 3
        # Not written, so the next run creates it, once.
        again = upserter.upsert(contacts, assume_absent=True)
        assert actions(again) == [UpsertAction.CREATED] + [UpsertAction.UNCHANGED] * 3
        assert_each_once(sandbox, store, source, contacts)


def test_unexpected_exception_in_one_write_fails_only_that_record(
    sandbox: QuoSandbox, store: Store, source: str
) -> None:
    contacts = make(source, 5)
    target = contacts[3].external_id

    class Flaky(QuoClient):
        def create_contact(self, body: dict[str, Any]) -> dict[str, Any]:
            if body["externalId"] == target:
                raise RuntimeError("disk on fire")
            return super().create_contact(body)

    with Flaky(sandbox.url, sandbox.api_key, max_attempts=2) as client:
        outcomes = ContactUpserter(client, store, INTEGRATION).upsert(contacts)
        assert actions(outcomes) == [UpsertAction.CREATED] * 3 + [UpsertAction.FAILED] + [
            UpsertAction.CREATED
        ]
        assert outcomes[3].error == "RuntimeError: disk on fire"
        assert_each_once(sandbox, store, source, contacts[:3] + contacts[4:])
        assert target not in store.get_contact_links(INTEGRATION, [target])


def test_create_answered_without_a_contact_is_looked_up(
    sandbox: QuoSandbox, store: Store, source: str, no_uniqueness: None
) -> None:
    contacts = make(source, 3)
    target = contacts[1].external_id

    class Garbled(QuoClient):
        """A 201 whose body is lost on the way: Quo made the contact, its id is unknown."""

        def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
            response = super()._request(method, path, **kwargs)
            if method == "POST" and kwargs["json"]["externalId"] == target:
                return httpx.Response(201, content=b"<html>", request=response.request)
            return response

    with Garbled(sandbox.url, sandbox.api_key, max_attempts=2) as client:
        before = sandbox.stats()
        outcomes = ContactUpserter(client, store, INTEGRATION, settle_seconds=0.01).upsert(
            contacts, assume_absent=True
        )
        d = delta(before, sandbox.stats())
        assert actions(outcomes) == [UpsertAction.CREATED] * 3
        assert (d["create"], d["lookup"], d["patch"]) == (3, 1, 0)
        assert_each_once(sandbox, store, source, contacts)


def test_found_contact_is_patched_only_if_it_differs(
    sandbox: QuoSandbox, client: QuoClient, source: str
) -> None:
    [contact] = rich(source, 1)
    body = contact.to_api_body()
    remote = client.create_contact(body)
    assert _holds(remote, body)
    assert _holds(client.get_contact(remote["id"]), body)
    changed = [
        {**body, "sourceUrl": "https://crm.example.com/other"},
        {**body, "defaultFields": {**body["defaultFields"], "role": "CTO"}},
        {**body, "defaultFields": {**body["defaultFields"], "phoneNumbers": []}},
        {**body, "customFields": [{"key": "vip", "value": False}]},
    ]
    assert not any(_holds(remote, other) for other in changed)


# ---- what the client retries ---------------------------------------------------------------
def test_create_with_unknown_outcome_is_not_retried_but_429_is(
    sandbox: QuoSandbox, client: QuoClient, source: str
) -> None:
    [first, second] = [c.to_api_body() for c in make(source, 2)]
    sandbox.inject_fault(500, kinds=["create"])
    before = sandbox.stats()
    with pytest.raises(QuoOutcomeUnknown) as info:
        client.create_contact(first)
    assert info.value.status == 500 and "outcome unknown, not retried" in str(info.value)
    assert isinstance(info.value, QuoUnavailable)  # unhandled, it fails like Quo being down
    assert delta(before, sandbox.stats())["create"] == 1
    sandbox.inject_fault(429, kinds=["create"], retry_after="0")  # Quo did not process it
    before = sandbox.stats()
    client.create_contact(second)
    assert delta(before, sandbox.stats())["create"] == 2
    # Idempotent requests are still retried on a 5xx.
    sandbox.inject_fault(503, kinds=["lookup"])
    sandbox.inject_fault(502, kinds=["patch"])
    before = sandbox.stats()
    [found] = client.find_by_external_ids([second["externalId"]], source).values()
    client.patch_contact(found["id"], second)
    d = delta(before, sandbox.stats())
    assert (d["lookup"], d["patch"], d["503"], d["502"]) == (2, 2, 1, 1)
    assert sandbox.stats()["contactsBySource"][source] == 1


def test_quo_refusing_connections_is_unavailable_and_fails_the_page(
    store: Store, source: str
) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with QuoClient(url, "sandbox-key", max_attempts=2) as client:
        with pytest.raises(QuoUnavailable) as info:
            client.create_contact(make(source, 1)[0].to_api_body())
        assert not isinstance(info.value, QuoOutcomeUnknown)  # never sent: retried, then down
        assert "2 attempts" in str(info.value) and "ConnectError" in str(info.value)
        for assume_absent in (True, False):
            with pytest.raises(QuoUnavailable):
                ContactUpserter(client, store, INTEGRATION).upsert(
                    make(source, 3), assume_absent=assume_absent
                )
    assert store.count_contact_links(INTEGRATION) == 0


# ---- cutover: adopting what an earlier system left in Quo (core/adoption.py) ------------------
OURS, LEGACY = "pipedrive", "openphone-pipedrive"  # this product's source, the earlier one's


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[QuoSandbox]:
    """A Quo workspace of its own: phone matching lists every contact in it."""
    with QuoSandbox(tmp_path / "quo", rate_limit=None) as sb:
        yield sb
        assert sb.stats()["duplicateExternalIds"] == 0


@pytest.fixture
def wclient(workspace: QuoSandbox) -> Iterator[QuoClient]:
    with QuoClient(workspace.url, workspace.api_key, max_attempts=2) as c:
        yield c


def adopting(client: QuoClient, store: Store, **settings: Any) -> ContactUpserter:
    integration = Integration("int-adopt", "pipedrive", "env:KEY", settings=settings)
    return ContactUpserter(client, store, integration.id, adoption=Adoption.of(integration, [OURS]))


def people(n: int, version: int = 0, start: int = 0) -> list[QuoContact]:
    """CRM people 100+i as this integration writes them: namespaced ids, one phone each."""
    return [
        QuoContact(
            external_id=f"int-adopt:{100 + i}",
            source=OURS,
            first_name=f"Person{i}",
            last_name=f"V{version}",
            phone_numbers=(LabeledValue("mobile", f"+1415555{i:04d}"),),
        )
        for i in range(start, start + n)
    ]


def earlier(
    contact: QuoContact, source: str | None = LEGACY, external_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    """The create body an earlier system wrote for `contact` (by default: its CRM id under the
    legacy source, with a stale last name)."""
    body = contact.to_api_body()
    body["defaultFields"] |= {"lastName": "Stale", **fields}
    body["externalId"] = external_id or contact.external_id.removeprefix("int-adopt:")
    if source is None:
        del body["source"], body["externalId"]
    else:
        body["source"] = source
    return body


def test_legacy_contacts_are_adopted_rewritten_and_then_unchanged(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    persons = people(46)  # 45 the earlier system wrote, one new since
    legacy = workspace.prefill_contacts([earlier(c) for c in persons[:45]])
    upserter = adopting(wclient, store, legacy_sources=["openphone-zoho", LEGACY])
    before = workspace.stats()
    outcomes = upserter.upsert(persons, match_phones=True)
    after = workspace.stats()
    d = delta(before, after)
    assert actions(outcomes) == [UpsertAction.ADOPTED] * 45 + [UpsertAction.CREATED]
    assert all(o.candidate is None for o in outcomes)
    assert (d["patch"], d["create"]) == (45, 1)
    # ≤20 ids per lookup: under ours (46), the first legacy source (46), the second (46).
    assert d["lookup"] == 3 * math.ceil(46 / LOOKUP_CHUNK)
    assert after["contactsBySource"] == {OURS: 46}  # moved over, none twice
    links = store.get_contact_links("int-adopt", [c.external_id for c in persons])
    assert [links[c.external_id].quo_id for c in persons[:45]] == [c["id"] for c in legacy]
    adopted = wclient.get_contact(legacy[7]["id"])
    assert (adopted["source"], adopted["externalId"]) == (OURS, persons[7].external_id)
    assert adopted["defaultFields"]["lastName"] == "V0"  # the stale value replaced

    before = workspace.stats()
    again = upserter.upsert(persons, match_phones=True)
    assert actions(again) == [UpsertAction.UNCHANGED] * 46
    assert workspace.stats()["requests"] == before["requests"]


def test_without_rewrite_adopted_contacts_keep_legacy_ids_through_later_patches(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    persons = people(3)
    template = "pd-{id}"
    legacy = workspace.prefill_contacts(
        [earlier(c, external_id=f"pd-{c.external_id.removeprefix('int-adopt:')}") for c in persons]
    )
    settings = {
        "legacy_sources": [LEGACY],
        "legacy_external_id": template,
        "adopt_rewrites_ids": False,
    }
    upserter = adopting(wclient, store, **settings)
    assert actions(upserter.upsert(persons, match_phones=True)) == [UpsertAction.ADOPTED] * 3
    changed = people(3, version=1)
    # A later run (a new upserter) PATCHes a changed person, and creates a new one as usual.
    later = adopting(wclient, store, **settings)
    outcomes = later.upsert([*changed, *people(1, start=3)])  # as a polling cycle does
    assert actions(outcomes) == [UpsertAction.UPDATED] * 3 + [UpsertAction.CREATED]
    for contact in legacy:
        now = wclient.get_contact(contact["id"])
        assert (now["source"], now["externalId"]) == (LEGACY, contact["externalId"])
        assert now["defaultFields"]["lastName"] == "V1"
    assert workspace.stats()["contactsBySource"] == {LEGACY: 3, OURS: 1}
    assert {w["kind"] for w in workspace.writes()} == {"patch", "create"}


def test_phone_only_match_is_a_candidate_unless_adopt_by_phone(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    a, b = people(2)
    # Saved by hand in Quo, unformatted, no externalId: it matches only by number.
    [by_hand_a, by_hand_b] = workspace.prefill_contacts(
        [
            earlier(a, source=None, phoneNumbers=[{"name": "m", "value": "(415) 555-0000"}]),
            earlier(b, source=None),
        ]
    )
    outcomes = adopting(wclient, store, legacy_sources=[LEGACY]).upsert([a], match_phones=True)
    assert [(o.action, o.candidate) for o in outcomes] == [(UpsertAction.CREATED, by_hand_a["id"])]
    assert wclient.get_contact(by_hand_a["id"])["defaultFields"]["lastName"] == "Stale"

    before = workspace.stats()
    outcomes = adopting(wclient, store, adopt_by_phone=True).upsert([b], match_phones=True)
    d = delta(before, workspace.stats())
    assert [(o.action, o.candidate) for o in outcomes] == [(UpsertAction.ADOPTED, None)]
    assert (
        store.get_contact_links("int-adopt", [b.external_id])[b.external_id].quo_id
        == (by_hand_b["id"])
    )
    adopted = wclient.get_contact(by_hand_b["id"])
    assert (adopted["externalId"], adopted["defaultFields"]["lastName"]) == (b.external_id, "V0")
    assert (d["list"], d["get"], d["patch"], d["create"]) == (1, 1, 1, 0)
    assert workspace.stats()["contacts"] == 3


def test_ambiguous_phone_matches_are_not_adopted(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    a, b, c, d, e, f = people(6)
    c = replace(c, phone_numbers=b.phone_numbers)  # b and c share a number
    # A person of the integration, linked earlier, already holds e's number in Quo.
    linked = replace(d, external_id="int-adopt:999", phone_numbers=e.phone_numbers)
    ContactUpserter(wclient, store, "int-adopt").upsert([linked])
    [twin, _, shared, lone, e_match, _] = workspace.prefill_contacts(
        [
            earlier(a, source=None),  # two contacts hold a's number
            earlier(a, source=None),
            earlier(b, source="csv-import"),  # one contact, but two people of the run
            earlier(d, source=None),  # d's alone: adopted
            earlier(e, source=None),
            # The earlier system's contact of someone else (by its externalId): never f's.
            earlier(f, external_id="555"),
        ]
    )
    upserter = adopting(wclient, store, legacy_sources=[LEGACY], adopt_by_phone=True)
    outcomes = upserter.upsert([a, b, c, d, e, f], match_phones=True)
    assert [(o.action, o.candidate) for o in outcomes] == [
        (UpsertAction.CREATED, twin["id"]),
        (UpsertAction.CREATED, shared["id"]),
        (UpsertAction.CREATED, shared["id"]),
        (UpsertAction.ADOPTED, None),
        (UpsertAction.CREATED, e_match["id"]),
        (UpsertAction.CREATED, None),
    ]
    link = store.get_contact_links("int-adopt", [d.external_id])[d.external_id]
    assert link.quo_id == lone["id"]
    # The contacts not adopted are as they were.
    assert wclient.get_contact(shared["id"])["defaultFields"]["lastName"] == "Stale"
    assert workspace.stats()["contactsBySource"] == {
        "public-api": 3,
        "csv-import": 1,
        LEGACY: 1,
        OURS: 7,  # the linked person, five created, d's adopted
    }


def test_phone_match_taken_since_the_listing_is_not_adopted_twice(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    a, b = people(2)
    [by_hand] = workspace.prefill_contacts([earlier(b, source=None)])
    upserter = adopting(wclient, store, adopt_by_phone=True)
    upserter.upsert([a], match_phones=True)  # lists the workspace
    # Another run adopts the contact meanwhile: it is then that run's person's.
    wclient.patch_contact(by_hand["id"], {"source": OURS, "externalId": "int-adopt:777"})
    outcomes = upserter.upsert([b], match_phones=True)
    assert [(o.action, o.candidate) for o in outcomes] == [(UpsertAction.CREATED, by_hand["id"])]
    assert wclient.get_contact(by_hand["id"])["externalId"] == "int-adopt:777"


def test_only_an_initial_sync_lists_the_workspace_to_match_phones(
    workspace: QuoSandbox, wclient: QuoClient, store: Store
) -> None:
    """Webhook runs and polling cycles meet people made since the cutover: they look for an
    earlier system's contact by id (cheap), never by listing the whole workspace."""
    a, b = people(2)
    workspace.prefill_contacts([earlier(a), earlier(b, source=None)])
    upserter = adopting(wclient, store, legacy_sources=[LEGACY], adopt_by_phone=True)
    before = workspace.stats()
    outcomes = upserter.upsert([a, b])
    d = delta(before, workspace.stats())
    assert actions(outcomes) == [UpsertAction.ADOPTED, UpsertAction.CREATED]
    assert outcomes[1].candidate is None  # not matched: nothing listed
    assert (d["list"], d["lookup"]) == (0, 2)  # ours, then the legacy source
