"""Requests and their answers on one Thalex websocket (a `Connection` is one of these).

The official `thalex` client only sends: every answer arrives on the same `receive()` stream as
the notifications, matched to its request by `id`. `Requests` gives each request a fresh id and
a future, resolves the future whose id comes back, and fails every waiter when the connection
ends. One `Requests` belongs to one connection: a new connection starts a new one, so an answer
can never resolve a request of another connection.

Written by hand because the official client has no request/answer correlation of its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

NO_CODE = -1
"""The `code` of an error answer that carried none."""


class ThalexError(Exception):
    """An answer `error: {code, message}`: the exchange refused the request."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method} failed: {message} (error {code})")
        self.method, self.code, self.message = method, code, message


class ConnectionLost(ConnectionError):
    """The connection ended (or stayed silent) while a request waited: it may have been executed."""


class Requests:
    """The requests in flight on one connection."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[str, asyncio.Future[Any]]] = {}

    async def call(self, method: str, send: Callable[[int], Awaitable[None]]) -> Any:
        """Send with a fresh id (`send(id)` calls an official client method) and return `result`.

        Raises `ThalexError` on an error answer, `ConnectionLost` if the connection ends, the
        send fails, or no answer comes within `timeout` seconds.
        """
        if self.closed:
            raise ConnectionLost(f"{method}: connection already closed")
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (method, future)
        try:
            try:
                await send(rid)
            except Exception as exc:  # websockets raises ConnectionClosed on a dead socket
                raise ConnectionLost(f"{method}: {exc}") from exc
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise ConnectionLost(f"{method}: no answer within {self.timeout:g} s") from None
        finally:
            self._waiting.pop(rid, None)

    def answer(self, message: dict[str, Any]) -> bool:
        """Resolve the request this answer belongs to; False if nobody waits for it."""
        entry = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
        if entry is None:
            return False
        method, future = entry
        if not future.done():
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                code = error.get("code")
                future.set_exception(ThalexError(method, code if isinstance(code, int) else NO_CODE,
                                                 str(error.get("message", message["error"]))))
            else:
                future.set_result(message.get("result"))
        return True

    def close(self, reason: str) -> None:
        """The connection is gone: fail every waiter, refuse new requests."""
        self.closed = True
        for method, future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"{method}: {reason}"))
