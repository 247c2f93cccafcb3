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
