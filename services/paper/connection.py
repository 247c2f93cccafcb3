"""One websocket connection: its login session, its channels and an ordered outgoing queue."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.paper.engine import Session
from services.paper.keys import ApiKey

WRITE_SLICE = 16
"""Messages one connection writes before the loop serves the others. A websocket send rarely waits,
so a queue of a hundred market-data messages was written in one go (3–8 ms in a probe under the
benchmarks' tick load) while another connection's `cancel_all` and orders waited; on Thalex, order entry does
not wait for a market-data fanout."""


@dataclass(eq=False)
class Connection:
    """A websocket; ``after`` holds what must be sent right behind the answer being prepared."""

    ws: ServerConnection
    conn_id: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    session: Session | None = None
    key: ApiKey | None = None
    channels: set[str] = field(default_factory=set)
    after: list[Callable[[], None]] = field(default_factory=list)

    @property
    def key_id(self) -> str | None:
        return self.key.kid if self.key is not None else None

    def push(self, text: str, logged: dict | None = None) -> None:
        """Queue a message; `logged` (a `ticker_log` row) gets its `sent` time when the message leaves."""
        self.queue.put_nowait((text, logged))

    def notify(self, channel: str, notification: Any, logged: dict | None = None) -> None:
        self.push(json.dumps({"channel_name": channel, "notification": notification}), logged)

    def reply(self, rid: Any, *, result: Any = None, error: dict | None = None) -> None:
        if error is not None:
            self.push(json.dumps({"id": rid, "error": error}))
        else:
            self.push(json.dumps({"id": rid, "result": result}))

    async def write(self) -> None:
        """Send the queue in order until the websocket closes."""
        try:
            written = 0
            while True:
                text, logged = await self.queue.get()
                if logged is not None and logged["sent"] is None:
                    logged["sent"] = time.time()
                await self.ws.send(text)
                self.queue.task_done()
                written += 1
                if written % WRITE_SLICE == 0:
                    await asyncio.sleep(0)
        except ConnectionClosed:
            pass

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the websocket (bound it with a timeout)."""
        await self.queue.join()
