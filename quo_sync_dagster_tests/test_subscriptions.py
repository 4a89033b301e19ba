"""Webhook subscriptions as stored objects (webhooks/subscriptions.py) against the real Pipedrive,
Zoho and Attio simulators, a real SQLite store and the real receiver: what subscribe stores (no
secret), that a simulator's delivery then gets through, renewal and re-subscription, teardown;
the `<crm>_webhooks` job and `<crm>_renew_webhooks` schedule on a temporary Dagster instance;
`quo-sync integrations add/remove`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from quo_sync_dagster.cli import main
from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms import zoho
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.crms.pipedrive_api import PipedriveApi
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.resources import StoreResource
from quo_sync_dagster.orchestration.sync import open_connector
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.attio_server import PEOPLE_OBJECT_ID, AttioSandbox
from quo_sync_dagster.sandbox.pipedrive_server import PipedriveSandbox
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.sandbox.serving import SandboxServer
from quo_sync_dagster.sandbox.zoho_server import ZohoSandbox
from quo_sync_dagster.secrets import BACKEND_ENV, MissingSecret, resolve_secret
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.webhooks.app import ReceiverServer, ReceiverSettings, create_app
from quo_sync_dagster.webhooks.subscriptions import (
    RECEIVER_URL_ENV,
    Renewal,
    receiver_base_url,
    receiver_url,
    renew,
    subscribe,
    unsubscribe,
)

CRMS = ["pipedrive", "zoho", "attio"]
TOKENS = {"pipedrive": "pd-subs-token-7c1e", "zoho": "zoho-subs-token-3b9a", "attio": "at-key-51f0"}
SANDBOXES: dict[str, Callable[[Path, str], SandboxServer]] = {
    "pipedrive": lambda d, t: PipedriveSandbox(d, t, records=3, rate_limit=None),
    "zoho": lambda d, t: ZohoSandbox(d, t, records={"Contacts": 3, "Leads": 1}, rate_limit=None),
    "attio": lambda d, t: AttioSandbox(d, t, records=3, rate_limit=None),
}
SUBSCRIPTION_KEYS = {"crm", "receiverUrl", "createdAt", "expiresAt", "secretRef", "details"}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@dataclass
class World:
    crm: str
    sim: SandboxServer
    store: Store
    store_uri: str
    store_file: Path
    receiver: str  # the receiver's base URL

    def integration(self, integration_id: str = "it-1", **settings: Any) -> Integration:
        integration = Integration(
            integration_id,
            self.crm,
            "env:QUO_KEY_UNUSED",
            crm_credential_ref=f"env:{self.crm.upper()}_SUBS_TOKEN",
            settings={"base_url": self.sim.url, **settings},
        )
        self.store.upsert_integration(integration)
        return integration

    def connector(self, integration_id: str = "it-1") -> CRMConnector:
        return open_connector(self.store, self.crm, integration_id)

    def at_crm(self) -> set[str]:
        """Ids of every subscription the simulator holds (Zoho: lapsed channels too)."""
        if self.crm == "pipedrive":
            return {str(h["id"]) for h in self.sim.stats()["created"]["webhooks"]}
        if self.crm == "zoho":
            return {c["channel_id"] for c in self.sim.created()["channels"]}  # type: ignore[attr-defined]
        return {w["id"]["webhook_id"] for w in self.sim.webhooks()}  # type: ignore[attr-defined]

    def secret_at_crm(self, subscription: dict[str, Any]) -> str | None:
        """The secret the simulator verifies deliveries of this subscription with."""
        (crm_id,) = ids_of(subscription) if self.crm != "pipedrive" else (None,)
        if self.crm == "zoho":
            channels = self.sim.created()["channels"]  # type: ignore[attr-defined]
            return next(c["token"] for c in channels if c["channel_id"] == crm_id)
        if self.crm == "attio":
            webhooks = self.sim.webhooks()  # type: ignore[attr-defined]
            return next(w["secret"] for w in webhooks if w["id"]["webhook_id"] == crm_id)
        return None

    def change_a_person(self) -> str:
        """Create a person in the simulator (which emits its webhook); return its CRM id."""
        created = self.sim.create_person()
        return created["id"]["record_id"] if self.crm == "attio" else str(created["id"])

    def delivered(self, integration_id: str, person_id: str) -> dict[str, Any]:
        """The change about `person_id` the receiver stored for the integration (waits)."""

        def find() -> dict[str, Any] | None:
            items = self.store.claim_webhooks(integration_id, 100, lease_seconds=0)
            changes = [i.payload["change"] for i in items]
            return next((c for c in changes if c["personId"] == person_id), None)

        return wait_for(find, f"a {self.crm} delivery about {person_id}")


def ids_of(subscription: dict[str, Any]) -> set[str]:
    details = subscription["details"]
    if "webhookIds" in details:
        return {str(i) for i in details["webhookIds"]}
    return {str(details.get("channel_id") or details.get("webhook_id"))}


@pytest.fixture(params=CRMS)
def world(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    yield from _world(request.param, tmp_path, monkeypatch)


def _world(crm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.delenv(RECEIVER_URL_ENV, raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv(f"{crm.upper()}_SUBS_TOKEN", TOKENS[crm])
    store_file = tmp_path / "store.sqlite"
    store_uri = f"sqlite:///{store_file}"
    store = open_store(store_uri)
    # No cache: a re-subscription's new secret counts at once.
    app = create_app(store, settings=ReceiverSettings(cache_ttl_seconds=0))
    try:
        with (
            SANDBOXES[crm](tmp_path / crm, TOKENS[crm]) as sim,
            ReceiverServer(app) as receiver,
        ):
            yield World(crm, sim, store, store_uri, store_file, receiver.url)
    finally:
        store.close()


@pytest.fixture
def zoho_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield from _world("zoho", tmp_path, monkeypatch)


@pytest.fixture
def attio_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield from _world("attio", tmp_path, monkeypatch)


@pytest.fixture
def pipedrive_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield from _world("pipedrive", tmp_path, monkeypatch)


def store_bytes(world: World) -> bytes:
    """Everything the SQLite store wrote: the database and its WAL."""
    files = world.store_file.parent.glob(world.store_file.name + "*")
    return b"".join(f.read_bytes() for f in files)


# ---- subscribe ---------------------------------------------------------------------------------
def test_subscribe_stores_no_secret_and_lets_a_delivery_through(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    world.integration()
    connector = world.connector()
    subscription = subscribe(world.store, connector, world.receiver + "/")
    assert set(subscription) == SUBSCRIPTION_KEYS
    assert world.store.get_webhook_subscription("it-1") == subscription
    assert subscription["crm"] == world.crm
    assert subscription["receiverUrl"] == f"{world.receiver}/webhooks/crm/{world.crm}/it-1"
    assert ids_of(subscription) <= world.at_crm()

    secret = world.secret_at_crm(subscription)
    if world.crm == "pipedrive":  # Basic auth derived from the API token: nothing to store
        assert subscription["secretRef"] is None
        secret = connector.webhook_basic_auth()[1]  # type: ignore[attr-defined]
    else:
        assert secret and resolve_secret(subscription["secretRef"]) == secret
    assert secret.encode() not in store_bytes(world)
    assert secret not in repr(subscription)
    if world.crm == "zoho":
        assert subscription["expiresAt"] == subscription["details"]["expires_at"]
        expires = datetime.fromisoformat(subscription["expiresAt"])
        assert timedelta(days=5) < expires - datetime.now(UTC) <= zoho.CHANNEL_TTL
    else:
        assert subscription["expiresAt"] is None
    if world.crm == "attio":
        assert subscription["details"]["peopleObjectId"] == PEOPLE_OBJECT_ID

    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["kind"] == "upsert"
    sent = wait_for(lambda: world.sim.deliveries()["sent"], "the simulator to count the delivery")
    assert sent >= 1 and world.sim.deliveries()["failed"] == 0  # the receiver refused none
    unsubscribe(world.store, connector)
    assert caplog.records and secret not in caplog.text


def test_subscribing_again_replaces_and_retires_the_old_subscription(world: World) -> None:
    world.integration()
    connector = world.connector()
    first = subscribe(world.store, connector, world.receiver)
    second = subscribe(world.store, connector, world.receiver)
    assert world.store.get_webhook_subscription("it-1") == second
    assert not ids_of(first) & world.at_crm()  # torn down at the CRM
    assert ids_of(second) <= world.at_crm()
    if first["secretRef"]:
        assert first["secretRef"] != second["secretRef"]
        with pytest.raises(MissingSecret):
            resolve_secret(first["secretRef"])
        assert resolve_secret(second["secretRef"]) == world.secret_at_crm(second)
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_unsubscribe_removes_at_the_crm_and_deletes_the_secret(world: World) -> None:
    world.integration()
    connector = world.connector()
    subscription = subscribe(world.store, connector, world.receiver)
    assert unsubscribe(world.store, connector) is True
    assert not ids_of(subscription) & world.at_crm()
    assert world.store.get_webhook_subscription("it-1") is None
    if subscription["secretRef"]:
        with pytest.raises(MissingSecret):
            resolve_secret(subscription["secretRef"])
    assert unsubscribe(world.store, connector) is False  # nothing left to remove


def test_unsubscribe_of_a_subscription_already_gone_at_the_crm(world: World) -> None:
    world.integration()
    connector = world.connector()
    subscription = subscribe(world.store, connector, world.receiver)
    connector.teardown_webhooks(subscription["details"])  # e.g. deleted in the CRM's UI
    assert unsubscribe(world.store, connector) is True
    assert world.store.get_webhook_subscription("it-1") is None


def test_a_secret_that_cannot_be_stored_leaves_nothing_behind(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    if world.crm == "pipedrive":
        pytest.skip("Pipedrive stores no secret")
    world.integration()
    before = world.at_crm()
    monkeypatch.setenv(BACKEND_ENV, "vault")  # store_secret refuses an unknown backend
    with pytest.raises(ValueError, match="vault"):
        subscribe(world.store, world.connector(), world.receiver)
    assert world.at_crm() == before  # the CRM-side subscription was torn down again
    assert world.store.get_webhook_subscription("it-1") is None


def fill_webhooks(world: World, leave: int) -> set[str]:
    """Pipedrive webhooks up to its limit minus `leave`: a subscription (3) then fails."""
    with PipedriveApi(world.sim.url, TOKENS["pipedrive"]) as api:
        return {str(api.create_webhook("https://x.example/h")["id"]) for _ in range(40 - leave)}


def test_a_replaced_subscription_that_cannot_be_torn_down_is_only_logged(
    pipedrive_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world = pipedrive_world
    world.integration()
    stale = {"webhookIds": ["not-a-number"], "receiverUrl": "https://old.example"}
    world.store.put_webhook_subscription(
        "it-1",
        {
            "crm": "pipedrive",
            "receiverUrl": "https://old.example",
            "createdAt": "2026-01-01",
            "expiresAt": None,
            "secretRef": None,
            "details": stale,
        },
    )
    subscription = subscribe(world.store, world.connector(), world.receiver)  # Pipedrive: 400
    assert world.store.get_webhook_subscription("it-1") == subscription
    assert "replaced webhook subscription of 'it-1' not fully removed" in caplog.text
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_a_setup_refused_part_way_stores_nothing(pipedrive_world: World) -> None:
    world = pipedrive_world
    world.integration()
    fillers = fill_webhooks(world, leave=2)
    with pytest.raises(Exception, match="403"):
        subscribe(world.store, world.connector(), world.receiver)
    assert world.store.get_webhook_subscription("it-1") is None
    assert world.at_crm() == fillers  # the two it made were removed again


# ---- the receiver URL --------------------------------------------------------------------------
def _integration(integration_id: str = "it-1", **settings: Any) -> Integration:
    return Integration(integration_id, "attio", "env:K", settings=settings)


def test_receiver_url_from_the_setting_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RECEIVER_URL_ENV, "https://env.example/hooks/")
    assert receiver_base_url(_integration()) == "https://env.example/hooks"
    setting = _integration(receiver_url="https://setting.example")
    assert receiver_base_url(setting) == "https://setting.example"
    monkeypatch.delenv(RECEIVER_URL_ENV)
    with pytest.raises(ValueError) as error:
        receiver_base_url(_integration())
    assert "receiver_url" in str(error.value) and RECEIVER_URL_ENV in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example",
        "hooks.example/receiver",
        "https://",
        "https://hooks.example/?tenant=1",
        "https://hooks.example/#x",
        "https://user:hunter2@hooks.example",
        42,
    ],
)
def test_a_bad_receiver_url_is_refused_without_echoing_it(url: Any) -> None:
    with pytest.raises(ValueError, match="setting receiver_url") as error:
        receiver_base_url(_integration(receiver_url=url))
    assert "hunter2" not in str(error.value)


def test_integration_ids_are_quoted_into_the_route() -> None:
    url = receiver_url(_integration("acme west?#"), "https://hooks.example/base/")
    assert url == "https://hooks.example/base/webhooks/crm/attio/acme%20west%3F%23"
    with pytest.raises(ValueError, match="path segment"):
        receiver_url(_integration("a/b"), "https://hooks.example")


def test_an_odd_integration_id_still_gets_its_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for world in _world("attio", tmp_path, monkeypatch):
        world.integration("acme west ü")
        subscribe(world.store, world.connector("acme west ü"), world.receiver)
        person_id = world.change_a_person()
        assert world.delivered("acme west ü", person_id)["personId"] == person_id


# ---- renew -------------------------------------------------------------------------------------
def zoho_channel(world: World, subscription: dict[str, Any]) -> dict[str, Any] | None:
    """The channel while Zoho lists it as live."""
    live = world.connector().api.list_watches()
    return next((c for c in live if c["channel_id"] == subscription["details"]["channel_id"]), None)


def test_renew_moves_a_zoho_expiry_before_it_lapses(
    zoho_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = zoho_world
    world.integration()
    with monkeypatch.context() as patched:
        patched.setattr(zoho, "CHANNEL_TTL", timedelta(hours=2))
        subscription = subscribe(world.store, world.connector(), world.receiver)
    assert renew(world.store, world.connector(), timedelta(hours=1)) is Renewal.CURRENT
    assert renew(world.store, world.connector()) is Renewal.RENEWED  # within 24 h

    renewed = world.store.get_webhook_subscription("it-1")
    assert renewed is not None
    moved = datetime.fromisoformat(renewed["expiresAt"])
    assert moved - datetime.fromisoformat(subscription["expiresAt"]) > timedelta(days=5)
    assert renewed["expiresAt"] == renewed["details"]["expires_at"]
    assert zoho_channel(world, renewed)["channel_expiry"] == renewed["expiresAt"]  # type: ignore[index]
    # Same channel, same token, same reference: the receiver verifies as before.
    assert renewed["details"]["channel_id"] == subscription["details"]["channel_id"]
    assert renewed["secretRef"] == subscription["secretRef"]
    assert resolve_secret(renewed["secretRef"]) == world.secret_at_crm(renewed)
    assert "token" not in renewed["details"]
    assert renew(world.store, world.connector()) is Renewal.CURRENT
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_renew_subscribes_a_lapsed_zoho_channel_again(
    zoho_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = zoho_world
    world.integration()
    with monkeypatch.context() as patched:
        patched.setattr(zoho, "CHANNEL_TTL", timedelta(seconds=2))
        lapsing = subscribe(world.store, world.connector(), world.receiver)
    wait_for(lambda: zoho_channel(world, lapsing) is None, "the channel to lapse")

    assert renew(world.store, world.connector()) is Renewal.RESUBSCRIBED
    fresh = world.store.get_webhook_subscription("it-1")
    assert fresh is not None and zoho_channel(world, fresh) is not None
    assert datetime.fromisoformat(fresh["expiresAt"]) - datetime.now(UTC) > timedelta(days=5)
    with pytest.raises(MissingSecret):  # the lapsed channel's token is deleted
        resolve_secret(lapsing["secretRef"])
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_renew_subscribes_again_what_the_crm_reports_gone(world: World) -> None:
    world.integration()
    connector = world.connector()
    subscription = subscribe(world.store, connector, world.receiver)
    gone = sorted(ids_of(subscription))[:1]  # Pipedrive: one of its three webhooks
    connector.teardown_webhooks({**subscription["details"], "webhookIds": gone})
    assert renew(world.store, connector) is Renewal.RESUBSCRIBED
    fresh = world.store.get_webhook_subscription("it-1")
    assert fresh is not None and ids_of(fresh) <= world.at_crm()
    assert not ids_of(subscription) & world.at_crm()  # what was left is torn down
    assert renew(world.store, connector) is Renewal.CURRENT
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_renew_subscribes_again_an_attio_webhook_attio_made_inactive(attio_world: World) -> None:
    world = attio_world
    sim: AttioSandbox = world.sim  # type: ignore[assignment]
    world.integration()
    subscription = subscribe(world.store, world.connector(), world.receiver)
    (webhook_id,) = ids_of(subscription)
    sim.set_webhook_status(webhook_id, "degraded")  # still delivering: kept
    assert renew(world.store, world.connector()) is Renewal.CURRENT
    sim.set_webhook_status(webhook_id, "inactive")
    assert renew(world.store, world.connector()) is Renewal.RESUBSCRIBED
    fresh = world.store.get_webhook_subscription("it-1")
    assert fresh is not None and ids_of(fresh) != {webhook_id}
    assert webhook_id not in world.at_crm()  # the inactive one is torn down


def test_renew_subscribes_again_when_the_secret_is_lost(world: World) -> None:
    if world.crm == "pipedrive":
        pytest.skip("Pipedrive stores no secret")
    world.integration()
    subscription = subscribe(world.store, world.connector(), world.receiver)
    Path(subscription["secretRef"].removeprefix("file:")).unlink()
    assert renew(world.store, world.connector()) is Renewal.RESUBSCRIBED
    fresh = world.store.get_webhook_subscription("it-1")
    assert fresh is not None and resolve_secret(fresh["secretRef"]) == world.secret_at_crm(fresh)
    assert not ids_of(subscription) & world.at_crm()


def test_renew_without_a_subscription_does_nothing(pipedrive_world: World) -> None:
    pipedrive_world.integration()
    assert renew(pipedrive_world.store, pipedrive_world.connector()) is Renewal.NONE
    assert pipedrive_world.at_crm() == set()


# ---- Dagster: the job and the schedule -----------------------------------------------------------
def run_job(world: World, instance: dg.DagsterInstance, name: str, config: dict[str, Any]) -> Any:
    job = defs.get_job_def(name)
    (op,) = job.graph.node_defs
    return job.execute_in_process(
        run_config={"ops": {op.name: {"config": config}}},
        instance=instance,
        resources={"store": StoreResource(uri=world.store_uri)},
        raise_on_error=False,
    )


def evaluate_schedule(world: World, instance: dg.DagsterInstance, name: str) -> Any:
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 3, 1, 10, tzinfo=UTC),
        resources={"store": StoreResource(uri=world.store_uri)},
    )
    return defs.resolve_schedule_def(name)(context)


def test_the_webhooks_job_subscribes_and_subscribes_again(zoho_world: World) -> None:
    world = zoho_world
    world.integration(receiver_url=world.receiver)
    world.integration("no-url")
    with dg.instance_for_test() as instance:
        first = run_job(world, instance, "zoho_webhooks", {"integration_id": "it-1"})
        assert first.success
        subscription = world.store.get_webhook_subscription("it-1")
        assert subscription is not None and ids_of(subscription) <= world.at_crm()
        token = resolve_secret(subscription["secretRef"])
        logged = [str(e) for e in instance.all_logs(first.run_id)]
        assert any("it-1 subscribed at" in e for e in logged)
        assert not any(token in e for e in logged)  # neither in logs nor in metadata
        assert run_job(world, instance, "zoho_webhooks", {"integration_id": "it-1"}).success
        again = world.store.get_webhook_subscription("it-1")
        assert again is not None and not ids_of(subscription) & world.at_crm()

        failed = run_job(world, instance, "zoho_webhooks", {"integration_id": "no-url"})
        assert not failed.success
        (failure,) = [e for e in failed.all_events if e.is_step_failure]
        message = failure.step_failure_data.error.message  # type: ignore[union-attr]
        assert "receiver_url" in message and RECEIVER_URL_ENV in message
        unknown = run_job(world, instance, "zoho_webhooks", {"integration_id": "nope"})
        assert not unknown.success
    person_id = world.change_a_person()
    assert world.delivered("it-1", person_id)["personId"] == person_id


def test_the_renew_schedule_renews_expiring_subscriptions(
    zoho_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = zoho_world
    with dg.instance_for_test() as instance:
        skipped = evaluate_schedule(world, instance, "zoho_renew_webhooks")
        assert isinstance(skipped, dg.SkipReason)  # no Zoho subscription yet

        for integration_id in ("it-1", "it-2"):
            world.integration(integration_id)
        with monkeypatch.context() as patched:
            patched.setattr(zoho, "CHANNEL_TTL", timedelta(hours=3))
            subscribe(world.store, world.connector("it-1"), world.receiver)
        current = subscribe(world.store, world.connector("it-2"), world.receiver)

        request = evaluate_schedule(world, instance, "zoho_renew_webhooks")
        assert isinstance(request, dg.RunRequest)
        assert request.run_key == "zoho:2026-03-01T10:00"
        assert request.job_name in (None, "zoho_renew_webhook_subscriptions")
        result = run_job(world, instance, "zoho_renew_webhook_subscriptions", {})
        assert result.success
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    outcomes = output.step_output_data.metadata["outcomes"].value  # type: ignore[union-attr]
    assert outcomes == {"it-1": "renewed", "it-2": "current"}
    renewed = world.store.get_webhook_subscription("it-1")
    assert renewed is not None
    assert datetime.fromisoformat(renewed["expiresAt"]) - datetime.now(UTC) > timedelta(days=5)
    assert world.store.get_webhook_subscription("it-2") == current  # not due: untouched


def test_the_renew_run_reports_a_failing_integration_and_goes_on(
    pipedrive_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pipedrive_world
    world.integration("it-1")
    world.integration("it-2")
    for integration_id in ("it-1", "it-2"):
        subscribe(world.store, world.connector(integration_id), world.receiver)
    broken = world.store.get_webhook_subscription("it-1")
    assert broken is not None
    world.connector("it-1").teardown_webhooks(broken["details"])  # gone: re-subscribed
    world.store.upsert_integration(
        Integration("it-2", "pipedrive", "env:K", crm_credential_ref="env:UNSET_PD_TOKEN_XYZ")
    )
    with dg.instance_for_test() as instance:
        result = run_job(world, instance, "pipedrive_renew_webhook_subscriptions", {})
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "1 pipedrive webhook subscriptions" in failure.step_failure_data.error.message  # type: ignore[union-attr]
    fresh = world.store.get_webhook_subscription("it-1")
    assert fresh is not None and ids_of(fresh) <= world.at_crm()
    assert not ids_of(broken) & world.at_crm()


def test_crms_without_webhooks_get_no_subscription_jobs() -> None:
    names = {job.name for job in defs.resolve_all_job_defs()}
    assert {"pipedrive_webhooks", "zoho_webhooks", "attio_webhooks"} <= names
    assert not {"axiscare_webhooks", "scalingtest_webhooks"} & names
    schedules = {s.name for s in defs.schedules or []}
    assert "attio_renew_webhooks" in schedules and "axiscare_renew_webhooks" not in schedules


# ---- the CLI -----------------------------------------------------------------------------------
QUO_KEY = "quo-subs-key"


@pytest.fixture
def quo_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[QuoSandbox]:
    """The Quo workspace `integrations add` registers call and message webhooks with."""
    monkeypatch.setenv("QUO_SUBS_KEY", QUO_KEY)
    with QuoSandbox(tmp_path / "quo", api_keys=(QUO_KEY,), rate_limit=None) as sandbox:
        yield sandbox


def cli_add(world: World, integration_id: str, *extra: str, quo: str = "") -> int:
    args = ["integrations", "add", "--store", world.store_uri, "--id", integration_id]
    args += ["--crm", world.crm, "--quo-key-ref", "env:QUO_SUBS_KEY"]
    args += ["--quo-base-url", quo] if quo else []
    args += ["--crm-credential-ref", f"env:{world.crm.upper()}_SUBS_TOKEN"]
    args += ["--setting", f"base_url={world.sim.url}", *extra]
    return main(args)


def test_cli_add_subscribes_and_remove_tears_down(
    pipedrive_world: World,
    quo_sandbox: QuoSandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    world, quo = pipedrive_world, quo_sandbox.url
    with pytest.raises(SystemExit) as refused:
        cli_add(world, "cli-1", quo=quo)
    assert RECEIVER_URL_ENV in str(refused.value) and "--receiver-url" in str(refused.value)
    assert world.store.list_integrations() == []  # not half added

    assert cli_add(world, "cli-1", "--receiver-url", world.receiver, quo=quo) == 0
    assert world.store.get_integration("cli-1").settings["receiver_url"] == world.receiver
    subscription = world.store.get_webhook_subscription("cli-1")
    assert subscription is not None and ids_of(subscription) <= world.at_crm()
    person_id = world.change_a_person()
    assert world.delivered("cli-1", person_id)["personId"] == person_id
    # Quo's call and message webhooks point at the receiver too, their keys kept as secrets.
    quo_hooks = world.store.get_webhook_subscription(activity_queue("cli-1"))
    assert quo_hooks is not None
    with QuoClient(quo, QUO_KEY) as client:
        at_quo = {w["id"] for w in client.list_webhooks()}
    assert {w["id"] for w in quo_hooks["details"]["webhooks"]} == at_quo and len(at_quo) == 4

    monkeypatch.setenv(RECEIVER_URL_ENV, world.receiver)
    assert cli_add(world, "cli-2", quo=quo) == 0
    assert world.store.get_webhook_subscription("cli-2") is not None
    assert cli_add(world, "cli-3", "--no-webhooks", quo=quo) == 0
    assert world.store.get_webhook_subscription("cli-3") is None
    assert world.store.get_webhook_subscription(activity_queue("cli-3")) is None
    capsys.readouterr()

    code = main(["integrations", "remove", "cli-1", "--store", world.store_uri])
    assert code == 0
    out = capsys.readouterr()
    assert "webhooks torn down" in out.out and "removed" in out.out
    assert "Quo webhooks torn down" in out.out
    assert world.store.get_webhook_subscription("cli-1") is None
    assert world.store.get_webhook_subscription(activity_queue("cli-1")) is None
    assert "cli-1" not in {i.id for i in world.store.list_integrations()}
    assert not ids_of(subscription) & world.at_crm()
    with pytest.raises(SystemExit, match="no integration 'nope'"):
        main(["integrations", "remove", "nope", "--store", world.store_uri])


def test_cli_add_reports_a_failed_subscription(
    pipedrive_world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world = pipedrive_world
    fill_webhooks(world, leave=0)
    assert cli_add(world, "cli-1", "--receiver-url", world.receiver) == 1
    err = capsys.readouterr().err
    assert "'cli-1' webhooks: PipedriveApiError" in err and TOKENS["pipedrive"] not in err
    assert world.store.get_integration("cli-1").crm == "pipedrive"  # saved: add it again later
    assert world.store.get_webhook_subscription("cli-1") is None
