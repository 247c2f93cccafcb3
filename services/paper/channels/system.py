"""Public exchange-wide channels: ``instruments``, ``system`` and ``banners`` (``rfqs``: channels/rfq.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _instruments(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    """On subscription every active instrument as ``{added: ...}``; then additions and removals
    (:meth:`services.paper.fanout.Fanout.instruments_changed`)."""
    conn.notify(channel.name, [{"added": inst.to_wire()} for inst in exchange.market.instruments.values()])


CHANNELS.register(Family("instruments", False, snapshot=_instruments))
# system: the reconnect notice goes to every connection anyway; subscribing is accepted.
CHANNELS.register(Family("system", False))
CHANNELS.register(
    Family("banners", False, snapshot=lambda ex, conn, ch: conn.notify(ch.name, list(ex.banners)))
)
