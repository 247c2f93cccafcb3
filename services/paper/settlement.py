"""Expiry and the daily settlement, as Thalex does them at 08:00 UTC (pure: every call takes ``now``).

* Expiry (futures and options): open orders on the instrument are cancelled
  (``instrument_deactivated``) and every position is closed by an ``expiration`` trade at the
  settlement price (futures: the delivery price; options: their value at it), charged the final
  settlement fee of 1 bps of the amount settled (settlement price × amount: an option expiring
  worthless pays nothing). Settlement trades have no order: no ``order_id``, ``maker_taker`` or
  ``label``.
* Daily settlement: perpetuals and futures are settled futures-style at the mark (the unrealised
  P&L is realised and the start price reset to the mark; ``average_price`` keeps its value), the
  perpetual funding accrued is realised (``perpetual_funding_entry_value`` goes to 0 with the funding
  mark, which restarts at 0), a ``DailyMark`` is recorded per open futures-style position, and each
  line's realised P&L net of its fees is paid into the USDT balance (transactions ``session
  settlement`` and ``perpetual funding``). Flat lines leave the portfolio.
"""

from __future__ import annotations

from typing import Any

from services.paper.accounts import EPS, Account, Event, Position, clean
from services.paper.engine import Engine
from services.paper.instruments import Instrument

FINAL_SETTLEMENT_FEE = 0.0001


def expire(engine: Engine, expired: list[Instrument], now: float) -> list[Event]:
    """Cancel orders on ``expired`` instruments and close every position in them with settlement trades."""
    names = {inst.name for inst in expired}
    outrights = [inst for inst in expired if not inst.is_combination]
    events: list[Event] = []
    for account in list(engine.accounts.values()):
        doomed = [
            o
            for o in account.orders.values()
            if o.instrument.name in names or names & {leg for leg, _ in o.instrument.legs}
        ]
        events += engine.cancel_orders(account, doomed, "instrument_deactivated", now)
        for inst in outrights:
            pos = account.positions.get(inst.name)
            if pos is None or abs(pos.position) < EPS:
                continue
            price, delivery = engine.market.settlements[inst.name]
            amount = abs(pos.position)
            fee = final_settlement_fee(price, amount)
            _, booked = engine.book(
                account,
                inst,
                "sell" if pos.position > 0 else "buy",
                amount,
                price,
                now,
                trade_type="expiration",
                fee_rate=FINAL_SETTLEMENT_FEE,
                fee=fee,
                extra={"index": delivery},
            )
            events += booked
    return events


def final_settlement_fee(price: float, amount: float) -> float:
    """Thalex: "final settlement 1 bps of any amount which is settled at expiry": of the settlement
    price × amount (an option's value, so one expiring worthless pays nothing)."""
    return clean(FINAL_SETTLEMENT_FEE * price * amount)


def settle(engine: Engine, now: float) -> list[Event]:
    """The daily settlement of every account; funding marks restart at 0. Returns the events."""
    market = engine.market
    reported: list[tuple[str, Position]] = []
    touched: list[str] = []
    for account in list(engine.accounts.values()):
        if not account.positions:
            continue
        touched.append(account.account_id)
        for name, pos in list(account.positions.items()):
            if pos.instrument.kind in ("perpetual", "future") and name in market.instruments:
                _mark_to_market(engine, account.daily_marks, pos, now)
            _pay_out(engine, account, pos, now)
            if abs(pos.position) < EPS:
                del account.positions[name]
            else:
                reported.append((account.account_id, pos))
    for name in market.funding_marks:
        market.funding_marks[name] = 0.0
    market.version += 1
    events = [
        Event("portfolio", account_id, None, engine.portfolio_entry(pos)) for account_id, pos in reported
    ]
    events += [Event("summary", account_id, None, {}) for account_id in touched]
    return events


def _mark_to_market(
    engine: Engine, daily_marks: list[tuple[int, dict[str, Any]]], pos: Position, now: float
) -> None:
    """Futures-style: realise P&L to the mark and the funding accrued; record the daily mark."""
    if abs(pos.position) < EPS:
        return
    mark = engine.market.mark(pos.instrument.name).price
    realised = clean((mark - pos.start_price) * pos.position)
    pos.session_position_pnl = clean(pos.session_position_pnl + realised)
    pos.start_price = mark
    row = {
        "time": now,
        "instrument_name": pos.instrument.name,
        "position": pos.position,
        "mark_price": mark,
        "realized_position_pnl": realised,
    }
    if pos.instrument.kind == "perpetual":
        funding = engine.unrealised_funding(pos)
        pos.session_funding_pnl = clean(pos.session_funding_pnl + funding)
        pos.funding_entry_value = 0.0
        row["realized_funding_pnl"] = funding
    daily_marks.append((engine.next_seq(), row))


def _pay_out(engine: Engine, account: Account, pos: Position, now: float) -> None:
    """The line's session P&L net of fees and its funding go into the balance; the session restarts."""
    name = pos.instrument.name
    session = clean(pos.session_position_pnl - pos.session_fees)
    if abs(session) > EPS:
        engine.transfer(
            account, session, "session settlement", f"daily settlement USD {session:.8f}", now, name
        )
    if abs(pos.session_funding_pnl) > EPS:
        funding = pos.session_funding_pnl
        engine.transfer(
            account, funding, "perpetual funding", f"perpetual funding USD {funding:.8f}", now, name
        )
    pos.session_position_pnl = pos.session_funding_pnl = pos.session_fees = 0.0
