"""`thalex-tp status` says first whether the guardian is guarding (issue 21).

Before, `status` showed the snapshot and the halt whatever the services' health: with take-profit
stopped, or the executor's key refused, it looked like any other day. Now each service's health
write (`<ns>:<service>:health`, the framework's `redis` check) carries its last verdict, and
`status` starts with GUARDING or NOT GUARDING and every reason, exit 5 when not guarding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis as redis_sync

from services.cli import main
from services.common.bus import Bus
from services.common.service import Health, add_framework_checks
from services.common.streams import Names
from services.operator import EXIT_NOT_GUARDING, EXIT_OK, GUARDIAN, guarding_lines, service_problems
from tests.support import settings_for, write_config

NOW = 1_700_000_000.0


def report(ts: float = NOW - 1.0, healthy: bool = True, **reasons: str) -> str:
    return json.dumps({"ts": ts, "healthy": healthy, "reasons": reasons})


def test_every_service_healthy_and_fresh_is_guarding() -> None:
    assert guarding_lines({s: report() for s in GUARDIAN}, NOW) == [
        "GUARDING: ingest, portfolio, takeprofit, executor healthy"]


def test_a_red_missing_stale_or_unreadable_service_is_not_guarding_with_every_reason() -> None:
    reports = {"ingest": report(), "portfolio": None, "takeprofit": report(ts=NOW - 12.0),
               "executor": report(healthy=False, exchange="login refused: authentication failed (error 19)")}
    assert guarding_lines(reports, NOW) == [
        "NOT GUARDING: the guardian cannot guard (alert GuardianCannotGuard):",
        "  portfolio: no health report: not running, or it cannot write to Redis",
        "  takeprofit: last health report 12 s ago: stopped, stuck, or it cannot write to Redis",
        "  executor: exchange: login refused: authentication failed (error 19)",
    ]
    assert service_problems(b"1700000000.5", NOW)[0].startswith("unreadable health report")
    assert service_problems(report(healthy=False), NOW) == ["not healthy yet (starting)"]


async def health_written(redis_url: str, names: Names, service: str, failing: str | None) -> None:
    """A service's health as the framework writes it: refreshed twice (the write carries the last verdict)."""
    bus = Bus(redis_url, names, service)
    health = Health(service)
    add_framework_checks(health, bus, names.key(f"{service}:health"))
    health.add("exchange", lambda: failing or True)
    try:
        await health.refresh()
        await health.refresh()
    finally:
        await bus.redis.aclose()


async def test_status_shows_not_guarding_with_the_reasons_and_exits_5(
        redis_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
    refused = "login refused: authentication failed (error 19)"
    for service in ("ingest", "portfolio", "executor"):  # take-profit is down
        await health_written(redis_url, names, service, refused if service == "executor" else None)
    assert main(["status", "--config", str(config)]) == EXIT_NOT_GUARDING
    out = capsys.readouterr().out
    assert out.startswith("NOT GUARDING"), out
    assert "  takeprofit: no health report" in out
    assert "  executor: exchange: login refused: authentication failed (error 19)" in out
    assert "ingest:" not in out.split("\n\n")[0] and "portfolio:" not in out.split("\n\n")[0]

    await health_written(redis_url, names, "takeprofit", None)
    await health_written(redis_url, names, "executor", None)
    assert main(["status", "--config", str(config)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("GUARDING: ingest, portfolio, takeprofit, executor healthy")


def test_a_health_report_that_stopped_coming_is_not_guarding(
        redis_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        for service in GUARDIAN:
            client.set(names.key(f"{service}:health"), report(ts=time.time() - 20))
        config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
        assert main(["status", "--config", str(config)]) == EXIT_NOT_GUARDING
        assert "last health report 20 s ago" in capsys.readouterr().out
    finally:
        client.close()


async def test_an_executor_in_dry_run_is_not_guarding_though_healthy(
        redis_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dry_run = true` left on from the trial phase: every service green, yet nothing will be closed.
    `status` says NOT GUARDING with the reason (exit 5); the metric says so for the alert."""
    from prometheus_client import REGISTRY

    from services.executor.app import build

    key = tmp_path / "command_key.txt"
    key.write_text("0123456789abcdef" * 4 + "\n")
    key.chmod(0o600)
    settings = settings_for(redis_url, names, executor={"dry_run": True},
                            commands={"signing_key_file": str(key)})
    bus = Bus(redis_url, names, "executor")
    health = Health("executor")
    try:
        build(settings, bus, health, "executor-1")
        add_framework_checks(health, bus, names.key("executor:health"))
        health.checks.pop("exchange")  # no exchange in this test: the dry run is what is looked at
        await health.refresh()
        await health.refresh()
    finally:
        await bus.redis.aclose()
    assert REGISTRY.get_sample_value("tp_executor_dry_run") == 1.0
    for service in ("ingest", "portfolio", "takeprofit"):
        await health_written(redis_url, names, service, None)
    config = write_config(tmp_path / "tp.toml", settings)
    assert main(["status", "--config", str(config)]) == EXIT_NOT_GUARDING
    out = capsys.readouterr().out
    assert "  executor: dry_run: the executor is in dry run ([executor] dry_run = true): it sends no " \
           "order, so nothing will be closed" in out, out


def test_a_report_set_not_to_guard_is_not_guarding_even_when_healthy() -> None:
    dry = json.dumps({"ts": NOW - 1.0, "healthy": True, "reasons": {},
                      "not_guarding": {"dry_run": "no order"}})
    assert service_problems(dry, NOW) == ["dry_run: no order"]
    lines = guarding_lines({**{s: report() for s in GUARDIAN}, "executor": dry}, NOW)
    assert lines[0].startswith("NOT GUARDING") and "  executor: dry_run: no order" in lines


def test_a_close_all_accepted_while_the_executor_is_in_dry_run_says_nothing_will_be_closed(
        redis_url: str, names: Names, capsys: pytest.CaptureFixture[str]) -> None:
    from services.operator import _say_if_not_closing

    client = redis_sync.Redis.from_url(redis_url)
    try:
        _say_if_not_closing("close-all", client, settings_for(redis_url, names))
        assert capsys.readouterr().err == ""  # no report, or one without: nothing to add
        dry = {"ts": time.time(), "healthy": True, "reasons": {},
               "not_guarding": {"dry_run": "dry run: no order"}}
        client.set(names.key("executor:health"), json.dumps(dry))
        _say_if_not_closing("close-all", client, settings_for(redis_url, names))
        assert "BUT NOTHING WILL BE CLOSED: dry run: no order" in capsys.readouterr().err
    finally:
        client.close()
