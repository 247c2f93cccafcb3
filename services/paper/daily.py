"""The paper's day: what happens as its clock passes 08:00 UTC, Thalex's settlement time.

At each 08:00 UTC, in order: instruments expiring then are settled at their delivery price
(:func:`services.paper.settlement.expire`), every account is settled
(:func:`services.paper.settlement.settle`), funding marks restart at 0, and instruments due by
then are listed. Funding accrues with the paper's clock (not while the market is paused), up to
each 08:00 first, so jumping the clock over several days settles each day in turn.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.paper import risk, settlement
from services.paper.instruments import SECONDS_PER_DAY, next_boundary

if TYPE_CHECKING:
    from services.paper.server import PaperExchange

log = logging.getLogger(__name__)

LAST_TICK_BEFORE = 0.001
"""Seconds before 08:00 UTC the day's last market data is stamped (a tick stamped 08:00 is the new day's)."""


class DailyCycle:
    def __init__(self, exchange: PaperExchange) -> None:
        self.exchange = exchange
        now = exchange.clock()
        self.next = next_boundary(now)
        """The next 08:00 UTC to process."""
        self.funded_until = now

    def advance_to(self, now: float) -> int:
        """Bring the market to ``now``; returns how many 08:00 UTC boundaries were processed."""
        turned = 0
        while self.next <= now:
            self.close_day()
            self._turn(self.next)
            self.next += SECONDS_PER_DAY
            turned += 1
        self._accrue(now)
        return turned

    def close_day(self) -> None:
        """The day's last market state, stamped just before the next 08:00: funding accrued up to it
        and every market-data channel sent (so a subscriber sees the funding the settlement realises,
        even when the clock jumped over the day)."""
        last = self.next - LAST_TICK_BEFORE
        if last > self.funded_until:
            self._accrue(last)
            self.exchange.market.version += 1
            self.exchange.fanout.publish_channels(last, raw_only=False)

    def _accrue(self, until: float) -> None:
        market = self.exchange.market
        if until > self.funded_until:
            if not market.paused:
                market.accrue_funding(until - self.funded_until)
            self.funded_until = until
        market.set_time(until)

    def _turn(self, at: float) -> None:
        exchange = self.exchange
        market, engine = exchange.market, exchange.engine
        self.funded_until = max(self.funded_until, at)  # the day's funding ends with its last tick
        market.set_time(at)
        expired = market.expire(at)
        events = settlement.expire(engine, expired, at)
        events += settlement.settle(engine, at)
        added = market.list_new(at)
        exchange.fanout.publish(events)
        exchange.fanout.publish(risk.check(engine, at))
        exchange.fanout.instruments_changed(added, expired)
        exchange.record_prices(at, force=True)
        log.info(
            "08:00 UTC at %.0f: %d expired, %d listed, %d accounts settled",
            at,
            len(expired),
            len(added),
            len(engine.accounts),
        )
