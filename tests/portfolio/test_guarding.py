"""The portfolio keeps counting, and says when it cannot (issue 21, items 2 and 3).

* a bad `tp:instruments` value never makes a real fill or the exchange's positions "poison"
  (before: they were dead-lettered and that position was never guarded), and at start-up it does
  not crash the service with a traceback;
* Redis at `maxmemory`: `/health` red with the reason, the fill applied once writes work again;
* `/health` red while an open position's prices are stale.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from redis.asyncio import Redis

from services.common.contracts import (
    DeadLetter,
    ExchangePosition,
    Fill,
    InstrumentInfo,
    InstrumentType,
    Positions,
    Snapshot,
    Tick,
)
from services.common.redis_server import RedisServer, free_port
from services.common.streams import Names
from services.portfolio.app import build
from tests.support import (
    ServiceProcess,
    eventually,
    in_process,
    read_stream,
    settings_for,
    write_config,
    xadd,
)
from tests.takeprofit.test_guarding import wait_health

BTC = "BTC-PERPETUAL"
ETH = "ETH-PERPETUAL"
BAD_ETH = '{"v": 1, "type": "perpetual", "volume_tick_size": "0.01"}'


def fill(trade_id: str, instrument: str, amount: float, price: float, ts: float) -> Fill:
    return Fill(trade_id=trade_id, order_id="O" + trade_id, instrument=instrument, side="buy", price=price,
                amount=amount, fee=0.0, fee_rate=0.0, liquidity="taker", exchange_ts=ts, ingest_ts=ts)


def tick(instrument: str, mark: float, ts: float) -> Tick:
    return Tick(instrument=instrument, mark=mark, best_bid=mark - 1, best_ask=mark + 1, exchange_ts=ts,
                ingest_ts=ts)


def btc_info() -> str:
    return InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                          tick_size=1.0, volume_tick_size=0.001, min_order_amount=0.001).model_dump_json()


async def held(redis: Redis, names: Names) -> dict[str, float]:
    snaps = await read_stream(redis, names.snapshots, Snapshot)
    return {p.instrument: p.position for p in snaps[-1].positions} if snaps else {}


async def test_a_bad_instrument_entry_never_makes_a_real_fill_or_the_exchanges_positions_poison(
    redis_url: str, names: Names, redis: Redis
) -> None:
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await redis.hset(names.instruments, mapping={BTC: btc_info(), ETH: BAD_ETH})  # written while running
        await xadd(redis, names.fills, fill("T1", BTC, 0.01, 60_000.0, now))
        await xadd(redis, names.fills, fill("T2", ETH, 0.5, 3_000.0, now))
        await xadd(redis, names.positions, Positions(positions=[
            ExchangePosition(instrument=BTC, position=0.01, mark_price=60_000.0, average_price=60_000.0),
            ExchangePosition(instrument=ETH, position=0.5, mark_price=3_000.0, average_price=3_000.0)],
            exchange_ts=now, ingest_ts=now))

        async def both_counted() -> bool:
            return await held(redis, names) == {BTC: 0.01, ETH: 0.5}

        await eventually(both_counted, within=10)
        await xadd(redis, names.fills, fill("T3", ETH, 0.5, 3_000.0, now + 1))  # the timer retried: still bad

        async def third() -> bool:
            return await held(redis, names) == {BTC: 0.01, ETH: 1.0}

        await eventually(third, within=10)
    letters = await read_stream(redis, names.deadletter, DeadLetter)
    assert [(d.source_stream, d.entry_id) for d in letters] == [(names.instruments, ETH)]
    assert "InstrumentInfo invalid" in letters[0].error and "treated as unknown" in letters[0].error
    for stream in (names.fills, names.positions):
        assert (await redis.xinfo_groups(stream))[0]["pending"] == 0


async def test_a_bad_instrument_entry_at_start_up_is_no_traceback(redis_url: str, names: Names, redis: Redis,
                                                                   tmp_path: Path) -> None:
    now = time.time()
    await redis.hset(names.instruments, mapping={BTC: btc_info(), ETH: "not json at all"})
    await xadd(redis, names.positions, Positions(positions=[
        ExchangePosition(instrument=ETH, position=0.5, mark_price=3_000.0, average_price=3_000.0)],
        exchange_ts=now, ingest_ts=now))
    port = free_port()
    service = ServiceProcess("portfolio", write_config(tmp_path / "p.toml", settings_for(redis_url, names)),
                             tmp_path / "p.log", extra_args=["--metrics-port", str(port)])
    service.start()
    try:
        await wait_health(port, 200)  # started: seeded from the exchange's positions (a fill after that)
        await xadd(redis, names.fills, fill("T1", BTC, 0.01, 60_000.0, time.time()))
        await xadd(redis, names.ticks, tick(BTC, 60_000.0, time.time()))
        await xadd(redis, names.ticks, tick(ETH, 3_000.0, time.time()))

        async def counted() -> bool:
            return await held(redis, names) == {BTC: 0.01, ETH: 0.5}

        await eventually(counted, within=20)
        assert service.process is not None and service.process.poll() is None
        assert "Traceback" not in service.log()
        assert f"{names.instruments} {ETH} is unusable" in service.log()
    finally:
        service.stop()


async def test_redis_at_maxmemory_is_red_and_the_fill_counts_when_writes_work(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    names = Names("tp")
    port = free_port()
    settings = settings_for(own_redis_server.url, names, portfolio={"stale_after_seconds": 600})
    service = ServiceProcess("portfolio", write_config(tmp_path / "p.toml", settings), tmp_path / "p.log",
                             extra_args=["--metrics-port", str(port)])
    redis = Redis.from_url(own_redis_server.url)
    await redis.hset(names.instruments, BTC, btc_info())
    service.start()
    try:
        await wait_health(port, 200)
        before = await redis.xlen(names.snapshots)  # the first start publishes an empty one
        assert service.process is not None
        os.kill(service.process.pid, signal.SIGSTOP)
        await xadd(redis, names.fills, fill("T1", BTC, 0.01, 60_000.0, time.time()))
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        os.kill(service.process.pid, signal.SIGCONT)
        body = await wait_health(port, 503)
        assert body["reasons"]["redis"].startswith("Redis refuses writes: OutOfMemoryError")
        await asyncio.sleep(6)  # retried past max_deliveries meanwhile: never poison
        assert await redis.xlen(names.snapshots) == before

        await redis.config_set("maxmemory", 0)

        async def counted() -> bool:
            return await held(redis, names) == {BTC: 0.01}

        await eventually(counted, within=15)
        await xadd(redis, names.ticks, tick(BTC, 60_000.0, time.time()))  # priced: nothing stale
        await wait_health(port, 200)
        assert await redis.xlen(names.deadletter) == 0
    finally:
        await redis.config_set("maxmemory", 0)
        service.stop()
        await redis.aclose()


async def test_health_is_red_while_an_open_position_has_no_fresh_price(redis_url: str, names: Names,
                                                                       redis: Redis, tmp_path: Path) -> None:
    port = free_port()
    await redis.hset(names.instruments, BTC, btc_info())
    settings = settings_for(redis_url, names, portfolio={"stale_after_seconds": 2})
    service = ServiceProcess("portfolio", write_config(tmp_path / "p.toml", settings), tmp_path / "p.log",
                             extra_args=["--metrics-port", str(port)])
    service.start()
    try:
        await wait_health(port, 200)
        await xadd(redis, names.fills, fill("T1", BTC, 0.01, 60_000.0, time.time()))
        await xadd(redis, names.ticks, tick(BTC, 60_000.0, time.time()))
        body = await wait_health(port, 503, within=10)  # no further tick: stale after 2 s
        assert body["reasons"]["prices"] == f"prices stale: no new mark within 2 s for {BTC}"
        await xadd(redis, names.ticks, tick(BTC, 60_010.0, time.time()))
        await wait_health(port, 200)
    finally:
        service.stop()
