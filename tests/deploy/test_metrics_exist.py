"""Every metric named in the Grafana dashboard and the alert rules is exported by some service.

Static: import every service's app module (each declares its metrics at import) and read the
names prometheus_client's registry would expose, suffixes included (a Counter `x` is exposed as
`x_total`, a Histogram as `x_bucket`/`x_sum`/`x_count`). test_stack.py then runs the services and
queries the same expressions on a real Prometheus.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import yaml
from prometheus_client import REGISTRY

from tests.deploy.support import ALERTS_YML, DASHBOARD

SERVICE_APPS = (
    "services.ingest.app",
    "services.portfolio.app",
    "services.takeprofit.app",
    "services.executor.app",
    "services.notify.app",
)
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "deriv", "histogram_quantile", "and", "or", "le", "changes",
                "min_over_time", "max_over_time", "without", "on", "ignoring"}


def exported_names() -> set[str]:
    for module in SERVICE_APPS:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {base, f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
        names |= {sample.name for sample in family.samples}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers not followed by `(`, outside {} and [])."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr):
        word = match.group(1)
        if word not in PROMQL_WORDS and not re.fullmatch(r"\d.*", word):
            names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]


def test_every_dashboard_metric_is_exported() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert used, "no metric found in the dashboard"
    assert used - exported == set()


def test_every_alert_metric_is_exported() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    used = {name for expr in alert_exprs() for name in metric_names(expr)}
    assert used - exported == set()


def test_the_dashboard_covers_what_traders_watch() -> None:
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    for name in (
        "tp_portfolio_net_after_close_usd",
        "tp_takeprofit_threshold_usd",
        "tp_portfolio_instrument_pnl_usd",
        "tp_portfolio_fees_paid_usd",
        "tp_portfolio_est_close_fees_usd",
        "tp_portfolio_est_slippage_usd",
        "tp_takeprofit_decisions_total",
        "tp_takeprofit_closures_finished_total",
        "tp_bus_stream_lag_entries",
        "tp_ingest_reconnects_total",
        "tp_portfolio_snapshot_latency_seconds_bucket",
    ):
        assert name in used, name


def test_the_name_extraction_itself() -> None:
    assert metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) > 0 and b') == {"a_bucket", "b"}
    assert metric_names('up{job=~"ingest|portfolio"} == 0') == {"up"}
