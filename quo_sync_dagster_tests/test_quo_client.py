"""QuoClient against the Quo sandbox over real HTTP: round-trips, errors, retries, rate governor."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest

from quo_sync_dagster.core.ratelimit import GovernorState
from quo_sync_dagster.quo.client import (
    LOOKUP_CHUNK,
    QuoApiError,
    QuoClient,
    QuoUnavailable,
    parse_error,
    parse_retry_after,
)
from quo_sync_dagster.quo.governor import RateGovernor, governor_key
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.store import Store, open_store

SOURCE = "client-test"


def uid() -> str:
    return f"ext-{uuid.uuid4().hex[:12]}"


def body(external_id: str, first: str = "Ada", phones: list[str] | None = None) -> dict[str, Any]:
    return {
        "externalId": external_id,
        "source": SOURCE,
        "defaultFields": {
            "firstName": first,
            "lastName": "Lovelace",
            "company": None,
            "role": None,
            "emails": [{"name": "email", "value": f"{external_id}@example.com"}],
            "phoneNumbers": [{"name": "mobile", "value": p} for p in phones or ["+12125550100"]],
        },
        "customFields": [],
    }


def governor_state(store: Store, api_key: str) -> GovernorState:
    return GovernorState(
        *store.update_governor(governor_key(api_key), lambda s: (s, (s.next_at, s.slowdown)))
    )


@pytest.fixture
def client(sandbox: QuoSandbox) -> Iterator[QuoClient]:
    sandbox.clear_faults()
    with QuoClient(sandbox.url, sandbox.api_key) as c:
        yield c
    sandbox.clear_faults()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    yield s
    s.close()


def by_kind(sandbox: QuoSandbox) -> dict[str, int]:
    return sandbox.stats()["byKind"]


# ---- round-trips ---------------------------------------------------------------------------
def test_create_get_patch_delete_round_trip(sandbox: QuoSandbox, client: QuoClient) -> None:
    ext = uid()
    created = client.create_contact(body(ext, phones=["+12125550100", "+442079460018"]))
    assert created["id"] and created["externalId"] == ext and created["source"] == SOURCE
    assert client.get_contact(created["id"]) == created

    patched = client.patch_contact(created["id"], body(ext, first="Grace", phones=["+12125550199"]))
    assert patched["id"] == created["id"]
    fetched = client.get_contact(created["id"])
    assert fetched["defaultFields"]["firstName"] == "Grace"
    assert [p["value"] for p in fetched["defaultFields"]["phoneNumbers"]] == ["+12125550199"]

    client.delete_contact(created["id"])
    with pytest.raises(QuoApiError) as info:
        client.get_contact(created["id"])
    assert info.value.status == 404


def test_find_by_external_ids_returns_only_existing(client: QuoClient) -> None:
    present = [uid() for _ in range(3)]
    ids = {ext: client.create_contact(body(ext))["id"] for ext in present}
    found = client.find_by_external_ids([*present, uid(), present[0]], SOURCE)
    assert {ext: c["id"] for ext, c in found.items()} == ids
    assert client.find_by_external_ids([present[0]], "some-other-source") == {}
    assert set(client.find_by_external_ids(present)) == set(present)  # any source
    assert client.has_contacts_from(SOURCE)
    assert not client.has_contacts_from(f"nobody-{uuid.uuid4().hex[:8]}")


def test_lookup_chunks_at_twenty_ids(sandbox: QuoSandbox, client: QuoClient) -> None:
    exts = [uid() for _ in range(45)]
    for ext in exts[::2]:
        client.create_contact(body(ext))
    before = by_kind(sandbox)["lookup"]
    found = client.find_by_external_ids(exts, SOURCE)
    assert set(found) == set(exts[::2])
    assert by_kind(sandbox)["lookup"] - before == math.ceil(len(exts) / LOOKUP_CHUNK)


# ---- errors --------------------------------------------------------------------------------
def test_404_is_quo_api_error_with_code(client: QuoClient) -> None:
    with pytest.raises(QuoApiError) as info:
        client.patch_contact("0" * 24, body(uid()))
    assert (info.value.status, info.value.code) == (404, "0800404")
    assert "PATCH /v1/contacts/" in str(info.value)


def test_400_names_the_bad_field(client: QuoClient) -> None:
    with pytest.raises(QuoApiError) as info:
        client.create_contact({**body(uid()), "source": "openphone"})
    assert info.value.status == 400 and "/source" in str(info.value)


def test_409_on_duplicate_external_id(client: QuoClient) -> None:
    ext = uid()
    client.create_contact(body(ext))
    with pytest.raises(QuoApiError) as info:
        client.create_contact(body(ext))
    assert (info.value.status, info.value.code) == (409, "0800409")


def _response(status: int, **kwargs: Any) -> httpx.Response:
    request = httpx.Request("POST", "https://api.openphone.com/v1/contacts")
    return httpx.Response(status, request=request, **kwargs)


def test_parse_error_spec_shape() -> None:
    error = parse_error(
        _response(
            400,
            json={
                "message": "Invalid Custom Field Item",
                "code": "0801400",
                "status": 400,
                "docs": "https://quo.com/docs",
                "title": "Bad Request",
                "errors": [{"path": "/customFields/0", "message": "Unknown custom field 'x'"}],
            },
        )
    )
    assert (error.status, error.code) == (400, "0801400")
    text = str(error)
    assert "Invalid Custom Field Item" in text and "/customFields/0" in text
    assert "Unknown custom field 'x'" in text and "POST /v1/contacts" in text


def test_parse_error_wrapped_shape() -> None:
    error = parse_error(
        _response(404, json={"error": {"message": "Not found", "key": "0800404", "trace": "t"}})
    )
    assert (error.status, error.code) == (404, "0800404")
    assert "Not found" in str(error)


def test_parse_error_without_json() -> None:
    error = parse_error(_response(502, text="<html>Bad gateway</html>"))
    assert (error.status, error.code) == (502, None) and "Bad gateway" in str(error)


def test_parse_retry_after_formats() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    now = time.time()
    date = formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1.0)
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now=now) == 0.0


# ---- retries -------------------------------------------------------------------------------
def test_transient_500s_are_retried(sandbox: QuoSandbox, client: QuoClient) -> None:
    ext = uid()
    sandbox.inject_fault(500, count=2)
    before = sandbox.stats()
    created = client.create_contact(body(ext))
    after = sandbox.stats()
    assert after["byKind"]["create"] - before["byKind"]["create"] == 3
    assert after["byStatus"].get("500", 0) - before["byStatus"].get("500", 0) == 2
    assert client.find_by_external_ids([ext], SOURCE)[ext]["id"] == created["id"]


def test_persistent_500s_become_quo_unavailable(sandbox: QuoSandbox) -> None:
    sandbox.inject_fault(500, count=10)
    before = sandbox.stats()["requests"]
    try:
        with (
            QuoClient(sandbox.url, sandbox.api_key, max_attempts=2) as c,
            pytest.raises(QuoUnavailable) as info,
        ):
            c.get_contact("0" * 24)
        assert sandbox.stats()["requests"] - before == 2
        assert sandbox.stats()["pendingFaults"] == 8
        assert "2 attempts" in str(info.value)
    finally:
        sandbox.clear_faults()


def test_wrong_api_key_is_unavailable_and_never_leaks(sandbox: QuoSandbox) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    before = sandbox.stats()["requests"]
    with QuoClient(sandbox.url, secret) as c, pytest.raises(QuoUnavailable) as info:
        c.has_contacts_from(SOURCE)
    assert "401" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert sandbox.stats()["requests"] - before == 1  # not retried


def test_wrong_key_exception_chain_never_leaks(sandbox: QuoSandbox) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    with QuoClient(sandbox.url, secret) as c, pytest.raises(QuoUnavailable) as info:
        c.create_contact(body(uid()))
    exc: BaseException | None = info.value
    while exc is not None:
        assert secret not in str(exc)
        exc = exc.__cause__ or exc.__context__


# ---- 429 and the governor ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
def test_429_fault_waits_for_retry_after(
    sandbox: QuoSandbox, store: Store, fmt: str, client: QuoClient
) -> None:
    sent = time.time()
    header = "1" if fmt == "seconds" else formatdate(math.ceil(sent) + 1, usegmt=True)
    wait = parse_retry_after(header)
    assert wait is not None and wait > 0.5
    governor = RateGovernor(store, sandbox.api_key, requests_per_second=50)
    sandbox.inject_fault(429, count=1, retry_after=header)
    before = sandbox.stats()
    with QuoClient(sandbox.url, sandbox.api_key, governor=governor) as c:
        start = time.time()
        assert c.has_contacts_from(SOURCE) in (True, False)
        elapsed = time.time() - start
    after = sandbox.stats()
    assert after["rateLimited"] - before["rateLimited"] == 1
    assert after["requests"] - before["requests"] == 2
    assert elapsed >= wait - 0.15
    state = governor_state(store, sandbox.api_key)
    assert state.next_at >= start + wait - 0.15 and state.slowdown > 1.0


@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
def test_real_limiter_429_is_retried_after_governor_wait(tmp_path: Path, fmt: str) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    with QuoSandbox(tmp_path / "quo", rate_limit=1, retry_after_format=fmt) as sb:
        governor = RateGovernor(store, sb.api_key, requests_per_second=100)
        with QuoClient(sb.url, sb.api_key, governor=governor) as c:
            start = time.time()
            first = c.create_contact(body(uid()))
            second = c.create_contact(body(uid()))  # the bucket is empty: 429, then retried
            elapsed = time.time() - start
        stats = sb.stats()
    state = governor_state(store, sb.api_key)
    store.close()
    assert first["id"] != second["id"] and stats["contacts"] == 2
    assert stats["rateLimited"] >= 1 and stats["byStatus"]["201"] == 2
    assert elapsed >= 0.9  # Retry-After is at least one second
    assert state.next_at >= start + 0.9 and state.slowdown > 1.0


def test_shared_governor_keeps_two_clients_under_the_limit(tmp_path: Path) -> None:
    rate, per_client = 20.0, 20
    store = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    with QuoSandbox(tmp_path / "quo", rate_limit=rate) as sb:
        governor = RateGovernor(store, sb.api_key, requests_per_second=rate)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with QuoClient(sb.url, sb.api_key, governor=governor, max_attempts=1) as c:
                    for _ in range(per_client):
                        c.create_contact(body(uid()))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = sb.stats()
    store.close()
    assert errors == []
    assert stats["requests"] == 2 * per_client and stats["rateLimited"] == 0
    span = stats["lastRequestAt"] - stats["firstRequestAt"]
    assert (stats["requests"] - 1) / span <= rate * 1.1


def test_without_governor_the_same_burst_is_limited(tmp_path: Path) -> None:
    """The counterpart of the test above: the sandbox's limiter does bite an ungoverned burst."""
    with QuoSandbox(tmp_path / "quo", rate_limit=20) as sb:
        with httpx.Client(base_url=sb.url, headers={"Authorization": sb.api_key}) as raw:
            statuses = [
                raw.get("/v1/contacts", params={"maxResults": 1}).status_code for _ in range(40)
            ]
        assert 429 in statuses and sb.stats()["rateLimited"] > 0
