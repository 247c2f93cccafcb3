"""What the market-data methods and channels show: ticker, index and book of the paper's market.

Pure views over :class:`~services.paper.market.Market` plus the trade statistics the exchange keeps
(last price, volume and value since start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.paper.market import Market


@dataclass
class TradeStats:
    """Last price, volume and value per instrument, from every account's trades."""

    last_price: dict[str, float] = field(default_factory=dict)
    volume: dict[str, float] = field(default_factory=dict)
    value: dict[str, float] = field(default_factory=dict)

    def note(self, trade: dict) -> None:
        name = trade["instrument_name"]
        self.last_price[name] = trade["price"]
        self.volume[name] = self.volume.get(name, 0.0) + trade["amount"]
        self.value[name] = self.value.get(name, 0.0) + trade["amount"] * trade["price"]


def ticker(market: Market, stats: TradeStats, name: str, now: float) -> dict:
    """The ``Ticker`` object; empty book sides are omitted (the schema types them as numbers)."""
    inst = market.instruments[name]
    mark = market.mark(name)
    bids, asks = market.book(name, mark.price)
    low, high = market.collar(name, mark.price)
    wire: dict[str, Any] = {
        "mark_price": mark.price,
        "mark_timestamp": now,
        "index": mark.index,
        "delta": mark.delta,
        "volume_24h": stats.volume.get(name, 0.0),
        "value_24h": stats.value.get(name, 0.0),
        "collar_low": low,
        "collar_high": high,
        "open_interest": 0.0,
    }
    if bids:
        wire["best_bid_price"], wire["best_bid_amount"] = bids[0]
    if asks:
        wire["best_ask_price"], wire["best_ask_amount"] = asks[0]
    if name in stats.last_price:
        wire["last_price"] = stats.last_price[name]
    if inst.kind == "option":
        wire["iv"], wire["forward"] = mark.iv, mark.forward
    if inst.kind == "perpetual":
        wire["funding_rate"], wire["funding_mark"] = mark.funding_rate, mark.funding_mark
    return wire


def index(market: Market, underlying: str, now: float) -> dict:
    """The ``Index`` object."""
    return {"index_name": underlying, "price": market.index[underlying], "timestamp": now}


def book(market: Market, stats: TradeStats, name: str, now: float) -> dict:
    """``public/book``: every level as ``[price, amount, outright amount]``."""
    bids, asks = market.book(name)
    wire: dict[str, Any] = {
        "bids": [[p, a, a] for p, a in bids],
        "asks": [[p, a, a] for p, a in asks],
        "time": now,
    }
    if name in stats.last_price:
        wire["last"] = stats.last_price[name]
    return wire
