"""Account queries: open orders, portfolio, trade history, account summary."""

from __future__ import annotations

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


@METHODS.method("private/account_summary")
async def account_summary(call: Call) -> dict:
    return call.exchange.engine.account_summary(call.session.account)
