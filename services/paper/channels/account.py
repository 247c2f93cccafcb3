"""Private account channels: orders, trades, portfolio and summary of the logged-in account."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _account_orders(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.engine.open_orders(conn.session.account))


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
CHANNELS.register(Family("session.orders", True, snapshot=_session_orders))
CHANNELS.register(Family("account.trade_history", True))
CHANNELS.register(Family("account.portfolio", True, snapshot=_portfolio))
CHANNELS.register(Family("account.summary", True, snapshot=_summary))

ROUTES.route("orders", "account.orders")
ROUTES.route("orders", "session.orders", scope="session")
ROUTES.route("trade", "account.trade_history")
ROUTES.route("portfolio", "account.portfolio", combine="lines")
