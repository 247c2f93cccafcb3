"""Ingest against the paper exchange and a real Redis: fills, ticks, positions, reconnects."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import thalex
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.common.config import Settings
from services.common.contracts import InstrumentInfo, Positions
from services.common.streams import Names
from services.ingest.app import Ingest
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, Trader, fills_on, running_ingest, stream_docs, ticks_on, wait_until


async def test_trades_appear_once_with_fee_rate_liquidity_and_position(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings):
        await trader.market("buy", PERP, 0.5, label="bot-1")
        await trader.market("buy", PERP, 0.2)
        await trader.market("sell", PERP, 0.3)
        fills = await wait_until(lambda: _n_fills(redis, names, 3), 5)
        await asyncio.sleep(0.3)  # nothing more may come
    fills = await fills_on(redis, names)
    assert [(f.side, f.amount, f.position_after) for f in fills] == [
        ("buy", 0.5, 0.5), ("buy", 0.2, 0.7), ("sell", 0.3, 0.4)]
    assert len({f.trade_id for f in fills}) == 3
    first = fills[0]
    assert first.liquidity == "taker" and first.fee_rate == 0.0005
    assert first.fee == round(0.0005 * first.price * 0.5, 10) and first.fee > 0
    assert first.label == "bot-1" and first.instrument == PERP and first.trade_type == "normal"
    assert first.funding_mark is not None and first.ingest_ts >= first.exchange_ts


async def _n_fills(redis: Redis, names: Names, n: int) -> bool:
    return len(await fills_on(redis, names)) >= n


async def test_positions_instruments_and_book_ticks_for_a_position(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings) as ingest:
        await trader.market("sell", PERP, 1.0)
        await wait_until(lambda: ingest.channels.get(f"ticker.{PERP}.raw"), 5)
        await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100100})

        async def book_tick() -> bool:
            return any(t.asks for t in await ticks_on(redis, names))

        await wait_until(book_tick, 5)
        positions = [Positions.model_validate(d) for d in await stream_docs(redis, names.positions)]
    tick = [t for t in await ticks_on(redis, names) if t.asks][-1]
    assert tick.instrument == PERP and tick.mark in (100000, 100100)
    assert tick.asks[0][0] == tick.best_ask and len(tick.asks) == 5 and len(tick.bids) == 5
    assert [level[0] for level in tick.bids] == sorted((level[0] for level in tick.bids), reverse=True)
    assert positions[-1].positions[0].instrument == PERP and positions[-1].positions[0].position == -1.0
    raw = await redis.hget(names.instruments, PERP)
    info = InstrumentInfo.model_validate(json.loads(raw))
    assert info.type == "perpetual" and info.tick_size > 0 and info.underlying == "BTCUSD"
    assert await redis.hlen(names.instruments) > 1  # every active instrument is described


async def test_every_tick_of_a_move_has_its_best_prices_on_top_of_its_levels(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    """A move reaches ingest as a ticker and a book message; the tick written between the two must not
    carry the new best bid over the old book (the exit would be priced a whole move wrong)."""
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.01)
        await wait_until(lambda: any(c.startswith(f"book.{PERP}.") for c in ingest.channels), 5)
        await paper.control("paper/pause")
        for n in range(20):
            await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100_000 + 250 * (n % 2)})
            await asyncio.sleep(0.02)

        async def all_moves() -> bool:
            return sum(1 for t in await ticks_on(redis, names) if t.bids and t.mark == 100_250) >= 10

        await wait_until(all_moves, 5)
    ticks = [t for t in await ticks_on(redis, names) if t.bids and t.asks]
    assert ticks and all(t.bids[0][0] == t.best_bid and t.asks[0][0] == t.best_ask for t in ticks), [
        (t.best_bid, t.bids[0], t.best_ask, t.asks[0]) for t in ticks if t.bids[0][0] != t.best_bid]


async def test_a_fill_in_a_new_instrument_subscribes_its_ticker(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    other = next(name for name, inst in paper.exchange.market.instruments.items()
                 if inst.kind == "future")
    async with running_ingest(settings) as ingest:
        assert not any(other in c for c in ingest.channels)
        await trader.market("buy", other, 0.1)
        await wait_until(lambda: f"ticker.{other}.raw" in ingest.channels, 5)
        await wait_until(lambda: any(c.startswith(f"book.{other}.") for c in ingest.channels), 5)
        assert f"ticker.{other}.raw" in paper.exchange.channels  # really subscribed on the exchange


async def test_dropped_connection_while_trading_loses_and_repeats_nothing(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    gap_filled_before = REGISTRY.get_sample_value("tp_ingest_gap_filled_trades_total") or 0.0
    async with running_ingest(settings) as ingest:
        made: list[str] = []
        for round_ in range(4):
            for _ in range(3):
                order = await trader.market("buy" if len(made) % 2 == 0 else "sell", PERP, 0.1)
                made += [f["trade_id"] for f in order["fills"]]
            dropped = await paper.control("paper/drop_connections",
                                          {"key_id": "watcher", "abrupt": round_ % 2 == 1})
            assert dropped["dropped"] == 1
            for _ in range(2):  # trades while ingest is away
                order = await trader.market("buy", PERP, 0.1)
                made += [f["trade_id"] for f in order["fills"]]
            await wait_until(lambda: _watcher_connected(paper), 5)
        await wait_until(lambda: _n_fills(redis, names, len(made)), 10)
        await wait_until(lambda: ingest.session is not None and ingest.session.ready, 5)
        await asyncio.sleep(0.3)
    fills = await fills_on(redis, names)
    assert sorted(f.trade_id for f in fills) == sorted(made)  # every trade, exactly once
    gap_filled = REGISTRY.get_sample_value("tp_ingest_gap_filled_trades_total") - gap_filled_before
    assert gap_filled >= 8  # the trades made while ingest was away came from private/trade_history


def _watcher_connected(paper: PaperHandle) -> bool:
    return any(
        c.key is not None and c.key.kid == "watcher" and c.channels for c in paper.exchange.connections
    )


async def test_a_maker_fill_carries_the_maker_rate(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings):
        order = await trader.call(lambda rid: trader.client.insert(
            thalex.Direction.BUY, PERP, 0.2, price=99000, id=rid))
        await paper.control("paper/fill_orders", {"order_id": order["order_id"]})
        (fill,) = await wait_until(lambda: fills_on(redis, names), 5)
    assert (fill.liquidity, fill.fee_rate, fill.price, fill.position_after) == ("maker", 0.0001, 99000, 0.2)
    assert fill.fee == round(0.0001 * 99000 * 0.2, 10)


async def test_an_instrument_flat_long_enough_is_unsubscribed(
    paper: PaperHandle, settings: Settings, trader: Trader
) -> None:
    quick = settings.model_copy(update={"ingest": settings.ingest.model_copy(
        update={"unsubscribe_after_flat_seconds": 0.5})})
    async with running_ingest(quick) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: f"ticker.{PERP}.raw" in paper.exchange.channels, 5)
        await trader.market("sell", PERP, 0.1)  # flat again
        await wait_until(lambda: f"ticker.{PERP}.raw" not in paper.exchange.channels, 5)
        assert not any(PERP in c for c in paper.exchange.channels) and not ingest.channels


async def _trade_while_away(paper: PaperHandle, ingest: Ingest, trader: Trader) -> str:
    """Drop ingest's connection, trade while it is away (the live notification goes nowhere), and wait
    until it is back and bootstrapped; the trade's id."""
    await wait_until(lambda: ingest.session is not None and ingest.session.ready, 5)
    await paper.control("paper/drop_connections", {"key_id": "watcher", "abrupt": True})
    order = await trader.market("buy", PERP, 0.1)
    (trade_id,) = [f["trade_id"] for f in order["fills"]]
    await wait_until(lambda: _watcher_connected(paper), 5)
    await wait_until(lambda: ingest.session is not None and ingest.session.ready, 5)
    return str(trade_id)


