"""Conditional orders: create, list, cancel one, cancel all."""

from __future__ import annotations

from services.paper.rpc import METHODS, Call


@METHODS.method("private/create_conditional_order", order_message=True)
async def create_conditional_order(call: Call) -> dict:
    result, events = call.exchange.automation.conditional.create(
        call.trading_session.account, call.params, call.now
    )
    call.publish(events)
    return result


@METHODS.method("private/conditional_orders")
async def conditional_orders(call: Call) -> list[dict]:
    return call.exchange.automation.conditional.listing(call.session.account.account_id)


@METHODS.method("private/cancel_conditional_order", order_message=True)
async def cancel_conditional_order(call: Call) -> None:
    conditional = call.exchange.automation.conditional
    call.publish(conditional.cancel(call.trading_session.account, call.params, call.now))


@METHODS.method("private/cancel_all_conditional_orders", order_message=True)
async def cancel_all_conditional_orders(call: Call) -> None:
    call.publish(call.exchange.automation.conditional.cancel_all(call.trading_session.account, call.now))
