"""Bad input, half-open connections, reconnect notices, and the exactly-once store itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from services.common.bus import Bus
from services.common.config import Settings
from services.common.contracts import DeadLetter, Fill
from services.common.streams import Names
from services.ingest.app import DEDUP_RETENTION_SECONDS, FillStore
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, Trader, fills_on, running_ingest, stream_docs, wait_until


def watcher_connection(paper: PaperHandle):
    return next(c for c in paper.exchange.connections if c.key is not None and c.key.kid == "watcher")


async def test_malformed_exchange_messages_are_dead_lettered_and_ingest_keeps_going(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings) as ingest:
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: f"ticker.{PERP}.raw" in ingest.channels, 5)
        conn = watcher_connection(paper)
        conn.push("{not json")
        conn.push(json.dumps([1, 2]))
        conn.notify("account.trade_history", [{"trade_id": "T-bad", "direction": "sideways"}])
        conn.notify("account.portfolio", [{"instrument_name": PERP}])
        conn.notify(f"ticker.{PERP}.raw", {"mark_price": "a lot"})
        conn.notify(f"book.{PERP}.none.10.raw", {"bid_changes": [["x", 1]]})

        async def five_letters() -> list[DeadLetter]:
            letters = [DeadLetter.model_validate(d) for d in await stream_docs(redis, names.deadletter)]
            return letters if len(letters) >= 6 else []

        letters = await wait_until(five_letters, 5)
        order = await trader.market("sell", PERP, 0.1)  # still alive and publishing
        await wait_until(lambda: _has_fill(redis, names, order["fills"][0]["trade_id"]), 5)
        assert ingest.session is not None and ingest.session.ready
    by_source = {letter.source_stream: letter for letter in letters}
    assert by_source["thalex:websocket"].raw in ("{not json", "[1, 2]")
    assert "not valid JSON" in " ".join(d.error for d in letters)
    trade = by_source["thalex:account.trade_history"]
    assert trade.entry_id == "T-bad" and "Trade: " in trade.error and "T-bad" in trade.raw
    assert "PortfolioEntry: position: Field required" in by_source["thalex:account.portfolio"].error
    assert "mark_price: Input should be a valid number" in by_source[f"thalex:ticker.{PERP}.raw"].error
    assert "price 'x' is not a finite number" in by_source[f"thalex:book.{PERP}.none.10.raw"].error
    assert all(letter.service == "ingest" for letter in letters)


async def _has_fill(redis: Redis, names: Names, trade_id: str) -> bool:
    return any(f.trade_id == trade_id for f in await fills_on(redis, names))


class FreezableProxy:
    """A TCP relay between ingest and the exchange that can go silent (a half-open link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.connections = 0

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if not self.frozen:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.frozen = False
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._relay(reader, up_writer), self._relay(up_reader, writer))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()


async def test_a_half_open_connection_is_detected_and_replaced(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    port = int(paper.url.split(":")[2].split("/")[0])
    proxy = FreezableProxy(port)
    async with proxy.running() as proxy_port:
        url = paper.url.replace(f":{port}/", f":{proxy_port}/")
        quick = settings.model_copy(update={
            "thalex": settings.thalex.model_copy(update={"network": url}),
            "ingest": settings.ingest.model_copy(update={"idle_timeout_seconds": 1.0}),
        })
        async with running_ingest(quick) as ingest:
            assert proxy.connections == 1
            proxy.frozen = True  # TCP stays up, nothing arrives any more
            order = await trader.market("buy", PERP, 0.1)  # made while ingest is blind
            await wait_until(lambda: proxy.connections == 2, 5)
            await wait_until(lambda: _has_fill(redis, names, order["fills"][0]["trade_id"]), 5)
            assert ingest.session is not None


async def test_a_reconnect_notice_moves_to_a_new_connection_at_once(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings) as ingest:
        first = watcher_connection(paper)
        await paper.control("paper/reconnect_notice")
        await wait_until(lambda: any(c is not first and c.key is not None and c.key.kid == "watcher"
                                     and "account.trade_history" in c.channels
                                     for c in paper.exchange.connections), 3)
        order = await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: _has_fill(redis, names, order["fills"][0]["trade_id"]), 5)
        assert ingest.session is not None


def fill(trade_id: str, ts: float) -> Fill:
    return Fill(trade_id=trade_id, order_id="o", instrument=PERP, side="buy", price=1.0, amount=1.0, fee=0.0,
                exchange_ts=ts, ingest_ts=ts)


async def test_fill_store_publishes_each_trade_once_and_keeps_its_set_bounded(
    redis_url: str, names: Names, redis: Redis
) -> None:
    bus = Bus(redis_url, names, "ingest")
    store = FillStore(bus)
    try:
        assert [f.trade_id for f in await store.publish([fill("a", 10), fill("b", 11), fill("a", 10)])] == [
            "a",
            "b",
        ]
        assert [f.trade_id for f in await store.publish([fill("b", 11), fill("c", 12)])] == ["c"]
        assert await store.publish([fill("a", 10)]) == []
        racing = await asyncio.gather(*(store.publish([fill("d", 13), fill("e", 14)]) for _ in range(5)))
        assert sorted(f.trade_id for batch in racing for f in batch) == ["d", "e"]
        assert [f.trade_id for f in await fills_on(redis, names)] == ["a", "b", "c", "d", "e"]
        assert await store.checkpoint() == 14
        later = 14 + DEDUP_RETENTION_SECONDS + 1
        await store.publish([fill("z", later)])
        assert await redis.zrange(store.ids_key, 0, -1) == [b"z"]  # older ids trimmed
        assert await store.since(100.0) == 100.0 and await store.since(200.0) == 100.0
    finally:
        await bus.redis.aclose()
