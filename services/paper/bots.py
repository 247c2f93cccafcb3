"""Thalex's server-side bots (``private/create_bot``): they trade for the account until stopped.

Pure (every call takes ``now``). Each step a bot asks its strategy (:mod:`services.paper.strategies`)
for a plan and carries it out on the paper's market: its resting quotes become exactly the planned
ones (orders with ``bot_id`` and the bot's label; levels that would cross the book wait until they
no longer do) and a planned position is traded to aggressively — a market order, or an
immediate-or-cancel limit within ``max_slippage`` % of the mark — at most once per
``TRADE_INTERVAL``. Bots keep trading whatever clients do (a ``cancel_all`` only makes them quote
again); they stop at ``end_time``, by ``cancel_bot`` / ``cancel_all_bots``, when the account's
remaining margin turns negative (``margin_breach``), when their instrument is gone
(``instrument_deactivated``) or when their strategy says so (exit prices: ``strategy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.paper.accounts import EPS, Account, Event
from services.paper.engine import MAX_LABEL_BYTES, Engine
from services.paper.errors import INVALID_REQUEST, ORDER_NOT_FOUND, RpcError
from services.paper.market import Instrument, align_down, align_up
from services.paper.marketdata import TradeStats
from services.paper.strategies import (
    DFollow,
    DHedge,
    Grid,
    Levels,
    Ocq,
    Params,
    Quote,
    Sgsl,
    Strategy,
    View,
)

BOT_ID_BASE = 0x00B0_0000_0000_0000
MAX_RUN = 7 * 24 * 3600.0
"""api.yaml: ``end_time`` must not be further away than a week."""
TRADE_INTERVAL = 1.0
"""Seconds between a bot's aggressive orders (a thin book or a tight slippage limit is retried)."""
STOP_REASONS = (
    "client_cancel",
    "client_bulk_cancel",
    "end_time",
    "instrument_deactivated",
    "margin_breach",
    "admin_cancel",
    "conflict",
    "strategy",
)
ORDER_DELETE_REASON = {
    "client_bulk_cancel": "client_bulk_cancel",
    "instrument_deactivated": "instrument_deactivated",
    "margin_breach": "margin_breach",
    "admin_cancel": "admin_cancel",
}
"""A stopping bot's orders are deleted for this reason (``client_cancel`` otherwise)."""
STRATEGIES = ("sgsl", "ocq", "levels", "grid", "dhedge", "dfollow")


@dataclass
class Bot:
    bot_id: str
    account_id: str
    instrument: Instrument
    strategy: Strategy
    end_time: float | None
    label: str | None
    max_slippage: float | None
    status: str = "active"
    stop_reason: str | None = None
    next_trade: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """The ``Bot`` object of its strategy."""
        wire: dict[str, Any] = {
            "bot_id": self.bot_id,
            "status": self.status,
            "strategy": self.strategy.name,
            "instrument_name": self.instrument.name,
            **self.strategy.fields(),
        }
        optional = {
            "stop_reason": self.stop_reason,
            "end_time": self.end_time,
            "label": self.label,
            "max_slippage": self.max_slippage,
        }
        wire.update({name: value for name, value in optional.items() if value is not None})
        return wire


