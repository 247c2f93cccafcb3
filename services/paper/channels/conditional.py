"""``account.conditional_orders``: the full list of the account's conditional orders on every change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.automation.conditional.listing(conn.session.account.account_id))


CHANNELS.register(Family("account.conditional_orders", True, snapshot=_snapshot))

ROUTES.route("conditional_orders", "account.conditional_orders", combine="last")
