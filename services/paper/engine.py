"""The paper exchange's matching and accounting core.

Pure and deterministic: no I/O and no clock (every call takes ``now``). The server turns
the returned :class:`Event` objects into Thalex notifications. Orders trade only against
the synthetic book of :class:`~services.paper.market.Market` (as takers) or against
simulated flow (as makers); accounts never trade with each other, which keeps them isolated.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, overload

from services.paper.market import Instrument, Market, align_down, is_aligned

MAKER_FEE_FUTURES = 0.0001
TAKER_FEE_FUTURES = 0.0005
OPTION_FEE = 0.00025
OPTION_FEE_CAP = 0.125  # an option fee never exceeds this share of the premium
STARTING_CASH = 1_000_000.0
ORDER_RATE = 10
ORDER_RATE_CANCEL_ON_DISCONNECT = 50
MAX_LABEL_BYTES = 32
MAX_CLIENT_ORDER_ID = 2**64 - 1
EPS = 1e-9

# Error codes of NOTES.md.
ORDER_NOT_FOUND = 1
DUPLICATE_ORDER_ID = 2
THROTTLE_EXCEEDED = 4
UNKNOWN_INSTRUMENT = 5
INVALID_REQUEST = 6
NOT_LOGGED_IN = 7
INVALID_PRICE = 13
INVALID_AMOUNT = 14
PRICE_NOT_ALIGNED = 15
AUTHENTICATION_FAILED = 19
TEMPORARY_FAILURE = 20
INVALID_TIME_IN_FORCE = 25
UNAUTHORIZED = 28
UNKNOWN_METHOD = 31
INVALID_STATE = 37
COLLAR_BREACH = 43


class RpcError(Exception):
    """A Thalex error object ``{code, message}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


def _clean(value: float) -> float:
    """Drop float noise so amounts and prices print like the exchange's."""
    cleaned = round(value, 10)
    return 0.0 if cleaned == 0 else cleaned


def _sign(value: float) -> int:
    return (value > EPS) - (value < -EPS)


@dataclass
class Fill:
    trade_id: str
    price: float
    amount: float
    maker_taker: str
    time: float

    def to_wire(self) -> dict:
        return {
            "trade_id": self.trade_id,
            "price": self.price,
            "amount": self.amount,
            "time": self.time,
            "maker_taker": self.maker_taker,
            "leg_index": 0,
        }


@dataclass
class Order:
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

    @property
    def remaining(self) -> float:
        return 0.0 if self.delete_reason else _clean(self.amount - self.filled_amount)

    @property
    def status(self) -> str:
        if self.delete_reason is None:
            return "partially_filled" if self.filled_amount > EPS else "open"
        if self.delete_reason == "filled":
            return "filled"
        return "cancelled_partially_filled" if self.filled_amount > EPS else "cancelled"

    def to_wire(self, change_reason: str, fills: list[Fill] | None = None) -> dict:
        """The ``OrderStatus`` object; ``fills`` are the new fills (all of them for ``existing``)."""
        wire: dict[str, Any] = {
            "order_id": self.order_id,
            "order_type": self.order_type,
            "time_in_force": self.time_in_force,
            "instrument_name": self.instrument.name,
            "direction": self.direction,
            "amount": self.amount,
            "filled_amount": _clean(self.filled_amount),
            "remaining_amount": self.remaining,
            "status": self.status,
            "fills": [f.to_wire() for f in (self.fills if fills is None else fills)],
            "change_reason": change_reason,
            "insert_reason": "client_request",
            "create_time": self.create_time,
            "persistent": self.persistent,
        }
        if self.price is not None:
            wire["price"] = self.price
        if self.label is not None:
            wire["label"] = self.label
        if self.client_order_id is not None:
            wire["client_order_id"] = self.client_order_id
        if self.delete_reason is not None:
            wire["delete_reason"] = self.delete_reason
            wire["close_time"] = self.close_time
        if self.reduce_only:
            wire["reduce_only"] = True
        return wire


