"""Request handling: parse a JSON-RPC message, look its method up and answer it.

Faults injected through the control API (``paper/fail_next``, ``paper/set_latency``) act here, and
every order message is recorded for ``paper/order_log``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.paper.errors import INVALID_REQUEST, NOT_LOGGED_IN, TEMPORARY_FAILURE, UNKNOWN_METHOD, RpcError
from services.paper.rpc import METHODS, Call

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange

log = logging.getLogger(__name__)

ORDER_LOG_SIZE = 100_000


@dataclass
class FailureRule:
    """``paper/fail_next``: the next ``remaining`` matching requests fail with ``code``."""

    remaining: int
    code: int
    message: str
    methods: frozenset[str] | None
    key_id: str | None

    def matches(self, method: str, key_id: str | None) -> bool:
        return (self.methods is None or method in self.methods) and (
            self.key_id is None or self.key_id == key_id
        )


class Dispatcher:
    """Answers every request of every connection, in the order it arrives on that connection."""

    def __init__(self, exchange: PaperExchange) -> None:
        self.exchange = exchange
        self.failures: list[FailureRule] = []
        self.latency: dict[str | None, float] = {}
        self.order_log: deque[dict] = deque(maxlen=ORDER_LOG_SIZE)
        self._next_log = 0

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        received = self.exchange.wall_clock()
        try:
            request = json.loads(message)
        except ValueError:
            conn.reply(None, error=RpcError(INVALID_REQUEST, "malformed JSON").to_wire())
            return
        if not isinstance(request, dict):
            conn.reply(None, error=RpcError(INVALID_REQUEST, "request must be a JSON object").to_wire())
            return
        rid = request.get("id")
        method = request.get("method")
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(method, str) or not isinstance(params, dict):
            error = RpcError(INVALID_REQUEST, "method must be a string and params an object")
            conn.reply(rid, error=error.to_wire())
            return
        if method.startswith("paper/"):
            await self._on_control(conn, rid, method, params)
            return
        delay = self.latency.get(method, self.latency.get(None, 0.0))
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            result = await self._dispatch(conn, method, params)
        except RpcError as exc:
            self._log_order(method, conn.key_id, received, params, {"error": exc.to_wire()})
            conn.reply(rid, error=exc.to_wire())
            conn.after.clear()
            return
        except Exception:  # a bug of the paper: say so, keep the connection
            log.exception("%s failed", method)
            conn.reply(
                rid, error=RpcError(TEMPORARY_FAILURE, f"temporary failure: {method} failed").to_wire()
            )
            conn.after.clear()
            return
        self._log_order(method, conn.key_id, received, params, {"result": result})
        conn.reply(rid, result=result)
        followups, conn.after = conn.after, []
        for followup in followups:
            followup()

    async def _dispatch(self, conn: Connection, method: str, params: dict) -> Any:
        for rule in self.failures:
            if rule.remaining > 0 and rule.matches(method, conn.key_id):
                rule.remaining -= 1
                raise RpcError(rule.code, rule.message)
        if method.startswith("private/") and conn.session is None:
            raise RpcError(NOT_LOGGED_IN, "not logged in")
        registered = METHODS.get(method)
        if registered is None:
            raise RpcError(UNKNOWN_METHOD, f"unknown method {method}")
        return await registered.handler(Call(self.exchange, conn, method, params, self.exchange.clock()))

    async def _on_control(self, conn: Connection, rid: Any, method: str, params: dict) -> None:
        try:
            result = await self.exchange.control(method, params, conn)
        except RpcError as exc:
            conn.reply(rid, error=exc.to_wire())
            return
        conn.reply(rid, result=result)

    def _log_order(
        self, method: str, key_id: str | None, received: float, params: dict, outcome: dict
    ) -> None:
        registered = METHODS.get(method)
        if registered is None or not registered.order_message:
            return
        self._next_log += 1
        self.order_log.append(
            {
                "seq": self._next_log,
                "key_id": key_id,
                "time": received,
                "method": method,
                "params": params,
                "outcome": outcome,
                "done_time": self.exchange.wall_clock(),
            }
        )
