"""One websocket to Thalex over the official `thalex` client: open, log in, request, read, close.

The official client only sends; everything the exchange says arrives on one `receive()` stream.
`Connection.read` owns that stream for the connection's life and sorts each frame:

* an answer `{"id", "result" | "error"}` resolves its request (`requests.Requests`);
* a notification `{"channel_name", "notification"}` goes to the service's handler,
  synchronously and in arrival order (the handler must not block);
* anything else (not JSON, not an object, neither of the two) goes to the garbage handler
  with the reason, and reading goes on: one bad frame never drops the connection.

`Session` (session.py) opens a new `Connection` for every attempt; one connection's answers can
never resolve another one's requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NoReturn

import jwt
import thalex
from websockets.exceptions import ConnectionClosed

from services.common.thalex.key import FATAL_LOGIN_CODES, LoginRejected, ThalexKey
from services.common.thalex.requests import NO_CODE, Requests, ThalexError

log = logging.getLogger(__name__)

SYSTEM = "system"
"""The channel of the exchange's own events (the reconnect notice)."""
YIELD_EVERY = 8
"""Under a burst `recv()` returns buffered messages without ever suspending; the reader
steps aside every this many messages so the rest of the service is not starved."""
CLOSE_TIMEOUT_SECONDS = 1.0

Notification = Callable[[str, Any, str, float], None]
"""`(channel, notification, raw_text, received_ts)`; called in arrival order, must not block."""
Garbage = Callable[[str, str, float], None]
"""`(raw_text, reason, received_ts)` for a frame that is neither an answer nor a notification."""


class Connection:
    """One connection: the official client and the requests in flight on it."""

    def __init__(self, url: str, request_timeout: float) -> None:
        self.url = url
        self.client = thalex.Thalex(SimpleNamespace(value=url))
        self.requests = Requests(request_timeout)
        self.last_message = time.monotonic()
        """When the last frame of any kind arrived (the half-open watchdog reads it)."""

    @property
    def closed(self) -> bool:
        """The connection ended: every request on it fails with `ConnectionLost`."""
        return self.requests.closed

    async def open(self) -> None:
        """Open the websocket (bound it with `asyncio.timeout`)."""
        await self.client.connect()
        self.last_message = time.monotonic()

    async def request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `thalex.Thalex.<method>(*args, **kwargs, id=...)` and return the answer's `result`.

        Raises `ThalexError` on an error answer and `ConnectionLost` when the connection ends
        (or stays silent past the timeout) before the answer.
        """
        send = getattr(self.client, method)
        return await self.requests.call(method, lambda rid: send(*args, id=rid, **kwargs))

    async def login(self, key: ThalexKey, account: str | None) -> None:
        """`public/login`; a refusal retrying cannot fix raises `LoginRejected`."""
        try:
            await self.request("login", key.key_id, key.private_key, account=account)
        except ThalexError as exc:
            if exc.code in FATAL_LOGIN_CODES:
                raise LoginRejected(key, self.url, exc.code, exc.message) from None
            raise
        except (jwt.PyJWTError, ValueError) as exc:  # the key cannot sign (ThalexKey.load checks it first)
            raise LoginRejected(key, self.url, None, f"cannot sign the login token: {exc}") from None

    async def read(self, on_notification: Notification, on_garbage: Garbage,
                   on_system: Callable[[Any], None]) -> NoReturn:
        """Read until the socket ends (raises why); see the module docstring for what goes where."""
        loads, answer = json.loads, self.requests.answer
        count = 0
        while True:
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            raw = await self.client.receive()
            received = time.time()
            self.last_message = time.monotonic()
            text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            try:
                message = loads(text)
            except ValueError as exc:
                on_garbage(text, f"not valid JSON: {exc}", received)
                continue
            if not isinstance(message, dict):
                on_garbage(text, f"expected a JSON object, got {type(message).__name__}", received)
                continue
            channel = message.get("channel_name")
            if channel is not None:
                if not isinstance(channel, str) or "notification" not in message:
                    on_garbage(text, "a notification needs a string channel_name and a notification",
                               received)
                    continue
                if channel == SYSTEM:
                    on_system(message["notification"])
                try:
                    on_notification(channel, message["notification"], text, received)
                except Exception as exc:  # a handler bug must not blind the service
                    log.exception("handling %s failed", channel)
                    on_garbage(text, f"handler failed: {type(exc).__name__}: {exc}", received)
            elif "id" in message and ("result" in message or "error" in message):
                if not answer(message) and "error" in message:
                    log.warning("error for a request nobody waits for: %s", text[:500])
            else:
                on_garbage(text, "neither an answer (id + result/error) nor a notification", received)

    async def close(self, reason: str = "connection closed") -> None:
        """Fail every waiter, then close the websocket (cut it hard if it does not close in time)."""
        self.requests.close(reason)
        ws = self.client.ws
        if ws is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self.client.disconnect()
        except (OSError, TimeoutError, ConnectionClosed, RuntimeError):  # broken: close it hard
            ws.transport.abort()


__all__ = ["NO_CODE", "SYSTEM", "Connection", "Garbage", "Notification"]
