"""The paper's clock: jump it forward or run it faster, to cross a settlement or an expiry in seconds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.control.registry import CONTROLS
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import number

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


@CONTROLS.method("paper/advance_clock")
async def advance_clock(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Move the paper's time forward by ``seconds``, or ``to`` a time (Unix seconds); every 08:00 UTC
    crossed settles (expiries first) in order. The status, with ``settlements`` crossed."""
    seconds = number(params, "seconds")
    to = number(params, "to")
    if (seconds is None) == (to is None):
        raise RpcError(INVALID_REQUEST, "give seconds or to")
    step = seconds if seconds is not None else (to or 0.0) - exchange.clock()
    if step < 0:
        raise RpcError(INVALID_REQUEST, "the paper's clock never goes back")
    turned = await exchange.advance_clock(step)
    return {**exchange.status(), "settlements": turned}


@CONTROLS.method("paper/set_clock_speed")
async def set_clock_speed(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """The paper's time runs ``speed`` times as fast as real time from now on (1 = real time)."""
    speed = number(params, "speed", required=True)
    if speed is None or speed < 0:
        raise RpcError(INVALID_REQUEST, "speed must be a number >= 0")
    exchange.clock.set_speed(speed)
    return exchange.status()
