"""What the market-data methods and channels show: ticker, lightweight ticker, index, book, forward
prices, underlying statistics and the public trade tape of the paper's market.

Pure views over :class:`~services.paper.market.Market` plus the trade statistics the exchange keeps
(since start: "24h" figures count every trade since the paper started).
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from services.paper.market import Market

RECENT_TRADES = 100
"""How many public trades the ``recent_trades`` snapshot holds."""


@dataclass
class TradeStats:
    """Last price, volume, value and open interest per instrument, from every account's trades."""

    last_price: dict[str, float] = field(default_factory=dict)
    volume: dict[str, float] = field(default_factory=dict)
    value: dict[str, float] = field(default_factory=dict)
    index_value: dict[str, float] = field(default_factory=dict)
    """Instrument -> sum of amount * index at the trade (api.yaml's underlying value traded)."""
    positions: dict[str, dict[str, float]] = field(default_factory=dict)
    """Instrument -> account -> the position after its last trade (open interest without scanning
    every account's positions for each ticker: 1,000 tickers of a 1,000-position book)."""
    tape: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=RECENT_TRADES))
    """``[price, amount, taker side, time, instrument, implied_taker]``, oldest first."""

    def note(self, trade: dict, account_id: str) -> list[Any]:
        """Count one trade; returns its public tape row."""
        name = trade["instrument_name"]
        self.last_price[name] = trade["price"]
        self.volume[name] = self.volume.get(name, 0.0) + trade["amount"]
        self.value[name] = self.value.get(name, 0.0) + trade["amount"] * trade["price"]
        self.index_value[name] = self.index_value.get(name, 0.0) + trade["amount"] * trade.get("index", 0.0)
        self.positions.setdefault(name, {})[account_id] = trade.get("position_after", 0.0)
        row = tape_row(trade)
        self.tape.append(row)
        return row

    def open_interest(self, name: str) -> float:
        """Contracts the paper's accounts hold (the other side is the simulated market)."""
        return round(sum(abs(p) for p in self.positions.get(name, {}).values()), 10)


def tape_row(trade: dict) -> list[Any]:
    """A trade on the public tape: ``[price, amount, taker side, time, instrument, implied_taker]``."""
    side = trade["direction"]
    if trade.get("maker_taker") == "maker":  # the simulated flow took the account's order
        side = "sell" if side == "buy" else "buy"
    return [trade["price"], trade["amount"], side, trade["time"], trade["instrument_name"], False]


def ticker(market: Market, stats: TradeStats, name: str, now: float) -> dict:
    """The ``Ticker`` object; empty book sides are omitted (the schema types them as numbers).
    A combination's ticker has no last price, delta, volumes or open interest (api.yaml)."""
    inst = market.get(name)
    assert inst is not None
    mark = market.mark(name)
    bids, asks = market.book(name, mark.price)
    low, high = market.collar(name, mark.price)
    wire: dict[str, Any] = {
        "mark_price": mark.price,
        "mark_timestamp": now,
        "index": mark.index,
        "collar_low": low,
        "collar_high": high,
    }
    if bids:
        wire["best_bid_price"], wire["best_bid_amount"] = bids[0]
    if asks:
        wire["best_ask_price"], wire["best_ask_amount"] = asks[0]
    if inst.is_combination:
        return wire
    wire.update(
        delta=mark.delta,
        volume_24h=stats.volume.get(name, 0.0),
        value_24h=stats.value.get(name, 0.0),
        open_interest=stats.open_interest(name),
    )
    if name in stats.last_price:
        wire["last_price"] = stats.last_price[name]
    if inst.kind == "option":
        wire["iv"], wire["forward"] = mark.iv, mark.forward
    if inst.kind == "perpetual":
        wire["funding_rate"], wire["funding_mark"] = mark.funding_rate, mark.funding_mark
    return wire


def lightweight_ticker(market: Market, stats: TradeStats, name: str) -> dict:
    """The ``lwt`` notification: best bid/ask as [price, amount, outright amount], mark, iv, last."""
    inst = market.get(name)
    assert inst is not None
    mark = market.mark(name)
    bids, asks = market.book(name, mark.price)
    wire: dict[str, Any] = {"m": mark.price}
    if bids:
        wire["b"] = [bids[0][0], bids[0][1], bids[0][1]]
    if asks:
        wire["a"] = [asks[0][0], asks[0][1], asks[0][1]]
    if inst.kind == "option":
        wire["v"] = mark.iv
    if not inst.is_combination and name in stats.last_price:
        wire["l"] = stats.last_price[name]
    return wire


