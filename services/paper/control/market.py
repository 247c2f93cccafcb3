"""Control of prices: index, marks, funding, the random walk and the synthetic book."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from services.paper.control.registry import CONTROLS, underlying_of
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.market import BookShape
from services.paper.params import positive

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange

BURST_STEP = 0.001  # market seconds per ``paper/burst_ticks`` update


@CONTROLS.method("paper/set_index")
async def set_index(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    exchange.market.set_index(underlying_of(exchange, params), positive(params, "price"))
    return exchange.repriced()


@CONTROLS.method("paper/move_index")
async def move_index(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    underlying = underlying_of(exchange, params)
    price = exchange.market.index[underlying]
    pct, delta = params.get("pct"), params.get("delta")
    if isinstance(pct, (int, float)) and not isinstance(pct, bool):
        price *= 1.0 + pct / 100.0
    elif isinstance(delta, (int, float)) and not isinstance(delta, bool):
        price += delta
    else:
        raise RpcError(INVALID_REQUEST, "give pct (percent) or delta (USD)")
    if price <= 0:
        raise RpcError(INVALID_REQUEST, "the index must stay positive")
    exchange.market.set_index(underlying, price)
    return exchange.repriced()


@CONTROLS.method("paper/set_mark")
async def set_mark(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    inst = exchange.instrument_named(params.get("instrument_name"))
    if params.get("price") is None:
        exchange.market.pinned_marks.pop(inst.name, None)
    else:
        exchange.market.pinned_marks[inst.name] = positive(params, "price")
    exchange.market.touch(inst.name)
    return exchange.repriced()


@CONTROLS.method("paper/set_funding")
async def set_funding(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    name = exchange.instrument_named(params.get("instrument_name")).name
    market = exchange.market
    if name not in market.funding_marks:
        raise RpcError(INVALID_REQUEST, f"{name} is not a perpetual")
    for field_name, store in (("funding_mark", market.funding_marks), ("funding_rate", market.funding_rates)):
        value = params.get(field_name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RpcError(INVALID_REQUEST, f"{field_name} must be a number")
            store[name] = float(value)
    return exchange.changed()


@CONTROLS.method("paper/pause")
async def pause(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    exchange.market.paused = True
    return exchange.status()


@CONTROLS.method("paper/resume")
async def resume(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    exchange.market.paused = False
    return exchange.status()


@CONTROLS.method("paper/step")
async def step(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Advance the random walk ``count`` times by ``dt`` seconds of market time each (even when paused)."""
    count = int(positive(params, "count", 1))
    dt = positive(params, "dt", exchange.tick_interval)
    for _ in range(count):
        exchange.market.step(exchange.clock(), dt, force=True)
    exchange.fanout.after_market_change(exchange.clock())
    return exchange.status()


@CONTROLS.method("paper/set_book")
async def set_book(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    name = exchange.instrument_named(params.get("instrument_name")).name
    if params.get("reset"):
        exchange.market.books.pop(name, None)
        return exchange.changed()
    shape = exchange.market.books.get(name) or BookShape()
    try:
        for field_name, kind in (
            ("levels", int),
            ("spread_ticks", int),
            ("step_ticks", int),
            ("level_amount", float),
            ("growth", float),
            ("bids", bool),
            ("asks", bool),
        ):
            if params.get(field_name) is not None:
                setattr(shape, field_name, kind(params[field_name]))
    except (TypeError, ValueError):
        raise RpcError(INVALID_REQUEST, "invalid book shape") from None
    if shape.levels < 0 or shape.spread_ticks < 1 or shape.step_ticks < 1:
        raise RpcError(INVALID_REQUEST, "levels >= 0, spread_ticks >= 1 and step_ticks >= 1")
    exchange.market.books[name] = shape
    return exchange.changed()


@CONTROLS.method("paper/burst_ticks")
async def burst_ticks(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Emit ``count`` ticker changes of one instrument as fast as possible (benchmarks)."""
    name = exchange.instrument_named(params.get("instrument_name")).name
    count = int(positive(params, "count"))
    started = time.perf_counter()
    for i in range(count):
        exchange.market.step(exchange.clock(), BURST_STEP, force=True)
        now = exchange.clock()
        for channel in exchange.subscriptions.of_family("ticker"):
            if channel.target == name and channel.delay == 0:
                exchange.fanout.send_channel(channel, now)
        if i % 200 == 199:
            await asyncio.sleep(0)
    return {"sent": count, "seconds": time.perf_counter() - started}


RESEND_SLICE = 4
"""Instruments re-sent before the loop serves the other connections: a probe of the paper's loop under
the 1,000-position load saw a slice of 40 options' tickers and books hold another connection's
orders up for 6–8 ms (on Thalex, order entry does not wait for market data)."""


@CONTROLS.method("paper/resend_market_data")
async def resend_market_data(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Send the raw market data of the named instruments again, prices unchanged (benchmarks: a tick
    load spread over time, as Thalex's per-instrument feeds arrive, not one burst per index move).
    One that expired meanwhile is skipped (a load outlives the day's 08:00)."""
    names = params.get("instruments")
    if not isinstance(names, list) or not names:
        raise RpcError(INVALID_REQUEST, "instruments must be a non-empty list of instrument names")
    expired = exchange.market.expired  # an expired instrument's channels have gone quiet: skipped
    active = [exchange.instrument_named(n) for n in names if not (isinstance(n, str) and n in expired)]
    for first in range(0, len(active), RESEND_SLICE):
        for inst in active[first:first + RESEND_SLICE]:
            exchange.market.touch(inst.name)
        exchange.fanout.publish_channels(exchange.clock(), raw_only=True)
        await asyncio.sleep(0)
    return {"instruments": len(active)}