@dataclass
class Position:
    """Average-cost position of one instrument; ``realised_pnl`` includes realised perpetual funding."""

    instrument: Instrument
    position: float = 0.0
    average_price: float = 0.0
    realised_pnl: float = 0.0
    funding_entry_value: float = 0.0
    fees: float = 0.0


@dataclass
class Account:
    account_id: str
    number: str
    cash: float = STARTING_CASH
    positions: dict[str, Position] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    trades: list[tuple[int, dict]] = field(default_factory=list)


@dataclass
class Session:
    """One websocket login: client order ids and the message-rate window live here."""

    session_id: int
    account: Account
    read_only: bool = False
    """Logged in with a read-only key: may read and subscribe, not trade."""
    cancel_on_disconnect: bool = False
    client_orders: dict[int, str] = field(default_factory=dict)
    order_times: deque = field(default_factory=deque)

    @property
    def order_rate(self) -> int:
        return ORDER_RATE_CANCEL_ON_DISCONNECT if self.cancel_on_disconnect else ORDER_RATE


@dataclass
class Event:
    """Something subscribers must hear about: ``orders`` (OrderStatus), ``trade`` (Trade) or ``portfolio``."""

    kind: str
    account_id: str
    session_id: int | None
    payload: dict


def account_number(account_id: str) -> str:
    """A stable account number per key id, so restarts keep the same numbers."""
    return "A" + str(int(hashlib.sha256(account_id.encode()).hexdigest(), 16) % 10**9).zfill(9)


