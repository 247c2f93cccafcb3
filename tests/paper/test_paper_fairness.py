"""A burst to one connection does not hold the paper exchange's loop (`connection.WRITES_BEFORE_YIELD`)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.paper.connection import WRITES_BEFORE_YIELD, Connection


class Socket:
    """Stands in for the websocket: takes each message at once, as a socket with room does."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> None:
        self.sent.append(text)


async def test_other_work_runs_while_a_burst_is_written_and_the_burst_stays_in_order() -> None:
    socket = Socket()
    conn = Connection(ws=socket, conn_id=1)  # type: ignore[arg-type]
    for n in range(2_000):  # 1,000 books re-sent: a ticker and a book each
        conn.push(str(n))
    seen: list[int] = []

    async def another_connections_request() -> None:
        seen.append(len(socket.sent))

    writer = asyncio.create_task(conn.write())
    await asyncio.sleep(0)  # the writer starts
    await another_connections_request()
    await asyncio.wait_for(conn.drain(), 5)
    writer.cancel()
    assert seen[0] <= WRITES_BEFORE_YIELD  # served after one slice of the burst, not after all 2,000
    assert socket.sent == [str(n) for n in range(2_000)]


async def test_a_reply_queued_behind_a_burst_leaves_behind_it() -> None:
    """Order on one connection is kept: an answer queued after the burst is sent after it."""
    socket = Socket()
    conn = Connection(ws=socket, conn_id=1)  # type: ignore[arg-type]
    for n in range(100):
        conn.push(str(n))
    conn.reply(7, result=None)
    writer = asyncio.create_task(conn.write())
    await asyncio.wait_for(conn.drain(), 5)
    writer.cancel()
    last: Any = socket.sent[-1]
    assert last == '{"id": 7, "result": null}' and len(socket.sent) == 101
