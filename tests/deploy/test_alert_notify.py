"""The notify alerts fire when the trader is not being told (issue 24), by promtool's rule tests:
a target that has not taken a notification for 5 minutes, notifications given up, notify down."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import ALERTS_YML, assert_alert_tests_pass


def alert(name: str) -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == name)


def fired(name: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The alert as promtool renders it: its labels and annotations, {{ $labels.x }} filled in."""
    rule = alert(name)
    annotations = {}
    for key, text in rule["annotations"].items():
        text = " ".join(text.split())
        annotations[key] = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    return [{"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}]


def test_the_notify_alerts_fire_when_the_trader_is_not_told(tmp_path: Path) -> None:
    waiting = 'tp_notify_oldest_waiting_seconds{target="phone",job="notify",instance="notify:9105"}'
    dropped = 'tp_notify_dropped_total{target="phone",why="too_old",job="notify",instance="notify:9105"}'
    up = 'up{job="notify",instance="notify:9105"}'
    target = {"target": "phone", "job": "notify", "instance": "notify:9105"}
    tests = [{
        "name": "a target down, then notify down",
        "interval": "1m",
        # minute by minute: the oldest waiting notification ages from 0; 5 min at t=5m, over 300 s
        # from t=6m, so TraderNotTold is pending at 6m and firing from 7m
        "input_series": [
            {"series": waiting, "values": "0 60 120 180 240 300 360 420 480 0 0 0 0 0 0"},
            {"series": dropped, "values": "0 0 0 0 0 0 0 0 0 1 1 1 1 1 1"},
            {"series": up, "values": "1 1 1 1 1 1 1 1 1 1 1 0 0 0 0"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "TraderNotTold", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "TraderNotTold", "exp_alerts": []},
            {"eval_time": "7m", "alertname": "TraderNotTold", "exp_alerts": fired("TraderNotTold", target)},
            {"eval_time": "10m", "alertname": "TraderNotTold", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "NotificationsDropped", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "NotificationsDropped",
             "exp_alerts": fired("NotificationsDropped", {**target, "why": "too_old"})},
            # scraped last at 10m, down from 11m: pending 2 minutes, firing at 13m
            {"eval_time": "12m", "alertname": "NotifyDown", "exp_alerts": []},
            {"eval_time": "13m", "alertname": "NotifyDown",
             "exp_alerts": fired("NotifyDown", {"job": "notify", "instance": "notify:9105"})},
        ],
    }]
    assert_alert_tests_pass(tests, tmp_path, "1m")
