"""The local stack behind `quo-sync demo` and the benchmarks: a Quo sandbox process and
`dagster dev` (webserver + daemon) on a persistent Dagster home, all bound to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import TERMINAL_STATES, Process
from quo_sync_dagster.crms import connector_class, registered_connectors
from quo_sync_dagster.orchestration.factory import TAG_PLANNED
from quo_sync_dagster.orchestration.instance import render_instance_yaml
from quo_sync_dagster.orchestration.resources import default_store_uri
from quo_sync_dagster.store import Store, open_store

LOCATION = "quo_sync_dagster"
SANDBOX_KEY_ENV = "QUO_SYNC_SANDBOX_QUO_KEY"
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


def _crm_token_env(crm: str) -> str:
    return f"QUO_SYNC_SANDBOX_{crm.upper()}_TOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.sandbox_url = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            SANDBOX_KEY_ENV: sandbox_key,
            # With the sandbox's limit off, the governor should not be the bottleneck either.
            "QUO_SYNC_QUO_RATE": str(quo_rate_limit or 100_000),
        }
        self.env.pop("QUO_SYNC_STORE_URI", None)
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
        self.store = open_store(default_store_uri(str(self.dagster_home)))
        self._start_sandbox()
        dagster_dev = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace)]
        self._spawn("dagster", [*dagster_dev, "-h", "127.0.0.1", "-p", str(self.ui_port)])
        _wait("Dagster webserver", self._location_loaded, timeout=180)
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._procs.append(proc)
        return proc

    def _start_sandbox(self) -> None:
        args = ["--api-key", self.sandbox_key]
        args += (
            ["--rate-limit", str(self.quo_rate_limit)]
            if self.quo_rate_limit
            else ["--no-rate-limit"]
        )
        self.sandbox_url = self._start_simulator("quo_sync_dagster.sandbox.quo_server", "quo", args)

    def _start_simulator(self, module: str, name: str, args: list[str]) -> str:
        """Start a simulator process; it prints one `..._READY <url>` line once serving."""
        argv = [sys.executable, "-m", module, "--data-dir", str(self.home / f"{name}-sandbox")]
        proc = subprocess.Popen(
            [*argv, "--port", "0", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._procs.append(proc)
        assert proc.stdout is not None
        ready, _, url = proc.stdout.readline().decode().strip().partition(" ")
        if not ready.endswith("READY") or not url:
            raise RuntimeError(f"simulator {module} did not start")
        return url

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        if self.store:
            self.store.close()

    def __enter__(self) -> LocalStack:
        return self.start()

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
        self, integration_id: str, crm: str, records: int, settings: dict[str, Any] | None = None
    ) -> Integration:
        """An integration of `crm` against its local simulator (holding `records` people), or,
        for a CRM without one (ScalingTest), with `records` in its settings."""
        assert self.store is not None
        connector = connector_class(crm)
        settings = dict(settings or {})
        credential_ref = None
        if connector.simulator:
            token = f"{crm}-sandbox-token"
            args = ["--records", str(records), "--token", token]
            settings["base_url"] = self._start_simulator(connector.simulator, crm, args)
            credential_ref = f"env:{_crm_token_env(crm)}"
        else:
            settings["records"] = records
        integration = Integration(
            id=integration_id,
            crm=crm,
            quo_api_key_ref=f"env:{SANDBOX_KEY_ENV}",
            quo_base_url=self.sandbox_url,
            crm_credential_ref=credential_ref,
            settings=settings,
        )
        self.store.upsert_integration(integration)
        return integration

    def run_initial_sync(self, crm: str, config: dict[str, Any]) -> list[str]:
        """Launch the initial-sync job and return the ids of the Processes it planned."""
        run_id = self.launch(
            f"{crm}_initial_sync", {"ops": {f"{crm}_plan_initial_sync": {"config": config}}}
        )
        return self.wait_run(run_id)[TAG_PLANNED].split(",")

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
        return httpx.get(f"{self.sandbox_url}/_sandbox/stats", timeout=30).json()
