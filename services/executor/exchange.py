"""The executor's Thalex session: the shared supervisor, the executor's set-up, sending an order, retrying.

The session itself is `services/common/thalex.Session` (reconnect with jittered backoff, the
exchange's reconnect notice, half-open watchdog, a refused login ends it). The executor adds:

* after every login, `private/set_cancel_on_disconnect` (resting orders die with the session,
  and Thalex allows 50 order messages per second instead of 10: the answer's `message_rate`; orders
  are paced at the lower of it and `order_rate_per_second`) and its private channels
  (`account.trade_history` brings the fees of its trades). The subscribe answer is checked
  (api.yaml: it "returns successfully even if no channels were valid"): a channel it leaves out
  is named once at WARNING and asked for again with backoff on the same connection; while
  `account.trade_history` is not held, /health (`exchange`) is red naming it. Never a reconnect
  for it: closing must not wait on the channel of its fees;
* frames that are not messages, and trade notifications that do not fit, go to `tp:deadletter`;
  the session keeps going;
* `send`: one reduce-only IOC limit order, paced (`order_rate_per_second`), and its outcome;
* `retrying`: a request retried through throttling, temporary failures and reconnects until a
  command's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import thalex

from services.common.bus import Bus
from services.common.config import Settings
from services.common.contracts import ExchangeError, Side
from services.common.thalex import Connection, ConnectionLost, Session, ThalexError, ThalexKey, subscribe
from services.common.thalex.models import MalformedMessage, ThalexMessageRate, ThalexOrderStatus, parse
from services.executor.metrics import EXCHANGE_CONNECTED, ORDERS_REJECTED, ORDERS_SENT, RECONNECTS, RETRIES
from services.executor.plan import THROTTLE_EXCEEDED, ErrorAction, action_for
from services.executor.settle import BACKOFF_MAX, BACKOFF_START, Outcome
from services.executor.waves import Order

log = logging.getLogger(__name__)

TRADES_CHANNEL = "account.trade_history"
PRIVATE_CHANNELS = ["session.orders", TRADES_CHANNEL]
READ_CHANNELS = {TRADES_CHANNEL: "the fees of its trades"}
"""The private channels the executor reads, and what it reads there (a refusal of one makes /health red;
`session.orders` is subscribed but not read)."""
RESUBSCRIBE_FIRST_SECONDS, RESUBSCRIBE_MAX_SECONDS = 1.0, 30.0
HEARTBEAT_SECONDS = 15
"""Cancel-on-disconnect's heartbeat: resting orders die this long after the session does."""
IDLE_TIMEOUT_SECONDS = 15.0
RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS = 0.1, 5.0
"""The session's backoff: a closure in flight needs the exchange back fast."""


