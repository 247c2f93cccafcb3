"""Small builders for the ledger tests: wire documents with sensible defaults."""

from __future__ import annotations

from itertools import count
from typing import Any

from services.common.config import TradingFees
from services.common.contracts import (
    BookLevel,
    ExchangePosition,
    Fill,
    InstrumentInfo,
    InstrumentType,
    Liquidity,
    Positions,
    Side,
    Tick,
)
from services.portfolio.ledger import Ledger, LedgerConfig

BTC_PERP = "BTC-PERPETUAL"
BTC_FUTURE = "BTC-27DEC24"
ETH_FUTURE = "ETH-27DEC24"
BTC_CALL = "BTC-27DEC24-100000-C"

INFOS: dict[str, InstrumentInfo] = {
    BTC_PERP: InstrumentInfo(
        type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
        tick_size=1.0, volume_tick_size=0.001, min_order_amount=0.001,
    ),
    BTC_FUTURE: InstrumentInfo(
        type=InstrumentType.FUTURE, product="FBTCUSD", underlying="BTCUSD",
        tick_size=1.0, volume_tick_size=0.001, min_order_amount=0.001, expiry_ts=1_735_286_400.0,
    ),
    ETH_FUTURE: InstrumentInfo(
        type=InstrumentType.FUTURE, product="FETHUSD", underlying="ETHUSD",
        tick_size=0.1, volume_tick_size=0.01, min_order_amount=0.01, expiry_ts=1_735_286_400.0,
    ),
    BTC_CALL: InstrumentInfo(
        type=InstrumentType.OPTION, product="OBTCUSD", underlying="BTCUSD",
        tick_size=5.0, volume_tick_size=0.01, min_order_amount=0.01, expiry_ts=1_735_286_400.0,
    ),
}

_trade_ids = count(1)


def config(**overrides: Any) -> LedgerConfig:
    """Published tier-1 fees, buffer 1.1, grace 5 s."""
    values: dict[str, Any] = {"fees": TradingFees(), "fee_estimation_buffer": 1.1, "drift_grace_seconds": 5.0}
    values.update(overrides)
    return LedgerConfig(**values)


def ledger(**overrides: Any) -> Ledger:
    """A ledger that knows the instruments of `INFOS`."""
    result = Ledger(config(**overrides))
    for name, info in INFOS.items():
        result.set_instrument(name, info)
    return result


def fill(
    instrument: str,
    side: str,
    amount: float,
    price: float,
    fee: float | None = 0.0,
    *,
    fee_rate: float | None = None,
    liquidity: Liquidity | None = None,
    funding_mark: float | None = None,
    ts: float = 1_000.0,
    trade_id: str | None = None,
    **extra: Any,
) -> Fill:
    """A fill; `fee=None` is a trade whose fee the exchange did not report."""
    return Fill(
        trade_id=trade_id or f"T{next(_trade_ids)}",
        instrument=instrument,
        side=Side(side),
        price=price,
        amount=amount,
        fee=fee,
        fee_rate=fee_rate,
        liquidity=liquidity,
        funding_mark=funding_mark,
        exchange_ts=ts,
        ingest_ts=ts,
        **({"order_id": "O1"} | extra),
    )


def tick(
    instrument: str,
    mark: float,
    *,
    best_bid: float | None = None,
    best_ask: float | None = None,
    bids: list[BookLevel] | None = None,
    asks: list[BookLevel] | None = None,
    index: float | None = None,
    funding_mark: float | None = None,
    ts: float = 1_000.0,
) -> Tick:
    return Tick(
        instrument=instrument,
        mark=mark,
        best_bid=best_bid,
        best_ask=best_ask,
        bids=bids,
        asks=asks,
        index=index,
        funding_mark=funding_mark,
        exchange_ts=ts,
        ingest_ts=ts,
    )


def positions(ts: float, *entries: ExchangePosition) -> Positions:
    return Positions(positions=list(entries), exchange_ts=ts, ingest_ts=ts)


def exchange_position(
    instrument: str,
    position: float,
    average_price: float,
    mark_price: float | None,
    **extra: float,
) -> ExchangePosition:
    return ExchangePosition(
        instrument=instrument,
        position=position,
        average_price=average_price,
        mark_price=mark_price,
        **extra,
    )
