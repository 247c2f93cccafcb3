"""promtool accepts deploy/prometheus/prometheus.yml and alerts.yml; every service is scraped."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.support import ALERTS_YML, PROMETHEUS_YML, need_binary

REQUIRED_ALERTS = {"ServiceDown", "StreamLagGrowing", "PricesStale", "PositionDrift", "ClosureFailed",
                   "ClosureOverdue", "EmergencyStopFired", "CircuitBreakerOpen"}


def test_promtool_checks_the_config_and_its_rule_file() -> None:
    promtool = need_binary("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    promtool = need_binary("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS_YML)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_scraped_and_every_required_alert_exists() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["ingest"] == ["ingest:9101"]
    assert targets["portfolio"] == ["portfolio:9102"]
    assert targets["takeprofit"] == ["takeprofit:9103"]
    assert targets["executor"] == ["executor:9104"]
    assert targets["notify"] == ["notify:9105"]
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]}
    assert alerts >= REQUIRED_ALERTS
