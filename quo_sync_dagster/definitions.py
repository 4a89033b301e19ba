"""`defs`: every registered CRM connector, built by the factory, plus the shared resources."""

import os

import dagster as dg

from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.orchestration.activity_sync import build_activity_definitions
from quo_sync_dagster.orchestration.factory import build_crm_definitions
from quo_sync_dagster.orchestration.resources import PageFramesIOManager, QuoResource, StoreResource

defs = dg.Definitions.merge(
    *(build_crm_definitions(c) for c in registered_connectors().values()),
    build_activity_definitions(list(registered_connectors().values())),
    dg.Definitions(
        resources={
            "store": StoreResource(uri=os.environ.get("QUO_SYNC_STORE_URI")),
            # No run config: QuoSettings reads QUO_SYNC_QUO_* in each run (resources.py).
            "quo": QuoResource(),
            "page_frames": PageFramesIOManager(s3_bucket=os.environ.get("QUO_SYNC_S3_BUCKET")),
        }
    ),
)