async def test_a_trade_late_in_the_history_is_read_on_the_second_look(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    """Made while ingest was away and listed in the history only 3 s later: the gap fill right
    after the reconnect cannot see it; the second read (`history_recheck_seconds`) does."""
    await paper.control("paper/set_history_delay", {"seconds": 3.0})
    recheck = settings.model_copy(update={"ingest": settings.ingest.model_copy(
        update={"history_recheck_seconds": 4.0})})
    async with running_ingest(recheck) as ingest:
        trade_id = await _trade_while_away(paper, ingest, trader)
        await asyncio.sleep(0.5)
        assert await fills_on(redis, names) == []  # the first gap fill could not see it
        (fill,) = await wait_until(lambda: fills_on(redis, names), 8)
        await asyncio.sleep(0.3)
    assert fill.trade_id == trade_id and len(await fills_on(redis, names)) == 1


async def test_a_second_read_the_exchange_refuses_is_tried_again_until_it_succeeds(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The second read exists for a trade missing from the first gap fill; the exchange refusing it
    once (error 20, temporary failure) must not cancel it on this connection."""
    await paper.control("paper/set_history_delay", {"seconds": 2.0})
    recheck = settings.model_copy(update={"ingest": settings.ingest.model_copy(
        update={"history_recheck_seconds": 2.5})})
    async with running_ingest(recheck) as ingest:
        trade_id = await _trade_while_away(paper, ingest, trader)
        # the first read of the history after this bootstrap (the second read) is refused
        await paper.control("paper/fail_next", {"count": 1, "code": 20, "message": "temporary failure",
                                                "methods": ["private/trade_history"], "key_id": "watcher"})
        assert await fills_on(redis, names) == []  # the first gap fill could not see it
        with caplog.at_level(logging.WARNING, logger="services.ingest.app"):
            (fill,) = await wait_until(lambda: fills_on(redis, names), 10)
    assert fill.trade_id == trade_id and ingest.history_recheck_at is None
    assert [rule.remaining for rule in paper.exchange.dispatcher.failures] == [0]  # it was refused once
    warnings = [r.getMessage() for r in caplog.records]
    assert any("the second read of the trade history failed" in m and "(error 20)" in m for m in warnings)
