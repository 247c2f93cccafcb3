"""Simulated order flow: fill resting orders as maker, or trade an account directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
