"""Run tags the product sets and reads: which CRM, integration and Process a run works for."""

TAG_CRM = "quo_sync/crm"
TAG_INTEGRATION = "quo_sync/integration"
TAG_PROCESS = "quo_sync/process"  # on page runs: the Process whose pages they sync
TAG_PLANNED = "quo_sync/planned_processes"  # on initial-sync runs: the Processes they planned
TAG_RETRY = "quo_sync/retry"  # on page runs launched by automatic recovery: the attempt
TAG_OBJECT_TYPE = "quo_sync/object_type"  # runs and events: the CRM object type of the Process
TAG_INTERNAL = "quo_sync/internal"  # jobs launched by sensors only, not from the launchpad
TAG_PEAK_RSS = "quo_sync/peak_rss_mb"  # on page runs: the run process's peak RSS
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
SENSOR_NAME = "dagster/sensor_name"  # Dagster's: the sensor that launched a run
