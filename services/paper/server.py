"""The paper exchange's shell: websocket server, JSON-RPC dispatch, sessions, subscriptions, control.

Speaks Thalex's wire format (api.yaml) so the official ``thalex`` client connects unchanged.
All matching and accounting lives in :mod:`services.paper.engine`, all prices in
:mod:`services.paper.market`; this module only moves messages and time.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.paper.engine import (
    AUTHENTICATION_FAILED,
    INVALID_REQUEST,
    NOT_LOGGED_IN,
    UNKNOWN_INSTRUMENT,
    UNKNOWN_METHOD,
    Engine,
    Event,
    RpcError,
    Session,
    account_number,
)
from services.paper.keys import ApiKey, LoginError, verify_token
from services.paper.market import BookShape, Market, align_down, align_up

log = logging.getLogger(__name__)

WS_PATH = "/ws/api/v2"
DELAYS: dict[str, float] = {
    "raw": 0.0,
    "100ms": 0.1,
    "200ms": 0.2,
    "500ms": 0.5,
    "1000ms": 1.0,
    "5000ms": 5.0,
    "60000ms": 60.0,
}
SYSTEM_CHANNEL = "system"
"""Thalex announces a coming disconnect here (`{"event": "reconnect"}`)."""
PRIVATE_CHANNELS = (
    "account.orders",
    "session.orders",
    "account.trade_history",
    "account.portfolio",
    "account.summary",
)
ORDER_METHODS = frozenset(
    {
        "private/insert",
        "private/buy",
        "private/sell",
        "private/amend",
        "private/cancel",
        "private/cancel_all",
        "private/cancel_session",
    }
)
ORDER_LOG_SIZE = 100_000
TICKER_LOG_SIZE = 100_000
LOOP_INTERVAL = 0.05
SUMMARY_INTERVAL = 5.0
PORTFOLIO_MARK_MOVE = 0.01
BURST_STEP = 0.001  # market seconds per ``paper/burst_ticks`` update

Handler = Callable[["Connection", dict, float], Awaitable[Any]]


@dataclass
class Channel:
    """One subscribable channel, shared by its subscribers; ``views`` hold each subscriber's book."""

    name: str
    kind: str  # ticker | book | index
    target: str
    delay: float
    grouping: float | None = None
    nlevels: int | None = None
    subscribers: set[Connection] = field(default_factory=set)
    views: dict[Connection, tuple[dict, dict]] = field(default_factory=dict)
    sent_version: int = -1
    last_sent: float = 0.0


