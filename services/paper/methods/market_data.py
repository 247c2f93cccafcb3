"""Public market data: instruments, ticker, index and book."""

from __future__ import annotations

from services.paper import marketdata
from services.paper.errors import INVALID_REQUEST, UNKNOWN_INSTRUMENT, RpcError
from services.paper.rpc import METHODS, Call


@METHODS.method("public/instruments")
async def instruments(call: Call) -> list[dict]:
    return [inst.to_wire() for inst in call.exchange.market.instruments.values()]


@METHODS.method("public/instrument")
async def instrument(call: Call) -> dict:
    return call.instrument().to_wire()


@METHODS.method("public/ticker")
async def ticker(call: Call) -> dict:
    exchange = call.exchange
    return marketdata.ticker(exchange.market, exchange.stats, call.instrument().name, call.now)


@METHODS.method("public/index")
async def index(call: Call) -> dict:
    underlying = call.params.get("underlying")
    if not isinstance(underlying, str):
        raise RpcError(INVALID_REQUEST, "underlying must be a string")
    if underlying not in call.exchange.market.index:
        raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {underlying}")
    return marketdata.index(call.exchange.market, underlying, call.now)


@METHODS.method("public/book")
async def book(call: Call) -> dict:
    exchange = call.exchange
    return marketdata.book(exchange.market, exchange.stats, call.instrument().name, call.now)
