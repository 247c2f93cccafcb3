"""Ingest against the paper exchange: a real trade is never dropped for a missing field, a trade that
cannot be booked is refused loudly, and an option held brings the index of its underlying."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.common.config import Settings
from services.common.contracts import DeadLetter
from services.common.streams import Names
from services.paper.testing import PaperHandle
from tests.ingest.conftest import (
    PERP,
    Trader,
    fills_on,
    running_ingest,
    stream_docs,
    ticks_on,
    wait_until,
)


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("tp_ingest_refused_trades_total", {"reason": reason}) or 0.0


def watcher(paper: PaperHandle):  # type: ignore[no-untyped-def]
    return next(c for c in paper.exchange.connections if c.key is not None and c.key.kid == "watcher")


async def test_a_trade_missing_its_fee_is_published_and_one_without_price_is_refused_loudly(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = refused("unbookable")
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: f"ticker.{PERP}.raw" in ingest.channels, 5)
        no_fee = {"trade_id": "T-no-fee", "instrument_name": PERP, "direction": "buy", "price": 100000,
                  "amount": 0.2, "time": 1.0e10, "trade_type": "liquidation", "liquidation_fee": 100.0}
        no_price = {"trade_id": "T-no-price", "instrument_name": PERP, "direction": "sell", "amount": 0.1,
                    "time": 1.0e10}
        with caplog.at_level(logging.ERROR, logger="services.ingest.app"):
            watcher(paper).notify("account.trade_history", [no_price, no_fee])

            async def published() -> bool:
                return any(f.trade_id == "T-no-fee" for f in await fills_on(redis, names))

            await wait_until(published, 5)
    fill = next(f for f in await fills_on(redis, names) if f.trade_id == "T-no-fee")
    assert fill.fee is None and fill.order_id is None and fill.liquidation_fee == 100.0
    letters = [DeadLetter.model_validate(d) for d in await stream_docs(redis, names.deadletter)]
    (letter,) = [d for d in letters if d.entry_id == "T-no-price"]
    assert "cannot be booked without price" in letter.error
    assert refused("unbookable") == before + 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("trade T-no-price refused" in message for message in errors)


async def test_an_option_held_brings_the_index_of_its_underlying(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names,
) -> None:
    options = [i for i in paper.exchange.market.instruments.values()
               if i.kind == "option" and i.underlying == "BTCUSD"]
    option = options[0].name
    async with running_ingest(settings) as ingest:
        assert "price_index.BTCUSD" not in ingest.channels
        await trader.market("buy", option, options[0].min_order_amount)
        await wait_until(lambda: "price_index.BTCUSD" in ingest.channels, 5)

        async def index_ticked() -> list:
            return [t for t in await ticks_on(redis, names) if t.instrument == "BTCUSD"]

        ticks = await wait_until(index_ticked, 5)
    assert ticks[-1].mark == ticks[-1].index == pytest.approx(100_000, rel=0.01)


async def test_a_trade_of_a_type_thalex_added_later_is_published_with_a_warning(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its amount and fee count (read as `normal`); refusing it lost both until reconciliation."""
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: f"ticker.{PERP}.raw" in ingest.channels, 5)
        settlement = {"trade_id": "T-settled", "instrument_name": PERP, "direction": "sell",
                      "price": 100000, "amount": 0.1, "time": 1.0e10, "fee": 1.0,
                      "trade_type": "settlement", "maker_taker": ""}
        with caplog.at_level(logging.WARNING, logger="services.ingest.app"):
            watcher(paper).notify("account.trade_history", [settlement])

            async def published() -> list:
                return [f for f in await fills_on(redis, names) if f.trade_id == "T-settled"]

            (fill,) = await wait_until(published, 5)
    assert (fill.trade_type, fill.liquidity, fill.amount, fill.fee) == ("normal", None, 0.1, 1.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "trade T-settled: unknown trade_type 'settlement' (published as normal)" in warnings
    assert not [d for d in await stream_docs(redis, names.deadletter) if d.get("entry_id") == "T-settled"]
