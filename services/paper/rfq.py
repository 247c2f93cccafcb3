"""Requests for quote, both sides: RFQs of accounts answered by simulated market makers (and by other
accounts), and RFQs of simulated takers answered by accounts (``private/create_rfq`` ...
``private/mm_rfq_quotes``).

Pure (every call takes ``now``). An RFQ's legs are minimised to integer quantities (see
:mod:`services.paper.rfq_legs`); it lives ``RFQ_LIFETIME`` seconds (Thalex: 5 minutes). Simulated
market makers quote every account's RFQ at the paper's book: the bid sells each long leg at its best
bid and buys each short leg at its best ask, the ask the other way round, for the whole amount, and
follow the book while the RFQ is open. A simulated taker's RFQ (control API) trades the accounts'
quotes that are at least as good as the package's mark value. A trade books every leg on both
accounts involved as a ``trade_type: rfq`` trade (the requester taker, the quoting account maker) at
leg prices that add up to the quote's price, paying fees on the leg's ``fee_quantity`` share; right
after, every other open quote of a quoting account that traded is cancelled (Thalex's RFQ protection).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.paper.accounts import EPS, Event, Session, clean
from services.paper.engine import MAX_LABEL_BYTES, Engine
from services.paper.errors import (
    DUPLICATE_ORDER_ID,
    INVALID_AMOUNT,
    INVALID_PRICE,
    INVALID_REQUEST,
    INVALID_STATE,
    ORDER_NOT_FOUND,
    RpcError,
)
from services.paper.market import Instrument, is_aligned
from services.paper.params import choice, number
from services.paper.rfq_legs import FeeLeg, LegError, fee_quantities, leg_prices, minimise

INSUFFICIENT_LIQUIDITY = 41
RECENTLY_TRADED = 100
RFQ_LIFETIME = 300.0
RFQ_ID_BASE = 0x00F0_0000_0000_0000
QUOTE_ID_BASE = 0x00E0_0000_0000_0000
OPPOSITE = {"buy": "sell", "sell": "buy"}


@dataclass
class RfqLeg:
    instrument: Instrument
    quantity: int
    fee_quantity: float


@dataclass
class RfqQuote:
    """A quote on an RFQ: an account's (``owner``) or a simulated market maker's (``owner`` None)."""

    order_id: str
    rfq_id: str
    owner: str | None
    session_id: int
    persistent: bool
    direction: str
    price: float
    amount: float
    client_order_id: int | None = None
    label: str | None = None
    trade_price: float | None = None
    trade_amount: float | None = None
    delete_reason: str | None = None
    closed: bool = False

    def wire(self, event: str | None = None, *, owner_view: bool = True) -> dict[str, Any]:
        """``RfqOrder``; the requester sees quotes on its RFQ without the quoting account's label and ids."""
        wire: dict[str, Any] = {
            "rfq_id": self.rfq_id,
            "order_id": self.order_id,
            "direction": self.direction,
            "price": self.price,
            "amount": self.amount,
        }
        optional: dict[str, Any] = {
            "trade_price": self.trade_price,
            "trade_amount": self.trade_amount,
            "delete_reason": self.delete_reason,
            "event": event,
        }
        if owner_view:
            optional.update(client_order_id=self.client_order_id, label=self.label)
        wire.update({name: value for name, value in optional.items() if value is not None})
        return wire


@dataclass
class Rfq:
    rfq_id: str
    requester: str | None
    """The requesting account; None for a simulated taker's RFQ."""
    legs: list[RfqLeg]
    amount: float
    volume_tick_size: float
    create_time: float
    valid_until: float
    label: str | None = None
    delete_reason: str | None = None
    trade_price: float | None = None
    trade_amount: float | None = None
    close_time: float | None = None

    @property
    def open(self) -> bool:
        return self.close_time is None

    def wire(self, quotes: list[RfqQuote] | None = None, event: str | None = None) -> dict[str, Any]:
        """``Rfq``: with ``quotes`` the requester's view (label, reasons, best quotes), else a maker's."""
        wire: dict[str, Any] = {
            "rfq_id": self.rfq_id,
            "amount": self.amount,
            "create_time": self.create_time,
            "valid_until": self.valid_until,
            "volume_tick_size": self.volume_tick_size,
            "legs": [
                {
                    "instrument_name": leg.instrument.name,
                    "quantity": leg.quantity,
                    "fee_quantity": leg.fee_quantity,
                }
                for leg in self.legs
            ],
        }
        optional: dict[str, Any] = {
            "trade_price": self.trade_price,
            "trade_amount": self.trade_amount,
            "close_time": self.close_time,
        }
        if quotes is not None:
            optional.update(
                label=self.label,
                insert_reason="client_request",
                delete_reason=self.delete_reason,
                quoted_bid=_best(quotes, "buy", self.amount),
                quoted_ask=_best(quotes, "sell", self.amount),
                event=event,
            )
        wire.update({name: value for name, value in optional.items() if value is not None})
        return wire


