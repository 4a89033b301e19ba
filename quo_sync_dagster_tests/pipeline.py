"""The sync pipeline of any CRM on a real temporary Dagster instance, a real SQLite store and the
Quo sandbox over HTTP: the jobs, assets and sensors the factory built, driven step by step (the
daemon-driven path is in test_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.factory import RANGE_END, RANGE_START, TAG_PROCESS
from quo_sync_dagster.orchestration.resources import (
    PageFramesIOManager,
    QuoResource,
    StoreResource,
)
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster.orchestration.tags import SENSOR_NAME
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster.store import Store, open_store

QUO_KEY_ENV = "QUO_SYNC_TEST_QUO_KEY"


@dataclass
class Pipeline:
    quo: QuoSandbox
    instance: dg.DagsterInstance
    store: Store
    resources: dict[str, Any]


@contextmanager
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    monkeypatch.setenv(QUO_KEY_ENV, "test-key")
    # Quo's settings come from the environment, as in a deployment (QuoSettings).
    monkeypatch.setenv("QUO_SYNC_QUO_RATE", "10000")
    monkeypatch.setenv("QUO_SYNC_QUO_MAX_ATTEMPTS", "2")
    store_uri = f"sqlite:///{tmp_path}/store.sqlite"
    with (
        QuoSandbox(tmp_path / "quo", api_keys=("test-key",), rate_limit=None) as quo,
        dg.instance_for_test() as instance,
    ):
        store = open_store(store_uri)
        resources = {
            "store": StoreResource(uri=store_uri),
            "quo": QuoResource(),
            "page_frames": PageFramesIOManager(),
        }
        yield Pipeline(quo, instance, store, resources)
        store.close()


def add_integration(
    p: Pipeline,
    crm: str,
    settings: dict[str, Any],
    integration_id: str = "it-1",
    crm_credential_ref: str | None = None,
) -> Integration:
    integration = Integration(
        id=integration_id,
        crm=crm,
        quo_api_key_ref=f"env:{QUO_KEY_ENV}",
        quo_base_url=p.quo.url,
        crm_credential_ref=crm_credential_ref,
        settings=settings,
    )
    p.store.upsert_integration(integration)
    return integration


def launch_initial_sync(
    p: Pipeline, crm: str, config: dict[str, Any], raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    return defs.get_job_def(f"{crm}_initial_sync").execute_in_process(
        run_config={"ops": {f"{crm}_plan_initial_sync": {"config": config}}},
        instance=p.instance,
        resources=p.resources,
        raise_on_error=raise_on_error,
    )


def sync_range(
    p: Pipeline, crm: str, process_id: str, first: int, last: int
) -> dg.ExecuteInProcessResult:
    assets = [defs.get_assets_def(f"{crm}_{name}") for name in ("crm_pages", "quo_contacts")]
    return dg.materialize(
        assets,
        instance=p.instance,
        resources=p.resources,
        tags={  # as the page sensor launches it
            RANGE_START: page_key(process_id, first),
            RANGE_END: page_key(process_id, last),
            TAG_PROCESS: process_id,
            SENSOR_NAME: f"{crm}_page_sensor",
        },
        raise_on_error=False,
    )


def evaluate_sensor(p: Pipeline, name: str, cursor: str | None = None) -> Any:
    context = dg.build_sensor_context(
        instance=p.instance, cursor=cursor, resources={"store": p.resources["store"]}
    )
    return defs.get_sensor_def(name)(context)


def sync_everything(p: Pipeline, crm: str, config: dict[str, Any]) -> list[Process]:
    """Plan, sync every page range as the page sensor would launch them, let the completion
    sensor close the Processes; return the Processes this launch planned."""
    known = {q.id for q in p.store.list_processes()}
    assert launch_initial_sync(p, crm, config).success
    planned = [q for q in p.store.list_processes() if q.id not in known]
    return sync_planned(p, crm, planned)[0]


def poll_everything(p: Pipeline, crm: str, config: dict[str, Any]) -> tuple[list[Process], Any]:
    """One polling cycle (`<crm>_poll` with `config`), synced and closed like sync_everything;
    also returns the completion sensor's last result (its asset events: the checks)."""
    known = {q.id for q in p.store.list_processes()}
    result = defs.get_job_def(f"{crm}_poll").execute_in_process(
        run_config={"ops": {f"{crm}_plan_poll": {"config": config}}},
        instance=p.instance,
        resources=p.resources,
    )
    assert result.success
    return sync_planned(p, crm, [q for q in p.store.list_processes() if q.id not in known])


def sync_planned(p: Pipeline, crm: str, planned: list[Process]) -> tuple[list[Process], Any]:
    for process in planned:
        total, per_run = process.context["totalPages"], process.context["pagesPerRun"]
        for first in range(0, total, per_run):
            result = sync_range(p, crm, process.id, first, min(first + per_run, total) - 1)
            assert result.success, process.id
    closed = close_processes(p, crm)
    return [p.store.get_process(q.id) for q in planned], closed


def close_processes(p: Pipeline, crm: str) -> Any:
    """Evaluate the completion sensor; run the closing passes it launches for full scans (in
    process, as the daemon would run them) and evaluate it again. Returns the last result."""
    result = evaluate_sensor(p, f"{crm}_completion_sensor")
    closing = [
        r
        for r in getattr(result, "run_requests", None) or []
        if r.job_name == f"{crm}_closing_pass"
    ]
    if not closing:
        return result
    for request in closing:
        run_request(p, request)
    return evaluate_sensor(p, f"{crm}_completion_sensor")


def run_request(p: Pipeline, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """Run what a sensor asked for, in process, as the daemon would launch it."""
    assert request.job_name, "a sensor's run request names its job here"
    return defs.get_job_def(request.job_name).execute_in_process(
        run_config=request.run_config,
        instance=p.instance,
        resources=p.resources,
        tags=request.tags,
        raise_on_error=False,
    )


def run_demo(home: Path, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any]]:
    """`quo-sync demo ARGS` on `home` (sandbox limit off, exiting when done) as a user runs
    it: its exit code and its RESULT line."""
    argv = ["--home", str(home), "--quo-rate-limit", "0", "--exit-when-done", *args]
    proc = subprocess.run(
        [sys.executable, "-m", "quo_sync_dagster.cli", "demo", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, json.loads(last.removeprefix("RESULT "))
