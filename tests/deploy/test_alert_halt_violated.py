"""`HaltViolated` fires when ingest counts an order, bot or trade on the account that is not the
guardian's during a halt (issue 19, item 2), by promtool's own rule tests — and stays quiet otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import ALERTS_YML, assert_alert_tests_pass


def _alert() -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == "HaltViolated")


def test_the_alert_fires_on_a_violation_and_names_its_kind(tmp_path: Path) -> None:
    alert = _alert()
    annotations = {k: " ".join(v.split()) for k, v in alert["annotations"].items()}
    tests = [{
        "name": "one rogue order during a halt at 30 s, no trade",
        "interval": "5s",
        "input_series": [
            {"series": 'tp_halt_violations_total{kind="order",job="ingest",instance="ingest:9101"}',
             "values": "0 0 0 0 0 0 1x30"},
            {"series": 'tp_halt_violations_total{kind="trade",job="ingest",instance="ingest:9101"}',
             "values": "0x36"},
        ],
        "alert_rule_test": [
            {"eval_time": "25s", "alertname": "HaltViolated", "exp_alerts": []},
            {"eval_time": "1m", "alertname": "HaltViolated", "exp_alerts": [{
                "exp_labels": {**alert["labels"], "kind": "order"},
                "exp_annotations": {**annotations, "summary": annotations["summary"].replace(
                    "{{ $labels.kind }}", "order")}}]},
        ],
    }]
    assert_alert_tests_pass(tests, tmp_path, "5s")
