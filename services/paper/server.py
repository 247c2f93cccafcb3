"""The paper exchange's shell: the websocket server, its clock and the market loop.

Speaks Thalex's wire format (api.yaml) so the official ``thalex`` client connects unchanged. The
work is split by job: :mod:`~services.paper.dispatch` answers requests through the method registry
(:mod:`~services.paper.methods`), :mod:`~services.paper.channels` keeps subscriptions,
:mod:`~services.paper.fanout` sends notifications, :mod:`~services.paper.control` is the
``paper/*`` API; matching and accounting live in :mod:`~services.paper.engine` and prices in
:mod:`~services.paper.market`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.paper import methods  # noqa: F401  (registers every method family)
from services.paper.automation import Automation
from services.paper.channels import Channel, Subscriptions
from services.paper.clock import PaperClock
from services.paper.connection import Connection
from services.paper.control import CONTROLS
from services.paper.daily import DailyCycle
from services.paper.dispatch import Dispatcher
from services.paper.engine import Engine
from services.paper.errors import INVALID_REQUEST, UNKNOWN_INSTRUMENT, UNKNOWN_METHOD, RpcError
from services.paper.fanout import Fanout
from services.paper.keys import ApiKey
from services.paper.market import Instrument, Market
from services.paper.marketdata import TradeStats
from services.paper.pricehistory import PriceHistory

log = logging.getLogger(__name__)

WS_PATH = "/ws/api/v2"
SYSTEM_CHANNEL = "system"
"""Thalex announces a coming disconnect here (`{"event": "reconnect"}`)."""
LOOP_INTERVAL = 0.05
DAY_END_PAUSE = 0.05
"""Real seconds a clock jump pauses at each day's end so subscribers read its last market state."""
SUMMARY_INTERVAL = 5.0


