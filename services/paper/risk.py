"""Margin breaches, as Thalex handles them (thalex.com support: initial and maintenance margin breach).

* Margin balance below the initial requirement: a ``margin_call`` inbox notification (once per
  breach) and the open orders that increase the requirement are cancelled (``margin_breach``);
  new orders that increase it are refused with error 24 (:mod:`services.paper.engine`).
* Below the maintenance requirement (70 % of initial): every open order is cancelled, a
  ``margin_call`` notification says the account is being liquidated, and positions are closed,
  largest notional first, until the balance covers the initial requirement again. A liquidation
  is an order with ``insert_reason: liquidation`` filled at the mark by one ``liquidation`` trade
  paying the taker fee plus a ``liquidation_fee`` of 50 bps (options: of the index notional,
  capped at 12.5 % of the premium).
"""

from __future__ import annotations

from services.paper.accounts import EPS, Account, Event, Fill, clean
from services.paper.engine import Engine

LIQUIDATION_FEE = 0.005
MARGIN_CALL = "margin_call"


def check(engine: Engine, now: float) -> list[Event]:
    """Look at every account with positions or orders; returns what happened."""
    events: list[Event] = []
    for account in list(engine.accounts.values()):
        if not account.orders and not any(abs(p.position) > EPS for p in account.positions.values()):
            account.margin_state = "ok"
            continue
        requirement = engine.margin(account)
        balance = engine.margin_balance(account)
        if balance < requirement.maintenance - EPS:
            events += _liquidate(engine, account, now)
        elif balance < requirement.required - EPS:
            events += _initial_breach(engine, account, balance, requirement.required, now)
        else:
            account.margin_state = "ok"
    return events


def _initial_breach(
    engine: Engine, account: Account, balance: float, required: float, now: float
) -> list[Event]:
    events: list[Event] = []
    if account.margin_state == "ok":
        account.margin_state = "initial"
        events.append(
            engine.post_notification(
                account,
                MARGIN_CALL,
                "Margin Requirements",
                f"Portfolio of account {account.account_id} breached initial margin requirements "
                f"(margin {balance:.2f} < required {required:.2f}).",
                "warning",
                now,
            )
        )
    increasing = [
        order
        for order in account.orders.values()
        if engine.margin(account).required > engine.margin(account, without=order.order_id).required + EPS
    ]
    events += engine.cancel_orders(account, increasing, "margin_breach", now)
    return events


def _liquidate(engine: Engine, account: Account, now: float) -> list[Event]:
    events: list[Event] = []
    if account.margin_state != "maintenance":
        account.margin_state = "maintenance"
        events.append(
            engine.post_notification(
                account,
                MARGIN_CALL,
                "Margin Requirements",
                f"Portfolio of account {account.account_id} breached maintenance margin requirements; "
                "positions are being liquidated.",
                "critical",
                now,
            )
        )
    events += engine.cancel_orders(account, list(account.orders.values()), "margin_breach", now)
    market = engine.market
    while engine.margin_balance(account) < engine.margin(account).required - EPS:
        open_positions = [
            p
            for p in account.positions.values()
            if abs(p.position) > EPS and p.instrument.name in market.instruments
        ]
        if not open_positions:
            break
        pos = max(open_positions, key=lambda p: abs(p.position) * market.mark(p.instrument.name).price)
        events += _liquidation_trade(engine, account, pos.instrument.name, now)
    if engine.margin_balance(account) >= engine.margin(account).required - EPS:
        account.margin_state = "ok"
    return events


def _liquidation_trade(engine: Engine, account: Account, name: str, now: float) -> list[Event]:
    market = engine.market
    pos = account.positions[name]
    inst = pos.instrument
    mark = market.mark(name)
    price = clean(max(inst.tick_size, round(mark.price / inst.tick_size) * inst.tick_size))
    amount = abs(pos.position)
    direction = "sell" if pos.position > 0 else "buy"
    order = engine.new_order(account.account_id, inst, direction, amount, now, insert_reason="liquidation")
    fee_rate, fee = engine.fee(inst, price, amount, mark.index, "taker")
    if inst.kind == "option":
        liquidation_fee = clean(engine.capped(LIQUIDATION_FEE * mark.index * amount, price * amount))
    else:
        liquidation_fee = clean(LIQUIDATION_FEE * price * amount)
    trade_id, events = engine.book(
        account,
        inst,
        direction,
        amount,
        price,
        now,
        trade_type="liquidation",
        fee_rate=fee_rate,
        fee=fee,
        order=order,
        maker_taker="taker",
        extra={"liquidation_fee": liquidation_fee},
    )
    return engine.finish_order(order, [Fill(trade_id, price, amount, "taker", now)], amount, now) + events
