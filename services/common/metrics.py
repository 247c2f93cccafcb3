"""Prometheus metrics shared by every service (one process-wide registry).

Service-specific metrics live in each service's `app.py`; what is declared here
is what the common machinery itself counts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

BUS_DEADLETTERS = Counter(
    "tp_deadletters_total", "Inputs written to tp:deadletter", ["service", "stream"]
)
BUS_CLAIMED = Counter(
    "tp_bus_claimed_entries_total",
    "Pending entries re-claimed from a dead consumer or a failed handler",
    ["service", "stream"],
)
BUS_HANDLER_FAILURES = Counter(
    "tp_bus_handler_failures_total",
    "Batches whose handler raised; their entries stay pending for redelivery",
    ["service", "stream"],
)
BUS_STREAM_LAG = Gauge(
    "tp_bus_stream_lag_entries",
    "Entries of the stream not yet delivered to this service's consumer group (XINFO GROUPS lag; "
    "sampled every claim interval; needs Redis >= 7)",
    ["service", "stream"],
)
SERVICE_HEALTHY = Gauge(
    "tp_service_healthy",
    "1 when the named health check of the service passes (the same checks as /health)",
    ["service", "check"],
)
SERVICE_HEALTH_PROBLEM = Gauge(
    "tp_service_health_problem",
    "1 while the named health check fails for this reason (the detail is on /health and in the log)",
    ["service", "check", "reason"],
)
