"""The session supervisor: one logged-in connection to Thalex for the life of a service.

Ingest and the executor each run one `Session`. It opens a `Connection`, logs in, subscribes
the exchange's `system` channel, runs the service's `on_connected` hook (ingest: subscribe and
gap-fill; the executor: cancel-on-disconnect and its private channels) and only then is `ready`.
From there it keeps the connection alive:

* a lost connection is re-opened with exponential backoff and jitter (half of each step fixed,
  so it never spins; half random, so clients do not return in lockstep). The backoff starts
  again from its first step only after a connection stayed up for `stable_seconds`: a failure
  that repeats — an exchange that accepts and drops, Redis refusing every write — always
  waits, longer each time, up to `backoff_max`;
* the exchange's reconnect notice (`system` channel, event `reconnect`, sent at least 10 s
  before a graceful close) moves it to a new connection at once, without backoff — once; a
  notice that repeats waits like any failure;
* a half-open connection (TCP alive, nothing arriving) is found by a watchdog: a quiet link is
  probed with `public/system_info` after half of `idle_timeout`, and declared dead after
  `idle_timeout` without any frame;
* a refused login (`LoginRejected`: unknown key, wrong key, locked account) is not retried: it
  ends `run()`, which the service lets through so `service_main` exits 2 naming the key id.
  Requests waiting for the session then fail at once with the refusal (a `ThalexError`).

`request()` is for callers outside the set-up: it waits (up to the request timeout) until the
session is ready and, with `order=True`, paces the message as an order message (`OrderPacer`).
`health()` says whether the session is logged in and hearing from the exchange, or why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from services.common.bus import raise_if_cancelled
from services.common.thalex.channels import subscribe
from services.common.thalex.connection import SYSTEM, Connection, Garbage, Notification
from services.common.thalex.key import LoginRejected, ThalexKey
from services.common.thalex.models import MalformedMessage, ThalexSystemEvent, parse
from services.common.thalex.pacing import OrderPacer
from services.common.thalex.requests import NO_CODE, ConnectionLost, ThalexError

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 0.5
STABLE_SECONDS = 10.0
"""A connection up (logged in and set up) this long proves the trouble is over: the backoff resets."""
RECONNECT_NOTICE = "the exchange announced a reconnect"
EXPECTED_FAILURES = (ConnectionLost, ConnectionClosed, OSError, TimeoutError, InvalidHandshake, ThalexError)
"""How connections end in the ordinary course of things (logged without a traceback)."""

OnConnected = Callable[[Connection], Awaitable[None]]


def backoff_delay(attempt: int, cap: float, rand: Callable[[], float] = random.random,
                  base: float = BACKOFF_BASE_SECONDS) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 = first): exponential, capped,
    "equal jitter" — half the step fixed (never 0, never a spin), half random."""
    step = min(cap, base * 2.0 ** min(attempt, 30))
    return step / 2 + rand() * step / 2


def _ignore_notification(channel: str, notification: Any, raw: str, received: float) -> None:
    """A service that subscribes nothing of its own."""


def _log_garbage(raw: str, reason: str, received: float) -> None:
    log.warning("unusable frame from the exchange (%s): %s", reason, raw[:500])