def index(market: Market, underlying: str, now: float) -> dict:
    """The ``Index`` object, with Thalex's expiration fields while an expiration window runs."""
    wire: dict[str, Any] = {"index_name": underlying, "price": market.index[underlying], "timestamp": now}
    expiration = market.expiration(underlying, now)
    if expiration is not None:
        wire.update(expiration)
    if underlying in market.last_delivery:
        wire["previous_settlement_price"] = market.last_delivery[underlying]
    return wire


REST_BOOK_LEVELS = 5
"""api.yaml, `public/book`: "aggregated price depth for a single instrument, with a maximum of 5 levels"
(the paper sent all of its 10: a client sizing orders by depth saw more than Thalex shows)."""


def book(market: Market, stats: TradeStats, name: str, now: float) -> dict:
    """``public/book``: the best `REST_BOOK_LEVELS` levels a side as ``[price, amount, outright amount]``."""
    bids, asks = market.book(name)
    wire: dict[str, Any] = {
        "bids": [[p, a, a] for p, a in bids[:REST_BOOK_LEVELS]],
        "asks": [[p, a, a] for p, a in asks[:REST_BOOK_LEVELS]],
        "time": now,
    }
    if name in stats.last_price:
        wire["last"] = stats.last_price[name]
    return wire


def expiry_date(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def expiring_on(market: Market, underlying: str, expiration: str) -> list[str]:
    """The outrights of an underlying that expire on ``expiration`` (what its base price shows)."""
    return [
        i.name
        for i in market.instruments.values()
        if i.underlying == underlying
        and i.expiry_ts is not None
        and not i.is_combination
        and expiry_date(i.expiry_ts) == expiration
    ]


def base_price(market: Market, underlying: str, expiration: str) -> dict | None:
    """``base_price.<underlying>.<expiration>``: the future's mark, else the options' forward; None
    when nothing of that underlying expires that day."""
    dated = [market.instruments[name] for name in expiring_on(market, underlying, expiration)]
    if not dated:
        return None
    future = next((i for i in dated if i.kind == "future"), None)
    if future is not None:
        return {
            "base_name": future.name,
            "price": market.mark(future.name).price,
            "index": market.index[underlying],
            "index_delta": 1.0,
        }
    forward = market.mark(dated[0].name).forward or market.index[underlying]
    return {"base_name": "synthetic", "price": forward, "index": market.index[underlying], "index_delta": 1.0}


def underlying_statistics(market: Market, stats: TradeStats, underlying: str) -> dict:
    """``underlying_statistics.<underlying>``: volumes since start, open interest of the paper's accounts."""
    volumes = {"option": 0.0, "delta_one": 0.0}
    values = {"option": 0.0, "delta_one": 0.0}
    expirations: dict[int, dict[str, Any]] = {}
    totals = {"call": 0.0, "put": 0.0, "option": 0.0, "future": 0.0, "delta_one": 0.0}
    for inst in [*market.instruments.values(), *market.expired.values()]:
        if inst.underlying != underlying or inst.is_combination:
            continue
        group = "option" if inst.kind == "option" else "delta_one"
        volumes[group] += stats.volume.get(inst.name, 0.0)
        values[group] += stats.index_value.get(inst.name, 0.0)
        held = stats.open_interest(inst.name) if inst.name in market.instruments else 0.0
        if inst.kind == "option":
            totals[str(inst.option_type)] += held
            totals["option"] += held
        else:
            totals["delta_one"] += held
            if inst.kind == "future":
                totals["future"] += held
        if inst.expiry_ts is not None and inst.name in market.instruments:
            row = expirations.setdefault(
                inst.expiry_ts,
                {
                    "expiration_timestamp": inst.expiry_ts,
                    "expiry_date": expiry_date(inst.expiry_ts),
                    "call": 0.0,
                    "put": 0.0,
                    "option": 0.0,
                    "future": 0.0,
                },
            )
            if inst.kind == "option":
                row[str(inst.option_type)] += held
                row["option"] += held
            else:
                row["future"] += held
    return {
        "trade_volume_24h": volumes["option"] + volumes["delta_one"],
        "option_volume_24h": volumes["option"],
        "delta_one_volume_24h": volumes["delta_one"],
        "trade_value_24h": values["option"] + values["delta_one"],
        "option_value_24h": values["option"],
        "delta_one_value_24h": values["delta_one"],
        "open_interest": {"expirations": [expirations[k] for k in sorted(expirations)], "totals": totals},
    }
