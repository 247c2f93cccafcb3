"""Bots: create, list, cancel one, cancel all."""

from __future__ import annotations

from services.paper.rpc import METHODS, Call


@METHODS.method("private/create_bot", order_message=True)
async def create_bot(call: Call) -> dict:
    result, events = call.exchange.automation.bots.create(call.trading_session.account, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/bots")
async def bots(call: Call) -> list[dict]:
    return call.exchange.automation.bots.listing(call.session.account.account_id)


@METHODS.method("private/cancel_bot", order_message=True)
async def cancel_bot(call: Call) -> None:
    call.publish(call.exchange.automation.bots.cancel(call.trading_session.account, call.params, call.now))


@METHODS.method("private/cancel_all_bots", order_message=True)
async def cancel_all_bots(call: Call) -> None:
    call.publish(call.exchange.automation.bots.cancel_all(call.trading_session.account, call.now))
