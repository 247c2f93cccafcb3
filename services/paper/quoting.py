"""Mass quotes under market-maker protection (``mass_quote``, ``set_mm_protection``, ``cancel_mass_quote``).

Pure (every call takes ``now``). A quote is an order of the engine marked ``mass_quote``: it rests and
fills like any order and is reported on ``account.orders`` / ``account.trade_history``, but the
single-order and bulk order cancels leave it alone (Thalex: mass quotes are not orders). Protection
groups are kept per session and product; the engine's fill listener counts the executions of a
session's quotes against its group and pulls the group's quotes once ``trade_amount`` is used up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.paper.accounts import EPS, Account, Event, Fill, Order, Session
from services.paper.engine import MAX_LABEL_BYTES, Engine
from services.paper.errors import (
    COLLAR_BREACH,
    INVALID_AMOUNT,
    INVALID_PRICE,
    INVALID_REQUEST,
    INVALID_STATE,
    PRICE_NOT_ALIGNED,
    UNKNOWN_INSTRUMENT,
    RpcError,
)
from services.paper.market import Instrument, is_aligned
from services.paper.params import positive

MAX_QUOTES = 100
MAX_LEVELS = 10
QUOTE_TOO_LARGE = 50
"""Thalex's "total order size too large": a quote level above the protection's ``quote_amount``."""
SIDES = (("b", "buy", "bid"), ("a", "sell", "ask"))
"""(key in a ``DoubleSidedQuote``, order direction, side named in an error)."""

Level = tuple[float, float]


@dataclass
class ProtectionGroup:
    """``set_mm_protection`` of one product in one session: how much of its quotes may still execute."""

    account_id: str
    session_id: int
    product: str
    trade_amount: float
    quote_amount: float
    executed: float = 0.0

    @property
    def remaining(self) -> float:
        return round(self.trade_amount - self.executed, 10)

    def notice(self, reason: str) -> Event:
        """The ``session.mm_protection`` line for this group."""
        payload = {"product": self.product, "remaining_amount": self.remaining, "reason": reason}
        return Event("mm_protection", self.account_id, self.session_id, payload)


@dataclass(frozen=True)
class SideQuote:
    """One side of one ``DoubleSidedQuote`` as sent: its levels replace the side's earlier quotes."""

    instrument_name: str
    direction: str
    side: str
    levels: list[Level]


