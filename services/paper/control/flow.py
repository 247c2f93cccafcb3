"""Simulated order flow: fill resting orders as maker, or trade an account directly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.paper.accounts import Event
from services.paper.control.registry import CONTROLS, account_of
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import positive

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


@CONTROLS.method("paper/fill_orders")
async def fill_orders(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    amount = positive(params, "amount") if params.get("amount") is not None else None
    name = (
        exchange.instrument_named(params.get("instrument_name")).name
        if params.get("instrument_name") is not None
        else None
    )
    direction = params.get("direction")
    if direction not in (None, "buy", "sell"):
        raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
    events = exchange.engine.fill_resting(
        exchange.clock(),
        account_of(exchange, params.get("key_id")),
        name,
        params.get("order_id"),
        amount,
        direction,
    )
    exchange.fanout.publish(events)
    return {"trades": [e.payload for e in events if e.kind == "trade"]}


@CONTROLS.method("paper/trade")
async def trade(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    key_id = params.get("key_id")
    if key_id not in exchange.keys:
        raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
    price = positive(params, "price") if params.get("price") is not None else None
    trades, events = exchange.engine.direct_trade(
        exchange.keys[key_id].account,
        exchange.instrument_named(params.get("instrument_name")).name,
        params.get("direction", ""),
        positive(params, "amount"),
        price,
        exchange.clock(),
    )
    exchange.fanout.publish(events)
    return {"trades": trades}


@CONTROLS.method("paper/trades")
async def trades(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Many ``paper/trade`` in one call, for books of hundreds of positions: every trade's own
    notifications as ``paper/trade`` sends them, the portfolio lines and the summary once, at the end
    (one per trade made re-opening 1,000 positions take minutes). Checked whole before booking any."""
    key_id = params.get("key_id")
    if key_id not in exchange.keys:
        raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
    account_id = exchange.keys[key_id].account
    items = params.get("trades")
    if not isinstance(items, list) or not items:
        raise RpcError(INVALID_REQUEST, "trades must be a non-empty list")
    orders = [_checked_trade(exchange, number, item) for number, item in enumerate(items)]
    booked: list[dict] = []
    lines: dict[str, Event] = {}
    """Instrument -> its portfolio line after the last trade on it (the final state)."""
    now = exchange.clock()
    for name, direction, amount, price in orders:
        made, events = exchange.engine.direct_trade(account_id, name, direction, amount, price, now)
        booked += made
        lines.update((e.payload["instrument_name"], e) for e in events if e.kind == "portfolio")
        exchange.fanout.publish([e for e in events if e.kind != "portfolio"], summaries=False)
    exchange.fanout.publish([*lines.values(), Event("summary", account_id, None, {})])
    return {"trades": booked}


def _checked_trade(exchange: PaperExchange, number: int, item: Any) -> tuple[str, str, float, float | None]:
    """One item of ``paper/trades`` as (instrument, direction, amount, price); errors name its index."""
    try:
        if not isinstance(item, dict):
            raise RpcError(INVALID_REQUEST, "must be {instrument_name, direction, amount, price?}")
        inst = exchange.instrument_named(item.get("instrument_name"))
        direction = item.get("direction")
        if direction not in ("buy", "sell"):
            raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
        amount = exchange.engine.checked_amount(inst, positive(item, "amount"))
        price = positive(item, "price") if item.get("price") is not None else None
    except RpcError as error:
        raise RpcError(error.code, f"trades[{number}]: {error.message}") from None
    return inst.name, direction, amount, price
