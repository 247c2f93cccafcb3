"""The websocket session with Thalex: connect, log in, correlate answers, stay alive.

Built on the official `thalex` client (it sends every request; we only read).
One `ExchangeSession.run()` keeps the account's eye open for the life of the
process:

* a lost connection is re-opened with exponential backoff and jitter (so a
  restarted exchange is not hit by every client at the same instant);
* the exchange's `system` reconnect notice makes it re-connect at once, before
  the announced close;
* a half-open connection — TCP alive, nothing arriving — is detected by a
  watchdog (no message for `idle_timeout` seconds) and replaced;
* a refused login (bad key, unknown key id, no permission) is not retried:
  `LoginRejected` ends `run()` so the operator sees it instead of a retry loop.

Answers `{"id", "result" | "error"}` are matched to their request by id
(`services/common/thalex_requests.py`);
notifications `{"channel_name", "notification"}` go to the caller's handler
synchronously, in arrival order (the handler must not block).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import thalex
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from services.common.thalex_requests import NO_CODE, ConnectionLost, Requests, ThalexError

log = logging.getLogger(__name__)

FATAL_LOGIN_CODES = frozenset({19, 26, 28})
"""authentication failed, account locked, unauthorized: retrying cannot help."""
BACKOFF_BASE_SECONDS = 0.5
YIELD_EVERY = 8
"""Under a burst `recv()` returns buffered messages without ever suspending; the reader
steps aside every this many messages so the tick writer's round trips are not starved."""

Notification = Callable[[str, Any, str, float], None]
"""`(channel, notification, raw_text, received_ts)`; called in arrival order, must not block."""
Garbage = Callable[[str, str, float], None]
"""`(raw_text, reason, received_ts)` for a message that is neither an answer nor a notification."""


class LoginRejected(Exception):
    """The exchange refused the key: stop, do not retry."""

    def __init__(self, key_id: str, code: int | None, message: str) -> None:
        self.key_id, self.code, self.message = key_id, code, message
        self.reason = message + (f" (error {code})" if code not in (None, NO_CODE) else "")
        super().__init__(f"the exchange refused the login of key id {key_id!r}: {self.reason}")


