"""How market makers trade on the paper exchange besides single orders, in one place.

Mass quotes with protection, conditional orders, bots, RFQs and the control API's rogue bots all act
on the same engine; :meth:`Automation.tick` lets the ones that act by themselves (conditional
triggers, bots, RFQ makers and takers, rogues) act on the latest prices and fills. The exchange calls
it after every price change and on every turn of its market loop.
"""

from __future__ import annotations

from services.paper.accounts import Event, Session
from services.paper.bots import Bots
from services.paper.conditional import ConditionalOrders
from services.paper.engine import Engine
from services.paper.marketdata import TradeStats
from services.paper.quoting import MassQuotes
from services.paper.rfq import Rfqs
from services.paper.rogue import Rogues


class Automation:
    def __init__(self, engine: Engine, stats: TradeStats) -> None:
        self.engine = engine
        self.quotes = MassQuotes(engine)
        self.conditional = ConditionalOrders(engine, stats)
        self.bots = Bots(engine, stats)
        self.rfqs = Rfqs(engine)
        self.rogues = Rogues(engine, self.quotes, self.bots)
        self.control_sessions: dict[str, Session] = {}
        """``paper/mass_quote``: one persistent session per key, as a second connection of the account."""

    def control_session(self, key_id: str, account_id: str) -> Session:
        session = self.control_sessions.get(key_id)
        if session is None or session.session_id not in self.engine.sessions:
            session = self.control_sessions[key_id] = self.engine.open_session(account_id, read_only=False)
        return session

    def tick(self, now: float) -> list[Event]:
        self.quotes.prune()
        events = self.conditional.tick(now)
        events += self.bots.tick(now)
        events += self.rfqs.tick(now)
        events += self.rogues.tick(now)
        return events
