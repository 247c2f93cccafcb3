"""The channel registry and the subscriptions of every connection.

A channel family registers once (``CHANNELS.register(Family(...))``) in its own module of
:mod:`services.paper.channels`:

* ``parse`` turns a channel name's parts into a :class:`Channel` (raising :class:`NotAChannel` for a
  malformed name or an unknown instrument); families without ``parse`` are exact names such as
  ``account.orders``;
* ``snapshot`` sends what a new subscriber receives at once (Thalex sends e.g. the open orders);
* ``render`` gives the notification of a market-data channel whenever prices moved (at most once
  per the channel's delay); event channels leave it None and are fed by :mod:`services.paper.fanout`.

Subscribing follows api.yaml: every valid channel is subscribed and listed in the result, anything
else is left out of it, and the call itself never fails for a bad channel name. ``paper/leave_out``
makes it leave out (and not subscribe) valid channels too, as Thalex may: a client must check the
answer, not trust the absence of an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.engine import Event
    from services.paper.server import PaperExchange

DELAYS: dict[str, float] = {
    "raw": 0.0,
    "100ms": 0.1,
    "200ms": 0.2,
    "500ms": 0.5,
    "1000ms": 1.0,
    "5000ms": 5.0,
    "60000ms": 60.0,
}


class NotAChannel(Exception):
    """The name is not a channel this exchange can serve (malformed, or an unknown instrument)."""


@dataclass(eq=False)
class Channel:
    """One subscribed channel name, shared by its subscribers; ``views`` hold each subscriber's book."""

    name: str
    family: str
    target: str = ""
    delay: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    subscribers: set[Connection] = field(default_factory=set)
    views: dict[Connection, Any] = field(default_factory=dict)
    sent_version: tuple[int, int] = (-1, -1)
    """`Market.stamp()` when the channel last went out (or was found to show nothing new)."""
    last_sent: float = 0.0


Parse = Callable[["PaperExchange", str, list[str]], Channel]
Snapshot = Callable[["PaperExchange", "Connection", Channel], None]
Render = Callable[["PaperExchange", Channel, float], None]
OnEvents = Callable[["PaperExchange", Channel, list["Event"]], None]


@dataclass(frozen=True)
class Family:
    """How one kind of channel is named, what a subscriber gets at once and (market data) on every move."""

    prefix: str
    private: bool
    parse: Parse | None = None
    snapshot: Snapshot | None = None
    render: Render | None = None
    """Send the channel's notification to its subscribers (market-data channels)."""
    on_events: OnEvents | None = None
    """Public event feeds (recent trades, instruments...): send what a batch of engine events means."""


class ChannelRegistry:
    """Families by exact name (``account.orders``) or by first name part (``ticker``)."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def register(self, family: Family, *, replace: bool = False) -> Family:
        if family.prefix in self._families and not replace:
            raise ValueError(f"channel family {family.prefix} registered twice")
        self._families[family.prefix] = family
        return family

    def family(self, prefix: str) -> Family | None:
        return self._families.get(prefix)

    def resolve(self, exchange: PaperExchange, name: str) -> tuple[Family, Channel]:
        """The family and a fresh :class:`Channel` for ``name`` (raises NotAChannel)."""
        family = self._families.get(name)
        if family is not None and family.parse is None:
            return family, Channel(name, family.prefix)
        parts = name.split(".")
        family = self._families.get(parts[0])
        if family is None or family.parse is None:
            raise NotAChannel(f"unknown channel {name}")
        return family, family.parse(exchange, name, parts)

    def names(self) -> list[str]:
        return sorted(self._families)


CHANNELS = ChannelRegistry()


@dataclass(frozen=True)
class Route:
    """Engine events of one kind go to one private channel of the account (or of the session).

    ``combine``: ``list`` sends the payloads as one list; ``last`` sends the last payload (channels
    whose notification is a full set); ``lines`` keeps the last payload per ``instrument_name``;
    ``notifications`` wraps them, newest first, as a ``Notifications`` object. ``keep`` picks the
    events the channel carries.
    """

    kind: str
    channel: str
    scope: str = "account"
    combine: str = "list"
    keep: Callable[[Event], bool] | None = None


class Routes:
    """Event kind -> private channels, in registration order (the order notifications go out)."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(
        self,
        kind: str,
        channel: str,
        *,
        scope: str = "account",
        combine: str = "list",
        keep: Callable[[Event], bool] | None = None,
    ) -> None:
        if scope not in ("account", "session") or combine not in ("list", "last", "lines", "notifications"):
            raise ValueError(f"bad route for {kind}: scope {scope}, combine {combine}")
        self.routes.append(Route(kind, channel, scope, combine, keep))

    def channels(self) -> set[str]:
        return {route.channel for route in self.routes}


