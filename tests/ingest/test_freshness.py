"""Ingest is healthy only while its inputs are fresh and its writes succeed (issue 21, item 9).

Seen by the probe before the fix: a starved or slowed price feed left ingest healthy
(`tp_ingest_seconds_since_last_message` near 0 while the data was 24 s old), and a READONLY
replica left it healthy while every write failed. Freshness is judged by the exchange's
timestamps (`services/ingest/freshness.py`), never by when a message arrived.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.common.contracts import Tick
from services.common.redis_server import RedisServer, free_port
from services.common.service import Health, add_framework_checks
from services.common.streams import Names
from services.ingest.freshness import stale_prices
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, WATCHER, Trader, ingest_settings, running_ingest, wait_until
from tests.ingest.test_ingest_robustness import watcher_connection

NOW = 1_700_000_100.0


def tick(name: str, exchange_ts: float, mark_ts: float | None = None) -> Tick:
    return Tick(instrument=name, mark=100_000.0, best_bid=99_990.0, best_ask=100_010.0,
                exchange_ts=exchange_ts, mark_ts=mark_ts, ingest_ts=NOW)


def test_a_price_is_stale_by_the_exchanges_clock_not_by_arrival() -> None:
    # received just now, but marked 24 s ago: 24.0 > 10 → stale (the probe's slowed feed)
    assert stale_prices([PERP], {PERP: tick(PERP, NOW - 24.0)}, {PERP: NOW - 60}, NOW, 10.0) == [
        f"{PERP} price 24.0 s old by the exchange's clock"]
    # 9.5 s old: within 10 s → fresh
    assert stale_prices([PERP], {PERP: tick(PERP, NOW - 9.5)}, {}, NOW, 10.0) == []


def test_a_moving_book_does_not_make_an_old_mark_fresh() -> None:
    """A book change re-issues the last mark with the book's time: the book is 0.2 s old, the mark
    (what the portfolio values the position at) 24 s — stale, and the reason says which is old."""
    reissued = tick(PERP, NOW - 0.2, mark_ts=NOW - 24.0)
    assert stale_prices([PERP], {PERP: reissued}, {}, NOW, 10.0) == [
        f"{PERP} price 24.0 s old by the exchange's clock (the mark's; its book moved 0.2 s ago)"]
    # the mark 9.5 s old behind a live book: fresh (the book's age is not the question)
    assert stale_prices([PERP], {PERP: tick(PERP, NOW - 0.2, mark_ts=NOW - 9.5)}, {}, NOW, 10.0) == []


def test_a_tick_without_mark_ts_is_as_old_as_its_exchange_time() -> None:
    """Ticks of an ingest older than `mark_ts` (or any tick whose mark is as new as it) are judged
    on `exchange_ts`, as before the field."""
    assert stale_prices([PERP], {PERP: tick(PERP, NOW - 0.2)}, {}, NOW, 10.0) == []
    assert stale_prices([PERP], {PERP: tick(PERP, NOW - 11.0)}, {}, NOW, 10.0) == [
        f"{PERP} price 11.0 s old by the exchange's clock"]


def test_a_position_whose_ticker_never_spoke_is_stale_after_the_limit() -> None:
    # subscribed 12 s ago, no tick since: 12 > 10 → starved
    assert stale_prices([PERP], {}, {PERP: NOW - 12.0}, NOW, 10.0) == [
        f"{PERP} no price in the 12.0 s since subscribing"]
    assert stale_prices([PERP], {}, {PERP: NOW - 3.0}, NOW, 10.0) == []  # give it time
    assert stale_prices([PERP], {}, {}, NOW, 10.0) == []  # not subscribed yet: the portfolio's business


def test_only_open_positions_are_judged() -> None:
    old = {"ETH-PERPETUAL": tick("ETH-PERPETUAL", NOW - 600)}  # watched, no position: not a guarding gap
    assert stale_prices([PERP], {**old, PERP: tick(PERP, NOW - 1)}, {}, NOW, 10.0) == []


def seconds_since_last_message(channel: str) -> float | None:
    return REGISTRY.get_sample_value("tp_ingest_seconds_since_last_message", {"channel": channel})


async def test_a_slowed_feed_makes_ingest_unhealthy_though_messages_keep_arriving(
        paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], trader: Trader) -> None:
    settings = ingest_settings(paper.url, redis_url, names, keys[WATCHER]).model_copy(deep=True)
    settings.portfolio.stale_after_seconds = 5.0
    channel = f"ticker.{PERP}.raw"
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: channel in ingest.channels and PERP in ingest.last_tick, 5)
        assert ingest.prices_fresh() is True
        conn = watcher_connection(paper)
        for _ in range(5):  # every message on time, every mark 24 s old
            conn.notify(channel, {"mark_price": 100_000.0, "mark_timestamp": time.time() - 24.0,
                                  "best_bid_price": 99_990.0, "best_ask_price": 100_010.0})
            await asyncio.sleep(0.1)
        verdict = ingest.prices_fresh()
        since = seconds_since_last_message(channel)
    assert since is not None and since < 2.0  # what the probe saw: "the feed is alive"
    assert isinstance(verdict, str) and verdict.startswith(f"prices stale: {PERP} price 2"), verdict
    assert "s old by the exchange's clock" in verdict


async def test_a_slowed_feed_behind_a_moving_book_makes_ingest_unhealthy_until_a_fresh_ticker(
        paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], trader: Trader) -> None:
    """The review's reproduction: every mark 24 s old, and a book change between the tickers. The
    book change re-issues the old mark stamped with the book's (fresh) time; judged on that, ingest
    stayed green while the portfolio valued the position at a 24 s old mark."""
    settings = ingest_settings(paper.url, redis_url, names, keys[WATCHER]).model_copy(deep=True)
    settings.portfolio.stale_after_seconds = 5.0
    ticker = f"ticker.{PERP}.raw"
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: ticker in ingest.channels and PERP in ingest.last_tick
                         and any(c.startswith(f"book.{PERP}.") for c in ingest.channels), 5)
        assert ingest.prices_fresh() is True
        book = next(c for c in ingest.channels if c.startswith(f"book.{PERP}."))
        conn = watcher_connection(paper)
        for step in range(5):  # a 24 s old mark, then the book moves at once
            conn.notify(ticker, {"mark_price": 100_000.0, "mark_timestamp": time.time() - 24.0,
                                 "best_bid_price": 99_990.0, "best_ask_price": 100_010.0})
            await asyncio.sleep(0.05)
            conn.notify(book, {"bid_changes": [[99_980.0 - step, 1.0, 1.0]], "ask_changes": [],
                               "time": time.time()})
            await asyncio.sleep(0.05)
        await wait_until(lambda: ingest.last_tick[PERP].mark_ts is not None, 5)  # the book's re-issue
        verdict = ingest.prices_fresh()
        conn.notify(ticker, {"mark_price": 100_000.0, "mark_timestamp": time.time(),
                             "best_bid_price": 99_990.0, "best_ask_price": 100_010.0})
        await wait_until(lambda: ingest.prices_fresh() is True, 5)  # a fresh mark clears it
    assert isinstance(verdict, str) and verdict.startswith(f"prices stale: {PERP} price 2"), verdict
    assert "s old by the exchange's clock (the mark's; its book moved 0." in verdict, verdict


async def test_a_starved_feed_makes_ingest_unhealthy_until_prices_come_again(
        paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], trader: Trader) -> None:
    settings = ingest_settings(paper.url, redis_url, names, keys[WATCHER]).model_copy(deep=True)
    settings.portfolio.stale_after_seconds = 1.0
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: PERP in ingest.last_tick, 5)
        # the walk is paused: no price moves, so the raw ticker says nothing more
        verdict = await wait_until(lambda: v if isinstance(v := ingest.prices_fresh(), str) else None, 5)
        assert verdict.startswith(f"prices stale: {PERP} price"), verdict
        await paper.control("paper/resume")
        await wait_until(lambda: ingest.prices_fresh() is True, 5)


async def test_a_read_only_replica_makes_ingest_unhealthy_with_the_reason(
        paper: PaperHandle, own_redis_server: RedisServer, names: Names, keys: dict[str, KeyFiles]) -> None:
    settings = ingest_settings(paper.url, own_redis_server.url, names, keys[WATCHER])
    admin = Redis.from_url(own_redis_server.url)
    try:
        async with running_ingest(settings) as ingest:
            health = Health("ingest")
            add_framework_checks(health, ingest.bus, names.key("ingest:health"))
            health.add("prices", ingest.prices_fresh)
            await health.refresh()
            assert health.healthy, health.reasons
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a silent master
            await health.refresh()
            assert not health.healthy
            assert health.reasons["redis"].startswith("Redis refuses writes: ReadOnlyError"), health.reasons
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await health.refresh()
            assert health.healthy, health.reasons
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
