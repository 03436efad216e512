"""Prefect flows that chain the tasks into the seed README's workflow."""

import os

# The temporary Prefect server a flow starts sends usage telemetry by default; offline that logs an ERROR line
# ("Failed to send telemetry") in every run. Users who want it set the variable themselves.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
