"""Account queries: open orders, portfolio, the histories, account summary and breakdown, margin."""

from __future__ import annotations

from typing import Any

from services.paper import margin
from services.paper.accounts import clean
from services.paper.paging import page
from services.paper.params import number
from services.paper.rpc import METHODS, Call


@METHODS.method("private/open_orders")
async def open_orders(call: Call) -> list[dict]:
    return call.exchange.engine.open_orders(call.session.account)


@METHODS.method("private/portfolio")
async def portfolio(call: Call) -> list[dict]:
    return call.exchange.engine.portfolio(call.session.account)


@METHODS.method("private/trade_history")
async def trade_history(call: Call) -> dict:
    return call.exchange.engine.trade_history(call.session.account, call.params, call.now)


@METHODS.method("private/order_history")
async def order_history(call: Call) -> dict:
    """Closed orders, newest ``close_time`` first by default, paged like the trade history."""
    return call.exchange.engine.order_history(call.session.account, call.params)


@METHODS.method("private/daily_mark_history")
async def daily_mark_history(call: Call) -> dict:
    return page(
        call.session.account.daily_marks,
        call.params,
        time_key="time",
        result_key="daily_marks",
        sortable=False,
    )


@METHODS.method("private/transaction_history")
async def transaction_history(call: Call) -> dict:
    return page(
        call.session.account.transactions,
        call.params,
        time_key="time",
        result_key="transactions",
        sortable=False,
    )


@METHODS.method("private/rfq_history")
async def rfq_history(call: Call) -> dict:
    """Closed RFQs of the account (the RFQ family records them in ``Account.rfq_history``)."""
    return page(
        call.session.account.rfq_history,
        call.params,
        time_key="close_time",
        result_key="rfqs",
        sortable=False,
    )


@METHODS.method("private/account_summary")
async def account_summary(call: Call) -> dict:
    return call.exchange.engine.account_summary(call.session.account)


@METHODS.method("private/account_breakdown")
async def account_breakdown(call: Call) -> dict:
    """The summary per position: session fees, realised positional P&L and funding, open order amounts."""
    engine = call.exchange.engine
    account = call.session.account
    summary = engine.account_summary(account)
    lines = []
    for pos in account.positions.values():
        entry = engine.portfolio_entry(pos)
        funding = entry.get("unrealised_perpetual_funding", 0.0)
        orders = [
            o
            for o in account.orders.values()
            if o.instrument.name == pos.instrument.name
            or pos.instrument.name in {name for name, _ in o.instrument.legs}
        ]
        lines.append(
            {
                "instrument_name": pos.instrument.name,
                "position": pos.position,
                "mark_price": entry["mark_price"],
                "start_price": pos.start_price,
                "average_price": pos.average_price,
                "unrealised_pnl_positional": entry["unrealised_pnl"],
                "unrealised_pnl_perpetual": funding,
                "unrealised_pnl": clean(entry["unrealised_pnl"] + funding),
                "open_buy_amount": _open_amount(orders, pos.instrument.name, "buy"),
                "open_sell_amount": _open_amount(orders, pos.instrument.name, "sell"),
                "session_realised_pnl": clean(pos.realised_pnl - pos.session_fees),
                "realised_position_pnl": pos.session_position_pnl,
                "session_position_pnl": pos.session_position_pnl,
                "session_perpetual_funding": pos.session_funding_pnl,
                "session_fees": pos.session_fees,
            }
        )
    cash = {**engine.cash_wire(account), "applied_collateral": clean(account.cash)}
    return {
        "account_number": account.number,
        "portfolio": lines,
        "cash": [cash],
        "unrealised_pnl": summary["unrealised_pnl"],
        "cash_collateral": summary["cash_collateral"],
        "margin": summary["margin"],
        "required_margin": summary["required_margin"],
        "remaining_margin": summary["remaining_margin"],
        "session_realised_pnl": summary["session_realised_pnl"],
        "realised_position_pnl": clean(sum(p.session_position_pnl for p in account.positions.values())),
        "realised_perpetual_funding": clean(sum(p.session_funding_pnl for p in account.positions.values())),
        "session_fees": clean(sum(p.session_fees for p in account.positions.values())),
    }


def _open_amount(orders: list[Any], name: str, direction: str) -> float:
    """Open amount of ``name`` bought (or sold) by the orders, combination legs included."""
    total = 0.0
    for order in orders:
        if not order.instrument.legs:
            total += order.remaining if order.direction == direction else 0.0
            continue
        for leg, quantity in order.instrument.legs:
            buys = (order.direction == "buy") == (quantity > 0)
            if leg == name and buys == (direction == "buy"):
                total += order.remaining * abs(quantity)
    return clean(total)


@METHODS.method("private/required_margin_breakdown")
async def required_margin_breakdown(call: Call) -> dict:
    requirement = call.exchange.engine.margin(call.session.account)
    return {
        "portfolio": {
            "required_margin": requirement.required,
            "underlyings": [u.to_wire() for u in requirement.underlyings.values()],
        }
    }


@METHODS.method("private/required_margin_for_order")
async def required_margin_for_order(call: Call) -> dict:
    """The requirement now, and with a hypothetical order of ``amount`` at ``price`` bought or sold."""
    engine = call.exchange.engine
    account = call.session.account
    if "legs" in call.params:
        inst = engine.combination_of(call.params)
    else:
        inst = call.exchange.instrument_named(call.params.get("instrument_name"))
    price = number(call.params, "price", required=True)
    amount = engine.checked_amount(inst, number(call.params, "amount", required=True))
    current = engine.margin(account)
    answer: dict[str, Any] = {"current": _lightweight(current, inst.underlying)}
    for side, sign in (("with_buy", 1.0), ("with_sell", -1.0)):
        exposures = margin.hypothetical(call.exchange.market, inst, sign * amount, price or 0.0)
        answer[side] = _lightweight(engine.margin(account, exposures, extra_buys=sign > 0), inst.underlying)
    return answer


def _lightweight(requirement: margin.AccountMargin, underlying: str) -> dict:
    detail = requirement.underlyings.get(underlying) or margin.UnderlyingMargin(underlying)
    return {"required_margin": requirement.required, "underlying": detail.summary_wire()}
