"""The state of the paper's accounts and how it looks on the wire (api.yaml's objects).

Plain data: orders with their fills, positions with their session figures, accounts with their
histories (trades, closed orders, transactions, daily marks, inbox), websocket sessions and the
events the engine hands to the fan-out.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from services.paper.instruments import Instrument

STARTING_CASH = 1_000_000.0
ORDER_RATE = 10
ORDER_RATE_CANCEL_ON_DISCONNECT = 50
ORDER_HISTORY_FILLS = 8
"""api.yaml: "the 'fills' field in the order is limited to a length of 8"."""
EPS = 1e-9


def clean(value: float) -> float:
    """Drop float noise so amounts and prices print like the exchange's."""
    cleaned = round(value, 10)
    return 0.0 if cleaned == 0 else cleaned


def account_number(account_id: str) -> str:
    """A stable account number per account name, so restarts keep the same numbers."""
    return "A" + str(int(hashlib.sha256(account_id.encode()).hexdigest(), 16) % 10**9).zfill(9)


@dataclass
class Fill:
    trade_id: str
    price: float
    amount: float
    maker_taker: str
    time: float
    leg_index: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "trade_id": self.trade_id,
            "price": self.price,
            "amount": self.amount,
            "time": self.time,
            "maker_taker": self.maker_taker,
            "leg_index": self.leg_index,
        }


@dataclass
class Order:
    """An order; for a combination (``legs`` given at insert) ``amount`` counts units of it."""

    order_id: str
    account_id: str
    session_id: int
    instrument: Instrument
    direction: str
    order_type: str
    time_in_force: str
    price: float | None
    amount: float
    create_time: float
    persistent: bool
    label: str | None = None
    client_order_id: int | None = None
    reduce_only: bool = False
    filled_amount: float = 0.0
    fills: list[Fill] = field(default_factory=list)
    close_time: float | None = None
    delete_reason: str | None = None
    insert_reason: str = "client_request"
    by_legs: bool = False
    """Inserted with ``legs`` (a combination order): the wire shows ``legs``, not ``instrument_name``."""
    bot_id: str | None = None
    conditional_order_id: str | None = None
    mass_quote: bool = False
    """A quote of ``private/mass_quote``: ``private/cancel`` and ``cancel_all`` leave it alone."""

    @property
    def remaining(self) -> float:
        return 0.0 if self.delete_reason else clean(self.amount - self.filled_amount)

    @property
    def status(self) -> str:
        if self.delete_reason is None:
            return "partially_filled" if self.filled_amount > EPS else "open"
        if self.delete_reason == "filled":
            return "filled"
        return "cancelled_partially_filled" if self.filled_amount > EPS else "cancelled"

    def _legs(self, with_remaining: bool) -> list[dict[str, Any]]:
        legs = []
        for name, quantity in self.instrument.legs:
            leg: dict[str, Any] = {
                "instrument_name": name,
                "quantity": quantity,
                "filled_amount": clean(self.filled_amount * abs(quantity)),
            }
            if with_remaining:
                leg["remaining_amount"] = clean(self.remaining * abs(quantity))
            legs.append(leg)
        return legs

    def _common(self, fills: list[Fill], with_remaining: bool) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "order_id": self.order_id,
            "order_type": self.order_type,
            "direction": self.direction,
            "amount": self.amount,
            "filled_amount": clean(self.filled_amount),
            "status": self.status,
            "fills": [f.to_wire() for f in fills],
            "insert_reason": self.insert_reason,
            "create_time": self.create_time,
        }
        if self.by_legs:
            wire["legs"] = self._legs(with_remaining)
        else:
            wire["instrument_name"] = self.instrument.name
        for name in ("price", "label", "client_order_id", "bot_id", "conditional_order_id"):
            value = getattr(self, name)
            if value is not None:
                wire[name] = value
        if self.reduce_only:
            wire["reduce_only"] = True
        return wire

    def to_wire(self, change_reason: str, fills: list[Fill] | None = None) -> dict[str, Any]:
        """The ``OrderStatus`` object; ``fills`` are the new fills (all of them for ``existing``)."""
        wire = self._common(self.fills if fills is None else fills, with_remaining=True)
        wire.update(
            time_in_force=self.time_in_force,
            remaining_amount=self.remaining,
            change_reason=change_reason,
            persistent=self.persistent,
        )
        if self.delete_reason is not None:
            wire["delete_reason"] = self.delete_reason
            wire["close_time"] = self.close_time
        return wire

    def history_wire(self) -> dict[str, Any]:
        """The ``OrderHistory`` object of a closed order (at most 8 fills, as on Thalex)."""
        wire = self._common(self.fills[:ORDER_HISTORY_FILLS], with_remaining=False)
        wire["delete_reason"] = self.delete_reason
        wire["close_time"] = self.close_time
        return wire


@dataclass
class Position:
    """One instrument of an account: average cost, the session's start price and realised figures.

    ``average_price`` never resets; ``start_price`` is reset to the mark at the daily settlement of
    futures-style instruments (perpetuals and futures), which realises the P&L up to it.
    """

    instrument: Instrument
    position: float = 0.0
    average_price: float = 0.0
    start_price: float = 0.0
    funding_entry_value: float = 0.0
    session_position_pnl: float = 0.0
    session_funding_pnl: float = 0.0
    session_fees: float = 0.0

    @property
    def realised_pnl(self) -> float:
        """Realised this session: positional plus perpetual funding (fees not included)."""
        return self.session_position_pnl + self.session_funding_pnl


@dataclass
class Account:
    account_id: str
    number: str
    cash: float = STARTING_CASH
    """The USDT balance: moves at the daily settlement (session P&L, fees, funding) and on transfers."""
    positions: dict[str, Position] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    trades: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    order_history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    transactions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    daily_marks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    rfq_history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """Closed RFQs (``Rfq`` objects) of the account, for ``private/rfq_history``."""
    inbox: list[dict[str, Any]] = field(default_factory=list)
    """``Notifications`` items, oldest first."""
    margin_state: str = "ok"
    """ok | initial (initial margin breached, told once) | maintenance (being liquidated)."""


@dataclass
class Session:
    """One websocket login: client order ids and the message-rate window live here."""

    session_id: int
    account: Account
    read_only: bool = False
    """Logged in with a read-only key: may read and subscribe, not trade."""
    cancel_on_disconnect: bool = False
    client_orders: dict[int, str] = field(default_factory=dict)
    order_times: deque[float] = field(default_factory=deque)

    @property
    def order_rate(self) -> int:
        return ORDER_RATE_CANCEL_ON_DISCONNECT if self.cancel_on_disconnect else ORDER_RATE


@dataclass
class Event:
    """Something subscribers must hear about, routed to channels by kind (``channels.ROUTES``):
    ``orders`` (OrderStatus), ``trade`` (Trade), ``portfolio`` (PortfolioEntry), ``order_history``
    (OrderHistory), ``inbox`` (a Notifications item), ``summary`` (the account changed)."""

    kind: str
    account_id: str
    session_id: int | None
    payload: Any
    """Mostly one object; the full lists of ``conditional_orders`` and ``bots``."""
    mass_quote: bool = False
    """An ``orders`` event of a mass quote (the OrderStatus does not say so; ``account.persistent_orders``
    leaves them out)."""
