"""Requests for quote: the requester's methods and the market maker's."""

from __future__ import annotations

from services.paper.rpc import METHODS, Call


@METHODS.method("private/create_rfq", order_message=True)
async def create_rfq(call: Call) -> dict:
    account_id = call.trading_session.account.account_id
    result, events = call.exchange.automation.rfqs.create(account_id, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/cancel_rfq", order_message=True)
async def cancel_rfq(call: Call) -> None:
    account_id = call.trading_session.account.account_id
    call.publish(call.exchange.automation.rfqs.cancel(account_id, call.params, call.now))


@METHODS.method("private/trade_rfq", order_message=True)
async def trade_rfq(call: Call) -> dict:
    account_id = call.trading_session.account.account_id
    result, events = call.exchange.automation.rfqs.trade(account_id, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/open_rfqs")
async def open_rfqs(call: Call) -> list[dict]:
    return call.exchange.automation.rfqs.open_rfqs(call.session.account.account_id)


@METHODS.method("private/mm_rfqs")
async def mm_rfqs(call: Call) -> list[dict]:
    return call.exchange.automation.rfqs.mm_rfqs(call.session.account.account_id)


@METHODS.method("private/mm_rfq_insert_quote", order_message=True)
async def mm_rfq_insert_quote(call: Call) -> dict:
    result, events = call.exchange.automation.rfqs.insert_quote(call.trading_session, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/mm_rfq_amend_quote", order_message=True)
async def mm_rfq_amend_quote(call: Call) -> dict:
    result, events = call.exchange.automation.rfqs.amend_quote(call.trading_session, call.params)
    call.publish(events)
    return result


@METHODS.method("private/mm_rfq_delete_quote", order_message=True)
async def mm_rfq_delete_quote(call: Call) -> None:
    call.publish(call.exchange.automation.rfqs.delete_quote(call.trading_session, call.params))


@METHODS.method("private/mm_rfq_quotes")
async def mm_rfq_quotes(call: Call) -> list[dict]:
    return call.exchange.automation.rfqs.mm_quotes(call.session.account.account_id)