class TradingSession:
    """The executor's one session with Thalex (public only in a dry run: no key is loaded)."""

    def __init__(self, settings: Settings, bus: Bus, on_trades: Callable[[Any], list[str]]) -> None:
        config = settings.executor
        key = None if config.dry_run else ThalexKey.load(  # a trading key only when orders may be sent
            "executor", config.key_id, config.private_key_file, hint="it needs trading permission")
        self.bus = bus
        self.on_trades = on_trades
        """Fees of the account's trades; returns what was unusable (dead-lettered)."""
        self.session = Session(
            settings.thalex.url, key, account=settings.thalex.account, on_notification=self._on_notification,
            on_garbage=self._on_garbage, on_connected=self._set_up if key is not None else None,
            idle_timeout=IDLE_TIMEOUT_SECONDS, backoff_base=RECONNECT_BASE_SECONDS,
            backoff_max=RECONNECT_MAX_SECONDS, order_rate=config.order_rate_per_second)
        self.order_rate = config.order_rate_per_second
        """What `[executor]` asks for; orders are paced at less when the exchange grants less."""
        self._granted: int | None = None
        """The last `message_rate` below `order_rate` that was logged (each such grant is said once)."""
        self._task: asyncio.Task[Any] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.refused: dict[str, float] = {}
        self._asking: set[asyncio.Task[None]] = set()
        """`_ask_again` tasks (they end with their connection, or on `close`)."""
        """Private channels the exchange left out of its subscribe answer → since when (until held)."""
        EXCHANGE_CONNECTED.set_function(lambda: 1.0 if self.session.ready else 0.0)

    @property
    def ready(self) -> bool:
        """Logged in and set up."""
        return self.session.ready

    def start(self) -> asyncio.Task[Any]:
        """Start the session (once); the task ends only with a refused login (`LoginRejected`)."""
        if self._task is None:
            self._task = asyncio.create_task(self.session.run(), name="executor-session")
        return self._task

    async def started(self) -> None:
        """`start` as a bus start-up hook: the session is up before pending commands are resumed."""
        self.start()

    async def close(self) -> None:
        tasks = [*self._asking, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def health(self) -> bool | str:
        """The session's health; red too while a channel the executor reads is refused (named)."""
        verdict = self.session.health()
        unread = sorted(c for c in self.refused if c in READ_CHANNELS)
        if verdict is True and unread:
            now = time.time()
            return "channels refused: " + "; ".join(
                f"{c} ({READ_CHANNELS[c]}) left out of the subscribe answer "
                f"{now - self.refused[c]:.0f} s ago, retrying" for c in unread)
        return verdict

    async def request(self, method: str, *args: Any, order: bool = False, **kwargs: Any) -> Any:
        """`thalex.Thalex.<method>` on the session (waiting for it while it is not ready); its result."""
        return await self.session.request(method, *args, order=order, **kwargs)

    async def retrying(self, deadline_ts: float, check: Callable[[], None], method: str, *args: Any,
                       order: bool = False, **kwargs: Any) -> Any:
        """`request`, retried through throttling, temporary failures and reconnects until `deadline_ts`.

        `check()` runs before every attempt (it raises when the command's lease is lost).
        """
        delay = BACKOFF_START
        while True:
            check()
            try:
                return await self.request(method, *args, order=order, **kwargs)
            except ThalexError as exc:
                if action_for(exc.code) is not ErrorAction.BACK_OFF or time.time() >= deadline_ts:
                    raise
                RETRIES.labels("throttle" if exc.code == THROTTLE_EXCEEDED else "temporary").inc()
            except ConnectionLost as exc:
                if time.time() >= deadline_ts:
                    raise
                log.warning("%s: %s; waiting for the session", method, exc)
                RETRIES.labels("reconnect").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def send(self, order: Order, label: str, check: Callable[[], None]) -> Outcome:
        """One reduce-only, immediate-or-cancel limit order, collar clamp; its outcome.

        `check()` runs first (it raises when the command's lease is lost: nothing is sent then).
        """
        check()
        outcome = Outcome(order)
        direction = thalex.Direction.SELL if order.side is Side.SELL else thalex.Direction.BUY
        try:
            ORDERS_SENT.inc()
            result = await self.request(
                "insert", direction, order.instrument, order.amount, price=order.price, label=label,
                order_type=thalex.OrderType.LIMIT, time_in_force=thalex.TimeInForce.IOC, reduce_only=True,
                collar="clamp", order=True)
            outcome.result = parse(ThalexOrderStatus, "insert answer", result)
        except ThalexError as exc:
            ORDERS_REJECTED.labels(str(exc.code)).inc()
            outcome.error = ExchangeError(code=exc.code, message=exc.message)
        except (ConnectionLost, MalformedMessage) as exc:  # it may have traded: found by label
            log.warning("answer to the %s order lost (%s); will look it up by label", order.instrument, exc)
            outcome.lost = True
        return outcome

    async def _set_up(self, connection: Connection) -> None:
        granted = await connection.request("set_cancel_on_disconnect", HEARTBEAT_SECONDS)
        self._pace(granted)
        refused = await subscribe(connection, PRIVATE_CHANNELS, private=True)
        self._answered(PRIVATE_CHANNELS, refused)
        if refused:
            self._asking.add(task := asyncio.create_task(self._ask_again(connection, refused)))
            task.add_done_callback(self._asking.discard)
        if self.session.connections:
            RECONNECTS.inc()

    def _pace(self, answer: Any) -> None:
        """Pace orders at what `set_cancel_on_disconnect` granted, if less than configured: sending
        more is refused (code 4) and penalised. An answer without a usable rate keeps the configured one."""
        try:
            granted = parse(ThalexMessageRate, "set_cancel_on_disconnect answer", answer).message_rate
        except MalformedMessage as exc:
            log.warning("%s; pacing orders at the configured %g/s", exc, self.order_rate)
            granted = None
        rate = order_rate(self.order_rate, granted)
        if self.session.pacer is not None:
            self.session.pacer.pace(rate)
        if granted is not None and granted < self.order_rate and granted != self._granted:
            log.warning("the exchange grants %d order messages per second, less than order_rate_per_second "
                        "%g: pacing orders at %d/s", granted, self.order_rate, rate)
        self._granted = granted if granted is not None and granted < self.order_rate else None

    def _answered(self, asked: list[str], refused: list[str]) -> None:
        """Note a subscribe answer: a channel left out is said once, one held again is forgotten."""
        now = time.time()
        for channel in asked:
            if channel in refused and channel not in self.refused:
                self.refused[channel] = now
                log.warning("the exchange left %s out of its subscribe answer (%s); asking again with "
                            "backoff", channel, READ_CHANNELS.get(channel, "not read by the executor"))
            elif channel not in refused and channel in self.refused:
                log.info("%s held after %.0f s", channel, now - self.refused.pop(channel))

    async def _ask_again(self, connection: Connection, channels: list[str]) -> None:
        """Subscribe the refused channels again on this connection, with backoff, until held.

        Not a reconnect: the session carries the closing orders, and they must not wait on the
        channel of their fees. A new connection subscribes everything afresh.
        """
        delay = RESUBSCRIBE_FIRST_SECONDS
        while channels and not connection.closed:
            await asyncio.sleep(delay)
            try:
                refused = await subscribe(connection, channels, private=True)
            except (ThalexError, ConnectionLost) as exc:
                log.info("asking again for %s: %s", ", ".join(channels), exc)
                return
            self._answered(channels, refused)
            channels, delay = refused, min(delay * 2, RESUBSCRIBE_MAX_SECONDS)

    def _on_notification(self, channel: str, notification: Any, raw: str, received: float) -> None:
        if channel == TRADES_CHANNEL:
            for problem in self.on_trades(notification):
                self._spawn(self.bus.deadletter(f"thalex:{channel}", f"{channel}@{received:.6f}", raw,
                                                problem))

    def _on_garbage(self, raw: str, reason: str, received: float) -> None:
        self._spawn(self.bus.deadletter("thalex:websocket", f"websocket@{received:.6f}", raw, reason))

    def _spawn(self, write: Coroutine[Any, Any, None]) -> None:
        """A dead letter the reader cannot await: written in the background, a failure logged."""
        task = asyncio.create_task(write)
        self._background.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("writing a dead letter failed: %s", task.exception())


def order_rate(configured: float, granted: int | None) -> float:
    """The order messages per second to pace at: the configured rate, never above what the exchange
    granted the session (None, or a grant that is not positive and so means nothing: the configured rate)."""
    return configured if granted is None or granted <= 0 else min(configured, float(granted))
