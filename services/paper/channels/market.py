"""Public market-data channels: ``ticker``, ``book``, ``price_index`` and ``system``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from services.paper import marketdata
from services.paper.channels.registry import (
    CHANNELS,
    Channel,
    Family,
    NotAChannel,
    delay_of,
    known_instrument,
)
from services.paper.market import align_down, align_up

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


# ticker.<instrument>.<delay>


def _parse_ticker(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 3:
        raise NotAChannel(f"malformed channel {name}")
    delay = delay_of(parts[2], name)
    known_instrument(exchange, parts[1])
    return Channel(name, "ticker", parts[1], delay)


def _ticker_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    now = exchange.clock()
    conn.notify(
        channel.name,
        marketdata.ticker(exchange.market, exchange.stats, channel.target, now),
        exchange.fanout.log_ticker(channel.target, now),
    )


def _ticker_render(exchange: PaperExchange, channel: Channel, now: float) -> None:
    payload = marketdata.ticker(exchange.market, exchange.stats, channel.target, now)
    exchange.fanout.broadcast(channel, payload, exchange.fanout.log_ticker(channel.target, now))


CHANNELS.register(Family("ticker", False, _parse_ticker, _ticker_snapshot, _ticker_render))


# price_index.<underlying>


def _parse_index(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 2 or parts[1] not in exchange.market.index:
        raise NotAChannel(f"unknown underlying in {name}")
    return Channel(name, "price_index", parts[1])


def _index_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    conn.notify(channel.name, marketdata.index(exchange.market, channel.target, exchange.clock()))


def _index_render(exchange: PaperExchange, channel: Channel, now: float) -> None:
    exchange.fanout.broadcast(channel, marketdata.index(exchange.market, channel.target, now))


CHANNELS.register(Family("price_index", False, _parse_index, _index_snapshot, _index_render))


# book.<instrument>.<grouping>.<nlevels>.<delay>


def _parse_book(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 5:
        raise NotAChannel(f"malformed channel {name}")
    delay = delay_of(parts[4], name)
    known_instrument(exchange, parts[1])
    tick = exchange.market.instruments[parts[1]].tick_size
    grouping: float | None = None
    if parts[2] != "none":
        try:
            grouping = float(parts[2])
        except ValueError:
            raise NotAChannel(f"invalid grouping in {name}") from None
        if grouping <= 0 or abs(grouping / tick - round(grouping / tick)) > 1e-6:
            raise NotAChannel(f"grouping must be a multiple of the tick size in {name}")
    if parts[3] != "all" and not (parts[3].isdigit() and int(parts[3]) > 0):
        raise NotAChannel(f"invalid nlevels in {name}")
    nlevels = None if parts[3] == "all" else int(parts[3])
    return Channel(name, "book", parts[1], delay, {"grouping": grouping, "nlevels": nlevels})


def _book_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    send_book(exchange, channel, [conn], exchange.clock())


def _book_render(exchange: PaperExchange, channel: Channel, now: float) -> None:
    send_book(exchange, channel, list(channel.subscribers), now)


def send_book(exchange: PaperExchange, channel: Channel, conns: list[Connection], now: float) -> None:
    """Book notifications carry level changes against what this subscriber saw last."""
    bids, asks = exchange.market.book(channel.target)
    bid_levels = _group(bids, channel, buy=True)
    ask_levels = _group(asks, channel, buy=False)
    logged = exchange.fanout.log_ticker(channel.target, now, "book") if conns else None
    for conn in conns:
        seen_bids, seen_asks = channel.views.get(conn, ({}, {}))
        notification = {
            "trades": [],
            "bid_changes": _changes(seen_bids, bid_levels),
            "ask_changes": _changes(seen_asks, ask_levels),
            "total_bid_amount": round(sum(bid_levels.values()), 10),
            "total_ask_amount": round(sum(ask_levels.values()), 10),
            "time": now,
        }
        channel.views[conn] = (bid_levels, ask_levels)
        conn.push(json.dumps({"channel_name": channel.name, "notification": notification}), logged)


def _group(levels: list[list[float]], channel: Channel, buy: bool) -> dict[float, float]:
    grouping, nlevels = channel.params["grouping"], channel.params["nlevels"]
    grouped: dict[float, float] = {}
    for price, amount in levels:
        if grouping is not None:
            price = align_down(price, grouping) if buy else align_up(price, grouping)
        grouped[price] = round(grouped.get(price, 0.0) + amount, 10)
    keep = sorted(grouped, reverse=buy)[:nlevels] if nlevels is not None else list(grouped)
    return {price: grouped[price] for price in keep}


def _changes(before: dict[float, float], after: dict[float, float]) -> list[list[float]]:
    changes = [[p, a, a] for p, a in after.items() if before.get(p) != a]
    changes += [[p, 0.0, 0.0] for p in before if p not in after]
    return changes


CHANNELS.register(Family("book", False, _parse_book, _book_snapshot, _book_render))

# system: the reconnect notice goes to every connection anyway; subscribing is accepted.
CHANNELS.register(Family("system", False))
