"""Conditional orders: stop, stop-limit, bracket and trailing stop (``private/create_conditional_order``).

Pure (every call takes ``now``). api.yaml: a buy activates when its trigger price (``target``: the
instrument's mark, its last aggressive trade, or the underlying's index) is at or above
``stop_price`` or at or below ``bracket_price``; a sell the other way round. A trailing stop's stop
trails the trigger price at ``price * (1 ± callback rate)``. Activation inserts an order for the
account: a good-till-cancelled limit at ``limit_price`` for a stop-limit, a market order otherwise,
with ``insert_reason: conditional_order``, the conditional order's id, its label and ``reduce_only``.
An activation the order checks refuse (a reduce-only order on a flat position...) leaves the
conditional order ``rejected`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.paper.accounts import EPS, Account, Event
from services.paper.engine import MAX_LABEL_BYTES, Engine
from services.paper.errors import INVALID_REQUEST, INVALID_STATE, ORDER_NOT_FOUND, RpcError
from services.paper.market import Instrument, align_down, align_up
from services.paper.marketdata import TradeStats
from services.paper.params import choice, flag, number

TARGETS = ("last", "mark", "index")
CONDITIONAL_ID_BASE = 0x00C0_0000_0000_0000
"""Conditional order ids are 16 hex digits like order ids, in a range of their own."""


@dataclass
class ConditionalOrder:
    """One conditional order and what became of it."""

    order_id: str
    account_id: str
    instrument: Instrument
    direction: str
    amount: float
    target: str
    stop_price: float
    create_time: float
    update_time: float
    limit_price: float | None = None
    bracket_price: float | None = None
    callback_rate: float | None = None
    label: str | None = None
    reduce_only: bool = False
    status: str = "created"
    convert_time: float | None = None
    converted_order_id: str | None = None
    reject_reason: str = ""
    seen_volume: float = 0.0
    """``last`` target: the instrument's traded volume when last looked at (only new trades count)."""

    def to_wire(self) -> dict[str, Any]:
        """The ``ConditionalOrder`` object (``reject_reason`` is required there: empty unless rejected)."""
        wire: dict[str, Any] = {
            "order_id": self.order_id,
            "instrument_name": self.instrument.name,
            "direction": self.direction,
            "amount": self.amount,
            "target": self.target,
            "stop_price": self.stop_price,
            "status": self.status,
            "create_time": self.create_time,
            "update_time": self.update_time,
            "reject_reason": self.reject_reason,
            "reduce_only": self.reduce_only,
        }
        optional = {
            "limit_price": self.limit_price,
            "bracket_price": self.bracket_price,
            "trailing_stop_callback_rate": self.callback_rate,
            "label": self.label,
            "convert_time": self.convert_time,
            "converted_order_id": self.converted_order_id,
        }
        wire.update({name: value for name, value in optional.items() if value is not None})
        return wire

    def triggered(self, price: float) -> bool:
        if self.direction == "buy":
            return price >= self.stop_price - EPS or (
                self.bracket_price is not None and price <= self.bracket_price + EPS
            )
        return price <= self.stop_price + EPS or (
            self.bracket_price is not None and price >= self.bracket_price - EPS
        )

    def trail(self, price: float) -> bool:
        """Move a trailing stop after the price; whether it moved."""
        if self.callback_rate is None:
            return False
        tick = self.instrument.tick_size
        if self.direction == "buy":
            candidate = align_up(price * (1.0 + self.callback_rate), tick)
            moved = candidate < self.stop_price - EPS
        else:
            candidate = align_down(price * (1.0 - self.callback_rate), tick)
            moved = candidate > self.stop_price + EPS
        if moved:
            self.stop_price = candidate
        return moved


