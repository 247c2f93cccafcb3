"""`GuardianCannotGuard` fires when the guardian as a whole cannot guard (issue 21), by promtool's
own rule tests: a service down, or any health check of any service failing, for 15 s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import ALERTS_YML, assert_alert_tests_pass

JOBS = ("ingest", "portfolio", "takeprofit", "executor")


def guardian_alert() -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == "GuardianCannotGuard")


def scenario(name: str, up: dict[str, str], healthy: dict[tuple[str, str], str], fires_at: list[str],
             quiet_at: list[str]) -> dict[str, Any]:
    alert = guardian_alert()
    series = [{"series": f'up{{job="{job}",instance="{job}:9100"}}', "values": up.get(job, "1x30")}
              for job in JOBS]
    series += [{"series": f'tp_service_healthy{{service="{service}",check="{check}",job="{service}"}}',
                "values": values} for (service, check), values in healthy.items()]
    expected = [{"exp_labels": alert["labels"],
                 "exp_annotations": {k: " ".join(v.split()) for k, v in alert["annotations"].items()}}]
    checks = [{"eval_time": t, "alertname": "GuardianCannotGuard", "exp_alerts": expected} for t in fires_at]
    checks += [{"eval_time": t, "alertname": "GuardianCannotGuard", "exp_alerts": []} for t in quiet_at]
    return {"name": name, "interval": "5s", "input_series": series, "alert_rule_test": checks}


def test_the_guardian_alert_fires_when_any_service_cannot_guard(tmp_path: Path) -> None:
    all_green = {(s, c): "1x30" for s in JOBS for c in ("redis", "consuming", "handlers")}
    tests = [
        scenario("all healthy", {}, all_green, fires_at=[], quiet_at=["1m", "2m"]),
        # take-profit's Redis refuses writes from 30 s on: pending 15 s, firing from 45 s
        scenario("a failing check", {}, {**all_green, ("takeprofit", "redis"): "1 1 1 1 1 1 0x24"},
                 fires_at=["50s", "2m"], quiet_at=["25s", "40s"]),
        # the portfolio's prices go stale for 10 s only (a Redis restart, a reconnect): no alert
        scenario("a blip", {}, {**all_green, ("portfolio", "prices"): "1 1 1 1 1 1 0 0 1x22"},
                 fires_at=[], quiet_at=["35s", "45s", "1m"]),
        # the executor is not scraped at all from 30 s on
        scenario("a service down", {"executor": "1 1 1 1 1 1 0x24"}, all_green, fires_at=["50s"],
                 quiet_at=["25s"]),
    ]
    assert_alert_tests_pass(tests, tmp_path, "5s")


def test_the_circuit_breaker_alert_fires_while_it_is_open_and_stops_after_resume(tmp_path: Path) -> None:
    """Issue 19: `tp_circuit_breaker_open` 1 from 30 s to 60 s (then `resume`): firing at once, then quiet."""
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    alert = next(r for r in rules if r.get("alert") == "CircuitBreakerOpen")
    expected = [{"exp_labels": alert["labels"],
                 "exp_annotations": {k: " ".join(v.split()) for k, v in alert["annotations"].items()}}]
    series = [{"series": 'tp_circuit_breaker_open{job="takeprofit",instance="takeprofit:9103"}',
               "values": "0 0 0 0 0 0 1 1 1 1 1 1 0x12"}]
    checks = [{"eval_time": t, "alertname": "CircuitBreakerOpen", "exp_alerts": expected}
              for t in ("30s", "55s")]
    checks += [{"eval_time": t, "alertname": "CircuitBreakerOpen", "exp_alerts": []}
               for t in ("25s", "65s")]
    assert_alert_tests_pass([{"name": "breaker", "interval": "5s", "input_series": series,
                              "alert_rule_test": checks}], tmp_path, "5s")


def test_the_dry_run_alert_fires_while_the_executor_sends_no_order(tmp_path: Path) -> None:
    """`tp_executor_dry_run` 1 from the start: firing after its minute; 0 (turned off): quiet."""
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    alert = next(r for r in rules if r.get("alert") == "ExecutorInDryRun")
    expected = [{"exp_labels": alert["labels"],
                 "exp_annotations": {k: " ".join(v.split()) for k, v in alert["annotations"].items()}}]
    tests = [
        {"name": "dry run left on", "interval": "15s",
         "input_series": [{"series": 'tp_executor_dry_run{job="executor"}', "values": "1x10"}],
         "alert_rule_test": [{"eval_time": "30s", "alertname": "ExecutorInDryRun", "exp_alerts": []},
                             {"eval_time": "90s", "alertname": "ExecutorInDryRun", "exp_alerts": expected}]},
        {"name": "guarding", "interval": "15s",
         "input_series": [{"series": 'tp_executor_dry_run{job="executor"}', "values": "0x10"}],
         "alert_rule_test": [{"eval_time": "2m", "alertname": "ExecutorInDryRun", "exp_alerts": []}]},
    ]
    assert_alert_tests_pass(tests, tmp_path, "15s")
