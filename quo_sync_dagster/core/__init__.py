"""Pure domain: models, the process state machine, metrics, phone numbers and rate policy.

Nothing in here imports Dagster or an HTTP library; every other layer depends on this one.
"""
