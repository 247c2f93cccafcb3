"""Channels of the trading families that issue 18 implements (conditional orders, bots, market-maker
protection, RFQs): registered here so subscribing works as on Thalex, valid and empty until their
family fills them.

A family module replaces its placeholder with ``CHANNELS.register(Family(...), replace=True)`` and
publishes engine events of the kinds routed below (``Event(kind, account_id, session_id, payload)``):

| kind | channel | notification |
|---|---|---|
| ``conditional_orders`` | ``account.conditional_orders`` | the payload of the last event: the full list |
| ``bots`` | ``account.bots`` | the payload of the last event: the full list |
| ``mm_protection`` | ``session.mm_protection`` (the event's session) | the payloads as a list |
| ``rfq`` | ``account.rfqs`` | the payloads (``Rfq``) as a list |
| ``rfq_history`` | ``account.rfq_history`` | the payloads (``Rfq``) as a list |
| ``mm_rfq`` | ``mm.rfqs`` | the payloads (``Rfq``) as a list |
| ``mm_rfq_quote`` | ``mm.rfq_quotes`` | the payloads (``RfqOrder``) as a list |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.channels.registry import CHANNELS, ROUTES, Channel, Family

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _empty(exchange: PaperExchange, conn: Connection, channel: Channel) -> None:
    """Nothing of this family exists yet: the snapshot Thalex sends is an empty list."""
    conn.notify(channel.name, [])


# "The feed contains a full set ... every time": a snapshot on subscription.
CHANNELS.register(Family("account.conditional_orders", True, snapshot=_empty))
CHANNELS.register(Family("account.bots", True, snapshot=_empty))
# "When subscribing, a snapshot will be sent with all currently open requests / active quotes."
CHANNELS.register(Family("account.rfqs", True, snapshot=_empty))
CHANNELS.register(Family("mm.rfqs", True, snapshot=_empty))
CHANNELS.register(Family("mm.rfq_quotes", True, snapshot=_empty))
# No snapshot documented: updates only.
CHANNELS.register(Family("account.rfq_history", True))
CHANNELS.register(Family("session.mm_protection", True))

ROUTES.route("conditional_orders", "account.conditional_orders", combine="last")
ROUTES.route("bots", "account.bots", combine="last")
ROUTES.route("mm_protection", "session.mm_protection", scope="session")
ROUTES.route("rfq", "account.rfqs")
ROUTES.route("rfq_history", "account.rfq_history")
ROUTES.route("mm_rfq", "mm.rfqs")
ROUTES.route("mm_rfq_quote", "mm.rfq_quotes")
