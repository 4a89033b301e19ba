"""The local stack behind `quo-sync demo`, the end-to-end tests and the benchmarks: a Quo
sandbox process, the webhook receiver (`quo-sync receiver`) and `dagster dev` (webserver +
daemon) on a persistent Dagster home, and a simulator process per CRM integration, all bound to
127.0.0.1. `crm_people` reads and changes an integration's people as a CRM user would (the
simulator's admin API; ScalingTest's settings), the ground truth of the differential check."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from quo_sync_dagster.activity_check import ActivityCheck, check_activities, phone_holders
from quo_sync_dagster.core.activities import activity_queue
from quo_sync_dagster.core.adoption import AdoptionRules
from quo_sync_dagster.core.external_ids import crm_id_of, namespaced, quo_external_id
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import TERMINAL_STATES, Process, ProcessState
from quo_sync_dagster.crms import connector_class, registered_connectors
from quo_sync_dagster.crms.base import CRMConnector
from quo_sync_dagster.crms.scalingtest import ScalingTestConnector, change
from quo_sync_dagster.differential import Differential, differential
from quo_sync_dagster.orchestration.instance import render_instance_yaml
from quo_sync_dagster.orchestration.polling import needs_full_scan
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.orchestration.tags import TAG_INTEGRATION, TAG_PLANNED
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.quo_server import QuoAdmin
from quo_sync_dagster.sandbox.serving import AdminClient
from quo_sync_dagster.store import Store, open_store
from quo_sync_dagster.webhooks import quo_subscriptions as quo_webhooks
from quo_sync_dagster.webhooks.subscriptions import RECEIVER_URL_ENV, subscribe

LOCATION = "quo_sync_dagster"
SANDBOX_KEY_ENV = "QUO_SYNC_SANDBOX_QUO_KEY"
# The CRM simulators that merge people (crm-apis.md: AxisCare has no merges).
MERGING_SIMULATORS = frozenset({"pipedrive", "zoho", "attio"})
_LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PipelineNotFoundError { message }
  }
}"""
_RUN = """
query($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status tags { key value } } }
}"""
_LOCATION = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
_RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status runConfigYaml } } }
}"""
_LIVE = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")


def legacy_source(crm: str) -> str:
    """The `source` the earlier production sync wrote for `crm`'s contacts."""
    return "axiscare" if crm == "axiscare" else f"openphone-{crm}"


def _crm_token_env(crm: str) -> str:
    return f"QUO_SYNC_SANDBOX_{crm.upper()}_TOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


