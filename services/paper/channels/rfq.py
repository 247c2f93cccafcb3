"""RFQ channels: ``account.rfqs`` and ``account.rfq_history`` (the requester's), ``mm.rfqs`` (RFQs the
account may quote), ``mm.rfq_quotes`` (its quotes and the quotes on its RFQs) and the public ``rfqs``
(recently traded RFQs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.accounts import Event
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _account_rfqs(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.automation.rfqs.open_rfqs(conn.session.account.account_id, "Existing"))


def _mm_rfqs(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.automation.rfqs.mm_rfqs(conn.session.account.account_id))


def _mm_rfq_quotes(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    assert conn.session is not None
    conn.notify(channel.name, exchange.automation.rfqs.quote_feed(conn.session.account.account_id))


def _traded_snapshot(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    conn.notify(channel.name, list(exchange.automation.rfqs.traded))


def _traded(exchange: PaperExchange, channel: Channel, events: list[Event]) -> None:
    traded = [e.payload for e in events if e.kind == "rfq_traded"]
    if traded:
        exchange.fanout.broadcast(channel, traded)


CHANNELS.register(Family("rfqs", False, snapshot=_traded_snapshot, on_events=_traded))
CHANNELS.register(Family("account.rfqs", True, snapshot=_account_rfqs))
CHANNELS.register(Family("account.rfq_history", True))
CHANNELS.register(Family("mm.rfqs", True, snapshot=_mm_rfqs))
CHANNELS.register(Family("mm.rfq_quotes", True, snapshot=_mm_rfq_quotes))

ROUTES.route("rfq", "account.rfqs")
ROUTES.route("rfq_history", "account.rfq_history")
ROUTES.route("mm_rfq", "mm.rfqs")
ROUTES.route("rfq_quote", "mm.rfq_quotes")
