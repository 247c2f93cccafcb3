"""What the exchange saw: its status, the order messages and the market data it sent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.control.registry import CONTROLS
from services.paper.dispatch import ORDER_LOG_SIZE
from services.paper.fanout import TICKER_LOG_SIZE

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


@CONTROLS.method("paper/status")
async def status(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    return exchange.status()


@CONTROLS.method("paper/order_log")
async def order_log(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    since = params.get("since", 0.0)
    rows = [
        row
        for row in exchange.dispatcher.order_log
        if row["time"] >= since
        and (params.get("key_id") is None or row["key_id"] == params["key_id"])
        and (params.get("method") is None or row["method"] == params["method"])
    ]
    return {"orders": rows[-int(params.get("limit", ORDER_LOG_SIZE)) :]}


@CONTROLS.method("paper/ticker_log")
async def ticker_log(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    since = params.get("since", 0.0)
    rows = [
        row
        for row in exchange.fanout.ticker_log
        if row["time"] >= since
        and (params.get("instrument_name") is None or row["instrument_name"] == params["instrument_name"])
    ]
    return {"tickers": rows[-int(params.get("limit", TICKER_LOG_SIZE)) :]}