log = logging.getLogger(__name__)
_STOP_SECONDS = 30.0  # for a process group to end on SIGTERM before it gets SIGKILL
# Runs argv[1:] (by exec: same PID) with SIGINT and SIGTERM reset from "ignored".
_WITH_DEFAULT_SIGNALS = (
    "import os, signal, sys; "
    "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError):  # the group is empty already
        os.killpg(pgid, signum)


def _group_ended(leader: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the group `leader` leads is empty (the leader reaped) by `deadline`."""
    while leader.poll() is None or _group_alive(leader.pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _group_members(pgid: int) -> list[str]:
    """`pid state program` of each process in the group (Linux /proc; nothing elsewhere).
    Only the first arguments: later ones can hold a store URI with a password."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            argv = (entry / "cmdline").read_bytes().split(b"\0")[1:4]
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(group) == pgid:
            program = " ".join(a.decode(errors="replace")[:60] for a in argv)
            members.append(f"{entry.name} {state} {program}")
    return members


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


class LocalStack:
    def __init__(
        self,
        home: Path,
        quo_rate_limit: float | None = 10.0,
        ui_port: int | None = None,
        sandbox_key: str = "quo-sandbox-demo-key",
    ) -> None:
        self.home = home.resolve()
        self.dagster_home = self.home / "dagster"
        self.logs = self.home / "logs"
        self.quo_rate_limit = quo_rate_limit
        self.ui_port = ui_port or free_port()
        self.sandbox_key = sandbox_key
        # A second key for reading Quo from outside the product: its own rate-limit bucket.
        self.observer_key = sandbox_key + "-observer"
        self.sandbox_url = ""
        self.receiver_url = ""
        self.quo = QuoAdmin()  # the sandbox's admin API, once started
        self._procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            SANDBOX_KEY_ENV: sandbox_key,
            # With the sandbox's limit off, the governor should not be the bottleneck either.
            "QUO_SYNC_QUO_RATE": str(quo_rate_limit or 100_000),
        }
        # Everything in the embedded defaults: the store in the Dagster home, no SQS inbox.
        self.env.pop("QUO_SYNC_STORE_URI", None)
        self.env.pop("QUO_SYNC_WEBHOOK_QUEUE_URL", None)
        # Every CRM simulator's token, known to the runs before any simulator starts.
        self.env.update(
            {
                _crm_token_env(name): f"{name}-sandbox-token"
                for name, connector in registered_connectors().items()
                if connector.simulator
            }
        )
        self.store: Store | None = None

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalStack:
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        (self.dagster_home / "dagster.yaml").write_text(render_instance_yaml())
        workspace = self.home / "workspace.yaml"
        workspace.write_text(
            f"load_from:\n  - python_module:\n      module_name: quo_sync_dagster.definitions\n"
            f"      location_name: {LOCATION}\n"
        )
        store_uri = default_store_uri(str(self.dagster_home))
        self.store = open_store(store_uri)
        self._start_sandbox()
        receiver = [sys.executable, "-m", "quo_sync_dagster", "receiver", "--port", "0"]
        self.receiver_url = self._start_server("receiver", [*receiver, "--store", store_uri])
        self.env[RECEIVER_URL_ENV] = self.receiver_url  # for the <crm>_webhooks job
        dagster_dev = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace)]
        self._spawn("dagster", [*dagster_dev, "-h", "127.0.0.1", "-p", str(self.ui_port)])
        _wait("Dagster webserver", self._location_loaded, timeout=180)
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            return self._popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def _popen(self, argv: list[str], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        """`argv` in a session of its own (stop() signals its group), with SIGINT and SIGTERM
        at their defaults: a background job of a non-interactive shell starts with SIGINT
        ignored and passes that on, and Dagster gives SIGTERM SIGINT's handler, so dagster
        dev and all it starts would ignore both and end only on SIGKILL."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _WITH_DEFAULT_SIGNALS, *argv],
            env=self.env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def _start_sandbox(self) -> None:
        args = ["--api-key", self.sandbox_key, "--api-key", self.observer_key]
        args += (
            ["--rate-limit", str(self.quo_rate_limit)]
            if self.quo_rate_limit
            else ["--no-rate-limit"]
        )
        self.sandbox_url = self._start_simulator("quo_sync_dagster.sandbox.quo_server", "quo", args)
        self.quo = QuoAdmin(self.sandbox_url)

    def _start_simulator(self, module: str, name: str, args: list[str]) -> str:
        argv = [sys.executable, "-m", module, "--data-dir", str(self.home / f"{name}-sandbox")]
        return self._start_server(f"{name}-sandbox", [*argv, "--port", "0", *args])

    def _start_server(self, name: str, argv: list[str]) -> str:
        """Start a server process that prints one `..._READY <url>` line once serving; its
        logs go to logs/<name>.log."""
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = self._popen(argv, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        ready, _, url = proc.stdout.readline().decode().strip().partition(" ")
        if not ready.endswith("READY") or not url:
            raise RuntimeError(f"{name} did not start; see {self.logs / f'{name}.log'}")
        return url

    def stop(self) -> None:
        """Stop every process started and everything they started. Each runs in its own
        session, so its process group holds its descendants too (dagster dev's webserver,
        daemon, code servers and run workers): SIGTERM to every group, SIGKILL to what is left
        of one after `_STOP_SECONDS`. A group is waited for until it is empty, not only its
        leader: a leader that exits first would leave its children running."""
        for proc in reversed(self._procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_SECONDS
        for proc in self._procs:
            if not _group_ended(proc, deadline):
                log.warning(
                    "process group %d still ran %.0f s after SIGTERM, killing it: %s",
                    proc.pid,
                    _STOP_SECONDS,
                    "; ".join(_group_members(proc.pid)) or "no member listed",
                )
                _signal_group(proc.pid, signal.SIGKILL)
                _group_ended(proc, time.monotonic() + _STOP_SECONDS)
        self._procs.clear()
        self.quo.close()
        if self.store:
            self.store.close()

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:  # what did start must not outlive it
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- Dagster, through GraphQL as the UI does -----------------------------------------------
    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(
            f"{self.ui_url}/graphql",
            json={"query": query, "variables": variables or {}},
            timeout=60,
        )
        if response.status_code != 200 or "errors" in response.json():
            raise RuntimeError(f"GraphQL {response.status_code}: {response.text[:500]}")
        return response.json()["data"]

    def _location_loaded(self) -> bool:
        try:
            data = self.graphql(_LOCATION)["workspaceOrError"]
        except (httpx.HTTPError, KeyError, TypeError):
            return False
        for entry in data.get("locationEntries", []):
            loaded = entry["locationOrLoadError"]
            if entry["name"] == LOCATION and loaded:
                if loaded["__typename"] == "PythonError":
                    raise RuntimeError(f"code location failed to load: {loaded['message']}")
                return True
        return False

    def stop_sensor(self, name: str) -> None:
        """Turn a sensor off, as its toggle in the UI does (benchmarks measure without it)."""
        selector = {
            "repositoryLocationName": "quo_sync_dagster",
            "repositoryName": "__repository__",
            "sensorName": name,
        }
        sensor = self.graphql(_SENSOR, {"selector": selector})["sensorOrError"]
        stopped = self.graphql(_STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]["__typename"]
        if stopped != "StopSensorMutationResult":
            raise RuntimeError(f"could not stop {name}: {stopped}")

    def launch(self, job: str, run_config: dict[str, Any]) -> str:
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": "__repository__",
                "jobName": job,
            },
            "runConfigData": run_config,
        }
        result = self.graphql(_LAUNCH, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"launching {job} failed: {result}")
        return result["run"]["runId"]

    def wait_run(self, run_id: str, timeout: float = 600) -> dict[str, str]:
        """Tags of the finished run; raises if it did not succeed."""

        def finished() -> dict[str, Any] | None:
            run = self.graphql(_RUN, {"runId": run_id})["runOrError"]
            return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

        run = _wait(f"run {run_id}", finished, timeout)
        if run["status"] != "SUCCESS":
            raise RuntimeError(
                f"run {run_id} ended {run['status']}; see {self.ui_url}/runs/{run_id}"
            )
        return {t["key"]: t["value"] for t in run["tags"]}

    # ---- the sync ------------------------------------------------------------------------
    def register_integration(
        self,
        integration_id: str,
        crm: str,
        records: int,
        settings: dict[str, Any] | None = None,
        webhooks: bool = False,
        activities: bool = False,
    ) -> Integration:
        """An integration of `crm` against its own simulator process (holding `records`
        people), or, for a CRM without one (ScalingTest), with `records` in its settings.
        With `webhooks`, a CRM that has them is subscribed to the receiver; with
        `activities`, the Quo sandbox's call and message webhooks are."""
        assert self.store is not None
        connector_cls = connector_class(crm)
        settings = dict(settings or {})
        credential_ref = None
        if connector_cls.simulator:
            args = ["--records", str(records), "--token", _crm_token(crm)]
            name = f"{crm}-{integration_id}"
            settings["base_url"] = self._start_simulator(connector_cls.simulator, name, args)
            credential_ref = f"env:{_crm_token_env(crm)}"
        else:
            settings["records"] = records
            # Its activities, where every run process (and the demo's check) sees them.
            settings.setdefault("activity_db", str(self.home / f"{integration_id}-activities.db"))
        integration = Integration(
            id=integration_id,
            crm=crm,
            quo_api_key_ref=f"env:{SANDBOX_KEY_ENV}",
            quo_base_url=self.sandbox_url,
            crm_credential_ref=credential_ref,
            settings=settings,
        )
        self.store.upsert_integration(integration)
        if webhooks and connector_cls.crm_config.sync_config.supports_webhooks:
            with closing(connector_cls(integration, _crm_token(crm))) as connector:
                subscribe(self.store, connector, self.receiver_url)
        if activities:
            with QuoClient(self.sandbox_url, self.sandbox_key) as quo:
                quo_webhooks.subscribe(self.store, integration, quo, self.receiver_url)
        return integration

    def prefill_legacy(self, integration_id: str, count: int, stale: int = 0) -> int:
        """Fill the Quo sandbox as an earlier sync left it: the contact it wrote for each of
        the integration's first `count` people Quo can take, under the integration's first
        `legacy_sources` and its `legacy_external_id`; `stale` of them, spread evenly, with
        values the CRM has changed since. Returns how many contacts were put in."""
        assert self.store is not None
        rules = AdoptionRules.from_settings(self.store.get_integration(integration_id).settings)
        bodies: list[dict[str, Any]] = []
        with self.crm_people(integration_id) as people, closing(people.connector()) as connector:
            for object_type, record in people.people():
                if len(bodies) == count:
                    break
                try:  # its transform is the CRM id scheme the earlier sync used too
                    contact = connector.transform_person_to_quo(record, object_type)
                except Exception:  # a person the earlier sync could not write either
                    continue
                external_id = rules.legacy_id(connector.earlier_key(contact.external_id))
                if external_id is not None:
                    source = rules.legacy_sources[0]
                    bodies.append(
                        contact.to_api_body() | {"source": source, "externalId": external_id}
                    )
        step = max(len(bodies) // stale, 1) if stale else 1
        for body in bodies[::step][:stale]:  # spread over the people
            fields = body["defaultFields"]
            fields["lastName"] = f"{fields['lastName'] or ''} (before)".strip()
            fields["company"] = "Earlier Co"
        self.quo.prefill_contacts(bodies)
        return len(bodies)

    def run_initial_sync(self, crm: str, config: dict[str, Any]) -> list[str]:
        """Launch the initial-sync job and return the ids of the Processes it planned."""
        run_id = self.launch(
            f"{crm}_initial_sync", {"ops": {f"{crm}_plan_initial_sync": {"config": config}}}
        )
        return self.wait_run(run_id)[TAG_PLANNED].split(",")

    def run_poll(self, crm: str, config: dict[str, Any]) -> list[str]:
        """Launch one polling cycle (`<crm>_poll`) and return the ids of its Processes (none
        when a cycle of the integration was still at work)."""
        run_id = self.launch(f"{crm}_poll", {"ops": {f"{crm}_plan_poll": {"config": config}}})
        return [pid for pid in self.wait_run(run_id).get(TAG_PLANNED, "").split(",") if pid]

    def poll_cycle(self, integration_id: str) -> tuple[list[Process], str]:
        """One polling cycle of the integration, as a full scan where the poll would list only
        the people modified since its watermark (which cannot show a deletion): its Processes
        once closed, and how it listed people."""
        assert self.store is not None
        integration = self.store.get_integration(integration_id)
        config: dict[str, Any] = {"integration_id": integration_id}
        why = needs_full_scan(
            connector_class(integration.crm), integration, self.store, datetime.now(UTC)
        )
        if why is None:
            config["full_scan"] = True
            why = "asked for: a poll of changes since the watermark cannot see deletions"
        planned = self.run_poll(integration.crm, config) or [
            p.id  # the schedule's cycle was at work already: that one, then
            for p in self.store.list_processes(integration_id=integration_id, states=_OPEN)
            if p.context.get("syncType") == "ONGOING"
        ]
        return self.wait_processes(planned), f"full scan ({why})"

    def wait_first_page(self, process_ids: list[str], timeout: float = 600) -> bool:
        """Until a page of the Processes is synced: True, or False if they closed first."""
        assert self.store is not None
        store = self.store

        def synced() -> str | None:
            processes = [store.get_process(pid) for pid in process_ids]
            if any(store.page_results(p.id) for p in processes):
                return "synced"
            return "closed" if all(p.state in TERMINAL_STATES for p in processes) else None

        return _wait("a synced page", synced, timeout, interval=0.1) == "synced"

    def wait_processes(
        self,
        process_ids: list[str],
        on_progress: Callable[[list[Process]], None] = lambda _: None,
        timeout: float = 3600,
    ) -> list[Process]:
        assert self.store is not None
        store = self.store

        def closed() -> list[Process] | None:
            processes = [store.get_process(pid) for pid in process_ids]
            on_progress(processes)
            return processes if all(p.state in TERMINAL_STATES for p in processes) else None

        return _wait("sync processes", closed, timeout, interval=1.0)

    def sandbox_stats(self) -> dict[str, Any]:
        return self.quo.stats()

    def quo_contacts(self, integration: Integration) -> list[dict[str, Any]]:
        """The integration's contacts in Quo (read with the observer key)."""
        source = connector_class(integration.crm).quo_source
        with QuoClient(self.sandbox_url, self.observer_key) as quo:
            return [
                c
                for c in quo.iter_contacts(source)
                if crm_id_of(integration, c.get("externalId") or "") is not None
            ]

    # ---- people, webhooks ------------------------------------------------------------------
    def crm_people(self, integration_id: str) -> CrmPeople:
        assert self.store is not None
        integration = self.store.get_integration(integration_id)
        if connector_class(integration.crm).simulator:
            return SimulatorPeople(self.store, integration_id)
        return SettingsPeople(self.store, integration_id)

    def differential(self, integration_id: str) -> Differential:
        """Quo against the CRM now (the CRM read first: a change in between shows as stale)."""
        with self.crm_people(integration_id) as people:
            crm_now = people.people()
            with closing(people.connector()) as connector:
                return differential(connector, crm_now, self.quo_contacts(people.integration))

    def webhook_runs(self, integration: Integration) -> list[dict[str, Any]]:
        """The integration's `<crm>_webhook_sync` runs: runId, status, itemIds."""
        return self._inbox_runs(f"{integration.crm}_webhook_sync", integration)

    def activity_runs(self, integration: Integration) -> list[dict[str, Any]]:
        """The integration's `<crm>_log_activities` runs: runId, status, itemIds."""
        return self._inbox_runs(f"{integration.crm}_log_activities", integration)

    def _inbox_runs(self, job: str, integration: Integration) -> list[dict[str, Any]]:
        filter_ = {
            "pipelineName": job,
            "tags": [{"key": TAG_INTEGRATION, "value": integration.id}],
        }
        runs = self.graphql(_RUNS, {"filter": filter_})["runsOrError"]["results"]
        for run in runs:
            ops = yaml.safe_load(run.pop("runConfigYaml") or "{}").get("ops", {})
            run["itemIds"] = [i for op in ops.values() for i in op["config"]["item_ids"]]
        return runs

    def webhooks_applied(self, integration: Integration) -> bool:
        """Every delivery the simulator sent is in the inbox, and every inbox item of the
        integration was applied by a webhook run (none waiting, none in a live run)."""
        with AdminClient(integration.settings["base_url"]) as simulator:
            return self._settled(simulator, integration.id, self.webhook_runs(integration))

    def activities_logged(self, integration: Integration) -> bool:
        """The same for the Quo sandbox's call and message events and the activity runs."""
        return self._settled(
            self.quo, activity_queue(integration.id), self.activity_runs(integration)
        )

    def _settled(self, sender: AdminClient, queue: str, runs: list[dict[str, Any]]) -> bool:
        assert self.store is not None
        sent = sender.deliveries()
        if sent["pending"] or sent["held"] or self.store.webhook_backlog(queue):
            return False
        return not any(r["status"] in _LIVE for r in runs)

    def wait_webhooks_applied(self, integration: Integration, timeout: float = 300) -> None:
        _wait(
            f"webhooks of {integration.id}",
            self._twice(self.webhooks_applied, integration),
            timeout,
        )

    def wait_activities_logged(self, integration: Integration, timeout: float = 300) -> None:
        _wait(
            f"activities of {integration.id}",
            self._twice(self.activities_logged, integration),
            timeout,
        )

    @staticmethod
    def _twice(
        check: Callable[[Integration], bool], integration: Integration
    ) -> Callable[[], bool]:
        """`check` holding twice in a row, a sensor tick apart: items a sensor has just claimed
        are in no run yet for a moment."""

        def settled() -> bool:
            if not check(integration):
                return False
            time.sleep(_SENSOR_TICK_SECONDS)
            return check(integration)

        return settled

    def crm_activities(self, integration: Integration) -> list[dict[str, Any]]:
        """What the CRM holds as activities: `{id, kind, person (record key), subject, body}`
        from the simulator's `GET /_sandbox/activities`, or ScalingTest's activity log."""
        connector_cls = connector_class(integration.crm)
        if not connector_cls.simulator:
            with closing(connector_cls(integration, None)) as connector:
                return connector.activities()  # type: ignore[attr-defined]
        with AdminClient(integration.settings["base_url"]) as simulator:
            return simulator.activities()

    def activity_check(self, integration: Integration) -> ActivityCheck:
        """The Quo sandbox's simulated calls and messages against the CRM's activities."""
        assert self.store is not None
        return check_activities(
            self.quo.simulated_calls(),
            self.quo.simulated_messages(),
            phone_holders(self.store, integration),
            self.crm_activities(integration),
        )


_OPEN = [state for state in ProcessState if state not in TERMINAL_STATES]
_SENSOR = """
query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { id } } }"""
_STOP_SENSOR = "mutation($id: String!) { stopSensor(id: $id) { __typename } }"
_SENSOR_TICK_SECONDS = 6  # the daemon evaluates a sensor about every 5 s


def _crm_token(crm: str) -> str:
    return f"{crm}-sandbox-token"


# ---- an integration's people, changed as a CRM user changes them -------------------------------
@dataclass
class ChangeLog:
    """The changes made to a CRM: how many of each, and how many touched each person (by the
    namespaced externalId of every person a change created, changed, deleted or merged)."""

    ops: Counter[str] = field(default_factory=Counter)
    touched: Counter[str] = field(default_factory=Counter)
    made_at: list[tuple[float, str, str]] = field(default_factory=list)  # (time, op, ext id)

    def add(self, op: str, *external_ids: str) -> None:
        self.ops[op] += 1
        now = time.time()
        for ext in external_ids:
            self.touched[ext] += 1
            self.made_at.append((now, op, ext))


class CrmPeople(ABC):
    """One integration's people as its CRM holds them now. A change is made as a user makes
    it (a webhook CRM's simulator then sends its webhooks). Records are in the shape the
    connector reads them, so `connector()` transforms them as the sync does."""

    merges = False

    def __init__(self, store: Store, integration_id: str) -> None:
        self.store, self.integration_id = store, integration_id
        integration = self.integration
        self.object_types = connector_class(integration.crm).object_types_for(integration.settings)

    @property
    def integration(self) -> Integration:
        return self.store.get_integration(self.integration_id)

    def close(self) -> None:
        """Release what reading and changing the people holds (HTTP clients)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connector(self) -> CRMConnector:
        """A connector for transforms and ids, with the simulator's credential: a page's
        transforms read what they need beside it (prepare_page). The caller closes it."""
        integration = self.integration
        cls = connector_class(integration.crm)
        return cls(integration, _crm_token(cls.name) if cls.simulator else None)

    def external_id(self, object_type: str, record: dict[str, Any]) -> str:
        key = self.connector().record_key(record, object_type)
        return quo_external_id(self.integration, key)

    def syncable(self, people: list[tuple[str, dict[str, Any]]] | None = None) -> set[str]:
        """externalIds of the people (default: all now) that Quo can take: those the sync's
        transform accepts."""
        connector, found = self.connector(), set()
        for object_type, record in self.people() if people is None else people:
            try:
                contact = connector.transform_person_to_quo(record, object_type)
            except Exception:  # refused: the sync counts the person as failed or skipped
                continue
            found.add(namespaced(contact, connector.integration).external_id)
        return found

    @abstractmethod
    def people(self) -> list[tuple[str, dict[str, Any]]]:
        """(object type, record) of every current person."""

    @abstractmethod
    def create(self, object_type: str) -> dict[str, Any]: ...

    @abstractmethod
    def update(self, object_type: str, record: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def delete(self, object_type: str, record: dict[str, Any]) -> None: ...

    def merge(
        self, object_type: str, record: dict[str, Any], into: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge `record` into `into`; the survivor (Attio: a new record replacing both)."""
        raise NotImplementedError(f"{self.integration.crm} has no merges")

    def random_changes(self, count: int, rng: random.Random, log: ChangeLog) -> None:
        """`count` random creates, updates, deletes (and merges where the CRM has them): one
        of each kind first, while `count` allows."""
        kinds = ["create", "update", "delete", *(["merge"] if self.merges else [])]
        ops = kinds[:count] + rng.choices(kinds, [3, 4, 2, 1][: len(kinds)], k=count - len(kinds))
        alive = self.people()
        for op in ops:
            if op == "create":
                object_type = rng.choice(self.object_types)
                record = self.create(object_type)
                alive.append((object_type, record))
                log.add(op, self.external_id(object_type, record))
                continue
            index = rng.randrange(len(alive))
            object_type, record = alive[index]
            ext = self.external_id(object_type, record)
            if op == "update":
                alive[index] = (object_type, self._update(object_type, record, log))
            elif op == "delete":
                self.delete(object_type, alive.pop(index)[1])
                log.add(op, ext)
            else:
                same = [i for i, (t, _) in enumerate(alive) if t == object_type and i != index]
                survivor_index = rng.choice(same)
                into = alive[survivor_index][1]
                into_ext = self.external_id(object_type, into)
                merged = self.merge(object_type, record, into)
                merged_ext = self.external_id(object_type, merged)
                for i in sorted((index, survivor_index), reverse=True):
                    alive.pop(i)
                alive.append((object_type, merged))
                log.add(op, *dict.fromkeys([ext, into_ext, merged_ext]))

    def _update(self, object_type: str, record: dict[str, Any], log: ChangeLog) -> dict[str, Any]:
        """A generated change; made again (a few times at most) while it leaves a person Quo
        took with nothing Quo can take (a generated phone the transform refuses): what Quo
        should hold for such a person is a question these changes do not ask."""
        ext, took = self.external_id(object_type, record), self.syncable([(object_type, record)])
        for _ in range(_UPDATE_TRIES):
            record = self.update(object_type, record)
            log.add("update", ext)
            if not took or self.syncable([(object_type, record)]):
                break
        return record


_UPDATE_TRIES = 5


class SimulatorPeople(CrmPeople):
    """A CRM simulator's people, through its admin API (`/_sandbox/people`)."""

    def __init__(self, store: Store, integration_id: str) -> None:
        super().__init__(store, integration_id)
        self.merges = self.integration.crm in MERGING_SIMULATORS
        self.admin = AdminClient(self.integration.settings["base_url"])

    def close(self) -> None:
        self.admin.close()

    def _kind(self, object_type: str) -> str | None:
        return object_type if len(self.object_types) > 1 else None

    def _id(self, object_type: str, record: dict[str, Any]) -> str:
        return self.connector().person_id(record)

    def people(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t, r) for t in self.object_types for r in self.admin.people(self._kind(t))]

    def create(self, object_type: str) -> dict[str, Any]:
        return self.admin.create_person(kind=self._kind(object_type))

    def update(self, object_type: str, record: dict[str, Any]) -> dict[str, Any]:
        pid = self._id(object_type, record)
        return self.admin.update_person(pid, kind=self._kind(object_type))

    def delete(self, object_type: str, record: dict[str, Any]) -> None:
        self.admin.delete_person(self._id(object_type, record), self._kind(object_type))

    def merge(
        self, object_type: str, record: dict[str, Any], into: dict[str, Any]
    ) -> dict[str, Any]:
        pid, into_id = self._id(object_type, record), self._id(object_type, into)
        return self.admin.merge_people(pid, into_id, self._kind(object_type))


class SettingsPeople(CrmPeople):
    """ScalingTest's people: changes go into the integration's `changes` setting
    (crms/scalingtest.py), which every run reads."""

    def _save(self, op: str, i: int) -> dict[str, Any]:
        integration = self.integration
        settings = change(integration.settings, op, i)
        self.store.upsert_integration(replace(integration, settings=settings))
        return ScalingTestConnector(self.integration).person(i)

    def people(self) -> list[tuple[str, dict[str, Any]]]:
        (object_type,) = self.object_types
        page = self.connector().fetch_person_page(object_type, 0, 10**9, None, False)
        return [(object_type, record) for record in page.records]

    def create(self, object_type: str) -> dict[str, Any]:
        settings = self.integration.settings
        known = [int(settings.get("records", 0)) - 1]
        known += [int(c["i"]) for c in settings.get("changes") or ()]
        return self._save("create", max(known) + 1)

    def update(self, object_type: str, record: dict[str, Any]) -> dict[str, Any]:
        return self._save("update", _index(record))

    def delete(self, object_type: str, record: dict[str, Any]) -> None:
        self._save("delete", _index(record))


def _index(record: dict[str, Any]) -> int:
    return int(str(record["id"]).removeprefix("st-"))
