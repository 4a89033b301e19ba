"""The Dagster instance settings (dagster.yaml): run queue, per-CRM run limits, pools.

The run queue is Dagster's, through QuoSyncRunCoordinator (orchestration/run_coordinator.py):
it tags runs launched without the product's tags (UI backfills), so the limits hold them too.
Per-CRM run limits come from each connector's queueConfig, so the file is rendered, not
hand-kept: `quo-sync demo` writes it into its Dagster home, and a test keeps the top-level
dagster.yaml equal to it.
"""

from __future__ import annotations

from typing import Any

import yaml

from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.orchestration.factory import TAG_CRM

QUO_POOL_LIMIT = 8  # page steps talking to Quo at once; the governor paces their requests

HEADER = """\
# Rendered by quo_sync_dagster.orchestration.instance (kept equal by a test): edit the
# connectors' queue_config or that module, not this file. Embedded default: SQLite storage
# under $DAGSTER_HOME. Production settings: deploy/dagster.yaml.
"""


def instance_settings() -> dict[str, Any]:
    connectors = registered_connectors()
    return {
        "telemetry": {"enabled": False},
        # Dagster refuses `run_queue` beside `run_coordinator`, so the dequeue settings are
        # here; the run limits stay in `concurrency.runs`.
        "run_coordinator": {
            "module": "quo_sync_dagster.orchestration.run_coordinator",
            "class": "QuoSyncRunCoordinator",
            "config": {"dequeue_interval_seconds": 1, "dequeue_use_threads": True},
        },
        "concurrency": {
            "runs": {
                "max_concurrent_runs": 10,
                "tag_concurrency_limits": [
                    {"key": TAG_CRM, "value": name, "limit": c.crm_config.queue_config.max_workers}
                    for name, c in sorted(connectors.items())
                ],
            },
            "pools": {"default_limit": QUO_POOL_LIMIT, "granularity": "op"},
        },
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 10},
        "sensors": {"use_threads": True, "num_workers": 4},
    }


def render_instance_yaml() -> str:
    return HEADER + yaml.safe_dump(instance_settings(), sort_keys=False)
