"""Fault injection: dropped connections, failing or slow requests, lagging history, reconnect notices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.control.registry import CONTROLS, non_negative_seconds
from services.paper.dispatch import FailureRule
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import positive

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


@CONTROLS.method("paper/drop_connections")
async def drop_connections(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    key_id = params.get("key_id")
    victims = [
        c
        for c in exchange.connections
        if c is not requester and (key_id is None or (c.key is not None and c.key.kid == key_id))
    ]
    for conn in victims:
        if params.get("abrupt"):
            conn.ws.transport.abort()
        else:
            await conn.ws.close(1012, "paper exchange dropped the connection")
    return {"dropped": len(victims)}


@CONTROLS.method("paper/fail_next")
async def fail_next(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    code = params.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        raise RpcError(INVALID_REQUEST, "code must be an integer")
    methods = params.get("methods")
    if methods is not None and not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        raise RpcError(INVALID_REQUEST, "methods must be a list of method names")
    count = int(positive(params, "count", 1))
    dispatcher = exchange.dispatcher
    dispatcher.failures = [rule for rule in dispatcher.failures if rule.remaining > 0]
    dispatcher.failures.append(
        FailureRule(
            count,
            code,
            str(params.get("message", "injected failure")),
            frozenset(methods) if methods else None,
            params.get("key_id"),
        )
    )
    return {"pending": sum(rule.remaining for rule in dispatcher.failures)}


@CONTROLS.method("paper/set_latency")
async def set_latency(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    seconds = non_negative_seconds(params)
    methods = params.get("methods")
    dispatcher = exchange.dispatcher
    if methods is None:
        dispatcher.latency = {None: seconds} if seconds else {}
    else:
        for method in methods:
            dispatcher.latency[method] = seconds
    return {"latency": {k or "*": v for k, v in dispatcher.latency.items()}}


@CONTROLS.method("paper/set_history_delay")
async def set_history_delay(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    exchange.engine.history_delay = non_negative_seconds(params)
    return {"history_delay": exchange.engine.history_delay}


@CONTROLS.method("paper/history_without_fee")
async def history_without_fee(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """`private/trade_history` lists trades without `fee` (api.yaml's example of it has none), so a
    client's handling of a trade whose fee it cannot learn from the history is tested."""
    on = params.get("on", True)
    if not isinstance(on, bool):
        raise RpcError(INVALID_REQUEST, "on must be true or false")
    exchange.engine.history_without_fee = on
    return {"history_without_fee": on}


@CONTROLS.method("paper/leave_out")
async def leave_out(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Subscribe answers leave these channels out (and do not subscribe them), valid or not.

    api.yaml lets Thalex do so without an error ("check the return value"): this is how a client's
    check is tested. ``count`` answers per channel, or until ``channels: []`` clears them all.
    """
    channels = params.get("channels")
    if not (isinstance(channels, list) and all(isinstance(c, str) for c in channels)):
        raise RpcError(INVALID_REQUEST, "channels must be a list of channel names")
    count = params.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise RpcError(INVALID_REQUEST, "count must be a positive integer")
    subscriptions = exchange.subscriptions
    if not channels:
        subscriptions.left_out.clear()
    for channel in channels:
        subscriptions.left_out[channel] = count
    return {"left_out": dict(subscriptions.left_out)}


@CONTROLS.method("paper/reconnect_notice")
async def reconnect_notice(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    exchange.broadcast_reconnect()
    return {"notified": len(exchange.connections)}
