"""`HaltViolated` fires when ingest counts an order, bot or trade on the account that is not the
guardian's during a halt (issue 19, item 2), by promtool's own rule tests — and stays quiet otherwise."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import ALERTS_YML, need_binary


def _alert() -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == "HaltViolated")


def test_the_alert_fires_on_a_violation_and_names_its_kind(tmp_path: Path) -> None:
    promtool = need_binary("promtool", "prometheus")
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
    spec = tmp_path / "halt_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS_YML)], "evaluation_interval": "5s",
                                    "tests": tests}, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
