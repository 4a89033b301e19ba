"""AttioApi against the Attio sandbox over real HTTP: paging, batch reads, notes, webhooks,
retries through a rate governor, signatures and errors."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from quo_sync_dagster.crms.attio_api import (
    AttioApi,
    AttioApiError,
    AttioUnavailable,
    verify_signature,
)
from quo_sync_dagster.governed_http import OutcomeUnknown
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.sandbox.attio_server import COMPANIES, AttioSandbox
from quo_sync_dagster.store import open_store

KEY = "attio-client-key"
RECORDS = 500
MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttioSandbox]:
    with AttioSandbox(tmp_path_factory.mktemp("attio"), KEY, RECORDS, rate_limit=None) as sb:
        yield sb


@pytest.fixture
def api(sandbox: AttioSandbox) -> Iterator[AttioApi]:
    with AttioApi(sandbox.url, KEY) as client:
        yield client
    sandbox.clear_faults()


def test_pages_over_all_people_newest_first(api: AttioApi) -> None:
    people = list(api.iter_people(page_size=120))
    record_ids = [p["id"]["record_id"] for p in people]
    assert len(record_ids) == RECORDS == len(set(record_ids))
    stamps = [p["created_at"] for p in people]
    assert stamps == sorted(stamps, reverse=True)
    oldest = api.query_people(limit=3, offset=0, sort_desc=False)
    assert [p["id"]["record_id"] for p in oldest] == record_ids[:-4:-1]


def test_batch_get_returns_exactly_the_existing_people(api: AttioApi) -> None:
    wanted = [p["id"]["record_id"] for p in api.query_people(limit=40, offset=100)][::5]
    found = api.get_people([*wanted, MISSING, wanted[0]])
    assert sorted(p["id"]["record_id"] for p in found) == sorted(wanted)
    assert api.get_person(wanted[0])["id"]["record_id"] == wanted[0]
    assert api.get_person(MISSING) is None


def test_companies_are_read_by_id_500_per_query(sandbox: AttioSandbox, api: AttioApi) -> None:
    known = sorted(COMPANIES)
    unknown = [f"00000000-0000-4000-8000-{n:012d}" for n in range(500)]
    before = sandbox.stats()["byKind"]["query_companies"]
    found = api.get_companies([*known, *unknown, known[0]])  # 516 distinct ids
    assert sandbox.stats()["byKind"]["query_companies"] == before + 2
    assert sorted(c["id"]["record_id"] for c in found) == known
    assert found[0]["values"]["name"][0]["value"]


def test_phone_lookup_uses_the_normalised_number(api: AttioApi) -> None:
    person = next(p for p in api.iter_people() if len(p["values"]["phone_numbers"]) == 1)
    phone = person["values"]["phone_numbers"][0]["phone_number"]
    found = api.find_people_by_phone(phone)
    assert person["id"]["record_id"] in [p["id"]["record_id"] for p in found]


def test_note_is_written_with_the_right_fields(sandbox: AttioSandbox, api: AttioApi) -> None:
    record_id = api.query_people(limit=1, offset=7)[0]["id"]["record_id"]
    at = datetime(2026, 3, 1, 15, 0, 0, 250000, tzinfo=UTC)
    content = "**SMS** received\n\nHi, can we reschedule? 🙂"
    note = api.create_note(record_id, "Inbound SMS from +15558675309", content, created_at=at)
    stored = sandbox.notes()[-1]
    assert stored == note
    assert stored["parent_object"] == "people" and stored["parent_record_id"] == record_id
    assert stored["title"] == "Inbound SMS from +15558675309"
    assert stored["content_markdown"] == content
    assert stored["content_plaintext"] == "SMS received\n\nHi, can we reschedule? 🙂"
    assert stored["created_at"] == "2026-03-01T15:00:00.250000000Z"


def test_notes_are_listed_page_by_page_read_and_deleted(
    sandbox: AttioSandbox, api: AttioApi
) -> None:
    record_id, other = (p["id"]["record_id"] for p in api.query_people(limit=2, offset=20))
    api.create_note(other, "someone else's", "x", "plaintext")
    made = [api.create_note(record_id, f"n{i}", f"body {i}", "plaintext") for i in range(53)]
    ids = [n["id"]["note_id"] for n in made]
    assert len(api.list_notes(record_id)) == 50  # the spec's maximum page
    assert [n["id"]["note_id"] for n in api.iter_notes(record_id)] == ids  # pages of 50, 3
    assert api.get_note(ids[7]) == made[7]
    assert api.delete_note(ids[7]) is True
    assert api.get_note(ids[7]) is None
    assert api.delete_note(ids[7]) is False  # already gone: a retried delete is fine
    assert ids[7] not in [n["id"]["note_id"] for n in api.iter_notes(record_id)]
    assert ids[7] not in [n["id"]["note_id"] for n in sandbox.notes()]


def test_a_note_create_with_an_unknown_outcome_is_not_sent_again(
    sandbox: AttioSandbox, api: AttioApi
) -> None:
    record_id = api.query_people(limit=1, offset=30)[0]["id"]["record_id"]
    sandbox.inject_fault(502, kinds=["create_note"], after_write=True)
    with pytest.raises(OutcomeUnknown):
        api.create_note(record_id, "once", "only once", "plaintext", idempotent=False)
    assert [n["title"] for n in api.iter_notes(record_id)] == ["once"]


def test_webhook_lifecycle(api: AttioApi) -> None:
    webhook = api.create_webhook("https://hooks.example/attio")
    assert webhook["status"] == "active" and len(webhook["secret"]) == 64
    assert [s["event_type"] for s in webhook["subscriptions"]] == [
        "record.created",
        "record.updated",
        "record.deleted",
        "record.merged",
    ]
    api.delete_webhook(webhook["id"]["webhook_id"])
    with pytest.raises(AttioApiError) as exc:
        api.delete_webhook(webhook["id"]["webhook_id"])
    assert (exc.value.status, exc.value.code) == (404, "not_found")


def test_429_is_retried_through_the_throttle(
    sandbox: AttioSandbox, api: AttioApi, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.sqlite")
    governor = RateGovernor(store, KEY, 50, api="attio")
    retry_at = math.ceil(time.time() + 1)
    sandbox.inject_fault(429, count=2, retry_after=formatdate(retry_at, usegmt=True))
    before = sandbox.stats()["byStatus"].get("429", 0)
    with AttioApi(sandbox.url, KEY, throttle=governor) as governed:
        assert len(governed.query_people(limit=5, offset=0)) == 5
    assert time.time() >= retry_at - 0.05  # the governor held the retry back until Retry-After
    assert sandbox.stats()["byStatus"]["429"] - before == 2


def test_persistent_5xx_becomes_unavailable(sandbox: AttioSandbox) -> None:
    sandbox.inject_fault(503, count=2)
    with AttioApi(sandbox.url, KEY, max_attempts=2) as fragile, pytest.raises(AttioUnavailable):
        fragile.query_people(limit=1, offset=0)


def test_errors_carry_status_and_never_the_key(sandbox: AttioSandbox, api: AttioApi) -> None:
    secret_key = "sk-attio-do-not-leak-123"
    with AttioApi(sandbox.url, secret_key) as wrong, pytest.raises(AttioApiError) as exc:
        wrong.query_people(limit=1, offset=0)
    assert (exc.value.status, exc.value.code) == (401, "unauthorized")
    assert secret_key not in str(exc.value) and secret_key not in repr(exc.value.args)
    with pytest.raises(AttioApiError) as missing:
        api.create_note(MISSING, "t", "c")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert KEY not in str(missing.value)


def test_signature_verification() -> None:
    secret, body = "a" * 64, b'{"webhook_id":"w","events":[{"event_type":"record.updated"}]}'
    good = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert verify_signature(secret, body, good)
    assert verify_signature(secret, body, good.upper())
    assert not verify_signature(secret, body.replace(b"updated", b"deleted"), good)
    assert not verify_signature("b" * 64, body, good)
    assert not verify_signature(secret, body, None)
    assert not verify_signature("", body, hmac.new(b"", body, hashlib.sha256).hexdigest())


def test_delivered_event_verifies_with_the_webhook_secret(
    sandbox: AttioSandbox, api: AttioApi
) -> None:
    received: list[tuple[bytes, str | None]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((raw, self.headers.get("Attio-Signature")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        webhook = api.create_webhook("https://hooks.example/attio", ["record.updated"])
        event = {"event_type": "record.updated", "id": {"record_id": MISSING}}
        target = f"http://127.0.0.1:{server.server_port}/hook"
        assert sandbox.emit_webhook(webhook["id"]["webhook_id"], [event], target) == 200
    finally:
        server.shutdown()
        server.server_close()
    [(raw, signature)] = received
    assert verify_signature(webhook["secret"], raw, signature)
    assert not verify_signature(webhook["secret"], raw + b" ", signature)
