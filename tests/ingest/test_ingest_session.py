"""Ingest on the shared Thalex session: a key that can never log in stops it, trouble never makes it
spin, and stopping always stops it.

Seen by a probe before the fix: with an unparseable PEM ingest retried the login forever; with
Redis at `maxmemory` (every write refused) it re-connected to the exchange in a tight loop
(`reconnecting in 0.00 s` 29 times): each refused write asked for a new connection "at once".
Seen in tests under load (about one run in four of the robustness tests, four at once): stopping
ingest hung, its tick writer waiting for ticks after redis-py had swallowed its cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.bus import Bus
from services.common.contracts import Tick
from services.common.redis_server import RedisServer
from services.common.streams import Names
from services.ingest.app import TickWriter
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, WATCHER, Trader, ingest_settings, running_ingest, write_config
from tests.ingest.test_ingest_process import start_ingest

RECONNECTING = re.compile(r"reconnecting in ([0-9.]+) s")


async def test_an_unparseable_private_key_exits_2_naming_the_key_file(
        paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], tmp_path: Path) -> None:
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN PRIVATE KEY-----\nthis is not a key\n-----END PRIVATE KEY-----\n")
    settings = ingest_settings(paper.url, redis_url, names, keys[WATCHER])
    settings = settings.model_copy(update={"thalex": settings.thalex.model_copy(
        update={"private_key_file": garbled})})
    process = await start_ingest(write_config(tmp_path / "ingest.toml", settings))
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = stderr.decode()
    assert process.returncode == 2, text
    assert "thalex.private_key_file" in text and str(garbled) in text
    assert "not a usable RSA private key" in text
    assert "this is not a key" not in text  # the file's content is never echoed


async def test_redis_refusing_every_write_makes_ingest_back_off_never_spin(
        paper: PaperHandle, keys: dict[str, KeyFiles], trader: Trader, own_redis_server: RedisServer,
        names: Names, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = ingest_settings(paper.url, own_redis_server.url, names, keys[WATCHER],
                               reconnect_max_seconds=30)
    admin = Redis.from_url(own_redis_server.url)
    try:
        async with running_ingest(settings):
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)  # every write refused (OOM), reads still answered
            for n in range(6):  # account traffic ingest must write and cannot
                await trader.market("buy" if n % 2 else "sell", PERP, 0.1)
                await asyncio.sleep(0.5)
            delays = [float(d) for d in RECONNECTING.findall(caplog.text)]
            await admin.config_set("maxmemory", 0)
    finally:
        await admin.aclose()
    assert delays, "the refused writes should have made ingest re-connect to fill the gap"
    assert all(d > 0 for d in delays), delays
    assert len(delays) <= 5, delays  # 0.25-0.5, 0.5-1, 1-2, 2-4 s: a handful in 3 s, not a loop


async def test_the_tick_writer_stops_even_when_a_write_swallows_its_cancellation(
        redis_url: str, names: Names) -> None:
    bus = Bus(redis_url, names, "ingest")
    writer = TickWriter(bus)
    writing = asyncio.Event()

    async def swallowing_flush() -> list[Tick]:
        writing.set()
        with contextlib.suppress(asyncio.CancelledError):  # what redis-py can do to a cancellation
            await asyncio.sleep(3600)
        return []

    writer.flush = swallowing_flush  # type: ignore[method-assign]
    task = asyncio.create_task(writer.run())
    try:
        writer._wake.set()
        await writing.wait()
        task.cancel()
        async with asyncio.timeout(2):
            await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
    finally:
        task.cancel()
        await bus.redis.aclose()
