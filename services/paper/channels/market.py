"""Public market-data channels: ``ticker``, ``lwt``, ``book``, ``price_index``, ``base_price``,
``index_components``, ``underlying_statistics`` and ``recent_trades``.

``ticker``, ``lwt`` and ``book`` take an instrument name or a combination ``[A:1,B:-1]``; an
unknown instrument or underlying, a bad delay, grouping or level count leaves the name out of the
subscription.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from services.paper import marketdata
from services.paper.accounts import Event
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

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _instrument_and_delay(exchange: PaperExchange, name: str, parts: list[str], family: str) -> Channel:
    if len(parts) != 3:
        raise NotAChannel(f"malformed channel {name}")
    delay = delay_of(parts[2], name)
    known_instrument(exchange, parts[1])
    return Channel(name, family, parts[1], delay)


def _underlying(exchange: PaperExchange, name: str, parts: list[str], family: str) -> Channel:
    if len(parts) != 2 or parts[1] not in exchange.market.index:
        raise NotAChannel(f"unknown underlying in {name}")
    return Channel(name, family, parts[1])


# ticker.<instrument>.<delay>


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


CHANNELS.register(
    Family(
        "ticker",
        False,
        lambda ex, n, p: _instrument_and_delay(ex, n, p, "ticker"),
        _ticker_snapshot,
        _ticker_render,
    )
)


# lwt.<instrument>.<delay>


def _lwt_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    conn.notify(channel.name, marketdata.lightweight_ticker(exchange.market, exchange.stats, channel.target))


def _lwt_render(exchange: PaperExchange, channel: Channel, now: float) -> None:
    exchange.fanout.broadcast(
        channel, marketdata.lightweight_ticker(exchange.market, exchange.stats, channel.target)
    )


CHANNELS.register(
    Family(
        "lwt",
        False,
        lambda ex, n, p: _instrument_and_delay(ex, n, p, "lwt"),
        _lwt_snapshot,
        _lwt_render,
    )
)


# price_index.<underlying>


def _index_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    conn.notify(channel.name, marketdata.index(exchange.market, channel.target, exchange.clock()))


def _index_render(exchange: PaperExchange, channel: Channel, now: float) -> None:
    exchange.fanout.broadcast(channel, marketdata.index(exchange.market, channel.target, now))


CHANNELS.register(
    Family(
        "price_index",
        False,
        lambda ex, n, p: _underlying(ex, n, p, "price_index"),
        _index_snapshot,
        _index_render,
    )
)


# index_components.<underlying>: the paper's index has one source, itself.


def _components(exchange: PaperExchange, channel: Channel) -> dict:
    price = exchange.market.index[channel.target]
    return {"index_price": price, "components": {"paper": price}}


CHANNELS.register(
    Family(
        "index_components",
        False,
        lambda ex, n, p: _underlying(ex, n, p, "index_components"),
        lambda ex, conn, ch: conn.notify(ch.name, _components(ex, ch)),
        lambda ex, ch, now: ex.fanout.broadcast(ch, _components(ex, ch)),
    )
)


# base_price.<underlying>.<expiration>


def _parse_base_price(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 3 or parts[1] not in exchange.market.index or not ISO_DATE.fullmatch(parts[2]):
        raise NotAChannel(f"malformed channel {name}")
    if marketdata.base_price(exchange.market, parts[1], parts[2]) is None:
        raise NotAChannel(f"nothing expires on {parts[2]}")
    return Channel(name, "base_price", parts[1], params={"expiration": parts[2]})


def _base_price_send(exchange: PaperExchange, channel: Channel, conns: list[Connection] | None) -> None:
    payload = marketdata.base_price(exchange.market, channel.target, channel.params["expiration"])
    if payload is None:  # the expiration has passed
        return
    if conns is None:
        exchange.fanout.broadcast(channel, payload)
    else:
        for conn in conns:
            conn.notify(channel.name, payload)


CHANNELS.register(
    Family(
        "base_price",
        False,
        _parse_base_price,
        lambda ex, conn, ch: _base_price_send(ex, ch, [conn]),
        lambda ex, ch, now: _base_price_send(ex, ch, None),
    )
)


# underlying_statistics.<underlying>: on subscription and whenever its instruments trade


def _statistics_events(exchange: PaperExchange, channel: Channel, events: list[Event]) -> None:
    market = exchange.market
    for event in events:
        inst = market.known(event.payload["instrument_name"]) if event.kind == "trade" else None
        if inst is not None and inst.underlying == channel.target:
            statistics = marketdata.underlying_statistics(market, exchange.stats, channel.target)
            exchange.fanout.broadcast(channel, statistics)
            return


CHANNELS.register(
    Family(
        "underlying_statistics",
        False,
        lambda ex, n, p: _underlying(ex, n, p, "underlying_statistics"),
        lambda ex, conn, ch: conn.notify(
            ch.name, marketdata.underlying_statistics(ex.market, ex.stats, ch.target)
        ),
        on_events=_statistics_events,
    )
)


# recent_trades.<target>.<category>


def _parse_recent(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 3:
        raise NotAChannel(f"malformed channel {name}")
    target, category = parts[1], parts[2]
    if category == "single":
        known_instrument(exchange, target)
    elif category in ("all", "options", "future_rolls"):
        if target not in exchange.market.index:
            raise NotAChannel(f"{category} needs an underlying in {name}")
    else:
        raise NotAChannel(f"unknown category in {name}")
    return Channel(name, "recent_trades", target, params={"category": category})


def _recent_matches(exchange: PaperExchange, channel: Channel, row: list) -> bool:
    inst = exchange.market.known(row[4])
    category = channel.params["category"]
    if inst is None:
        return False
    if category == "single":
        return inst.name == channel.target
    if inst.underlying != channel.target:
        return False
    if category == "options":
        return inst.kind == "option"
    if category == "future_rolls":
        return inst.is_combination
    return True


def _recent_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    conn.notify(channel.name, [row for row in exchange.stats.tape if _recent_matches(exchange, channel, row)])


def _recent_events(exchange: PaperExchange, channel: Channel, events: list[Event]) -> None:
    rows = [marketdata.tape_row(e.payload) for e in events if e.kind == "trade"]
    rows = [row for row in rows if _recent_matches(exchange, channel, row)]
    if rows:
        exchange.fanout.broadcast(channel, rows)


CHANNELS.register(Family("recent_trades", False, _parse_recent, _recent_snapshot, on_events=_recent_events))


# book.<instrument>.<grouping>.<nlevels>.<delay>


def _parse_book(exchange: PaperExchange, name: str, parts: list[str]) -> Channel:
    if len(parts) != 5:
        raise NotAChannel(f"malformed channel {name}")
    delay = delay_of(parts[4], name)
    known_instrument(exchange, parts[1])
    inst = exchange.market.get(parts[1])
    assert inst is not None
    tick = inst.tick_size
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