class Session:
    """Keeps one logged-in connection open; see the module docstring."""

    def __init__(
        self,
        url: str,
        key: ThalexKey | None,
        *,
        account: str | None = None,
        on_notification: Notification = _ignore_notification,
        on_garbage: Garbage = _log_garbage,
        on_connected: OnConnected | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        idle_timeout: float = 15.0,
        request_timeout: float = 5.0,
        backoff_base: float = BACKOFF_BASE_SECONDS,
        backoff_max: float = 30.0,
        stable_seconds: float = STABLE_SECONDS,
        order_rate: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.key = key
        """None: a public session (no login), e.g. a dry-run executor."""
        self.account = account
        self.on_notification = on_notification
        self.on_garbage = on_garbage
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_seconds = stable_seconds
        self.pacer = OrderPacer(order_rate) if order_rate else None
        self.rand = rand
        self.connection: Connection | None = None
        """The current connection (set up or not yet)."""
        self.ready = False
        """Logged in and set up: what the service reads and sends goes through a working session."""
        self.status = "not connected yet"
        """What the session is doing while not ready (for /health and the log)."""
        self.refused: LoginRejected | None = None
        self.connections = 0
        """Connections that became ready, this process."""
        self._ready = asyncio.Event()
        self._ready_since: float | None = None
        self._reconnect = asyncio.Event()
        self._reconnect_reason = ""
        self._at_once = False

    def __repr__(self) -> str:  # never key material
        return f"Session({self.url!r}, key_id={self.key.key_id if self.key else None!r})"

    @property
    def last_message(self) -> float:
        """Monotonic time of the current connection's last frame."""
        return self.connection.last_message if self.connection is not None else 0.0

    def health(self) -> bool | str:
        """True while logged in and hearing from the exchange; otherwise why not."""
        if self.refused is not None:
            return f"login refused: {self.refused.reason}"
        if not self.ready:
            return f"not logged in to {self.url}: {self.status}"
        silent = time.monotonic() - self.last_message
        if silent >= self.idle_timeout:
            return f"no message from the exchange for {silent:.0f} s"
        return True

    def reconnect(self, reason: str, *, at_once: bool = False) -> None:
        """Leave the current connection for a new one.

        `at_once` (the exchange's notice) skips the backoff if nothing failed since the last
        stable connection; any other reason (a service that could not use what it read) waits
        like a failure, so a trouble that repeats never makes it spin.
        """
        if not self._reconnect.is_set():
            self._reconnect_reason, self._at_once = reason, at_once
        self._reconnect.set()

    async def request(self, method: str, *args: Any, order: bool = False, **kwargs: Any) -> Any:
        """`thalex.Thalex.<method>(*args, **kwargs)` on the ready connection; its `result`.

        Waits up to the request timeout for a session that is not ready yet (`ConnectionLost`
        after that), fails at once with the refusal after a refused login (`ThalexError` with
        the login's code). `order=True` paces it as an order message.
        """
        connection = self.connection
        if not self.ready or connection is None:
            connection = await self._wait_ready(method)
        if order and self.pacer is not None:
            await self.pacer.acquire()
        return await connection.request(method, *args, **kwargs)

    async def _wait_ready(self, method: str) -> Connection:
        if self.refused is None and not self.ready:
            try:
                async with asyncio.timeout(self.request_timeout):
                    await self._ready.wait()
            except TimeoutError:
                raise ConnectionLost(f"{method}: not logged in to {self.url} ({self.status})") from None
        if self.refused is not None:
            raise ThalexError(method, self.refused.code or NO_CODE,
                              f"the exchange refused the login of key id {self.refused.key_id!r}: "
                              f"{self.refused.reason}")
        if self.connection is None:  # pragma: no cover - ready implies a connection
            raise ConnectionLost(f"{method}: not connected")
        return self.connection

    async def run(self) -> NoReturn:
        """Connect, and re-connect, until cancelled or the login is refused (`LoginRejected`)."""
        attempt = 0
        while True:
            raise_if_cancelled()  # a cancellation a library swallowed must still end the loop
            self._reconnect.clear()
            self._at_once = False
            self._ready_since = None
            try:
                reason = await self._live()
            except LoginRejected as exc:
                self.refused = exc
                self.status = f"login refused: {exc.reason}"
                self._ready.set()  # the requests waiting for a session fail at once
                log.error("%s", exc)
                raise
            except EXPECTED_FAILURES as exc:
                raise_if_cancelled()
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # e.g. Redis down during the service's set-up: keep trying, loudly
                raise_if_cancelled()
                log.exception("setting up the connection to %s failed", self.url)
                reason = f"{type(exc).__name__}: {exc}"
            up = time.monotonic() - self._ready_since if self._ready_since is not None else 0.0
            if up >= self.stable_seconds:
                attempt = 0
            if self._at_once and attempt == 0:
                delay = 0.0
            else:
                delay = backoff_delay(attempt, self.backoff_max, self.rand, self.backoff_base)
            attempt += 1
            self.status = f"reconnecting after {reason}"
            if self.on_disconnected is not None:
                self.on_disconnected(reason)
            log.warning("connection to %s lost (%s); reconnecting in %.2f s", self.url, reason, delay)
            await asyncio.sleep(delay)

    async def _live(self) -> str:
        """One connection's life: returns why a reconnect was asked for, raises why it broke."""
        connection = Connection(self.url, self.request_timeout)
        self.connection = connection
        self.status = "connecting"
        tasks: set[asyncio.Task[Any]] = set()
        try:
            async with asyncio.timeout(self.idle_timeout):
                await connection.open()
            reader = asyncio.create_task(
                connection.read(self.on_notification, self.on_garbage, self._on_system), name="thalex-reader")
            watchdog = asyncio.create_task(self._watch(connection), name="thalex-watchdog")
            notice = asyncio.create_task(self._reconnect.wait(), name="thalex-reconnect")
            setup = asyncio.create_task(self._setup(connection), name="thalex-setup")
            tasks = {reader, watchdog, notice, setup}
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if setup in done:
                    setup.result()  # login refused / set-up failed: raise it
                    tasks.discard(setup)
                    self._set_ready()
                if notice in done:
                    return self._reconnect_reason
                for task in done & {reader, watchdog}:
                    task.result()  # raises why the connection ended
                    raise ConnectionLost("the connection closed")
        finally:
            self.ready = False
            self._ready.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await connection.close()

    async def _setup(self, connection: Connection) -> None:
        if self.key is not None:
            self.status = "logging in"
            await connection.login(self.key, self.account)
        self.status = "setting up"
        try:  # an answer that leaves the channel out is as much a "no" as an error (api.yaml)
            if await subscribe(connection, [SYSTEM], private=False):
                log.info("no %s channel on this exchange (left out of the subscribe answer); relying on the "
                         "idle watchdog", SYSTEM)
        except ThalexError as exc:
            log.info("no %s channel on this exchange (%s); relying on the idle watchdog", SYSTEM, exc.message)
        if self.on_connected is not None:
            await self.on_connected(connection)

    def _set_ready(self) -> None:
        self.ready = True
        self.status = "ready"
        self.connections += 1
        self._ready_since = time.monotonic()
        self._ready.set()
        who = f" as key id {self.key.key_id}" if self.key is not None else ""
        log.info("logged in to %s%s (connection %d)", self.url, who, self.connections)

    def _on_system(self, notification: Any) -> None:
        try:
            event = parse(ThalexSystemEvent, "system event", notification)
        except MalformedMessage:
            return  # the service's own handler sees it too
        if event.event == "reconnect":
            log.warning("%s", RECONNECT_NOTICE)
            self.reconnect(RECONNECT_NOTICE, at_once=True)

    async def _watch(self, connection: Connection) -> None:
        """Half-open detection: no frame at all for `idle_timeout` seconds ends the connection.

        A quiet but healthy connection is asked `public/system_info` once it has been silent for
        half the timeout; any answer, even an error, proves the link alive.
        """
        probe: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.idle_timeout / 4)
                silent = time.monotonic() - connection.last_message
                if silent > self.idle_timeout:
                    raise ConnectionLost(f"no message for {silent:.1f} s (half-open connection?)")
                if silent > self.idle_timeout / 2 and (probe is None or probe.done()):
                    probe = asyncio.create_task(self._probe(connection))
        finally:
            if probe is not None:
                probe.cancel()

    @staticmethod
    async def _probe(connection: Connection) -> None:
        # an error answer is still an answer; silence is the watchdog's business
        with contextlib.suppress(ThalexError, ConnectionLost):
            await connection.request("system_info")
