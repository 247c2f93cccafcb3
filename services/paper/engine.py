"""The paper exchange's matching and accounting core.

Pure and deterministic: no I/O and no clock (every call takes ``now``). The server turns
the returned :class:`Event` objects into Thalex notifications. Orders trade only against
the synthetic book of :class:`~services.paper.market.Market` (as takers) or against
simulated flow (as makers); accounts never trade with each other, which keeps them isolated.
A combination (a roll, or an order given ``legs``) trades on its legs: one trade per leg.
Expiry and the daily settlement are :mod:`services.paper.settlement`; margin is
:mod:`services.paper.margin`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from services.paper import margin
from services.paper.accounts import (
    EPS,
    STARTING_CASH,
    Account,
    Event,
    Fill,
    Order,
    Position,
    Session,
    account_number,
    clean,
)
from services.paper.errors import (
    COLLAR_BREACH,
    DUPLICATE_ORDER_ID,
    INSUFFICIENT_MARGIN,
    INVALID_AMOUNT,
    INVALID_PRICE,
    INVALID_REQUEST,
    INVALID_STATE,
    INVALID_TIME_IN_FORCE,
    ORDER_NOT_FOUND,
    PRICE_NOT_ALIGNED,
    THROTTLE_EXCEEDED,
    UNAUTHORIZED,
    UNKNOWN_INSTRUMENT,
    RpcError,
)
from services.paper.market import Instrument, Market, align_down, is_aligned
from services.paper.paging import history_filter, page
from services.paper.params import choice, flag, number

__all__ = [
    "STARTING_CASH",
    "Account",
    "Engine",
    "Event",
    "Fill",
    "Order",
    "Position",
    "Session",
    "account_number",
]

MAKER_FEE_FUTURES = 0.0001
TAKER_FEE_FUTURES = 0.0005
OPTION_FEE = 0.00025
OPTION_FEE_CAP = 0.125
"""Default share of the premium an option fee never exceeds (`Engine.option_fee_cap`; None: no cap)."""
ROLL_FEE_SHARE = 0.5
"""A roll is charged the fee once for its two legs: half the rate on each (Thalex: "50% fee discount")."""
MAX_LABEL_BYTES = 32
MAX_CLIENT_ORDER_ID = 2**64 - 1
GTC, IOC = "good_till_cancelled", "immediate_or_cancel"
FillListener = Callable[[Account, Order, Fill, float], list[Event]]


def _sign(value: float) -> int:
    return (value > EPS) - (value < -EPS)


def _client_order_id(params: dict[str, Any]) -> int | None:
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
        self.option_fee_cap: float | None = OPTION_FEE_CAP
        self.history_delay = 0.0
        """`private/trade_history` lists a trade only this many seconds after it happened (as on
        Thalex, where the history is "not real-time"); the live notification is not delayed."""
        self.history_without_fee = False
        """`private/trade_history` lists trades without `fee`, as api.yaml's own example of it does
        (`Trade` requires no field); the live notification still carries it."""
        self.accounts: dict[str, Account] = {}
        self.sessions: dict[int, Session] = {}
        self._next_session = 0
        self._next_order = 0
        self._next_trade = 0
        self._next_seq = 0
        self._next_notification = 0
        self.fill_listeners: list[FillListener] = []
        """Called after every fill of an order with (account, order, fill, now); their events follow
        the trade's (market-maker protection counts quote executions here)."""

    # Accounts and sessions

    def account(self, account_id: str) -> Account:
        """The account (opened on first use with the starting balance, recorded as a deposit)."""
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(account_id, account_number(account_id), cash=0.0)
            self.transfer(account, STARTING_CASH, "deposit", "paper account opened", self.market.now)
        return account

    def open_session(self, account_id: str, read_only: bool) -> Session:
        """A login; several keys (read-only or trading) may share one account."""
        account = self.account(account_id)
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
        events = self._end_session_orders(session, now)
        session.client_orders.clear()
        return events

    def _end_session_orders(self, session: Session, now: float) -> list[Event]:
        """The session's non-persistent orders (mass quotes among them) go with ``session_end``: what
        closing the connection and ``private/cancel_session`` do."""
        events: list[Event] = []
        for order in list(session.account.orders.values()):
            if order.session_id == session.session_id and not order.persistent:
                events += self._close(order, "session_end", now, "cancel")
        return events

    def check_throttle(self, session: Session, now: float) -> None:
        """Thalex's order-message rate: 10/s per connection, 50/s with cancel-on-disconnect."""
        window = session.order_times
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= session.order_rate:
            raise RpcError(THROTTLE_EXCEEDED, "throttle exceeded")
        window.append(now)

    def next_seq(self) -> int:
        """One sequence for every history row (bookmarks are these numbers)."""
        self._next_seq += 1
        return self._next_seq

    def transfer(
        self,
        account: Account,
        amount: float,
        kind: str,
        description: str,
        now: float,
        instrument_name: str | None = None,
    ) -> dict[str, Any]:
        """Move USDT in or out of the account's balance; recorded in its transaction history."""
        account.cash = clean(account.cash + amount)
        row: dict[str, Any] = {
            "time": now,
            "asset": "USDT",
            "amount": clean(amount),
            "transaction_type": kind,
            "description": description,
            "balance_after": account.cash,
        }
        if instrument_name is not None:
            row["instrument_name"] = instrument_name
        account.transactions.append((self.next_seq(), row))
        return row

    def post_notification(
        self, account: Account, category: str, title: str, message: str, display_type: str, now: float
    ) -> Event:
        """A notification in the account's inbox (``private/notifications_inbox``)."""
        self._next_notification += 1
        item = {
            "id": f"{self._next_notification:016X}",
            "time": now,
            "category": category,
            "title": title,
            "message": message,
            "display_type": display_type,
            "read": False,
            "account_name": account.account_id,
            "account_number": account.number,
            "popup": True,
        }
        account.inbox.append(item)
        return Event("inbox", account.account_id, None, item)

    # Trading

    def insert(
        self, session: Session, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        """``private/insert`` (``direction`` already in ``params`` for buy/sell)."""
        self.check_throttle(session, now)
        self._require_trading(session)
        return self.place(session.account, params, now, session)

    def place(
        self, account: Account, params: dict, now: float, session: Session | None = None, **origin: Any
    ) -> tuple[dict, list[Event]]:
        """Validate and match an order of ``account``: a client's (``session``) or, without a session, one
        the exchange inserts for the account (a triggered conditional order, a bot's; persistent).

        ``origin`` sets ``insert_reason``, ``conditional_order_id``, ``bot_id`` or ``mass_quote``.
        """
        order, post_only, reject_post_only, collar = self._new_order(account, session, params, now)
        for name, value in origin.items():
            setattr(order, name, value)
        if order.reduce_only:
            order.amount = self._reduce_only_amount(account, order.instrument, order.direction, order.amount)
        mark = self.market.mark(order.instrument.name).price
        limit = self._collared(order.instrument, order.direction, order.price, collar, mark)
        if order.price is not None:
            order.price = limit
        if not order.reduce_only:
            self._check_margin(account, order, order.amount, None)
        bids, asks = self.market.book(order.instrument.name, mark)
        self._next_order += 1
        order.order_id = f"{self._next_order:016X}"
        if post_only and order.price is not None:
            opposite = asks if order.direction == "buy" else bids
            if opposite and self._crosses(order.direction, order.price, opposite[0][0]):
                tick = order.instrument.tick_size
                adjusted = clean(opposite[0][0] - tick if order.direction == "buy" else opposite[0][0] + tick)
                if reject_post_only or adjusted <= 0:
                    return self._reject_post_only(order, now)
                order.price = limit = adjusted
        fills, events = self._take(order, account, limit, asks if order.direction == "buy" else bids, now)
        if order.remaining > EPS:
            if order.time_in_force == IOC:
                events += self._close(order, "immediate_cancel", now, None)
            else:
                account.orders[order.order_id] = order
                if session is not None and order.client_order_id is not None:
                    session.client_orders[order.client_order_id] = order.order_id
        elif order.delete_reason is not None:
            events += self._history_events(order)
        wire = order.to_wire("insert", fills)
        events.insert(0, self._wire_event(order, wire))
        events.extend(self._trim_reduce_only(account, order.instrument, now))
        return wire, events

    def _reject_post_only(self, order: Order, now: float) -> tuple[dict[str, Any], list[Event]]:
        events = self._close(order, "immediate_cancel", now, None)
        wire = order.to_wire("insert", [])
        return wire, [self._wire_event(order, wire), *events]

    def _new_order(
        self, account: Account, session: Session | None, params: dict[str, Any], now: float
    ) -> tuple[Order, bool, bool, str]:
        """Validate an insert; the order (without id yet), post_only, reject_post_only and collar."""
        direction = choice(params, "direction", ("buy", "sell"), None)
        if direction is None:
            raise RpcError(INVALID_REQUEST, "missing parameter direction")
        by_legs = "legs" in params
        inst = self.combination_of(params) if by_legs else self._instrument(params.get("instrument_name"))
        amount = self.checked_amount(inst, number(params, "amount", required=True))
        order_type = choice(params, "order_type", ("limit", "market"), "limit") or "limit"
        default_tif = GTC if order_type == "limit" and not by_legs else IOC
        tif = choice(params, "time_in_force", (GTC, IOC), default_tif) or default_tif
        post_only, reject_post_only = flag(params, "post_only"), flag(params, "reject_post_only")
        reduce_only = flag(params, "reduce_only")
        if order_type == "market" and tif == GTC:
            raise RpcError(INVALID_TIME_IN_FORCE, "market orders must be immediate_or_cancel")
        if post_only and tif == IOC:
            raise RpcError(INVALID_TIME_IN_FORCE, "post_only orders cannot be immediate_or_cancel")
        if inst.is_combination:
            self._check_combination_flags(by_legs, tif, post_only or reject_post_only, reduce_only)
        collar = choice(
            params, "collar", ("ignore", "reject", "clamp"), "clamp" if order_type == "market" else "reject"
        )
        if order_type == "market" and collar == "ignore":
            raise RpcError(INVALID_REQUEST, "collar ignore is not allowed for market orders")
        price = self._price(inst, number(params, "price", required=True)) if order_type == "limit" else None
        label = params.get("label")
        if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
            raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
        client_order_id = _client_order_id(params) if session is not None else None
        if session is not None and client_order_id is not None and client_order_id in session.client_orders:
            raise RpcError(DUPLICATE_ORDER_ID, "duplicate client_order_id")
        order = Order(
            "",
            account.account_id,
            session.session_id if session is not None else 0,
            inst,
            direction,
            order_type,
            tif,
            price,
            amount,
            now,
            session is None or not session.cancel_on_disconnect,
            label,
            client_order_id,
            reduce_only,
            by_legs=by_legs,
        )
        return order, post_only, reject_post_only, str(collar)

    @staticmethod
    def _check_combination_flags(by_legs: bool, tif: str, post_only: bool, reduce_only: bool) -> None:
        if by_legs and tif != IOC:
            raise RpcError(INVALID_TIME_IN_FORCE, "combination orders must be immediate_or_cancel")
        if post_only or reduce_only:
            raise RpcError(
                INVALID_REQUEST, "post_only and reduce_only are not supported for combination orders"
            )

    def amend(
        self, session: Session, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        self.check_throttle(session, now)
        self._require_trading(session)
        order = self._find_order(session, params)
        inst = order.instrument
        price = self._price(inst, number(params, "price", required=True))
        amount = self.checked_amount(inst, number(params, "amount", required=True))
        collar = choice(params, "collar", ("ignore", "reject", "clamp"), "reject") or "reject"
        account = session.account
        if amount <= order.filled_amount + EPS:
            events = self._close(order, "client_cancel", now, None)
            wire = order.to_wire("amend", [])
            return wire, [self._wire_event(order, wire), *events]
        mark = self.market.mark(inst.name).price
        new_price = self._collared(inst, order.direction, price, collar, mark)
        if not order.reduce_only:
            probe = Order(
                order.order_id,
                order.account_id,
                order.session_id,
                inst,
                order.direction,
                order.order_type,
                order.time_in_force,
                new_price,
                amount,
                now,
                order.persistent,
            )
            self._check_margin(account, probe, amount - order.filled_amount, order.order_id)
        order.price = new_price
        order.amount = amount
        bids, asks = self.market.book(inst.name, mark)
        fills, events = self._take(
            order, account, order.price, asks if order.direction == "buy" else bids, now
        )
        wire = order.to_wire("amend", fills)
        events.insert(0, self._wire_event(order, wire))
        if order.delete_reason is not None:
            events += self._history_events(order)
        events.extend(self._trim_reduce_only(account, inst, now))
        return wire, events

    def cancel(
        self, session: Session, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        self.check_throttle(session, now)
        self._require_trading(session)
        order = self._find_order(session, params)
        events = self._close(order, "client_cancel", now, None)
        wire = order.to_wire("cancel", [])
        return wire, [self._wire_event(order, wire), *events]

    def cancel_all(self, session: Session, now: float) -> tuple[int, list[Event]]:
        """Bulk cancel of every order of the account (not throttled like single-order messages)."""
        self._require_trading(session)
        orders = [o for o in session.account.orders.values() if not o.mass_quote]
        events: list[Event] = []
        for order in orders:
            events += self._close(order, "client_bulk_cancel", now, "cancel")
        return len(orders), events

    def cancel_session(self, session: Session, now: float) -> list[Event]:
        """api.yaml: allowed only on a cancel-on-disconnect session, with the result of closing the
        connection (the orders here; the method deletes the session's protection groups and RFQ quotes)."""
        self._require_trading(session)
        if not session.cancel_on_disconnect:
            raise RpcError(
                INVALID_STATE, "cancel_session is allowed only on a session set to cancel_on_disconnect"
            )
        return self._end_session_orders(session, now)

    def withdraw(self, order: Order, reason: str, now: float, *, quietly: bool = False) -> list[Event]:
        """The exchange removes a resting order (a bot's, a pulled quote) for ``reason``; ``quietly``
        for the order being filled, whose fill reports (and records) its end."""
        if quietly:
            return self._close(order, reason, now, None, record=False)
        return self._close(order, reason, now, "cancel")

    def cancel_orders(self, account: Account, orders: list[Order], reason: str, now: float) -> list[Event]:
        """Cancel ``orders`` of ``account`` for the exchange's own reason (expiry, margin breach)."""
        events: list[Event] = []
        for order in orders:
            if order.order_id in account.orders:
                events += self._close(order, reason, now, "cancel")
        return events

    def direct_trade(
        self,
        account_id: str,
        instrument_name: str,
        direction: str,
        amount: float,
        price: float | None,
        now: float,
        insert_reason: str = "client_request",
    ) -> tuple[list[dict[str, Any]], list[Event]]:
        """Control ``paper/trade``: an IOC market order for ``account_id``, or a fill at exactly ``price``."""
        account = self.account(account_id)
        inst = self._instrument(instrument_name)
        amount = self.checked_amount(inst, amount)
        if direction not in ("buy", "sell"):
            raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
        order = self.new_order(account_id, inst, direction, amount, now, insert_reason)
        if price is None:
            bids, asks = self.market.book(inst.name)
            fills, events = self._take(
                order,
                account,
                math.inf if direction == "buy" else -math.inf,
                asks if direction == "buy" else bids,
                now,
            )
        else:
            order.order_type, order.price = "limit", price
            fills, events = self._fill(order, account, price, amount, "taker", now)
        if order.remaining > EPS:
            events += self._close(order, "immediate_cancel", now, None)
        else:
            events += self._history_events(order)
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
                if order.order_id not in account.orders:
                    continue
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
                if order.order_id not in account.orders:
                    continue
                if self.market.get(order.instrument.name) is None or order.price is None:
                    continue
                bids, asks = self.market.book(order.instrument.name)
                crossed = (
                    (asks and asks[0][0] <= order.price)
                    if order.direction == "buy"
                    else (bids and bids[0][0] >= order.price)
                )
                if crossed:
                    events.extend(self._maker_fill(account, order, None, now))
        return events

    def new_order(
        self,
        account_id: str,
        inst: Instrument,
        direction: str,
        amount: float,
        now: float,
        insert_reason: str = "client_request",
    ) -> Order:
        """A market IOC order the exchange makes for an account (simulated flow, liquidations)."""
        self._next_order += 1
        return Order(
            f"{self._next_order:016X}",
            account_id,
            0,
            inst,
            direction,
            "market",
            IOC,
            None,
            amount,
            now,
            True,
            insert_reason=insert_reason,
        )

    def finish_order(self, order: Order, fills: list[Fill], units: float, now: float) -> list[Event]:
        """An exchange-made order filled by ``fills``: its ``orders`` event and its history."""
        self._filled(order, units, fills, now)
        return [
            Event("orders", order.account_id, None, order.to_wire("insert", fills)),
            *self._history_events(order),
        ]

    # Reading

    def open_orders(self, account: Account) -> list[dict[str, Any]]:
        return [o.to_wire("existing") for o in account.orders.values()]

    def session_orders(self, session: Session) -> list[dict[str, Any]]:
        return [
            o.to_wire("existing")
            for o in session.account.orders.values()
            if o.session_id == session.session_id
        ]

    def portfolio(self, account: Account) -> list[dict[str, Any]]:
        return [self.portfolio_entry(p) for p in account.positions.values()]

    def portfolio_entry(self, pos: Position) -> dict[str, Any]:
        """``PortfolioEntry``: unrealised = (mark - start) * position; funding = fmark * pos - entry value."""
        mark = self.market.mark(pos.instrument.name)
        entry: dict[str, Any] = {
            "instrument_name": pos.instrument.name,
            "position": pos.position,
            "mark_price": mark.price,
            "index": mark.index,
            "start_price": pos.start_price,
            "average_price": pos.average_price,
            "unrealised_pnl": clean((mark.price - pos.start_price) * pos.position),
            "realised_pnl": clean(pos.realised_pnl),
            "entry_value": clean(pos.start_price * pos.position),
        }
        if mark.iv is not None:
            entry["iv"] = mark.iv
        if pos.instrument.kind == "perpetual":
            if abs(pos.funding_entry_value) > EPS:
                entry["perpetual_funding_entry_value"] = clean(pos.funding_entry_value)
            entry["unrealised_perpetual_funding"] = self.unrealised_funding(pos)
        return entry

    def unrealised_funding(self, pos: Position) -> float:
        if pos.instrument.kind != "perpetual":
            return 0.0
        funding_mark = self.market.funding_marks.get(pos.instrument.name, 0.0)
        return clean(funding_mark * pos.position - pos.funding_entry_value)

    def unrealised(self, account: Account) -> float:
        """Unrealised P&L of every position, perpetual funding included."""
        total = 0.0
        for pos in account.positions.values():
            mark = self.market.mark(pos.instrument.name).price
            total += (mark - pos.start_price) * pos.position + self.unrealised_funding(pos)
        return total

    @staticmethod
    def session_realised(account: Account) -> float:
        """The session's realised P&L net of its fees (what the next settlement pays into the balance)."""
        return sum(p.realised_pnl - p.session_fees for p in account.positions.values())

    def margin_balance(self, account: Account) -> float:
        """Cash plus the unsettled P&L (unrealised, and realised since the last settlement)."""
        return account.cash + self.unrealised(account) + self.session_realised(account)

    def margin(
        self,
        account: Account,
        extra: list[margin.Exposure] | None = None,
        without: str | None = None,
        extra_buys: bool = True,
    ) -> margin.AccountMargin:
        """The margin model's requirement (``extra``: a hypothetical buy order, or sell order)."""
        return margin.account_margin(self.market, account, extra, without, extra_buys)

    def account_summary(self, account: Account) -> dict[str, Any]:
        """``AccountSummary``: the USDT balance, unsettled P&L and the margin model's requirement."""
        unrealised = self.unrealised(account)
        realised = self.session_realised(account)
        balance = account.cash + unrealised + realised
        required = self.margin(account).required
        return {
            "cash": [self.cash_wire(account)],
            "unrealised_pnl": clean(unrealised),
            "cash_collateral": clean(account.cash),
            "margin": clean(balance),
            "required_margin": clean(required),
            "remaining_margin": clean(balance - required),
            "session_realised_pnl": clean(realised),
        }

    @staticmethod
    def cash_wire(account: Account) -> dict[str, Any]:
        return {
            "currency": "USDT",
            "balance": clean(account.cash),
            "collateral_factor": 1.0,
            "collateral_index_price": 1.0,
            "transactable": True,
        }

    def trade_history(self, account: Account, params: dict[str, Any], now: float) -> dict[str, Any]:
        """Trades filtered by ``time_low``/``time_high``/``instrument_names``/``bot_ids``, paged."""
        listed = page(account.trades, params, time_key="time", result_key="trades",
                      keep=history_filter(params), visible_until=now - self.history_delay)
        if self.history_without_fee:
            listed["trades"] = [{k: v for k, v in t.items() if k != "fee"} for t in listed["trades"]]
        return listed

    def order_history(self, account: Account, params: dict[str, Any]) -> dict[str, Any]:
        return page(account.order_history, params, time_key="close_time", result_key="orders",
                    keep=history_filter(params))

    # Booking trades

    def book(
        self,
        account: Account,
        inst: Instrument,
        direction: str,
        amount: float,
        price: float,
        now: float,
        *,
        trade_type: str,
        fee_rate: float,
        fee: float,
        order: Order | None = None,
        maker_taker: str | None = None,
        leg_index: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, list[Event]]:
        """Book one trade on one outright instrument: position, session figures, trade record, events."""
        mark = self.market.mark(inst.name)
        pos = account.positions.get(inst.name)
        if pos is None:
            pos = account.positions[inst.name] = Position(inst)
        signed = amount if direction == "buy" else -amount
        funding_mark = mark.funding_mark or 0.0
        position_pnl, funding_pnl = self._apply(pos, signed, price, funding_mark)
        pos.session_fees = clean(pos.session_fees + fee + (extra or {}).get("liquidation_fee", 0.0))
        self._next_trade += 1
        trade_id = f"{self._next_trade:032X}"
        trade: dict[str, Any] = {
            "trade_type": trade_type,
            "trade_id": trade_id,
            "instrument_name": inst.name,
            "direction": direction,
            "price": price,
            "amount": amount,
            "time": now,
            "position_after": pos.position,
            "session_realised_after": clean(pos.realised_pnl),
            "fee": fee,
            "index": mark.index,
            "fee_rate": fee_rate,
            "leg_index": leg_index,
        }
        if order is not None:
            trade["order_id"] = order.order_id
            for name in ("label", "client_order_id", "bot_id"):
                if getattr(order, name) is not None:
                    trade[name] = getattr(order, name)
        if maker_taker is not None:
            trade["maker_taker"] = maker_taker
        if position_pnl is not None:
            trade["position_pnl"] = position_pnl
            if inst.kind == "perpetual":
                trade["perpetual_funding_pnl"] = funding_pnl
        if inst.kind == "perpetual":
            trade["funding_mark"] = mark.funding_mark
        trade.update(extra or {})
        account.trades.append((self.next_seq(), trade))
        events = [
            Event("trade", account.account_id, order.session_id if order else None, trade),
            Event("portfolio", account.account_id, None, self.portfolio_entry(pos)),
        ]
        return trade_id, events

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

    def combination_of(self, params: dict[str, Any]) -> Instrument:
        """The combination named by an insert's ``legs`` (``instrument_name`` must then be absent)."""
        if "instrument_name" in params:
            raise RpcError(INVALID_REQUEST, "give either instrument_name or legs, not both")
        legs = params.get("legs")
        if not isinstance(legs, list):
            raise RpcError(INVALID_REQUEST, "legs must be a list of {instrument_name, quantity}")
        parsed: list[tuple[str, int]] = []
        for leg in legs:
            quantity = leg.get("quantity") if isinstance(leg, dict) else None
            name = leg.get("instrument_name") if isinstance(leg, dict) else None
            if (
                not isinstance(name, str)
                or isinstance(quantity, bool)
                or not isinstance(quantity, (int, float))
                or not float(quantity).is_integer()
            ):
                raise RpcError(INVALID_REQUEST, "each leg needs an instrument_name and an integer quantity")
            parsed.append((name, int(quantity)))
        try:
            return self.market.combination(tuple(parsed))
        except ValueError as exc:
            code = UNKNOWN_INSTRUMENT if str(exc).startswith("unknown instrument") else INVALID_REQUEST
            raise RpcError(code, str(exc)) from None

    @staticmethod
    def checked_amount(inst: Instrument, amount: float | None) -> float:
        if amount is None or amount <= 0:
            raise RpcError(INVALID_AMOUNT, "amount must be positive")
        if not is_aligned(amount, inst.volume_tick_size):
            raise RpcError(
                INVALID_AMOUNT, f"amount not aligned with volume tick size {inst.volume_tick_size}"
            )
        if amount < inst.min_order_amount - EPS:
            raise RpcError(INVALID_AMOUNT, f"amount below minimum order amount {inst.min_order_amount}")
        return clean(round(amount / inst.volume_tick_size) * inst.volume_tick_size)

    @staticmethod
    def _price(inst: Instrument, price: float | None) -> float:
        """A limit price on the tick (a combination's price may be zero or negative, a roll's often is)."""
        if price is None or (price <= 0 and not inst.is_combination):
            raise RpcError(INVALID_PRICE, "price must be positive")
        if not is_aligned(price, inst.tick_size):
            raise RpcError(PRICE_NOT_ALIGNED, f"price not aligned with tick size {inst.tick_size}")
        return clean(round(price / inst.tick_size) * inst.tick_size)

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

    def _check_margin(self, account: Account, order: Order, amount: float, replacing: str | None) -> None:
        """Error 24 for an order that would raise the requirement above the margin balance."""
        exposures = margin.order_exposures(self.market, order, amount)  # a market order at the mark
        before = self.margin(account).required
        buying = order.direction == "buy"
        after = self.margin(account, exposures, without=replacing, extra_buys=buying).required
        if after > before + 1e-9 and after > self.margin_balance(account) + 1e-9:
            raise RpcError(
                INSUFFICIENT_MARGIN,
                f"insufficient margin: required {after:.2f} > margin {self.margin_balance(account):.2f}",
            )

    def _reduce_only_amount(self, account: Account, inst: Instrument, direction: str, amount: float) -> float:
        pos = account.positions.get(inst.name)
        held = pos.position if pos else 0.0
        if held == 0 or (direction == "buy") == (held > 0):
            raise RpcError(INVALID_STATE, "reduce-only order would not reduce the position")
        return min(amount, abs(held))

    def _find_order(self, session: Session, params: dict[str, Any]) -> Order:
        order_id, client_order_id = params.get("order_id"), _client_order_id(params)
        if (order_id is None) == (client_order_id is None):
            raise RpcError(INVALID_REQUEST, "exactly one of order_id or client_order_id is required")
        if client_order_id is not None:
            order_id = session.client_orders.get(client_order_id)
        elif not isinstance(order_id, str):
            raise RpcError(INVALID_REQUEST, "order_id must be a string")
        order = session.account.orders.get(order_id or "")
        if order is None or order.mass_quote:
            raise RpcError(ORDER_NOT_FOUND, "order not found")
        return order

    def _take(
        self, order: Order, account: Account, limit: float, levels: list[list[float]], now: float
    ) -> tuple[list[Fill], list[Event]]:
        """Walk the opposite side of the book up to ``limit``: one taker trade per level (and leg)."""
        if order.instrument.is_combination:
            return self._take_combination(order, account, limit, now)
        fills: list[Fill] = []
        events: list[Event] = []
        for level_price, level_amount in levels:
            if order.remaining <= EPS or not self._crosses(order.direction, limit, level_price):
                break
            amount = min(order.remaining, level_amount)
            new_fills, trade_events = self._fill(order, account, level_price, amount, "taker", now)
            fills += new_fills
            events += trade_events
        return fills, events

    def _take_combination(
        self, order: Order, account: Account, limit: float, now: float
    ) -> tuple[list[Fill], list[Event]]:
        """A combination takes level k of every leg's book at once (the implied book)."""
        buying = order.direction == "buy"
        legs = self.market.leg_instruments(order.instrument)
        books = [self.market.book(inst.name) for inst, _ in legs]
        fills: list[Fill] = []
        events: list[Event] = []
        depth = 0
        while order.remaining > EPS:
            prices: list[float] = []
            units = math.inf
            for (bids, asks), (_, quantity) in zip(books, legs, strict=True):
                side = asks if (quantity > 0) == buying else bids
                if depth >= len(side):
                    return fills, events
                prices.append(side[depth][0])
                units = min(units, side[depth][1] / abs(quantity))
            price = sum(p * q for p, (_, q) in zip(prices, legs, strict=True))
            if not self._crosses(order.direction, limit, price):
                break
            units = align_down(min(order.remaining, units), order.instrument.volume_tick_size)
            if units <= EPS:
                break
            new_fills, trade_events = self._fill_legs(order, account, prices, units, "taker", now)
            fills += new_fills
            events += trade_events
            depth += 1
        return fills, events

    def _maker_fill(self, account: Account, order: Order, amount: float | None, now: float) -> list[Event]:
        size = order.remaining if amount is None else min(order.remaining, amount)
        size = align_down(size, order.instrument.volume_tick_size)
        if size <= EPS:
            return []
        fills, events = self._fill(order, account, order.price or 0.0, size, "maker", now)
        if order.remaining <= EPS:
            account.orders.pop(order.order_id, None)
        events.insert(0, self._order_event(order, "fill", fills))
        if order.delete_reason is not None:
            events += self._history_events(order)
        events.extend(self._trim_reduce_only(account, order.instrument, now))
        return events

    def _fill(
        self, order: Order, account: Account, price: float, amount: float, maker_taker: str, now: float
    ) -> tuple[list[Fill], list[Event]]:
        """``amount`` of ``order`` trades at ``price`` (a combination's price is split over its legs)."""
        if order.instrument.is_combination:
            return self._fill_legs(
                order, account, self._leg_prices(order.instrument, price), amount, maker_taker, now
            )
        inst = order.instrument
        mark = self.market.mark(inst.name)
        fee_rate, fee = self.fee(inst, price, amount, mark.index, maker_taker)
        trade_id, events = self.book(
            account,
            inst,
            order.direction,
            amount,
            price,
            now,
            trade_type="normal",
            fee_rate=fee_rate,
            fee=fee,
            order=order,
            maker_taker=maker_taker,
        )
        fill = Fill(trade_id, price, amount, maker_taker, now)
        self._filled(order, amount, [fill], now)
        for listener in self.fill_listeners:
            events += listener(account, order, fill, now)
        return [fill], events

    def _fill_legs(
        self, order: Order, account: Account, prices: list[float], units: float, maker_taker: str, now: float
    ) -> tuple[list[Fill], list[Event]]:
        """``units`` of a combination: one ``combo`` trade per leg, at that leg's price."""
        fills: list[Fill] = []
        events: list[Event] = []
        share = ROLL_FEE_SHARE if order.instrument.is_listed else 1.0
        for index, ((inst, quantity), price) in enumerate(
            zip(self.market.leg_instruments(order.instrument), prices, strict=True)
        ):
            amount = clean(units * abs(quantity))
            buying = (order.direction == "buy") == (quantity > 0)
            mark = self.market.mark(inst.name)
            fee_rate, fee = self.fee(inst, price, amount, mark.index, maker_taker)
            trade_id, trade_events = self.book(
                account,
                inst,
                "buy" if buying else "sell",
                amount,
                price,
                now,
                trade_type="combo",
                fee_rate=clean(fee_rate * share),
                fee=clean(fee * share),
                order=order,
                maker_taker=maker_taker,
                leg_index=index,
            )
            fills.append(Fill(trade_id, price, amount, maker_taker, now, index))
            events += trade_events
        self._filled(order, units, fills, now)
        return fills, events

    def _leg_prices(self, inst: Instrument, price: float) -> list[float]:
        """Reference prices of the legs that add up to ``price``: every leg at its mark (on its tick)
        but the first with quantity +-1, which takes the rest (Thalex: "suitable reference prices")."""
        legs = self.market.leg_instruments(inst)
        prices = [round(self.market.mark(leg.name).price / leg.tick_size) * leg.tick_size for leg, _ in legs]
        free = next((i for i, (_, q) in enumerate(legs) if abs(q) == 1), 0)
        rest = sum(p * q for i, (p, (_, q)) in enumerate(zip(prices, legs, strict=True)) if i != free)
        prices[free] = (price - rest) / legs[free][1]
        return [clean(p) for p in prices]

    def _filled(self, order: Order, units: float, fills: list[Fill], now: float) -> None:
        order.filled_amount = clean(order.filled_amount + units)
        order.fills.extend(fills)
        if order.remaining <= EPS and order.delete_reason is None:
            self._close(order, "filled", now, None, record=False)

    @staticmethod
    def _apply(pos: Position, signed: float, price: float, funding_mark: float) -> tuple[float | None, float]:
        """Average-cost accounting against the start price; a flip realises the closed part and opens
        the rest at ``price``. Returns (positional P&L, funding P&L) realised (None: nothing closed)."""
        held = pos.position
        if _sign(held) == 0 or _sign(held) == _sign(signed):
            total = abs(held) + abs(signed)
            pos.average_price = clean((abs(held) * pos.average_price + abs(signed) * price) / total)
            pos.start_price = clean((abs(held) * pos.start_price + abs(signed) * price) / total)
            pos.funding_entry_value = clean(pos.funding_entry_value + funding_mark * signed)
            pos.position = clean(held + signed)
            return None, 0.0
        closed = min(abs(signed), abs(held))
        share = closed / abs(held)
        position_pnl = clean(closed * (price - pos.start_price) * _sign(held))
        funding_pnl = clean(share * (funding_mark * held - pos.funding_entry_value))
        pos.funding_entry_value = clean(pos.funding_entry_value * (1.0 - share))
        pos.session_position_pnl = clean(pos.session_position_pnl + position_pnl)
        pos.session_funding_pnl = clean(pos.session_funding_pnl + funding_pnl)
        pos.position = clean(held + signed)
        if abs(signed) > abs(held) + EPS:
            pos.average_price = pos.start_price = price
            pos.funding_entry_value = clean(funding_mark * pos.position)
        elif _sign(pos.position) == 0:
            pos.position = 0.0
            pos.average_price = pos.start_price = 0.0
            pos.funding_entry_value = 0.0
        return position_pnl, funding_pnl

    def fee(
        self, inst: Instrument, price: float, amount: float, index: float, maker_taker: str
    ) -> tuple[float, float]:
        """Tier-1 schedule. Futures: rate * price * amount. Options: 2.5 bps of index notional,
        capped at `option_fee_cap` of the premium (12.5 % unless configured)."""
        if inst.kind == "option":
            return OPTION_FEE, clean(self.capped(OPTION_FEE * index * amount, price * amount))
        rate = MAKER_FEE_FUTURES if maker_taker == "maker" else TAKER_FEE_FUTURES
        return rate, clean(rate * price * amount)

    def capped(self, fee: float, premium: float) -> float:
        """An option fee under the premium cap (``option_fee_cap``; None: no cap)."""
        return fee if self.option_fee_cap is None else min(fee, self.option_fee_cap * premium)

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
                events += self._close(order, "client_cancel", now, "amend")
            else:
                order.amount = clean(order.filled_amount + allowed)
                events.append(self._order_event(order, "amend", []))
        return events

    def _close(
        self, order: Order, reason: str, now: float, change_reason: str | None, record: bool = True
    ) -> list[Event]:
        """Close an order; with ``change_reason`` its ``orders`` event; with ``record`` its history events
        (an order closed while its answer is being built records them itself)."""
        order.delete_reason = reason
        order.close_time = now
        account = self.accounts.get(order.account_id)
        if account is not None:
            account.orders.pop(order.order_id, None)
        session = self.sessions.get(order.session_id)
        if session is not None and order.client_order_id is not None:
            session.client_orders.pop(order.client_order_id, None)
        events = [self._order_event(order, change_reason, [])] if change_reason is not None else []
        if record:
            events += self._history_events(order)
        return events

    def _history_events(self, order: Order) -> list[Event]:
        """A closed order enters the order history (and ``account.order_history``), an unfilled mass
        quote excepted."""
        account = self.accounts.get(order.account_id)
        if account is None or not order.order_id:
            return []
        if order.mass_quote and order.filled_amount <= EPS:
            return []  # api.yaml: "Unfilled market maker orders are not included."
        wire = order.history_wire()
        account.order_history.append((self.next_seq(), wire))
        return [Event("order_history", order.account_id, order.session_id, wire)]

    @classmethod
    def _order_event(cls, order: Order, change_reason: str, fills: list[Fill]) -> Event:
        return cls._wire_event(order, order.to_wire(change_reason, fills))

    @staticmethod
    def _wire_event(order: Order, wire: dict[str, Any]) -> Event:
        """The ``orders`` event of ``order`` (``wire`` its OrderStatus), marked when it is a mass quote."""
        return Event("orders", order.account_id, order.session_id, wire, mass_quote=order.mass_quote)
