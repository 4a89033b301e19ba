"""The factory: every registered CRM connector becomes Dagster jobs, assets and sensors."""