class PaperExchange:
    """A Thalex-compatible exchange over websocket; ``control=True`` adds the ``paper/*`` methods."""

    def __init__(
        self,
        keys: dict[str, ApiKey],
        *,
        seed: int = 1,
        control: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        tick_interval: float = 0.25,
        reconnect_grace: float = 1.0,
        index_vol: float = 0.6,
        option_vol: float = 0.5,
        clock: Callable[[], float] = time.time,
        start_time: float | None = None,
    ) -> None:
        self.keys = keys
        self.seed = seed
        self.control_enabled = control
        self.host = host
        self.port = port
        self.tick_interval = tick_interval
        self.reconnect_grace = reconnect_grace
        self.clock = clock if isinstance(clock, PaperClock) else PaperClock(clock, start_time)
        """The paper's time: every timestamp the exchange reports (``paper/advance_clock`` moves it)."""
        self.wall_clock: Callable[[], float] = time.time
        """Real time: login tokens and the control API's logs."""
        self.market: Market = Market(seed=seed, now=self.clock(), index_vol=index_vol, volatility=option_vol)
        self.engine = Engine(self.market)
        self.stats: TradeStats = TradeStats()
        self.automation = Automation(self.engine, self.stats)
        self.history = PriceHistory()
        self.banners: list[dict] = []
        """``Banner`` objects (``paper/set_banners``), on ``public/system_info`` and ``banners``."""
        self.cycle = DailyCycle(self)
        self.connections: set[Connection] = set()
        self.subscriptions = Subscriptions(self)
        self.fanout: Fanout = Fanout(self)
        self.dispatcher = Dispatcher(self)
        self.url = ""
        self._next_conn = 0
        self._server: Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._last_step = 0.0
        self._last_summary = 0.0
        self._last_record = -math.inf

    # Lifecycle

    async def start(self) -> str:
        """Listen and start the market clock; returns the real URL (port 0 picks a free port)."""
        self._server = await serve(
            self._serve_connection,
            self.host,
            self.port,
            process_request=self._check_path,
            compression=None,
            max_queue=None,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://{self.host}:{port}{WS_PATH}"
        self._last_step = self._last_summary = self.clock()
        self._loop_task = asyncio.create_task(self._market_loop())
        return self.url

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: the ``system`` reconnect notice first, then close every connection."""
        grace = self.reconnect_grace if grace is None else grace
        self.broadcast_reconnect()
        if grace > 0:
            await asyncio.sleep(grace)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for conn in list(self.connections):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.drain(), 1.0)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def broadcast_reconnect(self) -> None:
        for conn in self.connections:
            conn.notify(SYSTEM_CHANNEL, {"event": "reconnect"})

    @staticmethod
    def _check_path(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "the paper exchange serves /ws/api/v2\n")
        return None

    async def _serve_connection(self, ws: ServerConnection) -> None:
        self._next_conn += 1
        conn = Connection(ws, self._next_conn)
        self.connections.add(conn)
        writer = asyncio.create_task(conn.write())
        try:
            async for message in ws:
                await self.dispatcher.on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.subscriptions.leave_all(conn)
            if conn.session is not None:
                self.fanout.publish(self.engine.close_session(conn.session, self.clock()))
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    @property
    def channels(self) -> dict[str, Channel]:
        """The subscribed public channels by name (what tests inspect)."""
        return self.subscriptions.channels

    # Shared helpers of methods and controls

    def instrument_named(self, name: Any) -> Instrument:
        """The active instrument ``name``, or a combination ``[A:1,B:-1]`` of active ones (6 when not a
        string, 5 when unknown)."""
        if not isinstance(name, str):
            raise RpcError(INVALID_REQUEST, "instrument_name must be a string")
        inst = self.market.get(name)
        if inst is None:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown instrument {name}")
        return inst

    async def control(self, method: str, params: dict, requester: Connection | None = None) -> Any:
        """Run one ``paper/*`` control method (used by the websocket and by scenarios)."""
        handler = CONTROLS.get(method) if self.control_enabled else None
        if handler is None:
            raise RpcError(UNKNOWN_METHOD, f"unknown method {method}")
        return await handler(self, params, requester)

    def changed(self) -> dict:
        """Market state was set from outside: every channel goes out again; the status."""
        self.market.version += 1
        return self.repriced()

    def repriced(self) -> dict:
        """Prices were set from outside (the market already knows which: `version` or `touch`):
        publish; the status."""
        self.fanout.after_market_change(self.clock())
        return self.status()

    def react(self, now: float) -> None:
        """Conditional orders, bots, RFQ makers and takers and rogue bots act on the latest market."""
        self.fanout.publish(self.automation.tick(now))

    def status(self) -> dict:
        return {
            "time": self.clock(),
            "clock_speed": self.clock.speed,
            "clock_offset": self.clock.offset,
            "next_settlement": self.cycle.next,
            "paused": self.market.paused,
            "seed": self.seed,
            "url": self.url,
            "index": dict(self.market.index),
            "connections": len(self.connections),
            "pinned_marks": dict(self.market.pinned_marks),
        }

    async def advance_clock(self, seconds: float) -> int:
        """Jump the paper's clock forward; every 08:00 UTC on the way is processed in order. Before
        each, the day's last market state goes out and subscribers get ``DAY_END_PAUSE`` seconds of
        real time to read it (as they would have, had the day passed); returns the 08:00s crossed."""
        target = self.clock() + seconds
        crossed = 0
        while self.cycle.next <= target:
            crossed += 1
            self.clock.advance(max(0.0, self.cycle.next - self.clock()))
            self.cycle.close_day()
            await asyncio.sleep(DAY_END_PAUSE)
            self.cycle.advance_to(self.clock())
        self.clock.advance(max(0.0, target - self.clock()))
        now = self.clock()
        self.cycle.advance_to(now)
        self.market.version += 1
        self.fanout.after_market_change(now)
        self.record_prices(now, force=True)
        return crossed

    def record_prices(self, now: float, force: bool = False) -> None:
        """Index and marks into the price history (at most once a second unless forced)."""
        if not force and now - self._last_record < 1.0:
            return
        self._last_record = now
        market = self.market
        for underlying, price in market.index.items():
            self.history.record(f"index:{underlying}", now, price)
        for name, inst in market.instruments.items():
            mark = market.mark(name)
            self.history.record(
                name,
                now,
                mark.price,
                funding=market.funding_paid.get(name, 0.0),
                iv=mark.iv if inst.kind == "option" else None,
                top=lambda n=name: self._top_of_book(n),
            )

    def _top_of_book(self, name: str) -> list[float | None]:
        bids, asks = self.market.book(name)
        bid, ask = (bids[0] if bids else [None, None]), (asks[0] if asks else [None, None])
        return [bid[0], bid[1], ask[0], ask[1]]

    # The market loop

    async def _market_loop(self) -> None:
        """Steps the random walk every ``tick_interval``, turns the days and serves the delayed channels."""
        while True:
            await asyncio.sleep(LOOP_INTERVAL)
            now = self.clock()
            try:
                self.cycle.advance_to(now)
                if now - self._last_step >= self.tick_interval:
                    self._last_step = now
                    if not self.market.paused:
                        self.market.walk(self.tick_interval)
                        self.fanout.after_market_change(now)
                    self.market.sample_index(now)
                    self.record_prices(now)
                self.react(now)
                self.fanout.publish_channels(now, raw_only=False)
                if now - self._last_summary >= SUMMARY_INTERVAL:
                    self._last_summary = now
                    for conn in self.connections:
                        if conn.session is not None and "account.summary" in conn.channels:
                            conn.notify("account.summary", self.engine.account_summary(conn.session.account))
            except Exception:
                log.exception("market loop step failed")
