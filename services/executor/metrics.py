"""The executor's metrics (default registry, `/metrics` on `executor_port`; docs/executor.md lists them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter("tp_executor_commands_total", "Commands by outcome", ["outcome"])
ORDERS_SENT = Counter("tp_executor_orders_sent_total", "Closing orders sent")
ORDERS_FILLED = Counter("tp_executor_orders_filled_total", "Closing orders that traded (fully or partly)")
ORDERS_REJECTED = Counter("tp_executor_orders_rejected_total", "Closing orders rejected, by Thalex code",
                          ["code"])
RETRIES = Counter("tp_executor_retries_total", "Re-sent closing orders, by reason", ["reason"])
EXCHANGE_CONNECTED = Gauge("tp_executor_exchange_connected",
                           "1 while the trading session is logged in and set up")
DRY_RUN = Gauge("tp_executor_dry_run", "1 while the executor is in dry run: it sends no order")
RECONNECTS = Counter("tp_executor_reconnects_total", "Trading sessions re-opened after the first")
TIME_TO_FIRST_ORDER = Histogram(
    "tp_executor_time_to_first_order_seconds", "From the command's created_ts to its first order",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_TO_FLAT = Histogram(
    "tp_executor_time_to_flat_seconds", "From the command's created_ts to verified flat",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60),
)
REMOVED = Counter("tp_executor_removed_total",
                  "What clearing rounds took off the account before and during closures, by kind "
                  "(orders, mass_quotes, conditional_orders, bots)", ["kind"])