def _best(quotes: list[RfqQuote], direction: str, cap: float) -> dict[str, float] | None:
    """The best open quote price of one side and the amount quoted at it (at most the RFQ's amount)."""
    side = [q for q in quotes if q.direction == direction and not q.closed]
    if not side:
        return None
    price = max(q.price for q in side) if direction == "buy" else min(q.price for q in side)
    amount = sum(q.amount for q in side if abs(q.price - price) <= EPS)
    return {"price": price, "amount": min(amount, cap)}


class Rfqs:
    """Every RFQ and RFQ quote of the exchange."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rfqs: dict[str, Rfq] = {}
        self.quotes: dict[str, RfqQuote] = {}
        self.traded: deque[dict[str, Any]] = deque(maxlen=RECENTLY_TRADED)
        """Recently traded RFQs (as market makers see them): the public ``rfqs`` channel's snapshot."""
        self._next_rfq = RFQ_ID_BASE
        self._next_quote = QUOTE_ID_BASE

    # Views

    def quotes_of(self, rfq: Rfq) -> list[RfqQuote]:
        return [q for q in self.quotes.values() if q.rfq_id == rfq.rfq_id]

    def requester_view(self, rfq: Rfq, event: str | None = None) -> dict[str, Any]:
        return rfq.wire(self.quotes_of(rfq), event)

    def open_rfqs(self, account_id: str, event: str | None = None) -> list[dict[str, Any]]:
        """``private/open_rfqs``; with ``event: Existing``, the ``account.rfqs`` snapshot."""
        return [
            self.requester_view(r, event) for r in self.rfqs.values() if r.open and r.requester == account_id
        ]

    def mm_rfqs(self, account_id: str) -> list[dict[str, Any]]:
        """Open RFQs this account may quote: every other account's and the simulated takers'."""
        return [r.wire() for r in self.rfqs.values() if r.open and r.requester != account_id]

    def mm_quotes(self, account_id: str) -> list[dict[str, Any]]:
        return [q.wire() for q in self.quotes.values() if q.owner == account_id and not q.closed]

    def quote_feed(self, account_id: str) -> list[dict[str, Any]]:
        """``mm.rfq_quotes`` snapshot: the account's open quotes and the open quotes on its open RFQs."""
        feed = [q.wire("Existing") for q in self.quotes.values() if q.owner == account_id and not q.closed]
        for rfq in self.rfqs.values():
            if rfq.open and rfq.requester == account_id:
                feed += [q.wire("Existing", owner_view=False) for q in self.quotes_of(rfq) if not q.closed]
        return feed

    # The requester's side

    def create(
        self, requester: str | None, params: dict[str, Any], now: float, lifetime: float = RFQ_LIFETIME
    ) -> tuple[dict[str, Any], list[Event]]:
        """A new RFQ; simulated market makers quote an account's RFQ at once."""
        legs, amount, tick = self._legs(params.get("legs"))
        label = _label(params)
        self._next_rfq += 1
        rfq = Rfq(f"{self._next_rfq:016X}", requester, legs, amount, tick, now, now + lifetime, label)
        self.rfqs[rfq.rfq_id] = rfq
        events = [Event("mm_rfq", a, None, rfq.wire()) for a in self.engine.accounts if a != requester]
        if requester is None:
            return rfq.wire(), events
        events.extend(self._simulated_quotes(rfq))
        events.insert(0, Event("rfq", requester, None, self.requester_view(rfq, "Created")))
        return self.requester_view(rfq), events

    def cancel(self, account_id: str, params: dict[str, Any], now: float) -> list[Event]:
        rfq = self._own_open_rfq(account_id, params)
        return self._close(rfq, now, "client_cancel")

    def trade(
        self, account_id: str, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        rfq = self._own_open_rfq(account_id, params)
        direction = choice(params, "direction", ("buy", "sell"), None)
        if direction is None:
            raise RpcError(INVALID_REQUEST, "missing parameter direction")
        return self.execute(rfq, direction, number(params, "limit_price", required=True), now)

    def execute(
        self, rfq: Rfq, direction: str, limit_price: float | None, now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        """The requester buys (sells) the combination from the best asks (bids) within ``limit_price``."""
        side = OPPOSITE[direction]
        candidates = [
            q
            for q in self.quotes_of(rfq)
            if not q.closed
            and q.direction == side
            and (
                limit_price is None
                or (q.price <= limit_price + EPS if direction == "buy" else q.price >= limit_price - EPS)
            )
        ]
        candidates.sort(key=lambda q: q.price if direction == "buy" else -q.price)
        fills: list[tuple[RfqQuote, float]] = []
        left = rfq.amount
        for quote in candidates:
            take = clean(min(quote.amount, left))
            fills.append((quote, take))
            left = clean(left - take)
            if left <= EPS:
                break
        if not fills:
            raise RpcError(
                INSUFFICIENT_LIQUIDITY, f"no {side} quote on RFQ {rfq.rfq_id} within the limit price"
            )
        events: list[Event] = []
        for quote, take in fills:
            events.extend(self._book(rfq, quote, take, direction, now))
            quote.trade_price, quote.trade_amount = quote.price, take
        traded = clean(sum(take for _, take in fills))
        rfq.trade_price = clean(sum(q.price * take for q, take in fills) / traded)
        rfq.trade_amount = traded
        events.extend(self._close(rfq, now, "filled", filled={q.order_id for q, _ in fills}))
        for owner in {q.owner for q, _ in fills if q.owner is not None}:
            events.extend(self._protect(owner, rfq))
        result = {
            "rfq_id": rfq.rfq_id,
            "direction": direction,
            "price": rfq.trade_price,
            "amount": traded,
            "legs": [
                {
                    "instrument_name": leg.instrument.name,
                    "direction": direction if leg.quantity > 0 else OPPOSITE[direction],
                    "amount": clean(abs(leg.quantity) * traded),
                }
                for leg in rfq.legs
            ],
        }
        return result, events

    # The market maker's side

    def insert_quote(
        self, session: Session, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        account_id = session.account.account_id
        rfq = self.rfqs.get(str(params.get("rfq_id")))
        if rfq is None or not rfq.open:
            raise RpcError(ORDER_NOT_FOUND, "RFQ not found or no longer open")
        if rfq.requester == account_id:
            raise RpcError(INVALID_STATE, "an account cannot quote its own RFQ")
        direction = choice(params, "direction", ("buy", "sell"), None)
        if direction is None:
            raise RpcError(INVALID_REQUEST, "missing parameter direction")
        price, amount = self._price_amount(rfq, params)
        client_order_id = params.get("client_order_id")
        if client_order_id is not None:
            if (
                isinstance(client_order_id, bool)
                or not isinstance(client_order_id, int)
                or client_order_id < 0
            ):
                raise RpcError(INVALID_REQUEST, "client_order_id must be an integer between 0 and 2^64-1")
            if self._by_client_id(session, client_order_id) is not None:
                raise RpcError(DUPLICATE_ORDER_ID, "duplicate client_order_id")
        self._next_quote += 1
        quote = RfqQuote(
            f"{self._next_quote:016X}",
            rfq.rfq_id,
            account_id,
            session.session_id,
            not session.cancel_on_disconnect,
            direction,
            price,
            amount,
            client_order_id,
            _label(params),
        )
        self.quotes[quote.order_id] = quote
        return quote.wire(), self._quote_events(quote, "Inserted")

    def amend_quote(self, session: Session, params: dict[str, Any]) -> tuple[dict[str, Any], list[Event]]:
        quote = self._own_quote(session, params)
        quote.price, quote.amount = self._price_amount(self.rfqs[quote.rfq_id], params)
        return quote.wire(), self._quote_events(quote, "Amended")

    def delete_quote(self, session: Session, params: dict[str, Any]) -> list[Event]:
        quote = self._own_quote(session, params)
        quote.closed, quote.delete_reason = True, "client_cancel"
        return self._quote_events(quote, "Cancelled")

    # Time passing

    def end_session(self, session: Session) -> list[Event]:
        """``private/cancel_session``: the session's non-persistent quotes go as when it ends."""
        return self._end_quotes(lambda session_id: session_id == session.session_id)

    def _end_quotes(self, ended: Callable[[int], bool]) -> list[Event]:
        """Non-persistent quotes of accounts whose session has ``ended`` are cancelled (``session_end``)."""
        events: list[Event] = []
        for quote in list(self.quotes.values()):
            mine = quote.owner is not None and not quote.persistent
            if mine and not quote.closed and ended(quote.session_id):
                quote.closed, quote.delete_reason = True, "session_end"
                events.extend(self._quote_events(quote, "Cancelled"))
        return events

    def tick(self, now: float) -> list[Event]:
        """Quotes of ended cancel-on-disconnect sessions go, RFQs expire (or end with a leg that
        expired), simulated makers follow the book, simulated takers trade quotes at least as good as
        the package's mark value."""
        events = self._end_quotes(lambda session_id: session_id not in self.engine.sessions)
        for rfq in list(self.rfqs.values()):
            if not rfq.open:
                continue
            if now >= rfq.valid_until or any(
                leg.instrument.name not in self.engine.market.instruments for leg in rfq.legs
            ):
                events.extend(self._close(rfq, now, None))
            elif rfq.requester is not None:
                events.extend(self._simulated_quotes(rfq))
            else:
                events.extend(self._simulated_taker(rfq, now))
        return events

    # Internals

    def _legs(self, value: Any) -> tuple[list[RfqLeg], float, float]:
        if not isinstance(value, list) or not value:
            raise RpcError(INVALID_REQUEST, "legs must be a non-empty list of {instrument_name, amount}")
        instruments: list[Instrument] = []
        amounts: list[float] = []
        for leg in value:
            if not isinstance(leg, dict):
                raise RpcError(INVALID_REQUEST, "every leg is {instrument_name, amount}")
            inst = self.engine._instrument(leg.get("instrument_name"))
            if inst.is_combination:
                raise RpcError(INVALID_REQUEST, f"{inst.name}: every leg must be an outright instrument")
            amount = number(leg, "amount", required=True)
            assert amount is not None
            if abs(amount) < inst.min_order_amount - EPS or not is_aligned(amount, inst.volume_tick_size):
                raise RpcError(
                    INVALID_AMOUNT, f"{inst.name}: amount must be a multiple of {inst.volume_tick_size}"
                )
            instruments.append(inst)
            amounts.append(amount)
        if len({inst.name for inst in instruments}) != len(instruments):
            raise RpcError(INVALID_REQUEST, "every leg must be a different instrument")
        if not any(a > 0 for a in amounts):
            raise RpcError(INVALID_REQUEST, "at least one leg must be long")
        try:
            quantities, amount, tick = minimise(amounts, [inst.volume_tick_size for inst in instruments])
        except LegError as exc:
            raise RpcError(INVALID_REQUEST, str(exc)) from exc
        fee_legs = []
        for inst, q in zip(instruments, quantities, strict=True):
            mark = self.engine.market.mark(inst.name)
            fee = self.engine.fee(inst, mark.price, 1.0, mark.index, "taker")[1]
            fee_legs.append(FeeLeg(inst.underlying, inst.kind == "option", q, mark.delta, fee))
        shares = fee_quantities(fee_legs)
        legs = [RfqLeg(i, q, f) for i, q, f in zip(instruments, quantities, shares, strict=True)]
        return legs, amount, tick

    def _own_open_rfq(self, account_id: str, params: dict[str, Any]) -> Rfq:
        rfq_id = params.get("rfq_id")
        if not isinstance(rfq_id, str):
            raise RpcError(INVALID_REQUEST, "rfq_id must be a string")
        rfq = self.rfqs.get(rfq_id)
        if rfq is None or rfq.requester != account_id or not rfq.open:
            raise RpcError(ORDER_NOT_FOUND, "RFQ not found or no longer open")
        return rfq

    def _price_amount(self, rfq: Rfq, params: dict[str, Any]) -> tuple[float, float]:
        price = number(params, "price", required=True)
        amount = number(params, "amount", required=True)
        assert price is not None and amount is not None
        if amount <= 0 or not is_aligned(amount, rfq.volume_tick_size):
            raise RpcError(INVALID_AMOUNT, f"amount must be a positive multiple of {rfq.volume_tick_size}")
        marks = [self.engine.market.mark(leg.instrument.name).price for leg in rfq.legs]
        if min(leg_prices([leg.quantity for leg in rfq.legs], marks, price)) <= 0:
            raise RpcError(
                INVALID_PRICE, "price too far from the legs' marks: a leg would trade at or below zero"
            )
        return price, clean(amount)

    def _by_client_id(self, session: Session, client_order_id: int) -> RfqQuote | None:
        return next(
            (
                q
                for q in self.quotes.values()
                if not q.closed
                and q.session_id == session.session_id
                and q.client_order_id == client_order_id
            ),
            None,
        )

    def _own_quote(self, session: Session, params: dict[str, Any]) -> RfqQuote:
        order_id, client_order_id = params.get("order_id"), params.get("client_order_id")
        if (order_id is None) == (client_order_id is None):
            raise RpcError(INVALID_REQUEST, "exactly one of order_id or client_order_id is required")
        if client_order_id is not None:
            quote = self._by_client_id(session, client_order_id)
        else:
            quote = self.quotes.get(str(order_id))
        if quote is None or quote.closed or quote.owner != session.account.account_id:
            raise RpcError(ORDER_NOT_FOUND, "RFQ quote not found")
        return quote

    def _quote_events(self, quote: RfqQuote, event: str) -> list[Event]:
        """``mm.rfq_quotes`` for the quoting account and for the requester (without the quoter's label)."""
        rfq = self.rfqs[quote.rfq_id]
        events = []
        if quote.owner is not None:
            events.append(Event("rfq_quote", quote.owner, None, quote.wire(event)))
        if rfq.requester is not None and rfq.requester != quote.owner:
            events.append(Event("rfq_quote", rfq.requester, None, quote.wire(event, owner_view=False)))
        return events

    def _close(self, rfq: Rfq, now: float, reason: str | None, filled: set[str] | None = None) -> list[Event]:
        """An RFQ ends (traded, cancelled or expired): its quotes go, everybody concerned hears of it."""
        rfq.close_time, rfq.delete_reason = now, reason
        events: list[Event] = []
        for quote in self.quotes_of(rfq):
            if quote.closed:
                continue
            quote.closed = True
            if filled and quote.order_id in filled:
                quote.delete_reason = "filled"
                events.extend(self._quote_events(quote, "Filled"))
            else:
                events.extend(self._quote_events(quote, "Cancelled"))
        events.extend(
            Event("mm_rfq", a, None, rfq.wire()) for a in self.engine.accounts if a != rfq.requester
        )
        if rfq.requester is not None:
            event = "Traded" if reason == "filled" else "Cancelled"
            events.insert(0, Event("rfq", rfq.requester, None, self.requester_view(rfq, event)))
            closed = self.requester_view(rfq)
            self.engine.account(rfq.requester).rfq_history.append((self.engine.next_seq(), closed))
            events.append(Event("rfq_history", rfq.requester, None, closed))
        if reason == "filled":
            self.traded.append(rfq.wire())
            events.append(Event("rfq_traded", "", None, rfq.wire()))
        return events

    def _protect(self, owner: str, traded: Rfq) -> list[Event]:
        """Thalex: right after a quoting account trades, all its other RFQ quotes are cancelled."""
        events: list[Event] = []
        for quote in self.quotes.values():
            if quote.owner == owner and not quote.closed and quote.rfq_id != traded.rfq_id:
                quote.closed, quote.delete_reason = True, "mm_protection"
                events.extend(self._quote_events(quote, "Cancelled"))
        return events

    def _book(self, rfq: Rfq, quote: RfqQuote, amount: float, direction: str, now: float) -> list[Event]:
        """Book ``amount`` combinations at ``quote.price``, leg by leg, on the requester and the quoter."""
        marks = [self.engine.market.mark(leg.instrument.name).price for leg in rfq.legs]
        prices = leg_prices([leg.quantity for leg in rfq.legs], marks, quote.price)
        events: list[Event] = []
        for index, (leg, price) in enumerate(zip(rfq.legs, prices, strict=True)):
            taker_side = direction if leg.quantity > 0 else OPPOSITE[direction]
            size = clean(abs(leg.quantity) * amount)
            share = leg.fee_quantity / abs(leg.quantity)
            sides = [
                (rfq.requester, taker_side, "taker", rfq.rfq_id, rfq.label),
                (quote.owner, OPPOSITE[taker_side], "maker", quote.order_id, quote.label),
            ]
            for account_id, side, maker_taker, order_id, label in sides:
                if account_id is None:
                    continue
                extra: dict[str, Any] = {"order_id": order_id}
                if label is not None:
                    extra["label"] = label
                events += self._book_leg(
                    account_id, leg, index, side, size, price, maker_taker, now, share, extra
                )
        return events

    def _book_leg(
        self,
        account_id: str,
        leg: RfqLeg,
        index: int,
        direction: str,
        size: float,
        price: float,
        maker_taker: str,
        now: float,
        share: float,
        extra: dict[str, Any],
    ) -> list[Event]:
        """One leg of an RFQ trade on one account: an ``rfq`` trade paying ``share`` of the usual fee."""
        inst = leg.instrument
        mark = self.engine.market.mark(inst.name)
        fee_rate, fee = self.engine.fee(inst, price, size, mark.index, maker_taker)
        _, events = self.engine.book(
            self.engine.account(account_id),
            inst,
            direction,
            size,
            price,
            now,
            trade_type="rfq",
            fee_rate=clean(fee_rate * share),
            fee=clean(fee * share),
            maker_taker=maker_taker,
            leg_index=index,
            extra=extra,
        )
        return events

    def _simulated_quotes(self, rfq: Rfq) -> list[Event]:
        """Simulated market makers quote (or re-quote) an account's RFQ at the paper's book."""
        bid = ask = 0.0
        for leg in rfq.legs:
            inst = leg.instrument
            bids, asks = self.engine.market.book(inst.name)
            mark = self.engine.market.mark(inst.name).price
            best_bid = bids[0][0] if bids else max(mark - inst.tick_size, inst.tick_size)
            best_ask = asks[0][0] if asks else mark + inst.tick_size
            bid += leg.quantity * (best_bid if leg.quantity > 0 else best_ask)
            ask += leg.quantity * (best_ask if leg.quantity > 0 else best_bid)
        events: list[Event] = []
        for direction, price in (("buy", clean(bid)), ("sell", clean(ask))):
            quote = next(
                (
                    q
                    for q in self.quotes_of(rfq)
                    if q.owner is None and q.direction == direction and not q.closed
                ),
                None,
            )
            if quote is None:
                self._next_quote += 1
                quote = RfqQuote(
                    f"{self._next_quote:016X}", rfq.rfq_id, None, 0, True, direction, price, rfq.amount
                )
                self.quotes[quote.order_id] = quote
                events.extend(self._quote_events(quote, "Inserted"))
            elif abs(quote.price - price) > EPS:
                quote.price = price
                events.extend(self._quote_events(quote, "Amended"))
        return events

    def _simulated_taker(self, rfq: Rfq, now: float) -> list[Event]:
        """A simulated taker trades the accounts' best quote when it is at least as good as the mark value."""
        value = sum(leg.quantity * self.engine.market.mark(leg.instrument.name).price for leg in rfq.legs)
        open_quotes = [q for q in self.quotes_of(rfq) if not q.closed]
        asks = [q.price for q in open_quotes if q.direction == "sell"]
        bids = [q.price for q in open_quotes if q.direction == "buy"]
        if asks and min(asks) <= value + EPS:
            return self.execute(rfq, "buy", value, now)[1]
        if bids and max(bids) >= value - EPS:
            return self.execute(rfq, "sell", value, now)[1]
        return []


def _label(params: dict[str, Any]) -> str | None:
    label = params.get("label")
    if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
        raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
    return label