def _number(params: dict, name: str, required: bool = False) -> float | None:
    value = params.get(name)
    if value is None:
        if required:
            raise RpcError(INVALID_REQUEST, f"missing parameter {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RpcError(INVALID_REQUEST, f"{name} must be a number")
    return float(value)


def _order_terms(params: dict) -> tuple[str, str, str, bool, bool]:
    """An insert's order type, time in force, collar, post-only and reject-post-only, checked together."""
    order_type = _choice(params, "order_type", ("limit", "market"), "limit")
    default_tif = "good_till_cancelled" if order_type == "limit" else "immediate_or_cancel"
    tif = _choice(params, "time_in_force", ("good_till_cancelled", "immediate_or_cancel"), default_tif)
    post_only, reject_post_only = _flag(params, "post_only"), _flag(params, "reject_post_only")
    if order_type == "market" and tif == "good_till_cancelled":
        raise RpcError(INVALID_TIME_IN_FORCE, "market orders must be immediate_or_cancel")
    if post_only and tif == "immediate_or_cancel":
        raise RpcError(INVALID_TIME_IN_FORCE, "post_only orders cannot be immediate_or_cancel")
    collar = _choice(
        params, "collar", ("ignore", "reject", "clamp"), "clamp" if order_type == "market" else "reject"
    )
    if order_type == "market" and collar == "ignore":
        raise RpcError(INVALID_REQUEST, "collar ignore is not allowed for market orders")
    return order_type, tif, collar, post_only, reject_post_only


def _label(params: dict) -> str | None:
    label = params.get("label")
    if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
        raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
    return label


@overload
def _choice(params: dict, name: str, allowed: tuple[str, ...], default: str) -> str: ...
@overload
def _choice(params: dict, name: str, allowed: tuple[str, ...], default: None) -> str | None: ...
def _choice(params: dict, name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = params.get(name, default)
    if value is None:
        return None
    if value not in allowed:
        raise RpcError(INVALID_REQUEST, f"{name} must be one of {', '.join(allowed)}")
    return value


def _flag(params: dict, name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise RpcError(INVALID_REQUEST, f"{name} must be a boolean")
    return value


def _client_order_id(params: dict) -> int | None:
    value = params.get("client_order_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CLIENT_ORDER_ID:
        raise RpcError(INVALID_REQUEST, "client_order_id must be an integer between 0 and 2^64-1")
    return value


class Engine:
    """Accounts, sessions, orders, fills, fees and positions of the paper exchange."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.history_delay = 0.0
        """`private/trade_history` lists a trade only this many seconds after it happened (as on
        Thalex, where the history is "not real-time"); the live notification is not delayed."""
        self.accounts: dict[str, Account] = {}
        self.sessions: dict[int, Session] = {}
        self._next_session = 0
        self._next_order = 0
        self._next_trade = 0

    # Sessions

    def open_session(self, account_id: str, read_only: bool) -> Session:
        """A login; several keys (read-only or trading) may share one account."""
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(account_id, account_number(account_id))
        self._next_session += 1
        session = Session(self._next_session, account, read_only)
        self.sessions[session.session_id] = session
        return session

    def set_cancel_on_disconnect(self, session: Session) -> int:
        session.cancel_on_disconnect = True
        return session.order_rate

    def close_session(self, session: Session, now: float) -> list[Event]:
        """End of a websocket session: non-persistent orders die with it (``session_end``)."""
        self.sessions.pop(session.session_id, None)
        events: list[Event] = []
        for order in list(session.account.orders.values()):
            if order.session_id == session.session_id and not order.persistent:
                self._close(order, "session_end", now)
                events.append(self._order_event(order, "cancel", []))
        session.client_orders.clear()
        return events

    def check_throttle(self, session: Session, now: float) -> None:
        """Thalex's order-message rate: 10/s per connection, 50/s with cancel-on-disconnect."""
        window = session.order_times
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= session.order_rate:
            raise RpcError(THROTTLE_EXCEEDED, "throttle exceeded")
        window.append(now)

    # Trading

    def insert(self, session: Session, params: dict, now: float) -> tuple[dict, list[Event]]:
        """``private/insert`` (``direction`` already in ``params`` for buy/sell)."""
        self.check_throttle(session, now)
        self._require_trading(session)
        direction = _choice(params, "direction", ("buy", "sell"), None)
        if direction is None:
            raise RpcError(INVALID_REQUEST, "missing parameter direction")
        if "legs" in params:
            raise RpcError(INVALID_REQUEST, "combination orders are not supported by the paper exchange")
        inst = self._instrument(params.get("instrument_name"))
        amount = self._amount(inst, _number(params, "amount", required=True))
        order_type, tif, collar, post_only, reject_post_only = _order_terms(params)
        reduce_only = _flag(params, "reduce_only")
        price = (
            self._price(inst, _number(params, "price", required=order_type == "limit"))
            if order_type == "limit"
            else None
        )
        label = _label(params)
        client_order_id = _client_order_id(params)
        if client_order_id is not None and client_order_id in session.client_orders:
            raise RpcError(DUPLICATE_ORDER_ID, "duplicate client_order_id")
        account = session.account
        if reduce_only:
            amount = self._reduce_only_amount(account, inst, direction, amount)
        mark = self.market.mark(inst.name).price
        limit = self._collared(inst, direction, price, collar, mark)
        if price is not None:
            price = limit
        bids, asks = self.market.book(inst.name, mark)
        self._next_order += 1
        order = Order(
            f"{self._next_order:016X}",
            account.account_id,
            session.session_id,
            inst,
            direction,
            order_type,
            tif,
            price,
            amount,
            now,
            not session.cancel_on_disconnect,
            label,
            client_order_id,
            reduce_only,
        )
        if post_only and order.price is not None:
            opposite = asks if direction == "buy" else bids
            if opposite and self._crosses(direction, order.price, opposite[0][0]):
                adjusted = _clean(
                    opposite[0][0] - inst.tick_size if direction == "buy" else opposite[0][0] + inst.tick_size
                )
                if reject_post_only or adjusted <= 0:
                    self._close(order, "immediate_cancel", now)
                    return order.to_wire("insert"), [self._order_event(order, "insert", [])]
                order.price = limit = adjusted
        fills, events = self._take(order, account, limit, asks if direction == "buy" else bids, now)
        if order.remaining > EPS:
            if tif == "immediate_or_cancel":
                self._close(order, "immediate_cancel", now)
            else:
                account.orders[order.order_id] = order
                if client_order_id is not None:
                    session.client_orders[client_order_id] = order.order_id
        wire = order.to_wire("insert", fills)
        events.insert(0, Event("orders", account.account_id, session.session_id, wire))
        events.extend(self._trim_reduce_only(account, inst, now))
        return wire, events

    def amend(self, session: Session, params: dict, now: float) -> tuple[dict, list[Event]]:
        self.check_throttle(session, now)
        self._require_trading(session)
        order = self._find_order(session, params)
        inst = order.instrument
        price = self._price(inst, _number(params, "price", required=True))
        amount = self._amount(inst, _number(params, "amount", required=True))
        collar = _choice(params, "collar", ("ignore", "reject", "clamp"), "reject")
        account = session.account
        if amount <= order.filled_amount + EPS:
            self._close(order, "client_cancel", now)
            wire = order.to_wire("amend", [])
            return wire, [Event("orders", account.account_id, order.session_id, wire)]
        mark = self.market.mark(inst.name).price
        order.price = self._collared(inst, order.direction, price, collar, mark)
        order.amount = amount
        bids, asks = self.market.book(inst.name, mark)
        fills, events = self._take(
            order, account, order.price, asks if order.direction == "buy" else bids, now
        )
        wire = order.to_wire("amend", fills)
        events.insert(0, Event("orders", account.account_id, order.session_id, wire))
        events.extend(self._trim_reduce_only(account, inst, now))
        return wire, events

    def cancel(self, session: Session, params: dict, now: float) -> tuple[dict, list[Event]]:
        self.check_throttle(session, now)
        self._require_trading(session)
        order = self._find_order(session, params)
        self._close(order, "client_cancel", now)
        wire = order.to_wire("cancel", [])
        return wire, [Event("orders", order.account_id, order.session_id, wire)]

    def cancel_all(self, session: Session, now: float) -> tuple[int, list[Event]]:
        """Bulk cancel of every order of the account (not throttled like single-order messages)."""
        self._require_trading(session)
        orders = list(session.account.orders.values())
        return len(orders), [self._cancel_bulk(order, now) for order in orders]

    def cancel_session(self, session: Session, now: float) -> list[Event]:
        self._require_trading(session)
        orders = [o for o in session.account.orders.values() if o.session_id == session.session_id]
        return [self._cancel_bulk(order, now) for order in orders]

    def direct_trade(
        self,
        account_id: str,
        instrument_name: str,
        direction: str,
        amount: float,
        price: float | None,
        now: float,
    ) -> tuple[list[dict], list[Event]]:
        """Control ``paper/trade``: an IOC market order for ``account_id``, or a fill at exactly ``price``."""
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(account_id, account_number(account_id))
        inst = self._instrument(instrument_name)
        amount = self._amount(inst, amount)
        if direction not in ("buy", "sell"):
            raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
        self._next_order += 1
        order = Order(
            f"{self._next_order:016X}",
            account_id,
            0,
            inst,
            direction,
            "market",
            "immediate_or_cancel",
            None,
            amount,
            now,
            True,
        )
        if price is None:
            bids, asks = self.market.book(inst.name)
            fills, events = self._take(
                order,
                account,
                math.inf if direction == "buy" else 0.0,
                asks if direction == "buy" else bids,
                now,
            )
        else:
            order.order_type, order.price = "limit", price
            fills, events = self._take(order, account, price, [[price, amount]], now)
        if order.remaining > EPS:
            self._close(order, "immediate_cancel", now)
        events.insert(0, Event("orders", account_id, None, order.to_wire("insert", fills)))
        events.extend(self._trim_reduce_only(account, inst, now))
        return [e.payload for e in events if e.kind == "trade"], events

    def fill_resting(
        self,
        now: float,
        account_id: str | None = None,
        instrument_name: str | None = None,
        order_id: str | None = None,
        amount: float | None = None,
        direction: str | None = None,
    ) -> list[Event]:
        """Simulated flow trades resting orders at their limit price (the account is maker)."""
        events: list[Event] = []
        for account in list(self.accounts.values()):
            if account_id is not None and account.account_id != account_id:
                continue
            for order in list(account.orders.values()):
                if instrument_name is not None and order.instrument.name != instrument_name:
                    continue
                if order_id is not None and order.order_id != order_id:
                    continue
                if direction is not None and order.direction != direction:
                    continue
                events.extend(self._maker_fill(account, order, amount, now))
        return events

    def on_market(self, now: float) -> list[Event]:
        """After prices move: resting orders that the synthetic book crossed fill as makers."""
        events: list[Event] = []
        for account in list(self.accounts.values()):
            for order in list(account.orders.values()):
                bids, asks = self.market.book(order.instrument.name)
                if (
                    (order.direction == "buy"
                    and asks
                    and asks[0][0] <= (order.price or 0.0))
                    or (order.direction == "sell"
                    and bids
                    and bids[0][0] >= (order.price or math.inf))
                ):
                    events.extend(self._maker_fill(account, order, None, now))
        return events

    # Reading

    def open_orders(self, account: Account) -> list[dict]:
        return [o.to_wire("existing") for o in account.orders.values()]

    def session_orders(self, session: Session) -> list[dict]:
        return [
            o.to_wire("existing")
            for o in session.account.orders.values()
            if o.session_id == session.session_id
        ]

    def portfolio(self, account: Account) -> list[dict]:
        return [self.portfolio_entry(p) for p in account.positions.values()]

    def portfolio_entry(self, pos: Position) -> dict:
        """``PortfolioEntry``: unrealised = (mark - start) * position; funding = fmark * pos - entry value."""
        mark = self.market.mark(pos.instrument.name)
        entry: dict[str, Any] = {
            "instrument_name": pos.instrument.name,
            "position": pos.position,
            "mark_price": mark.price,
            "index": mark.index,
            "start_price": pos.average_price,
            "average_price": pos.average_price,
            "unrealised_pnl": _clean((mark.price - pos.average_price) * pos.position),
            "realised_pnl": _clean(pos.realised_pnl),
            "entry_value": _clean(pos.average_price * pos.position),
        }
        if mark.iv is not None:
            entry["iv"] = mark.iv
        if pos.instrument.kind == "perpetual":
            if abs(pos.funding_entry_value) > EPS:
                entry["perpetual_funding_entry_value"] = _clean(pos.funding_entry_value)
            entry["unrealised_perpetual_funding"] = _clean(
                (mark.funding_mark or 0.0) * pos.position - pos.funding_entry_value
            )
        return entry

    def account_summary(self, account: Account) -> dict:
        """``AccountSummary``: cash is the USDT balance after fees; margin is a flat 10 % of notional."""
        unrealised = realised = required = 0.0
        for pos in account.positions.values():
            entry = self.portfolio_entry(pos)
            unrealised += entry["unrealised_pnl"] + entry.get("unrealised_perpetual_funding", 0.0)
            realised += pos.realised_pnl
            if pos.instrument.kind == "option":
                required += 0.15 * entry["index"] * -pos.position if pos.position < 0 else 0.0
            else:
                required += 0.1 * abs(pos.position) * entry["mark_price"]
        margin = account.cash + unrealised + realised
        return {
            "cash": [
                {
                    "currency": "USDT",
                    "balance": _clean(account.cash),
                    "collateral_factor": 1.0,
                    "collateral_index_price": 1.0,
                    "transactable": True,
                }
            ],
            "unrealised_pnl": _clean(unrealised),
            "cash_collateral": _clean(account.cash),
            "margin": _clean(margin),
            "required_margin": _clean(required),
            "remaining_margin": _clean(margin - required),
            "session_realised_pnl": _clean(realised),
        }

    def trade_history(self, account: Account, params: dict, now: float) -> dict:
        """Trades by ``time_low``/``time_high``/``instrument_names``, paged by ``limit``/``bookmark``."""
        limit = params.get("limit", 1000)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise RpcError(INVALID_REQUEST, "limit must be an integer between 1 and 1000")
        time_low = _number(params, "time_low")
        time_high = _number(params, "time_high")
        sort = _choice(params, "sort", ("ascending", "descending"), "descending")
        names = params.get("instrument_names")
        if names is not None and not isinstance(names, str):
            raise RpcError(INVALID_REQUEST, "instrument_names must be a comma-separated string")
        wanted = set(names.split(",")) if names else None
        bookmark = params.get("bookmark")
        after: int | None = None
        if bookmark is not None:
            if not isinstance(bookmark, str) or not bookmark.isdigit():
                raise RpcError(INVALID_REQUEST, "invalid bookmark")
            after = int(bookmark)
        rows = account.trades if sort == "ascending" else list(reversed(account.trades))

        def listed(seq: int, trade: dict) -> bool:
            """In the page's window, old enough to be in the history (its delay), of a wanted instrument."""
            return not (
                (after is not None and (seq <= after if sort == "ascending" else seq >= after))
                or (time_low is not None and trade["time"] < time_low)
                or (time_high is not None and trade["time"] > time_high)
                or trade["time"] > now - self.history_delay
                or (wanted is not None and trade["instrument_name"] not in wanted)
            )

        selected: list[tuple[int, dict]] = []
        for seq, trade in rows:
            if listed(seq, trade):
                selected.append((seq, trade))
                if len(selected) > limit:
                    break
        result: dict[str, Any] = {"trades": [t for _, t in selected[:limit]]}
        if len(selected) > limit:
            result["bookmark"] = str(selected[limit - 1][0])
        return result

    # Internals

    def _require_trading(self, session: Session) -> None:
        if session.read_only:
            raise RpcError(UNAUTHORIZED, "unauthorized: read-only API key cannot trade")

    def _instrument(self, name: Any) -> Instrument:
        if not isinstance(name, str):
            raise RpcError(INVALID_REQUEST, "instrument_name must be a string")
        inst = self.market.instruments.get(name)
        if inst is None:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown instrument {name}")
        return inst

    @staticmethod
    def _amount(inst: Instrument, amount: float | None) -> float:
        if amount is None or amount <= 0:
            raise RpcError(INVALID_AMOUNT, "amount must be positive")
        if not is_aligned(amount, inst.volume_tick_size):
            raise RpcError(
                INVALID_AMOUNT, f"amount not aligned with volume tick size {inst.volume_tick_size}"
            )
        if amount < inst.min_order_amount - EPS:
            raise RpcError(INVALID_AMOUNT, f"amount below minimum order amount {inst.min_order_amount}")
        return _clean(round(amount / inst.volume_tick_size) * inst.volume_tick_size)

    @staticmethod
    def _price(inst: Instrument, price: float | None) -> float:
        if price is None or price <= 0:
            raise RpcError(INVALID_PRICE, "price must be positive")
        if not is_aligned(price, inst.tick_size):
            raise RpcError(PRICE_NOT_ALIGNED, f"price not aligned with tick size {inst.tick_size}")
        return _clean(round(price / inst.tick_size) * inst.tick_size)

    @staticmethod
    def _crosses(direction: str, limit: float, level: float) -> bool:
        return level <= limit + EPS if direction == "buy" else level >= limit - EPS

    def _collared(
        self, inst: Instrument, direction: str, price: float | None, collar: str, mark: float
    ) -> float:
        """Apply the price collar; a market order's price is infinite, so it always meets the collar."""
        low, high = self.market.collar(inst.name, mark)
        if price is None:
            if collar == "reject":
                raise RpcError(COLLAR_BREACH, "price collar breach")
            return high if direction == "buy" else low
        breach = price > high + EPS if direction == "buy" else price < low - EPS
        if not breach or collar == "ignore":
            return price
        if collar == "reject":
            raise RpcError(COLLAR_BREACH, f"price collar breach: collar is {low} .. {high}")
        return high if direction == "buy" else low

    def _reduce_only_amount(self, account: Account, inst: Instrument, direction: str, amount: float) -> float:
        pos = account.positions.get(inst.name)
        held = pos.position if pos else 0.0
        if held == 0 or (direction == "buy") == (held > 0):
            raise RpcError(INVALID_STATE, "reduce-only order would not reduce the position")
        return min(amount, abs(held))

    def _find_order(self, session: Session, params: dict) -> Order:
        order_id, client_order_id = params.get("order_id"), _client_order_id(params)
        if (order_id is None) == (client_order_id is None):
            raise RpcError(INVALID_REQUEST, "exactly one of order_id or client_order_id is required")
        if client_order_id is not None:
            order_id = session.client_orders.get(client_order_id)
        elif not isinstance(order_id, str):
            raise RpcError(INVALID_REQUEST, "order_id must be a string")
        order = session.account.orders.get(order_id or "")
        if order is None:
            raise RpcError(ORDER_NOT_FOUND, "order not found")
        return order

    def _take(
        self, order: Order, account: Account, limit: float, levels: list[list[float]], now: float
    ) -> tuple[list[Fill], list[Event]]:
        """Walk the opposite side of the book up to ``limit``: one taker trade per level."""
        fills: list[Fill] = []
        events: list[Event] = []
        for level_price, level_amount in levels:
            if order.remaining <= EPS or not self._crosses(order.direction, limit, level_price):
                break
            amount = min(order.remaining, level_amount)
            fill, trade_events = self._fill(account, order, level_price, amount, "taker", now)
            fills.append(fill)
            events.extend(trade_events)
        return fills, events

    def _maker_fill(self, account: Account, order: Order, amount: float | None, now: float) -> list[Event]:
        size = order.remaining if amount is None else min(order.remaining, amount)
        size = align_down(size, order.instrument.volume_tick_size)
        if size <= EPS:
            return []
        fill, events = self._fill(account, order, order.price or 0.0, size, "maker", now)
        if order.remaining <= EPS:
            account.orders.pop(order.order_id, None)
        events.insert(0, self._order_event(order, "fill", [fill]))
        events.extend(self._trim_reduce_only(account, order.instrument, now))
        return events

    def _fill(
        self, account: Account, order: Order, price: float, amount: float, maker_taker: str, now: float
    ) -> tuple[Fill, list[Event]]:
        inst = order.instrument
        mark = self.market.mark(inst.name)
        pos = account.positions.get(inst.name)
        if pos is None:
            pos = account.positions[inst.name] = Position(inst)
        signed = amount if order.direction == "buy" else -amount
        position_pnl, funding_pnl = self._apply(pos, signed, price, mark.funding_mark or 0.0)
        fee_rate, fee = self._fee(inst, price, amount, mark.index, maker_taker)
        pos.fees += fee
        account.cash -= fee
        self._next_trade += 1
        trade_id = f"{self._next_trade:032X}"
        order.filled_amount = _clean(order.filled_amount + amount)
        fill = Fill(trade_id, price, amount, maker_taker, now)
        order.fills.append(fill)
        if order.remaining <= EPS and order.delete_reason is None:
            self._close(order, "filled", now)
        trade: dict[str, Any] = {
            "trade_type": "normal",
            "trade_id": trade_id,
            "order_id": order.order_id,
            "instrument_name": inst.name,
            "direction": order.direction,
            "price": price,
            "amount": amount,
            "time": now,
            "position_after": pos.position,
            "session_realised_after": _clean(pos.realised_pnl),
            "fee": fee,
            "index": mark.index,
            "fee_rate": fee_rate,
            "maker_taker": maker_taker,
            "leg_index": 0,
        }
        if position_pnl is not None:
            trade["position_pnl"] = position_pnl
            if inst.kind == "perpetual":
                trade["perpetual_funding_pnl"] = funding_pnl
        if inst.kind == "perpetual":
            trade["funding_mark"] = mark.funding_mark
        if order.label is not None:
            trade["label"] = order.label
        if order.client_order_id is not None:
            trade["client_order_id"] = order.client_order_id
        account.trades.append((self._next_trade, trade))
        events = [
            Event("trade", account.account_id, order.session_id, trade),
            Event("portfolio", account.account_id, None, self.portfolio_entry(pos)),
        ]
        return fill, events

    @staticmethod
    def _apply(pos: Position, signed: float, price: float, funding_mark: float) -> tuple[float | None, float]:
        """Average-cost accounting; a flip realises the closed part and opens the rest at ``price``."""
        held = pos.position
        if _sign(held) == 0 or _sign(held) == _sign(signed):
            total = abs(held) + abs(signed)
            pos.average_price = _clean((abs(held) * pos.average_price + abs(signed) * price) / total)
            pos.funding_entry_value = _clean(pos.funding_entry_value + funding_mark * signed)
            pos.position = _clean(held + signed)
            return None, 0.0
        closed = min(abs(signed), abs(held))
        share = closed / abs(held)
        position_pnl = _clean(closed * (price - pos.average_price) * _sign(held))
        funding_pnl = _clean(share * (funding_mark * held - pos.funding_entry_value))
        pos.funding_entry_value = _clean(pos.funding_entry_value * (1.0 - share))
        pos.realised_pnl = _clean(pos.realised_pnl + position_pnl + funding_pnl)
        pos.position = _clean(held + signed)
        if abs(signed) > abs(held) + EPS:
            pos.average_price = price
            pos.funding_entry_value = _clean(funding_mark * pos.position)
        elif _sign(pos.position) == 0:
            pos.position = 0.0
            pos.average_price = 0.0
            pos.funding_entry_value = 0.0
        return position_pnl, funding_pnl

    @staticmethod
    def _fee(
        inst: Instrument, price: float, amount: float, index: float, maker_taker: str
    ) -> tuple[float, float]:
        """Tier-1 schedule. Futures: rate * price * amount. Options: 2.5 bps of index notional,
        capped at 12.5 % of the premium."""
        if inst.kind == "option":
            return OPTION_FEE, _clean(min(OPTION_FEE * index * amount, OPTION_FEE_CAP * price * amount))
        rate = MAKER_FEE_FUTURES if maker_taker == "maker" else TAKER_FEE_FUTURES
        return rate, _clean(rate * price * amount)

    def _trim_reduce_only(self, account: Account, inst: Instrument, now: float) -> list[Event]:
        """Resting reduce-only orders shrink to the position (best effort, like Thalex)."""
        pos = account.positions.get(inst.name)
        held = pos.position if pos else 0.0
        events: list[Event] = []
        for order in list(account.orders.values()):
            if not order.reduce_only or order.instrument is not inst:
                continue
            reduces = held != 0 and (order.direction == "buy") == (held < 0)
            allowed = abs(held) if reduces else 0.0
            if order.remaining <= allowed + EPS:
                continue
            if allowed <= EPS:
                self._close(order, "client_cancel", now)
            else:
                order.amount = _clean(order.filled_amount + allowed)
            events.append(self._order_event(order, "amend", []))
        return events

    def _cancel_bulk(self, order: Order, now: float) -> Event:
        self._close(order, "client_bulk_cancel", now)
        return self._order_event(order, "cancel", [])

    def _close(self, order: Order, reason: str, now: float) -> None:
        order.delete_reason = reason
        order.close_time = now
        account = self.accounts.get(order.account_id)
        if account is not None:
            account.orders.pop(order.order_id, None)
        session = self.sessions.get(order.session_id)
        if session is not None and order.client_order_id is not None:
            session.client_orders.pop(order.client_order_id, None)

    @staticmethod
    def _order_event(order: Order, change_reason: str, fills: list[Fill]) -> Event:
        return Event("orders", order.account_id, order.session_id, order.to_wire(change_reason, fills))
