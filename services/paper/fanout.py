"""Publishing: engine events to the account's private channels, market data to public channels.

Private channels follow :data:`~services.paper.channels.registry.ROUTES` (event kind -> channel);
public market-data channels are re-rendered when prices moved, at most once per their delay;
public event feeds (recent trades, instruments...) get the events through their family's
``on_events``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from services.paper import marketdata, risk
from services.paper.accounts import Event
from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Route
from services.paper.instruments import Instrument

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange

TICKER_LOG_SIZE = 100_000
INDEX_FAMILIES = frozenset({"price_index", "index_components"})
"""Market-data channels of an underlying's index (`base_price` also shows what expires that day; the
rest show one instrument or combination)."""
PORTFOLIO_MARK_MOVE = 0.01
"""Thalex resends a portfolio line when its mark moved more than 1 %."""


class Fanout:
    def __init__(self, exchange: PaperExchange) -> None:
        self.exchange = exchange
        self.ticker_log: deque[dict] = deque(maxlen=TICKER_LOG_SIZE)
        self.portfolio_marks: dict[tuple[str, str], float] = {}
        """(account, instrument) -> the mark of the line last sent on ``account.portfolio``."""
        self._swept_version = -1
        """`Market.version` when every channel was last looked at (`publish_channels`)."""
        self._waiting: list[Channel] = []
        """Delayed channels with something to send once their delay has passed."""
        self._index: dict[str, list[Channel]] = {}
        """Instrument or underlying -> the channels that show it ("": those of an unknown target)."""
        self._index_key: tuple[int, int] = (-1, -1)
        """(subscriptions' generation, `Market.version`) the index was built at."""

    # Private channels

    def publish(self, events: list[Event], summaries: bool = True) -> None:
        """Fan engine events out: one notification per channel and connection, in route order.

        ``summaries=False`` leaves out ``account.summary`` for a batch that books more trades before
        its last publish (``paper/trades``): the summary is the whole account, sent once at the end.
        """
        if not events:
            return
        exchange = self.exchange
        touched = self._note_trades(events)
        traded = touched if summaries else set()
        private = ROUTES.channels() | {"account.summary"}
        for conn in exchange.connections:
            if conn.session is None or not conn.channels.intersection(private):
                continue
            account_id = conn.session.account.account_id
            mine = [e for e in events if e.account_id == account_id]
            if mine:
                self._send_routes(conn, mine)
            if account_id in traded and "account.summary" in conn.channels:
                conn.notify("account.summary", exchange.engine.account_summary(conn.session.account))
        for event in events:
            if event.kind == "portfolio":
                self.portfolio_marks[(event.account_id, event.payload["instrument_name"])] = event.payload[
                    "mark_price"
                ]
        for channel in list(exchange.subscriptions.channels.values()):
            family = CHANNELS.family(channel.family)
            if family is not None and family.on_events is not None:
                family.on_events(exchange, channel, events)

    def _note_trades(self, events: list[Event]) -> set[str]:
        """Trade statistics; the accounts whose summary changed. A trade changes its instrument's
        ticker (last price, volume, open interest): that instrument is touched, not every channel
        (a 1,000-leg closure would otherwise send every ticker and book again on every fill)."""
        touched: set[str] = set()
        for event in events:
            if event.kind == "trade":
                if event.payload["trade_type"] != "rfq":  # block trades are not the book's last price
                    self.exchange.stats.note(event.payload, event.account_id)
                self.exchange.market.touch(event.payload["instrument_name"])
                touched.add(event.account_id)
            elif event.kind == "summary":
                touched.add(event.account_id)
        return touched

    @staticmethod
    def _send_routes(conn: Connection, events: list[Event]) -> None:
        assert conn.session is not None
        for route in ROUTES.routes:
            if route.channel not in conn.channels:
                continue
            payloads = [
                e.payload
                for e in events
                if e.kind == route.kind
                and (route.scope == "account" or e.session_id == conn.session.session_id)
                and (route.keep is None or route.keep(e))
            ]
            if payloads:
                conn.notify(route.channel, _combine(route, payloads))

    def broadcast(self, channel: Channel, notification: Any, logged: dict | None = None) -> None:
        """One notification to every subscriber of a public channel (serialised once)."""
        text = json.dumps({"channel_name": channel.name, "notification": notification})
        for conn in channel.subscribers:
            conn.push(text, logged)

    # Public market data

    def publish_channels(self, now: float, raw_only: bool) -> None:
        """Re-send market-data channels whose prices changed (delayed ones at most once per delay).

        After targeted changes only (`Market.touch`) the channels that show them and the delayed ones
        still waiting for their turn are looked at, not every channel: a tick load of 50 slices a
        second over 2,000 channels would otherwise examine 100,000 channels a second to send 4,000.
        """
        market = self.exchange.market
        touched, market.recently_touched = market.recently_touched, []
        if market.version == self._swept_version:
            channels = list({id(c): c for c in (*self._showing(touched), *self._waiting)}.values())
        else:
            channels = list(self.exchange.subscriptions.channels.values())
            self._swept_version = market.version
        self._waiting = []
        stamp = market.stamp()
        for channel in channels:
            if channel.sent_version == stamp or (channel.target and not self._active(channel.target)):
                continue
            if channel.delay > 0 and (raw_only or now - channel.last_sent < channel.delay):
                self._waiting.append(channel)
                continue
            if channel.sent_version[0] == market.version and not self._touched(channel):
                channel.sent_version = stamp
                continue
            self.send_channel(channel, now)

    def _shows(self, channel: Channel) -> tuple[str, ...] | None:
        """The instruments and underlyings a channel shows: its instrument, the legs of its combination
        and its underlying's index (`base_price`: also what expires that day); None if unknown."""
        market = self.exchange.market
        if channel.family in INDEX_FAMILIES:
            return (channel.target,)
        if channel.family == "base_price":
            expiration = channel.params["expiration"]
            return (channel.target, *marketdata.expiring_on(market, channel.target, expiration))
        inst = market.get(channel.target)
        if inst is None:
            return None
        return (inst.name, inst.underlying, *(leg for leg, _ in inst.legs))

    def _touched(self, channel: Channel) -> bool:
        """Whether a targeted change since the channel last went out is one it shows."""
        names = self._shows(channel)
        if names is None:
            return True
        touches, seen = self.exchange.market.touches, channel.sent_version[1]
        return any(touches.get(name, 0) > seen for name in names)

    def _showing(self, names: list[str]) -> list[Channel]:
        """The channels that show any of `names` (and those whose target is unknown)."""
        subscriptions, market = self.exchange.subscriptions, self.exchange.market
        key = (subscriptions.generation, market.version)
        if self._index_key != key:
            self._index_key = key
            self._index = {}
            for channel in subscriptions.channels.values():
                for name in self._shows(channel) or ("",):
                    self._index.setdefault(name, []).append(channel)
        return [c for name in ("", *dict.fromkeys(names)) for c in self._index.get(name, ())]

    def _active(self, target: str) -> bool:
        """A channel's instrument or underlying still trades (an expired one's channels go quiet)."""
        market = self.exchange.market
        return target in market.index or market.get(target) is not None

    def send_channel(self, channel: Channel, now: float) -> None:
        family = CHANNELS.family(channel.family)
        channel.sent_version = self.exchange.market.stamp()
        channel.last_sent = now
        if family is not None and family.render is not None and channel.subscribers:
            family.render(self.exchange, channel, now)

    def log_ticker(self, name: str, now: float, channel: str = "ticker") -> dict:
        """Remember when market data left: a price change reaches a client as a ticker *and* a book.

        `time` is when the notification was queued, `sent` when the first connection's writer
        handed it to its websocket (None until then).
        """
        row = {
            "instrument_name": name,
            "channel": channel,
            "time": time.time(),
            "sent": None,
            "mark_timestamp": now,
            "mark_price": self.exchange.market.mark(name).price,
        }
        self.ticker_log.append(row)
        return row

    # After prices moved

    def after_market_change(self, now: float) -> None:
        """Prices moved: maker fills for crossed orders, raw feeds, portfolio lines that moved 1 %,
        margin breaches."""
        exchange = self.exchange
        exchange.market.sample_index(now)
        self.publish(exchange.engine.on_market(now))
        exchange.react(now)
        self.publish_channels(now, raw_only=True)
        moved: list[Event] = []
        for (account_id, name), sent_mark in list(self.portfolio_marks.items()):
            account = exchange.engine.accounts.get(account_id)
            position = account.positions.get(name) if account else None
            if position is None:
                del self.portfolio_marks[(account_id, name)]
                continue
            mark = exchange.market.mark(name).price
            if sent_mark and abs(mark - sent_mark) > PORTFOLIO_MARK_MOVE * abs(sent_mark):
                moved.append(Event("portfolio", account_id, None, exchange.engine.portfolio_entry(position)))
        self.publish(moved)
        self.publish(risk.check(exchange.engine, now))

    def instruments_changed(self, added: list[Instrument], removed: list[Instrument]) -> None:
        """The ``instruments`` channel: ``{added: Instrument}`` / ``{removed: Instrument}`` items."""
        market = self.exchange.market
        items = [
            {"removed": inst.to_wire(market.settlements.get(inst.name))} for inst in removed if inst.is_listed
        ]
        items += [{"added": inst.to_wire()} for inst in added]
        if not items:
            return
        for channel in self.exchange.subscriptions.of_family("instruments"):
            self.broadcast(channel, items)


def _combine(route: Route, payloads: list[Any]) -> Any:
    if route.combine == "last":
        return payloads[-1]
    if route.combine == "lines":
        return list({p["instrument_name"]: p for p in payloads}.values())
    if route.combine == "notifications":
        return {"notifications": list(reversed(payloads))}
    return payloads
