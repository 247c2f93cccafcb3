"""A rogue bot that does not listen: it keeps re-opening a position on an account after it is closed.

For tests and demos of a guardian that must keep a position closed (control API ``paper/start_rogue_bot``).
Pure (every call takes ``now``). When the account's position in the instrument has been short of
``position`` (closer to flat, or on the other side) for ``delay`` seconds, the rogue re-opens it,
taking turns among its ``modes``:

* ``orders`` — a plain market order of the account (label ``label``);
* ``mass_quotes`` — a mass quote of its own session of the account at the touch, under a protection
  group it sets itself, which simulated flow then fills (a maker quote fill);
* ``grid`` — a real grid bot of the account (``private/bots`` lists it; ``base_position`` is the
  rogue's position), whose orders on the needed side simulated flow fills.

Whatever the account's clients do — ``cancel_all``, ``cancel_mass_quote``, ``cancel_all_bots`` — it
comes back: it re-sets its protection before quoting and re-creates its grid bot when it was stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.paper.accounts import EPS, Event, Session
from services.paper.bots import Bots
from services.paper.engine import Engine
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.market import Instrument, align_down
from services.paper.quoting import MassQuotes

MODES = ("orders", "mass_quotes", "grid")
GRID_LEVELS = 3
"""Grid levels on each side of the mark, ``GRID_SPACING_TICKS`` apart."""
GRID_SPACING_TICKS = 20
GRID_RUN = 24 * 3600.0


@dataclass
class Rogue:
    rogue_id: str
    key_id: str
    account_id: str
    instrument: Instrument
    position: float
    modes: tuple[str, ...]
    delay: float
    label: str
    session: Session
    active: bool = True
    grid_bot_id: str | None = None
    short_since: float | None = None
    turn: int = 0
    reopened: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))

    def to_wire(self) -> dict[str, Any]:
        return {
            "rogue_id": self.rogue_id,
            "key_id": self.key_id,
            "instrument_name": self.instrument.name,
            "position": self.position,
            "modes": list(self.modes),
            "delay": self.delay,
            "label": self.label,
            "active": self.active,
            "grid_bot_id": self.grid_bot_id,
            "reopened": dict(self.reopened),
        }


class Rogues:
    def __init__(self, engine: Engine, quotes: MassQuotes, bots: Bots) -> None:
        self.engine = engine
        self.quotes = quotes
        self.bots = bots
        self.rogues: dict[str, Rogue] = {}

    def start(
        self, key_id: str, account_id: str, inst: Instrument, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        position = params.get("position")
        if isinstance(position, bool) or not isinstance(position, int | float) or abs(position) < EPS:
            raise RpcError(
                INVALID_REQUEST, "position must be the non-zero signed position the rogue re-opens"
            )
        modes = tuple(params.get("modes", MODES))
        if not modes or any(mode not in MODES for mode in modes):
            raise RpcError(INVALID_REQUEST, f"modes must be a list of {', '.join(MODES)}")
        delay = params.get("delay", 1.0)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise RpcError(INVALID_REQUEST, "delay must be a non-negative number of seconds")
        label = params.get("label", "rogue")
        if not isinstance(label, str) or not label:
            raise RpcError(INVALID_REQUEST, "label must be a non-empty string")
        session = self.engine.open_session(account_id, read_only=False)
        rogue = Rogue(
            f"rogue-{len(self.rogues) + 1}",
            key_id,
            account_id,
            inst,
            float(position),
            modes,
            float(delay),
            label,
            session,
        )
        self.rogues[rogue.rogue_id] = rogue
        events = self._keep_grid(rogue, now)
        return rogue.to_wire(), events

    def stop(self, rogue_id: Any, now: float) -> tuple[dict[str, Any], list[Event]]:
        """Stop re-opening; its grid bot (``admin_cancel``) and its quotes go with it."""
        rogue = self.rogues.get(str(rogue_id))
        if rogue is None:
            raise RpcError(INVALID_REQUEST, f"unknown rogue_id {rogue_id}")
        events: list[Event] = []
        if rogue.active:
            rogue.active = False
            bot = self.bots.get(rogue.account_id, rogue.grid_bot_id or "")
            if bot is not None and bot.status == "active":
                events.extend(self.bots.stop(bot, "admin_cancel", now))
            events.extend(self.engine.close_session(rogue.session, now))
        return rogue.to_wire(), events

    def listing(self) -> list[dict[str, Any]]:
        return [rogue.to_wire() for rogue in self.rogues.values()]

    def tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        for rogue in self.rogues.values():
            if rogue.active and rogue.instrument.name not in self.engine.market.instruments:
                events.extend(self.stop(rogue.rogue_id, now)[1])  # its instrument expired
            if rogue.active:
                events.extend(self._keep_grid(rogue, now))
                events.extend(self._step(rogue, now))
        return events

    def _missing(self, rogue: Rogue) -> float:
        """How much the account must buy (+) or sell (-) to hold the rogue's position again."""
        account = self.engine.accounts[rogue.account_id]
        held = (
            account.positions[rogue.instrument.name].position
            if rogue.instrument.name in account.positions
            else 0.0
        )
        gap = rogue.position - held
        short = gap > EPS if rogue.position > 0 else gap < -EPS
        if not short:
            return 0.0
        size = align_down(abs(gap), rogue.instrument.volume_tick_size)
        return size if gap > 0 else -size

    def _step(self, rogue: Rogue, now: float) -> list[Event]:
        missing = self._missing(rogue)
        if abs(missing) < rogue.instrument.min_order_amount - EPS:
            rogue.short_since = None
            return []
        if rogue.short_since is None:
            rogue.short_since = now
        if now - rogue.short_since < rogue.delay - EPS:
            return []
        mode = rogue.modes[rogue.turn % len(rogue.modes)]
        rogue.turn += 1
        rogue.short_since = None
        direction = "buy" if missing > 0 else "sell"
        try:
            if mode == "orders":
                events = self._order(rogue, direction, abs(missing), now)
            elif mode == "mass_quotes":
                events = self._quote(rogue, direction, abs(missing), now)
            else:
                events = self._grid_flow(rogue, direction, abs(missing), now)
        except RpcError:
            return []  # refused (margin 24, an expired instrument): the next turn tries again
        if any(e.kind == "trade" for e in events):
            rogue.reopened[mode] += 1
        return events

    def _order(self, rogue: Rogue, direction: str, size: float, now: float) -> list[Event]:
        params = {
            "instrument_name": rogue.instrument.name,
            "direction": direction,
            "amount": size,
            "order_type": "market",
            "label": rogue.label,
        }
        account = self.engine.accounts[rogue.account_id]
        return self.engine.place(account, params, now, rogue.session)[1]

    def _quote(self, rogue: Rogue, direction: str, size: float, now: float) -> list[Event]:
        """Quote the missing size at the touch from the rogue's session; simulated flow fills the quote."""
        inst = rogue.instrument
        events = self.quotes.set_protection(
            rogue.session, {"product": inst.product, "trade_amount": size, "quote_amount": size}
        )
        bids, asks = self.engine.market.book(inst.name)
        touch = bids if direction == "buy" else asks
        if not touch:
            return events
        key = "b" if direction == "buy" else "a"
        request = {
            "quotes": [{"i": inst.name, key: [[touch[0][0], size]]}],
            "label": rogue.label,
            "post_only": True,
        }
        _, placed = self.quotes.mass_quote(rogue.session, request, now)
        events.extend(placed)
        account = self.engine.accounts[rogue.account_id]
        for order in list(account.orders.values()):
            if order.mass_quote and order.session_id == rogue.session.session_id and order.instrument is inst:
                events.extend(self.engine.fill_resting(now, rogue.account_id, order_id=order.order_id))
        return events

    def _grid_flow(self, rogue: Rogue, direction: str, size: float, now: float) -> list[Event]:
        """Simulated flow fills the grid bot's orders on the side that re-opens the position."""
        account = self.engine.accounts[rogue.account_id]
        events: list[Event] = []
        left = size
        for order in sorted(
            (
                o
                for o in account.orders.values()
                if o.bot_id == rogue.grid_bot_id and o.direction == direction
            ),
            key=lambda o: -(o.price or 0.0) if direction == "buy" else (o.price or 0.0),
        ):
            if left < rogue.instrument.min_order_amount - EPS:
                break
            filled = self.engine.fill_resting(now, rogue.account_id, order_id=order.order_id, amount=left)
            left -= sum(e.payload["amount"] for e in filled if e.kind == "trade")
            events.extend(filled)
        return events

    def _keep_grid(self, rogue: Rogue, now: float) -> list[Event]:
        """The rogue's grid bot runs; stopped for any reason, a new one starts around the mark."""
        if "grid" not in rogue.modes:
            return []
        bot = self.bots.get(rogue.account_id, rogue.grid_bot_id or "")
        if bot is not None and bot.status == "active":
            return []
        inst = rogue.instrument
        mark = self.engine.market.mark(inst.name).price
        spacing = GRID_SPACING_TICKS * inst.tick_size
        center = align_down(mark, inst.tick_size)
        grid = [round(center + k * spacing, 10) for k in range(-GRID_LEVELS, GRID_LEVELS + 1) if k != 0]
        step = min(
            align_down(abs(rogue.position) / GRID_LEVELS, inst.volume_tick_size), 100 * inst.volume_tick_size
        )
        params = {
            "strategy": "grid",
            "instrument_name": inst.name,
            "grid": grid,
            "step_size": max(step, inst.min_order_amount),
            "base_position": rogue.position,
            "target_mean_price": mark,
            "upside_exit_price": round(grid[-1] + 100 * inst.tick_size, 10),
            "downside_exit_price": round(grid[0] - 100 * inst.tick_size, 10),
            "end_time": now + GRID_RUN,
            "label": rogue.label,
        }
        account = self.engine.accounts[rogue.account_id]
        try:
            wire, events = self.bots.create(account, params, now)
        except RpcError:
            return []  # e.g. the instrument expired: the rogue keeps its other modes
        rogue.grid_bot_id = wire["bot_id"]
        return events
