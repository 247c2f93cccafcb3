"""Health that means "guarding" (issue 21): red with the reason when writes fail or handlers fail.

The framework's checks (`services.common.service.add_framework_checks`) on a real Redis that is
pushed to `maxmemory` with `noeviction`, turned into a read-only replica, or serves a handler that
fails on every entry; the reason must reach `/health`, the metric and the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery
from services.common.contracts import Control, ControlAction
from services.common.redis_server import RedisServer, free_port
from services.common.service import Health, Unhealthy, add_framework_checks, serve_http
from services.common.streams import Names


def control(by: str) -> Control:
    return Control(action=ControlAction.HALT, by=by, ts=1_700_000_000.0)


@pytest.fixture
async def admin(own_redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis_server.url)
    yield client
    await client.config_set("maxmemory", 0)
    await client.aclose()


async def framework(url: str, names: Names, service: str = "svc") -> tuple[Bus, Health]:
    bus = Bus(url, names, service)
    health = Health(service)
    add_framework_checks(health, bus, names.key(f"{service}:health"))
    return bus, health


def problem_metric(service: str, check: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value("tp_service_health_problem",
                                     {"service": service, "check": check, "reason": reason})


async def test_redis_at_maxmemory_is_red_with_the_reason_and_green_again(
    own_redis_server: RedisServer, admin: Redis, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """A ping still answers at maxmemory (noeviction) while every write fails: health must say so."""
    bus, health = await framework(own_redis_server.url, names, "oom")
    await health.refresh()
    assert health.latest["redis"] is True
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", 1)
    assert await admin.ping()
    with caplog.at_level(logging.WARNING):
        await health.refresh()
        await health.refresh()
    assert not health.healthy and health.latest["redis"] is False
    assert health.reasons["redis"].startswith("Redis refuses writes: OutOfMemoryError: command not allowed "
                                               "when used memory > 'maxmemory'")
    assert problem_metric("oom", "redis", "Redis refuses writes") == 1.0
    assert REGISTRY.get_sample_value("tp_service_healthy", {"service": "oom", "check": "redis"}) == 0.0
    warnings = [r.getMessage() for r in caplog.records if "UNHEALTHY" in r.getMessage()]
    assert len(warnings) == 1 and "maxmemory" in warnings[0]  # once per change, not every second

    await admin.config_set("maxmemory", 0)
    await health.refresh()
    assert health.latest["redis"] is True and "redis" not in health.reasons
    assert problem_metric("oom", "redis", "Redis refuses writes") is None
    await bus.redis.aclose()


async def test_a_read_only_replica_is_red_with_the_reason(
    own_redis_server: RedisServer, admin: Redis, names: Names
) -> None:
    bus, health = await framework(own_redis_server.url, names, "replica")
    await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that never answers
    try:
        await health.refresh()
        assert health.latest["redis"] is False
        assert health.reasons["redis"].startswith("Redis refuses writes: ReadOnlyError: You can't write "
                                                   "against a read only replica")
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
    await health.refresh()
    assert health.latest["redis"] is True
    await bus.redis.aclose()


async def test_a_handler_failing_on_every_entry_is_red_until_it_succeeds(redis_url: str, names: Names,
                                                                         redis: Redis) -> None:
    broken = True
    seen: list[str] = []

    async def handler(batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        if broken:
            raise ValueError("bad reference data for BTC-PERPETUAL")
        seen.extend(d.doc.by for d in batch)

    bus, health = await framework(redis_url, names, "failing")
    bus.consumer(names.control, "g", "c1", Control, handler, claim_interval_seconds=0.1,
                 retry_idle_seconds=0.1, claim_idle_seconds=3600)
    await bus.start()
    try:
        for who in ("a", "b", "c"):
            await redis.xadd(names.control, {"__data__": control(who).model_dump_json()})
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await health.refresh()
        assert not health.healthy and health.latest == {"redis": True, "consuming": True, "handlers": False}
        why = health.reasons["handlers"]
        assert why.startswith("handlers failing: 3 entries of") and "ValueError: bad reference data" in why
        assert problem_metric("failing", "handlers", "handlers failing") == 1.0

        broken = False

        async def recovered() -> bool:
            await health.refresh()
            return health.healthy

        for _ in range(100):
            if await recovered():
                break
            await asyncio.sleep(0.05)
        assert health.healthy and sorted(seen) == ["a", "b", "c"]
        assert problem_metric("failing", "handlers", "handlers failing") is None
    finally:
        await bus.stop()


async def test_the_health_endpoint_carries_every_reason() -> None:
    health = Health("endpoint")

    async def fine() -> bool:
        return True

    async def stale() -> bool:
        raise Unhealthy("prices stale", "no tick within 10 s for BTC-PERPETUAL")

    async def login() -> bool:
        return False

    health.add("redis", fine)
    health.add("prices", stale)
    health.add("exchange", login)
    await health.refresh()
    server = serve_http("127.0.0.1", 0, health, "endpoint")
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{server.server_port}/health",
                                    timeout=5)
        assert answer.value.code == 503
        body: dict[str, Any] = json.loads(answer.value.read())
    finally:
        server.shutdown()
    assert body["healthy"] is False
    assert body["checks"] == {"redis": True, "prices": False, "exchange": False}
    assert body["reasons"] == {"prices": "prices stale: no tick within 10 s for BTC-PERPETUAL",
                                "exchange": "check failed"}


async def test_the_healthy_metric_reads_red_once_the_checks_stop_being_refreshed() -> None:
    """A check that hangs past its timeout (a library swallowing the cancellation), or a blocked loop,
    stops the refreshing: `/health` turns red after 10 s, and so must `tp_service_healthy` — the alert
    `GuardianCannotGuard` reads it, and a gauge kept at its last 1 looked healthy while not guarding."""
    health = Health("stalled")

    async def fine() -> bool:
        return True

    health.add("prices", fine)

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("tp_service_healthy", {"service": "stalled", "check": "prices"})

    assert gauge() == 0.0  # never checked: nothing is proven
    await health.refresh()
    assert gauge() == 1.0 and health.healthy
    health.checked_ts -= 10.5  # the last round is 10.5 s old: no refresh since
    assert gauge() == 0.0 and not health.healthy


async def test_a_reason_never_shows_a_password() -> None:
    health = Health("secrets")

    async def unreachable() -> bool:
        raise Unhealthy("Redis unreachable", "cannot reach redis://portfolio:hunter2@redis:6379/0")

    health.add("redis", unreachable)
    await health.refresh()
    assert "hunter2" not in health.reasons["redis"] and "portfolio:***@redis" in health.reasons["redis"]


async def test_the_health_report_in_redis_says_what_the_same_refresh_found(redis_url: str, names: Names,
                                                                           redis: Redis) -> None:
    """`thalex-tp status` reads `<ns>:<service>:health`: it must turn green with `/health`, not a
    refresh later (the native walkthrough's `status` said NOT GUARDING a second after /health was green)."""
    bus, health = await framework(redis_url, names, "late")
    logged_in = {"now": False}
    health.add("exchange", lambda: True if logged_in["now"] else "not logged in: not connected yet")

    async def report() -> dict[str, Any]:
        raw = await redis.get(names.key("late:health"))
        assert raw is not None
        return dict(json.loads(raw))

    await health.refresh()
    first = await report()
    assert first["healthy"] is False and first["reasons"]["exchange"].startswith("not logged in")
    logged_in["now"] = True
    await health.refresh()
    assert health.healthy
    second = await report()
    assert second["healthy"] is True and second["reasons"] == {}
    await bus.redis.aclose()
