"""Fixtures for ingest: a paper exchange where a read-only and a trading key share one account,
an ingest running in-process against a real Redis, and a trader on the official client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import thalex
from redis.asyncio import Redis

from services.common.bus import Bus
from services.common.config import Settings
from services.common.contracts import Fill, Tick
from services.common.service import Health
from services.common.streams import Names
from services.ingest.app import Ingest
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys, running_paper_exchange

PERP = "BTC-PERPETUAL"
WATCHER = "watcher"
TRADER = "trader"


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def keys(keys_dir: Path) -> dict[str, KeyFiles]:
    """A trading key and ingest's read-only key of one account, as on Thalex."""
    return {TRADER: make_keys(keys_dir, TRADER, account=TRADER),
            WATCHER: make_keys(keys_dir, WATCHER, read_only=True, account=TRADER)}


@pytest_asyncio.fixture
async def paper(keys: dict[str, KeyFiles], keys_dir: Path) -> AsyncIterator[PaperHandle]:
    """Paper exchange, walk paused, BTC-PERPETUAL pinned at 100000 with a deep 5-level book."""
    async with running_paper_exchange(keys_dir, seed=5, tick_interval=0.05) as handle:
        await handle.control("paper/pause")
        await handle.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        await handle.control("paper/set_mark", {"instrument_name": PERP, "price": 100000})
        await handle.control("paper/set_book", {"instrument_name": PERP, "levels": 5, "level_amount": 100.0,
                                                "growth": 0.0, "spread_ticks": 1, "step_ticks": 1})
        yield handle


def ingest_settings(url: str, redis_url: str, names: Names, key: KeyFiles, **ingest: Any) -> Settings:
    return Settings(
        thalex={"network": url, "key_id": key.kid, "private_key_file": str(key.private_key_path)},
        redis={"url": redis_url, "namespace": names.namespace},
        ingest={"idle_timeout_seconds": 3.0, "reconnect_max_seconds": 0.5, "ticker_delay": "raw", **ingest},
        metrics={"ingest_port": 0},
    )


@pytest.fixture
def settings(paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles]) -> Settings:
    return ingest_settings(paper.url, redis_url, names, keys[WATCHER])


@contextlib.asynccontextmanager
async def running_ingest(settings: Settings) -> AsyncIterator[Ingest]:
    """An ingest service in this event loop (what service_main would run), stopped on exit."""
    bus = Bus(settings.redis.url, settings.names, "ingest", maxlen=settings.redis.stream_maxlen)
    await bus.start()
    ingest = Ingest(settings, bus, Health())
    task = asyncio.create_task(ingest.run())
    try:
        await wait_until(lambda: (ingest.session is not None and ingest.session.ready) or task.done(), 10)
        if task.done():
            task.result()
        yield ingest
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.stop()


async def wait_until(predicate: Callable[[], Any], within: float, interval: float = 0.02) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def stream_docs(redis: Redis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"__data__"]) for _, fields in await redis.xrange(stream)]


async def fills_on(redis: Redis, names: Names) -> list[Fill]:
    return [Fill.model_validate(d) for d in await stream_docs(redis, names.fills)]


async def ticks_on(redis: Redis, names: Names) -> list[Tick]:
    return [Tick.model_validate(d) for d in await stream_docs(redis, names.ticks)]


class Trader:
    """The account's own trading bot, on the official client with the trading key."""

    def __init__(self, client: thalex.Thalex) -> None:
        self.client = client
        self.ids = itertools.count(1)

    async def call(self, send: Callable[[int], Any]) -> Any:
        rid = next(self.ids)
        await send(rid)
        while True:
            message = json.loads(await asyncio.wait_for(self.client.receive(), 5))
            if message.get("id") == rid:
                assert "result" in message, message
                return message["result"]

    async def market(self, direction: str, instrument: str, amount: float, label: str | None = None) -> Any:
        """A market order; returns the order status (with its fills)."""
        return await self.call(lambda rid: self.client.insert(
            thalex.Direction(direction), instrument, amount, order_type=thalex.OrderType.MARKET,
            label=label, id=rid))


@pytest_asyncio.fixture
async def trader(paper: PaperHandle, keys: dict[str, KeyFiles]) -> AsyncIterator[Trader]:
    client = thalex.Thalex(types.SimpleNamespace(value=paper.url))  # type: ignore[arg-type]
    await client.connect()
    trader = Trader(client)
    await trader.call(lambda rid: client.login(keys[TRADER].kid, keys[TRADER].private_pem, id=rid))
    await trader.call(lambda rid: client.set_cancel_on_disconnect(30, id=rid))  # 50 orders/s, not 10
    yield trader
    await client.disconnect()


def write_config(path: Path, settings: Settings) -> Path:
    """The TOML a deployed ingest would read, for the subprocess tests."""
    ingest = settings.ingest
    path.write_text(f"""
[thalex]
network = "{settings.thalex.network}"
key_id = "{settings.thalex.key_id}"
private_key_file = "{settings.thalex.private_key_file}"

[redis]
url = "{settings.redis.url}"
namespace = "{settings.redis.namespace}"

[ingest]
ticker_delay = "{ingest.ticker_delay}"
idle_timeout_seconds = {ingest.idle_timeout_seconds}
reconnect_max_seconds = {ingest.reconnect_max_seconds}

[metrics]
ingest_port = 0
""")
    return path
