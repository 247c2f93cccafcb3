"""The ``paper/*`` control API registry: methods that steer the paper exchange from outside.

Each family registers its handlers with ``@CONTROLS.method("paper/...")`` in its own module of
:mod:`services.paper.control`. A handler takes the exchange, the params and the requesting
connection (None for scenario steps) and returns a JSON result or raises ``RpcError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from services.paper.errors import INVALID_REQUEST, UNKNOWN_INSTRUMENT, RpcError

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange

ControlHandler = Callable[["PaperExchange", dict, "Connection | None"], Awaitable[Any]]


class ControlRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, ControlHandler] = {}

    def method(self, name: str) -> Callable[[ControlHandler], ControlHandler]:
        def register(handler: ControlHandler) -> ControlHandler:
            if name in self._handlers:
                raise ValueError(f"control method {name} registered twice")
            self._handlers[name] = handler
            return handler

        return register

    def get(self, name: str) -> ControlHandler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)


CONTROLS = ControlRegistry()


def underlying_of(exchange: PaperExchange, params: dict) -> str:
    underlying = params.get("underlying")
    if underlying not in exchange.market.index:
        raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {underlying}")
    return str(underlying)


def account_of(exchange: PaperExchange, key_id: Any) -> str | None:
    """The account a key id trades for (control methods name keys, the engine accounts)."""
    if key_id is None:
        return None
    if key_id not in exchange.keys:
        raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
    return exchange.keys[key_id].account


def non_negative_seconds(params: dict) -> float:
    seconds = params.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise RpcError(INVALID_REQUEST, "seconds must be a non-negative number")
    return float(seconds)