def backoff_delay(attempt: int, cap: float, rand: Callable[[], float] = random.random,
                  base: float = BACKOFF_BASE_SECONDS) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 = first).

    Exponential, capped, "equal jitter": half the step is fixed (we never spin),
    half is random (clients do not reconnect in lockstep).
    """
    step = min(cap, base * 2 ** min(attempt, 30))
    return step / 2 + rand() * step / 2


class Link(Requests):
    """One logged-in connection: the official client and the requests in flight on it."""

    def __init__(self, client: thalex.Thalex, request_timeout: float) -> None:
        super().__init__(request_timeout)
        self.client = client


class ExchangeSession:
    """Keeps one logged-in connection open; calls `on_connected` after every login."""

    def __init__(
        self,
        url: str,
        key_id: str,
        private_key: str,
        *,
        account: str | None,
        idle_timeout: float,
        reconnect_max: float,
        on_notification: Notification,
        on_garbage: Garbage,
        on_connected: Callable[[Link], Awaitable[None]],
        on_disconnected: Callable[[str], None],
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.key_id = key_id
        self._private_key = private_key
        self.account = account
        self.idle_timeout = idle_timeout
        self.reconnect_max = reconnect_max
        self.on_notification = on_notification
        self.on_garbage = on_garbage
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.rand = rand
        self.link: Link | None = None
        self.ready = False
        """Logged in and bootstrapped: what ingest publishes is the account's truth."""
        self.last_message = time.monotonic()
        self._reconnect_now = asyncio.Event()

    def reconnect_soon(self) -> None:
        """The exchange announced a close: move to a new connection now, without backoff."""
        self._reconnect_now.set()

    async def run(self) -> None:
        """Connect, and re-connect, until cancelled or the login is refused (`LoginRejected`)."""
        attempt = 0
        while True:
            self._reconnect_now.clear()
            try:
                await self._connection()
                reason = "the exchange announced a reconnect"
            except LoginRejected:
                raise
            except (ConnectionLost, ConnectionClosed, OSError, TimeoutError, InvalidHandshake,
                    ThalexError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # e.g. Redis down during the bootstrap: the eye keeps trying
                log.exception("connection setup failed")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                established, self.ready = self.ready, False
            if established:  # it worked for a while: the next trouble starts a fresh backoff
                attempt = 0
            self.on_disconnected(reason)
            if self._reconnect_now.is_set():
                delay = 0.0
            else:
                delay = backoff_delay(attempt, self.reconnect_max, self.rand)
                attempt += 1
            log.warning("connection to %s lost (%s); reconnecting in %.2f s", self.url, reason, delay)
            await asyncio.sleep(delay)

    async def _connection(self) -> None:
        """One connection's life: returns on a reconnect notice, raises when it breaks."""
        client = thalex.Thalex(SimpleNamespace(value=self.url))  # type: ignore[arg-type]
        async with asyncio.timeout(self.idle_timeout):
            await client.connect()
        link = Link(client, request_timeout=max(self.idle_timeout, 5.0))
        self.link = link
        self.last_message = time.monotonic()
        reader = asyncio.create_task(self._read(client, link), name="ingest-reader")
        watchdog = asyncio.create_task(self._watch(link), name="ingest-watchdog")
        notice = asyncio.create_task(self._reconnect_now.wait(), name="ingest-notice")
        setup = asyncio.create_task(self._setup(link), name="ingest-setup")
        tasks = {reader, watchdog, notice, setup}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if setup in done:
                    setup.result()  # login refused / bootstrap failed: raise it
                    tasks.discard(setup)
                    self.ready = True
                    log.info("logged in to %s as key id %s; following the account", self.url, self.key_id)
                if notice in done:
                    return
                for task in done & {reader, watchdog}:
                    task.result()  # raises why the connection ended
                    raise ConnectionLost("the connection closed")
        finally:
            link.close("connection closed")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                async with asyncio.timeout(1.0):
                    await client.disconnect()
            except (OSError, TimeoutError, ConnectionClosed, RuntimeError):  # broken: close it hard
                if client.ws is not None:
                    client.ws.transport.abort()

    async def _setup(self, link: Link) -> None:
        try:
            await link.call("public/login", lambda rid: link.client.login(
                self.key_id, self._private_key, account=self.account, id=rid))
        except ThalexError as exc:
            if exc.code in FATAL_LOGIN_CODES:
                raise LoginRejected(self.key_id, exc.code, exc.message) from None
            raise
        except ValueError as exc:  # the PEM is not a usable RSA private key
            raise LoginRejected(self.key_id, None, f"cannot sign the login token: {exc}") from None
        await self.on_connected(link)

    async def _read(self, client: thalex.Thalex, link: Link) -> None:
        on_notification, on_garbage, loads = self.on_notification, self.on_garbage, json.loads
        for count in itertools.count(1):
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            raw = await client.receive()
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
                try:
                    on_notification(channel, message["notification"], text, received)
                except Exception as exc:  # a handler bug must not blind the account
                    log.exception("handling %s failed", channel)
                    on_garbage(text, f"handler failed: {type(exc).__name__}: {exc}", received)
            elif "id" in message and ("result" in message or "error" in message):
                if not link.answer(message) and "error" in message:
                    log.warning("error for a request nobody waits for: %s", text[:500])
            else:
                on_garbage(text, "neither an answer (id + result/error) nor a notification", received)

    async def _watch(self, link: Link) -> None:
        """Half-open detection: no message at all for `idle_timeout` seconds ends the connection.

        A quiet but healthy connection (nothing followed yet) is asked
        `public/system_info` once it has been silent for half the timeout; any
        answer, even an error, proves the link alive.
        """
        probe: asyncio.Task[Any] | None = None
        try:
            while True:
                await asyncio.sleep(self.idle_timeout / 4)
                silent = time.monotonic() - self.last_message
                if silent > self.idle_timeout:
                    raise ConnectionLost(f"no message for {silent:.1f} s (half-open connection?)")
                if silent > self.idle_timeout / 2 and (probe is None or probe.done()):
                    probe = asyncio.create_task(self._probe(link))
        finally:
            if probe is not None:
                probe.cancel()

    @staticmethod
    async def _probe(link: Link) -> None:
        try:
            await link.call("public/system_info", lambda rid: link.client.system_info(id=rid))
        except (ThalexError, ConnectionLost):
            pass  # an error answer is still an answer; silence is the watchdog's business