class ConditionalOrders:
    """Every account's conditional orders, active and past (api.yaml lists both)."""

    def __init__(self, engine: Engine, stats: TradeStats) -> None:
        self.engine = engine
        self.stats = stats
        self.books: dict[str, dict[str, ConditionalOrder]] = {}
        self._next = CONDITIONAL_ID_BASE

    def listing(self, account_id: str) -> list[dict[str, Any]]:
        """``private/conditional_orders`` and every ``account.conditional_orders`` notification."""
        return [order.to_wire() for order in self.books.get(account_id, {}).values()]

    def create(
        self, account: Account, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        order = self._parse(account, params, now)
        self._next += 1
        order.order_id = f"{self._next:016X}"
        self.books.setdefault(account.account_id, {})[order.order_id] = order
        created = order.to_wire()
        order.status = "active"
        return created, [self._changed(account.account_id)]

    def cancel(self, account: Account, params: dict[str, Any], now: float) -> list[Event]:
        order_id = params.get("order_id")
        if not isinstance(order_id, str):
            raise RpcError(INVALID_REQUEST, "order_id must be a string")
        order = self.books.get(account.account_id, {}).get(order_id)
        if order is None:
            raise RpcError(ORDER_NOT_FOUND, "conditional order not found")
        if order.status != "active":
            raise RpcError(INVALID_STATE, f"conditional order is {order.status}")
        order.status, order.update_time = "cancelled", now
        return [self._changed(account.account_id)]

    def cancel_all(self, account: Account, now: float) -> list[Event]:
        active = [o for o in self.books.get(account.account_id, {}).values() if o.status == "active"]
        for order in active:
            order.status, order.update_time = "cancelled", now
        return [self._changed(account.account_id)] if active else []

    def tick(self, now: float) -> list[Event]:
        """Trail, trigger and convert on the latest mark, index and last trade prices."""
        events: list[Event] = []
        for account_id, book in self.books.items():
            changed = False
            for order in book.values():
                if order.status != "active":
                    continue
                if order.instrument.name not in self.engine.market.instruments:
                    order.status, order.update_time, order.reject_reason = (
                        "cancelled",
                        now,
                        "instrument_deactivated",
                    )
                    changed = True
                    continue
                price = self._trigger_price(order)
                if price is None:
                    continue
                if order.trail(price):
                    order.update_time, changed = now, True
                if order.triggered(price):
                    events.extend(self._convert(order, now))
                    changed = True
            if changed:
                events.append(self._changed(account_id))
        return events

    def _trigger_price(self, order: ConditionalOrder) -> float | None:
        market, name = self.engine.market, order.instrument.name
        if order.target == "mark":
            return market.mark(name).price
        if order.target == "index":
            return market.index[order.instrument.underlying]
        volume = self.stats.volume.get(name, 0.0)
        if volume == order.seen_volume:
            return None  # no aggressive trade since the order was created or last looked at
        order.seen_volume = volume
        return self.stats.last_price.get(name)

    def _convert(self, order: ConditionalOrder, now: float) -> list[Event]:
        """Insert the activated order for the account; a refused one leaves the conditional order rejected."""
        params: dict[str, Any] = {
            "instrument_name": order.instrument.name,
            "direction": order.direction,
            "amount": order.amount,
            "reduce_only": order.reduce_only,
        }
        if order.label is not None:
            params["label"] = order.label
        if order.limit_price is not None:
            params.update(order_type="limit", price=order.limit_price, time_in_force="good_till_cancelled")
        else:
            params["order_type"] = "market"
        order.convert_time = order.update_time = now
        account = self.engine.accounts[order.account_id]
        try:
            wire, events = self.engine.place(
                account, params, now, insert_reason="conditional_order", conditional_order_id=order.order_id
            )
        except RpcError as exc:
            order.status, order.reject_reason = "rejected", exc.message
            return []
        order.status, order.converted_order_id = "converted", wire["order_id"]
        return events

    def _changed(self, account_id: str) -> Event:
        return Event("conditional_orders", account_id, None, self.listing(account_id))

    def _parse(self, account: Account, params: dict[str, Any], now: float) -> ConditionalOrder:
        """Validate a ``create_conditional_order`` request (6 for a combination api.yaml does not allow)."""
        direction = choice(params, "direction", ("buy", "sell"), None)
        if direction is None:
            raise RpcError(INVALID_REQUEST, "missing parameter direction")
        inst = self.engine._instrument(params.get("instrument_name"))
        if inst.is_combination:
            raise RpcError(INVALID_REQUEST, "conditional orders are for outright instruments")
        amount = self.engine.checked_amount(inst, number(params, "amount", required=True))
        target = choice(params, "target", TARGETS, "mark")
        assert target is not None
        if target == "index" and inst.kind not in ("perpetual", "future"):
            raise RpcError(INVALID_REQUEST, "target index is allowed only for perpetuals and futures")
        stop = self.engine._price(inst, number(params, "stop_price", required=True))
        limit = number(params, "limit_price")
        bracket = number(params, "bracket_price")
        rate = number(params, "trailing_stop_callback_rate")
        if sum(value is not None for value in (limit, bracket, rate)) > 1:
            raise RpcError(
                INVALID_REQUEST, "set at most one of limit_price, bracket_price, trailing_stop_callback_rate"
            )
        if bracket is not None:
            bracket = self.engine._price(inst, bracket)
            if (bracket >= stop) if direction == "buy" else (bracket <= stop):
                side = "under" if direction == "buy" else "above"
                raise RpcError(
                    INVALID_REQUEST, f"the bracket price of a {direction} must be {side} the stop price"
                )
        if rate is not None and not 0 < rate < 1:
            raise RpcError(INVALID_REQUEST, "trailing_stop_callback_rate must be a ratio between 0 and 1")
        label = params.get("label")
        if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
            raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
        return ConditionalOrder(
            "",
            account.account_id,
            inst,
            direction,
            amount,
            target,
            stop,
            now,
            now,
            self.engine._price(inst, limit) if limit is not None else None,
            bracket,
            rate,
            label,
            flag(params, "reduce_only"),
            seen_volume=self.stats.volume.get(inst.name, 0.0),
        )
