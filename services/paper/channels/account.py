"""Private account channels: orders, trades, order history, portfolio, summary and the inbox."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _account_orders(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.engine.open_orders(conn.session.account))


def _persistent_orders(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    """api.yaml: "persistent (non-market-maker) orders only" — no mass quote, persistent or not."""
    assert conn.session is not None
    account = conn.session.account
    conn.notify(
        channel.name,
        [o.to_wire("existing") for o in account.orders.values() if o.persistent and not o.mass_quote],
    )


def _session_orders(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.engine.session_orders(conn.session))


def _portfolio(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    account = conn.session.account
    entries = exchange.engine.portfolio(account)
    for entry in entries:
        exchange.fanout.portfolio_marks[(account.account_id, entry["instrument_name"])] = entry["mark_price"]
    conn.notify(channel.name, entries)


def _summary(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.engine.account_summary(conn.session.account))


CHANNELS.register(Family("account.orders", True, snapshot=_account_orders))
CHANNELS.register(Family("account.persistent_orders", True, snapshot=_persistent_orders))
CHANNELS.register(Family("session.orders", True, snapshot=_session_orders))
CHANNELS.register(Family("account.trade_history", True))
CHANNELS.register(Family("account.order_history", True))
CHANNELS.register(Family("account.portfolio", True, snapshot=_portfolio))
CHANNELS.register(Family("account.summary", True, snapshot=_summary))
# Only what happens after subscribing (api.yaml); the history is private/notifications_inbox.
CHANNELS.register(Family("user.inbox_notifications", True))

ROUTES.route("orders", "account.orders")
ROUTES.route(
    "orders",
    "account.persistent_orders",
    keep=lambda event: bool(event.payload.get("persistent")) and not event.mass_quote,
)
ROUTES.route("orders", "session.orders", scope="session")
ROUTES.route("trade", "account.trade_history")
ROUTES.route("order_history", "account.order_history")
ROUTES.route("portfolio", "account.portfolio", combine="lines")
ROUTES.route("inbox", "user.inbox_notifications", combine="notifications")
