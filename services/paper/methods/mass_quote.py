"""Market making: ``private/mass_quote``, ``private/cancel_mass_quote``, ``private/set_mm_protection``."""

from __future__ import annotations

from services.paper.rpc import METHODS, Call


@METHODS.method("private/set_mm_protection", order_message=True)
async def set_mm_protection(call: Call) -> None:
    call.publish(call.exchange.automation.quotes.set_protection(call.trading_session, call.params))


@METHODS.method("private/mass_quote", order_message=True)
async def mass_quote(call: Call) -> dict:
    result, events = call.exchange.automation.quotes.mass_quote(call.trading_session, call.params, call.now)
    call.publish(events)
    return result


@METHODS.method("private/cancel_mass_quote", order_message=True)
async def cancel_mass_quote(call: Call) -> None:
    call.publish(call.exchange.automation.quotes.cancel(call.trading_session.account, call.params, call.now))
