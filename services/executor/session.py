"""A Thalex session over the official `thalex` client: connect, login, cancel-on-disconnect,
request/response correlation, order-message pacing and reconnect.

The official client only sends; every answer and notification arrives on one `receive()`
stream. `ThalexSession` owns that stream: answers resolve their request
(`services/common/thalex_requests.py`, shared with ingest), notifications go to per-channel
callbacks. Ingest keeps its own supervisor (`services/ingest/exchange.py`: watchdog, backoff,
bootstrap on every login); the executor connects lazily, on the next request after a drop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import thalex

from services.common.thalex.requests import Requests

log = logging.getLogger(__name__)

Notification = Callable[[str, Any], None]
"""Called with (channel_name, notification) for each subscription message."""

ORDER_WINDOW_SECONDS = 1.0
WINDOW_MARGIN_SECONDS = 0.02
"""Our window is a little longer than the exchange's, so network jitter cannot push us over."""


class OrderPacer:
    """At most `rate` order messages in any rolling second, first come first served.

    Thalex counts insert/amend/cancel messages per connection (10/s, 50/s with
    cancel-on-disconnect) and answers error 4 past the limit; pacing ourselves keeps every
    message useful instead of earning a penalty.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = max(1, int(rate))
        self.clock = clock
        self.sent: deque[float] = deque()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            window = ORDER_WINDOW_SECONDS + WINDOW_MARGIN_SECONDS
            while True:
                now = self.clock()
                while self.sent and self.sent[0] <= now - window:
                    self.sent.popleft()
                if len(self.sent) < self.limit:
                    self.sent.append(now)
                    return
                await asyncio.sleep(self.sent[0] + window - now)


class ThalexSession:
    """One logged-in (or public) websocket session with automatic reconnect.

    `connect()` logs in when a key is given, sets cancel-on-disconnect (so resting orders die
    with the session and the 50/s rate applies) and subscribes the private channels; after a
    drop, the next request reconnects and does all of it again.
    """

    def __init__(self, url: str, *, key_id: str | None = None, private_key: str | None = None,
                 account: str | None = None, cancel_on_disconnect: bool = True, order_rate: float = 10.0,
                 private_channels: tuple[str, ...] = (), request_timeout: float = 5.0,
                 heartbeat_seconds: int = 15) -> None:
        self.url = url
        self._key_id = key_id
        self._private_key = private_key
        self._account = account
        self.cancel_on_disconnect = cancel_on_disconnect and private_key is not None
        self.pacer = OrderPacer(order_rate)
        self.private_channels = private_channels
        self.request_timeout = request_timeout
        self.heartbeat_seconds = heartbeat_seconds
        self.client: thalex.Thalex | None = None
        self.listeners: dict[str, list[Notification]] = {}
        self._requests = Requests(request_timeout)
        self._requests.close("not connected yet")
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self.generation = 0
        """Increments on every (re)connect, so callers can tell their answers may be lost."""

    def __repr__(self) -> str:  # never show key material
        return f"ThalexSession({self.url!r}, key_id={self._key_id!r})"

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected() and self._reader is not None \
            and not self._reader.done()

    @property
    def logged_in(self) -> bool:
        return self._private_key is not None

    def on(self, channel: str, callback: Notification) -> None:
        """Call `callback` for every notification of `channel` (exact name)."""
        self.listeners.setdefault(channel, []).append(callback)

    async def connect(self) -> None:
        """Connect (again), log in, set cancel-on-disconnect, subscribe; idempotent while connected."""
        async with self._connect_lock:
            if self.connected:
                return
            await self._close_client()
            client = thalex.Thalex(types.SimpleNamespace(value=self.url))  # type: ignore[arg-type]
            await client.connect()
            self.client = client
            self._requests = Requests(self.request_timeout)
            self._reader = asyncio.create_task(self._read(client, self._requests), name="thalex-reader")
            self.generation += 1
            if self._private_key is not None:
                assert self._key_id is not None
                await self._call(client.login, self._key_id, self._private_key, account=self._account)
                if self.cancel_on_disconnect:
                    await self._call(client.set_cancel_on_disconnect, self.heartbeat_seconds)
                if self.private_channels:
                    await self._call(client.private_subscribe, list(self.private_channels))
            log.info("connected to %s (session %d)", self.url, self.generation)

    async def close(self) -> None:
        async with self._connect_lock:
            await self._close_client()

    async def _close_client(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self.client is not None and self.client.ws is not None:
            with suppress(Exception):
                await self.client.disconnect()
        self.client = None
        self._requests.close("session closed")

    async def request(self, method: str, *args: Any, order: bool = False, **kwargs: Any) -> Any:
        """Call `thalex.Thalex.<method>(*args, **kwargs, id=...)` and return its `result`.

        `order=True` paces the message as an order message. Raises `ThalexError` on an error
        answer and `ConnectionLost` when the connection dropped before the answer.
        """
        if not self.connected:
            await self.connect()
        client = self.client
        assert client is not None
        if order:
            await self.pacer.acquire()
        return await self._call(getattr(client, method), *args, **kwargs)

    async def _call(self, send: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any) -> Any:
        return await self._requests.call(send.__name__, lambda rid: send(*args, id=rid, **kwargs))

    async def _read(self, client: thalex.Thalex, requests: Requests) -> None:
        try:
            while True:
                self._dispatch(json.loads(await client.receive()), requests)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ends the socket fails the waiters
            log.warning("connection to %s lost: %s", self.url, exc)
            requests.close(str(exc))

    def _dispatch(self, message: dict[str, Any], requests: Requests) -> None:
        channel = message.get("channel_name")
        if channel is not None:
            if channel == "system":
                log.warning("exchange notice: %s", message.get("notification"))
            for callback in self.listeners.get(channel, ()):
                try:
                    callback(channel, message.get("notification"))
                except Exception:
                    log.exception("listener of %s failed", channel)
            return
        requests.answer(message)
