"""Orders: insert, buy, sell, amend, cancel, cancel_all, cancel_session."""

from __future__ import annotations

from services.paper.rpc import METHODS, Call


@METHODS.method("private/insert", order_message=True)
async def insert(call: Call) -> dict:
    return _insert(call, call.params)


@METHODS.method("private/buy", order_message=True)
async def buy(call: Call) -> dict:
    return _insert(call, {**call.params, "direction": "buy"})


@METHODS.method("private/sell", order_message=True)
async def sell(call: Call) -> dict:
    return _insert(call, {**call.params, "direction": "sell"})


def _insert(call: Call, params: dict) -> dict:
    result, events = call.exchange.engine.insert(call.session, params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/amend", order_message=True)
async def amend(call: Call) -> dict:
    result, events = call.exchange.engine.amend(call.session, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/cancel", order_message=True)
async def cancel(call: Call) -> dict:
    result, events = call.exchange.engine.cancel(call.session, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/cancel_all", order_message=True)
async def cancel_all(call: Call) -> int:
    count, events = call.exchange.engine.cancel_all(call.session, call.now)
    call.publish(events)
    return count


@METHODS.method("private/cancel_session", order_message=True)
async def cancel_session(call: Call) -> None:
    """As closing the connection (api.yaml): non-persistent orders, mass quotes and RFQ quotes of the
    session go with ``session_end`` and its protection groups are deleted; only on a cancel-on-disconnect
    session (37 otherwise)."""
    events = call.exchange.engine.cancel_session(call.session, call.now)
    automation = call.exchange.automation
    events += automation.quotes.end_session(call.session)
    events += automation.rfqs.end_session(call.session)
    call.publish(events)