class MassQuotes:
    """Every account's mass quotes and protection groups."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.groups: dict[tuple[int, str], ProtectionGroup] = {}
        engine.fill_listeners.append(self.on_fill)

    # set_mm_protection

    def set_protection(self, session: Session, params: dict[str, Any]) -> list[Event]:
        """A new (or refilled) protection group for ``product`` in this session: ``refill``."""
        product = self._product(params.get("product"), required=True)
        assert product is not None
        deprecated = params.get("amount")
        if deprecated is not None:
            trade_amount = quote_amount = positive(params, "amount")
        else:
            trade_amount, quote_amount = positive(params, "trade_amount"), positive(params, "quote_amount")
        if trade_amount > quote_amount + EPS:
            raise RpcError(INVALID_REQUEST, "trade_amount must be lower or equal to quote_amount")
        group = ProtectionGroup(
            session.account.account_id, session.session_id, product, trade_amount, quote_amount
        )
        self.groups[(session.session_id, product)] = group
        return [group.notice("refill")]

    # mass_quote

    def mass_quote(
        self, session: Session, params: dict[str, Any], now: float
    ) -> tuple[dict[str, Any], list[Event]]:
        """Replace the quoted sides; a side fails alone (``errors``), the call only when malformed."""
        sides = self._parse(params)
        label = params.get("label")
        if label is not None and (not isinstance(label, str) or len(label.encode()) > MAX_LABEL_BYTES):
            raise RpcError(INVALID_REQUEST, f"label must be a string of at most {MAX_LABEL_BYTES} bytes")
        flags = {name: params.get(name, False) for name in ("post_only", "reject_post_only")}
        if not all(isinstance(value, bool) for value in flags.values()):
            raise RpcError(INVALID_REQUEST, "post_only and reject_post_only must be booleans")
        result: dict[str, Any] = {"n_success": 0, "n_fail": 0, "errors": []}
        events: list[Event] = []
        for side in sides:
            errors = self._check(session, side)
            if errors:
                result["n_fail"] += 1
                result["errors"].extend(errors)
                continue
            placed, refused = self._replace(session, side, label, flags, now)
            events.extend(placed)
            result["n_success" if not refused else "n_fail"] += 1
            result["errors"].extend(refused)
        return result, events

    def _parse(self, params: dict[str, Any]) -> list[SideQuote]:
        quotes = params.get("quotes")
        if not isinstance(quotes, list) or len(quotes) > MAX_QUOTES:
            raise RpcError(
                INVALID_REQUEST, f"quotes must be a list of at most {MAX_QUOTES} double-sided quotes"
            )
        sides: list[SideQuote] = []
        for quote in quotes:
            if not isinstance(quote, dict) or not isinstance(quote.get("i"), str):
                raise RpcError(INVALID_REQUEST, "every quote needs the instrument name i")
            for key, direction, side in SIDES:
                if key in quote:
                    sides.append(SideQuote(quote["i"], direction, side, _levels(quote[key])))
        return sides

    def _check(self, session: Session, side: SideQuote) -> list[dict[str, Any]]:
        """Why this side cannot be quoted (empty: it can); one error per bad level."""
        inst = self.engine.market.instruments.get(side.instrument_name)
        if inst is None:
            return [_error(UNKNOWN_INSTRUMENT, f"unknown instrument {side.instrument_name}", side.side)]
        group = self.groups.get((session.session_id, inst.product))
        if group is None:
            message = f"market maker protection is not set for {inst.product} in this session"
            return [_error(INVALID_STATE, message, side.side)]
        if group.remaining <= EPS:
            message = (
                f"market maker protection of {inst.product} is exhausted: refill it with set_mm_protection"
            )
            return [_error(INVALID_STATE, message, side.side)]
        mark = self.engine.market.mark(inst.name).price
        low, high = self.engine.market.collar(inst.name, mark)
        errors: list[dict[str, Any]] = []
        for price, amount in side.levels:
            problem = _level_problem(inst, price, amount, group.quote_amount, low, high, side.direction)
            if problem is not None:
                errors.append(_error(problem[0], problem[1], side.side, price))
        return errors

    def _replace(
        self, session: Session, side: SideQuote, label: str | None, flags: dict[str, bool], now: float
    ) -> tuple[list[Event], list[dict[str, Any]]]:
        """The side's live quotes become ``levels``: an unchanged level (price and amount) keeps its order.

        A level the order checks still refuse (the margin check: 24) is left out and reported.
        """
        account = session.account
        inst = self.engine.market.instruments[side.instrument_name]
        live = [
            o
            for o in account.orders.values()
            if o.mass_quote
            and o.session_id == session.session_id
            and o.instrument is inst
            and o.direction == side.direction
        ]
        events: list[Event] = []
        refused: list[dict[str, Any]] = []
        to_insert: list[Level] = []
        for price, amount in side.levels:
            if amount <= EPS:
                continue
            same = next(
                (o for o in live if abs((o.price or 0.0) - price) <= EPS and abs(o.amount - amount) <= EPS),
                None,
            )
            if same is not None:
                live.remove(same)
            else:
                to_insert.append((price, amount))
        for order in live:
            events += self.engine.withdraw(order, "client_cancel", now)
        for price, amount in to_insert:
            params: dict[str, Any] = {
                "instrument_name": inst.name,
                "direction": side.direction,
                "amount": amount,
                "price": price,
                **flags,
            }
            if label is not None:
                params["label"] = label
            try:
                _, placed = self.engine.place(account, params, now, session, mass_quote=True)
            except RpcError as exc:
                refused.append(_error(exc.code, exc.message, side.side, price))
                continue
            events.extend(placed)
        return events, refused

    # cancel_mass_quote

    def cancel(self, account: Account, params: dict[str, Any], now: float) -> list[Event]:
        """Quotes of every session of the account (of ``product``) go; their protection groups are deleted."""
        product = self._product(params.get("product"), required=False)
        events = [
            event
            for order in list(account.orders.values())
            if order.mass_quote and (product is None or order.instrument.product == product)
            for event in self.engine.withdraw(order, "client_bulk_cancel", now)
        ]
        for key, group in list(self.groups.items()):
            if group.account_id == account.account_id and (product is None or group.product == product):
                del self.groups[key]
                group.executed = group.trade_amount
                events.append(group.notice("client_cancel"))
        return events

    # Executions

    def on_fill(self, account: Account, order: Order, fill: Fill, now: float) -> list[Event]:
        """Count a quote execution; pull the session's quotes of the product once the group is used up."""
        if not order.mass_quote:
            return []
        key = (order.session_id, order.instrument.product)
        group = self.groups.get(key)
        if group is None:
            return []
        if order.session_id not in self.engine.sessions:
            del self.groups[key]  # the session ended: its group went with it
            return []
        group.executed = round(group.executed + fill.amount, 10)
        events = [group.notice("executions")]
        if group.remaining <= EPS:
            for quote in list(account.orders.values()):
                if (
                    quote.mass_quote
                    and quote.session_id == order.session_id
                    and (quote.instrument.product == group.product)
                ):
                    # the filling quote reports its end with its fill
                    events += self.engine.withdraw(quote, "mm_protection", now, quietly=quote is order)
        return events

    def end_session(self, session: Session) -> list[Event]:
        """``private/cancel_session``: the session's groups are deleted as when it ends, but the session
        is still there to hear it (``session_end``, remaining amount 0); quoting needs set_mm_protection."""
        events: list[Event] = []
        for key, group in list(self.groups.items()):
            if key[0] == session.session_id:
                del self.groups[key]
                group.executed = group.trade_amount
                events.append(group.notice("session_end"))
        return events

    def prune(self) -> None:
        """Groups of ended sessions are gone (Thalex: ``session_end``; nobody is left to tell)."""
        for key in [k for k in self.groups if k[0] not in self.engine.sessions]:
            del self.groups[key]

    def _product(self, value: Any, *, required: bool) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise RpcError(INVALID_REQUEST, "product must be a product group such as FBTCUSD or OBTCUSD")
        if value not in {inst.product for inst in self.engine.market.instruments.values()}:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown product {value}")
        return value


