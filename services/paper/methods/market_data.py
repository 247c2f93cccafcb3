"""Public market data: instruments, ticker, index, book, system info and price history."""

from __future__ import annotations

from typing import Any

from services.paper import marketdata
from services.paper.errors import INVALID_REQUEST, UNKNOWN_INSTRUMENT, RpcError
from services.paper.params import choice, number, string
from services.paper.pricehistory import RESOLUTIONS, ohlc
from services.paper.rpc import METHODS, Call

API_VERSION = "2.0.0"
ALL_INSTRUMENTS_WINDOW = 3 * 86_400.0
"""api.yaml: "the time interval cannot be larger than 3 days"."""
MAX_POINTS = 20_000


@METHODS.method("public/instruments")
async def instruments(call: Call) -> list[dict]:
    return [inst.to_wire() for inst in call.exchange.market.instruments.values()]


@METHODS.method("public/all_instruments")
async def all_instruments(call: Call) -> list[dict]:
    """Every instrument active at some time in [time_low, time_high] (expired ones with their settlement)."""
    market = call.exchange.market
    time_high = number(call.params, "time_high")
    time_high = call.now if time_high is None else time_high
    time_low = number(call.params, "time_low")
    time_low = time_high - ALL_INSTRUMENTS_WINDOW if time_low is None else time_low
    if time_low > time_high or time_high - time_low > ALL_INSTRUMENTS_WINDOW:
        raise RpcError(INVALID_REQUEST, "time_low .. time_high must be an interval of at most 3 days")
    out = []
    for inst in [*market.instruments.values(), *market.expired.values()]:
        if inst.create_time > time_high or (inst.name in market.expired and (inst.expiry_ts or 0) < time_low):
            continue
        out.append(inst.to_wire(market.settlements.get(inst.name)))
    return out


@METHODS.method("public/instrument")
async def instrument(call: Call) -> dict:
    """An active instrument, or an expired one with its settlement price."""
    market = call.exchange.market
    name = call.params.get("instrument_name")
    if isinstance(name, str) and name in market.expired:
        return market.expired[name].to_wire(market.settlements.get(name))
    return call.instrument().to_wire()


@METHODS.method("public/ticker")
async def ticker(call: Call) -> dict:
    exchange = call.exchange
    return marketdata.ticker(exchange.market, exchange.stats, call.instrument().name, call.now)


@METHODS.method("public/index")
async def index(call: Call) -> dict:
    return marketdata.index(call.exchange.market, _underlying(call, "underlying"), call.now)


@METHODS.method("public/book")
async def book(call: Call) -> dict:
    exchange = call.exchange
    return marketdata.book(exchange.market, exchange.stats, call.instrument().name, call.now)


@METHODS.method("public/system_info")
async def system_info(call: Call) -> dict:
    """The paper answers as a test environment would."""
    return {"environment": "testnet", "api_version": API_VERSION, "banners": list(call.exchange.banners)}


@METHODS.method("public/mark_price_historical_data")
async def mark_price_historical_data(call: Call) -> dict:
    """OHLC of the mark: perpetuals add the funding one long contract paid in the interval, options
    the OHLC of the implied volatility; one-minute points end with the top of the book at the
    start of the minute (``null`` at other resolutions)."""
    market = call.exchange.market
    name = string(call.params, "instrument_name", required=True) or ""
    inst = market.known(name)
    if inst is None:
        raise RpcError(UNKNOWN_INSTRUMENT, f"unknown instrument {name}")
    start, end, step = _interval(call)
    series = call.exchange.history.series.get(name)
    groups, any_data = series.points(start, end, step) if series else ([], False)
    points: list[list[Any]] = []
    for time, buckets in groups:
        point: list[Any] = [time, *ohlc(buckets)]
        if inst.kind == "perpetual":
            point.append(buckets[-1].funding_close - buckets[0].funding_open)
        elif inst.kind == "option":
            ivs = [b.iv for b in buckets if b.iv is not None]
            point += (
                [ivs[0][0], max(v[1] for v in ivs), min(v[2] for v in ivs), ivs[-1][3]] if ivs else [0.0] * 4
            )
        point.append(buckets[0].top if step == RESOLUTIONS["1m"] else None)
        points.append(point)
    result: dict[str, Any] = {"instrument_type": inst.kind, "mark": points}
    if not any_data:
        result["no_data"] = True
    return result


@METHODS.method("public/index_price_historical_data")
async def index_price_historical_data(call: Call) -> dict:
    underlying = _underlying(call, "index_name")
    start, end, step = _interval(call)
    series = call.exchange.history.series.get(f"index:{underlying}")
    groups, any_data = series.points(start, end, step) if series else ([], False)
    result: dict[str, Any] = {"index": [[time, *ohlc(buckets)] for time, buckets in groups]}
    if not any_data:
        result["no_data"] = True
    return result


def _underlying(call: Call, param: str) -> str:
    underlying = call.params.get(param)
    if not isinstance(underlying, str):
        raise RpcError(INVALID_REQUEST, f"{param} must be a string")
    if underlying not in call.exchange.market.index:
        raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {underlying}")
    return underlying


def _interval(call: Call) -> tuple[float, float, int]:
    start = number(call.params, "from", required=True) or 0.0
    end = number(call.params, "to", required=True) or 0.0
    resolution = choice(call.params, "resolution", tuple(RESOLUTIONS), None)
    if resolution is None:
        raise RpcError(INVALID_REQUEST, "missing parameter resolution")
    step = RESOLUTIONS[resolution]
    if end < start:
        raise RpcError(INVALID_REQUEST, "to must not be before from")
    if (end - start) / step > MAX_POINTS:
        raise RpcError(INVALID_REQUEST, f"at most {MAX_POINTS} data points per request")
    return start, end, step
