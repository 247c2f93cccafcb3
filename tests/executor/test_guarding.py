"""The executor when Redis refuses writes (issue 21, item 3): red with the reason, nothing sent, the
command neither lost nor dead-lettered, and closed once writes work.

The probe saw portfolio, take-profit and the executor healthy for 30 s at `maxmemory`
(noeviction) while nothing moved. Runs on a redis-server of its own (`own_redis_server`): the test
sets `maxmemory` on it, which no other test shares.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis

from services.common.bus import entry_fields
from services.common.redis_server import RedisServer
from services.common.service import Health, add_framework_checks
from services.common.signing import sign_command
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    COMMAND_KEY,
    PERP,
    TRADER,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    wait_outcome,
)
from tests.support import eventually


async def test_redis_at_maxmemory_is_red_with_the_reason_and_the_command_closes_when_writes_work(
        paper: PaperHandle, trader: KeyFiles, own_redis_server: RedisServer, names: Names) -> None:
    redis = Redis.from_url(own_redis_server.url)
    await open_positions(paper, {PERP: 0.1})
    command = make_command({PERP: 0.1}, deadline=30)
    settings = make_settings(own_redis_server.url, names, paper, trader)
    try:
        async with running_executor(settings) as running:
            health = Health("executor")
            add_framework_checks(health, running.bus, names.key("executor:health"))
            health.add("exchange", running.executor.session.health)
            await health.refresh()
            assert health.healthy, health.reasons
            await redis.config_set("maxmemory-policy", "noeviction")
            async with redis.pipeline(transaction=True) as pipe:  # the command in, then Redis full: at once
                pipe.xadd(names.commands, entry_fields(sign_command(command, COMMAND_KEY)))
                pipe.config_set("maxmemory", 1)
                await pipe.execute()
            await asyncio.sleep(3.0)  # delivered, and its claim refused, several times
            await health.refresh()
            assert not health.healthy
            assert health.reasons["redis"].startswith("Redis refuses writes: OutOfMemoryError")
            assert "1 entry of" in health.reasons["handlers"], health.reasons  # its claim refused
            orders = (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"]
            assert not [o for o in orders if o["method"] == "private/insert"], "sent while writes failed"
            assert account_positions(paper)[PERP] == 0.1
            await redis.config_set("maxmemory", 0)
            got = await wait_outcome(redis, names, command.command_id, within=20)

            async def acked() -> bool:  # the outcome is published inside the handler, the ack after it
                await health.refresh()
                return health.healthy
            with contextlib.suppress(AssertionError):
                await eventually(acked, within=5)
            assert health.healthy, health.reasons
    finally:
        await redis.config_set("maxmemory", 0)
        await redis.aclose()
    assert got[-1].status.value == "completed", got[-1]
    assert account_positions(paper)[PERP] == 0
    assert not await Redis.from_url(own_redis_server.url).xlen(names.deadletter)
