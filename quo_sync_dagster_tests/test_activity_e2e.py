"""Quo calls and messages logged on every CRM end to end, on the path `quo-sync demo --calls`
runs: `dagster dev` (webserver + daemon: `quo_activity_sensor`, run monitoring), the Quo sandbox
sending signed events (a third duplicated, some reordered), the receiver and each CRM's
simulator as their own processes.

Per CRM, an integration is synced, then calls (answered with recording, summary and transcript;
missed; voicemail; outgoing without participants; from unknown numbers) and messages are
simulated: each must end as exactly one activity on every person holding the number, enriched,
missed calls shown as missed. Then activity runs are killed while they work; what they held is
delivered again and still logged once.

One stack for the module; the CRMs' scenarios run at once in threads, as in test_ongoing_e2e.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from quo_sync_dagster.activity_check import ActivityCheck
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import ProcessState
from quo_sync_dagster.demo_calls import simulate_calls
from quo_sync_dagster.local_stack import LocalStack
from quo_sync_dagster.secrets import SECRETS_DIR_ENV
from quo_sync_dagster_tests.test_faults import run_worker_pids, wait_for

CRMS = {"pipedrive": 40, "zoho": 40, "attio": 40, "axiscare": 40, "scalingtest": 40}
CALLS = 16  # per CRM: two of each kind demo_calls simulates
SETTINGS = {"polling": False}


def scenario(stack: LocalStack, crm: str) -> tuple[Integration, ActivityCheck]:
    integration = stack.register_integration(
        f"act-{crm}", crm, CRMS[crm], SETTINGS, activities=True
    )
    (process_id, *more) = stack.run_initial_sync(crm, {"integration_id": integration.id})
    processes = stack.wait_processes([process_id, *more], timeout=600)
    assert {p.state for p in processes} == {ProcessState.COMPLETED}
    simulate_calls(stack, integration.id, CALLS, random.Random(crm))
    stack.wait_activities_logged(integration, timeout=600)
    return integration, stack.activity_check(integration)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("activities") / "home"
    stack = LocalStack(home, quo_rate_limit=None)
    with pytest.MonkeyPatch.context() as env, stack:
        env.setenv(SECRETS_DIR_ENV, str(home / "secrets"))  # the webhook keys subscribe stores
        yield stack


@pytest.fixture(scope="module")
def outcomes(stack: LocalStack) -> Iterator[dict[str, Future[Any]]]:
    with ThreadPoolExecutor(len(CRMS), thread_name_prefix="activities") as pool:
        futures = {crm: pool.submit(scenario, stack, crm) for crm in CRMS}
        yield futures
        for future in futures.values():  # none may outlive the stack
            future.exception()


@pytest.mark.parametrize("crm", list(CRMS))
def test_every_call_and_message_is_one_enriched_activity_on_each_holder(
    crm: str, outcomes: dict[str, Future[Any]]
) -> None:
    _, check = outcomes[crm].result(timeout=1200)
    assert check.exact, check.result()
    assert check.expected >= CALLS - CALLS // 8  # every known number reached someone
    assert check.unmatched >= CALLS // 8  # the unknown numbers, and other CRMs' callers
    assert check.crm_activities >= check.expected


def test_killed_activity_runs_are_redelivered_and_log_once(
    stack: LocalStack, outcomes: dict[str, Future[Any]]
) -> None:
    integrations = [outcomes[crm].result(timeout=1200)[0] for crm in CRMS]
    pipedrive = integrations[0]
    # Every activity run blocks on its first Quo read (the workspace's numbers), before it
    # writes anything to a CRM; then every run worker is killed.
    stack.quo.inject_fault(delay_seconds=60, count=50, kinds=["phone_numbers"])
    simulate_calls(stack, pipedrive.id, 8, random.Random("kill"))

    def started() -> set[str]:
        return {r["runId"] for r in stack.activity_runs(pipedrive) if r["status"] == "STARTED"}

    killed = wait_for("a running pipedrive activity run", started, 180)
    wait_for("a blocked activity run", lambda: stack.quo.stats()["pendingFaults"] < 50, 180)
    victims = run_worker_pids(stack.dagster_home)
    assert killed and victims, "no running activity run to kill"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    stack.quo.clear_faults()
    # Run monitoring fails the dead runs, the sensor releases their items, new runs log them.
    for integration in integrations:
        stack.wait_activities_logged(integration, timeout=600)
    runs = {r["runId"]: r for r in stack.activity_runs(pipedrive)}
    assert {runs[run_id]["status"] for run_id in killed} == {"FAILURE"}
    redone = {i for r in runs.values() if r["status"] == "SUCCESS" for i in r["itemIds"]}
    assert {i for run_id in killed for i in runs[run_id]["itemIds"]} <= redone
    for integration in integrations:
        check = stack.activity_check(integration)
        assert check.exact, (integration.id, check.result())