class Bots:
    """Every account's bots, running and stopped (api.yaml lists both)."""

    def __init__(self, engine: Engine, stats: TradeStats) -> None:
        self.engine = engine
        self.stats = stats
        self.bots: dict[str, dict[str, Bot]] = {}
        self._next = BOT_ID_BASE

    def listing(self, account_id: str) -> list[dict[str, Any]]:
        """``private/bots`` and every ``account.bots`` notification."""
        return [bot.to_wire() for bot in self.bots.get(account_id, {}).values()]

    def get(self, account_id: str, bot_id: str) -> Bot | None:
        return self.bots.get(account_id, {}).get(bot_id)

    def create(
        self, account: Account, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        bot = self._parse(account, params, now)
        self._next += 1
        bot.bot_id = f"{self._next:016X}"
        self.bots.setdefault(account.account_id, {})[bot.bot_id] = bot
        return bot.to_wire(), [self._changed(account.account_id)]

    def cancel(self, account: Account, params: dict[str, Any], now: float) -> list[Event]:
        """``cancel_bot``: stopping a stopped bot again is harmless."""
        bot_id = params.get("bot_id")
        if not isinstance(bot_id, str):
            raise RpcError(INVALID_REQUEST, "bot_id must be a string")
        bot = self.get(account.account_id, bot_id)
        if bot is None:
            raise RpcError(ORDER_NOT_FOUND, "bot not found")
        return self.stop(bot, "client_cancel", now) if bot.status == "active" else []

    def cancel_all(self, account: Account, now: float, reason: str = "client_bulk_cancel") -> list[Event]:
        events: list[Event] = []
        for bot in list(self.bots.get(account.account_id, {}).values()):
            if bot.status == "active":
                events.extend(self.stop(bot, reason, now))
        return events

    def stop(self, bot: Bot, reason: str, now: float) -> list[Event]:
        """Stop a bot: its orders are deleted, its positions stay."""
        order_reason = ORDER_DELETE_REASON.get(reason, "client_cancel")
        account = self.engine.accounts[bot.account_id]
        events = [
            event
            for order in list(account.orders.values())
            if order.bot_id == bot.bot_id
            for event in self.engine.withdraw(order, order_reason, now)
        ]
        bot.status, bot.stop_reason = "stopped", reason
        events.append(self._changed(bot.account_id))
        return events

    def tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        for account_id, bots in self.bots.items():
            account = self.engine.accounts[account_id]
            breached: bool | None = None
            for bot in list(bots.values()):
                if bot.status != "active":
                    continue
                if breached is None:
                    breached = self.engine.account_summary(account)["remaining_margin"] < 0
                reason = self._stop_reason(bot, breached, now)
                events.extend(self.stop(bot, reason, now) if reason else self._step(bot, account, now))
        return events

    def _stop_reason(self, bot: Bot, breached: bool, now: float) -> str | None:
        if bot.instrument.name not in self.engine.market.instruments:
            return "instrument_deactivated"
        if bot.end_time is not None and now >= bot.end_time:
            return "end_time"
        return "margin_breach" if breached else None

    def _step(self, bot: Bot, account: Account, now: float) -> list[Event]:
        view = View(self.engine.market, self.stats, account, bot.instrument, now)
        plan = bot.strategy.plan(view)
        exiting = plan.target is not None and plan.stop is not None
        events = self._reconcile(bot, account, [] if exiting else plan.quotes, now)
        if plan.target is None:
            return events
        gap = plan.target - view.position()
        size = align_down(abs(gap), bot.instrument.volume_tick_size)
        if size < bot.instrument.min_order_amount - EPS:
            if plan.stop is not None:
                events.extend(self.stop(bot, plan.stop, now))
        elif now >= bot.next_trade:
            bot.next_trade = now + TRADE_INTERVAL
            events.extend(self._trade(bot, account, "buy" if gap > 0 else "sell", size, now))
        return events

    def _reconcile(self, bot: Bot, account: Account, quotes: list[Quote], now: float) -> list[Event]:
        """Make the bot's resting orders the planned quotes (levels crossing the book wait)."""
        bids, asks = self.engine.market.book(bot.instrument.name)
        wanted = [
            q
            for q in quotes
            if not (
                (q[0] == "buy" and asks and q[1] >= asks[0][0])
                or (q[0] == "sell" and bids and q[1] <= bids[0][0])
            )
        ]
        events: list[Event] = []
        for order in [o for o in account.orders.values() if o.bot_id == bot.bot_id]:
            match = next(
                (
                    q
                    for q in wanted
                    if q[0] == order.direction
                    and abs(q[1] - (order.price or 0.0)) <= EPS
                    and abs(q[2] - order.remaining) <= EPS
                ),
                None,
            )
            if match is not None:
                wanted.remove(match)
            else:
                events += self.engine.withdraw(order, "client_cancel", now)
        for direction, price, amount in wanted:
            params: dict[str, Any] = {
                "instrument_name": bot.instrument.name,
                "direction": direction,
                "amount": amount,
                "price": price,
                "post_only": True,
            }
            events.extend(self._place(bot, account, params, now))
        return events

    def _trade(self, bot: Bot, account: Account, direction: str, size: float, now: float) -> list[Event]:
        params: dict[str, Any] = {
            "instrument_name": bot.instrument.name,
            "direction": direction,
            "amount": size,
        }
        if bot.max_slippage is None:
            params["order_type"] = "market"
        else:
            mark, tick = self.engine.market.mark(bot.instrument.name).price, bot.instrument.tick_size
            move = bot.max_slippage / 100.0
            price = (
                align_down(mark * (1 + move), tick)
                if direction == "buy"
                else align_up(mark * (1 - move), tick)
            )
            params.update(
                order_type="limit", price=price, time_in_force="immediate_or_cancel", collar="clamp"
            )
        return self._place(bot, account, params, now)

    def _place(self, bot: Bot, account: Account, params: dict[str, Any], now: float) -> list[Event]:
        if bot.label is not None:
            params["label"] = bot.label
        try:
            _, events = self.engine.place(account, params, now, bot_id=bot.bot_id)
        except RpcError:
            return []  # e.g. beyond the collar: the next step tries again
        return events

    def _changed(self, account_id: str) -> Event:
        return Event("bots", account_id, None, self.listing(account_id))

    def _parse(self, account: Account, params: dict[str, Any], now: float) -> Bot:
        strategy_name = params.get("strategy")
        if strategy_name not in STRATEGIES:
            raise RpcError(INVALID_REQUEST, f"strategy must be one of {', '.join(STRATEGIES)}")
        inst = self.engine._instrument(params.get("instrument_name"))
        if inst.is_combination:
            raise RpcError(INVALID_REQUEST, "bots trade outright instruments")
        p = Params(params, inst)
        view = View(self.engine.market, self.stats, account, inst, now)
        instruments = self.engine.market.instruments
        strategy: Strategy
        if strategy_name == "sgsl":
            strategy = Sgsl.parse(p, view)
        elif strategy_name == "ocq":
            strategy = Ocq.parse(p, view)
        elif strategy_name == "levels":
            strategy = Levels.parse(p, view)
        elif strategy_name == "grid":
            strategy = Grid.parse(p, view)
        elif strategy_name == "dhedge":
            strategy = DHedge.parse(p, view, instruments)
        else:
            strategy = DFollow.parse(p, view, instruments)
        end_time = p.optional("end_time")
        if end_time is None and strategy_name != "dhedge":
            raise RpcError(INVALID_REQUEST, "missing parameter end_time")
        if end_time is not None and not now < end_time <= now + MAX_RUN:
            raise RpcError(INVALID_REQUEST, "end_time must be in the future and at most a week away")
        label = params.get("label")
        if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
            raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
        slippage = p.optional("max_slippage")
        if slippage is not None and slippage < 0:
            raise RpcError(INVALID_REQUEST, "max_slippage must not be negative")
        return Bot("", account.account_id, inst, strategy, end_time, label, slippage)