ROUTES = Routes()


def known_instrument(exchange: PaperExchange, name: str) -> None:
    """An active instrument, or a combination ``[A:1,B:-1]`` of active ones."""
    if exchange.market.get(name) is None:
        raise NotAChannel(f"unknown instrument {name}")


def delay_of(text: str, name: str) -> float:
    if text not in DELAYS:
        raise NotAChannel(f"invalid delay in {name}")
    return DELAYS[text]


class Subscriptions:
    """Which connection follows which channel; the shared :class:`Channel` objects of public channels."""

    def __init__(self, exchange: PaperExchange) -> None:
        self.exchange = exchange
        self.channels: dict[str, Channel] = {}
        self.generation = 0
        """Moves whenever a channel is added or removed (what the fanout's index is built from)."""
        self.left_out: dict[str, int | None] = {}
        """``paper/leave_out``: channel → how many more answers leave it out (None: until cleared)."""

    def subscribe(self, conn: Connection, names: list[Any], private: bool) -> list[str]:
        """Subscribe every valid name; the result lists them (invalid ones are left out, never an error).

        ``public/subscribe`` takes public channels only; ``private/subscribe`` (logged in) takes both.
        """
        accepted: list[str] = []
        for name in names:
            if not isinstance(name, str) or name in accepted or self._leave_out(name):
                continue
            try:
                family, channel = self._resolve(name)
            except NotAChannel:
                continue
            if family.private and (not private or conn.session is None):
                continue
            accepted.append(name)
            if name in conn.channels:
                continue
            conn.channels.add(name)
            if not family.private:
                if name not in self.channels:
                    # The first subscriber's snapshot counts as the channel's latest send.
                    channel.sent_version = self.exchange.market.stamp()
                    channel.last_sent = self.exchange.clock()
                    self.channels[name] = channel
                    self.generation += 1
                channel = self.channels[name]
                channel.subscribers.add(conn)
            if family.snapshot is not None:
                snapshot = family.snapshot
                conn.after.append(functools.partial(self._snapshot, conn, channel, snapshot))
        return accepted

    def _leave_out(self, name: str) -> bool:
        """Leave ``name`` out of this answer (``paper/leave_out``); counts one answer down."""
        if name not in self.left_out:
            return False
        remaining = self.left_out[name]
        if remaining is not None:
            if remaining <= 1:
                del self.left_out[name]
            else:
                self.left_out[name] = remaining - 1
        return True

    def unsubscribe(self, conn: Connection, names: list[Any]) -> list[str]:
        removed = [name for name in dict.fromkeys(names) if isinstance(name, str) and name in conn.channels]
        for name in removed:
            self.leave(conn, name)
        return removed

    def leave(self, conn: Connection, name: str) -> None:
        conn.channels.discard(name)
        channel = self.channels.get(name)
        if channel is not None:
            channel.subscribers.discard(conn)
            channel.views.pop(conn, None)
            if not channel.subscribers:
                del self.channels[name]
                self.generation += 1

    def leave_all(self, conn: Connection) -> None:
        for name in list(conn.channels):
            self.leave(conn, name)

    def of_family(self, prefix: str) -> list[Channel]:
        return [c for c in self.channels.values() if c.family == prefix]

    def _resolve(self, name: str) -> tuple[Family, Channel]:
        shared = self.channels.get(name)
        if shared is not None:
            family = CHANNELS.family(shared.family)
            assert family is not None
            return family, shared
        return CHANNELS.resolve(self.exchange, name)

    def _snapshot(self, conn: Connection, channel: Channel, snapshot: Snapshot) -> None:
        if channel.name in conn.channels:  # still subscribed when the answer has gone out
            snapshot(self.exchange, conn, channel)