def _levels(value: Any) -> list[Level]:
    """A side as sent: ``{"p", "a"}`` or ``[[price, amount], ...]`` (at most 10 levels)."""
    if isinstance(value, dict):
        pairs = [[value.get("p"), value.get("a")]]
    elif isinstance(value, list) and len(value) <= MAX_LEVELS:
        pairs = value
    else:
        raise RpcError(
            INVALID_REQUEST, f"a quote side is {{p, a}} or a list of at most {MAX_LEVELS} [price, amount]"
        )
    levels: list[Level] = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(_is_number(v) for v in pair):
            raise RpcError(INVALID_REQUEST, "a quote level is a price and an amount")
        levels.append((float(pair[0]), float(pair[1])))
    return levels


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _level_problem(
    inst: Instrument,
    price: float,
    amount: float,
    quote_amount: float,
    low: float,
    high: float,
    direction: str,
) -> tuple[int, str] | None:
    """The error of one level (None: it can be quoted); amount 0 deletes the level."""
    if amount < 0:
        return INVALID_AMOUNT, "amount must not be negative"
    if amount <= EPS:
        return None
    if amount > quote_amount + EPS:
        return QUOTE_TOO_LARGE, f"amount {amount} exceeds the protection's quote_amount {quote_amount}"
    if not is_aligned(amount, inst.volume_tick_size) or amount < inst.min_order_amount - EPS:
        return INVALID_AMOUNT, f"amount not aligned with volume tick size {inst.volume_tick_size}"
    if price <= 0:
        return INVALID_PRICE, "price must be positive"
    if not is_aligned(price, inst.tick_size):
        return PRICE_NOT_ALIGNED, f"price not aligned with tick size {inst.tick_size}"
    if (price > high + EPS) if direction == "buy" else (price < low - EPS):
        return COLLAR_BREACH, f"price collar breach: collar is {low} .. {high}"
    return None


def _error(code: int, message: str, side: str, price: float | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "side": side}
    if price is not None:
        error["price"] = price
    return error
