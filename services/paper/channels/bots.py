"""``account.bots``: the full list of the account's bots, running and stopped, on every change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.automation.bots.listing(conn.session.account.account_id))


CHANNELS.register(Family("account.bots", True, snapshot=_snapshot))

ROUTES.route("bots", "account.bots", combine="last")
