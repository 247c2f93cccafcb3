"""``public/subscribe``, ``private/subscribe`` and ``unsubscribe`` (api.yaml: never a rejected batch)."""

from __future__ import annotations

from typing import Any

from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.rpc import METHODS, Call


def _channel_list(call: Call) -> list[Any]:
    channels = call.params.get("channels")
    if not isinstance(channels, list):
        raise RpcError(INVALID_REQUEST, "channels must be a list of channel names")
    return channels


@METHODS.method("public/subscribe")
async def public_subscribe(call: Call) -> list[str]:
    return call.exchange.subscriptions.subscribe(call.conn, _channel_list(call), private=False)


@METHODS.method("private/subscribe")
async def private_subscribe(call: Call) -> list[str]:
    return call.exchange.subscriptions.subscribe(call.conn, _channel_list(call), private=True)


@METHODS.method("unsubscribe")
async def unsubscribe(call: Call) -> list[str]:
    return call.exchange.subscriptions.unsubscribe(call.conn, _channel_list(call))
