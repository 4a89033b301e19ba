"""The launchpad: per-integration jobs open with a registered integration of their CRM (read from
the store when the code location loads, never breaking the load), an unknown id fails the run
naming the registered ones, and Quo's rate and concurrency are no run config but QuoSettings
from the environment, which an integration's `quo_requests_per_second` may lower."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.snap import JobSnap
from dagster_graphql.schema.run_config import default_values_yaml_from_type_snap

from quo_sync_dagster.cli import main
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster.definitions import defs as product_defs
from quo_sync_dagster.orchestration import launchpad
from quo_sync_dagster.orchestration.activity_sync import build_activity_definitions
from quo_sync_dagster.orchestration.factory import build_crm_definitions
from quo_sync_dagster.orchestration.reconcile import build_reconcile_definitions
from quo_sync_dagster.orchestration.resources import (
    PageFramesIOManager,
    QuoResource,
    QuoSettings,
    StoreResource,
)
from quo_sync_dagster.quo.governor import RateGovernor, governor_key
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster_tests.pipeline import Pipeline, add_integration, launch_initial_sync

# Jobs an operator launches for one integration: (job, op) per CRM.
LAUNCHED = ["initial_sync", "poll", "reconcile"]
WEBHOOK_LAUNCHED = ["webhooks"]
QUO_FIELDS = {"requests_per_second", "concurrency", "timeout_seconds", "max_attempts"}


@pytest.fixture(autouse=True)
def _own_instance() -> Iterator[None]:
    """Definitions built here resolve against this test's instance, never one an earlier test
    left current (Dagster keeps the entered instance's state storage in a context variable)."""
    with dg.instance_for_test():
        yield


def _store_with_integrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store (the default one, through QUO_SYNC_STORE_URI) with integrations of three CRMs."""
    uri = f"sqlite:///{tmp_path}/store.sqlite"
    monkeypatch.setenv("QUO_SYNC_STORE_URI", uri)
    store = open_store(uri)
    ids = {"pipedrive": ["pd-b", "pd-a"], "zoho": ["zo-1"]}
    ids["scalingtest"] = [f"st-{n:02d}" for n in range(25)]
    for crm, crm_ids in ids.items():
        for integration_id in crm_ids:
            store.upsert_integration(
                Integration(id=integration_id, crm=crm, quo_api_key_ref="env:SECRET_KEY_REF")
            )
    return store


def _defs(crm: str) -> dg.Definitions:
    """`crm`'s definitions as definitions.py builds them, with the shared resources."""
    connector_cls = connector_class(crm)
    return dg.Definitions.merge(
        build_crm_definitions(connector_cls),
        build_activity_definitions([connector_cls]),
        dg.Definitions(
            resources={
                "store": StoreResource(),
                "quo": QuoResource(),
                "page_frames": PageFramesIOManager(),
            }
        ),
    )


def _launchpad_yaml(job: dg.JobDefinition) -> str:
    """What the launchpad opens with: the webserver's rootDefaultYaml of the job."""
    snap = JobSnap.from_job_def(job)
    schema = snap.config_schema_snapshot
    root = schema.get_config_snap(snap.mode_def_snaps[0].root_config_key)
    return default_values_yaml_from_type_snap(schema, root)


def _integration_field(job: dg.JobDefinition) -> dg.Field:
    (node,) = job.graph.nodes
    return node.definition.config_schema.config_type.fields["integration_id"]


def test_launched_jobs_open_with_a_registered_integration_of_their_crm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_with_integrations(tmp_path, monkeypatch)
    started = time.perf_counter()
    pipedrive = _defs("pipedrive")
    assert time.perf_counter() - started < 10  # one cheap read of the store
    for name in LAUNCHED + WEBHOOK_LAUNCHED:
        job = pipedrive.resolve_job_def(f"pipedrive_{name}")
        # Valid without any input: the first pipedrive integration by id is the default.
        resolved = dg.validate_run_config(job, {})
        (op_config,) = resolved["ops"].values()
        assert op_config["config"]["integration_id"] == "pd-a", name
        assert "integration_id: pd-a" in _launchpad_yaml(job), name
        description = _integration_field(job).description
        assert "Registered pipedrive integrations: pd-a, pd-b." in description, name
        assert "zo-1" not in description and "quo-sync integrations add --crm pipedrive" in (
            description
        )
    # Inbox runs list the integrations but must be told which one (with the claimed items).
    for name in ("webhook_sync", "log_activities"):
        field = _integration_field(pipedrive.resolve_job_def(f"pipedrive_{name}"))
        assert field.is_required and "pd-a, pd-b" in field.description

    zoho = _defs("zoho").resolve_job_def("zoho_initial_sync")
    assert (
        dg.validate_run_config(zoho, {})["ops"]["zoho_plan_initial_sync"]["config"][
            "integration_id"
        ]
        == "zo-1"
    )
    # Past 20 integrations the list says how many more.
    many = _integration_field(_defs("scalingtest").resolve_job_def("scalingtest_initial_sync"))
    assert "st-00, st-01" in many.description and "st-19 and 5 more." in many.description
    assert many.default_value == "st-00" and "st-20" not in many.description


@pytest.mark.parametrize("store", ["missing", "unreadable", "unreachable_mongo"])
def test_without_a_readable_store_the_definitions_load_with_no_default(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "home" / "quo_sync.sqlite"
    uri = f"sqlite:///{path}"
    if store == "unreadable":
        path.parent.mkdir()
        path.write_bytes(b"not a SQLite database " * 100)
    elif store == "unreachable_mongo":
        monkeypatch.setattr(launchpad, "READ_TIMEOUT_SECONDS", 0.3)
        uri = "mongodb://127.0.0.1:9/?directConnection=true"  # nothing listens on port 9
    monkeypatch.setenv("QUO_SYNC_STORE_URI", uri)
    caplog.set_level(logging.WARNING, logger=launchpad.__name__)
    started = time.perf_counter()
    job = _defs("pipedrive").resolve_job_def("pipedrive_initial_sync")
    assert time.perf_counter() - started < 10

    field = _integration_field(job)
    assert field.is_required  # no default: the launchpad asks for the id
    with pytest.raises(dg.DagsterInvalidConfigError, match="integration_id"):
        dg.validate_run_config(job, {})
    if store == "missing":
        assert "No pipedrive integration is registered yet." in field.description
        assert not path.exists() and not path.parent.exists()  # the load created nothing
        assert not caplog.records
    else:
        assert "could not be read" in field.description
        (warning,) = caplog.records
        assert "could not read the integrations" in warning.getMessage()
        assert "127.0.0.1:9" not in warning.getMessage()  # the URI may hold a password


def test_no_job_has_quo_rate_knobs_in_its_run_config() -> None:
    for job in product_defs.resolve_all_job_defs():
        resources = job.run_config_schema.config_type.fields["resources"].config_type
        quo = resources.fields["quo"].config_type.fields["config"].config_type
        assert not set(quo.fields) & QUO_FIELDS, job.name
        assert not any(name in _launchpad_yaml(job) for name in QUO_FIELDS), job.name


def test_quo_settings_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    assert QuoSettings.from_env({}) == QuoSettings(10.0, 4, 30.0, 6)  # Quo's limit, as before
    assert QuoSettings.from_env({"QUO_SYNC_QUO_RATE": " "}) == QuoSettings()  # empty: unset
    assert QuoSettings.from_env(
        {
            "QUO_SYNC_QUO_RATE": "2.5",
            "QUO_SYNC_QUO_CONCURRENCY": "8",
            "QUO_SYNC_QUO_TIMEOUT": "12",
            "QUO_SYNC_QUO_MAX_ATTEMPTS": "3",
        }
    ) == QuoSettings(2.5, 8, 12.0, 3)
    for name, value, expected in [
        ("QUO_SYNC_QUO_RATE", "fast", "a number > 0"),
        ("QUO_SYNC_QUO_RATE", "0", "a number > 0"),
        ("QUO_SYNC_QUO_RATE", "nan", "a number > 0"),
        ("QUO_SYNC_QUO_TIMEOUT", "-1", "a number > 0"),
        ("QUO_SYNC_QUO_CONCURRENCY", "2.5", "a whole number >= 1"),
        ("QUO_SYNC_QUO_MAX_ATTEMPTS", "0", "a whole number >= 1"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}='{value}' must be {expected}$"):
            QuoSettings.from_env({name: value})


def test_a_bad_quo_variable_fails_the_run_naming_it(
    p: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_integration(p, "scalingtest", {"records": 10}, "st-1")
    monkeypatch.setenv("QUO_SYNC_QUO_RATE", "ten")
    result = launch_initial_sync(p, "scalingtest", {"integration_id": "st-1"}, False)
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "QUO_SYNC_QUO_RATE='ten' must be a number > 0" in failure.step_failure_data.error.message


def test_an_unknown_integration_fails_the_run_naming_it_the_crm_and_the_registered_ones(
    p: Pipeline,
) -> None:
    for integration_id in ("pd-b", "pd-a"):
        add_integration(p, "pipedrive", {}, integration_id)
    add_integration(p, "zoho", {}, "zo-1")
    reconcile = dg.Definitions.merge(
        build_reconcile_definitions(connector_class("pipedrive")),
        dg.Definitions(resources={k: p.resources[k] for k in ("store", "quo")}),
    ).resolve_job_def("pipedrive_reconcile")
    registered = "registered: pd-a, pd-b; add one with `quo-sync integrations add --crm pipedrive`"
    for integration_id, why in [
        ("nope", f"integration 'nope' is not registered for pipedrive; {registered}"),
        ("zo-1", f"integration 'zo-1' is a zoho integration, not pipedrive; {registered}"),
    ]:
        initial = launch_initial_sync(p, "pipedrive", {"integration_id": integration_id}, False)
        reconciled = reconcile.execute_in_process(
            run_config={
                "ops": {
                    "pipedrive_reconcile_contacts": {"config": {"integration_id": integration_id}}
                }
            },
            instance=p.instance,
            raise_on_error=False,
        )
        for result in (initial, reconciled):
            assert not result.success
            (failure,) = [e for e in result.all_events if e.is_step_failure]
            message = failure.step_failure_data.error.message
            assert why in message and "SECRET" not in message and "env:" not in message


def test_quo_requests_per_second_lowers_the_governor_rate_never_raises_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite")
    monkeypatch.setenv("QUO_SYNC_QUO_RATE", "20")
    for name in ("KEY_SLOW", "KEY_CAPPED", "KEY_PLAIN"):
        monkeypatch.setenv(name, name.lower())

    def interval(key: str, settings: dict[str, float]) -> float:
        """The spacing the integration's client governor gives its requests on the key's
        shared schedule (as the store holds it)."""
        integration = Integration(
            id=key, crm="scalingtest", quo_api_key_ref=f"env:{key}", settings=settings
        )
        with QuoResource().client(integration, store) as client:
            governor = client._http._throttle
            assert isinstance(governor, RateGovernor)

            def next_at() -> float:
                return store.update_governor(governor_key(key.lower()), lambda s: (s, s.next_at))

            governor.acquire()  # the first slot is free
            first = next_at()
            governor.acquire()  # takes the next slot, one interval later
            return next_at() - first

    assert interval("KEY_SLOW", {"quo_requests_per_second": 4}) == pytest.approx(0.25, abs=1e-6)
    # Above the deployment's rate (Quo's limit per key) the setting changes nothing.
    assert interval("KEY_CAPPED", {"quo_requests_per_second": 1000}) == pytest.approx(
        0.05, abs=1e-6
    )
    assert interval("KEY_PLAIN", {}) == pytest.approx(0.05, abs=1e-6)
    # A bad setting is the client's error, naming it (a run fails on it without retries).
    integration = Integration(
        id="x", crm="scalingtest", quo_api_key_ref="env:KEY_PLAIN", settings={}
    )
    for bad in (0, -2, "fast", True):
        bad_one = replace(integration, settings={"quo_requests_per_second": bad})
        with pytest.raises(
            ValueError, match=r"setting quo_requests_per_second .* must be a number > 0"
        ):
            QuoResource().client(bad_one, store)


def test_a_bad_quo_requests_per_second_is_refused_when_added(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/s.sqlite"
    args = ["integrations", "add", "--store", uri, "--id", "a", "--crm", "scalingtest"]
    args += ["--quo-key-ref", "env:K", "--setting", "quo_requests_per_second=0"]
    with pytest.raises(
        SystemExit, match="integration 'a': setting quo_requests_per_second 0 must be a number > 0"
    ):
        main(args)
    assert open_store(uri).list_integrations() == []
    assert main([*args[:-1], "quo_requests_per_second=2.5"]) == 0
    assert open_store(uri).get_integration("a").settings == {"quo_requests_per_second": 2.5}