@dataclass(eq=False)
class Connection:
    """One websocket: its login session, private channels and an ordered outgoing queue."""

    ws: ServerConnection
    conn_id: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    session: Session | None = None
    key: ApiKey | None = None
    channels: set[str] = field(default_factory=set)
    after: list[Callable[[], None]] = field(default_factory=list)

    def push(self, text: str, logged: dict | None = None) -> None:
        """Queue a message; `logged` (a `ticker_log` row) gets its `sent` time when the message leaves."""
        self.queue.put_nowait((text, logged))

    def notify(self, channel: str, notification: Any, logged: dict | None = None) -> None:
        self.push(json.dumps({"channel_name": channel, "notification": notification}), logged)


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
    ) -> None:
        self.keys = keys
        self.seed = seed
        self.control_enabled = control
        self.host = host
        self.port = port
        self.tick_interval = tick_interval
        self.reconnect_grace = reconnect_grace
        self.clock = clock
        self.market = Market(seed=seed, now=clock(), index_vol=index_vol, volatility=option_vol)
        self.engine = Engine(self.market)
        self.connections: set[Connection] = set()
        self.channels: dict[str, Channel] = {}
        self.order_log: deque[dict] = deque(maxlen=ORDER_LOG_SIZE)
        self.ticker_log: deque[dict] = deque(maxlen=TICKER_LOG_SIZE)
        self.failures: list[FailureRule] = []
        self.latency: dict[str | None, float] = {}
        self.last_price: dict[str, float] = {}
        self.volume: dict[str, float] = {}
        self.value: dict[str, float] = {}
        self.portfolio_marks: dict[tuple[str, str], float] = {}
        self._next_conn = 0
        self._next_log = 0
        self._server: Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._last_step = 0.0
        self._last_summary = 0.0
        self.url = ""
        self._methods: dict[str, Handler] = {
            "public/login": self._login,
            "private/set_cancel_on_disconnect": self._set_cancel_on_disconnect,
            "public/instruments": self._instruments,
            "public/instrument": self._instrument,
            "public/ticker": self._ticker_method,
            "public/index": self._index_method,
            "public/book": self._book_method,
            "public/subscribe": self._public_subscribe,
            "private/subscribe": self._private_subscribe,
            "unsubscribe": self._unsubscribe,
            "private/insert": self._insert,
            "private/buy": self._buy,
            "private/sell": self._sell,
            "private/amend": self._amend,
            "private/cancel": self._cancel,
            "private/cancel_all": self._cancel_all,
            "private/cancel_session": self._cancel_session,
            "private/open_orders": self._open_orders,
            "private/portfolio": self._portfolio,
            "private/trade_history": self._trade_history,
            "private/account_summary": self._account_summary,
        }
        self._controls: dict[str, Callable[[dict, Connection | None], Awaitable[Any]]] = {
            "paper/status": self._c_status,
            "paper/set_index": self._c_set_index,
            "paper/move_index": self._c_move_index,
            "paper/set_mark": self._c_set_mark,
            "paper/set_funding": self._c_set_funding,
            "paper/pause": self._c_pause,
            "paper/resume": self._c_resume,
            "paper/step": self._c_step,
            "paper/fill_orders": self._c_fill_orders,
            "paper/trade": self._c_trade,
            "paper/drop_connections": self._c_drop_connections,
            "paper/fail_next": self._c_fail_next,
            "paper/set_latency": self._c_set_latency,
            "paper/set_history_delay": self._c_set_history_delay,
            "paper/set_book": self._c_set_book,
            "paper/order_log": self._c_order_log,
            "paper/ticker_log": self._c_ticker_log,
            "paper/burst_ticks": self._c_burst_ticks,
            "paper/reconnect_notice": self._c_reconnect_notice,
        }

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
        self._broadcast_reconnect()
        if grace > 0:
            await asyncio.sleep(grace)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for conn in list(self.connections):
            await self._drain(conn)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _broadcast_reconnect(self) -> None:
        for conn in self.connections:
            conn.notify(SYSTEM_CHANNEL, {"event": "reconnect"})

    @staticmethod
    async def _drain(conn: Connection, within: float = 1.0) -> None:
        deadline = time.monotonic() + within
        while True:  # sent, or out of time
            if conn.queue.empty() or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.01)

    @staticmethod
    def _check_path(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "the paper exchange serves /ws/api/v2\n")
        return None

    # Connections

    async def _serve_connection(self, ws: ServerConnection) -> None:
        self._next_conn += 1
        conn = Connection(ws, self._next_conn)
        self.connections.add(conn)
        writer = asyncio.create_task(self._write(conn))
        try:
            async for message in ws:
                await self._on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            for name in list(conn.channels):
                self._leave(conn, name)
            if conn.session is not None:
                self._publish(self.engine.close_session(conn.session, self.clock()))
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    @staticmethod
    async def _write(conn: Connection) -> None:
        try:
            while True:
                text, logged = await conn.queue.get()
                if logged is not None and logged["sent"] is None:
                    logged["sent"] = time.time()
                await conn.ws.send(text)
        except ConnectionClosed:
            pass

    async def _on_message(self, conn: Connection, message: str | bytes) -> None:
        received = self.clock()
        try:
            request = json.loads(message)
        except ValueError:
            self._reply(conn, None, error=RpcError(INVALID_REQUEST, "malformed JSON"))
            return
        if not isinstance(request, dict):
            self._reply(conn, None, error=RpcError(INVALID_REQUEST, "request must be a JSON object"))
            return
        rid = request.get("id")
        method = request.get("method")
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(method, str) or not isinstance(params, dict):
            self._reply(
                conn, rid, error=RpcError(INVALID_REQUEST, "method must be a string and params an object")
            )
            return
        if method.startswith("paper/"):
            await self._on_control(conn, rid, method, params)
            return
        key_id = conn.key.kid if conn.key else None
        delay = self.latency.get(method, self.latency.get(None, 0.0))
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            result = await self._dispatch(conn, method, params, key_id)
        except RpcError as exc:
            self._log_order(method, key_id, received, params, {"error": exc.to_wire()})
            self._reply(conn, rid, error=exc)
            conn.after.clear()
            return
        self._log_order(method, key_id, received, params, {"result": result})
        self._reply(conn, rid, result=result)
        followups, conn.after = conn.after, []
        for followup in followups:
            followup()

    async def _dispatch(self, conn: Connection, method: str, params: dict, key_id: str | None) -> Any:
        for rule in self.failures:
            if rule.remaining > 0 and rule.matches(method, key_id):
                rule.remaining -= 1
                raise RpcError(rule.code, rule.message)
        if method.startswith("private/") and conn.session is None:
            raise RpcError(NOT_LOGGED_IN, "not logged in")
        handler = self._methods.get(method)
        if handler is None:
            raise RpcError(UNKNOWN_METHOD, f"unknown method {method}")
        return await handler(conn, params, self.clock())

    def _reply(
        self, conn: Connection, rid: Any, *, result: Any = None, error: RpcError | None = None
    ) -> None:
        if error is not None:
            conn.push(json.dumps({"id": rid, "error": error.to_wire()}))
        else:
            conn.push(json.dumps({"id": rid, "result": result}))

    def _log_order(
        self, method: str, key_id: str | None, received: float, params: dict, outcome: dict
    ) -> None:
        if method not in ORDER_METHODS:
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
                "done_time": self.clock(),
            }
        )

    # Session methods

    async def _login(self, conn: Connection, params: dict, now: float) -> dict:
        try:
            key = verify_token(params.get("token"), self.keys, now)
        except LoginError as exc:
            raise RpcError(AUTHENTICATION_FAILED, f"authentication failed: {exc}") from exc
        account = params.get("account")
        if account is not None and account != account_number(key.account):
            raise RpcError(AUTHENTICATION_FAILED, "authentication failed: the key has no such account")
        if conn.session is not None:
            self._publish(self.engine.close_session(conn.session, now))
        conn.key = key
        conn.session = self.engine.open_session(key.account, key.read_only)
        return {"account_number": conn.session.account.number}

    async def _set_cancel_on_disconnect(self, conn: Connection, params: dict, now: float) -> dict:
        timeout = params.get("timeout_secs")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise RpcError(INVALID_REQUEST, "timeout_secs must be a positive integer")
        return {"message_rate": self.engine.set_cancel_on_disconnect(self._session(conn))}

    @staticmethod
    def _session(conn: Connection) -> Session:
        if conn.session is None:
            raise RpcError(NOT_LOGGED_IN, "not logged in")
        return conn.session

    # Market data methods

    async def _instruments(self, conn: Connection, params: dict, now: float) -> list[dict]:
        return [inst.to_wire() for inst in self.market.instruments.values()]

    def _instrument_name(self, params: dict) -> str:
        name = params.get("instrument_name")
        if not isinstance(name, str):
            raise RpcError(INVALID_REQUEST, "instrument_name must be a string")
        if name not in self.market.instruments:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown instrument {name}")
        return name

    async def _instrument(self, conn: Connection, params: dict, now: float) -> dict:
        return self.market.instruments[self._instrument_name(params)].to_wire()

    async def _ticker_method(self, conn: Connection, params: dict, now: float) -> dict:
        return self.ticker(self._instrument_name(params), now)

    async def _index_method(self, conn: Connection, params: dict, now: float) -> dict:
        underlying = params.get("underlying")
        if not isinstance(underlying, str):
            raise RpcError(INVALID_REQUEST, "underlying must be a string")
        if underlying not in self.market.index:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {underlying}")
        return self.index(underlying, now)

    async def _book_method(self, conn: Connection, params: dict, now: float) -> dict:
        name = self._instrument_name(params)
        bids, asks = self.market.book(name)
        book: dict[str, Any] = {
            "bids": [[p, a, a] for p, a in bids],
            "asks": [[p, a, a] for p, a in asks],
            "time": now,
        }
        if name in self.last_price:
            book["last"] = self.last_price[name]
        return book

    def ticker(self, name: str, now: float) -> dict:
        """The ``Ticker`` object; empty book sides are omitted (the schema types them as numbers)."""
        inst = self.market.instruments[name]
        mark = self.market.mark(name)
        bids, asks = self.market.book(name, mark.price)
        low, high = self.market.collar(name, mark.price)
        ticker: dict[str, Any] = {
            "mark_price": mark.price,
            "mark_timestamp": now,
            "index": mark.index,
            "delta": mark.delta,
            "volume_24h": self.volume.get(name, 0.0),
            "value_24h": self.value.get(name, 0.0),
            "collar_low": low,
            "collar_high": high,
            "open_interest": 0.0,
        }
        if bids:
            ticker["best_bid_price"], ticker["best_bid_amount"] = bids[0]
        if asks:
            ticker["best_ask_price"], ticker["best_ask_amount"] = asks[0]
        if name in self.last_price:
            ticker["last_price"] = self.last_price[name]
        if inst.kind == "option":
            ticker["iv"], ticker["forward"] = mark.iv, mark.forward
        if inst.kind == "perpetual":
            ticker["funding_rate"], ticker["funding_mark"] = mark.funding_rate, mark.funding_mark
        return ticker

    def index(self, underlying: str, now: float) -> dict:
        return {"index_name": underlying, "price": self.market.index[underlying], "timestamp": now}

    # Subscriptions

    async def _public_subscribe(self, conn: Connection, params: dict, now: float) -> list[str]:
        return self._subscribe(conn, params, private=False)

    async def _private_subscribe(self, conn: Connection, params: dict, now: float) -> list[str]:
        return self._subscribe(conn, params, private=True)

    async def _unsubscribe(self, conn: Connection, params: dict, now: float) -> list[str]:
        removed = [name for name in self._channel_list(params) if name in conn.channels]
        for name in removed:
            self._leave(conn, name)
        return removed

    @staticmethod
    def _channel_list(params: dict) -> list[str]:
        channels = params.get("channels")
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise RpcError(INVALID_REQUEST, "channels must be a list of strings")
        return channels

    def _subscribe(self, conn: Connection, params: dict, private: bool) -> list[str]:
        names = self._channel_list(params)
        parsed: list[Channel | str] = []
        for name in names:
            if name in PRIVATE_CHANNELS:
                if not private:
                    raise RpcError(INVALID_REQUEST, f"{name} is private: use private/subscribe")
                parsed.append(name)
            elif name == SYSTEM_CHANNEL:
                parsed.append(name)  # the reconnect notice goes to every connection anyway
            else:
                parsed.append(self.channels.get(name) or self._parse_channel(name))
        for item in parsed:
            name = item if isinstance(item, str) else item.name
            if name in conn.channels:
                continue
            conn.channels.add(name)
            if isinstance(item, Channel):
                if name not in self.channels:
                    # The first subscriber's snapshot counts as the channel's latest send.
                    item.sent_version, item.last_sent = self.market.version, self.clock()
                    self.channels[name] = item
                self.channels[name].subscribers.add(conn)
            conn.after.append(functools.partial(self._snapshot, conn, name))
        return names

    def _parse_channel(self, name: str) -> Channel:
        parts = name.split(".")
        if parts[0] == "ticker" and len(parts) == 3 and parts[2] in DELAYS:
            self._known_instrument(parts[1])
            return Channel(name, "ticker", parts[1], DELAYS[parts[2]])
        if parts[0] == "price_index" and len(parts) == 2:
            if parts[1] not in self.market.index:
                raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {parts[1]}")
            return Channel(name, "index", parts[1], 0.0)
        if parts[0] == "book" and len(parts) == 5 and parts[4] in DELAYS:
            tick = self._known_instrument(parts[1])
            grouping: float | None = None
            if parts[2] != "none":
                try:
                    grouping = float(parts[2])
                except ValueError:
                    raise RpcError(INVALID_REQUEST, f"invalid grouping in {name}") from None
                if grouping <= 0 or abs(grouping / tick - round(grouping / tick)) > 1e-6:
                    raise RpcError(INVALID_REQUEST, f"grouping must be a multiple of the tick size in {name}")
            if parts[3] != "all" and not parts[3].isdigit():
                raise RpcError(INVALID_REQUEST, f"invalid nlevels in {name}")
            nlevels = None if parts[3] == "all" else int(parts[3])
            return Channel(name, "book", parts[1], DELAYS[parts[4]], grouping, nlevels)
        raise RpcError(INVALID_REQUEST, f"unknown channel {name}")

    def _known_instrument(self, name: str) -> float:
        inst = self.market.instruments.get(name)
        if inst is None:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown instrument {name}")
        return inst.tick_size

    def _leave(self, conn: Connection, name: str) -> None:
        conn.channels.discard(name)
        channel = self.channels.get(name)
        if channel is not None:
            channel.subscribers.discard(conn)
            channel.views.pop(conn, None)
            if not channel.subscribers:
                del self.channels[name]

    def _snapshot(self, conn: Connection, name: str) -> None:
        """What a new subscriber receives at once, as on Thalex."""
        now = self.clock()
        if name not in conn.channels:
            return
        if name in ("account.orders", "session.orders"):
            session = self._session(conn)
            orders = (
                self.engine.open_orders(session.account)
                if name == "account.orders"
                else self.engine.session_orders(session)
            )
            conn.notify(name, orders)
        elif name == "account.portfolio":
            account = self._session(conn).account
            entries = self.engine.portfolio(account)
            for entry in entries:
                self.portfolio_marks[(account.account_id, entry["instrument_name"])] = entry["mark_price"]
            conn.notify(name, entries)
        elif name == "account.summary":
            conn.notify(name, self.engine.account_summary(self._session(conn).account))
        elif name in self.channels:
            channel = self.channels[name]
            if channel.kind == "ticker":
                conn.notify(name, self.ticker(channel.target, now), self._log_ticker(channel.target, now))
            elif channel.kind == "index":
                conn.notify(name, self.index(channel.target, now))
            else:
                self._send_book(channel, [conn], now)

    # Publishing

    def _publish(self, events: list[Event]) -> None:
        """Fan engine events out to private channels, one notification per channel and connection."""
        if not events:
            return
        traded: set[str] = set()
        for event in events:
            if event.kind == "trade":
                name, trade = event.payload["instrument_name"], event.payload
                self.last_price[name] = trade["price"]
                self.volume[name] = self.volume.get(name, 0.0) + trade["amount"]
                self.value[name] = self.value.get(name, 0.0) + trade["amount"] * trade["price"]
                traded.add(event.account_id)
        if traded:
            self.market.version += 1
        for conn in self.connections:
            if conn.session is None or not conn.channels.intersection(PRIVATE_CHANNELS):
                continue
            account_id = conn.session.account.account_id
            mine = [e for e in events if e.account_id == account_id]
            if mine:
                self._notify_account(conn, conn.session, mine, account_id in traded)
        for event in events:
            if event.kind == "portfolio":
                self.portfolio_marks[(event.account_id, event.payload["instrument_name"])] = event.payload[
                    "mark_price"
                ]

    def _notify_account(self, conn: Connection, session: Session, mine: list[Event], traded: bool) -> None:
        """One connection's private channels: the account's events, one notification per channel."""
        orders = [e.payload for e in mine if e.kind == "orders"]
        if orders and "account.orders" in conn.channels:
            conn.notify("account.orders", orders)
        session_orders = [
            e.payload for e in mine if e.kind == "orders" and e.session_id == session.session_id
        ]
        if session_orders and "session.orders" in conn.channels:
            conn.notify("session.orders", session_orders)
        trades = [e.payload for e in mine if e.kind == "trade"]
        if trades and "account.trade_history" in conn.channels:
            conn.notify("account.trade_history", trades)
        lines = {e.payload["instrument_name"]: e.payload for e in mine if e.kind == "portfolio"}
        if lines and "account.portfolio" in conn.channels:
            conn.notify("account.portfolio", list(lines.values()))
        if traded and "account.summary" in conn.channels:
            conn.notify("account.summary", self.engine.account_summary(session.account))

    def _publish_channels(self, now: float, raw_only: bool) -> None:
        version = self.market.version
        for channel in list(self.channels.values()):
            if channel.sent_version == version:
                continue
            if channel.delay > 0 and (raw_only or now - channel.last_sent < channel.delay):
                continue
            self._send_channel(channel, now)

    def _send_channel(self, channel: Channel, now: float) -> None:
        channel.sent_version = self.market.version
        channel.last_sent = now
        if channel.kind == "book":
            self._send_book(channel, list(channel.subscribers), now)
            return
        logged = None
        if channel.kind == "ticker":
            payload = self.ticker(channel.target, now)
            logged = self._log_ticker(channel.target, now)
        else:
            payload = self.index(channel.target, now)
        text = f'{{"channel_name":"{channel.name}","notification":{json.dumps(payload)}}}'
        for conn in channel.subscribers:
            conn.push(text, logged)

    def _log_ticker(self, name: str, now: float, channel: str = "ticker") -> dict:
        """Remember when market data left: a price change reaches a client as a ticker *and* a book.

        `time` is when the notification was queued, `sent` when the first connection's writer
        handed it to its websocket (None until then).
        """
        row = {
            "instrument_name": name,
            "channel": channel,
            "time": time.time(),
            "sent": None,
            "mark_timestamp": now,
            "mark_price": self.market.mark(name).price,
        }
        self.ticker_log.append(row)
        return row

    def _send_book(self, channel: Channel, conns: list[Connection], now: float) -> None:
        """Book notifications carry level changes against what this subscriber saw last."""
        bids, asks = self.market.book(channel.target)
        bid_levels = self._group(bids, channel, buy=True)
        ask_levels = self._group(asks, channel, buy=False)
        logged = self._log_ticker(channel.target, now, "book") if conns else None
        for conn in conns:
            seen_bids, seen_asks = channel.views.get(conn, ({}, {}))
            notification = {
                "trades": [],
                "bid_changes": self._changes(seen_bids, bid_levels),
                "ask_changes": self._changes(seen_asks, ask_levels),
                "total_bid_amount": round(sum(bid_levels.values()), 10),
                "total_ask_amount": round(sum(ask_levels.values()), 10),
                "time": now,
            }
            channel.views[conn] = (bid_levels, ask_levels)
            conn.notify(channel.name, notification, logged)

    def _group(self, levels: list[list[float]], channel: Channel, buy: bool) -> dict[float, float]:
        grouped: dict[float, float] = {}
        for price, amount in levels:
            if channel.grouping is not None:
                price = align_down(price, channel.grouping) if buy else align_up(price, channel.grouping)
            grouped[price] = round(grouped.get(price, 0.0) + amount, 10)
        keep = (
            sorted(grouped, reverse=buy)[: channel.nlevels] if channel.nlevels is not None else list(grouped)
        )
        return {price: grouped[price] for price in keep}

    @staticmethod
    def _changes(before: dict[float, float], after: dict[float, float]) -> list[list[float]]:
        changes = [[p, a, a] for p, a in after.items() if before.get(p) != a]
        changes += [[p, 0.0, 0.0] for p in before if p not in after]
        return changes

    def _after_market_change(self, now: float) -> None:
        """Prices moved: maker fills for crossed orders, raw feeds, and portfolio lines that moved 1 %."""
        self._publish(self.engine.on_market(now))
        self._publish_channels(now, raw_only=True)
        moved: list[Event] = []
        for (key_id, name), sent_mark in list(self.portfolio_marks.items()):
            account = self.engine.accounts.get(key_id)
            position = account.positions.get(name) if account else None
            if position is None:
                continue
            mark = self.market.mark(name).price
            if sent_mark and abs(mark - sent_mark) > PORTFOLIO_MARK_MOVE * abs(sent_mark):
                moved.append(Event("portfolio", key_id, None, self.engine.portfolio_entry(position)))
        self._publish(moved)

    async def _market_loop(self) -> None:
        """Steps the random walk every ``tick_interval`` and serves the delayed channels."""
        while True:
            await asyncio.sleep(LOOP_INTERVAL)
            now = self.clock()
            try:
                if now - self._last_step >= self.tick_interval:
                    self._last_step = now
                    if self.market.step(now, self.tick_interval):
                        self._after_market_change(now)
                self._publish_channels(now, raw_only=False)
                if now - self._last_summary >= SUMMARY_INTERVAL:
                    self._last_summary = now
                    for conn in self.connections:
                        if conn.session is not None and "account.summary" in conn.channels:
                            conn.notify("account.summary", self.engine.account_summary(conn.session.account))
            except Exception:
                log.exception("market loop step failed")

    # Trading methods

    async def _insert(self, conn: Connection, params: dict, now: float) -> dict:
        result, events = self.engine.insert(self._session(conn), params, now)
        conn.after.append(lambda: self._publish(events))
        return result

    async def _buy(self, conn: Connection, params: dict, now: float) -> dict:
        return await self._insert(conn, {**params, "direction": "buy"}, now)

    async def _sell(self, conn: Connection, params: dict, now: float) -> dict:
        return await self._insert(conn, {**params, "direction": "sell"}, now)

    async def _amend(self, conn: Connection, params: dict, now: float) -> dict:
        result, events = self.engine.amend(self._session(conn), params, now)
        conn.after.append(lambda: self._publish(events))
        return result

    async def _cancel(self, conn: Connection, params: dict, now: float) -> dict:
        result, events = self.engine.cancel(self._session(conn), params, now)
        conn.after.append(lambda: self._publish(events))
        return result

    async def _cancel_all(self, conn: Connection, params: dict, now: float) -> int:
        count, events = self.engine.cancel_all(self._session(conn), now)
        conn.after.append(lambda: self._publish(events))
        return count

    async def _cancel_session(self, conn: Connection, params: dict, now: float) -> None:
        events = self.engine.cancel_session(self._session(conn), now)
        conn.after.append(lambda: self._publish(events))

    async def _open_orders(self, conn: Connection, params: dict, now: float) -> list[dict]:
        return self.engine.open_orders(self._session(conn).account)

    async def _portfolio(self, conn: Connection, params: dict, now: float) -> list[dict]:
        return self.engine.portfolio(self._session(conn).account)

    async def _trade_history(self, conn: Connection, params: dict, now: float) -> dict:
        return self.engine.trade_history(self._session(conn).account, params, now)

    async def _account_summary(self, conn: Connection, params: dict, now: float) -> dict:
        return self.engine.account_summary(self._session(conn).account)

    # Control

    async def _on_control(self, conn: Connection, rid: Any, method: str, params: dict) -> None:
        try:
            result = await self.control(method, params, conn)
        except RpcError as exc:
            self._reply(conn, rid, error=exc)
            return
        self._reply(conn, rid, result=result)

    async def control(self, method: str, params: dict, requester: Connection | None = None) -> Any:
        """Run one ``paper/*`` control method (used by the websocket and by scenarios)."""
        handler = self._controls.get(method) if self.control_enabled else None
        if handler is None:
            raise RpcError(UNKNOWN_METHOD, f"unknown method {method}")
        return await handler(params, requester)

    def _underlying(self, params: dict) -> str:
        underlying = params.get("underlying")
        if underlying not in self.market.index:
            raise RpcError(UNKNOWN_INSTRUMENT, f"unknown underlying {underlying}")
        return underlying

    @staticmethod
    def _positive(params: dict, name: str, default: float | None = None) -> float:
        value = params.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise RpcError(INVALID_REQUEST, f"{name} must be a positive number")
        return float(value)

    def _changed(self) -> dict:
        self.market.version += 1
        self._after_market_change(self.clock())
        return self._status()

    def _status(self) -> dict:
        return {
            "paused": self.market.paused,
            "seed": self.seed,
            "url": self.url,
            "index": dict(self.market.index),
            "connections": len(self.connections),
            "pinned_marks": dict(self.market.pinned_marks),
        }

    async def _c_status(self, params: dict, requester: Connection | None) -> dict:
        return self._status()

    async def _c_set_index(self, params: dict, requester: Connection | None) -> dict:
        self.market.set_index(self._underlying(params), self._positive(params, "price"))
        return self._changed()

    async def _c_move_index(self, params: dict, requester: Connection | None) -> dict:
        underlying = self._underlying(params)
        price = self.market.index[underlying]
        pct, delta = params.get("pct"), params.get("delta")
        if isinstance(pct, (int, float)) and not isinstance(pct, bool):
            price *= 1.0 + pct / 100.0
        elif isinstance(delta, (int, float)) and not isinstance(delta, bool):
            price += delta
        else:
            raise RpcError(INVALID_REQUEST, "give pct (percent) or delta (USD)")
        if price <= 0:
            raise RpcError(INVALID_REQUEST, "the index must stay positive")
        self.market.set_index(underlying, price)
        return self._changed()

    async def _c_set_mark(self, params: dict, requester: Connection | None) -> dict:
        name = self._instrument_name(params)
        if params.get("price") is None:
            self.market.pinned_marks.pop(name, None)
        else:
            self.market.pinned_marks[name] = self._positive(params, "price")
        return self._changed()

    async def _c_set_funding(self, params: dict, requester: Connection | None) -> dict:
        name = self._instrument_name(params)
        if name not in self.market.funding_marks:
            raise RpcError(INVALID_REQUEST, f"{name} is not a perpetual")
        for field_name, store in (
            ("funding_mark", self.market.funding_marks),
            ("funding_rate", self.market.funding_rates),
        ):
            value = params.get(field_name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RpcError(INVALID_REQUEST, f"{field_name} must be a number")
                store[name] = float(value)
        return self._changed()

    async def _c_pause(self, params: dict, requester: Connection | None) -> dict:
        self.market.paused = True
        return self._status()

    async def _c_resume(self, params: dict, requester: Connection | None) -> dict:
        self.market.paused = False
        return self._status()

    async def _c_step(self, params: dict, requester: Connection | None) -> dict:
        """Advance the random walk ``count`` times by ``dt`` seconds of market time each (even paused)."""
        count = int(self._positive(params, "count", 1))
        dt = self._positive(params, "dt", self.tick_interval)
        for _ in range(count):
            self.market.step(self.clock(), dt, force=True)
        self._after_market_change(self.clock())
        return self._status()

    def _account_of(self, key_id: str | None) -> str | None:
        """The account a key id trades for (control methods name keys, the engine accounts)."""
        if key_id is None:
            return None
        if key_id not in self.keys:
            raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
        return self.keys[key_id].account

    async def _c_fill_orders(self, params: dict, requester: Connection | None) -> dict:
        amount = self._positive(params, "amount") if params.get("amount") is not None else None
        name = self._instrument_name(params) if params.get("instrument_name") is not None else None
        direction = params.get("direction")
        if direction not in (None, "buy", "sell"):
            raise RpcError(INVALID_REQUEST, "direction must be buy or sell")
        events = self.engine.fill_resting(
            self.clock(),
            self._account_of(params.get("key_id")),
            name,
            params.get("order_id"),
            amount,
            direction,
        )
        self._publish(events)
        return {"trades": [e.payload for e in events if e.kind == "trade"]}

    async def _c_trade(self, params: dict, requester: Connection | None) -> dict:
        key_id = params.get("key_id")
        if key_id not in self.keys:
            raise RpcError(INVALID_REQUEST, f"unknown key_id {key_id}")
        price = self._positive(params, "price") if params.get("price") is not None else None
        trades, events = self.engine.direct_trade(
            self.keys[key_id].account,
            self._instrument_name(params),
            params.get("direction", ""),
            self._positive(params, "amount"),
            price,
            self.clock(),
        )
        self._publish(events)
        return {"trades": trades}

    async def _c_drop_connections(self, params: dict, requester: Connection | None) -> dict:
        key_id = params.get("key_id")
        victims = [
            c
            for c in self.connections
            if c is not requester and (key_id is None or (c.key is not None and c.key.kid == key_id))
        ]
        for conn in victims:
            if params.get("abrupt"):
                conn.ws.transport.abort()
            else:
                await conn.ws.close(1012, "paper exchange dropped the connection")
        return {"dropped": len(victims)}

    async def _c_fail_next(self, params: dict, requester: Connection | None) -> dict:
        code = params.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            raise RpcError(INVALID_REQUEST, "code must be an integer")
        methods = params.get("methods")
        if methods is not None and (
            not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
        ):
            raise RpcError(INVALID_REQUEST, "methods must be a list of method names")
        count = int(self._positive(params, "count", 1))
        self.failures = [rule for rule in self.failures if rule.remaining > 0]
        self.failures.append(
            FailureRule(
                count,
                code,
                str(params.get("message", "injected failure")),
                frozenset(methods) if methods else None,
                params.get("key_id"),
            )
        )
        return {"pending": sum(rule.remaining for rule in self.failures)}

    async def _c_set_latency(self, params: dict, requester: Connection | None) -> dict:
        seconds = params.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise RpcError(INVALID_REQUEST, "seconds must be a non-negative number")
        methods = params.get("methods")
        if methods is None:
            self.latency = {None: float(seconds)} if seconds else {}
        else:
            for method in methods:
                self.latency[method] = float(seconds)
        return {"latency": {k or "*": v for k, v in self.latency.items()}}

    async def _c_set_history_delay(self, params: dict, requester: Connection | None) -> dict:
        seconds = params.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise RpcError(INVALID_REQUEST, "seconds must be a non-negative number")
        self.engine.history_delay = float(seconds)
        return {"history_delay": self.engine.history_delay}

    async def _c_set_book(self, params: dict, requester: Connection | None) -> dict:
        name = self._instrument_name(params)
        if params.get("reset"):
            self.market.books.pop(name, None)
            return self._changed()
        shape = self.market.books.get(name) or BookShape()
        try:
            for field_name, kind in (
                ("levels", int),
                ("spread_ticks", int),
                ("step_ticks", int),
                ("level_amount", float),
                ("growth", float),
                ("bids", bool),
                ("asks", bool),
            ):
                if params.get(field_name) is not None:
                    setattr(shape, field_name, kind(params[field_name]))
        except (TypeError, ValueError):
            raise RpcError(INVALID_REQUEST, "invalid book shape") from None
        if shape.levels < 0 or shape.spread_ticks < 1 or shape.step_ticks < 1:
            raise RpcError(INVALID_REQUEST, "levels >= 0, spread_ticks >= 1 and step_ticks >= 1")
        self.market.books[name] = shape
        return self._changed()

    async def _c_order_log(self, params: dict, requester: Connection | None) -> dict:
        since = params.get("since", 0.0)
        rows = [
            row
            for row in self.order_log
            if row["time"] >= since
            and (params.get("key_id") is None or row["key_id"] == params["key_id"])
            and (params.get("method") is None or row["method"] == params["method"])
        ]
        return {"orders": rows[-int(params.get("limit", ORDER_LOG_SIZE)) :]}

    async def _c_ticker_log(self, params: dict, requester: Connection | None) -> dict:
        since = params.get("since", 0.0)
        rows = [
            row
            for row in self.ticker_log
            if row["time"] >= since
            and (params.get("instrument_name") is None or row["instrument_name"] == params["instrument_name"])
        ]
        return {"tickers": rows[-int(params.get("limit", TICKER_LOG_SIZE)) :]}

    async def _c_burst_ticks(self, params: dict, requester: Connection | None) -> dict:
        """Emit ``count`` ticker changes of one instrument as fast as possible (benchmarks)."""
        name = self._instrument_name(params)
        count = int(self._positive(params, "count"))
        started = time.perf_counter()
        for i in range(count):
            self.market.step(self.clock(), BURST_STEP, force=True)
            now = self.clock()
            for channel in list(self.channels.values()):
                if channel.kind == "ticker" and channel.target == name and channel.delay == 0:
                    self._send_channel(channel, now)
            if i % 200 == 199:
                await asyncio.sleep(0)
        return {"sent": count, "seconds": time.perf_counter() - started}

    async def _c_reconnect_notice(self, params: dict, requester: Connection | None) -> dict:
        self._broadcast_reconnect()
        return {"notified": len(self.connections)}
