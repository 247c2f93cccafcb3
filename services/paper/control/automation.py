"""Creating market makers' things on an account from outside: mass quotes on a second session, bots,
conditional orders, and RFQs of simulated takers (for tests and the demo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.paper.bots import STOP_REASONS
from services.paper.control.registry import CONTROLS
from services.paper.errors import INVALID_REQUEST, ORDER_NOT_FOUND, RpcError
from services.paper.params import number, positive

if TYPE_CHECKING:
    from services.paper.accounts import Account
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange

DEFAULT_PROTECTION = 1000.0
"""``paper/mass_quote``'s trade and quote amount when none is given (contracts)."""


def _key_account(exchange: PaperExchange, params: dict) -> tuple[str, Account]:
    """The key named by ``key_id`` and its account (opened if the key never logged in)."""
    key_id = params.get("key_id")
    if key_id not in exchange.keys:
        raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
    return str(key_id), exchange.engine.account(exchange.keys[key_id].account)


def _request(params: dict) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("key_id", "trade_amount", "quote_amount")}


@CONTROLS.method("paper/mass_quote")
async def mass_quote(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Mass quote from the key's own persistent session (a second session of the account): protection
    of every quoted product is (re)set to ``trade_amount``/``quote_amount`` first."""
    key_id, account = _key_account(exchange, params)
    automation = exchange.automation
    session = automation.control_session(key_id, account.account_id)
    trade_amount = positive(params, "trade_amount", DEFAULT_PROTECTION)
    quote_amount = positive(params, "quote_amount", max(trade_amount, DEFAULT_PROTECTION))
    events = []
    quotes = params.get("quotes")
    names = [q.get("i") for q in quotes if isinstance(q, dict)] if isinstance(quotes, list) else []
    for product in {
        exchange.market.instruments[n].product for n in names if n in exchange.market.instruments
    }:
        protection = {"product": product, "trade_amount": trade_amount, "quote_amount": quote_amount}
        events += automation.quotes.set_protection(session, protection)
    result, placed = automation.quotes.mass_quote(session, _request(params), exchange.clock())
    exchange.fanout.publish(events + placed)
    return result


@CONTROLS.method("paper/create_bot")
async def create_bot(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    _, account = _key_account(exchange, params)
    bot, events = exchange.automation.bots.create(account, _request(params), exchange.clock())
    exchange.fanout.publish(events)
    return bot


@CONTROLS.method("paper/stop_bots")
async def stop_bots(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Stop the account's bots (or ``bot_id``) for any of Thalex's stop reasons (``admin_cancel``)."""
    _, account = _key_account(exchange, params)
    reason = params.get("reason", "admin_cancel")
    if reason not in STOP_REASONS:
        raise RpcError(INVALID_REQUEST, f"reason must be one of {', '.join(STOP_REASONS)}")
    bots = exchange.automation.bots
    chosen = [
        bot
        for bot in bots.bots.get(account.account_id, {}).values()
        if bot.status == "active" and params.get("bot_id") in (None, bot.bot_id)
    ]
    events = [event for bot in chosen for event in bots.stop(bot, reason, exchange.clock())]
    exchange.fanout.publish(events)
    return {"stopped": len(chosen)}


@CONTROLS.method("paper/create_conditional_order")
async def create_conditional_order(
    exchange: PaperExchange, params: dict, requester: Connection | None
) -> dict:
    _, account = _key_account(exchange, params)
    order, events = exchange.automation.conditional.create(account, _request(params), exchange.clock())
    exchange.fanout.publish(events)
    return order


@CONTROLS.method("paper/create_rfq")
async def create_rfq(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """A simulated taker's RFQ (``legs``, ``label``?, ``valid_seconds``?) for every account's ``mm.rfqs``."""
    lifetime = positive(params, "valid_seconds", 300.0)
    rfq, events = exchange.automation.rfqs.create(None, params, exchange.clock(), lifetime)
    exchange.fanout.publish(events)
    return rfq


@CONTROLS.method("paper/rfq_trade")
async def rfq_trade(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """The simulated taker of ``rfq_id`` trades now: ``direction`` (default: the side quoted best against
    the package's mark value), ``limit_price``? (default: any)."""
    rfqs = exchange.automation.rfqs
    rfq = rfqs.rfqs.get(str(params.get("rfq_id")))
    if rfq is None or rfq.requester is not None or not rfq.open:
        raise RpcError(ORDER_NOT_FOUND, "no open RFQ of a simulated taker with that rfq_id")
    direction = params.get("direction")
    if direction is None:
        value = sum(leg.quantity * exchange.market.mark(leg.instrument.name).price for leg in rfq.legs)
        edges = {
            ("buy" if q.direction == "sell" else "sell"): (
                value - q.price if q.direction == "sell" else q.price - value
            )
            for q in rfqs.quotes_of(rfq)
            if not q.closed
        }
        direction = max(edges, key=lambda side: edges[side]) if edges else "buy"
    if direction not in ("buy", "sell"):
        raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
    result, events = rfqs.execute(rfq, direction, number(params, "limit_price"), exchange.clock())
    exchange.fanout.publish(events)
    return result
